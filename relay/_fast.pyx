# cython: language_level=3, boundscheck=False, wraparound=False
from relay._pkt cimport csum_partial, csum_finish, write_udp_headers
from relay._addr cimport sockaddr_any, sockaddr_from_tuple, sockaddr_to_tuple
def _probe(bytes b):
    return csum_finish(csum_partial(b, len(b), 0))

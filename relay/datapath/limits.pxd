# cython: language_level=3
# Limits the C data path shares, defined once (the pure twins: relay/config.py).

cdef enum:
    FD_RESERVE = 32               # descriptors kept free of per-flow sockets, for replies,
                                  # new connections and the control plane: a flow socket
                                  # numbered within FD_RESERVE of the soft RLIMIT_NOFILE is
                                  # closed and its flow refused (assoc_refused)

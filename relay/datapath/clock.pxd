# cython: language_level=3
# The data path's clock for idle timeouts and sweeps (the engine, tun): the coarse
# monotonic clock, a few milliseconds of resolution at a fraction of a full read's cost.
from relay.includes.system cimport timespec, clock_gettime, CLOCK_MONOTONIC_COARSE


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9

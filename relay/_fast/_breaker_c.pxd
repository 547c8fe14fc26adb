# Declarations that compile _breaker_py.py into _breaker_c: the Python source
# is the single definition, this file adds C types and declares the states up
# front as a C enum (the values are the contract's gauge values).

cdef enum BreakerState:
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


cdef class CircuitBreaker:
    cdef int _threshold
    cdef double _recovery
    cdef BreakerState _state
    cdef int _failures
    cdef double _opened_at
    cdef bint _probe_out

    cpdef bint allow(self, double now) except? -1
    cpdef void record_success(self) except *
    cpdef void record_failure(self, double now) except *
    cpdef void release_probe(self) noexcept
    cpdef double retry_after(self, double now) noexcept
    cdef void _set_state(self, BreakerState new) except *

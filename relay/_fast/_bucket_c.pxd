# Declarations that compile _bucket_py.py into _bucket_c: the Python source
# is the single definition, this file only adds C types.
cimport cython


cdef class TokenBucket:
    cdef double _rate
    cdef double _burst
    cdef double _tokens
    cdef double _last

    @cython.locals(last=double, tokens=double)
    cdef inline void _refill(self, double now) noexcept
    cpdef bint take(self, double now)
    cpdef long long remaining(self, double now)
    cpdef double retry_after(self, double now)
    @cython.locals(missing=double)
    cdef inline double _wait(self) noexcept
    @cython.locals(allowed=bint)
    cdef tuple _acquire(self, double now)


cdef class BucketTable:
    cdef double _rate
    cdef double _burst
    cdef Py_ssize_t _max_keys
    cdef object _buckets

    @cython.locals(bucket=TokenBucket)
    cpdef tuple acquire(self, object key, double now)

# Declarations that compile _coalescer_py.py into _coalescer_c: the Python
# source is the single definition, this file makes the leader, the follower
# and the coalescer cdef classes with typed fields (sizes and positions as C
# integers, flags as C booleans).

cdef class Leader:
    cdef public Coalescer _coalescer
    cdef public bytes key
    cdef public Py_ssize_t cap
    cdef public object head
    cdef public list chunks
    cdef public Py_ssize_t base
    cdef public Py_ssize_t retained
    cdef public Py_ssize_t total
    cdef public int state
    cdef public bint overflowed
    cdef public object event
    cdef public object started
    cdef public Py_ssize_t joined

cdef class Follower:
    cdef public Leader _flight
    cdef public Py_ssize_t pos
    cdef public bint aborted
    cdef public bint _closed
    cdef object __weakref__

cdef class Coalescer:
    cdef public Py_ssize_t max_body_bytes
    cdef public dict _flights

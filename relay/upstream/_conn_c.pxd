# Declarations that compile _conn_py.py into _conn_c: the Python source is
# the single definition, this file makes UpstreamConnection a cdef class
# whose fields are struct members (flags as C booleans, times as doubles).

cdef class UpstreamConnection:
    # -- per connection --
    cdef object _loop
    cdef public double _read_timeout
    cdef public object _on_closed
    cdef public object transport
    cdef object _parser
    cdef public bint lost
    cdef public bint reusable
    cdef public double idle_since
    cdef public Py_ssize_t exchanges
    cdef object _flow
    cdef object _timer
    cdef double _timer_when
    cdef double _last_activity
    # -- per exchange --
    cdef object _sink
    cdef list _headers
    cdef public object head
    cdef int _status
    cdef object _length
    cdef bint _close_delimited
    cdef bint _head_done
    cdef bint _head_only
    cdef bint _received_any
    cdef double _head_deadline
    cdef object __weakref__

    cpdef detach(self)
    cpdef close(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cdef _fail(self, error)
    cdef _arm(self, double when)
    cdef _cancel_timer(self)

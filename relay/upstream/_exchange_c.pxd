# Declarations that compile _exchange_py.py into _exchange_c: the Python
# source is the single definition, this file makes ProxyExchange a cdef
# class whose fields are struct members (sizes as C integers, flags as C
# booleans, times as doubles) and whose steps within a response are C calls.

cdef class ProxyExchange:
    cdef object _client
    cdef object _upstream
    cdef object _release
    cdef list _extra_headers
    cdef Py_ssize_t _record_limit
    cdef Py_ssize_t _json_limit
    cdef bint _strip_usage
    cdef object _observer
    cdef bint _head_only
    cdef double _sent_at
    cdef object _loop
    cdef public object done
    cdef public int status
    cdef public object headers
    cdef public object shared_headers
    cdef public object shared_lines
    cdef public object content_type
    cdef public double first_byte_at
    cdef public list recorded
    cdef public Py_ssize_t recorded_size
    cdef public object stream_usage
    cdef public object splitter
    cdef public list json_body
    cdef public int outcome
    cdef public object error
    cdef public Py_ssize_t bytes_sent
    cdef bint _first_event_pending
    cdef object _retry
    cdef public bint discarded
    cdef object _decoder
    cdef bytes _path
    cdef bint _started
    cdef bint _count_usage

    cpdef _relay_stream(self, bytes chunk)
    cpdef _relay_events(self, list events)
    cdef _first_event_out(self)
    cdef _forward(self, bytes chunk)
    cdef _forward_many(self, list chunks)
    cdef _keep(self, bytes chunk)

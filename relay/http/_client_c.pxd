# Declarations that compile _client_py.py into _client_c: the Python source
# is the single definition, this file adds C types. The states are C ints
# (the same values as relay.http.states' enums, declared here as a C enum so
# every comparison on the hot path is one C compare); offsets, sizes and
# limits are C integers; the connection's attributes are struct fields.

cdef enum ConnStates:
    _OPEN = 0
    _IDLE = 1
    _CLOSING = 2
    _HALF_CLOSED = 3
    _CLOSED = 4

cdef enum ReadStates:
    _AWAIT = 0
    _HEAD = 1
    _BODY = 2
    _CONTINUE = 3
    _UPGRADE = 4

cdef enum AnswerStates:
    _NONE = 0
    _PENDING = 1
    _STREAMING = 2
    _CHUNKING = 3


cpdef object _line_error(bytes data, Py_ssize_t start, Py_ssize_t end)


cdef class ConnectionLimits:
    cdef public Py_ssize_t max_body_bytes
    cdef public Py_ssize_t max_header_bytes
    cdef public double header_timeout
    cdef public double idle_timeout


cdef class _Rejected:
    cdef public object error


cdef class ClientConnection:
    # -- per connection --
    cdef object _handler
    cdef ConnectionLimits _limits
    cdef object _registry
    cdef object _tasks
    cdef object _loop
    cdef object _transport
    cdef object _parser
    cdef str _client_ip
    cdef int _state
    cdef object _flow
    cdef object _queue
    cdef object _timer
    cdef double _timer_when
    cdef object _deadline
    cdef Py_ssize_t _head_raw
    cdef bytes _data
    cdef Py_ssize_t _line_at
    cdef object _line_part
    # -- per request (being read) --
    cdef int _read
    cdef bytes _url
    cdef int _minor
    cdef list _headers
    cdef Py_ssize_t _header_bytes
    cdef list _body
    cdef Py_ssize_t _body_size
    cdef Py_ssize_t _length
    cdef Py_ssize_t _head_at
    cdef Py_ssize_t _end_at
    cdef object _req
    # -- per request (being answered) --
    cdef int _answer
    cdef object _current
    cdef object _task
    cdef bint _close_after
    cdef object _held
    cdef public object on_lost
    cdef object __weakref__

    cpdef _set_state(self, int new)
    cpdef _set_read(self, int new)
    cpdef _set_answer(self, int new)
    cdef _stop_reading_requests(self)
    cdef _check_line(self, bytes data, Py_ssize_t start)
    cdef Py_ssize_t _previous_end(self) except? -2
    cdef bint _line_ended(self, bytes data) except -1
    cdef bint _ignorable_upgrade(self) except -1
    cdef _reject(self, error)
    cpdef _dispatch(self, request)
    cdef _begin(self, request)
    cdef _run(self, request)
    cdef _failed(self, request, exc)
    cdef _answered(self, request)
    cdef _next(self)
    cpdef write(self, chunk)
    cpdef write_many(self, chunks)
    cpdef finish(self)
    cpdef hold(self)
    cpdef release(self)
    cdef _emit(self, parts)
    cpdef abort(self)
    cdef _arm_timer(self, double delay)
    cdef _cancel_timer(self)
    cdef _stop_timer(self)
    cdef _on_timeout(self)

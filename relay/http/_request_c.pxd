# Declarations that compile _request_py.py into _request_c: the Python source
# is the single definition, this file makes Request a cdef class. One is
# built per request and read by every stage, so its construction and its
# few derived facts (the credential, the varying-header key) run as C.

cdef class Request:
    cdef public bytes method
    cdef public bytes target
    cdef public bytes path
    cdef public list headers
    cdef public bytes body
    cdef public bint keep_alive
    cdef public int http_minor
    cdef public object client_ip
    cdef public object authorization
    cdef public object api_key
    cdef public object cache_control
    cdef public object forwarded_for
    cdef public bytes forward_headers
    cdef public bytes credential_headers
    cdef public list varying
    cdef public double started
    cdef public object relay_key
    cdef public object on_finished
    cdef object _json
    cdef object _facts
    cdef object _credential

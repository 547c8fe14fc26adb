# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Request and response heads, compiled twin of ``_heads_py``.

Same results as the pure module (which defines them and holds the
constants). What it gains: each name is classified by its length and one
``memcmp`` on a lowercased copy on the stack (no lowercased ``bytes``
object per header, no dict lookup), and the forwarded headers are rendered
straight into one ``bytes`` object of the size counted on the way (no
object per line, no join). Anything unusual (a Connection header naming
other headers, input that is not a list of ``(bytes, bytes)`` pairs) takes
the pure module's code, so the results stay the same by construction.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.string cimport memchr, memcmp, memcpy

from . import _heads_py as _reference

cdef extern from *:
    """
    #include <string.h>
    /* Class numbers: checked against relay/_fast/_heads_py.py at import. */
    enum {
        RELAY_R_FORWARD = 0, RELAY_R_DROP = 1, RELAY_R_AUTHORIZATION = 2,
        RELAY_R_X_API_KEY = 3, RELAY_R_API_KEY = 4, RELAY_R_CACHE_CONTROL = 5,
        RELAY_R_CONTENT_LENGTH = 6, RELAY_R_TRANSFER_ENCODING = 7, RELAY_R_HOST = 8,
        RELAY_R_X_FORWARDED_FOR = 9, RELAY_R_VARYING = 10, RELAY_R_CONNECTION = 11,
        RELAY_R_EXPECT = 12
    };
    enum {
        RELAY_S_RELAY = 0, RELAY_S_DROP = 1, RELAY_S_CONNECTION = 2,
        RELAY_S_CONTENT_TYPE = 3, RELAY_S_CONTENT_ENCODING = 4,
        RELAY_S_CONTENT_LENGTH = 5, RELAY_S_TRANSFER_ENCODING = 6,
        RELAY_S_PER_CALLER = 7
    };
    #define RELAY_LONGEST_NAME 25  /* proxy-authentication-info */

    /* bytes.lower(): ASCII A-Z only. Returns 0 when the name is longer
       than any name relay acts on (then it is an ordinary header). */
    static inline int relay_lower(const char *p, Py_ssize_t n, char *out) {
        Py_ssize_t i;
        if (n > RELAY_LONGEST_NAME) return 0;
        for (i = 0; i < n; i++) {
            char c = p[i];
            out[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        return 1;
    }
    #define RELAY_IS(lit) (memcmp(b, lit, (size_t)n) == 0)

    static int relay_request_class(const char *p, Py_ssize_t n) {
        char b[RELAY_LONGEST_NAME];
        if (!relay_lower(p, n, b)) return RELAY_R_FORWARD;
        switch (n) {
        case 2: if (RELAY_IS("te")) return RELAY_R_DROP; break;
        case 4: if (RELAY_IS("host")) return RELAY_R_HOST; break;
        case 6: if (RELAY_IS("expect")) return RELAY_R_EXPECT; break;
        case 7:
            if (RELAY_IS("api-key")) return RELAY_R_API_KEY;
            if (RELAY_IS("trailer") || RELAY_IS("upgrade")) return RELAY_R_DROP;
            break;
        case 9: if (RELAY_IS("x-api-key")) return RELAY_R_X_API_KEY; break;
        case 10:
            if (RELAY_IS("connection")) return RELAY_R_CONNECTION;
            if (RELAY_IS("keep-alive")) return RELAY_R_DROP;
            break;
        case 13:
            if (RELAY_IS("authorization")) return RELAY_R_AUTHORIZATION;
            if (RELAY_IS("cache-control")) return RELAY_R_CACHE_CONTROL;
            break;
        case 14:
            if (RELAY_IS("content-length")) return RELAY_R_CONTENT_LENGTH;
            if (RELAY_IS("anthropic-beta") || RELAY_IS("openai-project")) return RELAY_R_VARYING;
            break;
        case 15:
            if (RELAY_IS("x-forwarded-for")) return RELAY_R_X_FORWARDED_FOR;
            if (RELAY_IS("accept-encoding")) return RELAY_R_DROP;
            break;
        case 16: if (RELAY_IS("proxy-connection")) return RELAY_R_DROP; break;
        case 17:
            if (RELAY_IS("transfer-encoding")) return RELAY_R_TRANSFER_ENCODING;
            if (RELAY_IS("x-forwarded-proto")) return RELAY_R_DROP;
            if (RELAY_IS("anthropic-version")) return RELAY_R_VARYING;
            break;
        case 18: if (RELAY_IS("proxy-authenticate")) return RELAY_R_DROP; break;
        case 19:
            if (RELAY_IS("proxy-authorization")) return RELAY_R_DROP;
            if (RELAY_IS("openai-organization")) return RELAY_R_VARYING;
            break;
        }
        return RELAY_R_FORWARD;
    }

    static int relay_response_class(const char *p, Py_ssize_t n) {
        char b[RELAY_LONGEST_NAME];
        if (!relay_lower(p, n, b)) return RELAY_S_RELAY;
        switch (n) {
        case 2: if (RELAY_IS("te")) return RELAY_S_DROP; break;
        case 7: if (RELAY_IS("trailer") || RELAY_IS("upgrade")) return RELAY_S_DROP; break;
        case 10:
            if (RELAY_IS("connection")) return RELAY_S_CONNECTION;
            if (RELAY_IS("keep-alive")) return RELAY_S_DROP;
            if (RELAY_IS("set-cookie")) return RELAY_S_PER_CALLER;
            break;
        case 11: if (RELAY_IS("set-cookie2")) return RELAY_S_PER_CALLER; break;
        case 12: if (RELAY_IS("content-type")) return RELAY_S_CONTENT_TYPE; break;
        case 13: if (RELAY_IS("x-relay-cache")) return RELAY_S_DROP; break;
        case 14: if (RELAY_IS("content-length")) return RELAY_S_CONTENT_LENGTH; break;
        case 16:
            if (RELAY_IS("content-encoding")) return RELAY_S_CONTENT_ENCODING;
            if (RELAY_IS("proxy-connection")) return RELAY_S_DROP;
            if (RELAY_IS("www-authenticate")) return RELAY_S_PER_CALLER;
            break;
        case 17: if (RELAY_IS("transfer-encoding")) return RELAY_S_TRANSFER_ENCODING; break;
        case 18: if (RELAY_IS("proxy-authenticate")) return RELAY_S_DROP; break;
        case 19:
            if (RELAY_IS("proxy-authorization")) return RELAY_S_DROP;
            if (RELAY_IS("authentication-info")) return RELAY_S_PER_CALLER;
            break;
        case 25: if (RELAY_IS("proxy-authentication-info")) return RELAY_S_PER_CALLER; break;
        }
        return RELAY_S_RELAY;
    }
    #undef RELAY_IS
    """
    enum:
        RELAY_R_FORWARD
        RELAY_R_DROP
        RELAY_R_AUTHORIZATION
        RELAY_R_X_API_KEY
        RELAY_R_API_KEY
        RELAY_R_CACHE_CONTROL
        RELAY_R_CONTENT_LENGTH
        RELAY_R_TRANSFER_ENCODING
        RELAY_R_HOST
        RELAY_R_X_FORWARDED_FOR
        RELAY_R_VARYING
        RELAY_R_CONNECTION
        RELAY_R_EXPECT
        RELAY_S_RELAY
        RELAY_S_DROP
        RELAY_S_CONNECTION
        RELAY_S_CONTENT_TYPE
        RELAY_S_CONTENT_ENCODING
        RELAY_S_CONTENT_LENGTH
        RELAY_S_TRANSFER_ENCODING
        RELAY_S_PER_CALLER
    int relay_request_class(const char *p, Py_ssize_t n) noexcept nogil
    int relay_response_class(const char *p, Py_ssize_t n) noexcept nogil


def _check_classes() -> None:
    """The C class numbers are the pure module's (a mismatch must not load)."""
    ref = _reference
    pairs = (
        (RELAY_R_FORWARD, ref.R_FORWARD), (RELAY_R_DROP, ref.R_DROP),
        (RELAY_R_AUTHORIZATION, ref.R_AUTHORIZATION), (RELAY_R_X_API_KEY, ref.R_X_API_KEY),
        (RELAY_R_API_KEY, ref.R_API_KEY), (RELAY_R_CACHE_CONTROL, ref.R_CACHE_CONTROL),
        (RELAY_R_CONTENT_LENGTH, ref.R_CONTENT_LENGTH),
        (RELAY_R_TRANSFER_ENCODING, ref.R_TRANSFER_ENCODING), (RELAY_R_HOST, ref.R_HOST),
        (RELAY_R_X_FORWARDED_FOR, ref.R_X_FORWARDED_FOR), (RELAY_R_VARYING, ref.R_VARYING),
        (RELAY_R_CONNECTION, ref.R_CONNECTION), (RELAY_R_EXPECT, ref.R_EXPECT),
        (RELAY_S_RELAY, ref.S_RELAY), (RELAY_S_DROP, ref.S_DROP),
        (RELAY_S_CONNECTION, ref.S_CONNECTION), (RELAY_S_CONTENT_TYPE, ref.S_CONTENT_TYPE),
        (RELAY_S_CONTENT_ENCODING, ref.S_CONTENT_ENCODING),
        (RELAY_S_CONTENT_LENGTH, ref.S_CONTENT_LENGTH),
        (RELAY_S_TRANSFER_ENCODING, ref.S_TRANSFER_ENCODING),
        (RELAY_S_PER_CALLER, ref.S_PER_CALLER),
    )
    for compiled, pure in pairs:
        if compiled != pure:
            raise ImportError("relay._fast._heads_c: header classes differ from _heads_py")
    for name, kind in ref.REQUEST_NAMES.items():
        if request_class(name) != kind:
            raise ImportError(f"relay._fast._heads_c: {name!r} is classed apart from _heads_py")
    for name, kind in ref.RESPONSE_NAMES.items():
        if response_class(name) != kind:
            raise ImportError(f"relay._fast._heads_c: {name!r} is classed apart from _heads_py")


def request_class(bytes name) -> int:
    """The request header class of *name* (as ``_heads_py.REQUEST_NAMES``)."""
    return relay_request_class(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


def response_class(bytes name) -> int:
    """The response header class of *name* (as ``_heads_py.RESPONSE_NAMES``)."""
    return relay_response_class(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


cdef inline bint _is_pair(object pair):
    return (
        type(pair) is tuple
        and PyTuple_GET_SIZE(pair) == 2
        and type(<object>PyTuple_GET_ITEM(pair, 0)) is bytes
        and type(<object>PyTuple_GET_ITEM(pair, 1)) is bytes
    )


cdef bint _all_pairs(object headers):
    """A list of (bytes, bytes) pairs: what the compiled walks take; anything
    else goes to the pure twin, which gives the reference answer."""
    cdef Py_ssize_t i
    if type(headers) is not list:
        return False
    for i in range(PyList_GET_SIZE(headers)):
        if not _is_pair(<object>PyList_GET_ITEM(headers, i)):
            return False
    return True


cdef inline char* _render(char *out, object name, object value):
    """Write ``name: value\\r\\n`` at *out*; return the end."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t v = PyBytes_GET_SIZE(value)
    memcpy(out, PyBytes_AS_STRING(name), n)
    out += n
    out[0] = b':'
    out[1] = b' '
    out += 2
    memcpy(out, PyBytes_AS_STRING(value), v)
    out += v
    out[0] = b'\r'
    out[1] = b'\n'
    return out + 2


cdef object _NOT_TOKENS = _reference._NOT_TOKENS
cdef bytes _CHUNKED = b"chunked"
cdef bytes _CONTINUE = b"100-continue"
cdef bytes _IDENTITY = _reference._IDENTITY
cdef bytes _KEEP_ALIVE = b"keep-alive"
cdef bytes _CLOSE = b"close"
cdef object _refused = _reference._refused


def request_head(headers):
    """What relay needs from a client request's headers (see ``_heads_py``)."""
    if not _all_pairs(headers):
        return _reference.request_head(headers)
    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef Py_ssize_t i
    cdef object pair, name, value
    cdef int kind
    cdef unsigned char small[64]
    cdef unsigned char *kinds = small
    cdef Py_ssize_t forward_size = 0, credential_size = 0
    cdef object authorization = None, api_key = None, cache_control = None
    cdef object content_length = None, forwarded_for = None, varying = None
    cdef bint chunked = False, host_seen = False, expect_continue = False, named = False
    cdef bytes forward, credentials
    cdef char *out
    cdef char *cred
    if count > 64:
        kinds = <unsigned char*>PyMem_Malloc(count)
        if kinds == NULL:
            raise MemoryError()
    try:
        for i in range(count):
            pair = <object>PyList_GET_ITEM(headers, i)
            name = <object>PyTuple_GET_ITEM(pair, 0)
            value = <object>PyTuple_GET_ITEM(pair, 1)
            kind = relay_request_class(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
            kinds[i] = <unsigned char>kind
            if kind == RELAY_R_FORWARD:
                forward_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
            elif kind == RELAY_R_DROP:
                pass
            elif kind == RELAY_R_AUTHORIZATION:
                credential_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                authorization = value
            elif kind == RELAY_R_X_API_KEY:
                credential_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                api_key = value
            elif kind == RELAY_R_API_KEY:
                credential_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
            elif kind == RELAY_R_CACHE_CONTROL:
                forward_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                cache_control = value.lower()
            elif kind == RELAY_R_VARYING:
                forward_size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                if varying is None:
                    varying = []
                varying.append(name.lower() + b":" + value.strip())
            elif kind == RELAY_R_CONTENT_LENGTH:
                content_length = value
            elif kind == RELAY_R_TRANSFER_ENCODING:
                if value.strip().lower() != _CHUNKED:
                    return _refused(_reference.BAD_TRANSFER_ENCODING)
                chunked = True
            elif kind == RELAY_R_HOST:
                if host_seen:
                    return _refused(_reference.DUPLICATE_HOST)
                host_seen = True
            elif kind == RELAY_R_X_FORWARDED_FOR:
                forwarded_for = value
            elif kind == RELAY_R_CONNECTION:
                if value == _KEEP_ALIVE or value == _CLOSE:
                    pass  # what SDKs send: no header named
                elif {t.strip().lower() for t in value.split(b",")} - _NOT_TOKENS:
                    named = True
            elif kind == RELAY_R_EXPECT:
                if value.lower() != _CONTINUE:
                    return _refused(_reference.BAD_EXPECT)
                expect_continue = True
        if named:
            # Headers named in Connection are hop-by-hop too: rare, and
            # the pure module's code says exactly which ones go.
            return _reference.request_head(headers)
        forward = PyBytes_FromStringAndSize(NULL, forward_size)
        credentials = PyBytes_FromStringAndSize(NULL, credential_size)
        out = PyBytes_AS_STRING(forward)
        cred = PyBytes_AS_STRING(credentials)
        for i in range(count):
            kind = kinds[i]
            pair = <object>PyList_GET_ITEM(headers, i)
            if kind == RELAY_R_FORWARD or kind == RELAY_R_CACHE_CONTROL or kind == RELAY_R_VARYING:
                out = _render(out, <object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
            elif kind == RELAY_R_AUTHORIZATION or kind == RELAY_R_X_API_KEY or kind == RELAY_R_API_KEY:
                cred = _render(cred, <object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
    finally:
        if kinds != small:
            PyMem_Free(kinds)
    return (
        0,
        forward,
        credentials,
        authorization,
        api_key,
        cache_control,
        content_length,
        chunked,
        host_seen,
        forwarded_for,
        varying,
        expect_continue,
    )


def response_head(headers):
    """What relay needs from an upstream response's headers (see ``_heads_py``)."""
    if not _all_pairs(headers):
        return _reference.response_head(headers)
    cdef Py_ssize_t count = PyList_GET_SIZE(headers)
    cdef Py_ssize_t i, kept_count = 0, size = 0
    cdef object pair, name, value
    cdef int kind
    cdef unsigned char small[64]
    cdef unsigned char *kinds = small
    cdef object content_type = None, coding = None, content_length = None
    cdef bint chunked = False
    cdef bint per_caller = False
    cdef tuple kept
    cdef bytes rendered
    cdef char *out
    if count > 64:
        kinds = <unsigned char*>PyMem_Malloc(count)
        if kinds == NULL:
            raise MemoryError()
    try:
        for i in range(count):
            pair = <object>PyList_GET_ITEM(headers, i)
            name = <object>PyTuple_GET_ITEM(pair, 0)
            value = <object>PyTuple_GET_ITEM(pair, 1)
            kind = relay_response_class(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
            kinds[i] = <unsigned char>kind
            if kind == RELAY_S_RELAY:
                kept_count += 1
                size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
            elif kind == RELAY_S_CONTENT_TYPE:
                kept_count += 1
                size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                content_type = value.lower()
            elif kind == RELAY_S_PER_CALLER:
                kept_count += 1
                size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
                per_caller = True
            elif kind == RELAY_S_CONNECTION:
                if value != _KEEP_ALIVE:
                    # Tokens that may name headers (even "close" could):
                    # the pure module's code.
                    return _reference.response_head(headers)
            elif kind == RELAY_S_CONTENT_ENCODING:
                value = value.strip().lower()
                if value and value != _IDENTITY:
                    coding = value if coding is None else coding + b", " + value
            elif kind == RELAY_S_CONTENT_LENGTH:
                content_length = value
            elif kind == RELAY_S_TRANSFER_ENCODING:
                chunked = True
        kept = PyTuple_New(kept_count)
        rendered = PyBytes_FromStringAndSize(NULL, size)
        out = PyBytes_AS_STRING(rendered)
        kept_count = 0
        for i in range(count):
            kind = kinds[i]
            if kind != RELAY_S_RELAY and kind != RELAY_S_CONTENT_TYPE and kind != RELAY_S_PER_CALLER:
                continue
            pair = <object>PyList_GET_ITEM(headers, i)
            Py_INCREF(pair)
            PyTuple_SET_ITEM(kept, kept_count, pair)
            kept_count += 1
            out = _render(out, <object>PyTuple_GET_ITEM(pair, 0), <object>PyTuple_GET_ITEM(pair, 1))
    finally:
        if kinds != small:
            PyMem_Free(kinds)
    return kept, rendered, content_type, coding, content_length, chunked, per_caller


_check_classes()


def request_line(bytes data not None, Py_ssize_t start):
    """The common request line's end and minor version (see ``_heads_py``),
    found with memchr over the buffer instead of five method calls."""
    cdef const char *p = PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t end, last, first
    cdef const char *hit
    if start < 0:
        return _reference.request_line(data, start)  # slice semantics: rare, the pure code
    # The CRLF: the first CR followed by LF.
    end = start
    while True:
        if end >= n:
            return -1, -1
        hit = <const char*>memchr(p + end, 13, n - end)
        if hit == NULL:
            return -1, -1
        end = hit - p
        if end + 1 < n and p[end + 1] == 10:
            break
        end += 1
    # The last space is right before the 8-byte version (which holds none),
    # the first one after a method of at least one byte, a target of at
    # least one between them, and no other space.
    last = end - 9
    if last < start + 3 or p[last] != 32 or memcmp(p + last + 1, b"HTTP/1.", 7) != 0:
        return -1, -1
    hit = <const char*>memchr(p + start, 32, last - start)
    if hit == NULL:
        return -1, -1
    first = hit - p
    if first == start or last <= first + 1 or memchr(p + first + 1, 32, last - first - 1) != NULL:
        return -1, -1
    if p[end - 1] == 49:  # "1"
        return end, 1
    if p[end - 1] == 48:  # "0"
        return end, 0
    return -1, -1

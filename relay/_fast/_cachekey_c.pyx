# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Cache keys and credential hashes, compiled twin of ``_cachekey_py``.

Same results, byte for byte, as the pure module (which defines them and holds
the constants). What it gains: the body is canonicalised by one C walk over
its bytes, with no Python object per JSON value, into a buffer that already
holds the key's header, and that buffer is hashed where it lies by relay's
own C SHA-256 (``_sha256.pxd``: SHA-NI where the processor has it).

The walk follows Python's ``json`` decoder exactly (grammar, escapes,
surrogate pairing, duplicate keys keep the last value) and writes what
``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
writes, encoded as UTF-8 with lone surrogates passed through (WTF-8).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.conversion cimport Py_DTSF_ADD_DOT_0, PyOS_double_to_string, PyOS_string_to_double
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport isinf
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport qsort
from libc.string cimport memcmp, memcpy, strlen

from ._jsonlex cimport hex4, is_digit, is_ws, number_end, plain_run_end
from ._sha256 cimport (
    relay_sha256_ctx,
    relay_sha256_final,
    relay_sha256_init,
    relay_sha256_update,
    relay_sha_ni,
)

from . import _cachekey_py as _reference

# The pure module is the definition: its constants are read once here.
cdef Py_ssize_t MAX_DEPTH = _reference.MAX_DEPTH
cdef Py_ssize_t MAX_INT_LITERAL = _reference.MAX_INT_LITERAL
cdef bytes KEY_PREFIX = _reference.KEY_PREFIX
cdef bytes CREDENTIAL_SALT = _reference.CREDENTIAL_SALT
cdef Py_ssize_t KEY_HEX_LENGTH = _reference.KEY_HEX_LENGTH
cdef Py_ssize_t CREDENTIAL_HEX_LENGTH = _reference.CREDENTIAL_HEX_LENGTH
cdef unsigned char TAG_JSON = ord(_reference.TAG_JSON)
cdef unsigned char TAG_RAW = ord(_reference.TAG_RAW)
cdef unsigned char TAG_JSON_VARYING = ord(_reference.TAG_JSON_VARYING)
cdef unsigned char TAG_RAW_VARYING = ord(_reference.TAG_RAW_VARYING)

# Result of a parse step; errors (MemoryError) propagate as exceptions.
cdef enum:
    OK = 0
    INVALID = 1


# Sizes of the storage a walk starts with, inside its struct on the C stack:
# a chat-sized body is canonicalised without a single heap allocation.
cdef enum:
    OUT_INITIAL = 1024
    KEYS_INITIAL = 256
    TMP_INITIAL = 512
    MEMBERS_INITIAL = 16


cdef struct Buf:
    unsigned char *data
    Py_ssize_t len
    Py_ssize_t cap
    unsigned char *initial  # the struct's own storage: never freed


cdef struct Member:
    # One object member while its object is being canonicalised.
    const unsigned char *key  # decoded key (WTF-8), set just before sorting
    Py_ssize_t key_off  # in Walk.keys
    Py_ssize_t key_len
    Py_ssize_t off  # in Walk.out: escaped key, ':' and value
    Py_ssize_t len


cdef struct Walk:
    const unsigned char *s
    Py_ssize_t n
    Py_ssize_t i
    Buf out  # canonical text
    Buf keys  # decoded keys of the objects open on the current path
    Buf tmp  # scratch for reordering members
    Member *members  # members of the objects open on the current path
    Py_ssize_t n_members
    Py_ssize_t cap_members
    unsigned char out_initial[OUT_INITIAL]
    unsigned char keys_initial[KEYS_INITIAL]
    unsigned char tmp_initial[TMP_INITIAL]
    Member members_initial[MEMBERS_INITIAL]


cdef int buf_grow(Buf *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap * 2 if b.cap else 256
    cdef unsigned char *data
    while cap < b.len + extra:
        cap *= 2
    if b.data == b.initial:
        data = <unsigned char *>PyMem_Malloc(<size_t>cap)
        if data != NULL and b.len:
            memcpy(data, b.data, <size_t>b.len)
    else:
        data = <unsigned char *>PyMem_Realloc(b.data, <size_t>cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline void buf_init(Buf *b, unsigned char *initial, Py_ssize_t size) noexcept:
    b.data = initial
    b.initial = initial
    b.len = 0
    b.cap = size


cdef inline void buf_free(Buf *b) noexcept:
    if b.data != b.initial:
        PyMem_Free(b.data)


cdef inline int buf_reserve(Buf *b, Py_ssize_t extra) except -1:
    if b.len + extra > b.cap:
        return buf_grow(b, extra)
    return 0


cdef inline int buf_put(Buf *b, unsigned char c) except -1:
    if b.len + 1 > b.cap:
        buf_grow(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0


cdef inline int buf_write(Buf *b, const unsigned char *src, Py_ssize_t length) except -1:
    if b.len + length > b.cap:
        buf_grow(b, length)
    memcpy(b.data + b.len, src, <size_t>length)
    b.len += length
    return 0


cdef inline void skip_ws(Walk *w) noexcept nogil:
    while w.i < w.n and is_ws(w.s[w.i]):
        w.i += 1


cdef int put_code_point(Walk *w, Buf *decoded, long cp) except -1:
    """Writes a code point from a \\u escape, canonically (as json.dumps would)."""
    cdef unsigned char enc[4]
    cdef Py_ssize_t length
    if cp < 0x80:
        if cp == 0x22 or cp == 0x5C:  # '"' and '\\' keep their short escapes
            buf_put(&w.out, 0x5C)
            buf_put(&w.out, <unsigned char>cp)
        elif cp >= 0x20:
            buf_put(&w.out, <unsigned char>cp)
        else:
            escape_control(w, <unsigned char>cp)
        if decoded != NULL:
            buf_put(decoded, <unsigned char>cp)
        return 0
    # UTF-8; a lone surrogate is written as its 3-byte form (surrogatepass).
    if cp < 0x800:
        enc[0] = <unsigned char>(0xC0 | (cp >> 6))
        enc[1] = <unsigned char>(0x80 | (cp & 0x3F))
        length = 2
    elif cp < 0x10000:
        enc[0] = <unsigned char>(0xE0 | (cp >> 12))
        enc[1] = <unsigned char>(0x80 | ((cp >> 6) & 0x3F))
        enc[2] = <unsigned char>(0x80 | (cp & 0x3F))
        length = 3
    else:
        enc[0] = <unsigned char>(0xF0 | (cp >> 18))
        enc[1] = <unsigned char>(0x80 | ((cp >> 12) & 0x3F))
        enc[2] = <unsigned char>(0x80 | ((cp >> 6) & 0x3F))
        enc[3] = <unsigned char>(0x80 | (cp & 0x3F))
        length = 4
    buf_write(&w.out, enc, length)
    if decoded != NULL:
        buf_write(decoded, enc, length)
    return 0


cdef int escape_control(Walk *w, unsigned char c) except -1:
    # json.dumps: short escapes where JSON has them, else \u00XX lowercase.
    cdef const char *digits = b"0123456789abcdef"
    cdef unsigned char short_form = 0
    if c == 0x08:
        short_form = 98  # b
    elif c == 0x0C:
        short_form = 102  # f
    elif c == 0x0A:
        short_form = 110  # n
    elif c == 0x0D:
        short_form = 114  # r
    elif c == 0x09:
        short_form = 116  # t
    buf_reserve(&w.out, 6)
    w.out.data[w.out.len] = 0x5C
    if short_form:
        w.out.data[w.out.len + 1] = short_form
        w.out.len += 2
    else:
        w.out.data[w.out.len + 1] = 117  # u
        w.out.data[w.out.len + 2] = 48
        w.out.data[w.out.len + 3] = 48
        w.out.data[w.out.len + 4] = digits[c >> 4]
        w.out.data[w.out.len + 5] = digits[c & 15]
        w.out.len += 6
    return 0


cdef int walk_string(Walk *w, Buf *decoded) except -1:
    """A string at w.i (on its opening quote); decoded bytes go to ``decoded``."""
    cdef const unsigned char *s = w.s
    cdef Py_ssize_t n = w.n
    cdef Py_ssize_t i = w.i + 1
    cdef Py_ssize_t run
    cdef unsigned char c, e
    cdef long cp, low
    buf_put(&w.out, 34)
    while True:
        # A run of bytes written unchanged.
        run = i
        i = plain_run_end(s, n, i)
        if i < 0:
            return INVALID
        if i > run:
            buf_write(&w.out, s + run, i - run)
            if decoded != NULL:
                buf_write(decoded, s + run, i - run)
        if i >= n:
            return INVALID  # unterminated
        c = s[i]
        if c == 34:
            buf_put(&w.out, 34)
            w.i = i + 1
            return OK
        if c < 0x20:
            return INVALID  # raw control character (strict decoder)
        # Backslash escape.
        if i + 1 >= n:
            return INVALID
        e = s[i + 1]
        i += 2
        if e == 117:  # u
            if i + 4 > n:
                return INVALID
            cp = hex4(s + i)
            if cp < 0:
                return INVALID
            i += 4
            # A high surrogate escape directly followed by a low surrogate
            # escape is one code point; anything else leaves it lone.
            if 0xD800 <= cp <= 0xDBFF and i + 6 <= n and s[i] == 92 and s[i + 1] == 117:
                low = hex4(s + i + 2)
                if low < 0:
                    return INVALID
                if 0xDC00 <= low <= 0xDFFF:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00)
                    i += 6
            put_code_point(w, decoded, cp)
        elif e == 34 or e == 92 or e == 47:  # " \ /
            put_code_point(w, decoded, e)
        elif e == 98:
            put_code_point(w, decoded, 0x08)
        elif e == 102:
            put_code_point(w, decoded, 0x0C)
        elif e == 110:
            put_code_point(w, decoded, 0x0A)
        elif e == 114:
            put_code_point(w, decoded, 0x0D)
        elif e == 116:
            put_code_point(w, decoded, 0x09)
        else:
            return INVALID


cdef int walk_number(Walk *w) except -1:
    cdef const unsigned char *s = w.s
    cdef Py_ssize_t start = w.i
    cdef Py_ssize_t length
    cdef bint is_float
    cdef Py_ssize_t end = number_end(s, w.n, start, &is_float)
    if end < 0:
        return INVALID
    w.i = end
    length = end - start
    if not is_float:
        if length > MAX_INT_LITERAL:
            return INVALID
        if length == 2 and s[start] == 45 and s[start + 1] == 48:
            buf_put(&w.out, 48)  # -0 is 0
        else:
            buf_write(&w.out, s + start, length)
        return OK
    return put_float(w, s + start, length)


cdef int put_float(Walk *w, const unsigned char *literal, Py_ssize_t length) except -1:
    # float(literal) then repr(), through the same two CPython routines.
    cdef char small[64]
    cdef char *text = small
    cdef char *formatted
    cdef double value
    if length >= 64:
        text = <char *>PyMem_Malloc(<size_t>length + 1)
        if text == NULL:
            raise MemoryError()
    try:
        memcpy(text, literal, <size_t>length)
        text[length] = 0
        value = PyOS_string_to_double(text, NULL, NULL)  # overflow gives +-inf
    finally:
        if text != small:
            PyMem_Free(text)
    if isinf(value):
        if value > 0:
            buf_write(&w.out, b"Infinity", 8)
        else:
            buf_write(&w.out, b"-Infinity", 9)
        return OK
    formatted = PyOS_double_to_string(value, b'r', 0, Py_DTSF_ADD_DOT_0, NULL)
    try:
        buf_write(&w.out, <const unsigned char *>formatted, <Py_ssize_t>strlen(formatted))
    finally:
        PyMem_Free(formatted)
    return OK


cdef int walk_literal(Walk *w, const char *word, Py_ssize_t length) except -1:
    if w.n - w.i < length or memcmp(w.s + w.i, word, <size_t>length) != 0:
        return INVALID
    buf_write(&w.out, <const unsigned char *>word, length)
    w.i += length
    return OK


cdef int walk_value(Walk *w, Py_ssize_t depth) except -1:
    if w.i >= w.n:
        return INVALID
    cdef unsigned char c = w.s[w.i]
    if c == 34:
        return walk_string(w, NULL)
    if c == 123:
        return walk_object(w, depth + 1)
    if c == 91:
        return walk_array(w, depth + 1)
    if c == 45 or is_digit(c):
        return walk_number(w)
    if c == 116:
        return walk_literal(w, b"true", 4)
    if c == 102:
        return walk_literal(w, b"false", 5)
    if c == 110:
        return walk_literal(w, b"null", 4)
    return INVALID  # NaN, Infinity and anything else


cdef int walk_array(Walk *w, Py_ssize_t depth) except -1:
    if depth > MAX_DEPTH:
        return INVALID
    buf_put(&w.out, 91)
    w.i += 1
    skip_ws(w)
    if w.i < w.n and w.s[w.i] == 93:
        w.i += 1
        buf_put(&w.out, 93)
        return OK
    while True:
        if walk_value(w, depth) != OK:
            return INVALID
        skip_ws(w)
        if w.i >= w.n:
            return INVALID
        if w.s[w.i] == 44:
            w.i += 1
            buf_put(&w.out, 44)
            skip_ws(w)
        elif w.s[w.i] == 93:
            w.i += 1
            buf_put(&w.out, 93)
            return OK
        else:
            return INVALID


cdef int compare_members(const void *a, const void *b) noexcept nogil:
    # Code point order is the byte order of (WTF-)UTF-8; equal keys keep
    # their order of appearance so the last one can win.
    cdef const Member *x = <const Member *>a
    cdef const Member *y = <const Member *>b
    cdef Py_ssize_t common = x.key_len if x.key_len < y.key_len else y.key_len
    cdef int r = memcmp(x.key, y.key, <size_t>common)
    if r != 0:
        return r
    if x.key_len != y.key_len:
        return -1 if x.key_len < y.key_len else 1
    return -1 if x.off < y.off else (1 if x.off > y.off else 0)


cdef int push_member(Walk *w, Py_ssize_t key_off, Py_ssize_t key_len,
                     Py_ssize_t off, Py_ssize_t length) except -1:
    cdef Py_ssize_t cap
    cdef Member *members
    if w.n_members == w.cap_members:
        cap = w.cap_members * 2
        if w.members == w.members_initial:
            members = <Member *>PyMem_Malloc(<size_t>cap * sizeof(Member))
            if members != NULL:
                memcpy(members, w.members, <size_t>w.n_members * sizeof(Member))
        else:
            members = <Member *>PyMem_Realloc(w.members, <size_t>cap * sizeof(Member))
        if members == NULL:
            raise MemoryError()
        w.members = members
        w.cap_members = cap
    cdef Member *m = &w.members[w.n_members]
    m.key_off = key_off
    m.key_len = key_len
    m.off = off
    m.len = length
    w.n_members += 1
    return 0


cdef void sort_members(Member *ms, Py_ssize_t count) noexcept:
    # Objects in requests are small: insertion sort, no allocation; qsort
    # (glibc's allocates a merge buffer) only for big ones.
    cdef Py_ssize_t k, j
    cdef Member item
    if count > 24:
        qsort(ms, <size_t>count, sizeof(Member), compare_members)
        return
    for k in range(1, count):
        item = ms[k]
        j = k
        while j > 0 and compare_members(&ms[j - 1], &item) > 0:
            ms[j] = ms[j - 1]
            j -= 1
        ms[j] = item


cdef int walk_object(Walk *w, Py_ssize_t depth) except -1:
    if depth > MAX_DEPTH:
        return INVALID
    cdef Py_ssize_t body_start, first, keys_base, key_off, off
    cdef Py_ssize_t k, count
    cdef bint ordered
    cdef Member *ms
    buf_put(&w.out, 123)
    body_start = w.out.len
    w.i += 1
    skip_ws(w)
    if w.i < w.n and w.s[w.i] == 125:
        w.i += 1
        buf_put(&w.out, 125)
        return OK
    first = w.n_members
    keys_base = w.keys.len
    while True:
        if w.i >= w.n or w.s[w.i] != 34:
            return INVALID
        off = w.out.len
        key_off = w.keys.len
        if walk_string(w, &w.keys) != OK:
            return INVALID
        skip_ws(w)
        if w.i >= w.n or w.s[w.i] != 58:
            return INVALID
        w.i += 1
        buf_put(&w.out, 58)
        skip_ws(w)
        if walk_value(w, depth) != OK:
            return INVALID
        push_member(w, key_off, w.keys.len - key_off, off, w.out.len - off)
        skip_ws(w)
        if w.i >= w.n:
            return INVALID
        if w.s[w.i] == 44:
            w.i += 1
            buf_put(&w.out, 44)
            skip_ws(w)
        elif w.s[w.i] == 125:
            w.i += 1
            break
        else:
            return INVALID

    # Members were written in arrival order, comma separated; reorder them
    # only when they are not already strictly sorted.
    ms = w.members + first
    count = w.n_members - first
    for k in range(count):
        ms[k].key = w.keys.data + ms[k].key_off
    ordered = True
    for k in range(1, count):
        if compare_key(&ms[k - 1], &ms[k]) >= 0:
            ordered = False
            break
    if not ordered:
        sort_members(ms, count)
        w.tmp.len = 0
        buf_write(&w.tmp, w.out.data + body_start, w.out.len - body_start)
        w.out.len = body_start
        for k in range(count):
            if k + 1 < count and compare_key(&ms[k], &ms[k + 1]) == 0:
                continue  # a later duplicate wins
            if w.out.len != body_start:
                buf_put(&w.out, 44)
            buf_write(&w.out, w.tmp.data + (ms[k].off - body_start), ms[k].len)
    buf_put(&w.out, 125)
    w.n_members = first
    w.keys.len = keys_base
    return OK


cdef inline int compare_key(const Member *x, const Member *y) noexcept nogil:
    cdef Py_ssize_t common = x.key_len if x.key_len < y.key_len else y.key_len
    cdef int r = memcmp(x.key, y.key, <size_t>common)
    if r != 0:
        return r
    return (x.key_len > y.key_len) - (x.key_len < y.key_len)


cdef int canonicalise(Walk *w) except -1:
    """OK with the canonical text in w.out, or INVALID."""
    skip_ws(w)
    if walk_value(w, 0) != OK:
        return INVALID
    skip_ws(w)
    return OK if w.i == w.n else INVALID


cdef void walk_free(Walk *w) noexcept:
    buf_free(&w.out)
    buf_free(&w.keys)
    buf_free(&w.tmp)
    if w.members != w.members_initial:
        PyMem_Free(w.members)


cdef inline void walk_init(Walk *w, bytes body) noexcept:
    w.s = <const unsigned char *>PyBytes_AS_STRING(body)
    w.n = PyBytes_GET_SIZE(body)
    w.i = 0
    buf_init(&w.out, w.out_initial, OUT_INITIAL)
    buf_init(&w.keys, w.keys_initial, KEYS_INITIAL)
    buf_init(&w.tmp, w.tmp_initial, TMP_INITIAL)
    w.members = w.members_initial
    w.n_members = 0
    w.cap_members = MEMBERS_INITIAL


cdef inline void put_le64(unsigned char *p, uint64_t v) noexcept nogil:
    cdef int k
    for k in range(8):
        p[k] = <unsigned char>(v >> (8 * k))


cdef bytes hex_digest(
    const unsigned char *first, Py_ssize_t first_len,
    const unsigned char *second, Py_ssize_t second_len, Py_ssize_t length,
):
    """The first ``length`` lowercase hex digits of the SHA-256 of first + second."""
    cdef relay_sha256_ctx ctx
    cdef unsigned char digest[32]
    cdef const char *digits = b"0123456789abcdef"
    cdef bytes result = PyBytes_FromStringAndSize(NULL, length)
    cdef char *out = PyBytes_AS_STRING(result)
    cdef Py_ssize_t k
    relay_sha256_init(&ctx, 0)
    relay_sha256_update(&ctx, first, <size_t>first_len)
    if second_len:
        relay_sha256_update(&ctx, second, <size_t>second_len)
    relay_sha256_final(&ctx, digest)
    for k in range(length):
        out[k] = digits[(digest[k >> 1] >> 4) if (k & 1) == 0 else (digest[k >> 1] & 15)]
    return result


def sha256_digest(bytes data not None, bint portable=False):
    """The SHA-256 digest of ``data`` as the keys compute it; ``portable``
    takes the C compression even where SHA-NI is there (for tests, which
    compare both paths with hashlib)."""
    cdef relay_sha256_ctx ctx
    cdef unsigned char digest[32]
    relay_sha256_init(&ctx, portable)
    relay_sha256_update(&ctx, <const uint8_t *>PyBytes_AS_STRING(data), <size_t>PyBytes_GET_SIZE(data))
    relay_sha256_final(&ctx, digest)
    return PyBytes_FromStringAndSize(<char *>digest, 32)


def sha_ni() -> bool:
    """Whether this processor's SHA extensions hash the keys."""
    return relay_sha_ni() == 1


def canonical_json(bytes body not None):
    """The canonical encoding of ``body``, or None when it is not canonical JSON."""
    cdef Walk w
    walk_init(&w, body)
    try:
        buf_reserve(&w.out, w.n + 64)
        if canonicalise(&w) != OK:
            return None
        return PyBytes_FromStringAndSize(<char *>w.out.data, w.out.len)
    finally:
        walk_free(&w)


def cache_key(bytes method not None, bytes target not None, bytes body not None,
              bytes scope not None, bytes varying not None = b""):
    """32 lowercase hex bytes identifying (method, target, body, scope, varying)."""
    cdef Walk w
    cdef Py_ssize_t prefix_len = PyBytes_GET_SIZE(KEY_PREFIX)
    cdef Py_ssize_t method_len = PyBytes_GET_SIZE(method)
    cdef Py_ssize_t target_len = PyBytes_GET_SIZE(target)
    cdef Py_ssize_t scope_len = PyBytes_GET_SIZE(scope)
    cdef Py_ssize_t varying_len = PyBytes_GET_SIZE(varying)
    cdef Py_ssize_t tag_at = prefix_len + 24 + method_len + target_len + scope_len
    cdef Py_ssize_t header_len = tag_at + 1 + (8 + varying_len if varying_len else 0)
    cdef unsigned char *h
    walk_init(&w, body)
    try:
        # The header goes first in the output buffer, so a JSON body is
        # hashed in one call over header + canonical text.
        buf_reserve(&w.out, header_len + w.n + 64)
        h = w.out.data
        memcpy(h, PyBytes_AS_STRING(KEY_PREFIX), <size_t>prefix_len)
        h += prefix_len
        put_le64(h, <uint64_t>method_len)
        put_le64(h + 8, <uint64_t>target_len)
        put_le64(h + 16, <uint64_t>scope_len)
        h += 24
        memcpy(h, PyBytes_AS_STRING(method), <size_t>method_len)
        h += method_len
        memcpy(h, PyBytes_AS_STRING(target), <size_t>target_len)
        h += target_len
        memcpy(h, PyBytes_AS_STRING(scope), <size_t>scope_len)
        h += scope_len + 1  # the tag byte, set below
        if varying_len:
            put_le64(h, <uint64_t>varying_len)
            memcpy(h + 8, PyBytes_AS_STRING(varying), <size_t>varying_len)
        w.out.len = header_len
        if canonicalise(&w) == OK:
            w.out.data[tag_at] = TAG_JSON_VARYING if varying_len else TAG_JSON
            return hex_digest(w.out.data, w.out.len, NULL, 0, KEY_HEX_LENGTH)
        w.out.data[tag_at] = TAG_RAW_VARYING if varying_len else TAG_RAW
        return hex_digest(
            w.out.data, header_len,
            <const unsigned char *>PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), KEY_HEX_LENGTH,
        )
    finally:
        walk_free(&w)


def credential_hash(bytes value not None):
    """16 lowercase hex bytes naming a credential without revealing it."""
    return hex_digest(
        <const unsigned char *>PyBytes_AS_STRING(CREDENTIAL_SALT), PyBytes_GET_SIZE(CREDENTIAL_SALT),
        <const unsigned char *>PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value),
        CREDENTIAL_HEX_LENGTH,
    )

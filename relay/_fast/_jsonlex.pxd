# The lexical core of JSON that the compiled cache key (_cachekey_c) and the
# facts scan (_jsonscan_c) both walk bodies with: byte classes, strict UTF-8,
# the runs of string bytes that need no change, \uXXXX digits and the number
# grammar of json's NUMBER_RE. Inline C functions over (bytes, length,
# index): each module keeps only what it does with what they find.

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Nonzero when one of the 8 bytes at p ends a plain string run:
       < 0x20, '"', '\\' or >= 0x80 (the SWAR "has zero byte" test; as a
       yes/no answer it is exact). */
    static inline int relay_json_stop8(const unsigned char *p) {
        const uint64_t ones = 0x0101010101010101ULL;
        const uint64_t high = 0x8080808080808080ULL;
        uint64_t v, quote, backslash;
        memcpy(&v, p, 8);
        quote = v ^ (ones * 0x22);
        backslash = v ^ (ones * 0x5C);
        return (((v - ones * 0x20) & ~v) | ((quote - ones) & ~quote) |
                ((backslash - ones) & ~backslash) | v) & high ? 1 : 0;
    }
    /* Nonzero when the 8 bytes at p are all ASCII digits. */
    static inline int relay_json_digits8(const unsigned char *p) {
        const uint64_t nibbles = 0xF0F0F0F0F0F0F0F0ULL;
        const uint64_t threes = 0x3030303030303030ULL;
        uint64_t v;
        memcpy(&v, p, 8);
        return (v & nibbles) == threes && ((v + 0x0606060606060606ULL) & nibbles) == threes;
    }
    """
    int relay_json_stop8(const unsigned char *p) noexcept nogil
    int relay_json_digits8(const unsigned char *p) noexcept nogil


cdef inline bint is_ws(unsigned char c) noexcept nogil:
    return c == 32 or c == 10 or c == 13 or c == 9


cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef inline int hex_value(unsigned char c) noexcept nogil:
    if 48 <= c <= 57:
        return c - 48
    if 97 <= c <= 102:
        return c - 87
    if 65 <= c <= 70:
        return c - 55
    return -1


cdef inline long hex4(const unsigned char *p) noexcept nogil:
    # The value of the four hex digits at p, or -1.
    cdef long value = 0
    cdef int k, d
    for k in range(4):
        d = hex_value(p[k])
        if d < 0:
            return -1
        value = (value << 4) | d
    return value


cdef inline Py_ssize_t utf8_length(const unsigned char *p, Py_ssize_t avail) noexcept nogil:
    # Length of the strict UTF-8 sequence at p (lead byte >= 0x80), or 0 if
    # invalid. Strict as Python's codec without surrogatepass: no overlong
    # forms, nothing above U+10FFFF, no encoded surrogates (json.loads lets
    # those through: each module hands such a body to its reference).
    cdef unsigned char c0 = p[0]
    cdef unsigned char lo = 0x80
    cdef unsigned char hi = 0xBF
    cdef Py_ssize_t length
    if c0 < 0xC2:
        return 0
    if c0 < 0xE0:
        length = 2
    elif c0 < 0xF0:
        length = 3
        if c0 == 0xE0:
            lo = 0xA0
        elif c0 == 0xED:
            hi = 0x9F
    elif c0 < 0xF5:
        length = 4
        if c0 == 0xF0:
            lo = 0x90
        elif c0 == 0xF4:
            hi = 0x8F
    else:
        return 0
    if avail < length:
        return 0
    if p[1] < lo or p[1] > hi:
        return 0
    if length > 2 and (p[2] < 0x80 or p[2] > 0xBF):
        return 0
    if length > 3 and (p[3] < 0x80 or p[3] > 0xBF):
        return 0
    return length


cdef inline Py_ssize_t plain_run_end(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    # From s[i] inside a string: the index of the first byte that is not
    # plain string content ('"', a backslash, a control character), n at
    # the end of the text, -1 at invalid UTF-8.
    cdef Py_ssize_t seq, limit
    cdef unsigned char c
    while True:
        while i + 8 <= n and not relay_json_stop8(s + i):
            i += 8  # plain ASCII, 8 bytes at a time
        if i >= n:
            return n
        # A byte that ends the plain run lies in these 8 (or the text ends
        # first): walked to byte by byte, the 8 not tested again per byte
        # (most keys and short values end within the first 8).
        limit = i + 8 if i + 8 <= n else n
        while i < limit:
            c = s[i]
            if c >= 0x80:
                break
            if c < 0x20 or c == 34 or c == 92:
                return i
            i += 1
        if i < limit:  # a multi-byte UTF-8 sequence starts here
            seq = utf8_length(s + i, n - i)
            if seq == 0:
                return -1
            i += seq


cdef inline Py_ssize_t skip_digits(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    while i + 8 <= n and relay_json_digits8(s + i):
        i += 8  # e.g. the fractions of an embedding, 8 digits at a time
    while i < n and is_digit(s[i]):
        i += 1
    return i


cdef inline Py_ssize_t number_end(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, bint *is_float
) noexcept nogil:
    # The number at s[i] (i < n): index past it, or -1; is_float is set
    # when it has a fraction or an exponent. The grammar of json's
    # NUMBER_RE; a "." or an exponent mark without digits after it is -1
    # (no context accepts it). What may follow a number ("01") is the
    # caller's to check. "-Infinity" is -1 too: the references decide it.
    cdef Py_ssize_t j
    is_float[0] = False
    if s[i] == 45:  # -
        i += 1
        if i >= n:
            return -1
    if s[i] == 48:  # a leading 0 stands alone
        i += 1
    elif is_digit(s[i]):
        i = skip_digits(s, n, i + 1)
    else:
        return -1
    if i < n and s[i] == 46:  # .
        if i + 1 < n and is_digit(s[i + 1]):
            i = skip_digits(s, n, i + 2)
            is_float[0] = True
        else:
            return -1
    if i < n and (s[i] == 101 or s[i] == 69):  # e E
        j = i + 1
        if j < n and (s[j] == 43 or s[j] == 45):
            j += 1
        if j < n and is_digit(s[j]):
            i = skip_digits(s, n, j + 1)
            is_float[0] = True
        else:
            return -1
    return i

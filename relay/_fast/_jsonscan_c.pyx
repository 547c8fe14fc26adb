# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The few JSON facts relay needs from a body, compiled twin of ``_jsonscan_py``.

Same results as the pure module, which defines them (``json.loads`` and a
dictionary lookup). What it gains: one C walk over the body's bytes checks
the whole text against the grammar ``json.loads`` accepts (strict UTF-8,
strict strings, RFC 8259 numbers) and notes where the top-level members
relay reads begin and end; no Python object is made for anything else.
Only the facts are decoded, from their own bytes: a model name, an integer,
the ``usage`` object of a response.

Whatever the walk does not settle alone it hands to the pure twin, so the
answer is always the reference's: ``NaN``/``Infinity`` constants, a
byte-order mark or UTF-16/32 text, UTF-8 encoded surrogates (which
``json.loads`` lets through), nesting deeper than ``MAX_DEPTH``, integer
literals longer than ``MAX_INT_LITERAL`` digits, and every invalid body
(which is then decided, slowly, to have no facts).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_SetItem
from cpython.list cimport PyList_Append
from cpython.long cimport PyLong_FromLongLong
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memcmp, memset

from ._jsonlex cimport hex4, is_digit, is_ws, number_end, plain_run_end

import json

from . import _jsonscan_py as _reference

# The pure module is the definition: its types and constants are read once.
cdef object RequestFacts = _reference.RequestFacts
cdef object ResponseUsage = _reference.ResponseUsage
cdef object ResponseCounts = _reference.ResponseCounts
cdef object NOT_AN_OBJECT = _reference.NOT_AN_OBJECT
cdef object STREAM_OPTIONS_ABSENT = _reference.STREAM_OPTIONS_ABSENT
cdef object STREAM_OPTIONS_INCLUDE_USAGE = _reference.STREAM_OPTIONS_INCLUDE_USAGE
cdef object STREAM_OPTIONS_WITHOUT_USAGE = _reference.STREAM_OPTIONS_WITHOUT_USAGE
cdef object STREAM_OPTIONS_NOT_OBJECT = _reference.STREAM_OPTIONS_NOT_OBJECT
cdef object reference_request_facts = _reference.request_facts
cdef object reference_response_usage = _reference.response_usage
cdef object reference_response_counts = _reference.response_counts
cdef object loads = json.loads
# A NamedTuple made the way its own __new__ makes it, minus a Python call.
cdef object tuple_new = tuple.__new__


cdef enum:
    # Deeper nesting is left to the reference (whose decoder recurses).
    MAX_DEPTH = 128
    # Longer integer literals are left to the reference: how many digits
    # int() accepts is a process-wide setting.
    MAX_INT_LITERAL = 600
    # No more than 18 digits always fit a signed 64-bit integer.
    C_INT_DIGITS = 18

# Outcome of a walk.
cdef enum:
    SCANNED = 0  # facts found
    NOT_OBJECT = 1  # the body certainly does not decode to an object
    FALL_BACK = 2  # the reference decides

# JSON type of a member's value (V_ABSENT: no such member).
cdef enum:
    V_ABSENT = 0
    V_STRING
    V_INT
    V_FLOAT
    V_TRUE
    V_FALSE
    V_NULL
    V_OBJECT
    V_ARRAY

# The members relay reads, by the object they are members of (the G_*
# groups): the top level; "stream_options"; a response's "usage"; its
# "prompt_tokens_details".
cdef enum:
    M_OTHER = -1
    M_STREAM = 0
    M_MODEL
    M_MAX_TOKENS
    M_MAX_COMPLETION_TOKENS
    M_MAX_OUTPUT_TOKENS
    M_MESSAGES
    M_STREAM_OPTIONS
    M_USAGE
    M_INCLUDE_USAGE
    M_PROMPT_TOKENS
    M_COMPLETION_TOKENS
    M_PROMPT_TOKENS_DETAILS
    M_CACHED_TOKENS
    M_COUNT

cdef enum:
    G_TOP = 0
    G_STREAM_OPTIONS
    G_USAGE
    G_DETAILS


cdef struct Value:
    Py_ssize_t start  # first byte
    Py_ssize_t end  # just past the last byte
    int kind  # V_*
    bint escaped  # a string with a backslash escape


cdef struct Found:
    Value member[M_COUNT]  # the last occurrence wins, as in json.loads
    Py_ssize_t open_brace


cdef inline Py_ssize_t skip_ws(const unsigned char *s, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    while i < n and is_ws(s[i]):
        i += 1
    return i


cdef Py_ssize_t skip_string(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, bint *escaped
) noexcept nogil:
    """The string whose opening quote is s[i]: index past its closing quote, or -1."""
    cdef unsigned char e
    i += 1
    while True:
        i = plain_run_end(s, n, i)
        if i < 0 or i >= n:
            return -1  # invalid UTF-8, or unterminated
        if s[i] == 34:  # "
            return i + 1
        if s[i] != 92:
            return -1  # a raw control character (the decoder is strict)
        if i + 1 >= n:
            return -1
        e = s[i + 1]
        if e == 117:  # \uXXXX: any code unit, lone surrogates included
            if i + 6 > n or hex4(s + i + 2) < 0:
                return -1
            i += 6
        elif e == 34 or e == 92 or e == 47 or e == 98 or e == 102 or e == 110 or e == 114 or e == 116:
            i += 2
        else:
            return -1
        escaped[0] = True


cdef Py_ssize_t skip_number(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int *kind
) noexcept nogil:
    """The number at s[i]: index past it, or -1 (kind: V_INT or V_FLOAT)."""
    cdef bint is_float
    cdef Py_ssize_t end = number_end(s, n, i, &is_float)
    if end < 0:
        return -1
    if is_float:
        kind[0] = V_FLOAT
    else:
        if end - i > MAX_INT_LITERAL:
            return -1
        kind[0] = V_INT
    return end


cdef inline Py_ssize_t skip_literal(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, const char *word, Py_ssize_t length
) noexcept nogil:
    if i + length > n or memcmp(s + i, word, <size_t>length) != 0:
        return -1
    return i + length


cdef Py_ssize_t skip_scalar(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, int *kind, bint *escaped
) noexcept nogil:
    """A value that is not a container, at s[i]: index past it, or -1."""
    cdef unsigned char c = s[i]
    if c == 34:
        kind[0] = V_STRING
        return skip_string(s, n, i, escaped)
    if c == 116:  # t
        kind[0] = V_TRUE
        return skip_literal(s, n, i, b"true", 4)
    if c == 102:  # f
        kind[0] = V_FALSE
        return skip_literal(s, n, i, b"false", 5)
    if c == 110:  # n
        kind[0] = V_NULL
        return skip_literal(s, n, i, b"null", 4)
    return skip_number(s, n, i, kind)


cdef Py_ssize_t skip_key(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, Py_ssize_t *key_end, bint *escaped
) noexcept nogil:
    """A member's key and colon at s[i]: index of its value, or -1 (key_end:
    past the key's closing quote; escaped: the key has a backslash escape)."""
    if i >= n or s[i] != 34:
        return -1
    i = skip_string(s, n, i, escaped)
    if i < 0:
        return -1
    key_end[0] = i
    i = skip_ws(s, n, i)
    if i >= n or s[i] != 58:  # :
        return -1
    i = skip_ws(s, n, i + 1)
    return i if i < n else -1


cdef Py_ssize_t skip_container(
    const unsigned char *s, Py_ssize_t n, Py_ssize_t i, Py_ssize_t depth
) noexcept nogil:
    """The object or array opening at s[i], inside ``depth`` others: index past it, or -1.

    A loop with its own stack of open containers (no recursion).
    """
    cdef unsigned char is_object[MAX_DEPTH]
    cdef Py_ssize_t top = 0  # containers open in this call
    cdef unsigned char c
    cdef int kind = V_ABSENT
    cdef bint escaped = False
    cdef Py_ssize_t key_end  # not needed here
    while True:
        # A value begins at s[i] (i < n).
        c = s[i]
        if c == 123 or c == 91:  # { [
            if depth + top >= MAX_DEPTH:
                return -1
            i = skip_ws(s, n, i + 1)
            if i >= n:
                return -1
            if s[i] == (125 if c == 123 else 93):  # empty: } ]
                i += 1
            else:
                is_object[top] = c == 123
                top += 1
                if c == 123:
                    i = skip_key(s, n, i, &key_end, &escaped)
                    if i < 0:
                        return -1
                continue
        else:
            i = skip_scalar(s, n, i, &kind, &escaped)
            if i < 0:
                return -1
        # After a value: close what ends here, or go on to the next value.
        while True:
            if top == 0:
                return i
            i = skip_ws(s, n, i)
            if i >= n:
                return -1
            c = s[i]
            if c == 44:  # ,
                i = skip_ws(s, n, i + 1)
                if is_object[top - 1]:
                    i = skip_key(s, n, i, &key_end, &escaped)
                    if i < 0:
                        return -1
                elif i >= n:
                    return -1
                break
            if c == (125 if is_object[top - 1] else 93):
                i += 1
                top -= 1
            else:
                return -1


# Each member's key, in the order of the M_* values.
cdef extern from *:
    """
    static const char *const relay_member_keys[] = {
        "stream", "model", "max_tokens", "max_completion_tokens", "max_output_tokens",
        "messages", "stream_options", "usage", "include_usage",
        "prompt_tokens", "completion_tokens", "prompt_tokens_details", "cached_tokens",
    };
    static const Py_ssize_t relay_member_key_lengths[] = {
        6, 5, 10, 21, 17, 8, 14, 5, 13, 13, 17, 21, 13,
    };
    /* The members of each G_* group: M_* from first to just before the next's. */
    static const int relay_group_first[] = {0, 8, 9, 12, 13};
    /* The group an object-valued member's own members belong to (-1: none
       is read); and the end of the members of that group and of the groups
       below it (its first is the group's first): what a later occurrence
       forgets. */
    static const int relay_member_child[] = {-1, -1, -1, -1, -1, -1, 1, 2, -1, -1, -1, 3, -1};
    static const int relay_member_below_last[] = {0, 0, 0, 0, 0, 0, 9, 13, 0, 0, 0, 13, 0};
    """
    const char *relay_member_keys[]
    const Py_ssize_t relay_member_key_lengths[]
    const int relay_group_first[]
    const int relay_member_child[]
    const int relay_member_below_last[]


cdef int member_of(const unsigned char *k, Py_ssize_t length, int group) noexcept nogil:
    """Which member of a ``group`` object a key (its decoded UTF-8 bytes) names."""
    cdef int member = relay_group_first[group]
    cdef int last = relay_group_first[group + 1]
    while member < last:
        if length == relay_member_key_lengths[member] and memcmp(k, relay_member_keys[member], <size_t>length) == 0:
            return member
        member += 1
    return M_OTHER


cdef int escaped_member_of(bytes body, Py_ssize_t start, Py_ssize_t end, int group) except -2:
    # A key written with escapes ("str\u0065am") is decoded by json itself;
    # keys relay reads are short, so only short ones are worth decoding.
    cdef bytes key
    if end - start > 6 * 21 + 2:
        return M_OTHER
    key = loads(body[start:end]).encode("utf-8", "surrogatepass")
    return member_of(<const unsigned char *>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), group)


cdef int scan_members(
    bytes body, Py_ssize_t i, Found *found, int group, Py_ssize_t depth, Py_ssize_t *end
) except -2:
    """The members (of ``group``) of the object opening at body[i], inside
    ``depth`` other containers, noted in ``found``; so are those of the
    objects among them whose members relay reads (a response's usage, its
    details; stream_options), in the same pass.

    0 with ``end`` past the closing brace, or -1: the reference decides.
    """
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t key_start, key_end, start
    cdef int member, child
    cdef int kind = V_ABSENT
    cdef bint escaped
    cdef unsigned char c
    if depth >= MAX_DEPTH:
        return -1
    i = skip_ws(s, n, i + 1)
    if i >= n:
        return -1
    if s[i] == 125:  # }
        end[0] = i + 1
        return 0
    while True:
        key_start = i
        escaped = False
        i = skip_key(s, n, i, &key_end, &escaped)
        if i < 0:
            return -1
        if escaped:
            member = escaped_member_of(body, key_start, key_end, group)
        else:
            member = member_of(s + key_start + 1, key_end - key_start - 2, group)
        start = i
        escaped = False
        c = s[i]
        child = -1
        if member != M_OTHER:
            child = relay_member_child[member]
            if child >= 0:
                # The last occurrence wins, as in json.loads: what an
                # earlier one held is forgotten, whatever this one is.
                memset(
                    &found.member[relay_group_first[child]], 0,
                    (relay_member_below_last[member] - relay_group_first[child]) * sizeof(Value),
                )
        if c == 123:
            kind = V_OBJECT
            if child >= 0:
                if scan_members(body, i, found, child, depth + 1, &i) < 0:
                    return -1
            else:
                i = skip_container(s, n, i, depth + 1)
        elif c == 91:
            kind = V_ARRAY
            i = skip_container(s, n, i, depth + 1)
        else:
            i = skip_scalar(s, n, i, &kind, &escaped)
        if i < 0:
            return -1
        if member != M_OTHER:
            found.member[member].start = start
            found.member[member].end = i
            found.member[member].kind = kind
            found.member[member].escaped = escaped
        i = skip_ws(s, n, i)
        if i >= n:
            return -1
        c = s[i]
        if c == 44:  # ,
            i = skip_ws(s, n, i + 1)
        elif c == 125:  # }
            end[0] = i + 1
            return 0
        else:
            return -1


cdef int scan(bytes body, Found *found) except -2:
    """SCANNED, NOT_OBJECT or FALL_BACK for a whole body."""
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t i
    cdef Py_ssize_t end = 0
    cdef unsigned char c
    memset(found, 0, sizeof(Found))
    i = skip_ws(s, n, 0)
    if i >= n:
        return NOT_OBJECT  # empty or only whitespace
    c = s[i]
    if c != 123:
        # json.loads reads the bytes as UTF-16/32 when a NUL is among the
        # first four, and strips a UTF-8 byte-order mark: those the
        # reference decides. Any other first character is not "{", and a
        # text that does not start with "{" is no object.
        if c == 0 or c >= 0x80:
            return FALL_BACK
        return NOT_OBJECT
    found.open_brace = i
    if scan_members(body, i, found, G_TOP, 0, &end) < 0:
        return FALL_BACK
    if skip_ws(s, n, end) != n:
        return FALL_BACK  # extra data after the object
    return SCANNED


cdef object string_value(bytes body, Value *v):
    cdef const char *s = PyBytes_AS_STRING(body)
    if v.escaped:
        return loads(body[v.start:v.end])
    # Plain text checked as strict UTF-8 by the walk: decoding cannot fail.
    return PyUnicode_DecodeUTF8(s + v.start + 1, v.end - v.start - 2, NULL)


cdef object int_value(bytes body, Value *v):
    cdef const unsigned char *s
    cdef Py_ssize_t i, end
    cdef long long value = 0
    cdef bint negative
    if v.kind != V_INT:
        return None
    s = <const unsigned char *>PyBytes_AS_STRING(body)
    i = v.start
    end = v.end
    negative = s[i] == 45
    if negative:
        i += 1
    if end - i > C_INT_DIGITS:
        return int(body[v.start:v.end])
    while i < end:
        value = value * 10 + (s[i] - 48)
        i += 1
    return PyLong_FromLongLong(-value if negative else value)


cdef object decode_value(bytes body, Py_ssize_t *at):
    """The value at body[at[0]] (no whitespace before it), ``at`` moved past it.

    Only for text the walk has checked (grammar, UTF-8, nesting depth), so
    it cannot fail; it decodes what json.loads would: integers and plain
    strings in C, the rare float or escaped string through Python.
    """
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body)
    cdef Py_ssize_t i = at[0]
    cdef Value v
    cdef dict members
    cdef list items
    cdef object key
    cdef unsigned char c = s[i]
    if c == 123 or c == 91:  # { [
        i = skip_ws(s, n, i + 1)
        if c == 123:
            members = {}
            while s[i] != 125:
                v.start = i
                v.escaped = False
                v.end = skip_string(s, n, i, &v.escaped)
                key = string_value(body, &v)
                i = skip_ws(s, n, skip_ws(s, n, v.end) + 1)  # past ':'
                at[0] = i
                PyDict_SetItem(members, key, decode_value(body, at))
                i = skip_ws(s, n, at[0])
                if s[i] == 44:
                    i = skip_ws(s, n, i + 1)
            at[0] = i + 1
            return members
        items = []
        while s[i] != 93:
            at[0] = i
            PyList_Append(items, decode_value(body, at))
            i = skip_ws(s, n, at[0])
            if s[i] == 44:
                i = skip_ws(s, n, i + 1)
        at[0] = i + 1
        return items
    v.start = i
    v.escaped = False
    v.end = skip_scalar(s, n, i, &v.kind, &v.escaped)
    at[0] = v.end
    if v.kind == V_STRING:
        return string_value(body, &v)
    if v.kind == V_INT:
        return int_value(body, &v)
    if v.kind == V_FLOAT:
        return float(body[v.start:v.end])  # as json.loads: float() of the literal
    if v.kind == V_TRUE:
        return True
    if v.kind == V_FALSE:
        return False
    return None


cdef object request_from(bytes body, Found *found):
    """The RequestFacts of a scanned body, or None when the reference must decide."""
    cdef Value *v
    cdef object stream = None
    cdef object model = None
    cdef object options = STREAM_OPTIONS_ABSENT
    v = &found.member[M_STREAM]
    if v.kind == V_TRUE:
        stream = True
    elif v.kind == V_FALSE:
        stream = False
    v = &found.member[M_MODEL]
    if v.kind == V_STRING:
        model = string_value(body, v)
    v = &found.member[M_STREAM_OPTIONS]
    if v.kind == V_OBJECT:
        # Its members were noted by the same walk.
        if found.member[M_INCLUDE_USAGE].kind == V_TRUE:
            options = STREAM_OPTIONS_INCLUDE_USAGE
        else:
            options = STREAM_OPTIONS_WITHOUT_USAGE
    elif v.kind == V_NULL:
        options = STREAM_OPTIONS_WITHOUT_USAGE
    elif v.kind != V_ABSENT:
        options = STREAM_OPTIONS_NOT_OBJECT
    return tuple_new(
        RequestFacts,
        (
            True,
            stream,
            model,
            int_value(body, &found.member[M_MAX_TOKENS]),
            int_value(body, &found.member[M_MAX_COMPLETION_TOKENS]),
            int_value(body, &found.member[M_MAX_OUTPUT_TOKENS]),
            found.member[M_MESSAGES].kind != V_ABSENT,
            options,
            found.open_brace + 1,
        ),
    )


def request_facts(body):
    """The RequestFacts of a request body (``NOT_AN_OBJECT`` if none)."""
    cdef Found found
    cdef int outcome
    cdef object facts
    if not isinstance(body, bytes):
        return reference_request_facts(body)  # a bytearray: as rare as it is slow
    outcome = scan(body, &found)
    if outcome == SCANNED:
        facts = request_from(body, &found)
        if facts is not None:
            return facts
    elif outcome == NOT_OBJECT:
        return NOT_AN_OBJECT
    return reference_request_facts(body)


def response_usage(body):
    """The top-level ``usage`` and ``model`` of a response body; None if not an object."""
    cdef Found found
    cdef int outcome
    if not isinstance(body, bytes):
        return reference_response_usage(body)
    outcome = scan(body, &found)
    if outcome == NOT_OBJECT:
        return None
    if outcome == FALL_BACK:
        return reference_response_usage(body)
    return usage_from(body, &found)


cdef object usage_from(bytes body, Found *found):
    """The ResponseUsage of a scanned body."""
    cdef Value *v
    cdef Py_ssize_t start
    cdef object usage = None
    cdef object model = None
    v = &found.member[M_USAGE]
    if v.kind == V_OBJECT:
        start = v.start
        usage = decode_value(body, &start)  # only the usage object is decoded
    v = &found.member[M_MODEL]
    if v.kind == V_STRING:
        model = string_value(body, v)
    return tuple_new(ResponseUsage, (usage, model))


# What count() finds.
cdef enum:
    COUNT_OTHER = -1  # present, not a non-negative integer: not the chat shape
    COUNT_LONG = -2  # an integer literal too long for C: the reference reads it


cdef long long count(bytes body, Value *v):
    """A token count: its value, 0 when absent, or a COUNT_* value."""
    cdef const unsigned char *s
    cdef Py_ssize_t i, end
    cdef long long value = 0
    if v.kind == V_ABSENT:
        return 0
    if v.kind != V_INT:
        return COUNT_OTHER
    s = <const unsigned char *>PyBytes_AS_STRING(body)
    i = v.start
    end = v.end
    if s[i] == 45:  # -: negative, or -0
        i += 1
        while i < end:
            if s[i] != 48:
                return COUNT_OTHER
            i += 1
        return 0
    if end - i > C_INT_DIGITS:
        return COUNT_LONG
    while i < end:
        value = value * 10 + (s[i] - 48)
        i += 1
    return value


def response_counts(body):
    """The ResponseCounts of an OpenAI chat answer's usage, else what
    response_usage gives (None if not an object); see the pure twin."""
    cdef Found found
    cdef int outcome
    cdef long long prompt, completion
    cdef long long cached = 0
    cdef Value *v
    cdef object model = None
    if not isinstance(body, bytes):
        return reference_response_counts(body)
    outcome = scan(body, &found)
    if outcome == NOT_OBJECT:
        return None
    if outcome == FALL_BACK:
        return reference_response_counts(body)
    if found.member[M_USAGE].kind != V_OBJECT:
        return usage_from(body, &found)
    # The usage object's members, and its details', were noted by the walk.
    if found.member[M_PROMPT_TOKENS].kind != V_INT:
        return usage_from(body, &found)
    prompt = count(body, &found.member[M_PROMPT_TOKENS])
    completion = count(body, &found.member[M_COMPLETION_TOKENS])
    if found.member[M_PROMPT_TOKENS_DETAILS].kind == V_OBJECT:
        cached = count(body, &found.member[M_CACHED_TOKENS])
    if prompt == COUNT_LONG or completion == COUNT_LONG or cached == COUNT_LONG:
        return reference_response_counts(body)
    if prompt < 0 or completion < 0 or cached < 0:
        return usage_from(body, &found)
    v = &found.member[M_MODEL]
    if v.kind == V_STRING:
        model = string_value(body, v)
    return tuple_new(
        ResponseCounts,
        (model, PyLong_FromLongLong(prompt), PyLong_FromLongLong(completion),
         PyLong_FromLongLong(cached)),
    )


def decides_alone(bytes body not None):
    """True when the walk answers for ``body`` without the pure twin (for tests)."""
    cdef Found found
    return scan(body, &found) != FALL_BACK

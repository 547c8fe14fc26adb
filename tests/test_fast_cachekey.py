"""Cache keys and credential hashes: properties, edge cases, and twin agreement.

Canonical form is defined by the decoded value (see relay/_fast/_cachekey_py.py);
the compiled twin must return the same bytes for every input.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import relay._fast as fast
from relay._fast import _cachekey_py

HEX = re.compile(rb"[0-9a-f]+")


def key(impl: fast.Implementation, body: bytes, scope: bytes = b"") -> bytes:
    return impl.cache_key(b"POST", b"/v1/chat/completions", body, scope)


def reference_canonical(value: object) -> bytes:
    """What canonical form means, written independently of both twins."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8", "surrogatepass"
    )


# ---------------------------------------------------------------- strategies

# Any code point, lone surrogates included: they reach the decoded value
# through \uXXXX escapes.
_chars = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _no_pairs(text: str) -> str:
    # A high surrogate escape followed by a low one decodes to one astral
    # character, so such a pair of lone surrogates cannot be a decoded value.
    return _SURROGATE_PAIR.sub("x", text)


json_text = st.text(_chars, max_size=12).map(_no_pairs)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(json_text, children, max_size=5)
    ),
    max_leaves=25,
)

_WHITESPACE = st.sampled_from(["", "", " ", "\n", "\t", "\r\n  "])
_SHORT_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _render_string(draw: st.DrawFn, text: str) -> str:
    out = ['"']
    for ch in text:
        cp = ord(ch)
        forced = ch in _SHORT_ESCAPES or cp < 0x20 or 0xD800 <= cp <= 0xDFFF
        if forced or draw(st.integers(0, 5)) == 0:
            style = draw(st.integers(0, 2))
            if ch in _SHORT_ESCAPES and style == 0:
                out.append(_SHORT_ESCAPES[ch])
            elif ch == "/" and style == 1:
                out.append("\\/")
            elif cp > 0xFFFF:
                hi, lo = divmod(cp - 0x10000, 0x400)
                fmt = "\\u{:04X}" if style == 2 else "\\u{:04x}"
                out.append(fmt.format(0xD800 + hi) + fmt.format(0xDC00 + lo))
            else:
                out.append(("\\u{:04X}" if style == 2 else "\\u{:04x}").format(cp))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _render_float(draw: st.DrawFn, value: float) -> str:
    # Different spellings of the same double.
    style = draw(st.integers(0, 3))
    if style == 0:
        return repr(value)
    if style == 1:
        return format(value, ".17g")
    if style == 2:
        return format(value, ".16e").replace("e+", "E")
    text = format(value, ".17e")
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _needs_fraction(text: str) -> str:
    # ".17g" may print an integral double without "." or "e": keep it a float.
    return text if any(c in text for c in ".eEna") else text + ".0"


def render(draw: st.DrawFn, value: object) -> str:
    """Some JSON text whose decoded value is ``value``, keys in any order."""
    ws = lambda: draw(_WHITESPACE)  # noqa: E731
    if isinstance(value, dict):
        items = list(value.items())
        items = draw(st.permutations(items)) if items else items
        members = [
            f"{ws()}{_render_string(draw, k)}{ws()}:{ws()}{render(draw, v)}{ws()}" for k, v in items
        ]
        return "{" + ",".join(members) + (ws() if not members else "") + "}"
    if isinstance(value, list):
        parts = [f"{ws()}{render(draw, v)}{ws()}" for v in value]
        return "[" + ",".join(parts) + (ws() if not parts else "") + "]"
    if isinstance(value, str):
        return _render_string(draw, value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        return _needs_fraction(_render_float(draw, value))
    return str(value)


@st.composite
def renderings(draw: st.DrawFn) -> tuple[object, bytes, bytes]:
    value = draw(json_values)
    first = draw(_WHITESPACE) + render(draw, value) + draw(_WHITESPACE)
    second = render(draw, value)
    return value, first.encode("utf-8"), second.encode("utf-8")


@st.composite
def mutated_json(draw: st.DrawFn) -> bytes:
    """Valid JSON with a few bytes changed: mostly invalid, sometimes not."""
    _, body, _ = draw(renderings())
    data = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(list(b'{}[]",:\\u0aeE.-+ \x00\x1f\x7f\x80\xc3\xed\xf0\xff')))
        if op == 0:
            data.insert(pos, byte)
        elif op == 1 and pos < len(data):
            del data[pos]
        elif pos < len(data):
            data[pos] = byte
    return bytes(data)


_BOUNDARY_CODE_POINTS = [
    0x00, 0x08, 0x1F, 0x20, 0x22, 0x2F, 0x5C, 0x7F, 0x80, 0x7FF, 0x800, 0xD7FF,
    0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0xFFFD, 0xFFFF,
]  # fmt: skip


@st.composite
def escape_soup(draw: st.DrawFn) -> bytes:
    """A string of \\u escapes around every boundary, mixed with raw text."""
    parts = []
    for _ in range(draw(st.integers(1, 10))):
        choice = draw(st.integers(0, 3))
        if choice == 0:
            parts.append(
                draw(st.text(_chars, max_size=3).map(_no_pairs)).encode("utf-8", "surrogatepass")
            )
        else:
            cp = draw(st.sampled_from(_BOUNDARY_CODE_POINTS) | st.integers(0, 0xFFFF))
            fmt = "\\u{:04X}" if choice == 1 else "\\u{:04x}"
            parts.append(fmt.format(cp).encode())
    return b'"' + b"".join(parts) + b'"'


@st.composite
def objects_with_duplicates(draw: st.DrawFn) -> bytes:
    """Object text whose keys repeat, some spelled with escapes."""
    spellings = ["a", "\\u0061", "b", "\\u0062", "\u00e9", "\\u00e9", "\\u00E9", ""]
    members = draw(
        st.lists(st.tuples(st.sampled_from(spellings), json_values), min_size=1, max_size=8)
    )
    text = "{" + ",".join(f'"{k}":{json.dumps(v)}' for k, v in members) + "}"
    return text.encode("utf-8", "surrogatepass")


# ------------------------------------------------------- canonical properties


@settings(max_examples=200, deadline=None)
@given(objects_with_duplicates())
def test_duplicate_keys_match_the_json_module(body: bytes) -> None:
    expected = reference_canonical(json.loads(body))
    for impl in (fast.pure, fast.compiled):
        if impl is None:
            continue
        assert impl.canonical_json(body) == expected


@settings(max_examples=400, deadline=None)
@given(renderings())
def test_equivalent_texts_share_one_canonical_form(case: tuple[object, bytes, bytes]) -> None:
    value, first, second = case
    expected = reference_canonical(value)
    for impl in (fast.pure, fast.compiled):
        if impl is None:
            continue
        assert impl.canonical_json(first) == expected
        assert impl.canonical_json(second) == expected
        assert key(impl, first) == key(impl, second)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | mutated_json() | escape_soup())
@example(body=b'"\\ud800\\udc00\\udbff\\udfff\\ud7ff\\udc00\\udbff\\ue000"')
@example(body=b'"\\ud83d\\ude00"')
@example(body=b'"\\ud83d\\ud83d\\ude00"')
@example(body=b'"\\ude00\\ud83d"')
@example(body=b'"\\ud83d\\u0041"')
@example(body=b'"\\ud83d\\n"')
@example(body=b'"\\ud83d\\uzzzz"')
@example(body=b'"\\ud83d\\')
@example(body=b'"\\u00e9" ')
@example(body=b"[1.]")
@example(body=b"[01]")
@example(body=b"[-]")
@example(body=b"[1e]")
@example(body=b"[1e+]")
@example(body=b"[.5]")
@example(body=b"[-0, -0.0, 0e0, 1E400, -1e400, 1e-400]")
@example(body=b"[NaN]")
@example(body=b"[Infinity]")
@example(body=b"[-Infinity]")
@example(body=b'{"a":1,}')
@example(body=b"[1,]")
@example(body=b'{"a" 1}')
@example(body=b'{"a":1 "b":2}')
@example(body=b"\xef\xbb\xbf{}")
@example(body=b'"\xed\xa0\x80"')
@example(body=b'"\xc0\xaf"')
@example(body=b'"\xf4\x90\x80\x80"')
@example(body=b'"\xe0\x9f\xbf"')
@example(body=b'"\xf0\x8f\xbf\xbf"')
@example(body=b'"\xf4\x8f\xbf\xbf"')
@example(body=b'"\x7f"')
@example(body=b'"\x1f"')
@example(body=b"tru")
@example(body=b"nul")
@example(body=b" \t\n\r")
@example(body=b"\x0b1")
def test_twins_agree_on_any_bytes(
    both: tuple[fast.Implementation, fast.Implementation], body: bytes
) -> None:
    pure, compiled = both
    assert compiled.canonical_json(body) == pure.canonical_json(body)
    assert key(compiled, body, b"scope") == key(pure, body, b"scope")


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=40),
    st.binary(max_size=40),
    st.binary(max_size=200) | renderings().map(lambda c: c[1]),
    st.binary(max_size=40),
)
def test_twins_agree_on_every_field(
    both: tuple[fast.Implementation, fast.Implementation],
    method: bytes,
    target: bytes,
    body: bytes,
    scope: bytes,
) -> None:
    pure, compiled = both
    assert compiled.cache_key(method, target, body, scope) == pure.cache_key(
        method, target, body, scope
    )
    assert compiled.credential_hash(scope) == pure.credential_hash(scope)


@settings(max_examples=200, deadline=None)
@given(json_values, json_values)
def test_different_values_different_keys(first: object, second: object) -> None:
    assume(reference_canonical(first) != reference_canonical(second))
    for impl in (fast.pure, fast.compiled):
        if impl is None:
            continue
        a = impl.cache_key(b"POST", b"/", reference_canonical(first), b"")
        b = impl.cache_key(b"POST", b"/", reference_canonical(second), b"")
        assert a != b


# ------------------------------------------------------------- cache_key


def test_key_shape(impl: fast.Implementation) -> None:
    result = key(impl, b'{"model":"gpt-4o"}')
    assert isinstance(result, bytes)
    assert len(result) == 32
    assert HEX.fullmatch(result)


def test_known_keys(impl: fast.Implementation) -> None:
    # Keys live in shared Redis caches: a layout change must be deliberate
    # (bump KEY_PREFIX), never an accident.
    assert impl.cache_key(b"POST", b"/v1/chat/completions", b'{"b":1, "a":[2]}', b"") == (
        b"08d745b869815828327f1f93affe8ea9"
    )
    assert impl.cache_key(b"GET", b"/v1/models?x=1", b"", b"0123456789abcdef") == (
        b"a7715d9c23dee27f07d47e65b16d851f"
    )
    assert impl.credential_hash(b"Bearer sk-test") == b"0477191a58038930"


def test_key_layout(impl: fast.Implementation) -> None:
    # The documented digest input, built by hand.
    method, target, scope = b"POST", b"/v1/chat/completions?a=1", b"scope"
    body = b'{"z": [1, 2.50], "a": "\\u00e9"}'
    digest_input = (
        _cachekey_py.KEY_PREFIX
        + struct.pack("<QQQ", len(method), len(target), len(scope))
        + method
        + target
        + scope
        + b"J"
        + '{"a":"é","z":[1,2.5]}'.encode()
    )
    expected = hashlib.sha256(digest_input).hexdigest()[:32].encode()
    assert impl.cache_key(method, target, body, scope) == expected
    raw_input = digest_input[: -len('{"a":"é","z":[1,2.5]}'.encode()) - 1] + b"R" + b"{oops"
    assert impl.cache_key(method, target, b"{oops", scope) == (
        hashlib.sha256(raw_input).hexdigest()[:32].encode()
    )
    assert impl.credential_hash(b"k") == (
        hashlib.sha256(_cachekey_py.CREDENTIAL_SALT + b"k").hexdigest()[:16].encode()
    )


def test_key_order_and_whitespace_do_not_matter(impl: fast.Implementation) -> None:
    a = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"temperature":0.2}'
    b = b'{ "temperature" : 0.2,\n  "messages": [ {"content": "hi", "role": "user"} ],\n  "model": "gpt-4o" }\n'
    assert key(impl, a) == key(impl, b)


def test_escapes_are_decoded(impl: fast.Implementation) -> None:
    assert key(impl, b'{"a":"\\u0061\\/"}') == key(impl, b'{"a":"a/"}')
    assert key(impl, b'{"\\u00e9":1}') == key(impl, '{"é":1}'.encode())
    assert key(impl, b'["\\ud83d\\ude00"]') == key(impl, '["😀"]'.encode())


def test_values_change_the_key(impl: fast.Implementation) -> None:
    base = key(impl, b'{"a":[1,2]}')
    assert key(impl, b'{"a":[2,1]}') != base  # array order matters
    assert key(impl, b'{"a":[1,3]}') != base
    assert key(impl, b'{"a":[1,2.0]}') != base  # 2 and 2.0 are different values
    assert key(impl, b'{"A":[1,2]}') != base
    assert key(impl, b'{"a":[1,2],"b":null}') != base


def test_numbers_compare_by_value(impl: fast.Implementation) -> None:
    assert key(impl, b"[100.0]") == key(impl, b"[1e2]") == key(impl, b"[1.00E+2]")
    assert key(impl, b"[0]") == key(impl, b"[-0]")
    assert key(impl, b"[0.0]") != key(impl, b"[-0.0]")
    assert key(impl, b"[1e400]") == key(impl, b"[2e400]")  # both overflow to Infinity


def test_duplicate_keys_keep_the_last_value(impl: fast.Implementation) -> None:
    assert impl.canonical_json(b'{"a":1,"b":2,"a":3}') == b'{"a":3,"b":2}'
    assert key(impl, b'{"a":1,"a":3}') == key(impl, b'{"a":3}')
    assert impl.canonical_json(b'{"\\u0061":1,"a":2}') == b'{"a":2}'


def test_keys_sort_by_code_point(impl: fast.Implementation) -> None:
    body = '{"é":1,"z":2,"\\ud800":3,"\\uffff":4,"😀":5,"":6,"\\"":7,"#":8}'.encode()
    expected = reference_canonical(json.loads(body))
    assert impl.canonical_json(body) == expected


def test_non_json_bodies_are_hashed_raw(impl: fast.Implementation) -> None:
    for body in (b"", b"not json", b"{'a': 1}", b'{"a":NaN}', b"\xff\xfe", b"[1,]"):
        assert impl.canonical_json(body) is None
        assert key(impl, body) == key(impl, body)
    assert key(impl, b"a=1&b=2") != key(impl, b"b=2&a=1")


def test_raw_body_never_takes_a_canonical_key(impl: fast.Implementation) -> None:
    # The canonical form of this JSON body is WTF-8, itself not valid UTF-8,
    # so as a body it is hashed raw: the tag keeps the two keys apart.
    json_body = b'["\\ud800"]'
    canonical = impl.canonical_json(json_body)
    assert canonical == b'["\xed\xa0\x80"]'
    assert impl.canonical_json(canonical) is None
    assert key(impl, json_body) != key(impl, canonical)


def test_field_boundaries_cannot_shift(impl: fast.Implementation) -> None:
    body = b"{}"
    keys = {
        impl.cache_key(b"POST", b"/a", body, b""),
        impl.cache_key(b"POS", b"T/a", body, b""),
        impl.cache_key(b"POST", b"/", body, b"a"),
        impl.cache_key(b"POST", b"", body, b"/a"),
        impl.cache_key(b"POST", b"/a", b"", b"{}"),
        impl.cache_key(b"POST", b"/a{}", b"", b""),
    }
    assert len(keys) == 6


def test_scope_separates_callers(impl: fast.Implementation) -> None:
    body = b'{"model":"gpt-4o"}'
    assert key(impl, body, b"") != key(impl, body, impl.credential_hash(b"Bearer a"))
    assert key(impl, body, impl.credential_hash(b"Bearer a")) != key(
        impl, body, impl.credential_hash(b"Bearer b")
    )


def test_depth_limit(impl: fast.Implementation) -> None:
    limit = _cachekey_py.MAX_DEPTH
    at_limit = b"[" * limit + b"]" * limit
    assert impl.canonical_json(at_limit) == at_limit
    objects = b'{"a":' * limit + b"1" + b"}" * limit
    assert impl.canonical_json(objects) == objects
    over = b"[" * (limit + 1) + b"]" * (limit + 1)
    assert impl.canonical_json(over) is None
    mixed = b'{"a":' * limit + b"[]" + b"}" * limit
    assert impl.canonical_json(mixed) is None
    # Far beyond any recursion limit: no crash, just a raw hash.
    huge = b"[" * 200_000 + b"]" * 200_000
    assert impl.canonical_json(huge) is None
    assert len(key(impl, huge)) == 32


def test_integer_literal_limit(impl: fast.Implementation) -> None:
    limit = _cachekey_py.MAX_INT_LITERAL
    fits = b"9" * limit
    assert impl.canonical_json(fits) == fits
    assert impl.canonical_json(b"-" + b"9" * (limit - 1)) == b"-" + b"9" * (limit - 1)
    assert impl.canonical_json(b"9" * (limit + 1)) is None
    assert impl.canonical_json(b"-" + b"9" * limit) is None
    # A long float literal is still just a double.
    assert impl.canonical_json(b"0." + b"0" * 2000 + b"1") == b"0.0"


def test_canonical_strings(impl: fast.Implementation) -> None:
    assert impl.canonical_json(b'"\\u0000\\u001F\\b\\f\\n\\r\\t\\"\\\\\\/\x7f"') == (
        b'"\\u0000\\u001f\\b\\f\\n\\r\\t\\"\\\\/\x7f"'
    )
    assert impl.canonical_json('"\u2028é日😀"'.encode()) == '"\u2028é日😀"'.encode()


def test_realistic_bodies(impl: fast.Implementation) -> None:
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"message {i} café 日本 😀 " * 20,
        }
        for i in range(40)
    ]
    value = {"model": "gpt-4o", "messages": messages, "temperature": 0.7, "stream": True}
    body = json.dumps(value).encode()
    assert len(body) > 20_000
    assert impl.canonical_json(body) == reference_canonical(value)


def test_large_objects(impl: fast.Implementation) -> None:
    # Past the walker's initial buffers and its small-object sort.
    rng = random.Random(7)
    keys = [f"k{i:04d}" + "\u00e9" * (i % 3) for i in range(1000)]
    rng.shuffle(keys)
    wide = {k: [i, {"z": i, "a": str(i)}] for i, k in enumerate(keys)}
    body = json.dumps(wide).encode()
    assert impl.canonical_json(body) == reference_canonical(wide)
    duplicated = b"{" + b",".join(b'"%d":%d' % (i % 37, i) for i in range(2000)) + b"}"
    assert impl.canonical_json(duplicated) == reference_canonical(json.loads(duplicated))
    deep: object = 1
    for level in range(100):
        deep = {f"{level}-{j}": (deep if j == 13 else j) for j in rng.sample(range(30), 30)}
    body = json.dumps(deep).encode()
    assert impl.canonical_json(body) == reference_canonical(deep)
    long_keys = {("x" * 5000) + str(i): "y" * 5000 for i in range(20, 0, -1)}
    body = json.dumps(long_keys).encode()
    assert impl.canonical_json(body) == reference_canonical(long_keys)


def test_rejects_non_bytes(impl: fast.Implementation) -> None:
    with pytest.raises((TypeError, AttributeError)):
        impl.cache_key(b"POST", b"/", None, b"")  # type: ignore[arg-type]


# --------------------------------------------------------- credential_hash


def test_credential_hash_shape(impl: fast.Implementation) -> None:
    secret = b"Bearer sk-proj-abcdefghijklmnop"
    label = impl.credential_hash(secret)
    assert isinstance(label, bytes)
    assert len(label) == 16
    assert HEX.fullmatch(label)
    assert impl.credential_hash(secret) == label
    assert impl.credential_hash(secret + b"x") != label
    assert b"abcdef" not in label and secret not in label


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_credential_hash_twins_agree(
    both: tuple[fast.Implementation, fast.Implementation], value: bytes
) -> None:
    pure, compiled = both
    assert compiled.credential_hash(value) == pure.credential_hash(value)


# ------------------------------------------------------------- varying headers


@given(
    st.binary(max_size=40),
    st.binary(max_size=200) | renderings().map(lambda c: c[1]),
    st.binary(max_size=40),
    st.binary(max_size=80),
)
def test_twins_agree_with_varying_headers(
    both: tuple[fast.Implementation, fast.Implementation],
    target: bytes,
    body: bytes,
    scope: bytes,
    varying: bytes,
) -> None:
    pure, compiled = both
    assert compiled.cache_key(b"POST", target, body, scope, varying) == pure.cache_key(
        b"POST", target, body, scope, varying
    )


def test_varying_headers_layout(impl: fast.Implementation) -> None:
    method, target, scope = b"POST", b"/v1/messages", b"k"
    varying = b"anthropic-beta:a\nanthropic-version:2023-06-01"
    head = (
        _cachekey_py.KEY_PREFIX
        + struct.pack("<QQQ", len(method), len(target), len(scope))
        + method
        + target
        + scope
    )
    tail = struct.pack("<Q", len(varying)) + varying
    assert impl.cache_key(method, target, b'{"b":1,"a":2}', scope, varying) == (
        hashlib.sha256(head + b"j" + tail + b'{"a":2,"b":1}').hexdigest()[:32].encode()
    )
    assert impl.cache_key(method, target, b"{oops", scope, varying) == (
        hashlib.sha256(head + b"r" + tail + b"{oops").hexdigest()[:32].encode()
    )
    # No varying headers: the key layout (and every stored key) is unchanged.
    assert impl.cache_key(method, target, b"{}", scope, b"") == impl.cache_key(
        method, target, b"{}", scope
    )


def test_varying_headers_separate_keys(impl: fast.Implementation) -> None:
    body = b'{"model":"claude-sonnet-4"}'
    keys = {
        impl.cache_key(b"POST", b"/v1/messages", body, b"", b""),
        impl.cache_key(b"POST", b"/v1/messages", body, b"", b"anthropic-version:2023-06-01"),
        impl.cache_key(b"POST", b"/v1/messages", body, b"", b"anthropic-version:2023-01-01"),
        impl.cache_key(b"POST", b"/v1/messages", body, b"anthropic-version:2023-01-01", b""),
        impl.cache_key(b"POST", b"/v1/messages", b"", b"", body),
    }
    assert len(keys) == 5


@pytest.fixture(scope="module")
def cachekey_c(both: tuple[fast.Implementation, fast.Implementation]) -> object:
    from relay._fast import _cachekey_c

    return _cachekey_c


# Every padding case: the length field fits in the last block (< 56 bytes
# over a block boundary) or needs one more; whole blocks; several blocks.
_SHA_LENGTHS = [*range(0, 140), 191, 192, 255, 256, 1000, 4096, 65537]


@pytest.mark.parametrize("portable", [False, True], ids=["sha-ni-if-present", "portable"])
def test_the_compiled_sha256_gives_the_standard_digests(cachekey_c: Any, portable: bool) -> None:
    rng = random.Random(1)
    for length in _SHA_LENGTHS:
        data = bytes(rng.getrandbits(8) for _ in range(length))
        assert cachekey_c.sha256_digest(data, portable) == hashlib.sha256(data).digest(), length
    assert cachekey_c.sha256_digest(b"abc", portable).hex() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example
    )


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_both_compressions_agree_on_any_bytes(cachekey_c: Any, data: bytes) -> None:
    digest = hashlib.sha256(data).digest()
    assert cachekey_c.sha256_digest(data) == digest
    assert cachekey_c.sha256_digest(data, True) == digest

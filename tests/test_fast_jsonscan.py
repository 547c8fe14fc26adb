"""The JSON facts scan: both twins against json.loads, on fixed cases and generated ones.

The facts are defined by ``json.loads`` and a lookup of top-level members
(relay/_fast/_jsonscan_py.py). The compiled twin walks the bytes instead and
hands what it does not settle alone to the pure one; whichever answers, the
facts must be the ones written out here from ``json.loads`` directly.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import relay._fast as fast
from relay._fast import (
    NOT_AN_OBJECT,
    STREAM_OPTIONS_ABSENT,
    STREAM_OPTIONS_INCLUDE_USAGE,
    STREAM_OPTIONS_NOT_OBJECT,
    STREAM_OPTIONS_WITHOUT_USAGE,
    RequestFacts,
    ResponseCounts,
    ResponseUsage,
)
from relay.accounting.usage import Usage, inject_include_usage, usage_from_json
from relay.http.request import Request
from relay.testing.fake_upstream import ThreadedFakeUpstream
from tests.support import EXPECT_COMPILED, RelayThread, compiled_or_skip, make_config

SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def walk() -> Any:
    """The compiled module itself (decides_alone tells whether it fell back)."""
    compiled_or_skip()
    from relay._fast import _jsonscan_c

    return _jsonscan_c


# --------------------------------------------------------------- reference


def reference_document(body: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return doc if type(doc) is dict else None


def reference_request(body: bytes) -> RequestFacts:
    """What the facts mean, written out from json.loads independently of both twins."""
    doc = reference_document(body)
    if doc is None:
        return RequestFacts(False, None, None, None, None, None, False, 0, -1)

    def integer(name: str) -> int | None:
        value = doc.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    stream = doc.get("stream")
    model = doc.get("model")
    if "stream_options" not in doc:
        options = STREAM_OPTIONS_ABSENT
    elif doc["stream_options"] is None:
        options = STREAM_OPTIONS_WITHOUT_USAGE
    elif isinstance(doc["stream_options"], dict):
        options = (
            STREAM_OPTIONS_INCLUDE_USAGE
            if doc["stream_options"].get("include_usage") is True
            else STREAM_OPTIONS_WITHOUT_USAGE
        )
    else:
        options = STREAM_OPTIONS_NOT_OBJECT
    brace = next(i for i, b in enumerate(body) if b not in b" \t\r\n")
    return RequestFacts(
        True,
        stream if isinstance(stream, bool) else None,
        model if isinstance(model, str) else None,
        integer("max_tokens"),
        integer("max_completion_tokens"),
        integer("max_output_tokens"),
        "messages" in doc,
        options,
        brace + 1 if body[brace : brace + 1] == b"{" else -1,
    )


def reference_response(body: bytes) -> ResponseUsage | None:
    doc = reference_document(body)
    if doc is None:
        return None
    usage, model = doc.get("usage"), doc.get("model")
    return ResponseUsage(
        usage if isinstance(usage, dict) else None, model if isinstance(model, str) else None
    )


def reference_counts(body: bytes) -> ResponseCounts | ResponseUsage | None:
    """The counts of an OpenAI chat usage, else the ResponseUsage, from json.loads."""
    found = reference_response(body)
    if found is None or found.usage is None:
        return found

    def count(owner: dict[str, Any], name: str) -> int | None:
        value = owner.get(name, 0)  # absent: 0; anything but an int >= 0: None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        return None

    usage = found.usage
    if "prompt_tokens" not in usage:
        return found
    details = usage.get("prompt_tokens_details")
    counts = (
        count(usage, "prompt_tokens"),
        count(usage, "completion_tokens"),
        count(details, "cached_tokens") if isinstance(details, dict) else 0,
    )
    if None in counts:
        return found
    return ResponseCounts(found.model, *counts)


def check(impl: fast.Implementation, body: bytes) -> None:
    assert impl.request_facts(body) == reference_request(body)
    assert impl.response_usage(body) == reference_response(body)
    counts = impl.response_counts(body)
    assert counts == reference_counts(body)
    assert type(counts) is type(reference_counts(body))


# --------------------------------------------------------------- fixed cases

CHAT = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi \\"there\\" \\u00e9",'
    b'"stream":true,"model":"inner","max_tokens":9}],"temperature":0.2,"max_tokens":256,'
    b'"stream":false,"metadata":{"stream_options":{"include_usage":true},"usage":{"a":1}}}'
)

# A chat completion as the OpenAI API answers it.
CHAT_RESPONSE = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1735689600,'
    b'"model":"gpt-4o-2024-08-06","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"Reusing skips the handshakes.","refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":38,"completion_tokens":21,"total_tokens":59,"prompt_tokens_details":'
    b'{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,'
    b'"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},'
    b'"service_tier":"default","system_fingerprint":"fp_1"}'
)

REQUESTS = {
    "nested keys are not top-level ones": (
        CHAT,
        RequestFacts(True, False, "gpt-4o-mini", 256, None, None, True, STREAM_OPTIONS_ABSENT, 1),
    ),
    "stream true, spaces before the brace": (
        b' \r\n\t{ "stream" : true , "messages" : [ ] }  ',
        RequestFacts(True, True, None, None, None, None, True, STREAM_OPTIONS_ABSENT, 5),
    ),
    "escaped key and value": (
        b'{"\\u0073tream":true,"mod\\u0065l":"caf\\u00e9 \\ud83d\\ude00 \\/\\n\\"x\\""}',
        RequestFacts(True, True, 'caf\u00e9 \U0001f600 /\n"x"', None, None, None, False, 0, 1),
    ),
    "raw unicode model": (
        '{"model":"mod\u00e8le-\u4e2d\u6587-\U0001f600"}'.encode(),
        RequestFacts(True, None, "mod\u00e8le-\u4e2d\u6587-\U0001f600", None, None, None, False, 0, 1),
    ),
    "a lone surrogate escape": (
        b'{"model":"\\ud800x"}',
        RequestFacts(True, None, "\ud800x", None, None, None, False, 0, 1),
    ),
    "the last duplicate wins": (
        b'{"stream":true,"model":"a","stream":false,"model":7,"max_tokens":1,"max_tokens":2}',
        RequestFacts(True, False, None, 2, None, None, False, 0, 1),
    ),
    "values of other types read as None": (
        b'{"stream":1,"model":["m"],"max_tokens":1.0,"max_completion_tokens":"5",'
        b'"max_output_tokens":true,"messages":null}',
        RequestFacts(True, None, None, None, None, None, True, 0, 1),
    ),
    "exponents are floats": (
        b'{"max_tokens":1e3,"max_completion_tokens":-0,"max_output_tokens":-12}',
        RequestFacts(True, None, None, None, 0, -12, False, 0, 1),
    ),
    "long integers": (
        b'{"max_tokens":123456789012345678901234567890,"max_output_tokens":-999999999999999999}',
        RequestFacts(
            True, None, None, 123456789012345678901234567890, None, -999999999999999999,
            False, 0, 1,
        ),
    ),
    "include_usage true": (
        b'{"stream_options":{"x":[{"include_usage":false}],"include_usage":true}}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_INCLUDE_USAGE, 1),
    ),
    "include_usage overridden by a later duplicate": (
        b'{"stream_options":{"include_usage":true,"include_usage":false}}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_WITHOUT_USAGE, 1),
    ),
    "a later stream_options forgets an earlier include_usage": (
        b'{"stream_options":{"include_usage":true},"stream_options":{}}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_WITHOUT_USAGE, 1),
    ),
    "include_usage 1 is not true": (
        b'{"stream_options":{"include_usage":1}}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_WITHOUT_USAGE, 1),
    ),
    "stream_options null": (
        b'{"stream_options":null}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_WITHOUT_USAGE, 1),
    ),
    "stream_options a string": (
        b'{"stream_options":"x"}',
        RequestFacts(True, None, None, None, None, None, False, STREAM_OPTIONS_NOT_OBJECT, 1),
    ),
    "empty object": (b"{}", RequestFacts(True, None, None, None, None, None, False, 0, 1)),
}

NOT_OBJECTS = [
    b"", b"   ", b"[]", b'["stream", true]', b'"x"', b"1", b"null", b"true", b"not json",
    b"--boundary\r\nContent-Disposition: form-data", b"a=1&b=2",
    b'{"a":1} x', b'{"a":1}{}', b'{"a":1', b'{"a":1,}', b"{,}", b'{"a" 1}', b'{"a":}', b"{'a':1}",
    b'{"a":01}', b'{"a":1.}', b'{"a":.5}', b'{"a":-}', b'{"a":1e}', b'{"a":+1}', b'{"a":tru}',
    b'{"a":nul}', b'{"a":"\x01"}', b'{"a":"\\x"}', b'{"a":"\\u12g4"}', b'{"a":"\\u12"}',
    b'{"a":"unterminated}', b'{"a":[1,2}', b'{"a":{"b":1]}', b'{"a":[1,]}', b'{"a":[,1]}',
    b'{"a":"\xff"}', b'{"a":"\xc0\xaf"}', b'{"a":"\xe2\x82"}', b'{"a":"\xf4\x90\x80\x80"}',
    b'{"a":1}\x00', b'{"a":1}\x0c', b'\x0c{"a":1}', b'{"a":NaN', b'{"a":Infinit}',
    b"\xef\xbb\xbf[]", b'\x00{"a":1}', b"\x00\x00\x00\x00",
]  # fmt: skip


@pytest.mark.parametrize(("body", "expected"), REQUESTS.values(), ids=REQUESTS.keys())
def test_request_facts_fixed_cases(impl, body, expected) -> None:
    assert impl.request_facts(body) == expected == reference_request(body)
    check(impl, body)


@pytest.mark.parametrize("body", NOT_OBJECTS)
def test_bodies_that_are_no_json_object_have_no_facts(impl, body) -> None:
    assert impl.request_facts(body) == NOT_AN_OBJECT == reference_request(body)
    assert impl.response_usage(body) is None


RESPONSES = {
    "usage after choices": (
        b'{"id":"x","model":"gpt-4o","choices":[{"message":{"content":"hi"}}],'
        b'"usage":{"prompt_tokens":3,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}',
        ResponseUsage(
            {"prompt_tokens": 3, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 1}},
            "gpt-4o",
        ),
    ),
    "members after usage": (
        b'{"usage":{"input_tokens":5},"model":"m","service_tier":"default"}',
        ResponseUsage({"input_tokens": 5}, "m"),
    ),
    "nested usage and model only": (
        b'{"choices":[{"usage":{"prompt_tokens":9},"model":"inner"}],"data":{"usage":{}}}',
        ResponseUsage(None, None),
    ),
    "nested model first, top-level later": (
        b'{"choices":[{"message":{"model":"inner"}}],"model":"outer","usage":{"a":1}}',
        ResponseUsage({"a": 1}, "outer"),
    ),
    "usage not an object": (b'{"usage":[1],"model":null}', ResponseUsage(None, None)),
    "usage with duplicates and floats": (
        b'{"usage":{"a":1,"a":2.5,"b":1e400,"c":"\\u00e9"}}',
        ResponseUsage({"a": 2.5, "b": float("inf"), "c": "\u00e9"}, None),
    ),
}


@pytest.mark.parametrize(("body", "expected"), RESPONSES.values(), ids=RESPONSES.keys())
def test_response_usage_fixed_cases(impl, body, expected) -> None:
    assert impl.response_usage(body) == expected == reference_response(body)
    check(impl, body)


def nested(depth: int) -> bytes:
    """An object whose containers nest ``depth`` deep in all."""
    return b'{"model":"m","a":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


# Objects json.loads decodes that the walk leaves to the pure twin.
FALL_BACKS = {
    "NaN": b'{"model":"m","a":NaN}',
    "-Infinity": b'{"model":"m","a":[-Infinity]}',
    "UTF-8 byte-order mark": b'\xef\xbb\xbf{"model":"m","stream":true,"messages":[]}',
    "UTF-16": '{"model":"m","stream":true}'.encode("utf-16"),
    "UTF-16-LE": '{"model":"m"}'.encode("utf-16-le"),
    "UTF-32-BE": ' {"model":"m"}'.encode("utf-32-be"),
    "UTF-8 encoded surrogate": b'{"model":"\xed\xa0\x80"}',
    "deeper than 128": nested(129),
    "an integer of 700 digits": b'{"max_tokens":' + b"7" * 700 + b"}",
}


@pytest.mark.parametrize("body", FALL_BACKS.values(), ids=FALL_BACKS.keys())
def test_what_the_walk_leaves_to_the_pure_twin_gets_the_same_answer(impl, walk, body) -> None:
    assert not walk.decides_alone(body)
    assert reference_request(body).is_object
    check(impl, body)


def test_nesting_limit_is_exact(walk) -> None:
    assert walk.decides_alone(nested(128))
    assert not walk.decides_alone(nested(129))
    assert walk.request_facts(nested(128)) == reference_request(nested(128))
    deep = b"[" * 100_000  # neither twin recurses into it
    check(fast.pure, deep)
    check(walk, b'{"a":' + deep)


def test_walk_decides_ordinary_bodies_alone(walk) -> None:
    for body in [CHAT, *(b for b, _ in REQUESTS.values()), *(b for b, _ in RESPONSES.values())]:
        assert walk.decides_alone(body), body
    # A body that cannot start an object is answered from its first byte.
    for body in (b"", b" [1]", b'"x"', b"--boundary\r\n" + b"\xff" * 1000, b"a=1"):
        assert walk.decides_alone(body), body


COUNTS = {
    "the usual chat answer": (
        CHAT_RESPONSE,
        ResponseCounts("gpt-4o-2024-08-06", 38, 21, 0),
    ),
    "cached tokens": (
        b'{"usage":{"prompt_tokens":30,"prompt_tokens_details":{"cached_tokens":20},'
        b'"completion_tokens":2},"model":"m"}',
        ResponseCounts("m", 30, 2, 20),
    ),
    "absent counts are 0, -0 is 0": (
        b'{"usage":{"prompt_tokens":-0,"prompt_tokens_details":{}}}',
        ResponseCounts(None, 0, 0, 0),
    ),
    "details not an object": (
        b'{"usage":{"prompt_tokens":1,"prompt_tokens_details":null,"completion_tokens":0}}',
        ResponseCounts(None, 1, 0, 0),
    ),
    "the last of duplicates": (
        b'{"usage":{"prompt_tokens":-1,"prompt_tokens":4,"completion_tokens":true,'
        b'"completion_tokens":5}}',
        ResponseCounts(None, 4, 5, 0),
    ),
    "escaped keys": (
        b'{"usage":{"prompt_\\u0074okens":7,"completion_tokens":1,'
        b'"prompt_tokens_details":{"cached\\u005ftokens":3}}}',
        ResponseCounts(None, 7, 1, 3),
    ),
    "counts beyond 64 bits": (
        b'{"usage":{"prompt_tokens":123456789012345678901234,"completion_tokens":'
        b'999999999999999999}}',
        ResponseCounts(None, 123456789012345678901234, 999999999999999999, 0),
    ),
    "a negative count": (
        b'{"usage":{"prompt_tokens":3,"completion_tokens":-2}}',
        ResponseUsage({"prompt_tokens": 3, "completion_tokens": -2}, None),
    ),
    "a float count": (
        b'{"usage":{"prompt_tokens":3.0},"model":"m"}',
        ResponseUsage({"prompt_tokens": 3.0}, "m"),
    ),
    "a bool cached count": (
        b'{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":false}}}',
        ResponseUsage({"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": False}}, None),
    ),
    "a negative long cached count": (
        b'{"usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":'
        b'-12345678901234567890123}}}',
        ResponseUsage(
            {"prompt_tokens": 3, "prompt_tokens_details": {"cached_tokens": -12345678901234567890123}},
            None,
        ),
    ),
    "Anthropic's usage": (
        b'{"model":"claude","usage":{"input_tokens":5,"output_tokens":1}}',
        ResponseUsage({"input_tokens": 5, "output_tokens": 1}, "claude"),
    ),
    "prompt_tokens only in a nested object": (
        b'{"usage":{"prompt_tokens_details":{"prompt_tokens":3}}}',
        ResponseUsage({"prompt_tokens_details": {"prompt_tokens": 3}}, None),
    ),
    "a later usage forgets an earlier one's counts": (
        b'{"usage":{"prompt_tokens":1,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":1}},"usage":{"completion_tokens":3}}',
        ResponseUsage({"completion_tokens": 3}, None),
    ),
    "a later usage that is not an object": (
        b'{"usage":{"prompt_tokens":1},"usage":null,"model":"m"}',
        ResponseUsage(None, "m"),
    ),
    "a later details forgets an earlier one's cached count": (
        b'{"usage":{"prompt_tokens":4,"prompt_tokens_details":{"cached_tokens":3},'
        b'"prompt_tokens_details":{}}}',
        ResponseCounts(None, 4, 0, 0),
    ),
    "usage members inside details are not the usage's": (
        b'{"usage":{"prompt_tokens_details":{"cached_tokens":2,"completion_tokens":9},'
        b'"prompt_tokens":5}}',
        ResponseCounts(None, 5, 0, 2),
    ),
    "no usage object": (b'{"usage":7,"model":"m"}', ResponseUsage(None, "m")),
    "not an object": (b"[]", None),
}


@pytest.mark.parametrize(("body", "expected"), COUNTS.values(), ids=COUNTS.keys())
def test_response_counts_fixed_cases(impl, body, expected) -> None:
    assert impl.response_counts(body) == expected == reference_counts(body)
    assert type(impl.response_counts(body)) is type(expected)
    check(impl, body)


def test_facts_are_named_tuples_of_the_same_type(impl) -> None:
    facts = impl.request_facts(CHAT)
    assert type(facts) is RequestFacts
    assert facts.model == "gpt-4o-mini" and facts[1] is False
    usage = impl.response_usage(b'{"usage":{}}')
    assert type(usage) is ResponseUsage


def test_a_bytearray_body_gets_the_same_facts(impl) -> None:
    for body in (CHAT, b'{"usage":{"a":1},"model":"m"}', b"[]", b"{"):
        assert impl.request_facts(bytearray(body)) == reference_request(body)
        assert impl.response_usage(bytearray(body)) == reference_response(body)


# --------------------------------------------------------------- generated documents

KEYS = [
    "stream", "model", "usage", "messages", "stream_options", "include_usage",
    "max_tokens", "max_completion_tokens", "max_output_tokens", "prompt_tokens",
    "completion_tokens", "prompt_tokens_details", "cached_tokens",
    "", "x", "streams", "Model", "mod\u00e8l", "\u6a21\u578b", "str\u0000eam",
]  # fmt: skip
_chars = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())
keys = st.sampled_from(KEYS) | st.text(_chars, max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_chars, max_size=10)
    | st.sampled_from(["gpt-4o", "claude-3-5-sonnet"])
)


class Members(list):  # type: ignore[type-arg]
    """An object as its (key, value) pairs in order, duplicates allowed."""


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    arrays = st.lists(children, max_size=4)
    return arrays | st.lists(st.tuples(keys, children), max_size=4).map(Members)


values = st.recursive(scalars, _containers, max_leaves=20)
top_level = st.lists(st.tuples(keys, values), max_size=8).map(Members)

_WHITESPACE = st.sampled_from(["", "", "", " ", "\n", "\t", "\r\n  "])
_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _string(draw: st.DrawFn, text: str) -> str:
    out = ['"']
    for ch in text:
        cp = ord(ch)
        forced = ch in _SHORT or cp < 0x20 or 0xD800 <= cp <= 0xDFFF
        if forced or draw(st.integers(0, 6)) == 0:
            style = draw(st.integers(0, 2))
            if ch in _SHORT and style == 0:
                out.append(_SHORT[ch])
            elif ch == "/" and style == 1:
                out.append("\\/")
            elif cp > 0xFFFF:
                hi, lo = divmod(cp - 0x10000, 0x400)
                out.append(f"\\u{0xD800 + hi:04x}\\u{0xDC00 + lo:04X}")
            else:
                out.append(f"\\u{cp:04X}" if style == 2 else f"\\u{cp:04x}")
        else:
            out.append(ch)
    return "".join(out) + '"'


def render(draw: st.DrawFn, value: object) -> str:
    """Some JSON text of ``value``, with any whitespace and escapes."""
    ws = lambda: draw(_WHITESPACE)  # noqa: E731
    if isinstance(value, Members):
        parts = [f"{ws()}{_string(draw, k)}{ws()}:{ws()}{render(draw, v)}{ws()}" for k, v in value]
        return "{" + ",".join(parts) + (ws() if not parts else "") + "}"
    if isinstance(value, list):
        parts = [f"{ws()}{render(draw, v)}{ws()}" for v in value]
        return "[" + ",".join(parts) + (ws() if not parts else "") + "]"
    if isinstance(value, str):
        return _string(draw, value)
    if isinstance(value, float):
        text = draw(st.sampled_from([repr(value), format(value, ".17e"), format(value, ".6E")]))
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, int) and not isinstance(value, bool) and draw(st.booleans()):
        return f"{value}e0"  # an integral float
    return json.dumps(value)


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    text = draw(_WHITESPACE) + render(draw, draw(top_level)) + draw(_WHITESPACE)
    return text.encode("utf-8")


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A generated document with a few bytes changed: mostly invalid, sometimes not."""
    data = bytearray(draw(documents()))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.integers(0, 3))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.sampled_from(list(b'{}[]",:\\u0aeE.-+ \x00\x1f\x7f\x80\xc3\xed\xf0\xff')))
        if op == 0:
            data.insert(pos, byte)
        elif op == 1 and pos < len(data):
            del data[pos]
        elif op == 2 and pos < len(data):
            data[pos] = byte
        else:
            del data[pos:]
    return bytes(data)


@SETTINGS
@given(documents())
@example(CHAT)
def test_generated_documents_give_the_facts_of_json_loads(body: bytes) -> None:
    check(fast.pure, body)
    if fast.compiled is not None:
        from relay._fast import _jsonscan_c

        check(fast.compiled, body)
        assert _jsonscan_c.decides_alone(body), body  # no constant, BOM or deep nesting here


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    """A top-level object with a "usage" object among other members."""
    others = st.tuples(keys.filter(lambda k: k != "usage"), values)
    members = draw(st.lists(others, max_size=4))
    usage = draw(st.lists(st.tuples(keys, values), max_size=6).map(Members))
    members.insert(draw(st.integers(0, len(members))), ("usage", usage))
    return render(draw, Members(members)).encode("utf-8")


@SETTINGS
@given(responses())
def test_generated_usage_objects_decode_as_json_loads_decodes_them(body: bytes) -> None:
    expected = reference_response(body)
    assert expected is not None and expected.usage is not None
    check(fast.pure, body)
    if fast.compiled is not None:
        from relay._fast import _jsonscan_c

        assert _jsonscan_c.decides_alone(body), body
        assert _jsonscan_c.response_usage(body) == expected
        assert _jsonscan_c.response_counts(body) == reference_counts(body)


token_counts = (
    st.integers(min_value=0, max_value=2**64)
    | st.integers(min_value=-(2**64), max_value=-1)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False, allow_infinity=False)
)


@st.composite
def chat_usages(draw: st.DrawFn) -> bytes:
    """A response whose usage has some of the OpenAI chat counts, in any order."""
    counts = st.sampled_from(["prompt_tokens", "completion_tokens"])
    details = st.lists(
        st.tuples(st.sampled_from(["cached_tokens", "audio_tokens"]), token_counts), max_size=3
    ).map(Members)
    usage = draw(
        st.lists(
            st.tuples(counts, token_counts)
            | st.tuples(st.just("prompt_tokens_details"), details | values)
            | st.tuples(keys, values),
            max_size=6,
        ).map(Members)
    )
    members = Members([("model", draw(scalars)), ("usage", usage)])
    if draw(st.booleans()):
        members.reverse()
    return render(draw, members).encode("utf-8")


@SETTINGS
@given(chat_usages())
@example(CHAT_RESPONSE)
def test_generated_chat_usages_give_the_counts_of_json_loads(body: bytes) -> None:
    check(fast.pure, body)
    if fast.compiled is not None:
        from relay._fast import _jsonscan_c

        assert _jsonscan_c.decides_alone(body), body
        check(fast.compiled, body)


@SETTINGS
@given(mutated())
def test_mutated_documents_never_crash_and_agree(body: bytes) -> None:
    check(fast.pure, body)
    if fast.compiled is not None:
        check(fast.compiled, body)


@SETTINGS
@given(st.binary(max_size=64).map(lambda b: b"{" + b))
def test_random_bytes_after_a_brace_never_crash(body: bytes) -> None:
    check(fast.pure, body)
    if fast.compiled is not None:
        check(fast.compiled, body)


def test_compiled_twin_runs_in_this_suite() -> None:
    # The generated tests above only check the compiled twin when it loaded.
    if EXPECT_COMPILED:
        assert fast.compiled is not None, fast.COMPILED_IMPORT_ERROR


# --------------------------------------------------------------- wiring


def make_request(body: bytes, path: bytes = b"/v1/chat/completions") -> Request:
    return Request(b"POST", path, [], body, True, 1, "127.0.0.1", 0.0)


def test_request_facts_are_scanned_once_and_reset_with_the_body() -> None:
    request = make_request(CHAT)
    facts = request.facts()
    assert facts == reference_request(CHAT)
    assert request.facts() is facts
    assert request.model() == "gpt-4o-mini"
    request.replace_body(b'{"model":"other"}')
    assert request.model() == "other"
    assert make_request(b"").model() is None
    assert make_request(b'{"model":1}').model() is None


def test_request_facts_come_from_the_document_when_already_decoded() -> None:
    request = make_request(CHAT)
    assert request.json()["model"] == "gpt-4o-mini"
    assert request.facts() == reference_request(CHAT)
    assert make_request(b"[1]").json() == [1]
    listed = make_request(b"[1]")
    listed.json()
    assert listed.facts() == NOT_AN_OBJECT


@pytest.fixture
def no_json_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """json.loads fails loudly: only the compiled walk may read bodies."""
    compiled_or_skip()
    if not fast.EXTENSIONS_LOADED:
        pytest.skip("the pure twin decodes bodies by definition")

    def forbidden(*args: object, **kwargs: object) -> object:
        raise AssertionError("json.loads called")

    monkeypatch.setattr(json, "loads", forbidden)


def test_stream_false_and_usage_splice_decode_nothing(no_json_decoding) -> None:
    body = b'{"model":"m","stream":false,"messages":[{"role":"user","content":"x","stream":true}]}'
    request = make_request(body)
    assert inject_include_usage(body, facts=request.facts()) is None
    assert request.model() == "m"
    body = b'{"model":"m","stream":true,"messages":[{"stream_options":null}]}'
    assert inject_include_usage(body, facts=make_request(body).facts()) == (
        b'{"stream_options":{"include_usage":true},' + body[1:]
    )
    assert inject_include_usage(body) == b'{"stream_options":{"include_usage":true},' + body[1:]
    response = b'{"model":"m","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    # Only the usage object is decoded, by the walk's own reference to json.loads.
    assert usage_from_json(response) == Usage("m", 4, 1, 0)


@pytest.mark.parametrize(
    "body",
    [
        b'\xef\xbb\xbf{"stream":true,"messages":[]}',  # decoded, rewritten whole
        b'{"stream":true,"messages":[],"stream_options":null}',
        b'{"stream":true,"messages":[],"stream_options":{"include_usage":false,"x":1}}',
    ],
)
def test_inject_rewrites_what_it_cannot_splice(body: bytes) -> None:
    new = inject_include_usage(body)
    assert new is not None
    doc = json.loads(new)
    assert doc["stream_options"]["include_usage"] is True
    assert doc["stream"] is True and doc["messages"] == []


def test_inject_ignores_nested_stream_and_options() -> None:
    body = b'{"stream":false,"messages":[{"stream":true,"stream_options":{}}]}'
    assert inject_include_usage(body) is None
    body = b'{"stream":true,"messages":[],"metadata":{"stream_options":{"include_usage":true}}}'
    assert inject_include_usage(body) == b'{"stream_options":{"include_usage":true},' + body[1:]


def test_usage_from_json_reads_only_top_level_members() -> None:
    body = (
        b'{"choices":[{"message":{"model":"inner","usage":{"prompt_tokens":99}}}],'
        b'"model":"outer","usage":{"prompt_tokens":5,"completion_tokens":2}}'
    )
    assert usage_from_json(body) == Usage("outer", 5, 2, 0)
    nested_only = b'{"model":"m","choices":[{"usage":{"prompt_tokens":99,"completion_tokens":1}}]}'
    assert usage_from_json(nested_only) is None
    # Invalid JSON has no usage, however usage-like its tail looks.
    assert usage_from_json(b'garbage, "usage": {"prompt_tokens": 1, "completion_tokens": 1}}') is None
    assert usage_from_json(b'{"usage":{"prompt_tokens":5}}', "hint") == Usage("hint", 5, 0, 0)


# --------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def scan_upstream():
    with ThreadedFakeUpstream() as fake:
        yield fake


@pytest.fixture(params=["uvloop", "asyncio"])
def scan_relay(request, scan_upstream):
    with RelayThread(make_config(scan_upstream.url), loop=request.param) as r:
        yield r


def raw_post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(
            "POST", "/v1/chat/completions", body,
            {"content-type": "application/json", "authorization": "Bearer sk-scan"},
        )  # fmt: skip
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_stream_false_with_nested_stream_true_goes_upstream_unchanged(scan_relay, scan_upstream):
    body = (
        b'{ "model": "gpt-4o-mini", "stream": false,\n "messages": [{"role": "user", '
        b'"content": "caf\\u00e9 \xe2\x98\x95", "stream": true}], "max_tokens": 16 }'
    )
    status, reply = raw_post(scan_relay.port, body)
    assert status == 200
    assert json.loads(reply)["object"] == "chat.completion"
    assert scan_upstream.requests[-1].body == body


def test_stream_true_gets_usage_spliced_in_byte_for_byte(scan_relay, scan_upstream):
    body = (
        b'\n{"messages": [{"role": "user", "content": "x", "stream_options": null}],'
        b' "metadata": {"stream_options": {"include_usage": true}}, "model": "gpt-4o-mini",'
        b' "stream": true}'
    )
    status, reply = raw_post(scan_relay.port, body)
    assert status == 200
    assert b'"usage"' not in reply  # the client did not ask for it
    assert scan_upstream.requests[-1].body == (
        b'\n{"stream_options":{"include_usage":true},' + body[2:]
    )


def test_openai_sdk_stream_with_nested_lookalikes_gets_usage_injected(scan_relay, scan_upstream):
    client = openai.OpenAI(
        base_url=scan_relay.url + "/v1", api_key="sk-scan", max_retries=0, timeout=10
    )
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            extra_body={"metadata": {"model": "not-this", "stream": False}},
        )
    )
    assert chunks and all(c.usage is None for c in chunks)
    sent = json.loads(scan_upstream.requests[-1].body)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["metadata"] == {"model": "not-this", "stream": False}

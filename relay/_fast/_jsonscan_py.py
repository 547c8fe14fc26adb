"""The few JSON facts relay needs from a body, pure Python (the reference twin).

relay reads a handful of top-level members of request and response bodies:
a request's ``stream``, ``model``, output-token limits, ``messages`` and
``stream_options`` (usage injection, routing, virtual keys), and a
response's ``usage`` and ``model`` (accounting). These functions define what
those facts are: exactly what ``json.loads(body)`` followed by a dictionary
lookup gives. A body that ``json.loads`` does not decode to a ``dict``
(invalid JSON, invalid UTF-8, another top-level type, nesting too deep for
the interpreter) has no facts.

The compiled twin (``_jsonscan_c.pyx``) finds the same facts with one walk
over the bytes, validating the whole body on the way but building no Python
object except the facts themselves; on anything it does not handle (a
``NaN`` constant, a byte-order mark, deep nesting, encoded surrogates, ...)
it falls back to these functions, so the two always agree.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

__all__ = [
    "NOT_AN_OBJECT",
    "STREAM_OPTIONS_ABSENT",
    "STREAM_OPTIONS_INCLUDE_USAGE",
    "STREAM_OPTIONS_NOT_OBJECT",
    "STREAM_OPTIONS_WITHOUT_USAGE",
    "RequestFacts",
    "ResponseCounts",
    "ResponseUsage",
    "request_facts",
    "request_facts_of",
    "response_counts",
    "response_usage",
]

# What a request's top-level "stream_options" is.
STREAM_OPTIONS_ABSENT = 0  # no such member
STREAM_OPTIONS_INCLUDE_USAGE = 1  # an object whose "include_usage" is true
STREAM_OPTIONS_WITHOUT_USAGE = 2  # null, or an object without "include_usage": true
STREAM_OPTIONS_NOT_OBJECT = 3  # any other value


class RequestFacts(NamedTuple):
    """What relay reads from a request body's top-level object.

    A member that is absent or of another JSON type reads as None.
    """

    is_object: bool  # the body decodes to a JSON object; if not, the rest is empty
    stream: bool | None
    model: str | None
    max_tokens: int | None
    max_completion_tokens: int | None
    max_output_tokens: int | None
    has_messages: bool  # a "messages" member, whatever its value
    stream_options: int  # one of STREAM_OPTIONS_*
    # Offset just after the opening brace, where a new first member can be
    # spliced in leaving every other byte as sent; -1 when the body does not
    # start with the brace (a byte-order mark, UTF-16): it must be rewritten.
    insert_at: int


class ResponseUsage(NamedTuple):
    """What usage accounting reads from a response body's top-level object."""

    usage: dict[str, Any] | None  # the "usage" member when it is an object
    model: str | None  # the "model" member when it is a string


class ResponseCounts(NamedTuple):
    """The usage of an OpenAI chat answer, the usual one, read as counts.

    Its ``usage`` has ``prompt_tokens``, a non-negative integer;
    ``completion_tokens`` absent or a non-negative integer; and
    ``prompt_tokens_details``, when it is an object, a ``cached_tokens``
    absent or a non-negative integer (an absent count is 0).
    """

    model: str | None  # the "model" member when it is a string
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


NOT_AN_OBJECT = RequestFacts(False, None, None, None, None, None, False, STREAM_OPTIONS_ABSENT, -1)

_JSON_WHITESPACE = b" \t\n\r"
_OPEN_BRACE = ord("{")


def _decoded_object(body: bytes | bytearray) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if type(doc) is dict else None


def _int_or_none(value: Any) -> int | None:
    return value if type(value) is int else None


def request_facts(body: bytes | bytearray) -> RequestFacts:
    """The :class:`RequestFacts` of a request body (``NOT_AN_OBJECT`` if none)."""
    doc = _decoded_object(body)
    if doc is None:
        return NOT_AN_OBJECT
    return request_facts_of(doc, body)


def request_facts_of(doc: dict[str, Any], body: bytes | bytearray) -> RequestFacts:
    """The :class:`RequestFacts` of ``body`` already decoded to the object ``doc``."""
    stream = doc.get("stream")
    model = doc.get("model")
    if "stream_options" not in doc:
        options = STREAM_OPTIONS_ABSENT
    else:
        value = doc["stream_options"]
        if value is None:
            options = STREAM_OPTIONS_WITHOUT_USAGE
        elif type(value) is dict:
            options = (
                STREAM_OPTIONS_INCLUDE_USAGE
                if value.get("include_usage") is True
                else STREAM_OPTIONS_WITHOUT_USAGE
            )
        else:
            options = STREAM_OPTIONS_NOT_OBJECT
    # A decoded object starts with JSON whitespace and "{", unless the text
    # was decoded from UTF-8 with a byte-order mark, UTF-16 or UTF-32.
    start = len(body) - len(body.lstrip(_JSON_WHITESPACE))
    return RequestFacts(
        True,
        stream if type(stream) is bool else None,
        model if type(model) is str else None,
        _int_or_none(doc.get("max_tokens")),
        _int_or_none(doc.get("max_completion_tokens")),
        _int_or_none(doc.get("max_output_tokens")),
        "messages" in doc,
        options,
        start + 1 if body[start] == _OPEN_BRACE else -1,
    )


def response_usage(body: bytes | bytearray) -> ResponseUsage | None:
    """The top-level ``usage`` and ``model`` of a response body; None if not an object."""
    doc = _decoded_object(body)
    if doc is None:
        return None
    usage = doc.get("usage")
    model = doc.get("model")
    return ResponseUsage(
        usage if type(usage) is dict else None, model if type(model) is str else None
    )


def response_counts(body: bytes | bytearray) -> ResponseCounts | ResponseUsage | None:
    """:class:`ResponseCounts` of a response whose usage has the OpenAI chat
    shape; else what :func:`response_usage` gives (None if not an object)."""
    found = response_usage(body)
    if found is None or found.usage is None:
        return found
    usage = found.usage
    prompt = usage.get("prompt_tokens")
    if type(prompt) is int and prompt >= 0:
        completion = usage.get("completion_tokens", 0)
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens", 0) if type(details) is dict else 0
        if type(completion) is int and completion >= 0 and type(cached) is int and cached >= 0:
            return ResponseCounts(found.model, prompt, completion, cached)
    return found

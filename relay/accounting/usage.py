"""Token usage from OpenAI and Anthropic responses, JSON or streamed.

How the providers' counters map onto :class:`Usage`:

* OpenAI chat / completions / embeddings: ``usage.prompt_tokens``,
  ``usage.completion_tokens`` (absent for embeddings: 0) and
  ``usage.prompt_tokens_details.cached_tokens``. ``prompt_tokens`` already
  includes the cached ones.
* OpenAI Responses API: ``usage.input_tokens`` (includes cached),
  ``usage.output_tokens``, ``usage.input_tokens_details.cached_tokens``.
* Anthropic messages: ``usage.input_tokens`` counts only the uncached part
  of the prompt; cache reads (``cache_read_input_tokens``) and cache writes
  (``cache_creation_input_tokens``) come on top. So
  ``prompt_tokens = input_tokens + cache_read_input_tokens +
  cache_creation_input_tokens`` and ``cached_tokens =
  cache_read_input_tokens``, which makes ``prompt_tokens`` mean the same
  thing for both providers (the whole prompt, cached part included). Cache
  writes are priced as ordinary input (the price table has no separate
  cache-write price).

The two usage shapes are told apart by their keys (``prompt_tokens`` vs
``input_tokens``; the Responses API adds ``input_tokens_details`` or
``total_tokens``, which Anthropic never sends), so one parser serves all.

Streams: :class:`StreamUsage` reads the raw events produced by
:class:`relay.http.sse.SSESplitter`. It parses JSON only for the few events that
carry usage; the generated text is collected with one regular-expression
search per event (as still-escaped JSON string fragments, decoded only if
an estimate is needed) so that a stream without usage, or one the client
left early, can still be counted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from relay._fast import (
    STREAM_OPTIONS_ABSENT,
    STREAM_OPTIONS_WITHOUT_USAGE,
    RequestFacts,
    ResponseCounts,
    request_facts,
    response_counts,
)
from relay.http.sse import event_fields

__all__ = [
    "ANTHROPIC",
    "AUTO",
    "OPENAI",
    "StreamUsage",
    "TokenCounter",
    "Usage",
    "estimate_usage",
    "inject_include_usage",
    "provider_for_path",
    "request_text_for_estimate",
    "response_text_for_estimate",
    "usage_from_json",
    "usage_from_mapping",
    "usage_in_json",
]

OPENAI = "openai"
ANTHROPIC = "anthropic"
AUTO = "auto"

_AUTO, _OPENAI, _ANTHROPIC = 0, 1, 2
_PROVIDERS = {AUTO: _AUTO, OPENAI: _OPENAI, ANTHROPIC: _ANTHROPIC}

# A usage *object* (not `"usage":null`, which OpenAI puts in every chunk of a
# stream that asked for usage).
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# String-valued fields that carry generated tokens: chat deltas (content,
# refusal, tool-call arguments, reasoning), legacy completions (text), the
# Responses API (delta) and Anthropic deltas (text, partial_json, thinking).
# The value is captured still escaped; the unrolled loop keeps it linear.
_TEXT_FIELD = re.compile(
    # content|text|thinking|arguments|refusal|reasoning(_content)?|delta|partial_json,
    # factored by first letter, which the regex engine rejects faster.
    rb'"(?:content|t(?:ext|hinking)|arguments|re(?:fusal|asoning(?:_content)?)|delta|partial_json)"'
    rb'\s*:\s*"([^"\\]*(?:\\.[^"\\]*)*)"'
)
# Bound on the text kept per stream for an estimate; beyond it the rest is
# estimated from its length (a runaway stream must not grow memory).
_MAX_TEXT_BYTES = 4 * 1024 * 1024
_PENDING_LIMIT = 256 * 1024
_OPENAI_NULL_USAGE_TAIL = b',"usage":null}\n\n'


class TokenCounter(Protocol):
    """What an estimate needs (relay.accounting.tokens.TokenEstimator fits)."""

    def count(self, text: str, model: str = "") -> int: ...


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one request. ``prompt_tokens`` includes ``cached_tokens``."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    estimated: bool = False
    cache_write_tokens: int = 0  # part of prompt_tokens (Anthropic cache writes)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


# Usage is frozen, so its generated __init__ sets each field through
# object.__setattr__. The usage read from a JSON answer, made once per
# request, fills the slots directly instead: the same object, made in half
# the time.
_new_object = object.__new__
_usage_slots: Any = Usage.__dict__  # the slot descriptors, by field name
_set_model = _usage_slots["model"].__set__
_set_prompt = _usage_slots["prompt_tokens"].__set__
_set_completion = _usage_slots["completion_tokens"].__set__
_set_cached = _usage_slots["cached_tokens"].__set__
_set_estimated = _usage_slots["estimated"].__set__
_set_written = _usage_slots["cache_write_tokens"].__set__


def _read_usage(model: str, prompt: int, completion: int, cached: int) -> Usage:
    """``Usage(model, prompt, completion, cached)``, without the frozen __init__."""
    usage = _new_object(Usage)
    _set_model(usage, model)
    _set_prompt(usage, prompt)
    _set_completion(usage, completion)
    _set_cached(usage, cached)
    _set_estimated(usage, False)
    _set_written(usage, 0)
    return usage  # type: ignore[no-any-return]


def _n(value: Any) -> int:
    """A token count from JSON: non-negative int, anything else 0."""
    if type(value) is int:
        return value if value > 0 else 0
    if isinstance(value, float) and value > 0:
        return int(value)
    return 0


_Counts = tuple[int, int, int, int]


def _counts(u: dict[str, Any]) -> _Counts | None:
    """(prompt incl. cached, completion, cached, cache writes) from one usage object."""
    if "prompt_tokens" in u:  # OpenAI chat, completions, embeddings
        details = u.get("prompt_tokens_details")
        cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return _n(u["prompt_tokens"]), _n(u.get("completion_tokens")), cached, 0
    if "input_tokens" not in u and "output_tokens" not in u:
        return None
    if "input_tokens_details" in u or "total_tokens" in u:  # OpenAI Responses
        details = u.get("input_tokens_details")
        cached = _n(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return _n(u.get("input_tokens")), _n(u.get("output_tokens")), cached, 0
    read = _n(u.get("cache_read_input_tokens"))  # Anthropic: see module doc
    written = _n(u.get("cache_creation_input_tokens"))
    return _n(u.get("input_tokens")) + read + written, _n(u.get("output_tokens")), read, written


def _usage(model: str, counts: _Counts) -> Usage:
    prompt, completion, cached, written = counts
    return Usage(model, prompt, completion, cached, cache_write_tokens=written)


def usage_from_mapping(obj: Any, model_hint: str = "") -> Usage | None:
    """:class:`Usage` from an already parsed response object, if it has one."""
    if not isinstance(obj, dict):
        return None
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    counts = _counts(u)
    if counts is None:
        return None
    model = obj.get("model")
    return _usage(model if isinstance(model, str) and model else model_hint, counts)


def usage_from_json(body: bytes, model_hint: str = "") -> Usage | None:
    """Usage of a non-streamed OpenAI or Anthropic JSON response body.

    ``model_hint`` (the request's model) is used when the body names none.
    Bodies without a ``"usage"`` key are not parsed at all; the others are
    scanned for their top-level ``usage`` and ``model`` members and only
    the usage object is read (see ``relay._fast.response_counts``).
    """
    if b'"usage"' not in body:
        return None
    return usage_in_json(body, model_hint)


def usage_in_json(body: bytes, model_hint: str = "") -> Usage | None:
    """:func:`usage_from_json` of a body already known to hold ``"usage"``."""
    found = response_counts(body)
    if found is None:
        return None
    if isinstance(found, ResponseCounts):
        # OpenAI chat, the usual answer: its counts read without a dict.
        return _read_usage(
            found.model or model_hint, found.prompt_tokens, found.completion_tokens, found.cached_tokens
        )
    u, model = found
    if u is None:
        return None
    counts = _counts(u)
    if counts is None:
        return None
    return _usage(model or model_hint, counts)


def provider_for_path(path: bytes | str) -> str:
    """``anthropic`` for the Messages API path, else ``openai``."""
    if isinstance(path, str):
        path = path.encode("latin-1", "replace")
    path = path.split(b"?", 1)[0].rstrip(b"/")
    return ANTHROPIC if path.endswith(b"/v1/messages") else OPENAI


class StreamUsage:
    """Usage of one streamed response, fed its raw SSE events in order.

    ``provider`` is ``"openai"``, ``"anthropic"`` or ``"auto"`` (decided by
    the first event that has data: Anthropic streams open with
    ``message_start``).
    """

    __slots__ = (
        "model",
        "_kind",
        "_counts",
        "_a_input",
        "_a_read",
        "_a_written",
        "_a_output",
        "_a_started",
        "_a_final",
        "_text",
        "_text_bytes",
        "_overflow_bytes",
        "_pending",
        "_pending_bytes",
        "usage_beside_text",
    )

    def __init__(self, model_hint: str = "", provider: str = AUTO) -> None:
        try:
            self._kind = _PROVIDERS[provider]
        except KeyError:
            raise ValueError(f"unknown provider {provider!r}") from None
        self.model = model_hint
        self._counts: _Counts | None = None  # OpenAI usage seen
        self._a_input = self._a_read = self._a_written = self._a_output = 0
        self._a_started = False  # Anthropic message_start seen
        self._a_final = False  # Anthropic message_delta usage seen
        self._text: list[bytes] = []
        self._text_bytes = 0
        self._overflow_bytes = 0
        # Events whose text is not extracted yet: most streams report usage,
        # so the text is usually never needed; it is pulled out in bulk when
        # an estimate needs it, or when this buffer passes _PENDING_LIMIT.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        # Set when an event carried usage *and* choices (some servers put it
        # on the last text chunk): a caller removing the usage it asked for
        # must take it out of that event; the caller resets it.
        self.usage_beside_text = False

    @property
    def has_usage(self) -> bool:
        """True once the stream delivered complete usage (no estimate)."""
        return self._counts is not None or (self._a_started and self._a_final)

    def on_event(self, raw: bytes) -> bool:
        """Account one raw event; True if it is OpenAI's usage-only chunk.

        The usage-only chunk (``"choices": []`` with a usage object) is the
        one to drop from the client's stream when relay itself asked for it.
        """
        if raw.endswith(_OPENAI_NULL_USAGE_TAIL) and self._kind != _ANTHROPIC:
            # The common OpenAI chunk once usage is on: text only, no usage.
            # Kept unparsed; its text is extracted only if an estimate needs it.
            self._kind = _OPENAI
            self._keep_text(raw)
            return False
        name, data = event_fields(raw)
        if not data or data == b"[DONE]":
            return False
        kind = self._kind
        if kind == _AUTO:
            kind = self._kind = (
                _ANTHROPIC
                if name == b"message_start" or data.startswith(b'{"type":"message_start"')
                else _OPENAI
            )
        if kind == _ANTHROPIC:
            self._anthropic(name, data)
            return False
        return self._openai(name, data)

    def on_text_chunks(self, span: bytes) -> bool:
        """Account a run of whole events that each end in OpenAI's
        ``,"usage":null}`` (text chunks once usage is on) in one step: what
        :meth:`on_event` does for each of them. False, and nothing done, in an
        Anthropic stream, where such events are read one by one."""
        if self._kind == _ANTHROPIC:
            return False
        self._kind = _OPENAI
        self._keep_text(span)
        return True

    def _keep_text(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > _PENDING_LIMIT:
            self._extract_pending()

    def _extract_pending(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_bytes = 0
        for frag in _TEXT_FIELD.findall(b"\n".join(pending)):
            if not frag:
                continue
            if self._text_bytes + len(frag) > _MAX_TEXT_BYTES:
                self._overflow_bytes += len(frag)
            else:
                self._text.append(frag)
                self._text_bytes += len(frag)

    def _openai(self, name: bytes | None, data: bytes) -> bool:
        if (
            b'"usage"' not in data
            or (b'"usage":null' in data and b'"usage":{' not in data and data.count(b'"usage"') == 1)
            or _USAGE_OBJECT.search(data) is None
        ):
            # Chat chunks have no event name; the Responses API names its
            # events and repeats the whole text in the *.done ones.
            if name is None or name.endswith(b".delta"):
                self._keep_text(data)
            return False
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(obj, dict):
            return False
        holder = obj
        if not isinstance(obj.get("usage"), dict):
            response = obj.get("response")  # Responses API: response.completed
            if isinstance(response, dict):
                holder = response
        u = holder.get("usage")
        counts = _counts(u) if isinstance(u, dict) else None
        if counts is None:
            return False
        self._counts = counts
        model = holder.get("model")
        if isinstance(model, str) and model:
            self.model = model
        choices = obj.get("choices")
        if choices:
            self._keep_text(data)  # some servers put usage on the last text chunk
            self.usage_beside_text = True
        return choices == []

    def _anthropic(self, name: bytes | None, data: bytes) -> None:
        etype = name
        if etype is None and data.startswith(b'{"type":"'):
            etype = data[9 : data.find(b'"', 9)]
        if etype == b"content_block_delta":
            self._keep_text(data)
            return
        if etype != b"message_start" and etype != b"message_delta":
            return
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(obj, dict):
            return
        if etype == b"message_start":
            message = obj.get("message")
            if not isinstance(message, dict):
                return
            model = message.get("model")
            if isinstance(model, str) and model:
                self.model = model
            u = message.get("usage")
            # Only a message_start with usage gives the prompt side; without
            # it the prompt is estimated from the request like any stream
            # without usage (else it would be counted as 0 tokens).
            self._a_started = isinstance(u, dict)
        else:
            u = obj.get("usage")
            if isinstance(u, dict):
                self._a_final = True
        if not isinstance(u, dict):
            return
        # message_delta counts are cumulative; newer API versions repeat the
        # input counters there too, so take whichever the event carries.
        if "input_tokens" in u:
            self._a_input = _n(u["input_tokens"])
        if "cache_read_input_tokens" in u:
            self._a_read = _n(u["cache_read_input_tokens"])
        if "cache_creation_input_tokens" in u:
            self._a_written = _n(u["cache_creation_input_tokens"])
        if "output_tokens" in u:
            self._a_output = _n(u["output_tokens"])

    def streamed_text(self) -> str:
        """The generated text seen so far (decoded from the JSON fragments)."""
        self._extract_pending()
        if not self._text:
            return ""
        joined = b'"' + b"".join(self._text) + b'"'
        try:
            return json.loads(joined)
        except (ValueError, UnicodeDecodeError):
            return joined[1:-1].decode("utf-8", "replace")

    def result(
        self,
        estimator: TokenCounter | None = None,
        request_text: str | Callable[[], str] = "",
    ) -> Usage:
        """Usage of the stream so far; estimated where the upstream gave none.

        ``request_text`` (or a callable producing it, so the request body is
        only walked when needed) is counted as the prompt when the upstream
        reported no prompt tokens; the streamed text as the completion when
        it reported no completion tokens (stream cut short, or none sent).
        Without an estimator, characters / 4.
        """
        if self._counts is not None:
            return _usage(self.model, self._counts)
        if self._a_started and self._a_final:
            prompt = self._a_input + self._a_read + self._a_written
            return Usage(
                self.model, prompt, self._a_output, self._a_read,
                cache_write_tokens=self._a_written,
            )
        count = estimator.count if estimator is not None else _heuristic
        completion = count(self.streamed_text(), self.model)
        if self._overflow_bytes:
            completion += (self._overflow_bytes + 3) // 4
        if self._a_started:  # Anthropic stream cut before message_delta
            prompt = self._a_input + self._a_read + self._a_written
            return Usage(
                self.model, prompt, max(completion, self._a_output), self._a_read, True,
                cache_write_tokens=self._a_written,
            )
        text = request_text() if callable(request_text) else request_text
        return Usage(self.model, count(text, self.model), completion, 0, True)


def _heuristic(text: str, model: str = "") -> int:
    return (len(text) + 3) // 4


_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'


def inject_include_usage(
    body: bytes, parsed: Any = None, *, facts: RequestFacts | None = None
) -> bytes | None:
    """Body asking an OpenAI streaming chat request for usage, or None.

    Returns a new body when ``body`` is a JSON object with ``"stream":
    true`` and ``"messages"`` whose ``stream_options.include_usage`` is not
    already true; the caller then drops the usage-only chunk (see
    :meth:`StreamUsage.on_event`) so the client gets the stream it asked
    for. An explicit ``include_usage: false`` is overridden too, for the
    same reason: the client still sees no usage chunk. Call it only for
    OpenAI-style ``/chat/completions`` requests: the Anthropic API rejects
    unknown fields. ``parsed`` may pass the already decoded body, ``facts``
    its :class:`~relay._fast.RequestFacts` (else they are scanned for).

    When the body has no ``stream_options`` at all, the field is spliced in
    after the opening brace, leaving every other byte as the client sent it:
    then, as when no usage is needed, the body is never decoded.
    """
    if parsed is None:
        if facts is None:
            if b'"stream"' not in body or b'"messages"' not in body:
                return None
            facts = request_facts(body)
        if facts.stream is not True or not facts.has_messages:
            return None
        options_state = facts.stream_options
        if options_state == STREAM_OPTIONS_ABSENT and facts.insert_at > 0:
            cut = facts.insert_at
            return body[:cut] + _INCLUDE_USAGE + body[cut:]
        if options_state != STREAM_OPTIONS_WITHOUT_USAGE and options_state != STREAM_OPTIONS_ABSENT:
            return None  # usage already asked for, or stream_options is no object
        # stream_options to rewrite (null, or no include_usage: true): rare.
        parsed = json.loads(body)
    if not isinstance(parsed, dict) or parsed.get("stream") is not True:
        return None
    if "messages" not in parsed:
        return None
    options = parsed.get("stream_options")
    if "stream_options" not in parsed:
        stripped = body.lstrip()
        if stripped.startswith(b"{"):
            cut = len(body) - len(stripped) + 1
            return body[:cut] + _INCLUDE_USAGE + body[cut:]
        options = {}
    elif options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage") is True:
        return None
    new = dict(parsed)
    new["stream_options"] = {**options, "include_usage": True}
    return json.dumps(new, ensure_ascii=False, separators=(",", ":")).encode()


def response_text_for_estimate(body: bytes, parsed: Any = None) -> str:
    """The generated text of a non-streamed response that reported no usage.

    OpenAI chat (``choices[].message`` content, refusal, tool-call
    arguments), completions (``choices[].text``), Anthropic (``content[]``
    text and tool inputs) and the Responses API (``output[].content[]``).
    """
    if parsed is None:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return ""
    if not isinstance(parsed, dict):
        return ""
    out: list[str] = []
    choices = parsed.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            _content_text(choice.get("text"), out)
            message = choice.get("message")
            if not isinstance(message, dict):
                continue
            _content_text(message.get("content"), out)
            _content_text(message.get("refusal"), out)
            calls = message.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        out.append(fn["arguments"])
    _content_text(parsed.get("content"), out)  # Anthropic
    output = parsed.get("output")  # Responses API
    if isinstance(output, list):
        for item in output:
            if isinstance(item, dict):
                _content_text(item.get("content"), out)
                if isinstance(item.get("arguments"), str):
                    out.append(item["arguments"])
    return "\n".join(out)


def estimate_usage(
    model: str,
    estimator: TokenCounter | None,
    request_text: str,
    response_text: str,
) -> Usage:
    """An estimated :class:`Usage` (for a response that reported none)."""
    count = estimator.count if estimator is not None else _heuristic
    return Usage(model, count(request_text, model), count(response_text, model), 0, True)


def _content_text(content: Any, out: list[str]) -> None:
    """Text of a message content: a string or a list of typed parts."""
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    out.append(text)
                elif "content" in part:  # e.g. Anthropic tool_result blocks
                    _content_text(part["content"], out)
                inp = part.get("input")  # Anthropic tool_use blocks
                if isinstance(inp, dict):
                    out.append(json.dumps(inp, ensure_ascii=False))


def request_text_for_estimate(body: bytes, parsed: Any = None) -> str:
    """The text of a request that the model reads as prompt tokens.

    Collects message contents (plain strings and text parts), roles and
    tool-call arguments, the Anthropic ``system`` prompt, ``prompt`` of
    the completions API, ``input``/``instructions`` of the Responses and
    embeddings APIs and the tool definitions. Images and other binary
    parts are not counted. The pieces are joined with newlines, which
    roughly stands for the per-message framing tokens.
    """
    if parsed is None:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body.decode("utf-8", "replace") if body else ""
    if not isinstance(parsed, dict):
        return ""
    out: list[str] = []
    _content_text(parsed.get("system"), out)
    _content_text(parsed.get("instructions"), out)
    messages = parsed.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            role = msg.get("role")
            if isinstance(role, str):
                out.append(role)
            _content_text(msg.get("content"), out)
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                        out.append(fn["arguments"])
    for key in ("prompt", "input"):
        value = parsed.get(key)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _content_text(item.get("content"), out)
                else:
                    _content_text(item, out)
        else:
            _content_text(value, out)
    tools = parsed.get("tools")
    if isinstance(tools, list) and tools:
        out.append(json.dumps(tools, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(out)

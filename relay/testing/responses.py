"""Canned payloads shaped like the OpenAI and Anthropic HTTP APIs.

Everything here is pure: a request (method, path, body, options) goes in,
a :class:`Reply` comes out. The fake upstream memoizes replies, so this
module may be as slow as clarity wants; it runs once per distinct request.

Content is deterministic so tests can predict it:

* ``W`` = number of whitespace-separated words in the request's prompt
  (chat ``messages`` contents, Anthropic ``system`` + ``messages``,
  completions ``prompt``, embeddings ``input``).
* The reply text is ``"Hello from fake upstream W"`` (5 words). With
  ``events=N`` and N > 5 it grows to N words (``w6 w7 ...``); with N = 0
  it is empty. ``max_tokens`` (or ``max_completion_tokens``) below the word
  count cuts it, and the finish reason becomes ``length`` / ``max_tokens``.
* ``completion_tokens`` / ``output_tokens`` = words in the reply.
* Cached tokens ``C`` come on top of the prompt: OpenAI
  ``prompt_tokens = W + C`` with ``prompt_tokens_details.cached_tokens = C``
  (Responses API: ``input_tokens`` / ``input_tokens_details``);
  Anthropic ``input_tokens = W`` with ``cache_read_input_tokens = C``.
* Cache writes ``K`` (Anthropic only) also come on top:
  ``cache_creation_input_tokens = K`` (and the ``cache_creation`` breakdown,
  all of it 5-minute writes).
* Reasoning tokens ``R`` come on top of the reply's words in the output
  count, as with OpenAI's reasoning models: ``completion_tokens`` /
  ``output_tokens = words + R`` with ``..._details.reasoning_tokens = R``.
* ``usage_on_last_chunk``: a chat stream that asked for usage gets it on the
  last chunk that carries ``choices`` (as some compatible servers send it)
  instead of a separate usage-only chunk.
* Ids derive from a hash of the request body, so identical requests get
  byte-identical responses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

JSON_TYPE = "application/json"
SSE_TYPE = "text/event-stream; charset=utf-8"

BASE_WORDS = ("Hello", "from", "fake", "upstream")
DEFAULT_EVENTS = 5
DEFAULT_EMBEDDING_DIMENSIONS = 8

MODELS = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4",
    "text-embedding-3-small",
    "claude-sonnet-4-5",
    "claude-3-5-haiku-latest",
)


@dataclass(frozen=True, slots=True)
class ContentOptions:
    """The fault headers that change what is said (not how it is sent)."""

    events: int = DEFAULT_EVENTS
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    usage_on_last_chunk: bool = False
    usage: bool = True
    status: int | None = None
    body: bytes | None = None


@dataclass(slots=True)
class Reply:
    """A response before framing: a whole body, or SSE events sent chunked."""

    status: int
    content_type: str
    body: bytes = b""
    events: tuple[bytes, ...] | None = None


class BadRequest(Exception):
    """The request cannot be answered; becomes a 400 in the API's error shape."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


# ---------------------------------------------------------------- errors

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", None),
    413: ("invalid_request_error", "request_too_large"),
    429: ("requests", "rate_limit_exceeded"),
}

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_reply(status: int, message: str, *, anthropic: bool = False) -> Reply:
    """An error body in the shape the matching SDK parses."""
    if anthropic:
        etype = _ANTHROPIC_ERRORS.get(status, "invalid_request_error" if status < 500 else "api_error")
        body = {"type": "error", "error": {"type": etype, "message": message}}
    else:
        fallback = ("invalid_request_error" if status < 500 else "server_error", None)
        etype, code = _OPENAI_ERRORS.get(status, fallback)
        body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
    return Reply(status, JSON_TYPE, _dumps(body))


# ---------------------------------------------------------------- counting


def _words(value: Any) -> int:
    """Words in a string, a list of strings/token ids, or content parts."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1  # a token id in a pre-tokenized prompt
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        text = value.get("text")
        if isinstance(text, str):
            return len(text.split())
        return _words(value.get("content")) if "content" in value else 0
    return 0


def _message_words(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(_words(m.get("content")) for m in messages if isinstance(m, dict))


def _reply_words(prompt_words: int, events: int, max_tokens: Any) -> tuple[list[str], bool]:
    """The reply's words and whether max_tokens cut it."""
    words = [*BASE_WORDS, str(prompt_words)] if events else []
    words.extend(f"w{i}" for i in range(len(words) + 1, events + 1))
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and 0 <= max_tokens < len(words):
        return words[:max_tokens], True
    return words, False


def _split(words: list[str], parts: int) -> list[str]:
    """Split the words into `parts` pieces whose concatenation is the text."""
    parts = min(parts, len(words))
    if parts <= 0:
        return []
    size, extra = divmod(len(words), parts)
    pieces, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        piece = " ".join(words[start:end])
        pieces.append(piece if i == 0 else " " + piece)
        start = end
    return pieces


def _ident(body: bytes) -> str:
    return hashlib.blake2b(body, digest_size=12).hexdigest()


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _named_sse(name: str, obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# ---------------------------------------------------------------- OpenAI


def _openai_usage(prompt: int, completion: int, cached: int, reasoning: int = 0) -> dict[str, Any]:
    total_prompt = prompt + cached
    completion += reasoning
    return {
        "prompt_tokens": total_prompt,
        "completion_tokens": completion,
        "total_tokens": total_prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _include_usage(req: dict[str, Any]) -> bool:
    opts = req.get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def chat_completion(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    model = req["model"]
    prompt = _message_words(req.get("messages"))
    max_tokens = req.get("max_completion_tokens", req.get("max_tokens"))
    words, cut = _reply_words(prompt, opts.events, max_tokens)
    finish = "length" if cut else "stop"
    usage = _openai_usage(prompt, len(words), opts.cached_tokens, opts.reasoning_tokens)
    ident = "chatcmpl-" + _ident(body)
    common = {"id": ident, "object": "chat.completion.chunk", "created": created,
              "model": model, "service_tier": "default", "system_fingerprint": "fp_fake"}
    if not req.get("stream"):
        doc: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words),
                            "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        if opts.usage:
            doc["usage"] = usage
        return Reply(200, JSON_TYPE, _dumps(doc))

    # Like OpenAI: with include_usage every chunk carries "usage": null and
    # a last usage-only chunk (choices == []) precedes [DONE].
    with_usage = _include_usage(req) and opts.usage

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        doc = {**common, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish_reason}]}
        if with_usage:
            doc["usage"] = None
        return _sse(doc)

    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events.extend(chunk({"content": piece}, None) for piece in _split(words, opts.events))
    if with_usage and opts.usage_on_last_chunk:
        # The final chunk carries both its choice and the usage.
        events.append(_sse({**common, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                                   "finish_reason": finish}], "usage": usage}))
    else:
        events.append(chunk({}, finish))
        if with_usage:
            events.append(_sse({**common, "choices": [], "usage": usage}))
    events.append(SSE_DONE)
    return Reply(200, SSE_TYPE, events=tuple(events))


def text_completion(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    model = req["model"]
    prompt = _words(req.get("prompt"))
    words, cut = _reply_words(prompt, opts.events, req.get("max_tokens", 16))
    finish = "length" if cut else "stop"
    usage = _openai_usage(prompt, len(words), opts.cached_tokens)
    del usage["completion_tokens_details"]
    ident = "cmpl-" + _ident(body)
    common = {"id": ident, "object": "text_completion", "created": created, "model": model,
              "system_fingerprint": "fp_fake"}
    if not req.get("stream"):
        doc: dict[str, Any] = {**common, "choices": [
            {"text": " ".join(words), "index": 0, "logprobs": None, "finish_reason": finish}]}
        if opts.usage:
            doc["usage"] = usage
        return Reply(200, JSON_TYPE, _dumps(doc))
    with_usage = _include_usage(req) and opts.usage
    pieces = _split(words, opts.events) or [""]
    events = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        doc = {**common, "choices": [{"text": piece, "index": 0, "logprobs": None,
                                      "finish_reason": finish if last else None}]}
        if with_usage:
            doc["usage"] = None
        events.append(_sse(doc))
    if with_usage:
        events.append(_sse({**common, "choices": [], "usage": usage}))
    events.append(SSE_DONE)
    return Reply(200, SSE_TYPE, events=tuple(events))


def embeddings(req: dict[str, Any], body: bytes, opts: ContentOptions) -> Reply:
    model = req["model"]
    raw = req.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
        inputs: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        inputs = raw
    else:
        raise BadRequest("'input' must be a non-empty string or array")
    dims = req.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
    if not isinstance(dims, int) or isinstance(dims, bool) or not 1 <= dims <= 8192:
        raise BadRequest("'dimensions' must be an integer between 1 and 8192")
    as_base64 = req.get("encoding_format") == "base64"
    prompt = 0
    data = []
    for index, item in enumerate(inputs):
        words = _words(item)
        prompt += words
        # Dyadic fractions survive the float32 round trip of base64 exactly.
        vector = [((index * 7 + words + j) % 17 - 8) / 16 for j in range(dims)]
        embedding: Any = vector
        if as_base64:
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    doc: dict[str, Any] = {"object": "list", "data": data, "model": model}
    if opts.usage:
        doc["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return Reply(200, JSON_TYPE, _dumps(doc))


def openai_models(created: int, model_id: str | None = None) -> Reply:
    def entry(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "fake-upstream"}

    if model_id is not None:
        return Reply(200, JSON_TYPE, _dumps(entry(model_id)))
    return Reply(200, JSON_TYPE, _dumps({"object": "list", "data": [entry(m) for m in MODELS]}))


def anthropic_models(model_id: str | None = None) -> Reply:
    def entry(name: str) -> dict[str, Any]:
        return {"type": "model", "id": name, "display_name": name,
                "created_at": "2025-01-01T00:00:00Z"}

    if model_id is not None:
        return Reply(200, JSON_TYPE, _dumps(entry(model_id)))
    names = [m for m in MODELS if m.startswith("claude")]
    return Reply(200, JSON_TYPE, _dumps({"data": [entry(m) for m in names], "has_more": False,
                                         "first_id": names[0], "last_id": names[-1]}))


# ---------------------------------------------------------------- Responses API


def _responses_prompt(req: dict[str, Any]) -> int:
    raw = req.get("input")
    words = _words(req.get("instructions"))
    if isinstance(raw, list):
        return words + sum(_words(item.get("content")) if isinstance(item, dict) else _words(item)
                           for item in raw)
    return words + _words(raw)


def responses_api(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    """``POST /v1/responses``: the Responses API, JSON or its named-event stream."""
    model = req["model"]
    prompt = _responses_prompt(req)
    words, cut = _reply_words(prompt, opts.events, req.get("max_output_tokens"))
    text = " ".join(words)
    ident = "resp_" + _ident(body)
    item_id = "msg_" + _ident(body + b"item")
    output_tokens = len(words) + opts.reasoning_tokens
    usage = {
        "input_tokens": prompt + opts.cached_tokens,
        "input_tokens_details": {"cached_tokens": opts.cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": opts.reasoning_tokens},
        "total_tokens": prompt + opts.cached_tokens + output_tokens,
    }
    status = "incomplete" if cut else "completed"

    def response(state: str, output: list[Any], with_usage: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": ident, "object": "response", "created_at": created, "status": state,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut and state != "in_progress"
            else None,
            "instructions": req.get("instructions"), "max_output_tokens": req.get("max_output_tokens"),
            "model": model, "output": output, "parallel_tool_calls": True,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": True, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": None, "user": None, "metadata": {},
        }
        if with_usage and opts.usage:
            doc["usage"] = usage
        return doc

    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item = {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [part]}
    if not req.get("stream"):
        return Reply(200, JSON_TYPE, _dumps(response(status, [item], True)))

    seq = iter(range(1_000_000))

    def event(name: str, **fields: Any) -> bytes:
        return _named_sse(name, {"type": name, "sequence_number": next(seq), **fields})

    events = [
        event("response.created", response=response("in_progress", [], False)),
        event("response.in_progress", response=response("in_progress", [], False)),
        event("response.output_item.added", output_index=0,
              item={**item, "status": "in_progress", "content": []}),
        event("response.content_part.added", item_id=item_id, output_index=0, content_index=0,
              part={**part, "text": ""}),
    ]
    events.extend(
        event("response.output_text.delta", item_id=item_id, output_index=0, content_index=0,
              delta=piece, logprobs=[])
        for piece in _split(words, opts.events)
    )
    events.append(event("response.output_text.done", item_id=item_id, output_index=0,
                        content_index=0, text=text, logprobs=[]))
    events.append(event("response.content_part.done", item_id=item_id, output_index=0,
                        content_index=0, part=part))
    events.append(event("response.output_item.done", output_index=0, item=item))
    final = "response.incomplete" if cut else "response.completed"
    events.append(event(final, response=response(status, [item], True)))
    return Reply(200, SSE_TYPE, events=tuple(events))


# ---------------------------------------------------------------- Anthropic


def _anthropic_prompt(req: dict[str, Any]) -> int:
    return _words(req.get("system")) + _message_words(req.get("messages"))


def count_tokens(req: dict[str, Any]) -> Reply:
    return Reply(200, JSON_TYPE, _dumps({"input_tokens": _anthropic_prompt(req)}))


def anthropic_message(req: dict[str, Any], body: bytes, opts: ContentOptions) -> Reply:
    model = req["model"]
    prompt = _anthropic_prompt(req)
    words, cut = _reply_words(prompt, opts.events, req.get("max_tokens"))
    stop = "max_tokens" if cut else "end_turn"
    ident = "msg_" + _ident(body)
    written = opts.cache_write_tokens
    usage = {"input_tokens": prompt, "cache_creation_input_tokens": written,
             "cache_read_input_tokens": opts.cached_tokens,
             "cache_creation": {"ephemeral_5m_input_tokens": written,
                                "ephemeral_1h_input_tokens": 0},
             "output_tokens": len(words), "service_tier": "standard"}
    message: dict[str, Any] = {"id": ident, "type": "message", "role": "assistant",
                               "model": model}
    if not req.get("stream"):
        message.update(content=[{"type": "text", "text": " ".join(words)}],
                       stop_reason=stop, stop_sequence=None)
        if opts.usage:
            message["usage"] = usage
        return Reply(200, JSON_TYPE, _dumps(message))

    message.update(content=[], stop_reason=None, stop_sequence=None)
    if opts.usage:
        # Like the real API: message_start holds the input side and a
        # provisional output count; message_delta holds the final output count.
        message["usage"] = {**usage, "output_tokens": 1}
    events = [
        _named_sse("message_start", {"type": "message_start", "message": message}),
        _named_sse("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
        _named_sse("ping", {"type": "ping"}),
    ]
    events.extend(
        _named_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": piece}})
        for piece in _split(words, opts.events)
    )
    events.append(_named_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    delta: dict[str, Any] = {"type": "message_delta",
                             "delta": {"stop_reason": stop, "stop_sequence": None}}
    if opts.usage:
        delta["usage"] = {"output_tokens": len(words)}
    events.append(_named_sse("message_delta", delta))
    events.append(_named_sse("message_stop", {"type": "message_stop"}))
    return Reply(200, SSE_TYPE, events=tuple(events))


# ---------------------------------------------------------------- routing


def _is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def build_reply(method: str, path: str, body: bytes, opts: ContentOptions, *,
                anthropic_client: bool, created: int) -> Reply:
    """Answer one request. `path` excludes the query string."""
    anthropic = _is_anthropic_path(path)
    if opts.status is not None or opts.body is not None:
        status = 200 if opts.status is None else opts.status
        if opts.body is not None:
            return Reply(status, JSON_TYPE, opts.body)
        if status < 400:
            return Reply(status, JSON_TYPE, b"{}")
        return error_reply(status, f"fake upstream error (status {status})", anthropic=anthropic)

    if method == "GET":
        if path == "/v1/models" or path.startswith("/v1/models/"):
            model_id = None
            if path.startswith("/v1/models/"):
                model_id = path[len("/v1/models/"):] or None
            if anthropic_client:
                return anthropic_models(model_id)
            return openai_models(created, model_id)
    elif method == "POST":
        handler = _POST_ROUTES.get(path)
        if handler is not None:
            try:
                req = json.loads(body)
            except ValueError:
                return error_reply(400, "We could not parse the JSON body of your request.",
                                   anthropic=anthropic)
            if not isinstance(req, dict):
                return error_reply(400, "The request body must be a JSON object.",
                                   anthropic=anthropic)
            if path != "/v1/messages/count_tokens" and not isinstance(req.get("model"), str):
                return error_reply(400, "you must provide a model parameter",
                                   anthropic=anthropic)
            try:
                return handler(req, body, opts, created)
            except BadRequest as exc:
                return error_reply(400, str(exc), anthropic=anthropic)
    known = path in _POST_ROUTES or path == "/v1/models" or path.startswith("/v1/models/")
    if known:
        return error_reply(405, f"Method {method} not allowed on {path}", anthropic=anthropic)
    return error_reply(404, f"Invalid URL ({method} {path})", anthropic=anthropic)


def _embeddings(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    return embeddings(req, body, opts)


def _messages(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    return anthropic_message(req, body, opts)


def _count_tokens(req: dict[str, Any], body: bytes, opts: ContentOptions, created: int) -> Reply:
    return count_tokens(req)


_POST_ROUTES: dict[str, Any] = {
    "/v1/chat/completions": chat_completion,
    "/v1/completions": text_completion,
    "/v1/responses": responses_api,
    "/v1/embeddings": _embeddings,
    "/v1/messages": _messages,
    "/v1/messages/count_tokens": _count_tokens,
}

"""The two twins of :class:`Request` behave the same.

``relay.http._request_py`` is the source and ``relay.http._request_c`` the
same source compiled as a ``cdef class`` (``_request_c.pxd``). Every stage
reads the request's fields and asks it for the few facts worked out once
(the credential, the varying-header key, the JSON facts): both twins must
give the same answers for any head and body, and keep what a stage sets.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.http import _request_py
from relay.http import request as request_facade
from tests.support import compiled_twin_or_skip


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    return compiled_twin_or_skip("relay.http._request_c")


def _made(module: ModuleType, target: bytes, body: bytes) -> Any:
    return module.Request(b"POST", target, [(b"Host", b"x")], body, True, 1, "10.0.0.1", 1733234567.123456)


def _answers(req: Any) -> tuple[Any, ...]:
    facts = req.facts()
    return (
        req.method, req.target, req.path, req.headers, req.body, req.keep_alive,
        req.http_minor, req.client_ip, req.started, req.credential, req.varying_key(),
        req.model(), facts.stream, facts.model, req.json(),
    )


def test_the_facade_takes_the_compiled_twin_when_it_is_built(compiled: ModuleType) -> None:
    assert request_facade.Request is compiled.Request
    assert request_facade.IMPLEMENTATION == "compiled"
    assert _request_py.Request is not compiled.Request


_credential_values = st.one_of(
    st.none(),
    st.sampled_from([b"Bearer sk-1", b"bearer  sk-2 ", b"BEARER ", b"Basic abc", b"sk-raw", b""]),
    st.binary(max_size=24),
)


@settings(max_examples=300, deadline=None)
@given(
    target=st.sampled_from([b"/v1/chat/completions", b"/v1/messages?beta=true", b"/?", b"/a?b?c"]),
    body=st.one_of(
        st.sampled_from([
            b"", b"{}", b"[]", b"null", b'{"model":"gpt-4o","stream":true}',
            b'{"model": 5, "stream": false}', b'{"stream":"yes"', b"\xff\xfe",
        ]),
        st.binary(max_size=40),
    ),
    authorization=_credential_values,
    api_key=_credential_values,
    varying=st.one_of(st.none(), st.lists(st.binary(min_size=1, max_size=12), max_size=3)),
)
def test_both_twins_give_the_same_answers(
    compiled: ModuleType, target: bytes, body: bytes, authorization: bytes | None,
    api_key: bytes | None, varying: list[bytes] | None,
) -> None:
    results = []
    for module in (_request_py, compiled):
        req = _made(module, target, body)
        req.authorization = authorization
        req.api_key = api_key
        req.varying = None if varying is None else list(varying)
        results.append(_answers(req))
    assert results[0] == results[1]


@pytest.mark.parametrize("twin", ["pure", "compiled"])
def test_what_a_stage_sets_is_kept_and_a_new_body_is_read_again(
    twin: str, request: pytest.FixtureRequest
) -> None:
    module = _request_py if twin == "pure" else request.getfixturevalue("compiled")
    req = _made(module, b"/v1/chat/completions", b'{"model":"a"}')
    assert req.model() == "a" and req.json() == {"model": "a"}
    req.replace_body(b'{"model":"b","stream":true}')
    assert req.body == b'{"model":"b","stream":true}'
    assert req.model() == "b" and req.facts().stream is True and req.json()["model"] == "b"
    req.forward_headers = b"X-A: 1\r\n"
    req.credential_headers = b""
    req.relay_key = ticket = object()
    req.on_finished = finished = lambda: None
    assert (req.forward_headers, req.credential_headers) == (b"X-A: 1\r\n", b"")
    assert req.relay_key is ticket and req.on_finished is finished
    # The credential is worked out once: a later header change is not seen.
    req.authorization = b"Bearer first"
    assert req.credential == b"first"
    req.authorization = b"Bearer second"
    assert req.credential == b"first"

"""The one place that chooses between compiled and pure twins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import relay._fast as fast
from tests.support import EXPECT_COMPILED

ROOT = Path(fast.__file__).resolve().parents[2]

PROBE = """
import json, sys
{prelude}
import relay._fast as fast
print(json.dumps({{
    "implementation": fast.IMPLEMENTATION,
    "loaded": fast.EXTENSIONS_LOADED,
    "compiled": fast.compiled is not None,
    "error": fast.COMPILED_IMPORT_ERROR,
    "imported": sorted(m for m in sys.modules if m.startswith("relay._fast._") and m.endswith("_c")),
    "bucket_module": fast.BucketTable.__module__,
}}))
"""


def probe(env_value: str | None, prelude: str = "", script: str = PROBE) -> dict:
    """Runs *script* (it imports relay._fast) in a fresh interpreter with
    RELAY_NO_EXTENSIONS set so; its JSON output."""
    env = {k: v for k, v in os.environ.items() if k != "RELAY_NO_EXTENSIONS"}
    if env_value is not None:
        env["RELAY_NO_EXTENSIONS"] = env_value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, "-c", script.format(prelude=prelude)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def test_compiled_extensions_loaded_when_expected() -> None:
    """CI sets RELAY_EXPECT_EXTENSIONS=1 after building: a broken build fails here."""
    if not EXPECT_COMPILED and fast.compiled is None:
        pytest.skip(
            f"compiled relay._fast not loaded ({fast.COMPILED_IMPORT_ERROR}); "
            "set RELAY_EXPECT_EXTENSIONS=1 where the build must have produced it"
        )
    assert fast.EXTENSIONS_LOADED, f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}"
    assert fast.IMPLEMENTATION == "compiled"
    assert fast.compiled is not None
    assert fast.BucketTable is fast.compiled.BucketTable
    assert fast.cache_key is fast.compiled.cache_key
    # The JSON facts scan is a compiled module of its own: it must load too.
    assert fast.request_facts is fast.compiled.request_facts
    assert fast.response_usage is fast.compiled.response_usage
    assert fast.request_facts.__module__ == "relay._fast._jsonscan_c"
    # So are the metric children.
    assert fast.CounterChild is fast.compiled.CounterChild
    assert fast.HistogramChild.__module__ == "relay._fast._meters_c"


@pytest.mark.parametrize(
    ("value", "disabled"),
    [(None, False), ("", False), ("0", False), ("1", True), ("yes", True), ("false", True)],
)
def test_no_extensions_flag(value: str | None, disabled: bool) -> None:
    assert fast.extensions_disabled(value) is disabled


def test_flag_forces_pure_without_importing_compiled() -> None:
    result = probe("1")
    assert result["implementation"] == "pure"
    assert result["loaded"] is False
    assert result["compiled"] is False
    assert "RELAY_NO_EXTENSIONS" in result["error"]
    assert result["imported"] == []
    assert result["bucket_module"] == "relay._fast._bucket_py"


@pytest.mark.parametrize("value", [None, "0", ""])
def test_compiled_chosen_when_built(value: str | None) -> None:
    if fast.compiled is None:
        reason = f"compiled relay._fast not built: {fast.COMPILED_IMPORT_ERROR}"
        if EXPECT_COMPILED:
            pytest.fail(reason)
        pytest.skip(reason)
    result = probe(value)
    assert result["implementation"] == "compiled"
    assert result["loaded"] is True
    assert result["error"] is None
    assert result["bucket_module"] == "relay._fast._bucket_c"
    assert result["imported"] == sorted(
        f"relay._fast.{name}"
        for name in (
            "_breaker_c", "_bucket_c", "_cachekey_c", "_heads_c", "_jsonscan_c", "_lru_c",
            "_meters_c", "_usagerow_c",
        )
    )


@pytest.mark.parametrize(
    "module", ["_breaker_c", "_heads_c", "_jsonscan_c", "_lru_c", "_meters_c", "_usagerow_c"]
)
def test_any_missing_compiled_module_falls_back_to_pure(module: str) -> None:
    # None in sys.modules makes that import fail, as a missing build would.
    result = probe(None, prelude=f"sys.modules['relay._fast.{module}'] = None")
    assert result["implementation"] == "pure"
    assert result["loaded"] is False
    assert module in result["error"]
    assert result["bucket_module"] == "relay._fast._bucket_py"


def test_a_python_file_does_not_pass_for_an_extension() -> None:
    module = types.ModuleType("relay._fast._bucket_c")
    module.__file__ = str(ROOT / "relay" / "_fast" / "_bucket_c.py")
    assert not fast._is_extension(module)
    module.__file__ = str(ROOT / "relay" / "_fast" / f"_bucket_c{EXTENSION_SUFFIXES[0]}")
    assert fast._is_extension(module)
    del module.__file__
    assert not fast._is_extension(module)


def test_chosen_names_come_from_one_implementation() -> None:
    chosen = fast.compiled if fast.EXTENSIONS_LOADED else fast.pure
    assert chosen is not None and chosen.name == fast.IMPLEMENTATION
    assert fast.cache_key is chosen.cache_key
    assert fast.credential_hash is chosen.credential_hash
    assert fast.TokenBucket is chosen.TokenBucket
    assert fast.BucketTable is chosen.BucketTable
    assert fast.LruTable is chosen.LruTable
    assert fast.CircuitBreaker is chosen.CircuitBreaker
    assert fast.request_facts is chosen.request_facts
    assert fast.response_usage is chosen.response_usage
    assert fast.CounterChild is chosen.CounterChild
    assert fast.GaugeChild is chosen.GaugeChild
    assert fast.HistogramChild is chosen.HistogramChild
    assert fast.request_head is chosen.request_head
    assert fast.response_head is chosen.response_head


def test_twins_expose_the_same_public_api() -> None:
    if fast.compiled is None:
        pytest.skip(f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}")
    for name in (
        "TokenBucket", "BucketTable", "CircuitBreaker", "CounterChild", "GaugeChild", "HistogramChild",
        "LruTable",
    ):  # fmt: skip
        pure_api = {a for a in dir(getattr(fast.pure, name)) if not a.startswith("_")}
        compiled_api = {a for a in dir(getattr(fast.compiled, name)) if not a.startswith("_")}
        assert pure_api == compiled_api, name


# -- twins kept beside what they serve: the client and upstream connections --

PROTOCOL_PROBE = """
import json, sys
{prelude}
import relay.http.protocol as protocol
import relay.upstream.protocol as upstream
print(json.dumps({{
    "implementation": protocol.IMPLEMENTATION,
    "connection_module": protocol.ClientConnection.__module__,
    "limits_module": protocol.ConnectionLimits.__module__,
    "compiled_imported": "relay.http._client_c" in sys.modules,
    "pure_imported": "relay.http._client_py" in sys.modules,
    "upstream_implementation": upstream.IMPLEMENTATION,
    "upstream_module": upstream.UpstreamConnection.__module__,
    "upstream_pure_imported": "relay.upstream._conn_py" in sys.modules,
    "upstream_compiled_imported": "relay.upstream._conn_c" in sys.modules,
}}))
"""


def protocol_probe(env_value: str | None, prelude: str = "") -> dict:
    return probe(env_value, prelude, PROTOCOL_PROBE)


def test_flag_forces_the_pure_connections_without_importing_the_compiled() -> None:
    result = protocol_probe("1")
    assert result == {
        "implementation": "pure",
        "connection_module": "relay.http._client_py",
        "limits_module": "relay.http._client_py",
        "compiled_imported": False,
        "pure_imported": True,
        "upstream_implementation": "pure",
        "upstream_module": "relay.upstream._conn_py",
        "upstream_pure_imported": True,
        "upstream_compiled_imported": False,
    }


def test_compiled_connections_chosen_when_built() -> None:
    if fast.compiled is None:
        reason = f"compiled relay._fast not built: {fast.COMPILED_IMPORT_ERROR}"
        if EXPECT_COMPILED:
            pytest.fail(reason)
        pytest.skip(reason)
    result = protocol_probe(None)
    assert result == {
        "implementation": "compiled",
        "connection_module": "relay.http._client_c",
        "limits_module": "relay.http._client_c",
        "compiled_imported": True,
        "pure_imported": False,  # only the chosen twin is imported
        "upstream_implementation": "compiled",
        "upstream_module": "relay.upstream._conn_c",
        "upstream_pure_imported": False,
        "upstream_compiled_imported": True,
    }


def test_a_missing_compiled_client_connection_falls_back_to_pure() -> None:
    result = protocol_probe(None, prelude="sys.modules['relay.http._client_c'] = None")
    assert result["implementation"] == "pure"
    assert result["connection_module"] == "relay.http._client_py"
    assert result["limits_module"] == "relay.http._client_py"



def test_a_missing_compiled_upstream_connection_falls_back_to_pure() -> None:
    result = protocol_probe(None, prelude="sys.modules['relay.upstream._conn_c'] = None")
    assert result["upstream_implementation"] == "pure"
    assert result["upstream_module"] == "relay.upstream._conn_py"

"""The hot state machines, compiled with Cython when built, pure Python otherwise.

This is the one place that chooses. Everything else imports from here:

    from relay._fast import cache_key, BucketTable, CircuitBreaker, request_facts, CounterChild

* ``RELAY_NO_EXTENSIONS`` set to anything but "" or "0" forces the pure
  twins (the compiled modules are then not even imported).
* Otherwise the compiled modules are used when all of them import; a build
  that failed or was skipped falls back to pure Python, and
  ``COMPILED_IMPORT_ERROR`` says why.
* ``EXTENSIONS_LOADED`` / ``IMPLEMENTATION`` say what was chosen (the start
  log line reports them).

Both twins stay reachable for tests and benchmarks as ``pure`` and
``compiled`` (None when not built or disabled). The pure modules are the
typing reference: type checkers see their signatures.

Twins that live beside what they serve (the client connection in
``relay.http``, whose source imports the rest of ``relay.http``) are
chosen by :func:`twin` under the same rule, so ``RELAY_NO_EXTENSIONS``
means one thing everywhere.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES
from types import ModuleType
from typing import TYPE_CHECKING, Any

from . import (
    _breaker_py,
    _bucket_py,
    _cachekey_py,
    _heads_py,
    _jsonscan_py,
    _lru_py,
    _meters_py,
    _usagerow_py,
)
from ._breaker_states import CLOSED, HALF_OPEN, OPEN, STATE_NAMES, BreakerTransitionError
from ._heads_py import (
    BAD_EXPECT,
    BAD_TRANSFER_ENCODING,
    DUPLICATE_HOST,
    HEAD_OK,
    HOP_BY_HOP,
    PER_CALLER_HEADERS,
    VARYING_NAMES,
)
from ._jsonscan_py import (
    NOT_AN_OBJECT,
    STREAM_OPTIONS_ABSENT,
    STREAM_OPTIONS_INCLUDE_USAGE,
    STREAM_OPTIONS_NOT_OBJECT,
    STREAM_OPTIONS_WITHOUT_USAGE,
    RequestFacts,
    ResponseCounts,
    ResponseUsage,
    request_facts_of,
)
from ._usagerow_py import ANONYMOUS, OTHER

__all__ = [
    "BAD_EXPECT",
    "BAD_TRANSFER_ENCODING",
    "CLOSED",
    "COMPILED_IMPORT_ERROR",
    "DUPLICATE_HOST",
    "EXTENSIONS_LOADED",
    "HALF_OPEN",
    "HEAD_OK",
    "HOP_BY_HOP",
    "IMPLEMENTATION",
    "NOT_AN_OBJECT",
    "NO_EXTENSIONS",
    "OPEN",
    "PER_CALLER_HEADERS",
    "STATE_NAMES",
    "STREAM_OPTIONS_ABSENT",
    "STREAM_OPTIONS_INCLUDE_USAGE",
    "STREAM_OPTIONS_NOT_OBJECT",
    "STREAM_OPTIONS_WITHOUT_USAGE",
    "VARYING_NAMES",
    "BreakerTransitionError",
    "BucketTable",
    "CircuitBreaker",
    "Implementation",
    "LruTable",
    "RequestFacts",
    "ResponseCounts",
    "ResponseUsage",
    "TokenBucket",
    "ANONYMOUS",
    "OTHER",
    "UsageLedger",
    "UsageRow",
    "add_paid",
    "cache_key",
    "CounterChild",
    "GaugeChild",
    "HistogramChild",
    "compiled",
    "credential_hash",
    "pure",
    "request_facts",
    "request_facts_of",
    "request_head",
    "request_line",
    "response_head",
    "response_counts",
    "response_usage",
    "implementation_of",
    "twin",
]

# Compiled module -> the pure module it twins.
_COMPILED_MODULES = {
    "_cachekey_c": _cachekey_py,
    "_bucket_c": _bucket_py,
    "_breaker_c": _breaker_py,
    "_jsonscan_c": _jsonscan_py,
    "_meters_c": _meters_py,
    "_heads_c": _heads_py,
    "_lru_c": _lru_py,
    "_usagerow_c": _usagerow_py,
}


@dataclass(frozen=True, slots=True)
class Implementation:
    """One complete set of the twins."""

    name: str  # "pure" | "compiled"
    cache_key: Any
    credential_hash: Any
    canonical_json: Any
    TokenBucket: Any
    BucketTable: Any
    CircuitBreaker: Any
    request_facts: Any
    response_usage: Any
    response_counts: Any
    CounterChild: Any
    GaugeChild: Any
    HistogramChild: Any
    request_head: Any
    request_line: Any
    response_head: Any
    UsageLedger: Any
    UsageRow: Any
    add_paid: Any
    LruTable: Any


def extensions_disabled(value: str | None) -> bool:
    """How RELAY_NO_EXTENSIONS reads: unset, "" and "0" leave extensions on."""
    return value is not None and value not in ("", "0")


def _is_extension(module: ModuleType) -> bool:
    # A stray .py of the same name must not pass for the compiled module.
    path = getattr(module, "__file__", None) or ""
    return any(path.endswith(suffix) for suffix in EXTENSION_SUFFIXES)


def _load_compiled() -> tuple[Implementation | None, str | None]:
    modules: dict[str, ModuleType] = {}
    for name in _COMPILED_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ImportError as exc:
            return None, f"{name}: {exc}"
        if not _is_extension(module):
            return None, f"{name}: not a compiled extension ({module.__file__})"
        modules[name] = module
    cachekey, bucket, breaker, jsonscan, meters, heads, usagerow, lru = (
        modules["_cachekey_c"],
        modules["_bucket_c"],
        modules["_breaker_c"],
        modules["_jsonscan_c"],
        modules["_meters_c"],
        modules["_heads_c"],
        modules["_usagerow_c"],
        modules["_lru_c"],
    )
    return (
        Implementation(
            name="compiled",
            cache_key=cachekey.cache_key,
            credential_hash=cachekey.credential_hash,
            canonical_json=cachekey.canonical_json,
            TokenBucket=bucket.TokenBucket,
            BucketTable=bucket.BucketTable,
            CircuitBreaker=breaker.CircuitBreaker,
            request_facts=jsonscan.request_facts,
            response_usage=jsonscan.response_usage,
            response_counts=jsonscan.response_counts,
            CounterChild=meters.CounterChild,
            GaugeChild=meters.GaugeChild,
            HistogramChild=meters.HistogramChild,
            request_head=heads.request_head,
            request_line=heads.request_line,
            response_head=heads.response_head,
            UsageLedger=usagerow.UsageLedger,
            UsageRow=usagerow.UsageRow,
            add_paid=usagerow.add_paid,
            LruTable=lru.LruTable,
        ),
        None,
    )


pure = Implementation(
    name="pure",
    cache_key=_cachekey_py.cache_key,
    credential_hash=_cachekey_py.credential_hash,
    canonical_json=_cachekey_py.canonical_json,
    TokenBucket=_bucket_py.TokenBucket,
    BucketTable=_bucket_py.BucketTable,
    CircuitBreaker=_breaker_py.CircuitBreaker,
    request_facts=_jsonscan_py.request_facts,
    response_usage=_jsonscan_py.response_usage,
    response_counts=_jsonscan_py.response_counts,
    CounterChild=_meters_py.CounterChild,
    GaugeChild=_meters_py.GaugeChild,
    HistogramChild=_meters_py.HistogramChild,
    request_head=_heads_py.request_head,
    request_line=_heads_py.request_line,
    response_head=_heads_py.response_head,
    UsageLedger=_usagerow_py.UsageLedger,
    UsageRow=_usagerow_py.UsageRow,
    add_paid=_usagerow_py.add_paid,
    LruTable=_lru_py.LruTable,
)

NO_EXTENSIONS: bool = extensions_disabled(os.environ.get("RELAY_NO_EXTENSIONS"))


def twin(pure_name: str, compiled_name: str) -> ModuleType:
    """The module to run of a pair of twins kept outside this package.

    *compiled_name* (absolute) is the extension compiled from the source of
    *pure_name*; it is imported and used unless ``RELAY_NO_EXTENSIONS`` is
    set or it was not built, and only then is *pure_name* imported. The
    caller names both, so this package still imports nothing outside itself.
    """
    if not NO_EXTENSIONS:
        try:
            module = importlib.import_module(compiled_name)
        except ImportError:
            pass
        else:
            if _is_extension(module):
                return module
    return importlib.import_module(pure_name)


def implementation_of(module: ModuleType) -> str:
    """"pure" or "compiled": which of a pair of twins *module* (from :func:`twin`) is."""
    return "pure" if module.__name__.endswith("_py") else "compiled"


compiled: Implementation | None
COMPILED_IMPORT_ERROR: str | None
if NO_EXTENSIONS:
    compiled, COMPILED_IMPORT_ERROR = None, "disabled by RELAY_NO_EXTENSIONS"
else:
    compiled, COMPILED_IMPORT_ERROR = _load_compiled()

_chosen = compiled if compiled is not None else pure
EXTENSIONS_LOADED: bool = _chosen is compiled
IMPLEMENTATION: str = _chosen.name

if TYPE_CHECKING:
    # The pure modules are the typing reference for both twins.
    from ._breaker_py import CircuitBreaker
    from ._bucket_py import BucketTable, TokenBucket
    from ._cachekey_py import cache_key, credential_hash
    from ._heads_py import request_head, request_line, response_head
    from ._jsonscan_py import request_facts, response_counts, response_usage
    from ._lru_py import LruTable
    from ._meters_py import CounterChild, GaugeChild, HistogramChild
    from ._usagerow_py import UsageLedger, UsageRow, add_paid
else:
    cache_key = _chosen.cache_key
    credential_hash = _chosen.credential_hash
    TokenBucket = _chosen.TokenBucket
    BucketTable = _chosen.BucketTable
    CircuitBreaker = _chosen.CircuitBreaker
    request_facts = _chosen.request_facts
    response_usage = _chosen.response_usage
    response_counts = _chosen.response_counts
    CounterChild = _chosen.CounterChild
    GaugeChild = _chosen.GaugeChild
    HistogramChild = _chosen.HistogramChild
    request_head = _chosen.request_head
    request_line = _chosen.request_line
    response_head = _chosen.response_head
    UsageLedger = _chosen.UsageLedger
    UsageRow = _chosen.UsageRow
    add_paid = _chosen.add_paid
    LruTable = _chosen.LruTable

del _chosen

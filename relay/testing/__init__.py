"""Test support: a fake OpenAI/Anthropic upstream for tests, benchmarks and demos.

Names are imported lazily so ``python -m relay.testing.fake_upstream`` does
not import its own module twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from relay.testing.fake_upstream import FakeUpstream, RecordedRequest, ThreadedFakeUpstream

__all__ = ["FakeUpstream", "RecordedRequest", "ThreadedFakeUpstream"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from relay.testing import fake_upstream

        return getattr(fake_upstream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""pytest-benchmark set-up for the micro-benchmarks (bench_*.py).

``pytest benchmarks/`` collects bench_*.py through the hook below (pytest's
own pattern is test_*.py); a run that sets ``-o python_files=bench_*.py``
collects them itself and the hook stands aside. After the tables, one line
per group that measured both twins gives the compiled/pure speed-up.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

import relay._fast as fast


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if any(fnmatch.fnmatch(file_path.name, p) for p in parent.config.getini("python_files")):
        return None  # already collected as a test module
    return pytest.Module.from_parent(parent, path=file_path)


@pytest.fixture(params=["pure", "compiled"])
def fast_impl(request: pytest.FixtureRequest) -> fast.Implementation:
    """Each relay._fast twin in turn; the compiled one only when it is built."""
    if request.param == "pure":
        return fast.pure
    if fast.compiled is None:
        pytest.skip(f"compiled relay._fast not loaded: {fast.COMPILED_IMPORT_ERROR}")
    return fast.compiled


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    session = getattr(terminalreporter.config, "_benchmarksession", None)
    by_group: dict[str, dict[str, float]] = {}
    for bench in getattr(session, "benchmarks", None) or []:
        impl = (bench.params or {}).get("fast_impl")
        if impl in ("pure", "compiled") and bench.stats is not None:
            by_group.setdefault(bench.group or bench.name, {})[impl] = bench.stats.median
    lines = [
        f"{group}: compiled is {times['pure'] / times['compiled']:.1f}x faster than pure "
        f"(median {times['compiled'] * 1e6:.3f} us vs {times['pure'] * 1e6:.3f} us)"
        for group, times in sorted(by_group.items())
        if "pure" in times and "compiled" in times and times["compiled"] > 0
    ]
    if lines:
        terminalreporter.write_sep("-", "relay._fast compiled/pure")
        for line in lines:
            terminalreporter.write_line(line)

"""Build of relay's optional C extensions (relay/_fast); metadata is in pyproject.toml.

    python setup.py build_ext --inplace     # develop in place
    pip install -e .                        # the same through PEP 660

The extensions only speed relay up: every one has a pure-Python twin of
identical behaviour, chosen at import time by relay/_fast/__init__.py. So a
failed build (no compiler, no Cython, a Cython error) never fails the install:
it prints a banner and relay runs on the pure twins. Set RELAY_NO_EXTENSIONS=1
to skip the build on purpose.
"""

from __future__ import annotations

import os
import sys
import traceback

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

FAST = "relay/_fast"

# .pyx: hand-written where C-level buffer access pays (canonical JSON + hash,
# the JSON facts scan, metric children writing into a values array, header
# classification and rendering, the memory cache's table of inline keys).
# .py: the pure twin compiled unchanged, typed by the .pxd named after the
# extension (Cython finds it by the extension's module name).
EXTENSIONS = [
    # Both JSON walks cimport their lexical core from _jsonlex.pxd.
    (
        "relay._fast._cachekey_c",
        f"{FAST}/_cachekey_c.pyx",
        [f"{FAST}/_cachekey_py.py", f"{FAST}/_jsonlex.pxd", f"{FAST}/_sha256.pxd"],
    ),
    (
        "relay._fast._jsonscan_c",
        f"{FAST}/_jsonscan_c.pyx",
        [f"{FAST}/_jsonscan_py.py", f"{FAST}/_jsonlex.pxd"],
    ),
    ("relay._fast._meters_c", f"{FAST}/_meters_c.pyx", [f"{FAST}/_meters_py.py"]),
    ("relay._fast._heads_c", f"{FAST}/_heads_c.pyx", [f"{FAST}/_heads_py.py"]),
    ("relay._fast._lru_c", f"{FAST}/_lru_c.pyx", [f"{FAST}/_lru_py.py"]),
    ("relay._fast._bucket_c", f"{FAST}/_bucket_py.py", [f"{FAST}/_bucket_c.pxd"]),
    ("relay._fast._usagerow_c", f"{FAST}/_usagerow_py.py", [f"{FAST}/_usagerow_c.pxd"]),
    (
        "relay._fast._breaker_c",
        f"{FAST}/_breaker_py.py",
        [f"{FAST}/_breaker_c.pxd", f"{FAST}/_breaker_states.py"],
    ),
    # The client connection, beside the http package it imports; chosen by
    # relay/http/protocol.py through relay._fast.twin. Its .pxd is named
    # after the extension, as in relay/_fast.
    (
        "relay.http._client_c",
        "relay/http/_client_py.py",
        ["relay/http/_client_c.pxd", "relay/http/states.py"],
    ),
    # The parsed request, likewise (relay/http/request.py chooses).
    ("relay.http._request_c", "relay/http/_request_py.py", ["relay/http/_request_c.pxd"]),
    # The upstream connection, likewise (relay/upstream/protocol.py chooses).
    ("relay.upstream._conn_c", "relay/upstream/_conn_py.py", ["relay/upstream/_conn_c.pxd"]),
    # Coalescing of identical misses (relay/features/coalescer.py chooses).
    (
        "relay.features._coalescer_c",
        "relay/features/_coalescer_py.py",
        ["relay/features/_coalescer_c.pxd"],
    ),
    # The exchange that relays one response (relay/upstream/exchange.py chooses).
    (
        "relay.upstream._exchange_c",
        "relay/upstream/_exchange_py.py",
        ["relay/upstream/_exchange_c.pxd"],
    ),
]

CYTHON_DIRECTIVES = {
    "language_level": 3,
    # The .py twins carry annotations for readers and type checkers; the .pxd
    # files alone decide C types, so the twins behave the same.
    "annotation_typing": False,
    "embedsignature": True,
}


def _extensions_disabled() -> bool:
    value = os.environ.get("RELAY_NO_EXTENSIONS")
    return value is not None and value not in ("", "0")  # as relay/_fast/__init__.py


def _banner(reason: str) -> None:
    line = "*" * 76
    sys.stderr.write(
        f"\n{line}\n"
        f"relay: C extensions could not be built, falling back to pure Python: {reason}\n"
        "relay works the same without them, only slower on its hot paths.\n"
        f"{line}\n\n"
    )


class OptionalBuildExt(build_ext):
    """Cythonizes and compiles relay/_fast; any failure falls back to pure Python."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # The extensions compile independently: one per core, unless -j says.
        if self.parallel is None:
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            from Cython.Build import cythonize

            cythonized = cythonize(
                self.extensions,
                compiler_directives=CYTHON_DIRECTIVES,
                force=self.force,
                quiet=not self.verbose,
                nthreads=self.parallel if isinstance(self.parallel, int) else 0,
            )
            # Keep setuptools' own Extension objects (finalize_options has
            # already annotated them); only their sources become the .c files.
            c_sources = {ext.name: ext.sources for ext in cythonized}
            for ext in self.extensions:
                ext.sources = c_sources[ext.name]
            super().run()
        except Exception as exc:  # ImportError, CompileError, LinkError, ...
            if os.environ.get("RELAY_BUILD_DEBUG"):
                traceback.print_exc()
            self._remove_partial_outputs()
            _banner(f"{type(exc).__name__}: {exc}".strip().rstrip(":"))

    def _remove_partial_outputs(self) -> None:
        # With --inplace a stale extension left from an earlier build would
        # be imported instead of the current pure twin: leave none behind.
        if not self.inplace:
            return
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            if os.path.exists(path):
                os.remove(path)


def _ext_modules() -> list[Extension]:
    if _extensions_disabled():
        sys.stderr.write("relay: RELAY_NO_EXTENSIONS is set, not building C extensions\n")
        return []
    compile_args = [] if sys.platform == "win32" else ["-O2"]
    return [
        Extension(name, [source], depends=depends, extra_compile_args=compile_args)
        for name, source, depends in EXTENSIONS
    ]


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})

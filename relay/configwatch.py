"""Hot reload: poll the config file and hand each valid new version over.

Polling os.stat (mtime, size, inode, device) is portable, needs no extra
dependency and catches both in-place writes and an editor's atomic rename
(the new file has a new inode). A stat is one cheap syscall; the file itself
is read only when its stat changed, and only once that stat has stayed the
same for one more interval, so a file caught half-written (or truncated to
zero bytes by an in-place save) is never loaded. Worst case an edit is seen
after two intervals: 1 s with the default 0.5 s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping

from relay.config import Config, ConfigError, Problem, load_config, restart_changes

logger = logging.getLogger("relay.config")

# (mtime_ns, size, inode, device); None when the file does not exist.
_Signature = tuple[int, int, int, int] | None
_UNSEEN = ("unseen",)  # sentinel: differs from every real signature


def _signature(path: str) -> _Signature:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ConfigWatcher:
    """Reloads `path` when it changes, on the running asyncio loop.

    on_change(new_config, restart_needed) is called with the config as
    loaded from the file and the sorted RESTART_KEYS whose value differs
    from the config the process started with (`current` at construction);
    the caller logs those and keeps its running values for them (see
    relay.config.keep_restart_values). A reload that yields a config equal
    to the current one (a `touch`, a comment edit) calls nothing.

    on_error(ConfigError) is called once per bad version of the file
    (invalid, unreadable or deleted); the last good config stays current.
    `env` is the environment overrides to re-apply (default: os.environ as
    it was at construction), so an override is not lost on reload.
    """

    def __init__(
        self,
        path: str,
        current: Config,
        on_change: Callable[[Config, list[str]], None],
        on_error: Callable[[ConfigError], None],
        interval: float = 0.5,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.path = path
        self.interval = interval
        self._running = current
        self._current = current
        self._on_change = on_change
        self._on_error = on_error
        self._env = dict(os.environ if env is None else env)
        # The first poll always reads the file once and compares it with
        # `current`: this closes the gap between the caller's load_config()
        # and start(), during which an edit would otherwise go unnoticed.
        self._loaded: object = _UNSEEN
        self._pending: object = _UNSEEN
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._stopped = False

    @property
    def current(self) -> Config:
        """The last good config loaded (the file's values, restart keys included)."""
        return self._current

    def start(self) -> None:
        """Begin polling on the running loop (call from a coroutine or callback)."""
        if self._handle is not None:
            return
        self._stopped = False
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        self._handle = None
        try:
            self.poll()
        except Exception:  # never let a bug end the polling
            logger.exception("config reload check failed")
        finally:
            if not self._stopped and self._loop is not None:
                self._handle = self._loop.call_later(self.interval, self._tick)

    def poll(self) -> None:
        """One check: stat the file, reload when a change has settled."""
        signature = _signature(self.path)
        if signature == self._loaded:
            self._pending = _UNSEEN
            return
        if signature != self._pending:
            # Changed since the last look: wait one interval for it to settle.
            self._pending = signature
            return
        self._pending = _UNSEEN
        self._loaded = signature
        self._reload(signature)

    def _reload(self, signature: _Signature) -> None:
        if signature is None:
            self._report(ConfigError([Problem(self.path, "", "file not found")]))
            return
        try:
            new = load_config(self.path, self._env)
        except ConfigError as exc:
            self._report(exc)
            return
        if new == self._current:
            return
        self._current = new
        restart_needed = restart_changes(self._running, new)
        try:
            self._on_change(new, restart_needed)
        except Exception:
            logger.exception("config on_change callback failed")

    def _report(self, error: ConfigError) -> None:
        try:
            self._on_error(error)
        except Exception:
            logger.exception("config on_error callback failed")

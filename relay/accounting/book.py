"""This process's usage totals and where ``GET /relay/usage`` reads them.

:class:`UsageBook` is built once per process and kept across config
generations. It records each counted request in one of two places:

* with Redis, into a :class:`~relay.accounting.ledger.SharedUsage` (sent
  there once, kept in memory until Redis confirmed it), so every worker and
  instance adds to the same totals;
* without Redis, into its own :class:`~relay.accounting.ledger.UsageLedger`.

Several workers without Redis each keep their totals in a file beside the
metrics files (rewritten at most every 0.5 s, and at stop); any worker
answers ``/relay/usage`` with the sum of the files. The same file holds
what Redis has not confirmed during an outage, so those totals stay visible.
"""

from __future__ import annotations

import asyncio
import glob
import json
import logging
import os
from typing import TYPE_CHECKING, Any

from ..ops.metrics import multiprocess_dir
from .ledger import RedisUsageLedger, SharedUsage, UsageLedger, merge_snapshots
from .usage import Usage

if TYPE_CHECKING:
    from ..redisconn import RedisConnection

__all__ = ["UsageBook"]

log = logging.getLogger("relay")

# Seconds between rewrites of this worker's usage file.
FILE_INTERVAL = 0.5


class UsageBook:
    """Records counted requests and answers with the totals."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ledger = UsageLedger()
        # The writer into Redis in use (None: no Redis, the ledger counts).
        self._shared: SharedUsage | None = None
        self._flush: asyncio.TimerHandle | None = None
        # Read once: the launcher sets it before any worker starts.
        self._shared_dir = multiprocess_dir()

    # ------------------------------------------------------------------ #
    # where totals go
    # ------------------------------------------------------------------ #
    def writer_for(self, redis: RedisConnection | None) -> SharedUsage | None:
        """A writer of these totals into *redis* (None without Redis); it is
        not used until :meth:`use`, so a refused config can drop it."""
        if redis is None:
            return None
        ledger = RedisUsageLedger(redis.client, runner=redis.execute)
        return SharedUsage(ledger, redis, self.loop, on_outage_change=self._changed)

    def use(self, writer: SharedUsage | None) -> None:
        """Record through *writer* from now on. Totals the previous writer
        had not confirmed go with the new one, or stay in this process's
        memory totals without Redis."""
        previous, self._shared = self._shared, writer
        if previous is None:
            return
        if writer is not None:
            writer.adopt(previous)
            return
        previous.close()
        if previous.has_unconfirmed():
            self.ledger.merge(previous.take_unconfirmed())
            self._changed()

    # ------------------------------------------------------------------ #
    # per request
    # ------------------------------------------------------------------ #
    def record(
        self, label: str, key_hash: str, usage: Usage, paid: float, saved: float, hit: bool
    ) -> None:
        """One counted request: *paid* is its cost, *saved* what a hit avoided."""
        shared = self._shared
        if shared is not None:
            shared.record(label, key_hash, usage, paid, saved, hit)
        else:
            self.ledger.record(label, key_hash, usage, paid, saved, hit)
            if self._flush is None and self._shared_dir is not None:
                self._changed()  # inline test: most records find it scheduled or unneeded

    # ------------------------------------------------------------------ #
    # reading
    # ------------------------------------------------------------------ #
    async def snapshot(self) -> dict[str, Any]:
        """The totals ``/relay/usage`` shows, with the backend they came from."""
        shared = self._shared
        if shared is not None:
            snapshot = await shared.snapshot()
            if snapshot is not None:
                snapshot["backend"] = "redis"
                return snapshot
        directory = multiprocess_dir()
        if directory is None:
            snapshot = self._memory_totals()
        else:
            # Several workers without Redis: each keeps its own totals in a
            # file beside the metrics files; any worker answers with the sum.
            self._write_file()
            snapshot = await self.loop.run_in_executor(None, read_usage_files, directory)
        snapshot["backend"] = "memory"
        return snapshot

    def _memory_totals(self) -> dict[str, Any]:
        """This process's totals that are in no Redis: without Redis all of
        them, with it what Redis has not confirmed yet."""
        shared = self._shared
        if shared is None or not shared.has_unconfirmed():
            return self.ledger.snapshot()
        return merge_snapshots([self.ledger.snapshot(), shared.unconfirmed()])

    # ------------------------------------------------------------------ #
    # this worker's file
    # ------------------------------------------------------------------ #
    def _changed(self) -> None:
        """Schedule this worker's usage file to be rewritten (at most every 0.5 s)."""
        if self._flush is None and self._shared_dir is not None:
            self._flush = self.loop.call_later(FILE_INTERVAL, self._write_file)

    def _write_file(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        directory = multiprocess_dir()
        if directory is None:
            return
        path = os.path.join(directory, f"usage-{os.getpid()}.json")
        try:
            with open(path + ".tmp", "w") as f:
                json.dump(self._memory_totals(), f)
            os.replace(path + ".tmp", path)  # readers never see half a file
        except OSError as exc:
            log.warning("usage: cannot write %s: %s", path, exc.strerror)

    async def close(self) -> None:
        """Send what Redis has not confirmed (bounded), then write the file:
        the last totals of this worker stay counted."""
        shared = self._shared
        if shared is not None:
            await shared.flush()  # bounded by redis.timeout per batch
            shared.close()
        self._write_file()


def read_usage_files(directory: str) -> dict[str, Any]:
    """The sum of every worker's usage file in *directory*."""
    snapshots = []
    for path in glob.glob(os.path.join(directory, "usage-*.json")):
        try:
            with open(path) as f:
                snapshots.append(json.load(f))
        except (OSError, ValueError):
            continue  # a worker replacing its file right now: next read has it
    return merge_snapshots(snapshots)

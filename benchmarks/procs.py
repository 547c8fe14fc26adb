"""Processes the runner starts, and what they cost (CPU, memory) from /proc.

Every server is started in a session of its own, so its whole tree (nginx
workers, relay workers, uvicorn workers) is one process group: it is
measured by group and stopped by group, and nothing the runner did not start
is ever touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["GroupStats", "Processes", "Started", "cpu_of_groups", "free_port", "group_stats",
           "machine_busy_seconds", "wait_for_port"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float, alive: Started | None = None) -> bool:
    """True once 127.0.0.1:port accepts connections (False on timeout or exit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and alive.popen.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True, slots=True)
class GroupStats:
    """CPU seconds used so far and memory now, summed over a process group."""

    cpu_seconds: float
    rss_bytes: int
    processes: int


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used (every core), from /proc/stat."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def cpu_of_groups(pgids: set[int]) -> float:
    """CPU seconds used so far by every process in any of ``pgids``."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) in pgids:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def group_stats(pgid: int) -> GroupStats:
    cpu_ticks = 0
    rss_pages = 0
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) != pgid:  # field 5 of stat: process group
            continue
        cpu_ticks += int(fields[11]) + int(fields[12])  # utime + stime
        rss_pages += int(fields[21])
        count += 1
    return GroupStats(cpu_ticks / _CLK_TCK, rss_pages * _PAGE, count)


@dataclass(slots=True)
class Started:
    """One server the runner started."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid  # session leader: its pid is the group id

    def stats(self) -> GroupStats:
        return group_stats(self.pgid)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(slots=True)
class Processes:
    """Owner of every process the runner starts; ``stop_all`` in a finally."""

    log_dir: Path
    started: list[Started] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> Started:
        log = self.log_dir / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,  # own process group: measured and stopped as one
            )
        proc = Started(name, popen, log)
        self.started.append(proc)
        return proc

    def suite_cpu_seconds(self) -> float:
        """CPU seconds of everything started, plus this process and its reaped children (wrk)."""
        own = os.times()
        return (cpu_of_groups({p.pgid for p in self.started})
                + own.user + own.system + own.children_user + own.children_system)

    def stop(self, proc: Started, grace: float = 8.0) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after ``grace``."""
        self._stop([proc], grace)

    def stop_all(self, grace: float = 8.0) -> None:
        self._stop(list(self.started), grace)

    def _stop(self, procs: list[Started], grace: float) -> None:
        for proc in procs:
            if proc in self.started:
                self.started.remove(proc)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        left = procs
        while left and time.monotonic() < deadline:
            for proc in left:
                proc.popen.poll()  # reap the leader so its group can empty
            left = [p for p in left if group_stats(p.pgid).processes]
            if left:
                time.sleep(0.1)
        for proc in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pgid, signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=2)

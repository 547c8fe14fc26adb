"""Where relay's time goes: py-spy samples relay while wrk loads it."""

from __future__ import annotations

import collections
import subprocess
from pathlib import Path

from .measure import measure_wrk
from .targets import Target

__all__ = ["profile_relay", "top_functions"]


def top_functions(collapsed: str, limit: int = 20) -> dict[str, list[tuple[str, float]]]:
    """Self and inclusive shares of samples per function, from py-spy's raw output."""
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        # The first frame is the thread (py-spy --threads is not used: "process ...").
        frames = [_short(f) for f in frames]
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, c / total * 100) for f, c in self_counts.most_common(limit)],
        # relay's own functions below the entry points (which are at ~100%).
        "inclusive": [(f, c / total * 100) for f, c in incl_counts.most_common()
                      if f.endswith(".py)") and "(relay/" in f and c < 0.95 * total][:limit],
        "samples": total,  # type: ignore[dict-item]
    }


def _short(frame: str) -> str:
    # "handle (relay/pipeline.py:105)" -> "handle (relay/pipeline.py)"; keeps it grouped per function.
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/python3."):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    if "/relay/" in path:
        path = "relay/" + path.rsplit("/relay/", 1)[1]
    return f"{name} ({path})" if path else name


def profile_relay(target: Target, pyspy: str, workdir: Path, seconds: float,
                  connections: int, threads: int) -> dict[str, object] | None:
    assert target.proc is not None
    out = workdir / "relay-profile.txt"
    duration = max(2, int(seconds))
    # --native shows time spent in C (syscalls, json, uvloop) under the Python
    # frame that called it; it has to pause the process per sample, which the
    # req/s while sampled shows.
    argv = [pyspy, "record", "--pid", str(target.proc.pgid), "--duration", str(duration),
            "--rate", "200", "--native", "--format", "raw", "--output", str(out)]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run = measure_wrk(target, "profile", 0, connections=connections, threads=threads,
                          seconds=duration, vary=True)
        spy.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
        return None
    finally:
        if spy.poll() is None:
            spy.terminate()
            spy.wait()
    if not out.exists():
        err = spy.stderr.read().decode(errors="replace") if spy.stderr else ""
        return {"error": f"py-spy wrote nothing: {err[-400:]}"}
    tops = top_functions(out.read_text(errors="replace"))
    return {"rps_while_sampled": run.rps, **tops}

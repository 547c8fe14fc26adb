"""wrk runs: a chat-completions POST per request, latency percentiles parsed."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BODY_MARK", "REQUEST_BODY", "WrkResult", "parse_wrk", "run_wrk"]

LUA_SCRIPT = Path(__file__).with_name("wrk") / "post.lua"

# Replaced per request when the body must vary (a cache miss each time).
BODY_MARK = "@" * 24

# A typical SDK chat-completions request: 285 bytes, as in the figures the
# suite was first asked to reproduce.
REQUEST_BODY = (
    '{"model":"gpt-4o","messages":[{"role":"system","content":"You are a concise '
    'assistant."},{"role":"user","content":"In two sentences, why should an HTTP API '
    "gateway keep its upstream connections alive? (ref " + BODY_MARK + ')"}],'
    '"temperature":0.2,"max_tokens":120,"stream":false}'
)

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}
_LATENCY_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)(us|ms|s|m)\s*$", re.M)
_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    latency_ms: dict[str, float]  # "50", "75", "90", "99" -> milliseconds
    non_2xx: int
    socket_errors: int
    timeouts: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors

    @property
    def p50(self) -> float | None:
        return self.latency_ms.get("50")

    @property
    def p99(self) -> float | None:
        return self.latency_ms.get("99")


def parse_wrk(text: str) -> WrkResult:
    """Read wrk's summary (run with --latency)."""
    latency = {f"{float(m.group(1)):g}": float(m.group(2)) * _UNITS[m.group(3)]
               for m in _LATENCY_LINE.finditer(text)}
    m = _REQS.search(text)
    if m is None:
        raise ValueError("no request count in wrk output:\n" + text[-800:])
    requests = int(m.group(1))
    seconds = float(m.group(2)) * _UNITS[m.group(3)] / 1000.0
    rps_m = _RPS.search(text)
    rps = float(rps_m.group(1)) if rps_m else requests / seconds
    non2xx_m = _NON2XX.search(text)
    sock_m = _SOCKET_ERRORS.search(text)
    socket_errors = sum(int(g) for g in sock_m.groups()) if sock_m else 0
    timeouts = int(sock_m.group(4)) if sock_m else 0
    return WrkResult(
        requests=requests,
        seconds=seconds,
        rps=rps,
        latency_ms=latency,
        non_2xx=int(non2xx_m.group(1)) if non2xx_m else 0,
        socket_errors=socket_errors,
        timeouts=timeouts,
    )


def run_wrk(
    url: str,
    *,
    connections: int,
    threads: int,
    seconds: float,
    headers: Mapping[str, str],
    vary: bool,
    timeout_s: float = 10.0,
) -> tuple[WrkResult, str]:
    """One wrk run against ``url`` (always a 127.0.0.1 address); result and raw text."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load anything but 127.0.0.1: {url}")
    env = dict(os.environ)
    env.update(
        BENCH_BODY=REQUEST_BODY,
        BENCH_MARK=BODY_MARK,
        BENCH_VARY="1" if vary else "0",
        BENCH_NONCE=secrets.token_hex(4),
        BENCH_HEADERS="\n".join(f"{k}: {v}" for k, v in headers.items()),
    )
    argv = [
        "wrk",
        f"-t{max(1, min(threads, connections))}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout_s))}s",
        "--latency",
        "-s", str(LUA_SCRIPT),
        url,
    ]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                          timeout=seconds + timeout_s + 30)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}: {text[-800:]}")
    return parse_wrk(text), text

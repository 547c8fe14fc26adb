"""Run relay against direct access, nginx, LiteLLM and Portkey; write docs/benchmarks.md.

    python -m benchmarks.run            # full run (about 20 minutes)
    python -m benchmarks.run --quick    # about 4 minutes, same scenarios, shorter runs
    python -m benchmarks.run --micro    # pytest-benchmark micro-benchmarks only

Everything it starts runs on 127.0.0.1 in process groups of its own and is
stopped at the end, on errors and on Ctrl-C too. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from benchmarks import report  # noqa: E402
from benchmarks.measure import Run, StreamRun, measure_streams, measure_wrk, preflight, static_body  # noqa: E402
from benchmarks.procs import Processes  # noqa: E402
from benchmarks.profile import profile_relay  # noqa: E402
from benchmarks.targets import RELAY_VARIANTS, Env, Target  # noqa: E402
from benchmarks.tools import BANNED_LITELLM, DEFAULT_LITELLM, DEFAULT_PORTKEY, Tools, setup_tools  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("RELAY_BENCH_CACHE", Path.home() / ".cache" / "relay-bench"))


@dataclass(frozen=True, slots=True)
class Settings:
    mode: str
    rounds: int
    seconds: float           # each 64-connection run
    latency_seconds: float   # each 1-connection run
    warmup_seconds: float
    connections: int
    threads: int
    fast_streams: int        # 200-event streams per target per round

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls("quick", rounds=3, seconds=3, latency_seconds=2, warmup_seconds=1,
                       connections=64, threads=2, fast_streams=5)
        return cls("full", rounds=5, seconds=10, latency_seconds=5, warmup_seconds=2,
                   connections=64, threads=2, fast_streams=20)


def say(message: str) -> None:
    print(message, flush=True)


def rotated(items: list[Target], by: int) -> list[Target]:
    if not items:
        return items
    by %= len(items)
    return items[by:] + items[:by]


def _arguments(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (about 4 minutes in all)")
    p.add_argument("--micro", action="store_true",
                   help="run the pytest-benchmark micro-benchmarks instead (extra args go to pytest)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (at least 3)")
    p.add_argument("--seconds", type=float, help="length of each 64-connection run")
    p.add_argument("--only", default="",
                   help="comma-separated target kinds to run: nginx,relay,litellm,portkey "
                        "(direct always runs: every ratio needs it)")
    p.add_argument("--no-litellm", action="store_true", help="leave LiteLLM out")
    p.add_argument("--no-portkey", action="store_true", help="leave Portkey out")
    p.add_argument("--no-pure", action="store_true", help="leave the pure-Python relay out")
    p.add_argument("--redis", action="store_true",
                   help="also relay (compiled, 1 worker) with its cache and limiter in a Redis "
                        "and in a three-master Redis Cluster (redis-server on free ports)")
    p.add_argument("--no-install", action="store_true", help="install nothing; skip what is missing")
    p.add_argument("--litellm-version", default=DEFAULT_LITELLM)
    p.add_argument("--portkey-version", default=DEFAULT_PORTKEY)
    p.add_argument("--profile", action="store_true",
                   help="also record relay (compiled, 1 worker) with py-spy under load")
    p.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                   help="markdown file to write (its results section is replaced)")
    p.add_argument("--no-docs", action="store_true", help="write only the JSON results")
    p.add_argument("--keep", action="store_true",
                   help="keep the working directory (configs and every server's log)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results",
                   help="directory for the raw JSON results (not committed)")
    args, extra = p.parse_known_args(argv)
    if extra and not args.micro:  # only --micro passes arguments on (to pytest)
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args, extra


def run_micro(extra: list[str]) -> int:
    """pytest-benchmark over benchmarks/bench_*.py, both implementations side by side."""
    argv = [sys.executable, "-m", "pytest", str(REPO / "benchmarks"),
            "-o", "python_files=bench_*.py", "-o", "testpaths=benchmarks",
            "-p", "no:cacheprovider", "--benchmark-only", "--benchmark-sort=name",
            "--benchmark-columns=min,median,mean,ops,rounds", "-q", *extra]
    return subprocess.call(argv, cwd=REPO)


class _Stop(BaseException):
    """SIGINT/SIGTERM/SIGHUP: unwind through the finally that stops every process.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    that records a failed run can swallow it.
    """


def _on_signal(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args, extra = _arguments(argv)
    if args.micro:
        return run_micro(extra)
    if args.litellm_version in BANNED_LITELLM:
        say(f"LiteLLM {args.litellm_version} is refused: that release was published compromised")
        return 2
    settings = Settings.for_mode(args.quick)
    if args.rounds is not None:
        settings = replace(settings, rounds=max(3, args.rounds))
    if args.seconds is not None:
        settings = replace(settings, seconds=max(1.0, args.seconds))
    only = {k.strip() for k in args.only.split(",") if k.strip()}

    def wanted(kind: str) -> bool:
        return not only or kind in only

    # SIGINT too: a shell that starts the runner in the background leaves
    # SIGINT ignored, and Python then never installs its own handler.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    started_at = time.time()
    tools = setup_tools(CACHE, litellm_version=args.litellm_version,
                        portkey_version=args.portkey_version,
                        want_litellm=wanted("litellm") and not args.no_litellm,
                        want_portkey=wanted("portkey") and not args.no_portkey,
                        want_pyspy=args.profile, allow_install=not args.no_install)
    # Facts (relay's commit above all) as of now: the servers load this code.
    meta = report.machine_facts(REPO, tools, settings_dict(settings), started_at)
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    if args.keep:
        say(f"configs and logs: {workdir}")
    procs = Processes(workdir)
    env = Env(REPO, workdir, procs, nginx=tools.nginx)
    skipped: dict[str, str] = dict(tools.skipped)
    runs: list[Run] = []
    streams: list[StreamRun] = []
    crashes: list[dict[str, str]] = []
    targets: list[Target] = []
    profile: dict[str, object] | None = None
    memory: list[dict[str, object]] = []
    try:
        env.start_fake_upstream()
        if tools.nginx:
            env.start_nginx_upstream()
        else:
            env.canned_port = env.fake_port  # relay's own fake upstream stands in
            skipped["streaming"] = "needs nginx (it shapes the fake upstream's streams)"
        targets = _start_targets(env, tools, args, wanted, skipped)
        if tools.wrk:
            _throughput(targets, settings, runs, crashes, skipped, procs)
            memory = _memory_growth(targets, settings, crashes)
            if args.profile and tools.pyspy:
                relay = next((t for t in targets if t.key == "relay-c1" and t.proc), None)
                if relay is not None:
                    say("profiling relay (compiled, 1 worker) with py-spy")
                    profile = profile_relay(relay, tools.pyspy, workdir, settings.seconds,
                                            settings.connections, settings.threads)
        if env.stream_port:
            streams = _streaming(env, targets, tools, args, wanted, settings, skipped, crashes)
    except (KeyboardInterrupt, _Stop) as exc:
        say(f"interrupted ({exc or 'SIGINT'}): stopping everything started")
        return 130
    finally:
        # A second Ctrl-C must not cut the cleanup short.
        previous = {sig: signal.signal(sig, signal.SIG_IGN)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    results = {
        "meta": {**meta, "duration_s": round(time.time() - started_at)},
        "skipped": skipped,
        "crashes": crashes,
        "targets": {t.key: {"label": t.label, "kind": t.kind, "workers": t.workers,
                            "impl": t.impl, "variant": t.variant} for t in targets},
        "runs": [r.as_dict() for r in runs],
        "streams": [s.as_dict() for s in streams],
        "profile": profile,
        "memory": memory,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_at))
    raw = args.results / f"{stamp}-{settings.mode}.json"
    raw.write_text(json.dumps(results, indent=1))
    say(f"raw results: {raw}")
    summary = report.summarise(results)
    say(report.console_table(summary))
    if not args.no_docs:
        png = args.docs.with_suffix(".png")
        drew = report.draw_chart(summary, png, tools.chart_python)
        report.write_markdown(args.docs, results, summary, png if drew else None)
        say(f"wrote {args.docs}" + (f" and {png}" if drew else ""))
    return 0


def settings_dict(settings: Settings) -> dict[str, object]:
    return asdict(settings)


def _try(what: str, skipped: dict[str, str], start: Callable[[], Target]) -> Target | None:
    say(f"starting {what}")
    try:
        target = start()
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [repr(exc)]
        # The first line says what failed, the last one of the log why.
        why = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
        skipped[what] = f"could not be started: {why[:400]}"
        say(f"SKIP {what}: could not be started: {why[:300]}")
        return None
    failed = preflight(target)
    if failed is not None:
        skipped[target.label] = f"first request failed: {failed}"
        say(f"SKIP {target.label}: first request failed: {failed}")
        return None
    return target


def _start_targets(env: Env, tools: Tools, args: argparse.Namespace,
                   wanted: Callable[[str], bool], skipped: dict[str, str]) -> list[Target]:
    targets = [env.direct()]
    why = preflight(targets[0])
    if why is not None:
        raise RuntimeError(f"the upstream itself does not answer: {why}")
    if wanted("nginx") and tools.nginx and env.stream_port:
        t = _try("nginx reverse proxy", skipped, env.start_nginx_proxy)
        if t:
            targets.append(t)
    if wanted("relay"):
        impls = [False] if args.no_pure else [False, True]
        for pure in impls:
            for workers in (1, 2):
                t = _try(f"relay ({'pure' if pure else 'compiled'}, {_workers(workers)})", skipped,
                         partial(env.start_relay, workers, pure))
                if t:
                    targets.append(t)
    if wanted("relay"):
        for variant in RELAY_VARIANTS:
            t = _try(f"relay (compiled, 1 worker{RELAY_VARIANTS[variant]})", skipped,
                     partial(env.start_relay, 1, False, variant=variant))
            if t:
                targets.append(t)
    if wanted("relay") and args.redis:
        for mode in ("standalone", "cluster"):
            t = _try(f"relay (compiled, 1 worker, Redis {mode})", skipped,
                     partial(env.start_relay, 1, False, redis_mode=mode))
            if t:
                targets.append(t)
    if tools.litellm is not None:
        for workers in (1, 2):
            t = _try(f"LiteLLM ({_workers(workers)})", skipped,
                     partial(env.start_litellm, tools.litellm, tools.litellm_version or "", workers))
            if t:
                targets.append(t)
    if tools.portkey and tools.node:
        t = _try("Portkey gateway", skipped,
                 lambda: env.start_portkey(tools.node or "", tools.portkey or "", tools.portkey_version or ""))
        if t:
            targets.append(t)
    return targets


def _alive(target: Target, crashes: list[dict[str, str]], when: str) -> bool:
    proc = target.proc
    if proc is None or proc.popen.poll() is None:
        return True
    crashes.append({"target": target.key, "when": when,
                    "exit": str(proc.popen.returncode), "log": proc.log_tail(40)})
    say(f"!! {target.label} exited ({proc.popen.returncode}) {when}; log tail:\n{proc.log_tail(15)}")
    return False


def _throughput(targets: list[Target], s: Settings, runs: list[Run],
                crashes: list[dict[str, str]], skipped: dict[str, str], procs: Processes) -> None:
    live = list(targets)
    say(f"warm-up: {s.warmup_seconds:g} s per target")
    for t in live:
        measure_wrk(t, "warmup", 0, connections=s.connections, threads=s.threads,
                    seconds=s.warmup_seconds, vary=True)
    total = s.rounds * len(live)
    done = 0
    for r in range(1, s.rounds + 1):
        for t in rotated(live, r - 1):
            if not _alive(t, crashes, "before a miss run"):
                continue
            done += 1
            miss = measure_wrk(t, "miss64", r, connections=s.connections, threads=s.threads,
                               seconds=s.seconds, vary=True, suite=procs)
            lat = measure_wrk(t, "miss1", r, connections=1, threads=1,
                              seconds=s.latency_seconds, vary=True, suite=procs)
            runs += [miss, lat]
            say(f"[{done}/{total}] round {r} {t.label:34} miss: {miss.rps:9.0f} req/s "
                f"p50 {_ms(miss.p50_ms)} p99 {_ms(miss.p99_ms)} | 1 conn p50 {_ms(lat.p50_ms)}"
                + (f"  errors {miss.non_2xx + miss.socket_errors}" if miss.non_2xx + miss.socket_errors else "")
                + (f"  FAILED {miss.error}" if miss.error else ""))
            _alive(t, crashes, "after a miss run")
    # Cache hits: relay answers from memory; direct and nginx (which do not
    # cache) are rerun with the same identical body as the yardstick.
    hit_targets = [t for t in live if t.kind in ("direct", "nginx", "relay")]
    for t in hit_targets:
        if t.kind == "relay":
            # Each worker has its own memory cache and the kernel spreads new
            # connections over them: prime on several connections, then check.
            for _ in range(8 * (t.workers or 1)):
                preflight(t, body=static_body())
            why = preflight(t, body=static_body(), expect_cache=b"HIT")
            if why:
                skipped[f"{t.label} cache hit"] = why
                say(f"!! {t.label}: cache-hit preflight: {why}")
    for r in range(1, s.rounds + 1):
        for t in rotated(hit_targets, r - 1):
            if not _alive(t, crashes, "before a hit run"):
                continue
            hit = measure_wrk(t, "hit64", r, connections=s.connections, threads=s.threads,
                              seconds=s.seconds, vary=False, suite=procs)
            runs.append(hit)
            say(f"round {r} {t.label:34} same body: {hit.rps:9.0f} req/s p50 {_ms(hit.p50_ms)}"
                + (f"  FAILED {hit.error}" if hit.error else ""))


# Consecutive unique-body runs after which a worker's RSS is read: a cache
# that is full, pools and allocator that are warm must not keep growing.
GROWTH_RUNS = 10


def _memory_growth(targets: list[Target], s: Settings,
                   crashes: list[dict[str, str]]) -> list[dict[str, object]]:
    """RSS of relay (compiled, 1 worker) after each of GROWTH_RUNS runs, every
    feature on and every feature off; the growth is last over first."""
    out: list[dict[str, object]] = []
    for t in targets:
        if t.kind != "relay" or t.workers != 1 or t.impl != "compiled" or t.variant not in ("", "off"):
            continue
        rss: list[float] = []
        for n in range(1, GROWTH_RUNS + 1):
            if not _alive(t, crashes, "during the memory runs"):
                break
            run = measure_wrk(t, "growth", n, connections=s.connections, threads=s.threads,
                              seconds=s.latency_seconds, vary=True)
            if run.error or run.rss_mb is None:
                break
            rss.append(round(run.rss_mb, 1))
        if len(rss) == GROWTH_RUNS:
            growth = (rss[-1] - rss[0]) / rss[0] * 100
            out.append({"target": t.key, "label": t.label, "rss_mb": rss,
                        "growth_pct": round(growth, 2)})
            say(f"{t.label:34} RSS over {GROWTH_RUNS} runs: {rss[0]:.1f} -> {rss[-1]:.1f} MB "
                f"({growth:+.1f}%)")
    return out


def _streaming(env: Env, targets: list[Target], tools: Tools, args: argparse.Namespace,
               wanted: Callable[[str], bool], s: Settings, skipped: dict[str, str],
               crashes: list[dict[str, str]]) -> list[StreamRun]:
    stream_targets = [t for t in targets if t.kind in ("direct", "nginx") and t.fast]
    if wanted("relay"):
        for pure in ([False] if args.no_pure else [False, True]):
            t = _try(f"relay streaming ({'pure' if pure else 'compiled'})", skipped,
                     partial(env.start_relay, 1, pure, stream=True))
            if t:
                stream_targets.append(t)
    stream_targets += [t for t in targets if t.key in ("litellm-1", "portkey") and t.fast]
    out: list[StreamRun] = []
    for r in range(1, s.rounds + 1):
        for t in rotated(stream_targets, r - 1):
            if not _alive(t, crashes, "before a stream"):
                continue
            got = measure_streams(t, r, s.fast_streams)
            out += got
            fast = [g for g in got if g.kind == "fast" and g.error is None]
            slow = [g for g in got if g.kind == "slow"]
            failed = [g for g in got if g.error]
            line = f"round {r} {t.label:34} streams ok {len(fast)}/{s.fast_streams}"
            if fast:
                ttfe = sorted(g.ttfe_ms or 0 for g in fast)[len(fast) // 2]
                line += f", first event {ttfe:.2f} ms, {fast[0].events} events"
            if slow and slow[0].spread_ms is not None:
                line += f", slow spread {slow[0].spread_ms:.0f} ms"
            if failed:
                line += f", FAILED: {failed[0].error}"
            say(line)
    return out


def _workers(n: int) -> str:
    return f"{n} worker" + ("s" if n > 1 else "")


def _ms(value: float | None) -> str:
    return "   -    " if value is None else f"{value:7.2f}ms"


if __name__ == "__main__":
    raise SystemExit(main())

"""Results -> summary -> docs/benchmarks.md (+ chart), and the console table."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from .tools import Tools

__all__ = ["console_table", "draw_chart", "machine_facts", "summarise", "write_markdown"]

BEGIN = "<!-- results:begin (written by python -m benchmarks.run; edits inside are replaced) -->"
END = "<!-- results:end -->"
ORDER = {"direct": 0, "nginx": 1, "relay": 2, "litellm": 3, "portkey": 4}


# ---------------------------------------------------------------- facts
def _cmd(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (proc.stdout + proc.stderr).strip()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def machine_facts(repo: Path, tools: Tools, settings: dict[str, Any], started: float) -> dict[str, Any]:
    cpu = "?"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else "?"
    except OSError:
        pass
    os_name = "?"
    try:
        m = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else "?"
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = _cmd(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = bool(_cmd(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no",
                       "relay"]))
    ext = _cmd([sys.executable, "-c",
                "import relay._fast as f; print(f.IMPLEMENTATION, f.COMPILED_IMPORT_ERROR or '')"])
    versions = {
        "relay": f"{_relay_version(repo)} (git {commit}{', modified' if dirty else ''})",
        "relay extensions": ext.split()[0] if ext else "?",
        "Python": platform.python_version(),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "nginx": _cmd([tools.nginx, "-v"]).replace("nginx version: nginx/", "") if tools.nginx else "-",
        "wrk": (_cmd([tools.wrk, "-v"]).split("[")[0].replace("wrk ", "").strip()
                if tools.wrk else "-"),
        "LiteLLM": tools.litellm_version or "-",
        "Portkey gateway": tools.portkey_version or "-",
        "Node.js": _cmd([tools.node, "--version"]) if tools.node else "-",
    }
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
        "duration_s": round(time.time() - started),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gb": round(mem_gb, 1),
            "os": os_name,
            "kernel": platform.release(),
        },
        "versions": versions,
        "settings": settings,
    }


def _relay_version(repo: Path) -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (repo / "pyproject.toml").read_text(), re.M)
    return m.group(1) if m else "?"


# -------------------------------------------------------------- summary
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _short(t: dict[str, Any]) -> str:
    kind = t["kind"]
    w = t.get("workers")
    if kind == "direct":
        return "direct"
    if kind == "nginx":
        return f"nginx ({w}w)"
    if kind == "relay":
        variant = t.get("variant")
        return f"relay {t['impl']} {w}w" + (f" {variant}" if variant else "")
    if kind == "litellm":
        return f"LiteLLM {w}w"
    return "Portkey"


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, dict[str, Any]] = results["targets"]
    rows: list[dict[str, Any]] = []
    by_key: dict[str, dict[str, Any]] = {}
    for key, t in targets.items():
        mine = [r for r in results["runs"] if r["target"] == key and not r["error"]]
        miss = [r for r in mine if r["scenario"] == "miss64"]
        one = [r for r in mine if r["scenario"] == "miss1"]
        hit = [r for r in mine if r["scenario"] == "hit64"]
        failed = [r for r in results["runs"] if r["target"] == key and r["error"]]
        row: dict[str, Any] = {"key": key, "label": t["label"], "kind": t["kind"],
                               "workers": t["workers"], "impl": t["impl"], "short": _short(t)}
        rps = [r["rps"] for r in miss]
        row["miss_rps"] = _median(rps)
        row["miss_rps_min"] = min(rps) if rps else None
        row["miss_rps_max"] = max(rps) if rps else None
        row["miss_p50_ms"] = _median([r["p50_ms"] for r in miss])
        row["miss_p99_ms"] = _median([r["p99_ms"] for r in miss])
        row["cpu_cores"] = _median([r["cpu_cores"] for r in miss])
        row["cpu_us_per_req"] = _median([r["cpu_us_per_req"] for r in miss])
        rss = [r["rss_mb"] for r in mine if r["rss_mb"] is not None]
        row["rss_mb"] = max(rss) if rss else None
        row["p50_1conn_ms"] = _median([r["p50_ms"] for r in one])
        row["hit_rps"] = _median([r["rps"] for r in hit])
        row["hit_p50_ms"] = _median([r["p50_ms"] for r in hit])
        row["errors"] = sum(r["non_2xx"] + r["socket_errors"] for r in mine
                            if r["scenario"] in ("miss64", "miss1", "hit64"))
        row["requests"] = sum(r["requests"] for r in mine
                              if r["scenario"] in ("miss64", "miss1", "hit64"))
        row["failed_runs"] = [r["error"] for r in failed]
        row["rounds"] = len(miss)
        rows.append(row)
        by_key[key] = row
    direct = by_key.get("direct", {})
    nginx = by_key.get("nginx", {})
    for row in rows:
        for base_name, base in (("direct", direct), ("nginx", nginx)):
            row[f"miss_vs_{base_name}"] = _ratio(row["miss_rps"], base.get("miss_rps"))
            row[f"hit_vs_{base_name}"] = _ratio(row["hit_rps"], base.get("hit_rps"))
        row["hit_vs_miss"] = _ratio(row["hit_rps"], row["miss_rps"])
        if row["p50_1conn_ms"] is not None and direct.get("p50_1conn_ms") is not None:
            row["added_p50_ms"] = row["p50_1conn_ms"] - direct["p50_1conn_ms"]
        else:
            row["added_p50_ms"] = None
    rows.sort(key=lambda r: (ORDER.get(r["kind"], 9), r.get("impl") or "", r.get("workers") or 0))

    streams = _summarise_streams(results, targets)
    meta = results["meta"]
    mode = meta["settings"]["mode"]
    title = (f"relay benchmarks ({mode} run, {meta['date']}, {meta['machine']['cores']} cores, "
             f"same machine, same run)")
    other = [r.get("other_cores") for r in results["runs"]
             if r["scenario"] in ("miss64", "miss1", "hit64") and r.get("other_cores") is not None]
    background = ({"median": statistics.median(other), "max": max(other)} if other else None)
    return {"targets": rows, "streams": streams, "title": title, "background": background}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summarise_streams(results: dict[str, Any], targets: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    keys = list(dict.fromkeys(s["target"] for s in results["streams"]))
    for key in keys:
        mine = [s for s in results["streams"] if s["target"] == key]
        fast = [s for s in mine if s["kind"] == "fast"]
        ok = [s for s in fast if s["error"] is None]
        slow = [s for s in mine if s["kind"] == "slow"]
        slow_ok = [s for s in slow if s["error"] is None]
        label = targets.get(key, {}).get("label") or key
        kind = targets.get(key, {}).get("kind")
        if kind is None:
            kind = "relay" if key.startswith("relay") else key
            impl = "pure" if key.startswith("relay-p") else "compiled"
            label = f"relay ({impl}, 1 worker)" if kind == "relay" else key
        errors = sorted({s["error"] for s in mine if s["error"]})
        spreads = [s["spread_ms"] for s in slow_ok if s["spread_ms"] is not None]
        out.append({
            "key": key, "label": label, "kind": kind,
            "streams": len(fast), "ok": len(ok),
            "ttfe_ms": _median([s["ttfe_ms"] for s in ok]),
            "total_ms": _median([s["total_ms"] for s in ok]),
            "events_per_s": _median([s["events_per_s"] for s in ok]),
            "events": _median([s["events"] for s in ok]),
            "slow_spread_ms": _median(spreads),
            "slow_events": _median([s["events"] for s in slow_ok]),
            "errors": errors[:3],
        })
    direct = next((s for s in out if s["key"] == "direct"), None)
    for s in out:
        s["added_ttfe_ms"] = (s["ttfe_ms"] - direct["ttfe_ms"]
                              if direct and s["ttfe_ms"] is not None and direct["ttfe_ms"] is not None
                              else None)
        s["incremental"] = _incremental(s, direct)
    out.sort(key=lambda s: (ORDER.get(s["kind"], 9), s["label"]))
    return out


def _incremental(s: dict[str, Any], direct: dict[str, Any] | None) -> str:
    """Events passed on as they come: the slow stream keeps most of its spread."""
    spread = s["slow_spread_ms"]
    if spread is None:
        return "n/a (failed)"
    reference = direct["slow_spread_ms"] if direct and direct["slow_spread_ms"] else 450.0
    if spread >= 0.6 * reference:
        return f"yes ({spread:.0f} ms spread)"
    return f"NO: all within {spread:.0f} ms"


# ---------------------------------------------------------------- output
def _f(value: float | None, fmt: str = "{:,.0f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _x(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" if value >= 0.095 else f"{value:.4f}x"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) < 10:
        return f"{value:.2f} ms"
    return f"{value:,.0f} ms"


def _added(value: float | None) -> str:
    return "-" if value is None else ("+" if value >= 0 else "") + _ms(value)


def console_table(summary: dict[str, Any]) -> str:
    lines = [f"{'target':36} {'miss req/s':>11} {'x direct':>9} {'x nginx':>8} "
             f"{'p50':>9} {'p99':>9} {'+p50 1c':>10} {'hit req/s':>10} {'CPU':>5} {'RSS MB':>7}"]
    for r in summary["targets"]:
        lines.append(f"{r['label']:36} {_f(r['miss_rps']):>11} {_x(r['miss_vs_direct']):>9} "
                     f"{_x(r['miss_vs_nginx']):>8} {_ms(r['miss_p50_ms']):>9} "
                     f"{_ms(r['miss_p99_ms']):>9} {_added(r['added_p50_ms']):>10} "
                     f"{_f(r['hit_rps']):>10} {_f(r['cpu_cores'], '{:.2f}'):>5} "
                     f"{_f(r['rss_mb']):>7}")
    for s in summary["streams"]:
        lines.append(f"stream {s['label']:29} first event {_ms(s['ttfe_ms'])} "
                     f"({_added(s['added_ttfe_ms'])}), {_f(s['events_per_s'])} events/s, "
                     f"incremental {s['incremental']}"
                     + (f", errors {s['errors'][0][:80]}" if s["errors"] else ""))
    return "\n".join(lines)


def draw_chart(summary: dict[str, Any], png: Path, python: str | None) -> bool:
    if python is None:
        return False
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(summary, f)
        path = f.name
    try:
        proc = subprocess.run([python, str(Path(__file__).with_name("chart.py")), path, str(png)],
                              capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        print("chart failed:", proc.stderr[-800:], flush=True)
        return False
    return True


def _markdown_results(results: dict[str, Any], summary: dict[str, Any], png: Path | None,
                      docs: Path) -> str:
    meta = results["meta"]
    st = meta["settings"]
    m = meta["machine"]
    out: list[str] = []
    mode = "quick" if st["mode"] == "quick" else "full"
    out.append(f"## Results: {mode} run of {meta['date']}")
    out.append("")
    if mode == "quick":
        out.append("This is a **quick run** (`--quick`): short runs, so the figures are rougher "
                   "than a full run's. Rerun without `--quick` for the full measurement.")
        out.append("")
    out.append(f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, "
               f"Linux {m['kernel']}. Load generator, upstream and gateway share these cores.")
    bg = summary.get("background")
    if bg is not None:
        out.append("")
        quiet = "a quiet machine" if bg["median"] < 0.1 else "**not a quiet machine**"
        out.append(f"Other processes (not started by the suite) used a median of "
                   f"{bg['median']:.2f} cores (at most {bg['max']:.2f}) during the runs: "
                   f"{quiet}.")
    out.append("")
    out.append(f"Settings: {st['rounds']} interleaved rounds; each round runs every target for "
               f"{st['seconds']:g} s at {st['connections']} connections (wrk, {st['threads']} "
               f"threads) and {st['latency_seconds']:g} s at 1 connection; "
               f"{st['fast_streams']} streams of 200 events per target per round. "
               f"Figures are medians over the rounds. The whole run took "
               f"{meta['duration_s'] // 60} min {meta['duration_s'] % 60} s.")
    out.append("")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".")
    out.append("")
    rows = summary["targets"]
    relay = next((r for r in rows if r["key"] == "relay-c1"), None)
    if relay and relay["miss_rps"]:
        bits = [f"relay (compiled, 1 worker) served **{relay['miss_rps']:,.0f} req/s** on cache "
                f"misses with every feature on: {_x(relay['miss_vs_direct'])} of direct access"]
        if relay["miss_vs_nginx"]:
            bits.append(f"{_x(relay['miss_vs_nginx'])} of nginx")
        for key, name in (("litellm-1", "LiteLLM (1 worker)"), ("portkey", "Portkey")):
            other = next((r for r in rows if r["key"] == key), None)
            if other and other["miss_rps"]:
                bits.append(f"{relay['miss_rps'] / other['miss_rps']:,.0f}x {name}")
        line = ", ".join(bits) + "."
        if relay["added_p50_ms"] is not None:
            line += (f" It adds {_added(relay['added_p50_ms'])} to the median latency of a "
                     f"single connection.")
        out.append(line)
        out.append("")
    out.append("### Proxied request, cache miss, every feature on")
    out.append("")
    out.append("Each request has a different body (a wrk Lua script), so relay's cache is "
               "consulted and misses every time; the rate limiter is consulted and never "
               "trips; breaker, metrics and cost accounting run as in production. "
               "\"x direct\" and \"x nginx\" are req/s ratios to direct access and to nginx in "
               "the same run. CPU is the target's own processes (cores busy during the run; "
               "µs of CPU per request), RSS the peak summed over them.")
    out.append("")
    out.append("| target | req/s (64 conn) | x direct | x nginx | p50 | p99 | added p50 at 1 conn "
               "| CPU cores | CPU µs/req | RSS MB | errors |")
    out.append("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        added = (f"(p50 {_ms(r['p50_1conn_ms'])})" if r["kind"] == "direct"
                 else _added(r["added_p50_ms"]))
        out.append(
            f"| {r['label']} | {_f(r['miss_rps'])} | {_x(r['miss_vs_direct'])} "
            f"| {_x(r['miss_vs_nginx'])} | {_ms(r['miss_p50_ms'])} | {_ms(r['miss_p99_ms'])} "
            f"| {added} | {_f(r['cpu_cores'], '{:.2f}')} | {_f(r['cpu_us_per_req'])} "
            f"| {_f(r['rss_mb'])} | {r['errors']:,} of {r['requests']:,} |")
    out.append("")
    hits = [r for r in rows if r["hit_rps"]]
    if hits:
        out.append("### Identical body: relay's cache hit")
        out.append("")
        out.append("The same body every time: relay answers from its memory cache (checked "
                   "with `X-Relay-Cache: HIT` before the runs); direct and nginx, which do "
                   "not cache, are rerun with that body as the yardstick.")
        out.append("")
        out.append("| target | req/s (64 conn) | x direct | x nginx | x its own miss | p50 |")
        out.append("|---|--:|--:|--:|--:|--:|")
        for r in hits:
            out.append(f"| {r['label']} | {_f(r['hit_rps'])} | {_x(r['hit_vs_direct'])} "
                       f"| {_x(r['hit_vs_nginx'])} | {_x(r['hit_vs_miss'])} "
                       f"| {_ms(r['hit_p50_ms'])} |")
        out.append("")
    pure = {r["workers"]: r for r in rows if r["kind"] == "relay" and r["impl"] == "pure"}
    comp = {r["workers"]: r for r in rows if r["kind"] == "relay" and r["impl"] == "compiled"}
    notes = []
    for w in sorted(set(pure) & set(comp)):
        if pure[w]["miss_rps"] and comp[w]["miss_rps"]:
            notes.append(f"{w} worker{'s' if w > 1 else ''}: compiled / pure = "
                         f"{comp[w]['miss_rps'] / pure[w]['miss_rps']:.2f}x on misses"
                         + (f", {comp[w]['hit_rps'] / pure[w]['hit_rps']:.2f}x on hits"
                            if comp[w]["hit_rps"] and pure[w]["hit_rps"] else ""))
    for impl, group in (("compiled", comp), ("pure", pure)):
        if 1 in group and 2 in group and group[1]["miss_rps"] and group[2]["miss_rps"]:
            notes.append(f"{impl}: 2 workers / 1 worker = "
                         f"{group[2]['miss_rps'] / group[1]['miss_rps']:.2f}x on misses")
    if notes:
        out.append("Compiled vs pure Python (`RELAY_NO_EXTENSIONS=1`), 1 vs 2 workers: "
                   + "; ".join(notes) + ".")
        out.append("")
    if summary["streams"]:
        out.append("### Streaming (SSE)")
        out.append("")
        out.append("A chat completion streamed as 200 events by relay's fake upstream, sent "
                   "at once; one client, one stream at a time, each with a new body (no cache "
                   "hit). First event = from sending the request to the first complete event; "
                   "events/s = events / time to the last event. Incremental = a 10-event "
                   "stream with 50 ms between events still arrives spread out (not held back "
                   "and sent in one piece).")
        out.append("")
        out.append("| target | streams ok | first event | added | events/s | events | "
                   "incremental | failure |")
        out.append("|---|--:|--:|--:|--:|--:|---|---|")
        for s in summary["streams"]:
            err = s["errors"][0].replace("|", "/")[:120] if s["errors"] else ""
            out.append(f"| {s['label']} | {s['ok']}/{s['streams']} | {_ms(s['ttfe_ms'])} "
                       f"| {_added(s['added_ttfe_ms']) if s['kind'] != 'direct' else '-'} "
                       f"| {_f(s['events_per_s'])} | {_f(s['events'])} | {s['incremental']} "
                       f"| {err} |")
        out.append("")
    if png is not None:
        rel = os.path.relpath(png, docs.parent)
        out.append(f"![requests/s and added latency per target]({rel})")
        out.append("")
    memory = results.get("memory")
    if memory:
        out.append("### Memory over consecutive runs")
        out.append("")
        out.append(f"After the runs above, {len(memory[0]['rss_mb'])} more unique-body runs, "
                   "each followed by the worker's RSS: the memory cache is full (10,000 "
                   "entries) and evicts, so the figure must stay flat.")
        out.append("")
        out.append("| target | RSS MB, first run | RSS MB, last run | growth |")
        out.append("|---|--:|--:|--:|")
        for row in memory:
            out.append(f"| {row['label']} | {row['rss_mb'][0]:.1f} | {row['rss_mb'][-1]:.1f} "
                       f"| {row['growth_pct']:+.1f}% |")
        out.append("")
    prof = results.get("profile")
    if prof and prof.get("self"):
        out.append("### Where relay's time goes (py-spy, compiled, 1 worker, cache misses)")
        out.append("")
        out.append(f"{prof.get('samples', 0):,} samples at "
                   f"{prof.get('rps_while_sampled', 0):,.0f} req/s (sampling slows it). "
                   "Self time = the function itself was on top of the stack.")
        out.append("")
        out.append("| self % | function |")
        out.append("|--:|---|")
        for name, share in prof["self"][:15]:
            out.append(f"| {share:.1f} | `{name}` |")
        out.append("")
        if prof.get("inclusive"):
            out.append("| inclusive % | function |")
            out.append("|--:|---|")
            for name, share in prof["inclusive"][:15]:
                out.append(f"| {share:.1f} | `{name}` |")
            out.append("")
    problems = []
    for name, why in results["skipped"].items():
        problems.append(f"- skipped **{name}**: {why.splitlines()[0][:300]}")
    for c in results["crashes"]:
        problems.append(f"- **{c['target']}** exited ({c['exit']}) {c['when']}")
    for r in rows:
        if r["failed_runs"]:
            problems.append(f"- {r['label']}: {len(r['failed_runs'])} run(s) failed: "
                            f"{r['failed_runs'][0][:200]}")
    if problems:
        out.append("### Left out or failed")
        out.append("")
        out += problems
        out.append("")
    return "\n".join(out)


_DEFAULT_HEAD = """# Benchmarks

How much relay adds to a request, measured against direct access, nginx and
other AI gateways on the same machine in the same run. Rerun it with
`python -m benchmarks.run` (see `benchmarks/README.md`).

"""


def write_markdown(docs: Path, results: dict[str, Any], summary: dict[str, Any],
                   png: Path | None) -> None:
    body = _markdown_results(results, summary, png, docs)
    block = f"{BEGIN}\n\n{body}\n{END}"
    text = docs.read_text() if docs.exists() else _DEFAULT_HEAD + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text)

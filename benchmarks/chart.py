"""Draw docs/benchmarks.png from a results summary (run by benchmarks/report.py).

Standalone on purpose: it runs under whichever Python has matplotlib, which
need not be relay's own environment.

    python benchmarks/chart.py SUMMARY.json OUT.png
"""

from __future__ import annotations

import json
import sys


def main(summary_path: str, out_path: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(summary_path) as f:
        summary = json.load(f)
    rows = [r for r in summary["targets"] if r.get("miss_rps")]
    if not rows:
        return 1
    labels = [r["short"] for r in rows]
    colors = {"direct": "#8c8c8c", "nginx": "#2f7d32", "relay": "#1f5fbf",
              "litellm": "#c0392b", "portkey": "#8e44ad"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=90,
                                   gridspec_kw={"width_ratios": [3, 2]})
    y = list(range(len(rows)))[::-1]
    miss = [r["miss_rps"] for r in rows]
    err_lo = [r["miss_rps"] - r["miss_rps_min"] for r in rows]
    err_hi = [r["miss_rps_max"] - r["miss_rps"] for r in rows]
    ax1.barh(y, miss, height=0.38, align="edge",
             color=[colors.get(r["kind"], "#555") for r in rows],
             xerr=[err_lo, err_hi], error_kw={"elinewidth": 0.8, "capsize": 2},
             label="cache miss, every feature on")
    hits = [(yy - 0.38, r["hit_rps"]) for yy, r in zip(y, rows, strict=True) if r.get("hit_rps")]
    if hits:
        ax1.barh([h[0] for h in hits], [h[1] for h in hits], height=0.38, align="edge",
                 color="#7fb2f0", label="identical body (relay: cache hit)")
    ax1.set_xscale("log")
    ax1.set_yticks([yy for yy in y])
    ax1.set_yticklabels(labels, fontsize=8)
    ax1.set_xlabel("requests/s at 64 connections (log scale; bars = median, whiskers = min..max)",
                   fontsize=7.5)
    from matplotlib.patches import Patch

    handles = [Patch(color=colors["relay"], label="cache miss, every feature on"),
               Patch(color="#7fb2f0", label="identical body (relay: cache hit)")]
    ax1.legend(handles=handles, fontsize=7, loc="lower right")
    ax1.set_xlim(right=max(r["miss_rps_max"] for r in rows) * 6)
    ax1.grid(axis="x", which="both", alpha=0.25)
    for yy, r in zip(y, rows, strict=True):
        ax1.text(r["miss_rps_max"] * 1.15, yy + 0.19, f"{r['miss_rps']:,.0f}", va="center",
                 fontsize=7)

    lat = [(yy, r) for yy, r in zip(y, rows, strict=True) if r.get("added_p50_ms") is not None
           and r["kind"] != "direct"]
    if lat:
        vals = [max(r["added_p50_ms"], 0.001) for _, r in lat]
        ax2.barh([yy for yy, _ in lat], vals, height=0.6,
                 color=[colors.get(r["kind"], "#555") for _, r in lat])
        ax2.set_xscale("log")
        ax2.set_yticks(y)
        ax2.set_yticklabels([""] * len(y))
        ax2.set_xlabel("added median latency at 1 connection, ms (log scale)", fontsize=7.5)
        ax2.grid(axis="x", which="both", alpha=0.25)
        for (yy, r), v in zip(lat, vals, strict=True):
            ax2.text(v * 1.1, yy, f"+{r['added_p50_ms']:.3g} ms", va="center", fontsize=7)
        ax2.set_ylim(ax1.get_ylim())
        ax2.set_xlim(right=max(vals) * 12)
    fig.suptitle(summary.get("title", "relay benchmarks"), fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=90)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))

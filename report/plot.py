"""The report's figure: per-site epsilon over rounds (matplotlib, returned as PNG bytes)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: no display at a site or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _run_of(site: dict) -> dict | None:
    return next((r for r in site["runs"] if r["run_id"] == site["focus_run"]), None)


def epsilon_plot(report: dict) -> bytes:
    """ε of the run after each round, per site (RDP solid, PRV dashed), budgets dotted."""
    central = report.get("central_dp")
    ncols = 2 if central else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.4 * ncols, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    limits: list[tuple[float, str, str, str]] = []
    top = 0.0
    for i, site in enumerate(report["sites"]):
        run = _run_of(site)
        if run is None:
            continue
        c = colors[i % len(colors)]
        xs = [0] + [r["round"] for r in run["rounds"]]  # nothing spent before round 1
        ax.plot(xs, [0.0] + [r["epsilon_run_rdp"] for r in run["rounds"]], "-o", color=c,
                ms=4, label=f"{site['site_id']} (RDP)")
        ax.plot(xs, [0.0] + [r["epsilon_run_prv"] for r in run["rounds"]], "--", color=c,
                alpha=0.7, label=f"{site['site_id']} (PRV)")
        for d in run["declines"][:1]:
            ax.axvline(d["round"] - 0.5, color=c, lw=1, alpha=0.5)
            ax.annotate(f"{site['site_id']} declined", (d["round"] - 0.5, 0.98), color=c,
                        xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        xytext=(3, 0), textcoords="offset points", va="top")
        plan = run.get("plan") or {}
        for key, style, name in (("target_epsilon", ":", "target"), ("max_epsilon", "-.",
                                                                      "budget")):
            if plan.get(key):
                limits.append((plan[key], style, c, f"{site['site_id']} {name}"))
        top = max([top, *(r["epsilon_run_rdp"] for r in run["rounds"])])
    for value, style, c, label in limits:
        if value <= 3 * top:  # a far-away limit (e.g. no real target) would flatten the curves
            ax.axhline(value, color=c, ls=style, lw=1, alpha=0.7, label=label)
            top = max(top, value)
    ax.set_xlabel("round")
    ax.set_ylabel("ε of this run (sample-level, per site)")
    ax.set_title(f"Per-site ε over rounds — run {report.get('run_id')}", fontsize=10)
    ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    if central:
        ax2 = axes[0][1]
        rounds = central["rounds"]
        ax2.plot([r["round"] for r in rounds], [r["epsilon_rdp"] for r in rounds], "-o", ms=4,
                 label="RDP")
        ax2.plot([r["round"] for r in rounds], [r["epsilon_prv"] for r in rounds], "--",
                 label="PRV")
        ax2.set_xlabel("round")
        ax2.set_ylabel("ε (site-level, central DP)")
        ax2.set_title(f"Site-level ε (δ = {central['delta']:g})", fontsize=10)
        ax2.set_ylim(bottom=0)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()

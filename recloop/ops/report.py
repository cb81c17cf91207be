"""``recloop report``: learning curves, lag and freshness of a run, as PNGs and one HTML page.

Built from storage alone (the ``Outcome`` windows and ``Sample`` series the monitor writes),
so a report can be made after the loop has stopped, on another machine. The HTML page embeds
its plots as data URIs: one file, viewable offline.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are files, never windows
import matplotlib.pyplot as plt  # noqa: E402

from recloop.storage.store import Outcome, Storage  # noqa: E402


@dataclass(frozen=True)
class ArmSummary:
    """Episode-weighted totals of one policy arm over a run (or a part of it)."""

    policy: str
    episodes: int
    mean_return: float
    ctr: float
    clicked_quality: float
    versions: int
    return_ci95: float | None = None
    """Half-width of the mean return's 95% confidence interval (normal approximation over
    the arm's sessions); None when a window recorded no spread or there are < 2 sessions."""


def summarise(outcomes: list[Outcome], learned_only: bool = False) -> list[ArmSummary]:
    """Per policy: episode-weighted mean return, CTR and clicked quality.

    ``learned_only`` leaves out version 0 (what a policy served before its first snapshot).
    """
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        if learned_only and o.version == 0:
            continue
        groups[o.policy].append(o)
    out = []
    for policy, rows in sorted(groups.items()):
        episodes = sum(o.episodes for o in rows)
        slates = sum(o.served_slates for o in rows)
        if not episodes:
            continue
        clicks = sum(o.ctr * o.served_slates for o in rows)
        out.append(
            ArmSummary(
                policy=policy,
                episodes=episodes,
                mean_return=sum(o.mean_return * o.episodes for o in rows) / episodes,
                ctr=clicks / max(1, slates),
                clicked_quality=sum(o.clicked_quality * o.ctr * o.served_slates for o in rows)
                / max(1e-9, clicks),
                versions=len({o.version for o in rows}),
                return_ci95=_return_ci95(rows),
            )
        )
    return out


def _return_ci95(rows: list[Outcome]) -> float | None:
    """The pooled windows' 95% half-width: the sum of squares within each window plus each
    window's deviation from the pooled mean gives the variance over all sessions."""
    n = sum(o.episodes for o in rows)
    if n < 2 or any(o.return_sd is None for o in rows):
        return None
    mean = sum(o.mean_return * o.episodes for o in rows) / n
    squares = sum(
        (o.episodes - 1) * (o.return_sd or 0.0) ** 2 + o.episodes * (o.mean_return - mean) ** 2
        for o in rows
    )
    return 1.96 * math.sqrt(squares / (n - 1) / n)


def _curve(outcomes: list[Outcome], attr: str) -> dict[str, tuple[list[float], list[float]]]:
    """Per policy: window end (seconds since the first window) and the window's value."""
    if not outcomes:
        return {}
    t0 = min(o.window_start for o in outcomes)
    per: dict[str, dict[float, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
    for o in outcomes:
        per[o.policy][(o.window_end - t0).total_seconds()].append(o)
    curves = {}
    for policy, windows in per.items():
        xs, ys = [], []
        for x in sorted(windows):
            rows = windows[x]
            weight = sum(r.episodes for r in rows)
            if weight:
                xs.append(x)
                ys.append(sum(getattr(r, attr) * r.episodes for r in rows) / weight)
        curves[policy] = (xs, ys)
    return curves


def _version_changes(outcomes: list[Outcome]) -> dict[str, list[tuple[float, int]]]:
    """Per policy that served several versions: (window end, version) where the version that
    served most of a window's episodes changes, so a curve shows which snapshot it reflects."""
    if not outcomes:
        return {}
    t0 = min(o.window_start for o in outcomes)
    per: dict[str, dict[float, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for o in outcomes:
        window = per[o.policy][(o.window_end - t0).total_seconds()]
        window[o.version] = window.get(o.version, 0) + o.episodes
    marks: dict[str, list[tuple[float, int]]] = {}
    for policy, windows in per.items():
        if len({v for w in windows.values() for v in w}) < 2:
            continue
        previous = None
        for x in sorted(windows):
            version = max(windows[x], key=lambda v: (windows[x][v], v))
            if version != previous:
                marks.setdefault(policy, []).append((x, version))
                previous = version
    return marks


def _plot_curves(curves, title: str, ylabel: str, path: Path, marks=None) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    for policy, (xs, ys) in sorted(curves.items()):
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=policy)
        at = dict(zip(xs, ys, strict=True))
        for x, version in (marks or {}).get(policy, []):
            if x in at:
                ax.annotate(
                    f"v{version}",
                    (x, at[x]),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=7,
                    color=line.get_color(),
                )
    ax.set_title(title)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_series(series: dict[str, tuple[list[float], list[float]]], title: str, path: Path):
    """Counts (messages) on the left axis, durations (``*_seconds``) on the right: one shared
    axis would flatten seconds of freshness under thousands of messages of lag."""
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    durations = {n for n in series if n.endswith("_seconds")}
    right = ax.twinx() if durations and len(durations) < len(series) else None
    colours = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    for name, (xs, ys) in sorted(series.items()):
        axis = right if right is not None and name.endswith("_seconds") else ax
        axis.plot(xs, ys, marker=".", label=name, color=next(colours))
    ax.set_title(title)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("seconds" if series and durations == set(series) else "messages")
    ax.grid(alpha=0.3)
    if right is not None:
        right.set_ylabel("seconds")
    handles = [h for a in (ax, right) if a is not None for h in a.get_legend_handles_labels()[0]]
    if handles:  # under the axes: with two y-axes, no corner inside is free for sure
        ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                  ncol=len(handles), frameon=False)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def build_report(storage: Storage, run_id: str, out_dir: Path) -> Path:
    """Write PNG plots and ``index.html`` for ``run_id`` into ``out_dir``; return the page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = storage.outcome_series(run_id)
    run = storage.get_run(run_id)
    marks = _version_changes(outcomes)
    pngs = [
        _plot_curves(
            _curve(outcomes, "mean_return"),
            "Learning curve: mean session return (labels: policy version)",
            "return per session",
            out_dir / "learning_curve.png",
            marks,
        ),
        _plot_curves(
            _curve(outcomes, "ctr"),
            "Click-through rate per slate",
            "CTR",
            out_dir / "ctr.png",
            marks,
        ),
    ]
    t0 = min((o.window_start for o in outcomes), default=None)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for name in (
        "learner_lag_messages",
        "learner_lag_seconds",
        "freshness_seconds",
        "model_age_seconds",
    ):
        points = storage.samples(run_id, name)
        if points and t0 is not None:
            series[name] = (
                [(p.ts - t0).total_seconds() for p in points],
                [p.value for p in points],
            )
    pngs.append(_plot_series(series, "Learner lag and model freshness", out_dir / "lag.png"))
    page = out_dir / "index.html"
    page.write_text(_html(run_id, run, summarise(outcomes), summarise(outcomes, True), pngs))
    return page


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _rows(summary: list[ArmSummary]) -> str:
    def fmt(x: float) -> str:
        return "-" if math.isnan(x) else f"{x:.3f}"

    def ci(s: ArmSummary) -> str:
        return "" if s.return_ci95 is None else f" ± {s.return_ci95:.2f}"

    return "".join(
        f"<tr><td>{html.escape(s.policy)}</td><td>{s.episodes}</td>"
        f"<td>{s.mean_return:.2f}{ci(s)}</td>"
        f"<td>{fmt(s.ctr)}</td><td>{fmt(s.clicked_quality)}</td><td>{s.versions}</td></tr>"
        for s in summary
    )


def _html(run_id: str, run: dict, overall, learned, pngs: list[Path]) -> str:
    head = (
        "<tr><th>policy</th><th>episodes</th><th>mean return (± 95% CI)</th><th>CTR</th>"
        "<th>clicked quality</th><th>versions</th></tr>"
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>recloop report {html.escape(run_id)}</title>
<style>body{{font-family:sans-serif;max-width:60rem;margin:2rem auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3rem .6rem;text-align:right}}
img{{max-width:100%;display:block;margin:1rem 0}}</style></head>
<body><h1>recloop run {html.escape(run_id)}</h1>
<p>started {html.escape(str(run.get("started")))}, ended {html.escape(str(run.get("ended")))}</p>
<h2>All episodes, by the policy arm that served most of each session</h2>
<table id="overall">{head}{_rows(overall)}</table>
<h2>Only slates served by learned versions (v &ge; 1)</h2>
<table id="learned">{head}{_rows(learned)}</table>
{"".join(_img(p) for p in pngs)}
</body></html>
"""

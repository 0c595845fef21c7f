"""What a run of ``python -m benchmarks.apps`` measured, and its report: Markdown, JSON and a PNG chart.

Every figure of a pair is a ratio of its two apps measured in the same round, one right after the other
(A then B); the summary is the median over rounds, with the lowest and highest beside it.
"""

from __future__ import annotations

import json
import math
import statistics
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._pairs import BARE, FASTAPI_ASYNC, Pair
from ._serve import App
from ._wrk import WrkResult

__all__ = ["PairResult", "Round", "Run", "Window", "evaluate_targets", "render_markdown", "write_chart"]

Side = Literal["ours", "peer"]


@dataclass(frozen=True)
class Window:
    """One app under load for one window: wrk's report, its warm-up's, and the app's CPU time."""

    result: WrkResult
    warmup: WrkResult | None  # None with --warmup 0
    cpu_seconds: float  # the app's processes, user + system, over the window

    @property
    def failed(self) -> int:
        """Failed requests, warm-up included."""
        return self.result.errors + (self.warmup.errors if self.warmup else 0)

    @property
    def cpu_per_request(self) -> float:
        """Seconds of the app's CPU per completed request."""
        return self.cpu_seconds / self.result.requests if self.result.requests else math.nan

    def problems(self) -> list[str]:
        """What makes this window invalid as a measurement: any failed request, warm-up included."""
        found = []
        if self.warmup is not None and self.warmup.errors:
            found.append(f"warm-up: {self.warmup.describe_errors()}")
        if self.result.errors:
            found.append(self.result.describe_errors())
        if self.result.requests == 0:
            found.append("no request completed")
        return found


@dataclass(frozen=True)
class Round:
    number: int  # from 1
    ours: Window
    peer: Window

    def side(self, which: Side) -> Window:
        return self.ours if which == "ours" else self.peer

    @property
    def throughput_ratio(self) -> float:
        return _ratio(self.ours.result.throughput, self.peer.result.throughput)

    @property
    def cpu_ratio(self) -> float:
        return _ratio(self.ours.cpu_per_request, self.peer.cpu_per_request)


@dataclass
class PairResult:
    pair: Pair
    rounds: list[Round] = field(default_factory=list)

    def app(self, which: Side) -> App:
        return self.pair.ours if which == "ours" else self.pair.peer

    @property
    def throughput_ratios(self) -> list[float]:
        return [r.throughput_ratio for r in self.rounds]

    @property
    def cpu_ratios(self) -> list[float]:
        return [r.cpu_ratio for r in self.rounds]

    def median(self, which: Side, value: Callable[[Window], float]) -> float:
        return _median([value(r.side(which)) for r in self.rounds])

    def failed(self, which: Side) -> int:
        return sum(r.side(which).failed for r in self.rounds)

    def problems(self) -> list[str]:
        return [
            f"{self.pair.key}, round {r.number}, {self.app(which).label}: {problem}"
            for r in self.rounds
            for which in ("ours", "peer")
            for problem in r.side(which).problems()
        ]


@dataclass
class Run:
    meta: dict[str, Any]
    pairs: list[PairResult] = field(default_factory=list)

    def problems(self) -> list[str]:
        return [problem for pair in self.pairs for problem in pair.problems()]

    def get(self, key: str) -> PairResult | None:
        return next((p for p in self.pairs if p.pair.key == key and p.rounds), None)


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def _range(values: list[float], digits: int = 2) -> str:
    """The median, bold, and the lowest and highest over rounds when there are several."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mid = f"**{statistics.median(values):.{digits}f}**"
    return mid if len(values) == 1 else f"{mid} ({min(values):.{digits}f}–{max(values):.{digits}f})"


# -- targets ------------------------------------------------------------------------------------------


def evaluate_targets(run: Run) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target; met is None where a pair was not measured."""
    rows: list[tuple[str, str, bool | None]] = []

    def add(goal: str, measured: str, met: bool, *results: PairResult) -> None:
        # A pair with failed requests measured nothing: its figure is shown, but not judged.
        if any(result.problems() for result in results):
            rows.append((goal, f"{measured} (not valid: requests failed)", None))
        else:
            rows.append((goal, measured, met))

    for result in run.pairs:
        pair = result.pair
        if pair.min_throughput is not None:
            ratio = _median(result.throughput_ratios)
            goal = f"{pair.label}: throughput ≥ {pair.min_throughput:.2f}× {pair.peer.label}"
            add(goal, f"{ratio:.2f}", ratio >= pair.min_throughput, result)
        if pair.max_cpu is not None:
            ratio = _median(result.cpu_ratios)
            goal = f"{pair.label}: CPU per request ≤ {pair.max_cpu:.2f}× {pair.peer.label}"
            add(goal, f"{ratio:.2f}", ratio <= pair.max_cpu, result)
    ours, bare = run.get(FASTAPI_ASYNC), run.get(BARE)
    goal = (
        "loopbridge never below the bare mechanism: FastAPI async def, throughput ratio to the asyncpg "
        "pool on uvicorn's loop ≥ the bare mechanism's"
    )
    if ours is None or bare is None:
        rows.append((goal, "needs pairs fastapi-async and bare", None))
    else:
        a, b = _median(ours.throughput_ratios), _median(bare.throughput_ratios)
        cpu_a, cpu_b = _median(ours.cpu_ratios), _median(bare.cpu_ratios)
        add(goal, f"{a:.2f} vs {b:.2f} (CPU per request: {cpu_a:.2f} vs {cpu_b:.2f})", a >= b, ours, bare)
    return rows


# -- Markdown -----------------------------------------------------------------------------------------


def render_markdown(run: Run) -> str:
    meta = run.meta
    out: list[str] = []
    out.append(
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, commit {meta['commit']}: "
        f"{meta['rounds']} round(s); in each, the two apps of a pair one after the other (A, B), each "
        f"loaded by `wrk -t1 -c{meta['connections']} -d{meta['duration']:g}s --latency` after "
        f"{meta['warmup']:g} s of warm-up. loopbridge's bridge loop: {meta['bridge_loop']}. Load "
        f"average {meta['load_before']} before, {meta.get('load_after', '?')} after."
    )
    out.append("")
    problems = run.problems()
    if problems:
        out.append("> **NOT A VALID MEASUREMENT: requests failed.** A run with errors measures nothing:")
        out.extend(f"> - {problem}" for problem in problems)
        out.append("")
    out.append(
        "**Each pair: loopbridge (A) against its peer (B), ratios A/B per round, median (min–max over "
        "rounds)**. Throughput above 1 and CPU per request below 1 favour A. CPU is the app's processes' "
        "(all threads; gunicorn's worker), from `/proc/<pid>/stat`, over the requests wrk completed."
    )
    out.append("")
    out.append("| pair | A | B | throughput A/B | CPU per request A/B | target |")
    out.append("|---|---|---|---|---|---|")
    for result in run.pairs:
        pair = result.pair
        out.append(
            f"| {pair.label} | {pair.ours.label} | {pair.peer.label} | {_range(result.throughput_ratios)} | "
            f"{_range(result.cpu_ratios)} | {_target_text(pair)} |"
        )
    out.append("")
    out.append("**Each app, median over rounds**")
    out.append("")
    out.append("| pair | app | requests/s | CPU µs per request | p50 | p99 | failed requests |")
    out.append("|---|---|---|---|---|---|---|")
    for result in run.pairs:
        for which in ("ours", "peer"):
            failed = result.failed(which)
            out.append(
                f"| {result.pair.key} | {result.app(which).label} "
                f"| {result.median(which, lambda w: w.result.throughput):,.0f} "
                f"| {result.median(which, lambda w: w.cpu_per_request) * 1e6:,.0f} "
                f"| {_ms(result.median(which, lambda w: w.result.p50))} "
                f"| {_ms(result.median(which, lambda w: w.result.p99))} "
                f"| {f'**{failed}**' if failed else 0} |"
            )
    out.append("")
    out.append("**Each round** (requests/s; CPU µs per request; p50 / p99)")
    out.append("")
    out.append(
        "| pair | round | A req/s | B req/s | A/B | A CPU | B CPU | A/B "
        "| A p50 / p99 | B p50 / p99 | errors |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for result in run.pairs:
        for r in result.rounds:
            problems = r.ours.problems() + r.peer.problems()
            out.append(
                f"| {result.pair.key} | {r.number} | {r.ours.result.throughput:,.0f} | "
                f"{r.peer.result.throughput:,.0f} | {r.throughput_ratio:.2f} | "
                f"{r.ours.cpu_per_request * 1e6:,.0f} | {r.peer.cpu_per_request * 1e6:,.0f} | "
                f"{r.cpu_ratio:.2f} | {_ms(r.ours.result.p50)} / {_ms(r.ours.result.p99)} | "
                f"{_ms(r.peer.result.p50)} / {_ms(r.peer.result.p99)} | "
                f"{'**' + '; '.join(problems) + '**' if problems else 'none'} |"
            )
    out.append("")
    out.append("**Targets** (informational: a run never fails on speed)")
    out.append("")
    out.append("| target | measured | met |")
    out.append("|---|---|---|")
    for goal, measured, met in evaluate_targets(run):
        out.append(f"| {goal} | {measured} | {'yes' if met else '**no**' if met is not None else '–'} |")
    return "\n".join(out) + "\n"


def _target_text(pair: Pair) -> str:
    parts = []
    if pair.min_throughput is not None:
        parts.append(f"throughput ≥ {pair.min_throughput:.2f}×")
    if pair.max_cpu is not None:
        parts.append(f"CPU ≤ {pair.max_cpu:.2f}×")
    if pair.key == BARE:
        parts.append(f"{FASTAPI_ASYNC}'s throughput ratio ≥ this one's")
    return ", ".join(parts) or "–"


def _ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1e3:,.1f} ms"


# -- JSON -----------------------------------------------------------------------------------------------


def write_json(path: Path, run: Run) -> None:
    def window(w: Window) -> dict[str, Any]:
        return {
            "requests": w.result.requests,
            "seconds": w.result.seconds,
            "throughput": w.result.throughput,
            "p50_ms": w.result.p50 * 1e3,
            "p99_ms": w.result.p99 * 1e3,
            "cpu_seconds": w.cpu_seconds,
            "cpu_us_per_request": _finite(w.cpu_per_request * 1e6),
            "non_2xx": w.result.non_2xx,
            "socket_errors": w.result.socket_errors,
            "warmup": None
            if w.warmup is None
            else {
                "requests": w.warmup.requests,
                "non_2xx": w.warmup.non_2xx,
                "socket_errors": w.warmup.socket_errors,
            },
            "problems": w.problems(),
            "wrk_output": w.result.output,
        }

    data = {
        "meta": run.meta,
        "valid": not run.problems(),
        "problems": run.problems(),
        "pairs": [
            {
                "pair": result.pair.key,
                "label": result.pair.label,
                "a": {"app": result.pair.ours.key, "label": result.pair.ours.label},
                "b": {"app": result.pair.peer.key, "label": result.pair.peer.label},
                "targets": {"min_throughput": result.pair.min_throughput, "max_cpu": result.pair.max_cpu},
                "throughput_ratio": _finite(_median(result.throughput_ratios)),
                "cpu_ratio": _finite(_median(result.cpu_ratios)),
                "rounds": [
                    {
                        "round": r.number,
                        "throughput_ratio": _finite(r.throughput_ratio),
                        "cpu_ratio": _finite(r.cpu_ratio),
                        "a": window(r.ours),
                        "b": window(r.peer),
                    }
                    for r in result.rounds
                ],
            }
            for result in run.pairs
        ],
        "targets": [{"target": t, "measured": v, "met": met} for t, v, met in evaluate_targets(run)],
    }
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


# -- chart ----------------------------------------------------------------------------------------------


def write_chart(path: Path, run: Run) -> None:
    """Per pair, the throughput ratio and the CPU-per-request ratio (bars: medians; whiskers: the lowest
    and highest over rounds), the 1.0 line, and each target as a dashed line over its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    throughput_colour, cpu_colour, bare_colour = "#1f77b4", "#ff7f0e", "#2ca02c"
    results = [r for r in run.pairs if r.rounds]
    fig, ax = plt.subplots(figsize=(11, 6))
    width = 0.36
    highest = 1.0
    for i, result in enumerate(results):
        for offset, values, colour, goal in (
            (-width / 2, result.throughput_ratios, throughput_colour, result.pair.min_throughput),
            (width / 2, result.cpu_ratios, cpu_colour, result.pair.max_cpu),
        ):
            finite = [v for v in values if not math.isnan(v)]
            if not finite:
                continue
            mid = statistics.median(finite)
            highest = max(highest, max(finite), goal or 0)
            low, high = mid - min(finite), max(finite) - mid
            ax.bar(i + offset, mid, width, yerr=[[low], [high]], capsize=3, color=colour)
            # The median inside its bar, at the foot: clear of the whiskers and the target labels.
            ax.text(i + offset, 0.02, f"{mid:.2f}", ha="center", va="bottom", fontsize=8, color="white")
            if goal is not None:
                ax.hlines(
                    goal, i + offset - width / 2, i + offset + width / 2, colors="black", linestyles="--"
                )
                ax.text(i + offset, goal - 0.015, f"target {goal:.2f}", ha="center", va="top", fontsize=7)
    ours, bare = run.get(FASTAPI_ASYNC), run.get(BARE)
    if ours is not None and bare is not None:
        # loopbridge's async pair must not fall below the bare mechanism's ratio: drawn over its bar.
        level = _median(bare.throughput_ratios)
        i = results.index(ours)
        ax.hlines(level, i - width, i, colors=bare_colour, linestyles=":", linewidth=2)
        ax.text(i - width, level, "bare mechanism ", ha="right", va="center", fontsize=7, color=bare_colour)
    ax.axhline(1.0, color="black", linewidth=1)
    ticks = [textwrap.fill(f"{r.pair.label}: {r.pair.ours.label} / {r.pair.peer.label}", 30) for r in results]
    ax.set_xticks(range(len(results)), ticks, fontsize=7)
    ax.set_xlim(-0.7, len(results) - 0.3)
    ax.set_ylabel("A / B, median over rounds (whiskers: lowest and highest)")
    ax.set_ylim(0, max(1.5, highest + 0.3))
    ax.legend(
        handles=[
            Patch(
                color=throughput_colour,
                label="throughput A/B (higher is better; target: at least the dashes)",
            ),
            Patch(
                color=cpu_colour, label="CPU per request A/B (lower is better; target: at most the dashes)"
            ),
        ],
        fontsize=8,
        loc="upper right",
    )
    invalid = " — NOT VALID: requests failed" if run.problems() else ""
    ax.set_title(
        f"Whole apps under wrk: loopbridge (A) against each framework's usual driver (B){invalid}\n"
        f"{run.meta['date']}, {run.meta['machine']}, {run.meta['rounds']} round(s) of "
        f"{run.meta['duration']:g} s, wrk -t1 -c{run.meta['connections']}, "
        f"bridge loop {run.meta['bridge_loop']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

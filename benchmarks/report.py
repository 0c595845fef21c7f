"""Turning samples into ratios, a table (Markdown), a JSON file and a PNG chart."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cases import CASES, Case
from .harness import Sample

__all__ = ["TARGETS", "Measurements", "Summary", "render_markdown", "summarize", "write_chart", "write_json"]

_CASE = {case.key: case for case in CASES}


@dataclass
class Measurements:
    """Everything one run measured."""

    meta: dict[str, Any]
    ns: list[int]
    samples: dict[tuple[str, int, int], Sample] = field(default_factory=dict)  # (case, n, rep)
    # A case's throughput over its baseline's, measured alongside in alternating slices.
    ratios: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (case, n, rep)
    # The same, to each further baseline a case is measured alongside (Case.also).
    also_ratios: dict[tuple[str, str, int, int], float] = field(default_factory=dict)  # (case, base, n, rep)
    streams: dict[tuple[str, int], float] = field(default_factory=dict)  # (case, rep) -> seconds
    stream_rows: int = 0
    stream_note: str = ""
    memory: dict[str, int] = field(default_factory=dict)  # case -> peak RSS growth, KiB
    memory_rows: int = 0
    skipped: dict[tuple[str, int], str] = field(default_factory=dict)

    def add(self, key: str, n: int, rep: int, sample: Sample) -> None:
        """Record *sample*; a baseline measured alongside several cases accumulates."""
        earlier = self.samples.get((key, n, rep))
        self.samples[key, n, rep] = sample if earlier is None else Sample.merge([earlier, sample])


@dataclass(frozen=True)
class Cell:
    """One case at one N, over every repetition."""

    ratios: list[float]  # throughput / the baseline's throughput, per repetition
    throughput: float  # median calls per second
    p50: float  # seconds, pooled over repetitions
    p99: float
    # Throughput / each further baseline's (Case.also), per repetition.
    also: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


@dataclass
class Summary:
    cells: dict[tuple[str, int], Cell]
    stream_ratios: list[float]  # native seconds / loopbridge seconds, per repetition
    stream_seconds: dict[str, float]  # median per case


@dataclass(frozen=True)
class Target:
    case: str
    n: int
    at_least: float | None  # a throughput ratio to reach...
    at_most_time: float | None = None  # ...or a time-per-call ratio to stay under (the hop)


TARGETS: list[Target] = [
    Target("lb-sync", 1, 0.80),
    Target("lb-sync", 4, 1.0),
    Target("lb-sync", 16, 1.0),
    Target("lb-sync", 64, 1.0),
    Target("lb-async", 1, 0.70),
    Target("lb-async", 16, 0.9),
    Target("lb-async", 64, 0.9),
    Target("hop", 1, None, 1.3),
]
STREAM_TARGET = 0.95

_NO_CELL = Cell(ratios=[], throughput=0.0, p50=float("nan"), p99=float("nan"))


def summarize(m: Measurements) -> Summary:
    cells: dict[tuple[str, int], Cell] = {}
    by_cell: dict[tuple[str, int], list[tuple[int, Sample]]] = defaultdict(list)
    for (key, n, rep), sample in m.samples.items():
        by_cell[key, n].append((rep, sample))
    for (key, n), samples in by_cell.items():
        ratios = [1.0] if key == _CASE[key].baseline else [m.ratios[key, n, rep] for rep, _ in samples]
        pooled = Sample.merge([sample for _, sample in samples])
        also = {
            base: [
                m.also_ratios[key, base, n, rep] for rep, _ in samples if (key, base, n, rep) in m.also_ratios
            ]
            for base in _CASE[key].also
        }
        cells[key, n] = Cell(
            ratios=ratios,
            throughput=statistics.median(sample.throughput for _, sample in samples),
            p50=pooled.percentile(50),
            p99=pooled.percentile(99),
            also={base: values for base, values in also.items() if values},
        )
    reps = {rep for _, rep in m.streams}
    stream_ratios = [
        m.streams["native", rep] / m.streams["lb-iterate", rep]
        for rep in sorted(reps)
        if ("lb-iterate", rep) in m.streams and ("native", rep) in m.streams
    ]
    seconds: dict[str, list[float]] = defaultdict(list)
    for (key, _), value in m.streams.items():
        seconds[key].append(value)
    return Summary(cells, stream_ratios, {key: statistics.median(v) for key, v in seconds.items()})


# -- Markdown -----------------------------------------------------------------------------------------


def render_markdown(m: Measurements, s: Summary) -> str:
    meta = m.meta
    out: list[str] = []
    out.append(
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, "
        f"{meta['repetitions']} repetitions of {meta['window']['duration']:g} s per case "
        f"(after {meta['window']['warmup']:g} s of warm-up), cases interleaved; "
        f"load average {meta['load_before']} before, {meta['load_after']} after."
    )
    out.append("")
    out.append(
        "**`SELECT 1` via `fetchval`, pool of 16: throughput as a ratio to the native asyncpg pool on the "
        "caller's own loop in the same repetition** (median, with min–max over repetitions; "
        "above 1 is faster than the limit)"
    )
    out.append("")
    out.extend(_table(m, s, "db", _ratio_cell))
    out.append("")
    out.extend(_also_tables(m, s))
    out.append("**Latency per call, p50 / p99 (µs), pooled over repetitions**")
    out.append("")
    out.extend(_table(m, s, "db", _latency_cell))
    out.append("")
    out.append(
        "**The hop alone (a no-op coroutine, no database): time per call per caller (µs, median over "
        "repetitions), and as a multiple of the floor's measured alongside it (`call_soon_threadsafe` + a "
        "lock the caller waits on; the figure to go by; below 1.3 is the target at N=1)**"
    )
    out.append("")
    out.extend(_table(m, s, "hop", _hop_cell))
    out.append("")
    out.extend(_streaming(m, s))
    out.append("")
    out.extend(_targets(s))
    return "\n".join(out) + "\n"


def _table(m: Measurements, s: Summary, group: str, fmt: Any) -> list[str]:
    lines = ["| case | " + " | ".join(f"N={n}" for n in m.ns) + " |", "|---" * (len(m.ns) + 1) + "|"]
    for case in CASES:
        if case.group != group or not any((case.key, n) in s.cells for n in m.ns):
            continue
        row = [case.label]
        for n in m.ns:
            cell = s.cells.get((case.key, n))
            if cell is None:
                row.append("skipped" if (case.key, n) in m.skipped else "–")
            else:
                row.append(fmt(case, cell))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _also_tables(m: Measurements, s: Summary) -> list[str]:
    """One table per further baseline: the ratios of the cases measured alongside it too."""
    lines: list[str] = []
    for base in dict.fromkeys(key for case in CASES for key in case.also):
        rows = [
            c
            for c in CASES
            if base in c.also and any(base in s.cells.get((c.key, n), _NO_CELL).also for n in m.ns)
        ]
        if not rows:
            continue
        lines.append(
            f"**The same cases as a ratio to the {_CASE[base].label}, measured in the same slices** "
            "(median, with min–max over repetitions)"
        )
        lines.append("")
        lines.append("| case | " + " | ".join(f"N={n}" for n in m.ns) + " |")
        lines.append("|---" * (len(m.ns) + 1) + "|")
        for case in rows:
            row = [case.label]
            for n in m.ns:
                values = s.cells.get((case.key, n), _NO_CELL).also.get(base)
                if values:
                    mid = statistics.median(values)
                    row.append(f"**{mid:.2f}** ({min(values):.2f}–{max(values):.2f})")
                else:
                    row.append("–")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return lines


def _ratio_cell(case: Case, cell: Cell) -> str:
    if case.key == case.baseline:
        return f"1.00 ({cell.throughput:,.0f}/s)"
    return f"**{cell.ratio:.2f}** ({min(cell.ratios):.2f}–{max(cell.ratios):.2f})"


def _latency_cell(case: Case, cell: Cell) -> str:
    return f"{cell.p50 * 1e6:,.0f} / {cell.p99 * 1e6:,.0f}"


def _hop_cell(case: Case, cell: Cell) -> str:
    per_call = 1e6 / cell.throughput  # for one caller: N callers share the throughput
    if case.key == case.baseline:
        return f"{per_call:,.1f} µs/call"
    return f"{per_call:,.1f} µs/call (**{1 / cell.ratio:.2f}×**)"


def _streaming(m: Measurements, s: Summary) -> list[str]:
    lines = [
        f"**Streaming {m.stream_rows:,} rows to a consumer** "
        f"(prefetch {m.meta['prefetch']}; rows per second as a ratio to the native cursor)",
        "",
        "| case | time (median) | ratio to native |",
        "|---|---|---|",
    ]
    native = s.stream_seconds.get("native")
    if native is not None:
        lines.append(f"| native asyncpg cursor, caller's loop | {native * 1e3:,.0f} ms | 1.00 |")
    lb = s.stream_seconds.get("lb-iterate")
    if lb is not None and s.stream_ratios:
        ratio = statistics.median(s.stream_ratios)
        lines.append(
            f"| loopbridge `db.iterate()`, sync consumer | {lb * 1e3:,.0f} ms | **{ratio:.2f}** "
            f"({min(s.stream_ratios):.2f}–{max(s.stream_ratios):.2f}) |"
        )
    else:
        lines.append(f"| loopbridge `db.iterate()`, sync consumer | {m.stream_note} | – |")
    if m.memory:
        from .streaming import MEMORY_CASES

        lines += [
            "",
            f"**Peak memory while streaming {m.memory_rows:,} rows** "
            "(growth of the peak RSS of a fresh process)",
            "",
            "| case | peak RSS growth |",
            "|---|---|",
        ]
        for key, (label, _) in MEMORY_CASES.items():
            if key in m.memory:
                lines.append(f"| {label} | {m.memory[key] / 1024:,.1f} MiB |")
            elif key == "lb-iterate":
                lines.append(f"| {label} | {m.stream_note} |")
    return lines


def _targets(s: Summary) -> list[str]:
    lines = ["**Targets** (ratios to the baseline of the same repetition, median)", ""]
    lines += ["| target | measured | met |", "|---|---|---|"]
    for target, measured, met in evaluate_targets(s):
        lines.append(f"| {target} | {measured} | {'yes' if met else '**no**' if met is not None else '–'} |")
    return lines


def evaluate_targets(s: Summary) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    for t in TARGETS:
        cell = s.cells.get((t.case, t.n))
        label = _CASE[t.case].label
        if t.at_least is not None:
            goal = f"{label}, N={t.n}: ≥ {t.at_least:.2f}× the limit"
            if cell is None:
                rows.append((goal, "not measured", None))
            else:
                rows.append((goal, f"{cell.ratio:.2f}", cell.ratio >= t.at_least))
        else:
            assert t.at_most_time is not None
            goal = f"{label}, N={t.n}: ≤ {t.at_most_time:.1f}× the floor's time per call"
            if cell is None:
                rows.append((goal, "not measured", None))
            else:
                rows.append((goal, f"{1 / cell.ratio:.2f}", 1 / cell.ratio <= t.at_most_time))
    goal = f"streaming: ≥ {STREAM_TARGET:.2f}× the native batched cursor"
    if s.stream_ratios:
        ratio = statistics.median(s.stream_ratios)
        rows.append((goal, f"{ratio:.2f}", ratio >= STREAM_TARGET))
    else:
        rows.append((goal, "not available on this build", None))
    return rows


# -- JSON and chart -----------------------------------------------------------------------------------


def write_json(path: Path, m: Measurements, s: Summary) -> None:
    data = {
        "meta": m.meta,
        "samples": [
            {
                "case": key,
                "n": n,
                "rep": rep,
                "calls": sample.calls,
                "seconds": sample.seconds,
                "throughput": sample.throughput,
                "ratio_to_baseline": m.ratios.get((key, n, rep)),
                "ratio_to": {
                    base: m.also_ratios[key, base, n, rep]
                    for base in _CASE[key].also
                    if (key, base, n, rep) in m.also_ratios
                },
                "p50_us": sample.percentile(50) * 1e6,
                "p99_us": sample.percentile(99) * 1e6,
            }
            for (key, n, rep), sample in sorted(m.samples.items())
        ],
        "summary": [
            {
                "case": key,
                "label": _CASE[key].label,
                "baseline": _CASE[key].baseline,
                "n": n,
                "ratio": cell.ratio,
                "ratios": cell.ratios,
                "ratios_to": {
                    base: {"ratio": statistics.median(values), "ratios": values}
                    for base, values in cell.also.items()
                },
                "throughput": cell.throughput,
                "p50_us": cell.p50 * 1e6,
                "p99_us": cell.p99 * 1e6,
            }
            for (key, n), cell in sorted(s.cells.items())
        ],
        "skipped": [{"case": key, "n": n, "reason": why} for (key, n), why in sorted(m.skipped.items())],
        "streaming": {
            "rows": m.stream_rows,
            "seconds": [
                {"case": key, "rep": rep, "seconds": v} for (key, rep), v in sorted(m.streams.items())
            ],
            "ratios": s.stream_ratios,
            "note": m.stream_note,
            "memory_rows": m.memory_rows,
            "peak_rss_growth_kib": m.memory,
        },
        "targets": [{"target": t, "measured": v, "met": met} for t, v, met in evaluate_targets(s)],
    }
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def write_chart(path: Path, m: Measurements, s: Summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 1.2]})
    db_cases = [
        c
        for c in CASES
        if c.group == "db" and c.key != c.baseline and any((c.key, n) in s.cells for n in m.ns)
    ]
    width = 0.8 / max(1, len(db_cases))
    for i, case in enumerate(db_cases):
        xs, ys, lo, hi = [], [], [], []
        for j, n in enumerate(m.ns):
            cell = s.cells.get((case.key, n))
            if cell is None:
                continue
            xs.append(j - 0.4 + width * (i + 0.5))
            ys.append(cell.ratio)
            lo.append(cell.ratio - min(cell.ratios))
            hi.append(max(cell.ratios) - cell.ratio)
        left.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=case.label, color=_colour(i))
    left.axhline(1.0, color="black", linewidth=1, linestyle="--")
    left.text(len(m.ns) - 0.55, 1.01, "limit: native asyncpg", ha="right", va="bottom", fontsize=8)
    left.set_xlim(-0.55, len(m.ns) - 0.45)
    left.set_xticks(range(len(m.ns)), [f"N={n}" for n in m.ns])
    left.set_ylabel("throughput / native asyncpg (same repetition)")
    left.set_title("SELECT 1, pool of 16, N concurrent callers")
    left.legend(fontsize=7, loc="upper left", ncol=2)
    highest = max((max(c.ratios) for (key, _), c in s.cells.items() if _CASE[key].group == "db"), default=1)
    # Headroom above the highest whisker for the legend's rows.
    left.set_ylim(0, max(1.6, highest * 1.35))

    hop_cases = [c for c in CASES if c.group == "hop" and c.key != c.baseline and (c.key, 1) in s.cells]
    times = [1 / s.cells[c.key, 1].ratio for c in hop_cases]
    right.barh(range(len(hop_cases)), times, color=[_colour(i) for i in range(len(hop_cases))])
    right.set_yticks(range(len(hop_cases)), [c.label.replace(", ", ",\n") for c in hop_cases], fontsize=7)
    right.invert_yaxis()
    right.axvline(1.0, color="black", linewidth=1)
    right.axvline(1.3, color="black", linewidth=1, linestyle="--")
    right.text(1.0, len(hop_cases) - 0.45, " floor", fontsize=7, va="bottom")
    right.text(1.3, len(hop_cases) - 0.45, " 1.3× (target)", fontsize=7, va="bottom")
    right.set_xlabel("time per call ÷ the floor's, N=1 (lower is better)")
    right.set_title("the hop alone (no database)")
    fig.suptitle(f"loopbridge benchmarks — {m.meta['date']}, {m.meta['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _colour(i: int) -> str:
    palette: Sequence[str] = (
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf",
    )  # fmt: skip
    return palette[i % len(palette)]

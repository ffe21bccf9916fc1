"""Results: the targets, the Markdown table, the PNG plot and profile summaries."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: Thresholds of the targets (ratios are measured within one run).
NULL_VS_RAW = 0.8            # one worker process on null:// vs the raw loop
NULL_2_VS_RAW = 1.1          # two worker processes on null:// vs the raw loop (one process)
NULL_VS_FASTSTREAM = 2.0     # one worker process on null:// vs the FastStream peer
STORE_VS_RAW_UPSERT = 0.8    # one worker vs the store's raw batched upsert
STORE_2_VS_RAW_UPSERT = 0.85  # two workers vs the same
STORE_VS_NAIVE = 10.0
STEADY_P99_MS = {"null": 100.0}  # p99 end-to-end at half saturation, by store scheme
STEADY_P99_MS_STORE = 150.0      # every store that keeps what it is given


def _ratio(a: float | None, b: float | None) -> float | None:
    if not a or not b:
        return None
    return round(a / b, 3)


def targets(results: Sequence[Mapping[str, Any]],
            baselines: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every target the results allow to check, with its measured value and verdict."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, threshold: str, met: bool | None, detail: str = "") -> None:
        out.append({"target": name, "value": value, "threshold": threshold, "met": met,
                    "detail": detail})

    raw = baselines.get("raw_redis_loop", {}).get("events_per_s")
    for r in results:
        if r.get("scenario") != "max":
            continue
        n = r.get("workers", 1)
        fleet = f"{n} worker{'s' if n != 1 else ''}"
        if r["store"].startswith("null:") and raw and n in (1, 2):
            want = NULL_VS_RAW if n == 1 else NULL_2_VS_RAW
            ratio = _ratio(r.get("events_per_s"), raw)
            add(f"null store, {fleet} vs raw XREADGROUP+decode+XACK loop", ratio,
                f">= {want}", ratio is not None and ratio >= want,
                f"{r.get('events_per_s')} vs {raw} events/s")
        peer = baselines.get("faststream_consumer", {}).get("events_per_s")
        if r["store"].startswith("null:") and peer and n == 1:
            ratio = _ratio(r.get("events_per_s"), peer)
            add("null store, 1 worker vs the FastStream batch consumer", ratio,
                f">= {NULL_VS_FASTSTREAM}", ratio is not None and ratio >= NULL_VS_FASTSTREAM,
                f"{r.get('events_per_s')} vs {peer} events/s")
        upsert = baselines.get("raw_store_upsert", {})
        if not r["store"].startswith("null:") and upsert.get("store") == r["store"]:
            want = STORE_VS_RAW_UPSERT if n == 1 else STORE_2_VS_RAW_UPSERT
            ratio = _ratio(r.get("events_per_s"), upsert.get("events_per_s"))
            add(f"{_scheme(r['store'])} store, {fleet} vs its raw batched upsert", ratio,
                f">= {want}", ratio is not None and ratio >= want,
                f"{r.get('events_per_s')} vs {upsert.get('events_per_s')} events/s")
        naive = baselines.get("naive_per_event", {})
        if not r["store"].startswith("null:") and naive.get("store") == r["store"]:
            ratio = _ratio(r.get("events_per_s"), naive.get("events_per_s"))
            add(f"{_scheme(r['store'])} store, {fleet} vs naive per-event writer", ratio,
                f">= {STORE_VS_NAIVE}", ratio is not None and ratio >= STORE_VS_NAIVE,
                f"{r.get('events_per_s')} vs {naive.get('events_per_s')} events/s")
    for r in results:
        if r.get("scenario") == "steady":
            p99 = (r.get("latency_ms") or {}).get("p99")
            want = STEADY_P99_MS.get(_scheme(r["store"]), STEADY_P99_MS_STORE)
            add(f"steady {_scheme(r['store'])} at {r.get('target_rate')} ev/s: p99 end-to-end",
                p99, f"<= {want:.0f} ms", p99 is not None and p99 <= want)
    for r in results:
        if r.get("skipped") or r.get("within_budget") is None:
            continue
        add(f"{r['label']}: peak worker RSS within budget", r.get("peak_rss_mib"),
            f"<= {r.get('memory_budget_mib')} MiB", bool(r["within_budget"]),
            f"{r.get('events')} events")
    for r in results:
        if r.get("skipped") or str(r.get("scenario", "")).startswith("baseline"):
            continue
        dup = r.get("duplicates")
        met = r.get("lost") == 0 and dup in (0, None)
        add(f"{r['label']}: lost = 0 and duplicates = 0", f"lost {r.get('lost')}, duplicates "
            f"{'n/a' if dup is None else dup}", "0 / 0", met,
            "null:// keeps nothing: duplicates not observable" if dup is None else "")
    return out


def _scheme(store: str) -> str:
    return store.split(":", 1)[0]


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _row(r: Mapping[str, Any]) -> str:
    lat = r.get("latency_ms") or {}
    dup = r.get("duplicates")
    budget = r.get("memory_budget_mib")
    mem = _fmt(r.get("peak_rss_mib"), 1) + (f" ({_fmt(budget, 1)})" if budget else "")
    lost = r.get("lost")
    return (f"| {r.get('scenario', '?')} | {_scheme(r.get('store', '?'))} | "
            f"{r.get('workers', 1)} | "
            f"{_fmt(r.get('events'))} | {_fmt(r.get('events_per_s'))} | "
            f"{_fmt(lat.get('p50'), 1)} | {_fmt(lat.get('p95'), 1)} | {_fmt(lat.get('p99'), 1)} | "
            f"{_fmt(r.get('drain_s'), 2)} | {_fmt(lost)} | {'n/a' if dup is None else _fmt(dup)} | "
            f"{_fmt(r.get('cpu_us_per_event'), 1)} | {mem} |")


def results_table(results: Sequence[Mapping[str, Any]],
                  baselines: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown table of baselines and scenarios."""
    head = ("| scenario | store | workers | events | events/s | p50 ms | p95 ms | p99 ms | "
            "drain s | lost | dup | CPU µs/event | peak RSS MiB (budget) |")
    lines = [head, "|" + "---|" * 13]
    for key in ("raw_redis_loop", "faststream_consumer"):
        for r in baselines.get(key, {}).get("runs", []):
            lines.append(_row({**r, "lost": None, "duplicates": None}))
    naive = baselines.get("naive_per_event")
    if naive:
        lines.append(_row({**naive, "lost": None, "duplicates": None}))
    upsert = baselines.get("raw_store_upsert")
    if upsert and upsert.get("skipped"):
        lines.append(f"| baseline-raw-upsert | {_scheme(upsert.get('store', '?'))} | – | – | "
                     f"skipped: {upsert['skipped']} | | | | | | | | |")
    elif upsert:
        lines.append(f"| baseline-raw-upsert | {_scheme(upsert.get('store', '?'))} | – | "
                     f"{_fmt(upsert.get('events'))} | {_fmt(upsert.get('events_per_s'))} | | | | "
                     f"{_fmt(upsert.get('seconds'), 2)} | | | | |")
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['scenario']} | {_scheme(r['store'])} | – | – | skipped: "
                         f"{r['skipped']} | | | | | | | | |")
            continue
        lines.append(_row(r))
    return "\n".join(lines)


def markdown_table(columns: Sequence[tuple[str, str]],
                   rows: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table: ``columns`` are (heading, key) pairs; a missing value is ``-``."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ("-" if row.get(key) is None else str(row[key]) for _, key in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(rows: Iterable[Mapping[str, Any]]) -> str:
    lines = ["| target | measured | threshold | met |", "|---|---|---|---|"]
    for t in rows:
        verdict = {True: "yes", False: "**no**", None: "–"}[t["met"]]
        detail = f" ({t['detail']})" if t.get("detail") else ""
        lines.append(f"| {t['target']} | {_fmt(t['value'], 3)}{detail} | {t['threshold']} | "
                     f"{verdict} |")
    return "\n".join(lines)


def plot(series: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Throughput and backlog (undelivered + pending) over time, one panel per scenario."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(series)
    if not labels:
        return None
    cols = 2 if len(labels) > 1 else 1
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 2.8 * rows), squeeze=False)
    for ax, label in zip(axes.flat, labels, strict=False):
        s = series[label]
        tp = s["throughput"]
        ax.plot([t for t, _ in tp], [v for _, v in tp], color="tab:blue", lw=1.2,
                label="settled events/s")
        ax.set_ylabel("events/s", color="tab:blue")
        ax.set_xlabel("seconds")
        ax.set_title(label, fontsize=10)
        ax2 = ax.twinx()
        lag = s["lag"]
        ax2.plot([t for t, _ in lag], [v for _, v in lag], color="tab:orange", lw=1.0,
                 label="lag + pending")
        ax2.set_ylabel("entries behind", color="tab:orange")
        if s.get("rss"):
            ax3 = ax.twinx()
            ax3.spines.right.set_position(("axes", 1.16))
            ax3.plot([t for t, _ in s["rss"]], [v / 2**20 for _, v in s["rss"]],
                     color="tab:green", lw=0.9, ls="--")
            ax3.set_ylabel("worker RSS MiB", color="tab:green")
            ax3.set_ylim(bottom=0)
        marks = s.get("marks", {})
        if "outage_start" in marks and "outage_end" in marks:
            ax.axvspan(marks["outage_start"], marks["outage_end"], color="red", alpha=0.12)
        for name, t in marks.items():
            if name.startswith("kill"):
                ax.axvline(t, color="red", lw=0.8, ls="--")
        if s.get("rss"):
            peak = max(v for _, v in s["rss"]) / 2**20
            ax.text(0.99, 0.95, f"peak RSS {peak:.0f} MiB", transform=ax.transAxes,
                    ha="right", va="top", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def top_frames(collapsed: Path, limit: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, total %) from py-spy's raw (collapsed stacks) output."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    if not samples:
        return []
    return [(f, round(100 * own[f] / samples, 1), round(100 * total[f] / samples, 1))
            for f, _ in own.most_common(limit)]


#: The worker's stages, by the frames a sample's stack holds (the first rule that matches
#: wins): how ``stages`` splits a py-spy profile of a worker.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (waiting in select)", ("EpollSelector.select",)),
    ("decode (prepare)", ("prepare (",)),
    ("redact, hash subjects", ("hash_subjects (", "_redact (")),
    ("coalesce", ("coalesce_each (", "coalesce_records (", "Coalescer.")),
    ("store write", ("_write_all (",)),
    ("XACK, dead letters (settle)", ("_settle (",)),
    ("metrics", ("metrics.py", "prometheus_client")),
    ("XREADGROUP and its parse", ("read_group (", "_linger (", "redisio.py")),
)
#: Frames only the worker's running loops have: a stack without any is start-up.
_LOOP_FRAMES = ("Worker.run (", "Worker._run (", "_reader (", "_writer (", "Reclaimer.")


def stage_shares(collapsed: Path) -> tuple[dict[str, int], int]:
    """Samples per stage of a py-spy collapsed-stacks profile (``framework`` is whatever
    of the running worker no stage claims) and the start-up samples left out."""
    counts: Counter[str] = Counter()
    startup = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        if "EpollSelector.select" not in stack and not any(f in stack for f in _LOOP_FRAMES):
            startup += int(count)
            continue
        stage = next((name for name, frames in STAGES if any(f in stack for f in frames)),
                     "framework (tasks, channel, bookkeeping, freeing)")
        counts[stage] += int(count)
    return dict(counts), startup


def stage_table(collapsed: Path, cpu_us_per_event: float) -> list[str]:
    """Markdown rows: each stage's share of the busy samples and its µs/event (the share of
    the worker's measured CPU per event; idle samples are not CPU)."""
    counts, startup = stage_shares(collapsed)
    busy = sum(n for name, n in counts.items() if not name.startswith("idle"))
    rows = [f"{collapsed.name}: {busy} busy samples ({startup} of start-up left out), "
            f"{cpu_us_per_event} µs CPU/event", "",
            "| stage | share of busy samples | µs/event |", "|---|---|---|"]
    names = [name for name, _ in STAGES[1:]] + ["framework (tasks, channel, bookkeeping, freeing)"]
    for name in names:
        share = counts.get(name, 0) / busy if busy else 0.0
        rows.append(f"| {name} | {100 * share:.1f}% | {share * cpu_us_per_event:.1f} |")
    idle = counts.get(STAGES[0][0], 0)
    rows.append(f"| (idle, not counted) | {idle} samples | |")
    return rows

"""The PNG plots of `benchmarks/run_all.py`, each drawn from one benchmark's own JSON (what its ``--out``
wrote) with the baseline that benchmark measured in the same run.

matplotlib is a benchmark-only dependency (the ``bench`` extra); it is imported only inside
:func:`make_plots`, with the non-interactive Agg backend. A plot whose data is missing from its JSON is
skipped with a note saying what was missing, never drawn from made-up figures.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 100


@dataclass(frozen=True)
class Plot:
    """A written PNG: its file name (in the plots folder), a title and a caption for RESULTS.md."""

    file: str
    benchmark: str
    title: str
    caption: str


class NoData(Exception):
    """The benchmark's JSON lacks what a plot needs; the message says what."""


def _median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def points(change: float) -> str:
    """An accuracy change in percentage points, signed: ``+0.22 pt``, ``-1.10 pt``, ``±0 pt``."""
    return "±0 pt" if round(change, 2) == 0 else f"{change:+.2f} pt"


# -- the plots --------------------------------------------------------------------------------------------
# Each takes (plt, the benchmark's JSON, the PNG path) and returns (title, caption), or raises NoData.

QUANTILE_KEYS = (("p50_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99))


def latency_cdf(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """loop_overhead: bare onnxruntime and the agent loop, per case, as percentile curves."""
    cases = [c for c in data.get("cases") or [] if c.get("runs")]
    if not cases:
        raise NoData("loop_overhead.json has no bench cases")
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        runs = case["runs"]
        for side, colour, label in (("bare", "tab:gray", "bare session.run (baseline)"),
                                    ("agent", "tab:blue", "agent Pipeline.step")):
            xs, ys = [], []
            for key, q in QUANTILE_KEYS:
                v = _median([r[side].get(key) for r in runs])
                if v is not None:
                    xs.append(v)
                    ys.append(q)
            iters = _median([r[side].get("iterations") for r in runs])
            top = _median([r[side].get("max_us") for r in runs])
            if top is not None and iters:
                xs.append(top)
                ys.append(1.0 - 1.0 / iters)  # the slowest of N iterations
            if not xs:
                raise NoData(f"loop_overhead.json case {case['case']!r} has no {side} percentiles")
            ax.plot(xs, ys, marker="o", color=colour, label=label)
        ax.set_xscale("log")
        ax.set_yscale("logit")
        ax.set_yticks([0.5, 0.9, 0.99, 0.999, 0.9999])
        ax.set_yticklabels(["p50", "p90", "p99", "p99.9", "p99.99"])
        ax.set_xlabel("latency per call (us, log)")
        ax.set_title(f"{case['case']} ({len(runs)} run{'s' if len(runs) != 1 else ''})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("fraction of calls at or below")
    axes[0][0].legend(fontsize=8, loc="lower right")
    _save(fig, path, "Latency: agent loop vs bare onnxruntime, same process and run")
    return ("Latency: agent loop vs bare onnxruntime",
            "Percentile curve, not a full CDF: loop_overhead.json keeps p50, p90, p99 and max per run "
            "(`edge-runtime bench --json` keeps no per-call samples), so each curve joins those points "
            "(medians over repeats; max plotted at 1 - 1/iterations). Bare `session.run` and the agent's "
            "`Pipeline.step` ran on the same inputs in the same process, in alternating blocks.")


def quantize_speedup(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """quantize_all: each variant's speedup over its own model's fp32, the chosen one marked."""
    reports = data.get("reports") or {}
    if not reports:
        raise NoData("quantize_all.json has no model reports")
    fig, axes = plt.subplots(1, len(reports), figsize=(4.4 * len(reports), 4.2), squeeze=False, sharey=True)
    for ax, (model, rep) in zip(axes[0], reports.items(), strict=True):
        variants = [v for v in rep.get("variants", []) if not v.get("error") and v.get("speedup") is not None]
        if not variants:
            raise NoData(f"quantize_all.json: {model} has no timed variants")
        chosen = (rep.get("chosen") or {}).get("name")
        xs = range(len(variants))
        colours = ["tab:orange" if v["name"] == chosen else "tab:blue" for v in variants]
        bars = ax.bar(xs, [v["speedup"] for v in variants], color=colours)
        for bar, v in zip(bars, variants, strict=True):
            drop = v.get("accuracy_drop_pts")
            ax.annotate(f"{v['speedup']:.2f}x" + ("" if drop is None else f"\n{points(-drop)}"),
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7)
        ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="fp32 (baseline, same run)")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([v["name"] for v in variants], rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{model} (chosen: {chosen})", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("speedup over fp32 (median latency)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    ymax = max(v["speedup"] for rep in reports.values() for v in rep.get("variants", [])
               if v.get("speedup") is not None)
    axes[0][0].set_ylim(0, max(1.3, ymax * 1.25))
    _save(fig, path, "Quantization: speedup per model and variant")
    return ("Quantization: speedup per model and variant",
            "Each variant's median latency against its own model's fp32 variant, timed in the same run in "
            "alternating blocks; labels give the speedup and the change in top-1 accuracy in points. Orange: the "
            "variant `edge-runtime quantize` chose.")


RIVER_FAMILIES = ("ADWIN", "PageHinkley", "KSWIN")


def drift_delay(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """drift_bench: our detector's median delay against river's best comparable setting per family."""
    scenarios = data.get("scenarios") or {}
    verdicts = {v["scenario"]: v for v in data.get("verdicts") or []}
    if not scenarios or not verdicts:
        raise NoData("drift_bench.json has no scenarios or verdicts")
    river_on = bool((data.get("river") or {}).get("available"))
    series: list[str] = ["ours", *(RIVER_FAMILIES if river_on else ())]
    rows: list[tuple[str, dict[str, tuple[float | None, float, str]]]] = []
    not_comparable: set[str] = set()
    for name, sc in scenarios.items():
        v = verdicts.get(name)
        if v is None:
            continue
        dets = sc["detectors"]
        cells: dict[str, tuple[float | None, float, str]] = {}
        ours = dets[v["ours"]]
        cells["ours"] = (ours.get("median_delay"), ours.get("miss_rate") or 0.0, v["ours"])
        for fam in RIVER_FAMILIES if river_on else ():
            cands = [(k, d) for k, d in dets.items() if k.startswith("river") and d.get("detector") == fam
                     and k not in v.get("not_comparable", [])]
            if not cands:
                not_comparable.add(f"{fam} on {name}")
                continue
            # best = fewest misses, then shortest median delay (as drift_bench's verdicts order them)
            k, d = min(cands, key=lambda kd: (kd[1].get("miss_rate") or 0.0,
                                              math.inf if kd[1].get("median_delay") is None
                                              else kd[1]["median_delay"]))
            cells[fam] = (d.get("median_delay"), d.get("miss_rate") or 0.0, k)
        rows.append((name, cells))
    if not rows:
        raise NoData("drift_bench.json: no scenario has a verdict")
    horizon = max(sc.get("horizon") or 0 for sc in scenarios.values()) or 4000
    colours = {"ours": "tab:blue", "ADWIN": "tab:gray", "PageHinkley": "tab:olive", "KSWIN": "tab:brown"}
    fig, ax = plt.subplots(figsize=(9, 0.15 * len(rows) * len(series) + 2.0))
    h = 0.8 / len(series)
    for i, (_name, cells) in enumerate(rows):
        for j, s in enumerate(series):
            y = i + (j - (len(series) - 1) / 2) * h
            if s not in cells:
                continue
            delay, miss, _key = cells[s]
            if delay is None:  # every run missed
                ax.barh(y, horizon, height=h, color="none", edgecolor=colours[s], hatch="//")
                ax.annotate("missed", (horizon, y), va="center", fontsize=6)
                continue
            ax.barh(y, delay, height=h, color=colours[s])
            if miss:
                ax.annotate(f"{miss:.0%} missed", (delay, y), va="center", fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([n for n, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median detection delay (samples after the change, log)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=colours[s], label="edge_runtime (ours)" if s == "ours" else f"river {s} (baseline)")
               for s in series if any(s in cells for _, cells in rows)]
    handles.append(Patch(facecolor="none", edgecolor="gray", hatch="//", label="every run missed"))
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(handles))
    _save(fig, path, "Drift detection delay: edge_runtime vs river, same streams and run")
    caption = ("Median delay in samples from the change to the first alarm (hatched: every run missed within "
               f"the {horizon}-sample horizon). Ours: the detector drift_bench's verdicts use per scenario. "
               "River: per family, its best setting (fewest misses, then shortest delay) among those whose "
               "false-alarm rate was established at or below ours (or 1 per 100k), on the same streams in the "
               "same run.")
    if not river_on:
        caption += " river was not installed for this run (`pip install river`): its bars are missing."
    elif not_comparable:
        fams = sorted({s.split(" on ")[0] for s in not_comparable})
        caption += (f" Left out where no setting met that false-alarm bar (too few undrifted samples in a "
                    f"short run, or too many alarms): {', '.join(fams)} on {len(not_comparable)} "
                    f"scenario-detector pairs.")
    return "Drift detection delay vs river", caption


def sync_throughput(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """sync_bench: end-to-end sync against the naive delete-on-PUBACK baseline, throughput and losses."""
    s, n = data.get("sync"), data.get("naive")
    if not s or not n or s.get("records_per_s") is None or n.get("records_per_s") is None:
        raise NoData("sync_bench.json lacks its sync or naive step")
    records = data.get("records")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    names = ["edge_runtime sync\n(outbox, acked batches)", "naive QoS 1\ndelete on PUBACK (baseline)"]
    colours = ["tab:blue", "tab:gray"]
    bars = a1.bar(names, [s["records_per_s"], n["records_per_s"]], color=colours)
    for bar in bars:
        a1.annotate(f"{bar.get_height():,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    a1.set_ylabel("records/s to the cloud store")
    a1.set_title("throughput", fontsize=10)
    lost = [s.get("lost") or 0, n.get("lost") or 0]
    bars = a2.bar(names, lost, color=colours)
    for bar, v in zip(bars, lost, strict=True):
        a2.annotate(f"{v:,}" + (f" of {records:,}" if records else ""),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    a2.set_ylabel("records lost")
    a2.set_title("losses", fontsize=10)
    a2.set_ylim(0, max(1, *lost) * 1.2)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    _save(fig, path, f"Sync through Mosquitto: {records:,} records" if records else "Sync through Mosquitto")
    return ("Sync throughput vs naive, with losses",
            "The agent's outbox and uplink through Mosquitto into `cloud-sync`'s store, against one QoS 1 "
            "publish per record deleted on PUBACK to a default Mosquitto with a slow subscriber, in the same run. "
            "Throughput is records committed per second; lost = records the publisher deleted that the store "
            "never got.")


def fleet_latency(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """fleet_sim: batch latency (publish -> cloud ack) against devices, per case, the echo baseline in black."""
    lvd = data.get("latency_vs_devices") or {}
    if not any(lvd.values()):
        raise NoData("fleet_sim.json has no latency_vs_devices")
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(9.5, 4.6))
    cmap = plt.get_cmap("tab10")
    counts: set[int] = set()
    handles = []
    for i, (case, points) in enumerate(lvd.items()):
        pts = sorted((p for p in points if p.get("quantiles_ms")), key=lambda p: p["devices"])
        if not pts:
            continue
        xs = [p["devices"] for p in pts]
        counts.update(xs)
        colour = "black" if case == "echo" else cmap(i % 10)
        ax.plot(xs, [p["quantiles_ms"].get("0.5") for p in pts], marker="o", color=colour)
        ax.plot(xs, [p["quantiles_ms"].get("0.99") for p in pts], marker="^", linestyle="--", color=colour)
        handles.append(Line2D([], [], color=colour, linewidth=3,
                              label="echo: broker round trip (baseline)" if case == "echo" else case))
    handles += [Line2D([], [], color="gray", marker="o", label="p50"),
                Line2D([], [], color="gray", marker="^", linestyle="--", label="p99")]
    ax.set_yscale("log")
    if len(counts) > 1:
        ax.set_xscale("log")
    ax.set_xticks(sorted(counts))
    ax.set_xticklabels([str(c) for c in sorted(counts)])
    ax.set_xlabel("simulated devices")
    ax.set_ylabel("batch latency, publish -> cloud ack (ms, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path, "Fleet: latency against devices")
    caption = ("Per case, p50 (solid) and p99 (dashed) of every batch first published in the measuring window, "
               "from the device handing it to paho to the device reading the cloud's ack (sent after the store "
               "commit). Black: the same devices and load answered by an echo process (no cloud), same run.")
    if len(counts) == 1:
        caption += (f" This run measured one fleet size ({next(iter(counts))} devices); "
                    "`fleet_sim.py --devices 100,300,1000` sweeps it.")
    return "Fleet latency vs devices", caption


def soak_series(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """soak: the agent's RSS per sample and p99 per latency window over time, faults shaded."""
    series = data.get("series") or []
    windows = [w for w in data.get("windows") or [] if not w.get("partial") and w.get("p99_us") is not None]
    if not series or not any(s.get("rss_mb") is not None for s in series):
        raise NoData("soak.json has no RSS samples")
    figures = (data.get("summary") or {}).get("figures") or {}
    warmup = (data.get("config") or {}).get("warmup_s")
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.6), sharex=True)
    pts = [(s["t"], s["rss_mb"]) for s in series if s.get("rss_mb") is not None]
    a1.plot([t for t, _ in pts], [v for _, v in pts], color="tab:blue", label="agent RSS")
    a1.set_ylabel("RSS (MB)")
    if windows:
        xs, ys = [], []
        for w in windows:
            xs += [w["t_start"], w["t_end"]]
            ys += [w["p99_us"], w["p99_us"]]
        a2.plot(xs, ys, color="tab:red", label="agent p99 per window")
    a2.set_ylabel("latency p99 (us)")
    a2.set_xlabel("seconds since the agent started")
    for ax, key in ((a1, "rss_mb"), (a2, "p99_us")):
        base = (figures.get(key) or {}).get("baseline")
        if base is not None:
            ax.axhline(base, color="black", linestyle="--", linewidth=1,
                       label="baseline (first full window after warm-up)")
        if warmup:
            ax.axvspan(0, warmup, color="0.9", label="warm-up (left out of the trend)")
        for i, f in enumerate(data.get("faults") or []):
            if f.get("actual_start") is None:
                continue
            end = f.get("actual_end") if f.get("actual_end") is not None else f.get("end")
            colour = "tab:orange" if f.get("kind") == "cloud_outage" else "tab:purple"
            first = not any(g.get("kind") == f.get("kind") for g in (data.get("faults") or [])[:i])
            ax.axvspan(f["actual_start"], end, color=colour, alpha=0.25,
                       label=f.get("kind", "fault").replace("_", " ") if first else None)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if not windows:
        a2.annotate("no full latency window in this run", (0.5, 0.5), xycoords="axes fraction", ha="center")
    ran = data.get("ran_s")
    _save(fig, path, f"Soak: {ran:.0f} s with broker restarts and cloud outages" if ran else "Soak")
    slope = (figures.get("rss_mb") or {}).get("slope_per_hour")
    return ("Soak: RSS and p99 over time",
            "The agent's RSS (`VmRSS`, every sample) and its latency p99 per metric window (from its own "
            "histogram, read back from the cloud store), with broker restarts and cloud outages shaded. Dashed: "
            "the baseline, the first full window after the warm-up, same run."
            + (f" RSS slope after the warm-up: {slope:+.2f} MB/h." if slope is not None else ""))


def escalation_curve(plt: Any, data: dict[str, Any], path: Path) -> tuple[str, str]:
    """escalation_curve: combined accuracy against the escalation rate, device-only as the baseline."""
    curves, acc = data.get("curves") or {}, data.get("accuracy") or {}
    if not curves or "device_test" not in acc:
        raise NoData("escalation_curve.json has no curves")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for rule, c in curves.items():
        pts = c.get("points") or []
        ax.plot([100 * p["rate"] for p in pts], [100 * p["accuracy"] for p in pts], label=f"rule: {rule}")
    held = (data.get("held_out") or {}).get("score")
    if held:
        ax.plot([100 * held["test_rate"]], [100 * held["test_accuracy"]], marker="*", markersize=12,
                color="tab:red", linestyle="none",
                label=f"score rule tuned on validation for {held['budget_rate']:.0%}, on test")
    ax.axhline(100 * acc["device_test"], color="black", linestyle="--", linewidth=1,
               label="device model only (baseline)")
    ax.axhline(100 * acc["cloud_test"], color="tab:green", linestyle=":", linewidth=1, label="cloud model only")
    ax.set_xlabel("inputs escalated (%)")
    ax.set_ylabel("combined top-1 accuracy on test (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path, "Escalation: accuracy against escalation rate")
    return ("Escalation: accuracy vs escalation rate",
            "Combined accuracy (the cloud model's answer on escalated inputs, the device's elsewhere) on the test "
            "split, against the device model alone and the cloud model alone, same run.")


# name of the PNG, the benchmark whose JSON it reads, the function that draws it
PLOTS: list[tuple[str, str, Callable[[Any, dict[str, Any], Path], tuple[str, str]]]] = [
    ("latency_cdf.png", "loop_overhead", latency_cdf),
    ("quantize_speedup.png", "quantize", quantize_speedup),
    ("drift_delay.png", "drift", drift_delay),
    ("sync_throughput.png", "sync", sync_throughput),
    ("fleet_latency.png", "fleet", fleet_latency),
    ("soak.png", "soak", soak_series),
    ("escalation_curve.png", "escalation", escalation_curve),
]


def _save(fig: Any, path: Path, title: str) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    # No software/date metadata: a rerun with the same figures writes the same bytes.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})
    fig.clf()


def make_plots(outputs: dict[str, dict[str, Any] | None], plots_dir: Path) -> tuple[list[Plot], list[str]]:
    """Every plot whose benchmark ran and wrote JSON, into ``plots_dir``; and a note per plot not drawn."""
    wanted = [(f, b, fn) for f, b, fn in PLOTS if b in outputs]
    if not wanted:
        return [], []
    try:
        import matplotlib
    except ImportError:
        return [], ["matplotlib is not installed (the benchmark-only extra: pip install -e '.[bench]'): no plots"]
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    done: list[Plot] = []
    notes: list[str] = []
    for file, bench, fn in wanted:
        data = outputs[bench]
        if data is None:
            notes.append(f"{file}: not drawn, {bench} wrote no JSON")
            continue
        try:
            title, caption = fn(plt, data, plots_dir / file)
        except NoData as e:
            notes.append(f"{file}: not drawn, {e}")
            continue
        except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
            notes.append(f"{file}: not drawn, {bench}'s JSON is not as expected ({type(e).__name__}: {e})")
            continue
        finally:
            plt.close("all")
        done.append(Plot(file, bench, title, caption))
    return done, notes

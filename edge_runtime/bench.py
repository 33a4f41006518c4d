"""`edge-runtime bench`: the agent loop against bare ``session.run``, in one process and one run.

Both sides run the same session on the same inputs. They are measured in alternating blocks so that
a noisy neighbour or a CPU frequency change hits both alike; medians and their ratio are reported.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edge_runtime.core.inputs import make_feeds
from edge_runtime.pipeline import Pipeline
from edge_runtime.sources import Record
from edge_runtime.sysinfo import peak_rss_mb, rss_mb


class RepeatSource:
    """The same records over and over, at no cost: what `bench` feeds the agent loop."""

    name = "bench"
    preprocessed = True

    def __init__(self, records: list[Record]) -> None:
        self._records = records
        self._n = len(records)
        self._i = 0

    def read(self, timeout: float | None = None) -> Record:
        i = self._i
        self._i = i + 1 if i + 1 < self._n else 0
        return self._records[i]

    def close(self) -> None:
        pass


def _stats(ns: np.ndarray, batch: int) -> dict[str, float]:
    if ns.size == 0:
        return {}
    p50, p90, p99 = np.percentile(ns, [50, 90, 99])
    return {"p50_us": round(p50 / 1e3, 2), "p90_us": round(p90 / 1e3, 2), "p99_us": round(p99 / 1e3, 2),
            "mean_us": round(float(ns.mean()) / 1e3, 2), "max_us": round(float(ns.max()) / 1e3, 2),
            "iterations": int(ns.size),
            "throughput_per_s": round(batch * ns.size / (ns.sum() / 1e9), 1)}


def time_round_robin(runs: Mapping[str, Callable[[], object]], seconds: float, warmup_s: float = 0.5,
                     block_s: float = 0.05, progress: Callable[[str], None] | None = None
                     ) -> dict[str, np.ndarray]:
    """Per-call times (ns) of each callable, measured in alternating blocks of about ``block_s`` until
    each has ``seconds`` of measured time: a noisy neighbour or a clock change hits all alike.
    `bench` times bare ``session.run`` against the agent loop with it, `quantize` the variants."""
    clock = time.perf_counter_ns
    block: dict[str, int] = {}
    for name, run in runs.items():
        warm: list[int] = []
        t_end = time.monotonic() + warmup_s
        while time.monotonic() < t_end or len(warm) < 2:
            t = clock()
            run()
            warm.append(clock() - t)
        per_run_s = max(float(np.median(warm)) / 1e9, 1e-7)
        block[name] = int(min(max(block_s / per_run_s, 1), 5000))
    times: dict[str, list[int]] = {name: [] for name in runs}
    spent = dict.fromkeys(runs, 0)
    target = int(seconds * 1e9)
    t0 = time.monotonic()
    next_progress = t0 + 2.0
    total_s = seconds * len(runs)
    while any(s < target for s in spent.values()):
        for name, run in runs.items():
            if spent[name] >= target:
                continue
            out = times[name]
            start = len(out)
            for _ in range(block[name]):
                t = clock()
                run()
                out.append(clock() - t)
            spent[name] += sum(out[start:])
        if progress is not None and time.monotonic() >= next_progress:
            next_progress += 2.0
            progress(f"timing: {time.monotonic() - t0:.0f}/{total_s:.0f} s")
    return {name: np.asarray(t, dtype=np.int64) for name, t in times.items()}


def run_bench(engine: Any, *, batch: int = 1, seconds: float = 5.0, warmup_s: float = 0.5,
              overrides: dict[str, tuple[int, ...]] | None = None, dims: dict[str, int] | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure bare ``session.run`` and the agent's ``Pipeline.step`` on the same inputs."""
    spec = engine.spec
    feeds = make_feeds(spec, overrides, batch=batch, dims=dims, seed=0)
    if spec.batchable:
        records: list[Record] = [{k: np.ascontiguousarray(v[i]) for k, v in feeds.items()}
                                 for i in range(batch)]
        # Baseline and agent must see identical tensors: rebuild the baseline feed from the samples.
        feeds = {k: np.stack([r[k] for r in records]) for k in feeds}
    else:
        records = [feeds]
    pipe = Pipeline(engine.name, engine, RepeatSource(records), batch=batch)
    run = engine.session.run
    times = time_round_robin({"bare": functools.partial(run, None, feeds), "agent": pipe.step}, seconds / 2, warmup_s,
                             progress=progress)
    b, a = times["bare"], times["agent"]
    bare_s, agent_s = _stats(b, batch), _stats(a, batch)
    bare_us, agent_us = float(np.median(b)) / 1e3, float(np.median(a)) / 1e3
    infer = pipe.metrics.stages["infer"]
    m = pipe.metrics
    return {
        "model": engine.describe(),
        "profile": engine.profile.name,
        "providers": engine.providers,
        "batch": batch,
        "seconds": round(float(b.sum() + a.sum()) / 1e9, 2),
        "inputs": {k: {"shape": list(v.shape), "dtype": v.dtype.name} for k, v in feeds.items()},
        "bare_us": round(bare_us, 2),
        "agent_us": round(agent_us, 2),
        "overhead_us": round(agent_us - bare_us, 2),
        "ratio": round(agent_us / bare_us, 4) if bare_us > 0 else None,
        "bare": bare_s,
        "agent": agent_s,
        "agent_stages_us": {s: h.summary_us() for s, h in m.stages.items()},
        "agent_infer_p99_over_p50": (round(infer.quantile(0.99) / infer.quantile(0.5), 3)
                                     if infer.count else None),
        "bare_p99_over_p50": round(bare_s["p99_us"] / bare_s["p50_us"], 3) if bare_s else None,
        "agent_errors": m.error_total,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
    }


def format_table(r: dict[str, Any]) -> str:
    ins = ", ".join(f"{k} {v['dtype']}{v['shape']}" for k, v in r["inputs"].items())
    b, a = r["bare"], r["agent"]
    lines = [
        f"model      {r['model']['path'] or r['model']['name']}",
        f"inputs     {ins}",
        f"profile    {r['profile']}    providers {', '.join(r['providers'])}    batch {r['batch']}",
        "",
        f"{'':14}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'runs':>10}{'samples/s':>12}",
        f"{'bare run':14}{b['p50_us']:>10.2f}{b['p90_us']:>10.2f}{b['p99_us']:>10.2f}{b['iterations']:>10}"
        f"{b['throughput_per_s']:>12,.0f}",
        f"{'agent loop':14}{a['p50_us']:>10.2f}{a['p90_us']:>10.2f}{a['p99_us']:>10.2f}{a['iterations']:>10}"
        f"{a['throughput_per_s']:>12,.0f}",
        "",
        f"overhead   {r['overhead_us']:+.2f} us per run (agent/bare median ratio {r['ratio']:.3f})",
        f"memory     rss {r['rss_mb']:.1f} MB (peak {r['peak_rss_mb']:.1f} MB)",
    ]
    return "\n".join(lines)


def stderr_progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

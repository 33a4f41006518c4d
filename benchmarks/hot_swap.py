"""Swap pause: the longest gap between two outputs across a hot swap, against the normal gap between
outputs of the same stream in the same run.

A pipeline serves a steady stream (default 1,000 inputs/s) with the digits MLP (and the CNN at 100/s);
the main thread swaps the model back and forth (a second session of the same file, built and warmed
off the hot path as a rollout does) every half second. Every output's time is recorded; the report
gives the normal inter-output gap (median, p99 of gaps away from swaps), the gap across each swap, and
checks that every input was answered exactly once.

Usage: python benchmarks/hot_swap.py [--swaps 10] [--hz 1000] [--models-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ensure_models


class Paced:
    name = "paced"

    def __init__(self, rows: np.ndarray, hz: float, n: int) -> None:
        self.rows, self.period, self.n, self.i = rows, 1.0 / hz, n, 0
        self.t0 = time.perf_counter()

    def read(self, timeout: float | None = None):
        from edge_runtime.sources import EndOfSource

        if self.i >= self.n:
            raise EndOfSource
        due = self.t0 + self.i * self.period
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        rec = {"id": str(self.i), "x": self.rows[self.i % len(self.rows)]}
        self.i += 1
        return rec

    def close(self) -> None:
        pass


def measure(model: Path, rows: np.ndarray, hz: float, swaps: int, profile) -> dict:
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.pipeline import Pipeline

    engines = [OnnxEngine(model, profile), OnnxEngine(model, profile)]
    name = engines[0].spec.inputs[0].name
    n = int(hz * (swaps + 2) * 0.5)
    src = Paced(rows, hz, n)
    src_read = src.read

    def read(timeout=None):
        rec = src_read(timeout)
        return {"id": rec["id"], name: rec["x"]}

    src.read = read  # type: ignore[method-assign]
    times: list[float] = []
    ids: list[str] = []

    def sink(records, labels, scores, outputs) -> None:
        now = time.perf_counter()
        times.extend([now] * len(records))
        ids.extend(r["id"] for r in records)

    pipe = Pipeline("m", engines[0], src, sink=sink, version="1")
    t = threading.Thread(target=lambda: [None for _ in iter(pipe.step, False)], daemon=True)
    t.start()
    swap_at: list[float] = []
    for k in range(swaps):
        time.sleep(0.5)
        sw = pipe.prepare_swap(engines[(k + 1) % 2], str(k + 2))  # built and warmed off the hot path
        swap_at.append(time.perf_counter())
        pipe._pending_swap = sw
        sw.done.wait(10)
    t.join(60)
    gaps = np.diff(np.array(times)) * 1000
    # gaps that contain a swap request: from the output before the request to the one after it
    idx = [int(np.searchsorted(times, s)) for s in swap_at]
    across = [float(gaps[i - 1]) for i in idx if 0 < i < len(times)]
    mask = np.ones(len(gaps), bool)
    for i in idx:
        mask[max(0, i - 2):i + 2] = False
    normal = gaps[mask]
    return {"model": model.name, "hz": hz, "inputs": n, "outputs": len(ids), "unique": len(set(ids)),
            "swaps": pipe.swaps, "normal_gap_ms": {"median": round(float(np.median(normal)), 3),
                                                   "p99": round(float(np.percentile(normal, 99)), 3)},
            "swap_gap_ms": {"median": round(float(np.median(across)), 3), "max": round(float(max(across)), 3)},
            "swap_over_normal_median": round(float(np.median(across) / np.median(normal)), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--hz", type=float, default=1000.0)
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "models")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from edge_runtime.profiles import load_profile

    ensure_models(args.models_dir, ["digits_mlp.onnx", "digits_mlp.test_x.npy", "cnn.onnx", "cnn.calib_x.npy"],
                  lambda m: print(m, file=sys.stderr))
    prof = load_profile("x86-generic")
    out = [measure(args.models_dir / "digits_mlp.onnx", np.load(args.models_dir / "digits_mlp.test_x.npy"),
                   args.hz, args.swaps, prof),
           measure(args.models_dir / "cnn.onnx", np.load(args.models_dir / "cnn.calib_x.npy"), min(args.hz, 100.0),
                   args.swaps, prof)]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'model':16} {'hz':>6} {'inputs':>7} {'answered once':>13} {'swaps':>5} {'normal gap ms':>20} "
          f"{'gap across swap ms':>20} {'x normal':>8}")
    for o in out:
        ok = "yes" if o["outputs"] == o["unique"] == o["inputs"] else "NO"
        print(f"{o['model']:16} {o['hz']:6.0f} {o['inputs']:7d} {ok:>13} {o['swaps']:5d} "
              f"{o['normal_gap_ms']['median']:9.3f} (p99 {o['normal_gap_ms']['p99']:6.3f}) "
              f"{o['swap_gap_ms']['median']:8.3f} (max {o['swap_gap_ms']['max']:6.3f}) "
              f"{o['swap_over_normal_median']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

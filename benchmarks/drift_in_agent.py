"""Drift monitoring inside the agent loop: throughput and latency percentiles of the digits MLP pipeline
without monitoring, with the monitor inline (the default), and with it on its own thread; and the same for
frame-health checks on 640x480 camera-sized frames through the CNN.

Baseline: the same pipeline without monitoring, in the same run, interleaved (3 repeats; medians).

Usage: python benchmarks/drift_in_agent.py [--repeats 3] [--rows 18000] [--frames 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import ensure_models


def run(pipeline_factory, n: int) -> tuple[float, float, float, float]:
    p = pipeline_factory()
    t = time.perf_counter()
    while p.step():
        pass
    if p._gather:
        p.drain_drift()
    elapsed = time.perf_counter() - t
    lat = p.metrics.stages["latency"]
    return n / elapsed, lat.quantile(0.5) / 1000, lat.quantile(0.99) / 1000, lat.quantile(0.999) / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=18000)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--models-dir", type=Path, default=Path(__file__).resolve().parent / "out" / "models",
                    help="sample models (built there when missing; default benchmarks/out/models)")
    args = ap.parse_args()

    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.core.drift import DriftMonitor, build_reference, load_reference
    from edge_runtime.core.image_features import ImageHealth
    from edge_runtime.pipeline import Pipeline, resolve_model
    from edge_runtime.profiles import load_profile
    from edge_runtime.sources import ArraySource

    models = args.models_dir
    ensure_models(models, ["digits_mlp.onnx", "digits_mlp.train_x.npy", "cnn.onnx"],
                  lambda m: print(m, file=sys.stderr))
    prof = load_profile("x86-generic")
    tmp = Path(tempfile.mkdtemp(prefix="drift-in-agent-"))
    digits = OnnxEngine(models / "digits_mlp.onnx", prof)
    ref = load_reference(build_reference(np.load(models / "digits_mlp.train_x.npy"), None))
    test = np.load(models / "digits_mlp.test_x.npy")
    rows = np.resize(test, (args.rows, test.shape[1])).astype(np.float32)
    np.save(tmp / "rows.npy", rows)
    cnn = OnnxEngine(models / "cnn.onnx", prof)
    cref = resolve_model(models / "cnn.onnx", cnn.metadata)
    try:
        from edge_runtime.adapters.cv2_source import resize
    except ImportError:
        from edge_runtime.core.preprocess import resize_nearest as resize
    frames = np.random.default_rng(0).integers(0, 255, (args.frames, 480, 640, 3), dtype=np.uint8)
    np.save(tmp / "frames.npy", frames)

    cases = {
        ("rows", "none"): lambda: Pipeline("d", digits, ArraySource(tmp / "rows.npy")),
        ("rows", "inline"): lambda: Pipeline("d", digits, ArraySource(tmp / "rows.npy"), drift=DriftMonitor(ref)),
        ("rows", "thread"): lambda: Pipeline("d", digits, ArraySource(tmp / "rows.npy"), drift=DriftMonitor(ref),
                                             drift_thread=True),
        ("frames", "none"): lambda: Pipeline("c", cnn, ArraySource(tmp / "frames.npy"), preprocess=cref.preprocess,
                                             resize_fn=resize),
        ("frames", "inline"): lambda: Pipeline("c", cnn, ArraySource(tmp / "frames.npy"), preprocess=cref.preprocess,
                                               resize_fn=resize, health=ImageHealth()),
        ("frames", "thread"): lambda: Pipeline("c", cnn, ArraySource(tmp / "frames.npy"), preprocess=cref.preprocess,
                                               resize_fn=resize, health=ImageHealth(), drift_thread=True),
    }
    results: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    for r in range(args.repeats):
        for key, factory in cases.items():
            n = args.rows if key[0] == "rows" else args.frames
            results.setdefault(key, []).append(run(factory, n))
            print(f"repeat {r + 1}/{args.repeats}: {key[0]} {key[1]} done", file=sys.stderr)
    out = []
    for (data, mode), v in results.items():
        med = np.median(np.array(v), axis=0)
        base = np.median(np.array(results[(data, "none")]), axis=0)
        out.append({"data": data, "monitor": mode, "per_s": round(float(med[0]), 1),
                    "p50_us": round(float(med[1]), 1), "p99_us": round(float(med[2]), 1),
                    "p999_us": round(float(med[3]), 1), "throughput_ratio": round(float(med[0] / base[0]), 3),
                    "p99_ratio": round(float(med[2] / base[2]), 2)})
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'data':7} {'monitor':7} {'per_s':>9} {'p50_us':>8} {'p99_us':>8} {'p99.9_us':>9} "
              f"{'x thru':>7} {'x p99':>6}")
        for o in out:
            print(f"{o['data']:7} {o['monitor']:7} {o['per_s']:9.1f} {o['p50_us']:8.1f} {o['p99_us']:8.1f} "
                  f"{o['p999_us']:9.1f} {o['throughput_ratio']:7.3f} {o['p99_ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

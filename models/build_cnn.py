"""Build a small image CNN with onnx.helper from seeded random (He-initialised) weights.

Why: the runtime's camera path (resize, RGB, NCHW, scale, batching) and its latency
budget need a realistic convolutional workload without shipping a framework or a
downloaded checkpoint. The weights are RANDOM: this is a benchmark and plumbing
model, not a classifier. Its outputs are well-formed probabilities of no meaning
(the summary says "trained": false).

The expected preprocessing is stored in the model's metadata_props under
"edge_runtime.preprocess", so the runtime can read it instead of hard-coding it.

Outputs in DIR: cnn.onnx, cnn.sample_x.npy (8 uint8 HWC 64x64x3 camera frames), cnn.json.

Usage: python models/build_cnn.py --out DIR
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, logger

NAME = "cnn"
SEED = 0
OPSET = 17
# onnxruntime 1.17 (our floor) reads IR versions up to 9; onnx.helper would stamp the newest.
IR_VERSION = 8
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
IMAGE_SIZE = 64
N_CLASSES = 10
# Output channels of the 3x3 Conv+Relu blocks; each block but the last is followed by a 2x2 MaxPool.
# Sized for ~2 ms per batch-1 inference on a 2-core x86 box (AMD EPYC, onnxruntime 1.32 CPU, ~0.2 GMAC);
# (16, 32, 64, 64) ran in ~0.2 ms there, (48, 96, 192, 192) in ~1.2 ms.
CHANNELS = (64, 128, 256, 256)
PREPROCESS_KEY = "edge_runtime.preprocess"
PREPROCESS = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "color": "RGB",
    "layout": "NCHW",
    "scale": 1.0 / 255.0,
    "dtype": "float32",
}
N_SAMPLES = 8
WARMUP_RUNS = 20
TIMED_RUNS = 200


_log = logger(NAME)


def make_model(seed: int = SEED) -> Any:
    """Return the CNN as an onnx.ModelProto (weights drawn from a seeded He-normal init)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = []
    inits = []

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    x = INPUT_NAME
    c_in = 3
    for i, c_out in enumerate(CHANNELS):
        w, b = f"conv{i}.weight", f"conv{i}.bias"
        inits.append(numpy_helper.from_array(he((c_out, c_in, 3, 3), c_in * 9), w))
        inits.append(numpy_helper.from_array(np.zeros(c_out, np.float32), b))
        nodes.append(
            helper.make_node(
                "Conv", [x, w, b], [f"conv{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name=f"conv{i}"
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x = f"relu{i}"
        if i < len(CHANNELS) - 1:
            nodes.append(
                helper.make_node(
                    "MaxPool", [x], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2], name=f"pool{i}"
                )
            )
            x = f"pool{i}"
        c_in = c_out

    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1, name="flatten"))
    inits.append(numpy_helper.from_array(he((N_CLASSES, c_in), c_in), "fc.weight"))
    inits.append(numpy_helper.from_array(np.zeros(N_CLASSES, np.float32), "fc.bias"))
    nodes.append(
        helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")
    )
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1, name="softmax"))

    graph = helper.make_graph(
        nodes,
        NAME,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge_runtime.models.build_cnn",
        doc_string="Random-weight CNN (untrained): benchmark/plumbing model, outputs carry no meaning.",
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {PREPROCESS_KEY: json.dumps(PREPROCESS)})
    return model


def preprocess(frames_hwc_uint8: np.ndarray) -> np.ndarray:
    """Apply PREPROCESS to uint8 [N,H,W,3] RGB frames already at 64x64 -> float32 NCHW."""
    x = frames_hwc_uint8.astype(np.float32) * np.float32(PREPROCESS["scale"])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def measure_latency_ms(sess: Any, x: np.ndarray) -> dict[str, float]:
    """Time single-batch runs after a warm-up; the median is the number the brief's budget refers to."""
    feed = {INPUT_NAME: x}
    for _ in range(WARMUP_RUNS):
        sess.run(None, feed)
    times = np.empty(TIMED_RUNS)
    for i in range(TIMED_RUNS):
        t0 = time.perf_counter_ns()
        sess.run(None, feed)
        times[i] = (time.perf_counter_ns() - t0) / 1e6
    return {
        "median": float(np.median(times)),
        "p90": float(np.percentile(times, 90)),
        "min": float(times.min()),
    }


def build(out_dir: Path) -> dict[str, Any]:
    """Write and verify the CNN in out_dir, measure batch-1 latency; return the summary dict."""
    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = make_model()
    onnx.checker.check_model(model, full_check=True)
    model_path = out_dir / f"{NAME}.onnx"
    model_path.write_bytes(model.SerializeToString())
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    _log(f"wrote {model_path.name}: {n_params} parameters, channels {list(CHANNELS)}")

    frames = np.random.default_rng(SEED + 1).integers(
        0, 256, size=(N_SAMPLES, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8
    )
    np.save(out_dir / f"{NAME}.sample_x.npy", frames)

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = preprocess(frames)
    (proba,) = sess.run(None, {INPUT_NAME: x})
    if proba.shape != (N_SAMPLES, N_CLASSES) or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-4):
        raise RuntimeError(f"unexpected output: shape {proba.shape}, row sums {proba.sum(axis=1)}")

    latency = measure_latency_ms(sess, x[:1])
    _log(
        f"batch-1 latency median {latency['median']:.3f} ms, p90 {latency['p90']:.3f} ms "
        f"({os.cpu_count()} CPUs, onnxruntime {ort.__version__})"
    )

    summary: dict[str, Any] = {
        "name": NAME,
        "trained": False,
        "note": "random He-initialised weights: benchmark/plumbing model, predictions are meaningless",
        "seed": SEED,
        "n_params": n_params,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", N_CLASSES], "dtype": "float32"},
        "preprocess": PREPROCESS,
        "latency_ms_batch1": latency,
        "latency_host": {"cpu_count": os.cpu_count(), "onnxruntime": ort.__version__},
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "files": [model_path.name, f"{NAME}.sample_x.npy", f"{NAME}.json"],
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

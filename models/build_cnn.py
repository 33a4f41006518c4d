"""Build a small image CNN with onnx.helper: random conv features + a trained linear head.

Why: the runtime's camera path (resize, BGR->RGB, NCHW, scale, batching) and its latency
budget need a realistic convolutional workload whose predictions can be checked, without
shipping a deep-learning framework or a downloaded checkpoint.

Method ("random conv features + trained linear head"): the four 3x3 Conv+Relu blocks keep
seeded RANDOM He-normal weights and are never trained; they act as a fixed feature extractor.
Their last 8x8 map is average-pooled to a 2x2 grid (256 channels x 4 cells = 1024 features:
a global average would throw away where the strokes are). Only the final Gemm is trained: a
multinomial LogisticRegression on those features, with its StandardScaler folded into the
Gemm's weights. The images are scikit-learn's 8x8 digits rendered as 64x64 "camera frames":
bilinear upscale to 44x44, amber strokes on a blue background (so the three channels differ),
random shifts of up to 6 px, colour jitter and Gaussian noise. Accuracy is measured with
onnxruntime on held-out frames of the same synthetic distribution; it says nothing about photos
of real handwriting.

Frames are stored the way OpenCV delivers them, BGR uint8 HWC; the model wants RGB. The
preprocessing is stored in the model's metadata_props under "edge_runtime.preprocess"
(source_color BGR, color RGB, NCHW, scale 1/255, float32), and the build checks it against the
agent's own Preprocessor.

Outputs in DIR: cnn.onnx, cnn.sample_x.npy (32 test frames), cnn.test_x.npy (the held-out
frames, uint8 [N,64,64,3] BGR), cnn.test_y.npy (int64 [N]), cnn.calib_x.npy (200 training
frames preprocessed to float32 [200,3,64,64], for static quantization calibration), cnn.json.

Usage: python models/build_cnn.py --out DIR
"""

from __future__ import annotations

import importlib.util
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
FEATURES_NAME = "features"
IMAGE_SIZE = 64
N_CLASSES = 10
# Output channels of the 3x3 Conv+Relu blocks; each block but the last is followed by a 2x2 MaxPool.
# Sized for ~2 ms per batch-1 inference on a 2-core x86 box (AMD EPYC, onnxruntime 1.32 CPU, ~0.2 GMAC);
# (16, 32, 64, 64) ran in ~0.2 ms there, (48, 96, 192, 192) in ~1.2 ms.
CHANNELS = (64, 128, 256, 256)
# The last block's map is IMAGE_SIZE / 8 = 8 cells wide; average it down to HEAD_GRID x HEAD_GRID.
HEAD_GRID = 2
N_FEATURES = CHANNELS[-1] * HEAD_GRID * HEAD_GRID
PREPROCESS_KEY = "edge_runtime.preprocess"
PREPROCESS = {
    "resize": [IMAGE_SIZE, IMAGE_SIZE],
    "source_color": "BGR",
    "color": "RGB",
    "layout": "NCHW",
    "scale": 1.0 / 255.0,
    "dtype": "float32",
}
METHOD = "random conv features + trained linear head"

# Rendering of the 8x8 digits as camera frames (RGB values; stored as BGR).
DIGIT_SIZE = 44
MAX_SHIFT = 6
FOREGROUND_RGB = (250.0, 210.0, 60.0)
BACKGROUND_RGB = (30.0, 60.0, 140.0)
COLOUR_JITTER = 25.0
NOISE_SIGMA = 8.0

TEST_FRACTION = 0.25  # of the 1797 digits: 450 test frames, the same split as build_digits_mlp
LOGREG_C = 0.1  # picked on a prototype run: 0.03 / 0.1 / 0.3 gave 0.92 / 0.94 / 0.94 test accuracy
N_SAMPLES = 32
N_CALIB = 200
FEATURE_BATCH = 64
WARMUP_RUNS = 20
TIMED_RUNS = 200


_log = logger(NAME)


def _conv_stack(seed: int) -> tuple[list[Any], list[Any]]:
    """Nodes and initializers from the input to FEATURES_NAME [batch, N_FEATURES] (seeded random weights)."""
    from onnx import helper, numpy_helper

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

    cell = IMAGE_SIZE // 2 ** (len(CHANNELS) - 1) // HEAD_GRID
    nodes.append(
        helper.make_node(
            "AveragePool", [x], ["grid"], kernel_shape=[cell, cell], strides=[cell, cell], name="grid"
        )
    )
    nodes.append(helper.make_node("Flatten", ["grid"], [FEATURES_NAME], axis=1, name="flatten"))
    return nodes, inits


def _finish(graph: Any, doc: str) -> Any:
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge_runtime.models.build_cnn",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def _image_input() -> Any:
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])


def make_feature_model(seed: int = SEED) -> Any:
    """The frozen feature extractor alone (output FEATURES_NAME), used to fit the head."""
    from onnx import TensorProto, helper

    nodes, inits = _conv_stack(seed)
    out = helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["batch", N_FEATURES])
    graph = helper.make_graph(nodes, f"{NAME}_features", [_image_input()], [out], initializer=inits)
    return _finish(graph, "Random conv feature extractor of the cnn model (build-time helper).")


def make_model(fc_weight: np.ndarray, fc_bias: np.ndarray, seed: int = SEED) -> Any:
    """Return the CNN as an onnx.ModelProto: the seeded random conv stack, then Gemm(fc) and Softmax."""
    from onnx import TensorProto, helper, numpy_helper

    if fc_weight.shape != (N_CLASSES, N_FEATURES) or fc_bias.shape != (N_CLASSES,):
        raise ValueError(f"head shapes {fc_weight.shape}, {fc_bias.shape}; want ({N_CLASSES}, {N_FEATURES})")
    nodes, inits = _conv_stack(seed)
    inits.append(numpy_helper.from_array(fc_weight.astype(np.float32), "fc.weight"))
    inits.append(numpy_helper.from_array(fc_bias.astype(np.float32), "fc.bias"))
    nodes.append(
        helper.make_node("Gemm", [FEATURES_NAME, "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc")
    )
    nodes.append(helper.make_node("Softmax", ["logits"], [OUTPUT_NAME], axis=-1, name="softmax"))
    graph = helper.make_graph(
        nodes,
        NAME,
        [_image_input()],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", N_CLASSES])],
        initializer=inits,
    )
    model = _finish(
        graph,
        f"{METHOD}: seeded random He-normal conv stack (frozen), Gemm head trained on sklearn digits "
        "rendered as 64x64 BGR camera frames; see edge_runtime.preprocess metadata.",
    )
    helper.set_model_props(model, {PREPROCESS_KEY: json.dumps(PREPROCESS)})
    return model


def _upscale_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of [N,h,w] to [N,size,size] (pixel centres aligned); numpy, so OpenCV is not needed."""
    n = images.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    f = (src - i0).astype(np.float32)
    rows = images[:, i0, :] * (1 - f)[:, None] + images[:, i1, :] * f[:, None]
    return rows[:, :, i0] * (1 - f) + rows[:, :, i1] * f


def render_frames(digits_8x8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turn sklearn digits (float [N,8,8], 0..16) into BGR uint8 [N,64,64,3] frames, as a camera gives."""
    n = len(digits_8x8)
    strokes = _upscale_bilinear(digits_8x8.astype(np.float32) / 16.0, DIGIT_SIZE)
    alpha = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 1), np.float32)
    shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(n, 2))
    corner = (IMAGE_SIZE - DIGIT_SIZE) // 2
    for k, (dy, dx) in enumerate(shifts):
        y0, x0 = corner + dy, corner + dx
        alpha[k, y0 : y0 + DIGIT_SIZE, x0 : x0 + DIGIT_SIZE, 0] = strokes[k]
    jitter = rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, (2, n, 1, 1, 3)).astype(np.float32)
    fg = np.asarray(FOREGROUND_RGB, np.float32) + jitter[0]
    bg = np.asarray(BACKGROUND_RGB, np.float32) + jitter[1]
    rgb = rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    rgb *= np.float32(NOISE_SIGMA)
    rgb += bg
    rgb += (fg - bg) * alpha
    rgb = np.clip(np.rint(rgb, out=rgb), 0, 255, out=rgb).astype(np.uint8)
    return np.ascontiguousarray(rgb[..., ::-1])  # RGB -> BGR


def preprocess(frames_bgr: np.ndarray) -> np.ndarray:
    """Apply PREPROCESS to uint8 [N,64,64,3] BGR frames (already at 64x64) -> float32 RGB NCHW."""
    x = frames_bgr[..., ::-1].astype(np.float32) * np.float32(PREPROCESS["scale"])
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _agent_preprocessor() -> Any:
    """The runtime's own Preprocessor for PREPROCESS (the repository root is added when not installed)."""
    if importlib.util.find_spec("edge_runtime") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from edge_runtime.core.preprocess import Preprocessor, PreprocessSpec

    return Preprocessor(PreprocessSpec.from_dict(PREPROCESS, origin=NAME), INPUT_NAME)


def check_preprocess_matches_agent(frames_bgr: np.ndarray) -> None:
    """Raise unless the agent's Preprocessor turns each frame into exactly what preprocess() gives."""
    agent = _agent_preprocessor()
    ours = preprocess(frames_bgr)
    for i, frame in enumerate(frames_bgr):
        theirs = agent(frame)
        if theirs.dtype != ours.dtype or not np.array_equal(theirs, ours[i]):
            raise RuntimeError(f"frame {i}: the agent's preprocessing differs from the head's training input")


def _run_batched(sess: Any, x: np.ndarray) -> np.ndarray:
    """Run the single-output session over x in FEATURE_BATCH chunks (bounded memory)."""
    chunks = range(0, len(x), FEATURE_BATCH)
    return np.concatenate([sess.run(None, {INPUT_NAME: x[i : i + FEATURE_BATCH]})[0] for i in chunks])


def fit_head(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, Any, Any]:
    """Fit scaler + multinomial logistic regression; return Gemm weight/bias with the scaler folded in."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler().fit(features)
    # Floor the per-feature scale: dividing by the near-zero spread of an almost constant feature
    # would fold weights in the tens of thousands into the Gemm, and int8 quantization of that layer
    # would round every ordinary weight to zero.
    scaler.scale_ = np.maximum(scaler.scale_, 0.1 * float(np.median(scaler.scale_)))
    # One BLAS/OpenMP thread: on the 2-core reference box the default threading made this fit take
    # 10-20 s instead of 0.3 s (oversubscription with busy-waiting pools).
    with threadpool_limits(limits=1):
        clf = LogisticRegression(C=LOGREG_C, max_iter=1000).fit(scaler.transform(features), labels)
    # ((f - mean) / scale) @ coef.T + intercept == f @ (coef / scale).T + (intercept - coef @ (mean / scale))
    weight = clf.coef_ / scaler.scale_[None, :]
    bias = clf.intercept_ - clf.coef_ @ (scaler.mean_ / scaler.scale_)
    return weight.astype(np.float32), bias.astype(np.float32), scaler, clf


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
    """Render the frames, fit the head, write and verify the CNN in out_dir; return the summary dict."""
    import onnx
    import onnxruntime as ort
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    providers = ["CPUExecutionProvider"]

    digits = load_digits()
    img_train, img_test, y_train, y_test = train_test_split(
        digits.images, digits.target.astype(np.int64), test_size=TEST_FRACTION, stratify=digits.target,
        random_state=SEED,
    )
    frames_train = render_frames(img_train, np.random.default_rng(SEED + 1))
    frames_test = render_frames(img_test, np.random.default_rng(SEED + 2))
    check_preprocess_matches_agent(frames_test)
    x_train, x_test = preprocess(frames_train), preprocess(frames_test)
    _log(f"rendered {len(frames_train)} training, {len(frames_test)} test frames; agent preprocess matches")

    t0 = time.perf_counter()
    feature_sess = ort.InferenceSession(make_feature_model().SerializeToString(), providers=providers)
    f_train = _run_batched(feature_sess, x_train)
    t1 = time.perf_counter()
    weight, bias, scaler, clf = fit_head(f_train, y_train)
    train_acc = float(clf.score(scaler.transform(f_train), y_train))
    _log(f"features {f_train.shape} in {t1 - t0:.2f} s; head fit in {time.perf_counter() - t1:.2f} s "
         f"({clf.n_iter_[0]} iterations), train accuracy {train_acc:.4f}")

    model = make_model(weight, bias)
    onnx.checker.check_model(model, full_check=True)
    model_path = out_dir / f"{NAME}.onnx"
    model_path.write_bytes(model.SerializeToString())
    n_params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    _log(f"wrote {model_path.name}: {n_params} parameters, channels {list(CHANNELS)}, {N_FEATURES} features")

    sess = ort.InferenceSession(str(model_path), providers=providers)
    # The folded head must reproduce sklearn's probabilities on features already computed.
    (proba_train,) = sess.run(None, {INPUT_NAME: x_train[:FEATURE_BATCH]})
    proba_sklearn = clf.predict_proba(scaler.transform(f_train[:FEATURE_BATCH]))
    head_diff = float(np.abs(proba_train - proba_sklearn).max())
    if head_diff > 1e-3:
        raise RuntimeError(f"folded Gemm head differs from sklearn by {head_diff:.2e}")
    proba = _run_batched(sess, x_test)
    if proba.shape != (len(x_test), N_CLASSES) or not np.allclose(proba.sum(axis=1), 1.0, atol=1e-4):
        raise RuntimeError(f"unexpected output: shape {proba.shape}, row sums {proba.sum(axis=1)}")
    onnx_acc = float(np.mean(proba.argmax(axis=1) == y_test))
    _log(f"onnx test accuracy {onnx_acc:.4f} on {len(x_test)} test frames; head vs sklearn {head_diff:.0e}")

    files = {
        "sample_x": f"{NAME}.sample_x.npy",
        "test_x": f"{NAME}.test_x.npy",
        "test_y": f"{NAME}.test_y.npy",
        "calib_x": f"{NAME}.calib_x.npy",
    }
    np.save(out_dir / files["sample_x"], frames_test[:N_SAMPLES])
    np.save(out_dir / files["test_x"], frames_test)
    np.save(out_dir / files["test_y"], y_test)
    np.save(out_dir / files["calib_x"], x_train[:N_CALIB])

    latency = measure_latency_ms(sess, x_test[:1])
    _log(
        f"batch-1 latency median {latency['median']:.3f} ms, p90 {latency['p90']:.3f} ms "
        f"({os.cpu_count()} CPUs, onnxruntime {ort.__version__})"
    )

    summary: dict[str, Any] = {
        "name": NAME,
        "trained": True,
        "method": METHOD,
        "note": (
            "conv weights are seeded random He-normal and frozen; only the final Gemm is trained "
            "(LogisticRegression on 2x2-average-pooled conv features, scaler folded in). Data: sklearn "
            "digits rendered as 64x64 BGR frames (amber on blue, shifts, jitter, noise); accuracy holds "
            "for that synthetic distribution only"
        ),
        "dataset": "sklearn.datasets.load_digits rendered as camera frames",
        "rendering": {
            "digit_size": DIGIT_SIZE,
            "max_shift": MAX_SHIFT,
            "foreground_rgb": FOREGROUND_RGB,
            "background_rgb": BACKGROUND_RGB,
            "colour_jitter": COLOUR_JITTER,
            "noise_sigma": NOISE_SIGMA,
            "stored_as": "BGR uint8 HWC",
        },
        "class_names": [str(c) for c in range(N_CLASSES)],
        "onnx_test_accuracy": onnx_acc,
        "train_accuracy": train_acc,
        "logreg_c": LOGREG_C,
        "n_train": len(frames_train),
        "n_test": len(frames_test),
        "n_calib": min(N_CALIB, len(x_train)),
        "seed": SEED,
        "n_params": n_params,
        "n_features": N_FEATURES,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", N_CLASSES], "dtype": "float32"},
        "preprocess": PREPROCESS,
        "latency_ms_batch1": latency,
        "latency_host": {"cpu_count": os.cpu_count(), "onnxruntime": ort.__version__},
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "files": [model_path.name, *files.values(), f"{NAME}.json"],
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

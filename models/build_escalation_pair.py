"""Build a device/cloud model pair for confidence-based escalation: scikit-learn digits, a small MLP for
the device and a larger, more accurate ensemble for the cloud, both exported to ONNX.

Why: escalation sends only the inputs the device's model is unsure about to a bigger model in the
cloud; tuning its threshold, its tests and its benchmark need a real pair on the same task with held-out
data neither model trained on. The digits (8x8 images, 10 classes, offline in scikit-learn) are split
60/20/20: training rows, a validation split (to tune the threshold on) and a test split (to report on).

Device: StandardScaler + MLP with one hidden layer of 8 units (610 weights). It is then run through
`edge-runtime quantize` (edge_runtime.quantize.quantize_model: int8 dynamic and static variants timed
against fp32 in alternating blocks, judged by accuracy on the validation split): an int8 variant replaces
fp32 only when it is at least 1.05x faster and loses at most 1 accuracy point; otherwise fp32 stays, and
the report beside the model (quantize_report.json, recorded by `bundle create`) says why.
Cloud: StandardScaler + soft-voting ensemble of three MLPs with hidden layers (256, 128), different seeds
(about 150k weights in all, 250 times the device model's).

Both take RAW pixel rows (float32 [N,64], values 0..16) as input "input" and output "label" int64 [N]
and "probabilities" float32 [N,10], like the other sample classifiers.

Outputs in DIR/escalation/: device.onnx, cloud.onnx, train_x.npy, val_x.npy, val_y.npy, test_x.npy,
test_y.npy (float32 rows, int64 labels), quantize_report.json (when the quantize module is available) and
pair.json (the summary: accuracies of both models on both splits, the quantization choice).

Usage: python models/build_escalation_pair.py --out DIR
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MAX_IR_VERSION, SKLEARN_TARGET_OPSET, cli_main, dedupe_opsets, logger

NAME = "escalation_pair"
SUBDIR = "escalation"
SEED = 0
INPUT_NAME = "input"
DEVICE_HIDDEN = (8,)
CLOUD_HIDDEN = (256, 128)
CLOUD_MEMBERS = 3
QUANTIZE_SECONDS = 0.15  # per variant: ~15k runs of a ~10 us model, enough to tell a 1.05x difference

_log = logger(NAME)


def _export(pipe: Any, classifier_type: type, path: Path, doc: str, n_features: int) -> None:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    onx = convert_sklearn(pipe, name=path.stem, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
                          options={classifier_type: {"zipmap": False}}, target_opset=SKLEARN_TARGET_OPSET)
    onx.ir_version = min(onx.ir_version, MAX_IR_VERSION)
    dedupe_opsets(onx)
    # skl2onnx leaves an unused initializer in the voting ensemble; onnxruntime warns about it on every load
    used = {name for node in onx.graph.node for name in node.input}
    unused = [init for init in onx.graph.initializer if init.name not in used]
    for init in unused:
        onx.graph.initializer.remove(init)
    onx.doc_string = doc
    path.write_bytes(onx.SerializeToString())


def _run(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {INPUT_NAME: x.astype(np.float32)})
    return np.asarray(label), np.asarray(proba)


def _quantize(fp32: Path, out: Path, calib: Path, val_x: Path, val_y: Path) -> dict[str, Any] | None:
    """Run the project's quantize step; None when edge_runtime (or its models extra) is not importable."""
    if importlib.util.find_spec("edge_runtime") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from edge_runtime.profiles import load_profile
        from edge_runtime.quantize import quantize_model
    except ImportError as e:
        _log(f"quantize step skipped ({e}); the device model stays fp32")
        return None
    root = logging.getLogger()
    level = root.level
    # onnxruntime's quantizer warns that it cannot type the scaler's Mul output (it leaves it in fp32): noise here
    root.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="escalation-quantize-") as tmp:
            report = quantize_model(str(fp32), str(calib), tmp, load_profile("generic"), eval_path=str(val_x),
                                    labels_path=str(val_y), seconds=QUANTIZE_SECONDS, warmup_s=0.05)
            shutil.copyfile(Path(tmp) / "model.onnx", out / "device.onnx")
    finally:
        root.setLevel(level)
    for v in report["variants"]:  # the temporary variant files are gone: keep the figures, not the paths
        v["path"] = None
    report["chosen"]["path"] = str(out / "device.onnx")
    (out / "quantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build(out_dir: Path) -> dict[str, Any]:
    """Train, export, quantize and check the pair in out_dir/escalation; return the summary dict."""
    from sklearn.datasets import load_digits
    from sklearn.ensemble import VotingClassifier
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    out = Path(out_dir) / SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, stratify=y, random_state=SEED)
    x_val, x_test, y_val, y_test = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                    random_state=SEED)
    _log(f"training on {len(x_train)} rows; validation {len(x_val)}, test {len(x_test)}")

    device = Pipeline([("scaler", StandardScaler()),
                       ("mlp", MLPClassifier(hidden_layer_sizes=DEVICE_HIDDEN, max_iter=300, random_state=SEED))])
    cloud = Pipeline([("scaler", StandardScaler()), ("ensemble", VotingClassifier(
        [(f"mlp{i}", MLPClassifier(hidden_layer_sizes=CLOUD_HIDDEN, max_iter=300, random_state=SEED + i))
         for i in range(CLOUD_MEMBERS)], voting="soft", flatten_transform=False))])
    # One BLAS thread: on a 2-core box the default pools oversubscribe and the fits take 10x longer.
    # The tiny device MLP stops at max_iter by design (a deliberately weak model); its warning is noise.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        device.fit(x_train, y_train)
        cloud.fit(x_train, y_train)

    files = {"train_x.npy": x_train, "val_x.npy": x_val, "val_y.npy": y_val, "test_x.npy": x_test,
             "test_y.npy": y_test}
    for fname, arr in files.items():
        np.save(out / fname, arr.astype(np.float32 if fname.endswith("_x.npy") else np.int64))

    n_features = x.shape[1]
    with tempfile.TemporaryDirectory(prefix="escalation-pair-") as tmp:
        fp32 = Path(tmp) / "device_fp32.onnx"
        _export(device, MLPClassifier, fp32,
                f"escalation device model: scikit-learn digits, StandardScaler + MLP{DEVICE_HIDDEN}; input raw "
                f"pixels 0..16 float32 [N,{n_features}]", n_features)
        _export(cloud, VotingClassifier, out / "cloud.onnx",
                f"escalation cloud model: scikit-learn digits, StandardScaler + soft vote of {CLOUD_MEMBERS} "
                f"MLP{CLOUD_HIDDEN}; input raw pixels 0..16 float32 [N,{n_features}]", n_features)
        fp32_val = float(np.mean(_run(fp32, x_val)[0] == y_val))
        fp32_test = float(np.mean(_run(fp32, x_test)[0] == y_test))
        report = _quantize(fp32, out, out / "train_x.npy", out / "val_x.npy", out / "val_y.npy")
        if report is None:
            shutil.copyfile(fp32, out / "device.onnx")

    dev_label_val, dev_proba_val = _run(out / "device.onnx", x_val)
    dev_label_test = _run(out / "device.onnx", x_test)[0]
    cloud_label_val = _run(out / "cloud.onnx", x_val)[0]
    cloud_label_test, cloud_proba_test = _run(out / "cloud.onnx", x_test)
    sk_agree = float(np.mean(cloud_label_test == cloud.predict(x_test)))
    max_diff = float(np.abs(cloud_proba_test - cloud.predict_proba(x_test)).max())
    chosen = report["chosen"] if report else {"name": "fp32", "reason": "the quantize module is not available"}
    summary: dict[str, Any] = {
        "name": NAME, "trained": True, "dataset": "sklearn.datasets.load_digits", "dir": SUBDIR,
        "n_train": len(x_train), "n_val": len(x_val), "n_test": len(x_test), "n_features": n_features,
        "n_classes": int(dev_proba_val.shape[1]),
        "device": {"model": "StandardScaler + MLPClassifier" + str(DEVICE_HIDDEN),
                   "parameters": int(sum(w.size for w in device.named_steps["mlp"].coefs_)
                                     + sum(b.size for b in device.named_steps["mlp"].intercepts_)),
                   "bytes": (out / "device.onnx").stat().st_size, "variant": chosen["name"],
                   "quantize_reason": chosen["reason"],
                   "val_accuracy": float(np.mean(dev_label_val == y_val)),
                   "test_accuracy": float(np.mean(dev_label_test == y_test)),
                   "fp32_val_accuracy": fp32_val, "fp32_test_accuracy": fp32_test},
        "cloud": {"model": f"StandardScaler + soft VotingClassifier(MLPClassifier{CLOUD_HIDDEN} x{CLOUD_MEMBERS})",
                  "parameters": int(sum(w.size for m in cloud.named_steps["ensemble"].estimators_
                                        for w in (*m.coefs_, *m.intercepts_))),
                  "bytes": (out / "cloud.onnx").stat().st_size,
                  "val_accuracy": float(np.mean(cloud_label_val == y_val)),
                  "test_accuracy": float(np.mean(cloud_label_test == y_test)),
                  "onnx_sklearn_agreement": sk_agree, "max_probability_difference": max_diff},
        "files": sorted(f"{SUBDIR}/{name}" for name in {*(p.name for p in out.iterdir() if p.is_file()),
                                                          "pair.json"}),
    }
    _log(f"device {summary['device']['variant']}: val {summary['device']['val_accuracy']:.4f}, test "
         f"{summary['device']['test_accuracy']:.4f} ({chosen['reason']}); cloud: val "
         f"{summary['cloud']['val_accuracy']:.4f}, test {summary['cloud']['test_accuracy']:.4f}")
    (out / "pair.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Build a small, genuinely trained classifier: scikit-learn digits -> MLP -> ONNX.

Why: the runtime needs one real model whose accuracy can be checked end to end. The
scaler is part of the exported pipeline, so the ONNX model takes RAW pixel rows
(float32, values 0..16) and callers need no preprocessing knowledge.

Outputs in DIR: digits_mlp.onnx, digits_mlp.train_x.npy (float32 [N,64], the training rows:
drift reference and quantization calibration data), digits_mlp.test_x.npy (float32 [N,64]),
digits_mlp.test_y.npy (int64 [N]) and digits_mlp.json (the summary).

Usage: python models/build_digits_mlp.py --out DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, logger

NAME = "digits_mlp"
SEED = 0
INPUT_NAME = "input"
# Opset 17 / ai.onnx.ml 3 are the newest onnxruntime 1.17 (our floor) fully supports.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# onnxruntime 1.17 reads IR versions up to 9; newer onnx would otherwise stamp a newer one.
MAX_IR_VERSION = 9


_log = logger(NAME)


def build(out_dir: Path) -> dict[str, Any]:
    """Train, export and verify the digits MLP in out_dir; return the summary dict."""
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)
    _log(f"training on {len(x_train)} rows, testing on {len(x_test)}")

    pipe = Pipeline(
        [
            ("scaler", StandardScaler()),
            ("mlp", MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=SEED)),
        ]
    )
    pipe.fit(x_train, y_train)
    sklearn_acc = float(pipe.score(x_test, y_test))
    _log(f"sklearn test accuracy {sklearn_acc:.4f} after {pipe.named_steps['mlp'].n_iter_} iterations")

    onx = convert_sklearn(
        pipe,
        name=NAME,
        initial_types=[(INPUT_NAME, FloatTensorType([None, x.shape[1]]))],
        options={MLPClassifier: {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    onx.ir_version = min(onx.ir_version, MAX_IR_VERSION)
    onx.doc_string = "scikit-learn digits: StandardScaler + MLP(64); input raw pixels 0..16 float32 [N,64]"

    model_path = out_dir / f"{NAME}.onnx"
    model_path.write_bytes(onx.SerializeToString())
    np.save(out_dir / f"{NAME}.train_x.npy", x_train.astype(np.float32))
    np.save(out_dir / f"{NAME}.test_x.npy", x_test.astype(np.float32))
    np.save(out_dir / f"{NAME}.test_y.npy", y_test.astype(np.int64))

    # Accuracy as the runtime will see it: the ONNX file under onnxruntime, not the sklearn object.
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in sess.get_outputs()]
    label, proba = sess.run(["label", "probabilities"], {INPUT_NAME: x_test})
    onnx_acc = float(np.mean(label == y_test))
    agree = float(np.mean(label == pipe.predict(x_test)))
    _log(f"onnx test accuracy {onnx_acc:.4f}, agreement with sklearn {agree:.4f}, proba {proba.shape}")

    summary: dict[str, Any] = {
        "name": NAME,
        "trained": True,
        "onnx_test_accuracy": onnx_acc,
        "sklearn_test_accuracy": sklearn_acc,
        "onnx_sklearn_agreement": agree,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "input_names": [i.name for i in sess.get_inputs()],
        "output_names": output_names,
        "opset": {d.domain or "ai.onnx": d.version for d in onx.opset_import},
        "ir_version": onx.ir_version,
        "files": [model_path.name, f"{NAME}.train_x.npy", f"{NAME}.test_x.npy", f"{NAME}.test_y.npy",
                  f"{NAME}.json"],
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

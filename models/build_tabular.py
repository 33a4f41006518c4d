"""Build a labelled tabular classifier: sklearn breast cancer -> StandardScaler + LogisticRegression -> ONNX.

Why: drift monitoring and quantization need a tabular model whose training features and
labelled test rows ship beside it (reference distribution, calibration data, and ground truth
to show concept drift against). Breast cancer (569 rows, 30 continuous features, 2 classes) was
chosen over wine (178 rows, 13 features, 3 classes): more rows leave a usable reference set and
test set after the split, and 30 features of very different scales give per-feature drift
statistics something to find. The scaler is inside the exported pipeline, so the model takes
RAW feature rows (float32) in sklearn's feature order.

Outputs in DIR: tabular.onnx (input "input" float32 [N,30]; outputs "label" int64 [N] and
"probabilities" float32 [N,2]), tabular.train_x.npy (float32, the training rows: drift
reference and quantization calibration), tabular.test_x.npy (float32), tabular.test_y.npy
(int64) and tabular.json (the summary, with feature and class names).

Usage: python models/build_tabular.py --out DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, logger

NAME = "tabular"
SEED = 0
INPUT_NAME = "input"
# Same opsets as build_digits_mlp: the newest onnxruntime 1.17 (our floor) fully supports.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
# IR 8 is the lowest that carries opset 17, so older onnxruntime builds load the file too.
MAX_IR_VERSION = 8


_log = logger(NAME)


def _dedupe_opsets(model: Any) -> None:
    """Keep one opset_import per domain (the highest): skl2onnx 1.20 lists the default domain twice
    for this pipeline, which the checker tolerates but other tools may not."""
    versions: dict[str, int] = {}
    for op in model.opset_import:
        versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    if len(versions) != len(model.opset_import):
        del model.opset_import[:]
        for domain, version in versions.items():
            model.opset_import.add(domain=domain, version=version)


def build(out_dir: Path) -> dict[str, Any]:
    """Train, export and verify the tabular classifier in out_dir; return the summary dict."""
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=SEED)
    _log(f"training on {len(x_train)} rows, testing on {len(x_test)}, {x.shape[1]} features")

    pipe = Pipeline([("scaler", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000))])
    pipe.fit(x_train, y_train)
    sklearn_acc = float(pipe.score(x_test, y_test))
    _log(f"sklearn test accuracy {sklearn_acc:.4f}")

    onx = convert_sklearn(
        pipe,
        name=NAME,
        initial_types=[(INPUT_NAME, FloatTensorType([None, x.shape[1]]))],
        options={LogisticRegression: {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    onx.ir_version = min(onx.ir_version, MAX_IR_VERSION)
    _dedupe_opsets(onx)
    onx.doc_string = (
        f"scikit-learn breast cancer: StandardScaler + LogisticRegression; input raw features "
        f"float32 [N,{x.shape[1]}]; classes {list(data.target_names)}"
    )

    model_path = out_dir / f"{NAME}.onnx"
    model_path.write_bytes(onx.SerializeToString())
    files = {
        "train_x": f"{NAME}.train_x.npy",
        "test_x": f"{NAME}.test_x.npy",
        "test_y": f"{NAME}.test_y.npy",
    }
    np.save(out_dir / files["train_x"], x_train.astype(np.float32))
    np.save(out_dir / files["test_x"], x_test.astype(np.float32))
    np.save(out_dir / files["test_y"], y_test.astype(np.int64))

    # Accuracy as the runtime will see it: the ONNX file under onnxruntime, not the sklearn object.
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {INPUT_NAME: x_test})
    onnx_acc = float(np.mean(label == y_test))
    agree = float(np.mean(label == pipe.predict(x_test)))
    max_proba_diff = float(np.abs(proba - pipe.predict_proba(x_test)).max())
    _log(f"onnx test accuracy {onnx_acc:.4f}, agreement with sklearn {agree:.4f}, "
         f"max probability difference {max_proba_diff:.2e}")

    summary: dict[str, Any] = {
        "name": NAME,
        "trained": True,
        "dataset": "sklearn.datasets.load_breast_cancer",
        "feature_names": [str(f) for f in data.feature_names],
        "class_names": [str(c) for c in data.target_names],
        "onnx_test_accuracy": onnx_acc,
        "sklearn_test_accuracy": sklearn_acc,
        "onnx_sklearn_agreement": agree,
        "n_train": len(x_train),
        "n_test": len(x_test),
        "n_features": int(x.shape[1]),
        "input_names": [i.name for i in sess.get_inputs()],
        "output_names": [o.name for o in sess.get_outputs()],
        "opset": {d.domain or "ai.onnx": d.version for d in onx.opset_import},
        "ir_version": onx.ir_version,
        "files": [model_path.name, *files.values(), f"{NAME}.json"],
    }
    (out_dir / f"{NAME}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

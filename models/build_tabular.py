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

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, export_sklearn_classifier, logger

NAME = "tabular"
SEED = 0
INPUT_NAME = "input"


_log = logger(NAME)


def build(out_dir: Path) -> dict[str, Any]:
    """Train, export and verify the tabular classifier in out_dir; return the summary dict."""
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

    doc = (f"scikit-learn breast cancer: StandardScaler + LogisticRegression; input raw features "
           f"float32 [N,{x.shape[1]}]; classes {list(data.target_names)}")
    extra = {"dataset": "sklearn.datasets.load_breast_cancer", "feature_names": [str(f) for f in data.feature_names],
             "class_names": [str(c) for c in data.target_names]}
    return export_sklearn_classifier(pipe, LogisticRegression, NAME, doc, out_dir,
                                     (x_train, x_test, y_train, y_test), _log, extra, INPUT_NAME)


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

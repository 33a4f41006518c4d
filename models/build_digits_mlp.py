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

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, export_sklearn_classifier, logger

NAME = "digits_mlp"
SEED = 0
INPUT_NAME = "input"


_log = logger(NAME)


def build(out_dir: Path) -> dict[str, Any]:
    """Train, export and verify the digits MLP in out_dir; return the summary dict."""
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
    _log(f"trained in {pipe.named_steps['mlp'].n_iter_} iterations")

    doc = "scikit-learn digits: StandardScaler + MLP(64); input raw pixels 0..16 float32 [N,64]"
    return export_sklearn_classifier(pipe, MLPClassifier, NAME, doc, out_dir, (x_train, x_test, y_train, y_test),
                                     _log, {"dataset": "sklearn.datasets.load_digits"}, INPUT_NAME)


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

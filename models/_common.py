"""What the model build scripts share: their command line, logging, and loading each other by path.

models/ holds scripts, not a package: each script puts this folder on sys.path to import this file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent


def logger(prefix: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr)

    return log


def load_script(name: str) -> ModuleType:
    """Import models/<name>.py by path."""
    spec = importlib.util.spec_from_file_location(f"edge_models_{name}", HERE / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {HERE / name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_main(build: Callable[[Path], dict[str, Any]], doc: str | None, prefix: str,
             argv: list[str] | None = None, default_out: Path | None = None) -> int:
    """Build into --out, log to stderr, print one JSON line (the summary) to stdout."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    if default_out is None:
        parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    else:
        parser.add_argument("--out", type=Path, default=default_out,
                            help=f"output directory (default {default_out})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    summary = build(args.out)
    logger(prefix)(f"built in {time.perf_counter() - start:.2f} s -> {args.out}")
    print(json.dumps(summary))
    return 0


# Opset 17 / ai.onnx.ml 3 are the newest onnxruntime 1.17 (our floor) fully supports; IR 8 is the
# lowest that carries opset 17, so older onnxruntime builds load the files too.
SKLEARN_TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
MAX_IR_VERSION = 8


def dedupe_opsets(model: Any) -> None:
    """Keep one opset_import per domain (the highest): skl2onnx 1.20 lists the default domain twice
    for some pipelines, which the checker tolerates but other tools may not."""
    versions: dict[str, int] = {}
    for op in model.opset_import:
        versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    if len(versions) != len(model.opset_import):
        del model.opset_import[:]
        for domain, version in versions.items():
            model.opset_import.add(domain=domain, version=version)


def export_sklearn_classifier(pipe: Any, classifier_type: type, name: str, doc: str, out_dir: Path,
                              split: tuple[Any, Any, Any, Any], log: Callable[[str], None],
                              extra: dict[str, Any] | None = None, input_name: str = "input") -> dict[str, Any]:
    """Export a fitted scikit-learn pipeline with skl2onnx (no ZipMap: outputs ``label`` int64 [N] and
    ``probabilities`` float32 [N, C]), write it with its train/test arrays, and measure its accuracy
    as the runtime will see it: the ONNX file under onnxruntime, not the sklearn object."""
    import numpy as np
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    x_train, x_test, _y_train, y_test = split
    sklearn_acc = float(pipe.score(x_test, y_test))
    onx = convert_sklearn(pipe, name=name, initial_types=[(input_name, FloatTensorType([None, x_train.shape[1]]))],
                          options={classifier_type: {"zipmap": False}}, target_opset=SKLEARN_TARGET_OPSET)
    onx.ir_version = min(onx.ir_version, MAX_IR_VERSION)
    dedupe_opsets(onx)
    onx.doc_string = doc
    model_path = out_dir / f"{name}.onnx"
    model_path.write_bytes(onx.SerializeToString())
    files = [model_path.name, f"{name}.train_x.npy", f"{name}.test_x.npy", f"{name}.test_y.npy", f"{name}.json"]
    np.save(out_dir / files[1], x_train.astype(np.float32))
    np.save(out_dir / files[2], x_test.astype(np.float32))
    np.save(out_dir / files[3], y_test.astype(np.int64))
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    label, proba = sess.run(["label", "probabilities"], {input_name: x_test.astype(np.float32)})
    onnx_acc = float(np.mean(label == y_test))
    agree = float(np.mean(label == pipe.predict(x_test)))
    max_diff = float(np.abs(proba - pipe.predict_proba(x_test)).max())
    log(f"onnx test accuracy {onnx_acc:.4f} (sklearn {sklearn_acc:.4f}), agreement {agree:.4f}, "
        f"max probability difference {max_diff:.2e}")
    summary: dict[str, Any] = {
        "name": name, "trained": True, **(extra or {}),
        "onnx_test_accuracy": onnx_acc, "sklearn_test_accuracy": sklearn_acc, "onnx_sklearn_agreement": agree,
        "n_train": len(x_train), "n_test": len(x_test), "n_features": int(x_train.shape[1]),
        "input_names": [i.name for i in sess.get_inputs()], "output_names": [o.name for o in sess.get_outputs()],
        "opset": {d.domain or "ai.onnx": d.version for d in onx.opset_import}, "ir_version": onx.ir_version,
        "files": files,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary

"""Build tiny ONNX models shaped like awkward third-party models, for the generic benchmark tool.

Why: a benchmark that only ever saw "one float image in, one tensor out" breaks on real
models. These fixtures cover the shapes it must synthesise inputs for:

- multi_input.onnx: int64 tokens [batch, seq] (valid for any value in [0, 100)), bool mask
  [batch, seq], a rank-0 float32 temperature and a recurrent state h0 [1, batch, 16];
  outputs out [batch, 16] and h1 [1, batch, 16], both depending on every input.
- fixed_shape.onnx: x float32 [1, 8] with no symbolic dims -> y = Relu(x @ W) [1, 4].
- no_batch.onnx: x float32 [8] (rank 1, no batch axis) -> y = ReduceSum(x) scalar [].

The weights are seeded random numbers; the outputs mean nothing.

Usage: python models/build_test_models.py --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cli_main, logger

NAME = "test_models"
SEED = 0
OPSET = 17
# onnxruntime 1.17 (our floor) reads IR versions up to 9; onnx.helper would stamp the newest.
IR_VERSION = 8
VOCAB = 100
EMBED = 16


_log = logger(NAME)


def _finish(graph: Any, doc: str) -> Any:
    """Wrap a graph in a model with the opset and IR version every fixture shares."""
    from onnx import helper

    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="edge_runtime.models.build_test_models",
        doc_string=doc,
    )
    model.ir_version = IR_VERSION
    return model


def make_multi_input(rng: np.random.Generator) -> Any:
    """Embedding lookup masked, mean-pooled over seq, plus state, over temperature; new state out."""
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, values: list[int]) -> Any:
        return numpy_helper.from_array(np.array(values, np.int64), name)

    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, EMBED)).astype(np.float32), "embedding"),
        const("axis0", [0]),
        const("axis2", [2]),
    ]
    nodes = [
        helper.make_node("Gather", ["embedding", "tokens"], ["embedded"], axis=0),  # [B,S,16]
        helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT),  # [B,S]
        helper.make_node("Unsqueeze", ["mask_f", "axis2"], ["mask_f3"]),  # [B,S,1]
        helper.make_node("Mul", ["embedded", "mask_f3"], ["masked"]),  # [B,S,16]
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0),  # [B,16]
        helper.make_node("Squeeze", ["h0", "axis0"], ["state"]),  # [B,16]
        helper.make_node("Add", ["pooled", "state"], ["summed"]),
        helper.make_node("Div", ["summed", "temperature"], ["out"]),  # [B,16]
        helper.make_node("Tanh", ["out"], ["next_state"]),
        helper.make_node("Unsqueeze", ["next_state", "axis0"], ["h1"]),  # [1,B,16]
    ]
    graph = helper.make_graph(
        nodes,
        "multi_input",
        [
            helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", "seq"]),
            helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "batch", EMBED]),
        ],
        [
            helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", EMBED]),
            helper.make_tensor_value_info("h1", TensorProto.FLOAT, [1, "batch", EMBED]),
        ],
        initializer=inits,
    )
    return _finish(graph, f"Test fixture: four inputs of four dtypes/ranks; tokens must be in [0, {VOCAB}).")


def make_fixed_shape(rng: np.random.Generator) -> Any:
    """y = Relu(x @ W) with every dim fixed, so nothing may be resized by the caller."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "weight")
    nodes = [
        helper.make_node("MatMul", ["x", "weight"], ["xw"]),
        helper.make_node("Relu", ["xw"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[weight],
    )
    return _finish(graph, "Test fixture: fully static shapes [1,8] -> [1,4].")


def make_no_batch() -> Any:
    """y = sum(x) over a rank-1 input, so there is no batch axis to grow and the output is rank 0."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)],
        "no_batch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
    )
    return _finish(graph, "Test fixture: rank-1 input without batch axis, scalar output.")


SMOKE_BATCH, SMOKE_SEQ = 3, 5
# Output shapes the smoke run must produce from _smoke_feeds.
SMOKE_OUTPUT_SHAPES = {
    "multi_input": {"out": [SMOKE_BATCH, EMBED], "h1": [1, SMOKE_BATCH, EMBED]},
    "fixed_shape": {"y": [1, 4]},
    "no_batch": {"y": []},
}


def _smoke_feeds(rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """Inputs for a quick onnxruntime run of each fixture."""
    batch, seq = SMOKE_BATCH, SMOKE_SEQ
    return {
        "multi_input": {
            "tokens": rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64),
            "mask": rng.random((batch, seq)) < 0.7,
            "temperature": np.array(0.5, np.float32),
            "h0": rng.standard_normal((1, batch, EMBED)).astype(np.float32),
        },
        "fixed_shape": {"x": rng.standard_normal((1, 8)).astype(np.float32)},
        "no_batch": {"x": rng.standard_normal(8).astype(np.float32)},
    }


def build(out_dir: Path) -> dict[str, Any]:
    """Write, check and smoke-run every fixture in out_dir; return the summary dict."""
    import onnx
    import onnxruntime as ort

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    models = {
        "multi_input": make_multi_input(rng),
        "fixed_shape": make_fixed_shape(rng),
        "no_batch": make_no_batch(),
    }
    feeds = _smoke_feeds(rng)

    summary: dict[str, Any] = {"name": NAME, "trained": False, "opset": OPSET, "models": {}}
    for name, model in models.items():
        onnx.checker.check_model(model, full_check=True)
        path = out_dir / f"{name}.onnx"
        path.write_bytes(model.SerializeToString())
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = sess.run(None, feeds[name])
        out_shapes = {o.name: list(v.shape) for o, v in zip(sess.get_outputs(), outputs, strict=True)}
        if out_shapes != SMOKE_OUTPUT_SHAPES[name]:
            raise RuntimeError(f"{name}: output shapes {out_shapes}, expected {SMOKE_OUTPUT_SHAPES[name]}")
        if not all(np.all(np.isfinite(v)) for v in outputs):
            raise RuntimeError(f"{name}: non-finite output")
        _log(f"{path.name}: checker ok, smoke-run output shapes {out_shapes}")
        summary["models"][name] = {
            "file": path.name,
            "inputs": {i.name: {"type": i.type, "shape": i.shape} for i in sess.get_inputs()},
            "outputs": {o.name: {"type": o.type, "shape": o.shape} for o in sess.get_outputs()},
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    return cli_main(build, __doc__, Path(__file__).stem, argv)


if __name__ == "__main__":
    sys.exit(main())

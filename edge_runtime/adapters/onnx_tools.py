"""The one module that imports ``onnx`` and ``onnxruntime.quantization``: model rewriting for
`edge-runtime quantize` (pre-processing, graph optimisation, int8 quantization, float16 conversion).
It also imports ``onnxruntime`` itself, for one throw-away session that writes the optimised graph
(``SessionOptions.optimized_model_filepath``); sessions that run models stay in ``onnx_engine``.

Needs the ``models`` extra (onnx). Importing this module raises ImportError without it;
``edge_runtime.quantize`` turns that into a MissingExtraError. Every function reads one model file
and writes another, so the caller can record a failure per variant and go on.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)

ONNX_VERSION = onnx.__version__

# Weights of dynamic quantization: signed int8 (U8S8 with the uint8 activations that
# DynamicQuantizeLinear produces). It is onnxruntime's default and the pair its CPU kernels are tuned
# for (x86 VNNI/AVX2 and Arm dot-product kernels); U8U8 is only the fallback for accuracy trouble.
DYNAMIC_WEIGHT_TYPE = QuantType.QInt8


@contextmanager
def _quiet_tools() -> Iterator[None]:
    """The quantizers log every tensor they skip on the root logger at INFO: keep their warnings only
    (all of it with --log-level debug)."""
    root = logging.getLogger()
    level = root.level
    if level > logging.DEBUG:
        root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def preprocess(src: str | Path, dst: str | Path) -> str | None:
    """onnxruntime's recommended step before quantizing: symbolic shape inference, graph optimisation,
    ONNX shape inference. Symbolic inference needs sympy and is what fails on unusual graphs, so it is
    dropped (and a note returned) when sympy is missing or it fails; other failures are raised."""
    def run(skip_symbolic: bool) -> None:
        with _quiet_tools():
            quant_pre_process(str(src), str(dst), skip_optimization=False, skip_onnx_shape=False,
                              skip_symbolic_shape=skip_symbolic, auto_merge=True)

    if importlib.util.find_spec("sympy") is None:
        run(skip_symbolic=True)
        return "symbolic shape inference skipped: sympy is not installed"
    debug_file = Path("sym_shape_infer_temp.onnx")  # onnxruntime writes it to the cwd when inference fails
    had_debug_file = debug_file.exists()
    try:
        run(skip_symbolic=False)
    except Exception as e:
        if not had_debug_file:
            debug_file.unlink(missing_ok=True)
        log.debug("symbolic shape inference failed, retrying without it: %s", e)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        try:
            run(skip_symbolic=True)
        except Exception:
            raise e from None
        return f"symbolic shape inference skipped: it failed ({first[:200]})"
    return None


def optimize(src: str | Path, dst: str | Path, providers: list[str]) -> None:
    """Save onnxruntime's ORT_ENABLE_EXTENDED graph (fusions included) for ``providers``, so a device
    whose profile turns optimisation down, or that wants faster loading, gets the fused graph.
    The session exists only to write the file; it is dropped at once."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    ort.InferenceSession(str(src), sess_options=so, providers=providers)
    if not Path(dst).is_file():
        raise RuntimeError(f"onnxruntime did not write the optimised model {dst}")


def quantize_int8_dynamic(src: str | Path, dst: str | Path, op_types: list[str] | None = None) -> None:
    """Weights to int8 offline, activations quantized at run time: needs no calibration data.
    ``op_types``: quantize only these operator types (None: every type the quantizer supports)."""
    with _quiet_tools():
        quantize_dynamic(str(src), str(dst), weight_type=DYNAMIC_WEIGHT_TYPE, op_types_to_quantize=op_types)


class _FeedReader(CalibrationDataReader):
    """Hands the calibration feeds (batch axis included) to onnxruntime's calibrator one by one."""

    def __init__(self, feeds: list[Mapping[str, np.ndarray]]) -> None:
        self._feeds = feeds
        self._it: Iterator[Mapping[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self._it, None)
        return None if feed is None else dict(feed)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_int8_static(src: str | Path, dst: str | Path, feeds: list[Mapping[str, np.ndarray]],
                         per_channel: bool, op_types: list[str] | None = None,
                         exclude_nodes: list[str] | None = None) -> None:
    """QDQ format, uint8 activations and int8 weights, ranges from MinMax over the calibration feeds.
    QDQ is what onnxruntime's CPU, TensorRT and NNAPI/QNN providers all fuse into int8 kernels."""
    if not feeds:
        raise ValueError("static quantization needs at least one calibration sample")
    with _quiet_tools():
        quantize_static(str(src), str(dst), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                        nodes_to_exclude=exclude_nodes or [])


def convert_fp16(src: str | Path, dst: str | Path) -> None:
    """Weights and compute in float16, inputs and outputs kept float32 (callers feed the same arrays).
    onnxconverter-common's converter when installed, else the copy onnxruntime ships."""
    try:
        from onnxconverter_common import float16
    except ImportError:
        from onnxruntime.transformers import float16  # the same converter, vendored by onnxruntime
    model = onnx.load(str(src))
    with _quiet_tools():
        converted: Any = float16.convert_float_to_float16(model, keep_io_types=True)
    onnx.save(converted, str(dst))


def read_metadata(path: str | Path) -> dict[str, str]:
    """The model's metadata_props (the runtime reads its preprocessing spec there)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def add_missing_metadata(path: str | Path, props: Mapping[str, str]) -> list[str]:
    """Put back the metadata entries a rewrite dropped (onnxruntime's optimiser and the quantizers
    do not all keep them), so a variant runs with the same preprocessing. Returns the keys added."""
    if not props:
        return []
    model = onnx.load(str(path))
    have = {p.key for p in model.metadata_props}
    added = [k for k in props if k not in have]
    for k in added:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, props[k]
    if added:
        onnx.save(model, str(path))
    return added


def check_model(path: str | Path) -> str | None:
    """None when onnx's checker accepts the model file, else its complaint (first line)."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def model_info(path: str | Path) -> dict[str, Any]:
    """Opsets, IR version and producer of a model file, for a bundle's manifest."""
    m = onnx.load(str(path), load_external_data=False)
    return {"ir_version": int(m.ir_version),
            "opsets": {(d.domain or "ai.onnx"): int(d.version) for d in m.opset_import},
            "producer": f"{m.producer_name} {m.producer_version}".strip() or None}


_HEAD_OPS = frozenset({"Gemm", "MatMul", "Conv"})


def head_nodes(path: str | Path) -> list[str]:
    """Names of the last Gemm/MatMul/Conv on every path back from a graph output: the classifier
    head. Its weights and inputs often have the widest ranges in the model, and quantizing it costs
    the most accuracy for the least time. Nodes without a name cannot be excluded: none returned."""
    m = onnx.load(str(path), load_external_data=False)
    producer = {out: node for node in m.graph.node for out in node.output}
    heads: list[str] = []
    seen: set[int] = set()
    stack = [o.name for o in m.graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _HEAD_OPS:
            if not node.name:
                return []
            heads.append(node.name)
            continue
        stack.extend(node.input)
    return sorted(set(heads))

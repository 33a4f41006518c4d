"""`edge-runtime quantize`: build faster variants of a model, measure them, keep the best safe one.

Variants: ``fp32`` (as is), ``fp32-opt`` (onnxruntime's extended graph optimisations saved to a
file), ``int8-dynamic``, ``int8-static`` and ``int8-static-perchannel`` (calibrated on the user's
data), ``int8-static-perchannel-body`` (only Conv/MatMul/Gemm quantized, the classifier head kept in
fp32), and ``fp16`` on GPU profiles. Each is loaded with the device profile like ``run`` would, its
outputs are compared with fp32 on evaluation data, and all are timed in alternating ~50 ms blocks so
that machine noise hits every variant alike. The pure rule in :mod:`edge_runtime.core.choose` picks
the fastest variant within the accuracy limit; fp32 is kept when nothing is clearly faster.

onnx and onnxruntime.quantization are only imported (through ``adapters/onnx_tools.py``) when the
command runs: they belong to the ``models`` extra.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.bench import time_round_robin
from edge_runtime.core.choose import (
    BASELINE,
    VariantResult,
    accuracy_drop,
    choose_variant,
    find_baseline,
    speedup,
)
from edge_runtime.errors import EdgeRuntimeError, InputValidationError, MissingExtraError

log = logging.getLogger(__name__)

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
EVAL_CHUNK = 64  # samples per run when evaluating a batchable model
REPORT_NAME = "quantize_report.json"
# The fourth int8 candidate: only the compute-heavy operators (Conv, MatMul, Gemm), per channel, with the
# classifier head kept in fp32. On the sample CNN, quantizing pools and the head cost 4-26 accuracy
# points for no extra speed; this variant kept the accuracy at the same 2.4x speedup.
HEAD_FP32 = "int8-static-perchannel-body"
BODY_OPS = ["Conv", "MatMul", "Gemm"]

Feeds = dict[str, np.ndarray]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `quantize` on the top-level parser's subparsers (called by ``cli.build_parser``)."""
    from edge_runtime.cli import _add_common

    p = subparsers.add_parser(
        "quantize", help="build int8/fp16/optimised variants of a model and keep the fastest accurate one",
        description="Quantize a model for this device: build fp32-opt, int8-dynamic, int8-static "
                    "(per-tensor, per-channel, and per-channel on Conv/MatMul/Gemm with the classifier "
                    "head in fp32) and, on GPU profiles, fp16 variants; compare each "
                    "with fp32 on evaluation data; time all in alternating blocks; copy the fastest "
                    "one within --max-accuracy-drop and at least --min-speedup times faster than fp32 "
                    "to DIR/model.onnx (fp32 when none is). Calibration and evaluation data are model "
                    "input tensors (already preprocessed), one row per sample.",
    )
    p.add_argument("--model", required=True, metavar="PATH_OR_BUNDLE", help="an .onnx file or a bundle")
    p.add_argument("--calibration", required=True, metavar="X.npy",
                   help="calibration inputs: a .npy (single-input models) or a .npz with one array per "
                        "input name; rows are samples")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="writes DIR/variants/<name>.onnx, DIR/model.onnx (the chosen one) and "
                        f"DIR/{REPORT_NAME}")
    p.add_argument("--calibration-samples", type=int, default=200, metavar="N",
                   help="use at most N calibration rows, spread over the file (default 200)")
    p.add_argument("--eval", metavar="X.npy",
                   help="evaluation inputs (.npy/.npz like --calibration); default: the calibration data")
    p.add_argument("--eval-samples", type=int, default=1000, metavar="N",
                   help="use at most N evaluation rows (default 1000)")
    p.add_argument("--labels", metavar="Y.npy",
                   help="true class per evaluation row: judge variants by top-1 accuracy instead of "
                        "agreement with fp32")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, metavar="PTS",
                   help="largest accuracy loss against fp32 in percentage points (without --labels: "
                        "top-1 agreement with fp32 must be at least 100 - PTS %%; default 1.0)")
    p.add_argument("--min-speedup", type=float, default=1.05, metavar="X",
                   help="a variant must be at least X times faster than fp32 to replace it (default 1.05)")
    p.add_argument("--seconds", type=float, default=3.0, metavar="S",
                   help="measured time per variant (default 3)")
    p.add_argument("--warmup", type=float, default=0.5, metavar="S",
                   help="warm-up seconds per variant (default 0.5)")
    p.add_argument("--quantize-ops", metavar="OP,OP",
                   help="int8: quantize only these operator types, e.g. Conv,MatMul (default: every type "
                        "onnxruntime supports); for a layer that loses too much accuracy in int8")
    p.add_argument("--fp16", action="store_true",
                   help="also try float16 when the profile's first provider is not CUDA or TensorRT")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    _add_common(p)
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    """Run the whole command; the report is written even when every variant but fp32 failed."""
    from edge_runtime.cli import _parse_dims, _profile
    from edge_runtime.core.inputs import parse_shape_overrides

    if args.seconds <= 0 or args.warmup < 0:
        raise EdgeRuntimeError("--seconds must be > 0 and --warmup >= 0")
    if args.calibration_samples < 1 or args.eval_samples < 1:
        raise EdgeRuntimeError("--calibration-samples and --eval-samples must be >= 1")
    if args.max_accuracy_drop < 0 or args.min_speedup <= 0:
        raise EdgeRuntimeError("--max-accuracy-drop must be >= 0 and --min-speedup > 0")
    report = quantize_model(
        args.model, args.calibration, args.out, _profile(args.profile),
        calibration_samples=args.calibration_samples, eval_path=args.eval, eval_samples=args.eval_samples,
        labels_path=args.labels, max_accuracy_drop=args.max_accuracy_drop, min_speedup=args.min_speedup,
        seconds=args.seconds, warmup_s=args.warmup, fp16=args.fp16,
        quantize_ops=[o.strip() for o in args.quantize_ops.split(",") if o.strip()] if args.quantize_ops else None,
        overrides=parse_shape_overrides(args.input_shape), dims=_parse_dims(args.dim),
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0


# -- data -------------------------------------------------------------------------------------


def _pick_rows(n: int, limit: int) -> np.ndarray:
    """At most ``limit`` row indices spread over the file: files sorted by class still give a mix."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def load_samples(path: str, spec: Any, limit: int, preprocess: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> tuple[list[Feeds], np.ndarray, int]:
    """Rows of a .npy/.npz as checked feeds for one run each (batch axis added as the runtime does),
    the row indices used, and how many rows went through ``preprocess``. A row that already fits the
    model is used as it is; one that does not (camera frames, say) gets the model's preprocessing on
    its first input, as `run` would apply it. A row that still fails is an error naming the row."""
    from edge_runtime.core.spec import SampleValidator

    try:
        obj = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"cannot read {path}: {e}") from e
    names = list(spec.input_names)
    if isinstance(obj, np.lib.npyio.NpzFile):
        arrays = {k: obj[k] for k in obj.files}
        missing = [n for n in names if n not in arrays]
        extra = sorted(set(arrays) - set(names))
        if missing or extra:
            raise EdgeRuntimeError(f"{path}: arrays {sorted(arrays)} do not match the model's inputs {names}"
                                   + (f" (missing {missing})" if missing else "")
                                   + (f" (unknown {extra})" if extra else ""))
    else:
        if len(names) != 1:
            raise EdgeRuntimeError(f"{path} holds one array but the model has inputs {names}: give a .npz "
                                   "with one array per input name")
        arrays = {names[0]: obj}
    lengths = {k: (len(a) if a.ndim else 0) for k, a in arrays.items()}
    if len(set(lengths.values())) != 1 or 0 in lengths.values():
        raise EdgeRuntimeError(f"{path}: every array needs the same number of rows (samples), got {lengths}")
    rows = _pick_rows(next(iter(lengths.values())), limit)
    validate = SampleValidator(spec)
    out: list[Feeds] = []
    first = names[0]
    n_pre = 0
    for i in rows.tolist():
        sample = {k: np.asarray(a[i]) for k, a in arrays.items()}
        try:
            try:
                feeds = validate(sample)
            except InputValidationError as e:
                if preprocess is None or e.reason not in ("rank", "shape", "dtype"):
                    raise
                feeds = validate({**sample, first: preprocess(sample[first])})
                n_pre += 1
        except InputValidationError as e:
            raise EdgeRuntimeError(f"{path} row {i}: {e}") from e
        out.append({k: v[None] for k, v in feeds.items()} if spec.batchable else feeds)
    return out, rows, n_pre


def load_labels(path: str, rows: np.ndarray) -> np.ndarray:
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"cannot read {path}: {e}") from e
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iub":
        raise EdgeRuntimeError(f"{path}: labels must be one integer class per row, got {y.dtype}{list(y.shape)}")
    if len(y) <= int(rows.max()):
        raise EdgeRuntimeError(f"{path}: {len(y)} labels for at least {int(rows.max()) + 1} evaluation rows")
    return y[rows]


def _chunks(feeds: list[Feeds], spec: Any) -> list[Feeds]:
    """Evaluation runs: samples of a batchable model stacked by up to EVAL_CHUNK (fewer calls), one by
    one where dynamic dims differ or the model takes one sample per run."""
    if not spec.batchable or spec.max_batch == 1:
        return feeds
    out: list[Feeds] = []
    for i in range(0, len(feeds), EVAL_CHUNK):
        group = feeds[i:i + EVAL_CHUNK]
        try:
            out.append({k: np.concatenate([f[k] for f in group]) for k in group[0]})
        except ValueError:
            out.extend(group)
    return out


# -- timing -----------------------------------------------------------------------------------


# -- evaluation -------------------------------------------------------------------------------


@dataclass
class _Scores:
    accuracy: float | None = None
    agreement: float | None = None
    max_abs_error: float | None = None


def _labels_of(post: Any, runs: list[list[Any]]) -> np.ndarray | None:
    got = [post.labels(out) for out in runs]
    if any(g is None for g in got):
        return None
    return np.concatenate([np.asarray(g).ravel() for g in got])


def _per_sample(outputs: list[Any], n: int, batched: bool) -> list[list[Any]]:
    """One run's outputs split into samples (rows of per-sample outputs when batched)."""
    if not batched:
        return [outputs]
    return [[o[j] if isinstance(o, np.ndarray) and o.ndim and o.shape[0] == n else o for o in outputs]
            for j in range(n)]


def _close(a: Any, b: Any) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        return bool(np.allclose(a, b, rtol=1e-2, atol=1e-3))
    return bool(np.array_equal(a, b))


def _max_abs(ref: list[list[Any]], got: list[list[Any]], index: int | None) -> float | None:
    worst = 0.0
    for r_out, g_out in zip(ref, got, strict=True):
        pairs = [(r_out[index], g_out[index])] if index is not None else list(zip(r_out, g_out, strict=True))
        for r_any, g_any in pairs:
            r, g = np.asarray(r_any), np.asarray(g_any)
            if r.dtype.kind not in "fiu" or r.shape != g.shape or r.size == 0:
                continue
            d = np.abs(g.astype(np.float64) - r.astype(np.float64))
            if not np.all(np.isfinite(d)):
                return None
            worst = max(worst, float(d.max()))
    return worst


def compare(post: Any, ref: list[list[Any]], got: list[list[Any]], sizes: list[int], batched: bool,
            y_true: np.ndarray | None) -> _Scores:
    """Accuracy (with labels), top-1 agreement with fp32, and the largest output difference. Models
    without a class output agree where every output is allclose(rtol=1e-2, atol=1e-3) to fp32's."""
    s = _Scores()
    ref_labels = _labels_of(post, ref)
    if ref_labels is not None:
        got_labels = _labels_of(post, got)
        assert got_labels is not None
        s.agreement = 100.0 * float(np.mean(got_labels == ref_labels))
        if y_true is not None:
            s.accuracy = 100.0 * float(np.mean(got_labels == y_true))
        s.max_abs_error = _max_abs(ref, got, post.scores_index)
        return s
    same = [all(_close(r, g) for r, g in zip(r_s, g_s, strict=True))
            for r_out, g_out, n in zip(ref, got, sizes, strict=True)
            for r_s, g_s in zip(_per_sample(r_out, n, batched), _per_sample(g_out, n, batched), strict=True)]
    s.agreement = 100.0 * float(np.mean(same)) if same else None
    s.max_abs_error = _max_abs(ref, got, None)
    return s


# -- the command ------------------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    path: Path
    built_from: str | None = None
    note: str | None = None
    engine: Any = None
    outputs: list[list[Any]] = field(default_factory=list)
    scores: _Scores = field(default_factory=_Scores)
    times_ns: np.ndarray | None = None
    error: str | None = None


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    text = msg[0] if msg else ""
    return f"{type(e).__name__}: {text}"[:400]


def _build(v: _Variant, build: Callable[[Path, Path], None], origin: Path, src: Path,
           metadata: dict[str, str], tools: Any) -> None:
    """Build one variant; a failure is recorded on it, not raised. A quantizer that fails on the
    pre-processed model gets the original one (pre-processing can drop type information the
    quantizers need, e.g. after operators of the ai.onnx.ml domain)."""
    log.info("building %s", v.name)
    t = time.monotonic()
    tries = [origin] if origin == src else [origin, src]
    for i, model in enumerate(tries):
        try:
            build(model, v.path)
            tools.add_missing_metadata(v.path, metadata)
        except Exception as e:
            v.path.unlink(missing_ok=True)
            if i + 1 < len(tries):
                v.note = f"the pre-processed model failed ({_short(e)}); built from the original"
                log.info("%s: %s", v.name, v.note)
                continue
            v.error = f"build failed: {_short(e)}"
            log.warning("%s: %s", v.name, v.error)
            return
        v.built_from = "original" if model == src else "preprocessed"
        log.info("built %s in %.1f s (%.0f KB)", v.name, time.monotonic() - t, v.path.stat().st_size / 1024)
        return


def _preprocess_fn(model: str, metadata: dict[str, str], input_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The model's own preprocessing (manifest, sidecar or metadata), for data given as raw frames."""
    from edge_runtime.cli import _resize_fn
    from edge_runtime.core.preprocess import Preprocessor
    from edge_runtime.pipeline import resolve_model

    ref = resolve_model(model, metadata)
    if ref.preprocess is None or ref.preprocess.is_identity:
        return None
    return Preprocessor(ref.preprocess, input_name, _resize_fn())


def _tools() -> Any:
    try:
        from edge_runtime.adapters import onnx_tools
    except ImportError as e:
        raise MissingExtraError("quantize", "models", "onnx") from e
    return onnx_tools


def quantize_model(model: str, calibration: str, out_dir: str | Path, profile: Any, *,
                   calibration_samples: int = 200, eval_path: str | None = None, eval_samples: int = 1000,
                   labels_path: str | None = None, max_accuracy_drop: float = 1.0, min_speedup: float = 1.05,
                   seconds: float = 3.0, warmup_s: float = 0.5, fp16: bool = False,
                   quantize_ops: list[str] | None = None,
                   overrides: Mapping[str, tuple[int, ...]] | None = None,
                   dims: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Build, check, time and choose; writes the variants, DIR/model.onnx and the report."""
    from edge_runtime import __version__
    from edge_runtime.adapters.onnx_engine import ORT_VERSION, OnnxEngine
    from edge_runtime.core.inputs import make_feeds
    from edge_runtime.pipeline import Postprocessor, resolve_model
    from edge_runtime.sysinfo import machine_info

    tools = _tools()
    started = time.monotonic()
    ref = resolve_model(model)
    src = Path(ref.model_path)
    log.info("loading %s with profile %s", src, profile.name)
    base_engine = OnnxEngine(src, profile, name=BASELINE)
    spec = base_engine.spec
    providers = list(base_engine.providers)

    pre_fn = _preprocess_fn(model, base_engine.metadata, spec.input_names[0])
    calib, _, calib_pre = load_samples(calibration, spec, calibration_samples, pre_fn)
    log.info("%d calibration samples from %s%s", len(calib), calibration,
             " (model preprocessing applied)" if calib_pre else "")
    eval_feeds, eval_rows, eval_pre = load_samples(eval_path or calibration, spec, eval_samples, pre_fn)
    y_true = load_labels(labels_path, eval_rows) if labels_path else None
    post = Postprocessor(spec)
    if y_true is not None and post.scores_index is None and post.labels_index is None:
        raise EdgeRuntimeError("--labels given but the model has no class output (a 2-D float scores "
                               "output or a 1-D integer label output)")
    runs = _chunks(eval_feeds, spec)
    sizes = [len(next(iter(f.values()))) if spec.batchable and f else 1 for f in runs]
    if overrides or dims:
        timing_feeds = make_feeds(spec, overrides, batch=1, dims=dims, seed=0)
        timing_source = "made up from --input-shape/--dim"
    else:
        timing_feeds = calib[0]
        timing_source = "first calibration sample"

    out = Path(out_dir)
    vdir = out / "variants"
    vdir.mkdir(parents=True, exist_ok=True)
    metadata = tools.read_metadata(src)

    names = [BASELINE, "fp32-opt", "int8-dynamic", "int8-static", "int8-static-perchannel"]
    want_fp16 = fp16 or (bool(profile.providers) and profile.providers[0] in GPU_PROVIDERS)
    if want_fp16:
        names.append("fp16")
    variants = {n: _Variant(n, vdir / f"{n}.onnx") for n in names}
    for v in variants.values():
        v.path.unlink(missing_ok=True)  # no stale file from an earlier run may pass for this one's

    base = variants[BASELINE]
    shutil.copyfile(src, base.path)
    base.built_from, base.engine = "original", base_engine

    with tempfile.TemporaryDirectory(prefix="quantize-", dir=out) as tmp:
        pre_path = Path(tmp) / "preprocessed.onnx"
        log.info("pre-processing (shape inference + optimisation) for quantization")
        try:
            note = tools.preprocess(src, pre_path)
            preprocess: dict[str, Any] = {"ok": True, "error": None, "note": note}
            if note:
                log.info("pre-processing: %s", note)
            qsrc = pre_path
        except Exception as e:  # the tools raise many unrelated types on unusual graphs
            preprocess = {"ok": False, "error": _short(e), "note": None}
            qsrc = src
            log.warning("pre-processing failed (%s); quantizing the original model instead",
                        preprocess["error"])
        heads = tools.head_nodes(qsrc)
        body_ops = [op for op in BODY_OPS if quantize_ops is None or op in quantize_ops]
        if heads and body_ops:
            names.insert(names.index("int8-static-perchannel") + 1, HEAD_FP32)
            variants[HEAD_FP32] = _Variant(HEAD_FP32, vdir / f"{HEAD_FP32}.onnx",
                                           note=f"quantized ops {', '.join(body_ops)}; kept in fp32: "
                                                f"{', '.join(heads)}")
            variants[HEAD_FP32].path.unlink(missing_ok=True)
        builders: dict[str, tuple[Path, Callable[[Path, Path], None]]] = {
            "fp32-opt": (src, lambda s, d: tools.optimize(s, d, providers)),
            "int8-dynamic": (qsrc, lambda s, d: tools.quantize_int8_dynamic(s, d, quantize_ops)),
            "int8-static": (qsrc, lambda s, d: tools.quantize_int8_static(s, d, calib, False, quantize_ops)),
            "int8-static-perchannel": (qsrc, lambda s, d: tools.quantize_int8_static(s, d, calib, True,
                                                                                     quantize_ops)),
            HEAD_FP32: (qsrc, lambda s, d: tools.quantize_int8_static(s, d, calib, True, body_ops,
                                                                      exclude_nodes=heads)),
            "fp16": (src, tools.convert_fp16),
        }
        for name in names[1:]:
            origin, build = builders[name]
            _build(variants[name], build, origin, src, metadata, tools)

    log.info("evaluating every variant on %d samples of %s", len(eval_feeds),
             eval_path or "the calibration data")
    _load_and_evaluate(variants, profile, runs, timing_feeds, lambda want, got: compare(
        post, want, got, sizes, spec.batchable, y_true))

    timed = [v for v in variants.values() if v.error is None]
    log.info("timing %s, %.1f s each in alternating blocks (inputs: %s)",
             ", ".join(v.name for v in timed), seconds, timing_source)
    times = time_round_robin({v.name: functools.partial(v.engine.session.run, None, timing_feeds)
                              for v in timed}, seconds, warmup_s,
                             progress=lambda m: log.info("%s", m))
    for v in timed:
        v.times_ns = times[v.name]

    results = [VariantResult(v.name, float(np.median(v.times_ns)) / 1e3 if v.times_ns is not None else None,
                             v.scores.accuracy, v.scores.agreement, v.error) for v in variants.values()]
    choice = choose_variant(results, max_accuracy_drop, min_speedup)
    rows = _rows(variants, results)

    chosen_path = out / "model.onnx"
    shutil.copyfile(variants[choice.name].path, chosen_path)
    sidecar = out / "model.preprocess.json"
    sidecar.unlink(missing_ok=True)
    if ref.preprocess is not None:
        # A sidecar or manifest spec does not travel inside the model file: write it next to model.onnx.
        sidecar.write_text(json.dumps(ref.preprocess.to_dict(), indent=2) + "\n")
    report: dict[str, Any] = {
        "edge_runtime": __version__,
        "model": str(src),
        "profile": profile.name,
        "providers": providers,
        "machine": machine_info(),
        "onnxruntime": ORT_VERSION,
        "onnx": tools.ONNX_VERSION,
        "calibration": {"path": calibration, "samples": len(calib), "preprocessed": calib_pre > 0},
        "eval": {"path": eval_path or "calibration data", "samples": len(eval_feeds),
                 "labels": labels_path, "preprocessed": eval_pre > 0},
        "accuracy_basis": "labels" if y_true is not None else "agreement with fp32",
        "preprocess": preprocess,
        "timing": {"seconds_per_variant": seconds, "warmup_s": warmup_s, "inputs": timing_source,
                   "shapes": {k: list(a.shape) for k, a in timing_feeds.items()}},
        "limits": {"max_accuracy_drop_pts": max_accuracy_drop, "min_speedup": min_speedup},
        "quantize_ops": quantize_ops or "all supported",
        "variants": rows,
        "chosen": {"name": choice.name, "speedup": round(choice.speedup, 2),
                   "accuracy_drop_pts": round(choice.accuracy_drop_pts, 3), "reason": choice.reason,
                   "path": str(chosen_path)},
        "duration_s": round(time.monotonic() - started, 1),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    log.info("chosen: %s -> %s (report %s)", choice.reason, chosen_path, out / REPORT_NAME)
    return report


def _load_and_evaluate(variants: dict[str, _Variant], profile: Any, runs: list[Feeds], timing_feeds: Feeds,
                       score: Callable[[list[list[Any]], list[list[Any]]], _Scores]) -> None:
    """Load each built variant like `run` would and compare its outputs with fp32's (first in
    ``variants``). A variant that cannot load or run is marked failed; fp32 failing is fatal."""
    from edge_runtime.adapters.onnx_engine import OnnxEngine

    base = variants[BASELINE]
    for v in variants.values():
        if v.error is None and v.engine is None:
            try:
                v.engine = OnnxEngine(v.path, profile, name=v.name)
            except Exception as e:
                v.error = f"load failed: {_short(e)}"
                log.warning("%s: %s", v.name, v.error)
    for v in variants.values():
        if v.error is not None:
            continue
        try:
            v.outputs = [v.engine.session.run(None, f) for f in runs]
            v.engine.session.run(None, timing_feeds)
        except Exception as e:
            if v is base:
                raise EdgeRuntimeError(f"the model fails on the evaluation data: {_short(e)}") from e
            v.error = f"inference failed: {_short(e)}"
            log.warning("%s: %s", v.name, v.error)
            continue
        v.scores = score(base.outputs, v.outputs)
        if v is not base:
            v.outputs = []  # only fp32's outputs are needed again


def _rows(variants: dict[str, _Variant], results: list[VariantResult]) -> list[dict[str, Any]]:
    """The report's per-variant rows (speedup and drop against fp32), logged as they are made."""
    base_result = find_baseline(results)
    rows = []
    for v, r in zip(variants.values(), results, strict=True):
        s = speedup(r, base_result)
        t = v.times_ns
        row = {
            "name": v.name,
            "median_us": _round(r.median_us),
            "p99_us": _round(float(np.percentile(t, 99)) / 1e3) if t is not None else None,
            "runs": int(t.size) if t is not None else 0,
            "speedup": _round(s, 2),
            "accuracy": _round(r.accuracy, 3),
            "accuracy_drop_pts": _round(accuracy_drop(r, base_result) if r.ok else None, 3),
            "agreement": _round(r.agreement, 3),
            "max_abs_error": _round(v.scores.max_abs_error, 6),
            "size_bytes": v.path.stat().st_size if v.path.is_file() else None,
            "path": str(v.path) if v.path.is_file() else None,
            "built_from": v.built_from,
            "note": v.note,
            "error": v.error,
        }
        rows.append(row)
        if t is not None:
            log.info("%-24s median %9.1f us  p99 %9.1f us  %6d runs  %.2fx fp32", v.name,
                     r.median_us, row["p99_us"], row["runs"], s)
    return rows


def _round(x: float | None, nd: int = 2) -> float | None:
    if x is None or not np.isfinite(x):
        return None
    return round(float(x), nd)


def format_report(r: dict[str, Any]) -> str:
    """The report as a table for people; scripts use --json or the report file."""
    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    basis = ("top-1 accuracy against --labels" if r["accuracy_basis"] == "labels"
             else "top-1 agreement with fp32")
    p = r["preprocess"]
    pre = (f"ok{' (' + p['note'] + ')' if p.get('note') else ''}" if p["ok"]
           else f"FAILED, quantized the original model ({p['error']})")
    lines = [
        f"model        {r['model']}",
        f"profile      {r['profile']}    providers {', '.join(r['providers'])}    onnxruntime {r['onnxruntime']}",
        f"calibration  {r['calibration']['samples']} samples of {r['calibration']['path']}"
        + (" (model preprocessing applied)" if r["calibration"]["preprocessed"] else ""),
        f"evaluation   {r['eval']['samples']} samples of {r['eval']['path']}, {basis}"
        + (" (model preprocessing applied)" if r["eval"]["preprocessed"] else ""),
        f"preprocess   {pre}",
        "",
        f"{'variant':30}{'median us':>11}{'p99 us':>10}{'speedup':>9}{'accuracy':>10}{'drop pts':>10}"
        f"{'agree %':>9}{'max err':>10}{'size KB':>10}",
    ]
    for v in r["variants"]:
        if v["error"]:
            lines.append(f"{v['name']:30}{v['error']}")
            continue
        lines.append(f"{v['name']:30}{num(v['median_us'], '.1f'):>11}{num(v['p99_us'], '.1f'):>10}"
                     f"{num(v['speedup'], '.2f'):>9}{num(v['accuracy'], '.2f'):>10}"
                     f"{num(v['accuracy_drop_pts'], '.2f'):>10}{num(v['agreement'], '.1f'):>9}"
                     f"{num(v['max_abs_error'], '.2g'):>10}{num((v['size_bytes'] or 0) / 1024, '.0f'):>10}")
    lines += ["", f"chosen       {r['chosen']['reason']}", f"             -> {r['chosen']['path']}"]
    return "\n".join(lines)


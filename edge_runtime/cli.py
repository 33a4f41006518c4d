"""`edge-runtime ...`: run models over a source, benchmark them, list device profiles."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger("edge_runtime")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _setup_logging(level: str) -> None:
    # Plain lines with a level on stderr: journald stores them as they are.
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="P",
                   help="device profile name (see `edge-runtime profiles`) or path to a .toml; "
                        "default: detected from this machine")
    p.add_argument("--input-shape", action="append", metavar="NAME=DxDxD", default=[],
                   help="concrete shape for an input with dynamic dims (repeatable)")
    p.add_argument("--dim", action="append", metavar="SYMBOL=N", default=[],
                   help="size of a named dynamic dim such as sequence_length=128 (repeatable)")
    p.add_argument("--log-level", default=os.environ.get("EDGE_RUNTIME_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"], help="default: info")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Edge inference runtime: run ONNX models over camera, file, stdin or synthetic inputs, "
                    "with per-stage latency metrics.",
    )
    parser.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from edge_runtime.sources import SOURCE_HELP

    run = sub.add_parser(
        "run", help="run one or more models over an input source",
        description="Run models over a source and report per-stage latency, throughput and errors. "
                    "Bad inputs are counted by reason and skipped; SIGINT/SIGTERM stop cleanly with a "
                    "final report. Repeat --model (and --source) to host several pipelines.",
    )
    run.add_argument("--model", action="append", required=True, metavar="PATH_OR_BUNDLE",
                     help="an .onnx file or a bundle directory (repeatable; NAME=PATH names the pipeline)")
    run.add_argument("--source", action="append", metavar="SRC",
                     help=f"{SOURCE_HELP}; one for all models or one per --model (default: synthetic)")
    run.add_argument("--report-json", metavar="FILE", help="write the final report here as JSON")
    run.add_argument("--no-sync", action="store_true",
                     help="do not buffer or sync results (no sync is configured in this version: "
                          "results are only counted and reported)")
    run.add_argument("--max-inputs", type=int, metavar="N", help="stop each pipeline after N inputs")
    run.add_argument("--batch", type=int, default=1, metavar="N", help="micro-batch size (default 1)")
    run.add_argument("--max-wait-ms", type=float, default=5.0, metavar="MS",
                     help="longest wait to fill a micro-batch after its first input (default 5)")
    run.add_argument("--loop", action="store_true", help="restart file sources at their end")
    run.add_argument("--no-preprocess", action="store_true",
                     help="ignore the model's preprocessing spec (inputs are already model tensors)")
    run.add_argument("--predictions", metavar="FILE",
                     help="write each prediction as a JSON line to FILE ('-' for stdout)")
    run.add_argument("--status-interval", type=float, default=30.0, metavar="S",
                     help="log a status line every S seconds (0: never; default 30)")
    run.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    _add_common(run)

    bench = sub.add_parser(
        "bench", help="measure the agent loop against bare onnxruntime session.run",
        description="Benchmark a model: bare session.run (baseline) and the full agent loop on the same "
                    "inputs in the same process, in alternating blocks. Reports medians, p99, their "
                    "difference and ratio, throughput and RSS.",
    )
    bench.add_argument("--model", required=True, metavar="PATH_OR_BUNDLE")
    bench.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    bench.add_argument("--seconds", type=float, default=5.0, metavar="S",
                       help="measuring time, split between both sides (default 5)")
    bench.add_argument("--warmup", type=float, default=0.5, metavar="S", help="warm-up seconds (default 0.5)")
    bench.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    _add_common(bench)

    prof = sub.add_parser("profiles", help="list device profiles and the one this machine matches",
                          description="List the device profiles found, mark the one detected for this "
                                      "machine, and show the execution providers onnxruntime has.")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return parser


def _parse_dims(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit() or int(value) <= 0:
            raise EdgeRuntimeError(f"--dim wants SYMBOL=N with N a positive integer, got {item!r}")
        out[name] = int(value)
    return out


def _profile(arg: str | None) -> Any:
    from edge_runtime.profiles import detect_profile, load_profile

    return load_profile(arg) if arg else detect_profile()


def _load(path: str, profile: Any, name: str | None = None) -> tuple[Any, Any]:
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.pipeline import resolve_model

    ref = resolve_model(path)
    engine = OnnxEngine(ref.model_path, profile, name=name or ref.name)
    if ref.preprocess is None:  # metadata is only readable once the session exists
        ref = resolve_model(path, engine.metadata)
    return engine, ref


def cmd_run(args: argparse.Namespace) -> int:
    from edge_runtime.core.inputs import parse_shape_overrides
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.runtime import Agent, write_report
    from edge_runtime.sources import open_source

    sources = args.source or ["synthetic"]
    if len(sources) not in (1, len(args.model)):
        raise EdgeRuntimeError(f"give one --source for all models or one per --model: "
                               f"{len(args.model)} models, {len(sources)} sources")
    if args.max_inputs is not None and args.max_inputs <= 0:
        raise EdgeRuntimeError(f"--max-inputs must be positive, got {args.max_inputs}")
    profile = _profile(args.profile)
    overrides = parse_shape_overrides(args.input_shape)
    dims = _parse_dims(args.dim)
    resize_fn = _resize_fn()
    pred_out = _open_predictions(args.predictions)
    pipelines = []
    names: set[str] = set()
    for i, model_arg in enumerate(args.model):
        name, sep, path = model_arg.partition("=")
        if not sep or not name or "/" in name:
            name, path = None, model_arg
        engine, ref = _load(path, profile, name)
        pname = name or ref.name
        if pname in names:
            pname = f"{pname}-{i}"
        names.add(pname)
        src = open_source(sources[i if len(sources) > 1 else 0], engine.spec, loop=args.loop,
                          overrides=overrides, dims=dims)
        pre = None if args.no_preprocess else ref.preprocess
        if pre is not None:
            log.info("model %s: preprocessing from %s: %s", pname, ref.preprocess_origin, pre.to_dict())
        sink = _prediction_sink(pname, pred_out) if pred_out is not None else None
        pipelines.append(Pipeline(pname, engine, src, preprocess=pre, batch=args.batch,
                                  max_wait_s=args.max_wait_ms / 1000.0, resize_fn=resize_fn, sink=sink))
    extra = {"profile": profile.to_dict(), "sync": "disabled",
             "onnxruntime": _ort_version()}
    agent = Agent(pipelines, max_inputs=args.max_inputs, status_interval_s=args.status_interval,
                  extra_report=extra)
    try:
        report = agent.run()
    finally:
        if pred_out is not None and pred_out is not sys.stdout:
            pred_out.close()
    if args.report_json:
        write_report(report, args.report_json)
    if args.json:
        print(json.dumps(report, indent=2))
    print(format_run_summary(report), file=sys.stderr)
    return EXIT_ERROR if any(p["stopped_by"] == "error" for p in report["pipelines"]) else EXIT_OK


def _ort_version() -> str:
    from edge_runtime.adapters.onnx_engine import ORT_VERSION

    return ORT_VERSION


def _resize_fn() -> Any:
    try:
        from edge_runtime.adapters.cv2_source import resize
    except ImportError:
        from edge_runtime.core.preprocess import resize_nearest

        return resize_nearest
    return resize


def _open_predictions(arg: str | None) -> Any:
    if arg is None:
        return None
    if arg == "-":
        return sys.stdout
    return Path(arg).open("w", encoding="utf-8")


def _prediction_sink(name: str, out: Any) -> Any:
    def sink(records: list[Any], labels: Any, scores: Any, outputs: list[Any]) -> None:
        if labels is not None:
            for i, lab in enumerate(labels.tolist()):
                row = {"pipeline": name, "label": lab}
                if scores is not None:
                    row["score"] = round(float(scores[i]), 6)
                out.write(json.dumps(row) + "\n")
        else:
            out.write(json.dumps({"pipeline": name, "outputs": [o.tolist() if hasattr(o, "tolist") else o
                                                                for o in outputs]}) + "\n")
    return sink


def format_run_summary(report: dict[str, Any]) -> str:
    lines = [f"edge-runtime run: {report['duration_s']:.1f} s, stopped by {report['stopped_by']}, "
             f"cpu {report['cpu_percent']:.0f}%, rss {report['rss_mb']:.0f} MB"]
    for p in report["pipelines"]:
        lines.append(f"  {p['name']} ({', '.join(p['model']['providers'])}) from {p['source']}: "
                     f"{p['predictions']} predictions of {p['inputs']} inputs, "
                     f"{p['throughput_per_s']:.1f}/s, {p['errors']['total']} errors "
                     f"{p['errors']['by_reason'] or ''}".rstrip())
        lines.append(f"    {'stage':12}{'p50':>9}{'p90':>9}{'p99':>9}{'p99.9':>9}{'max':>10}  (us)")
        for stage, s in p["latency_us"].items():
            if s.get("count"):
                lines.append(f"    {stage:12}{s['p50']:>9.1f}{s['p90']:>9.1f}{s['p99']:>9.1f}"
                             f"{s['p99.9']:>9.1f}{s['max']:>10.1f}")
    return "\n".join(lines)


def cmd_bench(args: argparse.Namespace) -> int:
    from edge_runtime.bench import format_table, run_bench, stderr_progress
    from edge_runtime.core.inputs import parse_shape_overrides

    if args.batch < 1 or args.seconds <= 0:
        raise EdgeRuntimeError("--batch must be >= 1 and --seconds > 0")
    profile = _profile(args.profile)
    engine, _ = _load(args.model, profile)
    result = run_bench(engine, batch=args.batch, seconds=args.seconds, warmup_s=args.warmup,
                       overrides=parse_shape_overrides(args.input_shape), dims=_parse_dims(args.dim),
                       progress=stderr_progress if sys.stderr.isatty() else None)
    result["onnxruntime"] = _ort_version()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return EXIT_OK


def cmd_profiles(args: argparse.Namespace) -> int:
    from edge_runtime.adapters.onnx_engine import available_providers
    from edge_runtime.profiles import available_profiles, detect_profile, parse_profile

    detected = detect_profile().name
    rows = []
    for name, path in sorted(available_profiles().items()):
        p = parse_profile(path)
        rows.append({**p.to_dict(), "description": p.description, "detected": name == detected})
    if args.json:
        print(json.dumps({"detected": detected, "available_providers": available_providers(),
                          "profiles": rows}, indent=2))
        return EXIT_OK
    for r in rows:
        mark = "*" if r["detected"] else " "
        print(f"{mark} {r['name']:18} {', '.join(r['providers']):60} {r['path']}")
    providers = ", ".join(available_providers())
    print(f"\n* detected for this machine; onnxruntime providers installed: {providers}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging(args.log_level)
    handlers = {"run": cmd_run, "bench": cmd_bench, "profiles": cmd_profiles}
    try:
        return handlers[args.command](args)
    except EdgeRuntimeError as e:
        log.error("%s", e)  # noqa: TRY400 - a clear message, not a traceback, for expected errors
        return EXIT_ERROR
    except BrokenPipeError:  # `edge-runtime run ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

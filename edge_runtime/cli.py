"""`edge-runtime ...`: run models over a source, benchmark them, list device profiles."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
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
    run.add_argument("--config", metavar="FILE", default=os.environ.get("EDGE_RUNTIME_CONFIG"),
                     help="the agent's configuration file (default: $EDGE_RUNTIME_CONFIG, else "
                          "/etc/edge-runtime/agent.toml when it exists); flags and environment variables win over it")
    run.add_argument("--model", action="append", metavar="PATH_OR_BUNDLE",
                     help="an .onnx file or a bundle directory (repeatable; NAME=PATH names the pipeline); "
                          "or [[model]] in the config file")
    run.add_argument("--source", action="append", metavar="SRC",
                     help=f"{SOURCE_HELP}; one for all models or one per --model (default: synthetic)")
    run.add_argument("--report-json", metavar="FILE", help="write the final report here as JSON")
    run.add_argument("--no-sync", action="store_true",
                     help="keep results local: no outbox, no MQTT, even when --broker is given")
    run.add_argument("--broker", metavar="URL",
                     help="sync predictions and metrics to the cloud through this MQTT broker "
                          "(mqtt://host:1883, mqtts://..., mqtt311://... for 3.1.1-only brokers); "
                          "also $EDGE_RUNTIME_BROKER")
    run.add_argument("--device-id", metavar="ID", help="this device's id (default: $EDGE_RUNTIME_DEVICE_ID, "
                                                       "else the host name)")
    run.add_argument("--buffer", metavar="PATH", default=None,
                     help="the durable outbox (SQLite; default ./edge-runtime-outbox.db, "
                          "$EDGE_RUNTIME_BUFFER)")
    run.add_argument("--broker-username", metavar="USER", help="broker user name (or in the URL)")
    run.add_argument("--broker-password-file", metavar="FILE", help="a file holding the broker password")
    run.add_argument("--broker-ca-file", metavar="FILE", help="CA certificate for mqtts://")
    run.add_argument("--broker-cert-file", metavar="FILE", help="client certificate (mutual TLS)")
    run.add_argument("--broker-key-file", metavar="FILE", help="client key (mutual TLS)")
    run.add_argument("--tag", action="append", default=[], metavar="TAG",
                     help="a label of this device that rollout plans can target (repeatable: --tag site:lab "
                          "--tag hw:pi5; also $EDGE_RUNTIME_TAGS, comma-separated)")
    run.add_argument("--buffer-max-mb", type=float, default=256.0, metavar="MB",
                     help="outbox size bound; the oldest predictions are dropped first (default 256)")
    run.add_argument("--no-drift", action="store_true",
                     help="do not monitor input drift even when the bundle carries a reference profile")
    run.add_argument("--drift-reference", metavar="FILE.json",
                     help="reference profile for a plain .onnx model (bundles carry their own)")
    run.add_argument("--drain-timeout", type=float, default=5.0, metavar="S",
                     help="at exit, keep syncing up to S seconds for the outbox to empty (default 5)")
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
    run.add_argument("--metrics-port", type=int, default=int(os.environ.get("EDGE_RUNTIME_METRICS_PORT") or 0),
                     metavar="PORT", help="serve Prometheus /metrics on 127.0.0.1:PORT (prometheus extra; 0: off)")
    run.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                     help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 exposes it)")
    run.add_argument("--metrics-interval", type=float, default=60.0, metavar="S",
                     help="with --broker: a durable metric snapshot per model every S seconds (default 60)")
    run.add_argument("--telemetry-interval", type=float, default=10.0, metavar="S",
                     help="with --broker: live telemetry (QoS 0, not buffered) every S seconds (0: never; default 10)")
    run.add_argument("--low-confidence", type=float, default=0.5, metavar="T",
                     help="top-1 scores below T count as low-confidence outputs (default 0.5)")
    run.add_argument("--review-samples", default="none", choices=["none", "low-confidence", "drift", "both"],
                     help="with --broker: send low-confidence predictions and/or the inputs right after a drift "
                          "alarm as review samples (default none: the cloud then queues low-confidence predictions "
                          "from the prediction records; capped by --review-per-hour)")
    run.add_argument("--review-inputs", default="none", choices=["none", "raw"],
                     help="what a review sample carries: the prediction only (none, the default: inputs never "
                          "leave the device) or the input array too (raw), downscaled to --review-max-kb")
    run.add_argument("--review-per-hour", type=int, default=20, metavar="N",
                     help="review samples per hour (default 20)")
    run.add_argument("--review-max-kb", type=float, default=64.0, metavar="KB",
                     help="size cap of an input sent for review (default 64)")
    run.add_argument("--state-dir", metavar="DIR", default=os.environ.get("EDGE_RUNTIME_STATE_DIR"),
                     help="with --broker and a public key: where rollouts keep their state and bundles "
                          "(default: $EDGE_RUNTIME_STATE_DIR, else edge-runtime-state beside the outbox)")
    run.add_argument("--no-rollouts", action="store_true", help="ignore rollout orders from the cloud")
    run.add_argument("--latency-budget-ms", type=float, metavar="MS",
                     help="refuse a rolled-out model whose median latency on this device is above MS")
    run.add_argument("--drift-thread", action="store_true",
                     help="run drift monitoring and frame-health checks on their own thread (default: inline "
                          "every 64 inputs, which kept p99 latency lower here; see benchmarks/RESULTS.md)")
    run.add_argument("--drift-summary-interval", type=float, default=60.0, metavar="S",
                     help="send the drift summary (and label-tracker state) every S seconds, and when an alarm "
                          "opens or closes (default 60)")
    run.add_argument("--escalate-share", choices=["none", "features", "downscaled", "raw"], default="none",
                     help="what of an unsure input may leave this device for the cloud model: none (default: "
                          "escalation off), features (the model input, compact), downscaled (images), raw")
    run.add_argument("--escalation-policy", metavar="FILE.json",
                     help="when to escalate and the budget (default: the bundle's, from `escalation tune`)")
    run.add_argument("--escalate-feedback", action="store_true",
                     help="also count the cloud model's answers as label feedback (concept drift); they cover "
                          "only the unsure inputs, so expect a lower accuracy than the reference's")
    run.add_argument("--no-frame-health", action="store_true",
                     help="no covered-lens / frozen-feed / out-of-focus checks on video and camera frames")
    run.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    run.add_argument("--key", action="append", default=[], metavar="PUB",
                     help="public key that bundles must be signed with (repeatable; also "
                          "$EDGE_RUNTIME_PUBLIC_KEYS and /etc/edge-runtime/keys/*.pub)")
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

    keygen = sub.add_parser("keygen", help="create an ed25519 key pair for signing bundles",
                            description="Write PREFIX (private key, mode 0600) and PREFIX.pub (public key "
                                        "for devices). Needs the signing extra.")
    keygen.add_argument("--out", required=True, metavar="PREFIX")
    keygen.add_argument("--force", action="store_true", help="overwrite existing key files")
    keygen.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    bundle = sub.add_parser("bundle", help="create, verify and inspect signed model bundles",
                            description="Signed model bundles: a model, its manifest, reference profile, "
                                        "smoke test and an ed25519 signature.")
    bsub = bundle.add_subparsers(dest="bundle_command", metavar="ACTION")
    bsub.required = True  # `edge-runtime bundle` alone: a usage error naming the actions
    create = bsub.add_parser("create", help="build and sign a bundle",
                             description="Build a bundle from a model and sign its manifest.")
    create.add_argument("--model", required=True, metavar="M", help="an .onnx file (or a bundle directory)")
    create.add_argument("--version", required=True, metavar="V", help="integer or semantic version (1.2.0)")
    create.add_argument("--key", required=True, metavar="PRIV", help="private key from `edge-runtime keygen`")
    create.add_argument("--out", required=True, metavar="DIR", help="bundle directory to create (or .tar)")
    create.add_argument("--name", metavar="N", help="model name (default: the model file's name)")
    create.add_argument("--reference", metavar="X.npy", help="training data: the reference profile for drift")
    create.add_argument("--labels", metavar="Y.npy", help="labels of --reference (accuracy on it)")
    create.add_argument("--test-data", metavar="X.npy", help="held-out data: the accuracy recorded at build")
    create.add_argument("--test-labels", metavar="Y.npy", help="labels of --test-data")
    create.add_argument("--preprocess", metavar="SPEC",
                        help="preprocessing spec as JSON or a path to a JSON file (default: the model's own)")
    create.add_argument("--for-profile", action="append", default=[], metavar="P",
                        help="device profile this bundle is meant for (repeatable; default: any)")
    create.add_argument("--device-tag", action="append", default=[], metavar="TAG",
                        help="device tag this bundle is meant for (repeatable)")
    create.add_argument("--expires", metavar="TIME", help="expiry time, ISO 8601 (2027-01-31T00:00:00Z)")
    create.add_argument("--quantize-report", metavar="FILE",
                        help="quantize_report.json to record (default: the one beside the model, if any)")
    create.add_argument("--escalation", metavar="FILE",
                        help="escalation policy and curve from `edge-runtime escalation tune --policy-out FILE` "
                             "(the manifest's `escalation` entry)")
    create.add_argument("--archive", action="store_true", help="write one .tar instead of a directory")
    create.add_argument("--smoke-samples", type=int, default=8, metavar="N",
                        help="inputs in the smoke test (default 8)")
    create.add_argument("--profile", metavar="P", help="device profile for the build-time runs")
    create.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    verify = bsub.add_parser("verify", help="check a bundle's signature, files, model and smoke test",
                             description="Verify a bundle: signature, every file's size and sha256, no "
                                         "missing or extra file, constraints, onnx's checker, smoke run.")
    verify.add_argument("bundle", metavar="DIR", help="bundle directory or .tar")
    verify.add_argument("--key", action="append", required=True, metavar="PUB",
                        help="public key file (repeatable: any of them may have signed it)")
    verify.add_argument("--profile", metavar="P",
                        help="device profile for the constraints check and the smoke run (default: detected)")
    verify.add_argument("--no-smoke", action="store_true", help="skip the smoke run")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    insp = bsub.add_parser("inspect", help="show a bundle's manifest without verifying it",
                           description="Print what a bundle says about itself (no verification).")
    insp.add_argument("bundle", metavar="DIR", help="bundle directory or .tar")
    insp.add_argument("--json", action="store_true")
    insp.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    from edge_runtime import escalation, quantize

    quantize.add_parser(sub)
    escalation.add_parser(sub)

    prof = sub.add_parser("profiles", help="list device profiles and the one this machine matches",
                          description="List the device profiles found, mark the one detected for this "
                                      "machine, and show the execution providers onnxruntime has.")
    prof.add_argument("--json", action="store_true")
    prof.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    from edge_runtime import demo, doctor

    doctor.add_parser(sub)
    demo.add_parser(sub)
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


def _public_key_paths(explicit: list[str]) -> list[str]:
    paths = list(explicit)
    env = os.environ.get("EDGE_RUNTIME_PUBLIC_KEYS")
    if env:
        paths += [p for p in env.split(os.pathsep) if p]
    keydir = Path(os.environ.get("EDGE_RUNTIME_KEY_DIR", "/etc/edge-runtime/keys"))
    if keydir.is_dir():
        paths += [str(p) for p in sorted(keydir.glob("*.pub"))]
    return paths


def _load(path: str, profile: Any, name: str | None = None, keys: list[str] | None = None) -> tuple[Any, Any]:
    """An engine and its model reference; a bundle is verified first when a public key is configured."""
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.bundle import is_bundle, load_public_keys, open_bundle, verify_bundle
    from edge_runtime.pipeline import resolve_model

    engine = None
    if is_bundle(path):
        key_paths = _public_key_paths(keys or [])
        if key_paths:
            verified = verify_bundle(path, load_public_keys(key_paths), profile=profile)
            log.info("bundle %s %s verified (key %s): %s", verified.manifest.get("name"),
                     verified.manifest.get("version"), verified.key_id,
                     ", ".join(c["check"] for c in verified.checks))
            path, engine = str(verified.directory), verified.engine
        else:
            log.warning("bundle %s is NOT verified: no public key configured (--key, "
                        "$EDGE_RUNTIME_PUBLIC_KEYS or /etc/edge-runtime/keys/*.pub)", path)
            path = str(open_bundle(path))
    ref = resolve_model(path)
    if engine is None:
        engine = OnnxEngine(ref.model_path, profile, name=name or ref.name)
    elif name:
        engine.name = name
    if ref.preprocess is None:  # metadata is only readable once the session exists
        ref = resolve_model(path, engine.metadata)
    return engine, ref


def cmd_run(args: argparse.Namespace) -> int:
    import uuid

    from edge_runtime.core.inputs import parse_shape_overrides
    from edge_runtime.feedback import FeedbackRouter, PredictionBook
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
    uplink = _uplink(args)
    book = PredictionBook(f"{uplink.boot_id[:8] if uplink is not None else uuid.uuid4().hex[:8]}-")
    escalators: dict[str, Any] = {}
    router_box: list[Any] = []  # the feedback router, once the pipelines exist (cloud answers as labels)
    selectors: dict[str, Any] = {}
    deployers_by_name: dict[str, Any] = {}
    pipelines = []
    names: set[str] = set()
    for i, model_arg in enumerate(args.model):
        name, sep, path = model_arg.partition("=")
        if not sep or not name or "/" in name:
            name, path = None, model_arg
        engine, ref = _load(path, profile, name, args.key)
        pname = name or ref.name
        if pname in names:
            pname = f"{pname}-{i}"
        names.add(pname)
        src = open_source(sources[i if len(sources) > 1 else 0], engine.spec, loop=args.loop,
                          overrides=overrides, dims=dims)
        pre = None if args.no_preprocess else ref.preprocess
        if pre is not None:
            log.info("model %s: preprocessing from %s: %s", pname, ref.preprocess_origin, pre.to_dict())
        monitor = None if args.no_drift else _drift_monitor(args.drift_reference or ref.reference, pname)
        concept = None if args.no_drift else _label_tracker(ref.metrics)
        selector = _review_selector(args) if uplink is not None else None
        if selector is not None:
            selectors[pname] = selector
        status = None
        if uplink is not None and not args.no_rollouts:
            def status(label: Any, score: Any, _name: str = pname) -> str:  # the deployer exists once uplink does
                d = deployers_by_name.get(_name)
                return d.output_status(label, score) if d is not None else "final"
        escalator = _escalator(args, pname, ref, uplink, router_box)
        if escalator is not None:
            escalators[pname] = escalator
        sink = _sinks(pname, pred_out, uplink, book if concept is not None or pred_out or uplink else None, selector,
                      status, escalator)
        health = None
        if not args.no_frame_health and getattr(src, "frames", False):
            from edge_runtime.core.image_features import ImageHealth

            health = ImageHealth()
        version = ref.version or ""
        pipelines.append(Pipeline(pname, engine, src, preprocess=pre, batch=args.batch,
                                  max_wait_s=args.max_wait_ms / 1000.0, resize_fn=resize_fn, sink=sink,
                                  drift=monitor, on_drift=_drift_events(pname, uplink, selector), concept=concept,
                                  on_summary=_drift_summaries(pname, uplink),
                                  low_confidence=args.low_confidence, health=health,
                                  on_health=_health_events(pname, uplink), version=version,
                                  drift_thread=args.drift_thread,
                                  summary_interval_s=args.drift_summary_interval))
    extra = {"profile": profile.to_dict(), "sync": "disabled" if uplink is None else "mqtt",
             "onnxruntime": _ort_version()}
    router = FeedbackRouter(book, pipelines)
    router_box.append(router)
    for pl in pipelines:
        esc = escalators.get(pl.name)
        if esc is not None:
            esc.bind(pl)
            pl.extra_state["escalation"] = lambda _e=esc: {k: _e.counts[k] for k in ("sent", "on_time", "expired",
                                                                                     "over_budget", "offline")}
    if escalators:
        from edge_runtime.escalate import answer_route

        uplink.message_routes.append(answer_route(uplink.device_id, escalators))
        uplink.tick_hooks.extend(e.tick for e in escalators.values())
    for pl in pipelines:
        if hasattr(pl.source, "on_feedback"):
            pl.source.on_feedback = router.labels
    agent = Agent(pipelines, max_inputs=args.max_inputs, status_interval_s=args.status_interval,
                  extra_report=extra, feedback=router,
                  on_metrics=_metric_records(uplink), metrics_interval_s=args.metrics_interval,
                  on_telemetry=uplink.telemetry if uplink is not None else None,
                  telemetry_interval_s=args.telemetry_interval)
    deployers = []
    if uplink is not None:
        uplink.models = [(pl.name, pl.version) for pl in pipelines]
        uplink.label_sink = router.label
        deployers = _deployers(args, pipelines, uplink, profile)
        deployers_by_name.update({d.name: d for d in deployers})
        uplink.start()
        for d in deployers:
            d.start()
    prom = None
    if args.metrics_port:
        from edge_runtime.prom import start_metrics_server

        prom = start_metrics_server(agent, args.metrics_port, addr=args.metrics_addr, uplink=uplink,
                                    deployers=deployers_by_name)
        log.info("Prometheus metrics on http://%s:%d/metrics", args.metrics_addr, prom.port)
    try:
        report = agent.run()
    finally:
        if prom is not None:
            prom.shutdown()
        if pred_out is not None and pred_out is not sys.stdout:
            pred_out.close()
        for d in deployers:
            d.stop()
        if uplink is not None:
            Agent._hook("metrics", lambda: _metric_records(uplink)(agent.metric_snapshots()))
            sync_report = uplink.stop(args.drain_timeout)
    if escalators:
        report["escalation"] = {n: e.report() for n, e in escalators.items()}
    if uplink is not None:
        report["uplink"] = sync_report
        report["review_samples"] = {n: {"kept": dict(sel.kept), "over_hourly_cap": sel.capped}
                                    for n, sel in selectors.items()}
    if args.report_json:
        write_report(report, args.report_json)
    if args.json:
        print(json.dumps(report, indent=2))
    print(format_run_summary(report), file=sys.stderr)
    return EXIT_ERROR if any(p["stopped_by"] == "error" for p in report["pipelines"]) else EXIT_OK


def _uplink(args: argparse.Namespace) -> Any:
    broker = args.broker or os.environ.get("EDGE_RUNTIME_BROKER")
    if args.no_sync or not broker:
        return None
    import socket

    from edge_runtime.uplink import Uplink, UplinkConfig

    device_id = args.device_id or os.environ.get("EDGE_RUNTIME_DEVICE_ID") or socket.gethostname()
    path = args.buffer or os.environ.get("EDGE_RUNTIME_BUFFER") or "edge-runtime-outbox.db"
    tags = [*args.tag, *(t.strip() for t in os.environ.get("EDGE_RUNTIME_TAGS", "").split(",") if t.strip())]
    from edge_runtime.core import protocol as p

    try:
        p.Status(p.validate_device_id(device_id), True, "check", 0, "", (), tuple(tags))
    except p.ProtocolError as e:
        raise EdgeRuntimeError(f"--tag: {e}") from e
    options: dict[str, Any] = {}
    if args.broker_username:
        options["username"] = args.broker_username
    if args.broker_password_file:
        try:
            options["password"] = Path(args.broker_password_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise EdgeRuntimeError(f"broker password file {args.broker_password_file}: {e.strerror or e}") from e
    for key in ("ca_file", "cert_file", "key_file"):
        f = getattr(args, f"broker_{key}")
        if f:
            if not Path(f).is_file():
                raise EdgeRuntimeError(f"--broker-{key.replace('_', '-')}: {f} is not a readable file")
            options[key] = f
    return Uplink(UplinkConfig(broker_url=broker, device_id=device_id, buffer_path=path,
                               buffer_max_mb=args.buffer_max_mb, tags=tuple(sorted(set(tags))),
                               broker_options=options))


def _deployers(args: argparse.Namespace, pipelines: list[Any], uplink: Any, profile: Any) -> list[Any]:
    """One rollout deployer per pipeline, fed by the cloud's ``cmd/rollout`` orders. Rollouts need a
    public key: without one, bundles cannot be verified and orders are refused."""
    if args.no_rollouts:
        return []
    key_paths = _public_key_paths(args.key or [])
    if not key_paths:
        log.info("rollouts off: no public key to verify bundles with (--key, $EDGE_RUNTIME_PUBLIC_KEYS or "
                 "/etc/edge-runtime/keys/*.pub)")
        return []
    from edge_runtime.bundle import load_public_keys
    from edge_runtime.deploy import Deployer, mqtt_fetch

    state_dir = Path(args.state_dir) if args.state_dir else Path(uplink.cfg.buffer_path).resolve().parent / \
        "edge-runtime-state"
    keys = load_public_keys(key_paths)
    fetch = mqtt_fetch(uplink)

    def report(kind: str, payload: dict[str, Any]) -> None:
        uplink.record(kind, payload, time.time())

    deployers = {}
    for pl in pipelines:
        d = Deployer(pl, state_dir=state_dir, keys=keys, profile=profile, fetch=fetch, report=report,
                     on_state=uplink.status_changed, latency_budget_ms=args.latency_budget_ms,
                     monitors=None if args.no_drift else _version_monitors(pl.name))
        uplink.command_sinks.append(d.on_command)
        pl.extra_state["rollout"] = d.state
        deployers[pl.name] = d
    uplink.models_fn = lambda: [(pl.name, pl.version, deployers[pl.name].model_state()) for pl in pipelines]
    log.info("rollouts on: state in %s", state_dir)
    return list(deployers.values())


def _drift_monitor(path: Any, name: str) -> Any:
    if path is None:
        return None
    from edge_runtime.core.drift import DriftMonitor, load_reference

    try:
        reference = load_reference(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"reference profile {path}: {e}") from e
    log.info("model %s: drift monitored against %s (%s, %d features)", name, path, reference.kind,
             reference.n_features)
    return DriftMonitor(reference, model=name)


def _version_monitors(name: str) -> Any:
    """For a rollout: the drift monitor and label tracker of an unpacked bundle version (None: keep)."""
    from edge_runtime.bundle import MANIFEST, REFERENCE

    def monitors(bundle_dir: Path) -> dict[str, Any]:
        manifest = json.loads((bundle_dir / MANIFEST).read_text(encoding="utf-8"))
        ref = bundle_dir / REFERENCE
        return {"drift": _drift_monitor(ref if ref.is_file() else None, name),
                "concept": _label_tracker(manifest.get("metrics"))}

    return monitors


def _label_tracker(metrics: dict[str, Any] | None) -> Any:
    """Concept-drift tracking needs the accuracy measured at build: a bundle's manifest has it."""
    m = (metrics or {}).get("test") or (metrics or {}).get("reference")
    if not m or not m.get("accuracy"):
        return None
    from edge_runtime.core.drift import LabelTracker

    return LabelTracker(float(m["accuracy"]), reference_count=int(m.get("n") or 0) or None)


def _drift_summaries(name: str, uplink: Any) -> Any:
    """Drift summaries as `drift` records: the cloud merges them into fleet drift without raw inputs.
    Each names the model version that answered the inputs it summarises (a rollout swaps versions)."""
    if uplink is None:
        return None
    from edge_runtime.core import protocol as p

    def send(summary: Any, since: float, now: float, concept: dict[str, Any] | None, version: str) -> None:
        env = p.DriftSummary(name, version, int(since * 1000), int(now * 1000), summary.to_dict(distances=False),
                             concept)
        uplink.record("drift", env.to_payload(), now)
    return send


def _health_events(name: str, uplink: Any) -> Any:
    """Frame-health events (covered lens, frozen feed, out of focus) as `event` records."""
    if uplink is None:
        return None

    def send(events: list[Any]) -> None:
        now = time.time()
        for ev in events:
            start = ev.action == "start"
            uplink.record("event", {"name": f"frame_{ev.reason}" if start else f"frame_{ev.reason}_cleared",
                                    "severity": "warning" if start else "info", "ref": name,
                                    "message": f"{ev.reason} frames from frame {ev.index}" if start else
                                    f"{ev.reason} ended at frame {ev.index}", "detail": ev.to_dict()}, now)
    return send


def _metric_records(uplink: Any) -> Any:
    if uplink is None:
        return None

    def send(snapshots: list[dict[str, Any]]) -> None:
        now = time.time()
        for snap in snapshots:
            uplink.record("metric", snap, now)
    return send


def _review_selector(args: argparse.Namespace) -> Any:
    if args.review_samples == "none":
        return None
    from edge_runtime.core.samples import REASONS, SamplePolicy, SampleSelector

    when = REASONS if args.review_samples == "both" else (args.review_samples.replace("-", "_"),)
    try:
        policy = SamplePolicy(when=when, inputs=args.review_inputs, per_hour=args.review_per_hour,
                              max_bytes=int(args.review_max_kb * 1024))
    except ValueError as e:
        raise EdgeRuntimeError(f"--review-*: {e}") from e
    return SampleSelector(policy, args.low_confidence)


def _drift_events(name: str, uplink: Any, selector: Any = None) -> Any:
    if uplink is None:
        return None

    def send(alarms: list[Any]) -> None:
        now = time.time()
        if selector is not None and any(a.is_open for a in alarms):
            selector.drift_opened()
        for a in alarms:
            uplink.record("event", {"name": "drift_alarm" if a.is_open else "drift_cleared", "severity":
                                    "warning" if a.is_open else "info", "message": a.reason, "ref": name,
                                    "detail": a.to_dict()}, now)
    return send


def _sinks(name: str, pred_out: Any, uplink: Any, book: Any, selector: Any = None,
           status: Callable[[Any, float | None], str] | None = None, escalator: Any = None) -> Any:
    """The per-batch result sink: ids for the predictions (what label feedback names), then JSON
    lines to a file and/or records to the outbox. None when nothing consumes predictions."""
    if book is None:
        return None

    def sink(records: list[Any], labels: Any, scores: Any, outputs: list[Any]) -> None:
        if labels is None:
            if pred_out is not None:
                pred_out.write(json.dumps({"pipeline": name, "outputs": [
                    o.tolist() if hasattr(o, "tolist") else o for o in outputs]}) + "\n")
            return
        labs = labels.tolist()
        ids = book.assign(name, records, labs)
        sc = scores.tolist() if scores is not None else None
        sts = [status(lab, sc[i] if sc is not None else None) for i, lab in enumerate(labs)] \
            if status is not None else None
        if pred_out is not None:
            for i, lab in enumerate(labs):
                row = {"pipeline": name, "id": ids[i], "label": lab}
                if sc is not None and math.isfinite(sc[i]):
                    row["score"] = round(sc[i], 6)
                if sts is not None:
                    row["status"] = sts[i]
                pred_out.write(json.dumps(row) + "\n")
            pred_out.flush()  # one flush per batch: a reader (tail -f, a labelling tool) sees it now
        if uplink is not None:
            now = time.time()
            for i, lab in enumerate(labs):
                score = sc[i] if sc is not None else None
                uplink.prediction(name, lab, score, now, ids[i], sts[i] if sts is not None else "final")
                if selector is not None:
                    why = selector.reason(score, now)
                    if why is not None:
                        uplink.record("sample", _review_sample(name, ids[i], lab, score, why, records[i], selector),
                                      now)
        if escalator is not None:
            escalator.consider(ids, records, labs, outputs)
    return sink


def _escalator(args: argparse.Namespace, name: str, ref: Any, uplink: Any, router_box: list[Any]) -> Any:
    """The pipeline's escalation to the cloud model, when this device allows inputs to leave it
    (``--escalate-share``) and a policy says when (``--escalation-policy`` or the bundle's)."""
    share = args.escalate_share
    if share == "none":
        if args.escalation_policy or (ref.escalation or {}).get("policy"):
            log.info("model %s: escalation off: share = none (inputs never leave this device; "
                     "--escalate-share features|downscaled|raw allows it)", name)
        return None
    from edge_runtime.core.escalation import EscalationPolicy
    from edge_runtime.escalate import Escalator

    if args.escalation_policy:
        try:
            doc = json.loads(Path(args.escalation_policy).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise EdgeRuntimeError(f"--escalation-policy {args.escalation_policy}: {e}") from e
        raw, origin = doc.get("policy", doc) if isinstance(doc, dict) else doc, args.escalation_policy
    elif (ref.escalation or {}).get("policy"):
        raw, origin = ref.escalation["policy"], f"{ref.name} bundle manifest escalation"
    else:
        raise EdgeRuntimeError(f"model {name}: --escalate-share {share} but no escalation policy: the bundle has "
                               "none (edge-runtime escalation tune writes one); give --escalation-policy FILE")
    policy = EscalationPolicy.from_dict({**raw, "share": share}, origin)
    if not policy.active:
        raise EdgeRuntimeError(f"model {name}: {policy.describe()}")
    if uplink is None:
        raise EdgeRuntimeError(f"model {name}: escalation needs the MQTT link (--broker), which is off")
    from edge_runtime.core import protocol as p

    def publish(msg: p.Escalation) -> bool:
        if not uplink.transport.connected:
            return False
        try:
            return uplink.transport.publish(msg.topic, msg.to_wire(), qos=msg.QOS, retain=msg.RETAIN) is not None
        except Exception as e:  # the link broke under us: the local answer stands
            log.debug("escalation not sent: %s", e)
            return False

    def final(settled: Any) -> None:
        """A cloud answer in time: the final answer, as a prediction record under the same id."""
        uplink.record("prediction", {"i": settled.id, "m": name, "y": settled.cloud, "by": "cloud",
                                     "local": settled.local}, time.time())
        if args.escalate_feedback and router_box:
            router_box[0].label(settled.id, settled.cloud)

    esc = Escalator(name, uplink.device_id, policy, publish, on_final=final)
    log.info("model %s: %s", name, policy.describe())
    return esc


def _review_sample(name: str, pid: str, label: Any, score: float | None, why: str, record: Any,
                   selector: Any) -> dict[str, Any]:
    from edge_runtime.core.samples import encode_input

    out: dict[str, Any] = {"i": pid, "m": name, "y": label, "reason": why}
    if score is not None and math.isfinite(score):
        out["p"] = round(score, 6)
    if selector.policy.inputs == "raw":
        x = next((v for k, v in record.items() if k != "id"), None) if isinstance(record, dict) else record
        enc = encode_input(x, selector.policy.max_bytes) if x is not None else None
        if enc is not None:
            out["input"] = enc
        else:
            out["input_omitted"] = f"over {selector.policy.max_bytes} bytes or not a numeric array"
    return out


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


def cmd_keygen(args: argparse.Namespace) -> int:
    from edge_runtime.bundle import _ed25519

    ed = _ed25519()
    priv, pub = ed.write_keypair(ed.generate(), args.out, force=args.force)
    key = ed.read_public(pub)
    print(f"private key {priv} (mode 0600: keep it off devices)\npublic key  {pub} (key id {key.key_id})")
    return EXIT_OK


def _preprocess_arg(spec: str | None) -> dict[str, Any] | None:
    from edge_runtime.core.preprocess import PreprocessSpec

    if spec is None:
        return None
    text = Path(spec).read_text(encoding="utf-8") if Path(spec).is_file() else spec
    try:
        d = json.loads(text)
    except ValueError as e:
        raise EdgeRuntimeError(f"--preprocess must be JSON or a JSON file: {e}") from e
    return PreprocessSpec.from_dict(d, "--preprocess").to_dict()


def cmd_bundle(args: argparse.Namespace) -> int:
    from edge_runtime import bundle as b

    if args.bundle_command == "create":
        opts = b.CreateOptions(
            name=args.name, reference=args.reference, labels=args.labels, test_data=args.test_data,
            test_labels=args.test_labels, preprocess=_preprocess_arg(args.preprocess),
            profiles=args.for_profile, device_tags=args.device_tag, expires_at=args.expires,
            quantize_report=args.quantize_report, escalation=args.escalation, smoke_samples=args.smoke_samples,
            archive=args.archive)
        out = b.create_bundle(args.model, args.version, args.key, args.out, opts, _profile(args.profile),
                              progress=lambda m: print(m, file=sys.stderr))
        print(f"bundle written: {out}")
        return EXIT_OK
    if args.bundle_command == "verify":
        profile = _profile(args.profile)
        try:
            v = b.verify_bundle(args.bundle, b.load_public_keys(args.key), profile=profile,
                                smoke=not args.no_smoke)
        except b.BundleError as e:
            if args.json:
                print(json.dumps({"ok": False, "bundle": args.bundle, "code": e.code, "error": str(e)}))
            raise
        result = {"ok": True, "bundle": args.bundle, "name": v.manifest.get("name"),
                  "version": v.manifest.get("version"), "key_id": v.key_id, "checks": v.checks}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"OK  {result['name']} {result['version']} signed by {v.key_id}")
            for c in v.checks:
                extra = c.get("detail") or c.get("skipped") or ""
                ms = f"{c['ms']:.1f} ms" if "ms" in c else "skipped"
                print(f"    {c['check']:14}{ms:>12}  {extra}")
        return EXIT_OK
    if args.bundle_command == "inspect":
        info = b.inspect_bundle(args.bundle)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            m = info["manifest"]
            print(f"{m.get('name')} {m.get('version')} (created {m.get('created_at')}, schema {m.get('schema')})")
            print(f"signature: {info['signature'] or 'MISSING'}")
            for rel, meta in sorted(m.get("files", {}).items()):
                print(f"  {rel:32}{meta.get('size', '?'):>12} bytes  sha256 {str(meta.get('sha256'))[:16]}...")
            for key in ("metrics", "quantization", "reference_profile", "constraints", "preprocess", "escalation"):
                if m.get(key):
                    print(f"{key}: {json.dumps(m[key])}")
            if info["unlisted_files"] or info["missing_files"]:
                print(f"unlisted files: {info['unlisted_files']}; missing files: {info['missing_files']}")
        return EXIT_OK
    raise EdgeRuntimeError("bundle needs an action: create, verify or inspect (see --help)")


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


def _apply_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``run``: fill what the command line left at its default from the config file (the file's values
    already carry their environment overrides)."""
    from edge_runtime import agent_config

    path = args.config
    if path is None and Path(agent_config.DEFAULT_PATH).is_file():
        path = agent_config.DEFAULT_PATH
    if path is None:
        values: dict[str, Any] = {}
    else:
        values = agent_config.load(path)
        log.debug("configuration from %s: %s", path, sorted(values))
    defaults = vars(parser.parse_args(["run"]))  # what `run` gives each option when it is not on the command line
    for dest, value in values.items():
        current = getattr(args, dest, None)
        if current == defaults.get(dest) or current in (None, []):
            setattr(args, dest, value)
    if not args.model:
        raise EdgeRuntimeError("no model: give --model PATH, or [[model]] path = ... in the config file"
                               + (f" ({path})" if path else f" (none at {agent_config.DEFAULT_PATH})"))


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_runtime.demo import cmd_demo

    return cmd_demo(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "run":
        try:
            _apply_config(parser, args)
        except EdgeRuntimeError as e:
            _setup_logging("info")
            log.error("%s", e)
            return EXIT_ERROR
    _setup_logging(args.log_level)
    from edge_runtime import doctor
    from edge_runtime.escalation import cmd_escalation
    from edge_runtime.quantize import cmd_quantize

    handlers = {"run": cmd_run, "bench": cmd_bench, "profiles": cmd_profiles, "keygen": cmd_keygen,
                "bundle": cmd_bundle, "quantize": cmd_quantize, "doctor": doctor.cmd_doctor, "demo": _cmd_demo,
                "escalation": cmd_escalation}
    try:
        return handlers[args.command](args)
    except EdgeRuntimeError as e:
        log.error("%s", e)
        return EXIT_ERROR
    except BrokenPipeError:  # `edge-runtime run ... | head`
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""`edge-runtime escalation tune`: choose a bundle's escalation threshold from labelled data.

It runs the bundle's model (and, with ``--cloud-model``, the cloud model) over held-out rows, computes
combined accuracy against escalation rate (:func:`edge_runtime.core.escalation.tuning_curve`), keeps the
most accurate threshold within ``--budget`` and prints the curve. A signed bundle cannot change in place,
so the result goes out in one of two honest ways:

- ``--policy-out FILE``: the escalation document (policy, tuning summary, curve) for
  ``edge-runtime bundle create --escalation FILE``, which signs it into a new bundle;
- ``--key PRIV --version V --out DIR``: a new bundle right away, with the source bundle's files (verified
  first: signature and hashes, against ``--trust`` keys or the signing key's own public key), the
  document as ``escalation.json``, a newer version, signed with PRIV and verified again (smoke run too).

Either way the verified bundle's manifest carries the policy under ``escalation``: ``{"file":
"escalation.json", "schema": "edge-runtime.escalation/1", "policy": {...}, "tuned": {...}}``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import logging
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.core.escalation import (
    ESCALATION_FILE,
    RULES,
    SHARES,
    Curve,
    CurvePoint,
    EscalationPolicy,
    manifest_entry,
    parse_rate,
    tuning_curve,
    tuning_document,
)
from edge_runtime.core.escalation import choose as choose_point
from edge_runtime.errors import EdgeRuntimeError

log = logging.getLogger(__name__)

RUN_CHUNK = 256  # rows per session.run for batchable models


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `escalation` (with its `tune` action) on the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "escalation", help="tune confidence-based escalation to a larger cloud model",
        description="Escalation sends the inputs a bundle's model is unsure about to a larger cloud model, "
                    "within a budget. `tune` picks the threshold from labelled data.")
    p.set_defaults(log_level="warning")
    esub = p.add_subparsers(dest="escalation_command", metavar="ACTION")
    t = esub.add_parser(
        "tune", help="choose the escalation threshold that maximises combined accuracy within a budget",
        description="Run the bundle's model over labelled rows (model input tensors, one per row, already "
                    "preprocessed), compute combined accuracy (the cloud's answer on escalated rows, the "
                    "device's elsewhere) for escalation rates 0-30 %, keep the most accurate threshold "
                    "within --budget, print the curve, and write the policy: --policy-out FILE (for `bundle "
                    "create --escalation FILE`) and/or --key/--version/--out (a new signed bundle).")
    t.add_argument("--bundle", required=True, metavar="DIR", help="the bundle (directory or .tar) whose model runs "
                                                                  "on the device")
    t.add_argument("--data", required=True, metavar="X.npy", help="held-out rows: model input tensors")
    t.add_argument("--labels", required=True, metavar="Y.npy", help="the true class of each row")
    t.add_argument("--budget", required=True, metavar="RATE",
                   help="largest share of inputs to escalate: 5%% or 0.05")
    t.add_argument("--cloud-model", metavar="PATH",
                   help="the cloud model (.onnx or bundle) whose answers on the same rows count for escalated "
                        "rows; without it the curve assumes the cloud answers every escalated input correctly "
                        "(an upper bound)")
    t.add_argument("--cloud-data", metavar="X.npy", help="the rows as the cloud model takes them (default: --data)")
    t.add_argument("--rule", choices=RULES, default="score",
                   help="score: escalate when the top-1 score < t; margin: when top-1 minus top-2 < t "
                        "(default score)")
    t.add_argument("--max-rate", default="30%", metavar="RATE", help="the curve's last rate (default 30%%)")
    t.add_argument("--step", default="0.5%", metavar="RATE", help="the curve's step (default 0.5%%)")
    g = t.add_argument_group("policy (default: the bundle's current escalation policy, else the defaults)")
    g.add_argument("--share", choices=SHARES,
                   help="what an escalated input sends: none (nothing leaves the device: escalation is off), "
                        "features (the model input, float16 or 8-bit), downscaled (images, longest side <= 64 px, "
                        "8-bit) or raw (explicit opt-in); default none")
    g.add_argument("--max-per-minute", type=float, metavar="N", help="escalations per minute (default 30)")
    g.add_argument("--max-bytes-per-hour", type=int, metavar="N", help="encoded input bytes per hour (default 8 MiB)")
    g.add_argument("--max-payload-bytes", type=int, metavar="N", help="cap on one encoded input (default 16384)")
    g.add_argument("--deadline-s", type=float, metavar="S",
                   help="the cloud answer counts if it arrives within S seconds (default 2)")
    g.add_argument("--on-drift", action=argparse.BooleanOptionalAction, default=None,
                   help="also escalate every input while a drift alarm is open")
    o = t.add_argument_group("output")
    o.add_argument("--policy-out", metavar="FILE",
                   help=f"write the escalation document ({ESCALATION_FILE}) for `bundle create --escalation FILE`")
    o.add_argument("--key", metavar="PRIV", help="with --version and --out: sign a new bundle that carries the policy")
    o.add_argument("--version", metavar="V", help="the new bundle's version: newer than the source bundle's")
    o.add_argument("--out", metavar="DIR", help="the new bundle (directory, or a .tar); never overwritten")
    o.add_argument("--trust", action="append", default=[], metavar="PUB",
                   help="public key the source bundle must verify with before it is re-signed (repeatable; "
                        "default: the public half of --key)")
    t.add_argument("--profile", metavar="P", help="device profile for the model runs (default: detected)")
    t.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    t.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def cmd_escalation(args: argparse.Namespace) -> int:
    if getattr(args, "escalation_command", None) != "tune":
        raise EdgeRuntimeError("escalation needs an action: tune (see `edge-runtime escalation --help`)")
    return cmd_tune(args)


# -- model runs ----------------------------------------------------------------------------------------

def _load_rows(path: str, engine: Any, what: str) -> np.ndarray:
    from edge_runtime.core.spec import SampleValidator
    from edge_runtime.errors import InputValidationError

    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"{what} {path}: cannot read: {e}") from e
    if isinstance(x, np.lib.npyio.NpzFile) or len(engine.spec.inputs) != 1:
        raise EdgeRuntimeError(f"{what} {path}: give one .npy array of rows for a single-input model "
                               f"(the model's inputs: {list(engine.spec.input_names)})")
    if x.ndim == 0 or len(x) == 0:
        raise EdgeRuntimeError(f"{what} {path}: expected rows (an array with a first axis), got "
                               f"{x.dtype}{list(x.shape)}")
    name = engine.spec.inputs[0].name
    try:
        if engine.spec.batchable:
            return SampleValidator(engine.spec, batched=True)({name: x})[name]
        validate = SampleValidator(engine.spec)
        return np.stack([validate({name: row})[name] for row in x])
    except InputValidationError as e:
        raise EdgeRuntimeError(f"{what} {path}: the rows do not fit the model: {e}") from e


def _outputs(engine: Any, x: np.ndarray) -> list[np.ndarray]:
    """Each output over all rows: chunks of a batchable model joined, else one run per row stacked."""
    name = engine.spec.inputs[0].name
    if engine.spec.batchable:
        runs = [engine.session.run(None, {name: x[i:i + RUN_CHUNK]}) for i in range(0, len(x), RUN_CHUNK)]
        return [np.concatenate([np.asarray(r[k]) for r in runs]) for k in range(len(runs[0]))]
    runs = [engine.session.run(None, {name: row}) for row in x]
    return [np.stack([np.asarray(r[k]).reshape(-1) for r in runs]) for k in range(len(runs[0]))]


def device_scores(engine: Any, x: np.ndarray) -> np.ndarray:
    """The model's score rows [N, C] (its first 2-D float output, probabilities preferred)."""
    from edge_runtime.pipeline import Postprocessor

    post = Postprocessor(engine.spec)
    if post.scores_index is None:
        raise EdgeRuntimeError(f"model {engine.name}: escalation needs a 2-D float score output (probabilities); "
                               f"its outputs are {[t.describe() for t in engine.spec.outputs]}")
    s = _outputs(engine, x)[post.scores_index]
    return s.reshape(len(x), -1)


def cloud_labels(engine: Any, x: np.ndarray) -> np.ndarray:
    from edge_runtime.pipeline import Postprocessor

    post = Postprocessor(engine.spec)
    labels = post.labels(_outputs(engine, x))
    if labels is None:
        raise EdgeRuntimeError(f"cloud model {engine.name}: needs a class output (2-D scores or 1-D labels); its "
                               f"outputs are {[t.describe() for t in engine.spec.outputs]}")
    return np.asarray(labels).reshape(-1)


def _labels(path: str, n: int) -> np.ndarray:
    try:
        y = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"--labels {path}: cannot read: {e}") from e
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iub" or len(y) != n:
        raise EdgeRuntimeError(f"--labels {path}: expected {n} integer classes (one per row of --data), got "
                               f"{y.dtype}{list(y.shape)}")
    return y


def _engine(path: str | Path, profile: Any, name: str) -> Any:
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.pipeline import resolve_model

    return OnnxEngine(resolve_model(path).model_path, profile, name=name)


# -- the command ---------------------------------------------------------------------------------------

def base_policy(manifest: dict[str, Any], args: argparse.Namespace) -> EscalationPolicy:
    """The bundle's current policy (else the defaults) with the command line's policy options applied."""
    current = (manifest.get("escalation") or {}).get("policy")
    d = dict(current) if isinstance(current, dict) else {}
    for key, value in (("share", args.share), ("max_per_minute", args.max_per_minute),
                       ("max_bytes_per_hour", args.max_bytes_per_hour),
                       ("max_payload_bytes", args.max_payload_bytes), ("deadline_s", args.deadline_s),
                       ("on_drift", args.on_drift)):
        if value is not None:
            d[key] = value
    return EscalationPolicy.from_dict(d, origin="escalation tune options")


def cmd_tune(args: argparse.Namespace) -> int:
    from edge_runtime import bundle as b
    from edge_runtime.cli import _profile

    budget = parse_rate(args.budget, "--budget")
    max_rate, step = max(parse_rate(args.max_rate, "--max-rate"), budget), parse_rate(args.step, "--step")
    if step <= 0 or step > max_rate:
        raise EdgeRuntimeError(f"--step must be > 0 and <= --max-rate, got {args.step} and {args.max_rate}")
    signing = [args.key, args.version, args.out]
    if any(signing) and not all(signing):
        raise EdgeRuntimeError("a new signed bundle needs all of --key, --version and --out")
    profile = _profile(args.profile)
    with tempfile.TemporaryDirectory(prefix="edge-escalation-") as tmp:
        if args.key:  # verify the source before anything is computed from it, let alone re-signed
            src_keys = b.load_public_keys(args.trust) if args.trust else [b._ed25519().read_private(args.key).public]
            verified = b.verify_bundle(args.bundle, src_keys, profile=profile, smoke=False, workdir=Path(tmp) / "src")
            directory, manifest = verified.directory, verified.manifest
        else:
            directory = b.open_bundle(args.bundle, Path(tmp) / "src")
            manifest = json.loads((directory / b.MANIFEST).read_bytes())
        policy = base_policy(manifest, args)
        engine = _engine(directory, profile, str(manifest.get("name") or "device"))
        x = _load_rows(args.data, engine, "--data")
        y = _labels(args.labels, len(x))
        scores = device_scores(engine, x)
        cloud_pred = None
        if args.cloud_model:
            cloud = _engine(args.cloud_model, profile, "cloud")
            cx = _load_rows(args.cloud_data, cloud, "--cloud-data") if args.cloud_data else \
                _load_rows(args.data, cloud, "--data (for the cloud model)")
            if len(cx) != len(x):
                raise EdgeRuntimeError(f"--cloud-data has {len(cx)} rows, --data {len(x)}: they must be the same "
                                       "inputs")
            cloud_pred = cloud_labels(cloud, cx)
        curve = tuning_curve(scores, y, cloud_pred, rule=args.rule, max_rate=max_rate, step=step)
        chosen = choose_point(curve, budget)
        tuned = policy.with_threshold(args.rule if chosen.n_escalated else None, chosen.threshold)
        extra = {"data": Path(args.data).name, "cloud_model": Path(args.cloud_model).name if args.cloud_model else None,
                 "model_sha256": _sha256(directory / b.MODEL), "bundle": {"name": manifest.get("name"),
                                                                           "version": manifest.get("version")},
                 "tuned_at": _now()}
        doc = tuning_document(tuned, curve, chosen, budget, extra)
        wrote: dict[str, str] = {}
        if args.policy_out:
            Path(args.policy_out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
            wrote["policy"] = args.policy_out
        if args.key:
            out = derive_bundle(directory, manifest, doc, args.key, args.version, args.out, profile)
            wrote["bundle"] = str(out)
    result = {"bundle": args.bundle, "budget_rate": budget, "chosen": chosen.to_dict(), "policy": tuned.to_dict(),
              "describe": tuned.describe(), "document": doc, "wrote": wrote}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(curve, chosen, budget, tuned, manifest, args, wrote))
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def derive_bundle(directory: Path, manifest: dict[str, Any], doc: dict[str, Any], key_path: str, version: str,
                  out: str | Path, profile: Any) -> Path:
    """A new bundle: the (already verified) source bundle's files plus ``escalation.json``, its manifest with
    the ``escalation`` entry, the new ``version`` and ``derived_from``, signed with ``key_path``; then the
    new bundle is verified in full (smoke run included) with that key."""
    from edge_runtime import bundle as b

    old = str(manifest.get("version"))
    try:
        newer = b.parse_version(version) > b.parse_version(old)
    except TypeError:
        newer = False
    if not newer:
        raise EdgeRuntimeError(f"--version {version} must be newer than the source bundle's {old}: devices never "
                               "take a version they have already run (anti-rollback)")
    key = b._ed25519().read_private(key_path)
    out = Path(out)
    if out.exists():
        raise EdgeRuntimeError(f"{out} exists; choose a new --out (bundles are never overwritten)")
    work = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        tree = work / "b"
        shutil.copytree(directory, tree, ignore=shutil.ignore_patterns(b.MANIFEST, b.SIGNATURE))
        (tree / ESCALATION_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        m = copy.deepcopy(manifest)
        m.update(version=str(version), created_at=_now(), signed_by=key.public.key_id,
                 escalation=manifest_entry(doc),
                 derived_from={"version": old, "signed_by": manifest.get("signed_by"),
                               "manifest_sha256": _sha256(directory / b.MANIFEST), "change": "escalation policy"})
        m["files"] = {rel: {"sha256": b.sha256_file(tree / rel), "size": (tree / rel).stat().st_size}
                      for rel in b._listed_files(tree)}
        body = b.manifest_bytes(m)
        (tree / b.MANIFEST).write_bytes(body)
        sig = {"alg": "ed25519", "key_id": key.public.key_id, "signature": base64.b64encode(key.sign(body)).decode()}
        (tree / b.SIGNATURE).write_text(json.dumps(sig) + "\n", encoding="utf-8")
        if out.suffix == ".tar":
            b._write_tar(tree, out)
        else:
            tree.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b.verify_bundle(out, [key.public], profile=profile)
    return out


def format_table(curve: Curve, chosen: CurvePoint, budget: float, policy: EscalationPolicy,
                 manifest: dict[str, Any], args: argparse.Namespace, wrote: dict[str, str]) -> str:
    rule = "top-1 score < t" if curve.rule == "score" else "top-1 minus top-2 score < t"
    cloud = (f"{100 * curve.cloud_accuracy:6.2f} %  ({Path(args.cloud_model).name} on the same rows)"
             if curve.cloud_accuracy is not None else
             "100.00 %  ASSUMED: no --cloud-model, so the curve assumes the cloud answers every escalated input "
             "correctly (an upper bound)")
    lines = [f"escalation tune: {manifest.get('name')} {manifest.get('version')}, rule {curve.rule} ({rule}), "
             f"{curve.n} rows of {args.data}",
             f"device only  {100 * curve.device_accuracy:6.2f} %",
             f"cloud only   {cloud}", "",
             f"   {'target %':>9}{'rate %':>9}{'escalated':>11}{'threshold':>11}{'combined %':>12}{'gain pts':>10}"]
    every = max(1, round(0.01 / (curve.points[1].target_rate if len(curve.points) > 1 else 0.01)))
    for i, p in enumerate(curve.points):
        mark = "*" if p is chosen else " "
        if i % every and p is not chosen:
            continue
        threshold = f"{p.threshold:.4f}" if p.n_escalated else "-"  # nothing escalates at this point
        lines.append(f" {mark} {100 * p.target_rate:>9.1f}{100 * p.rate:>9.2f}{p.n_escalated:>11}{threshold:>11}"
                     f"{100 * p.accuracy:>12.2f}{100 * (p.accuracy - curve.device_accuracy):>+10.2f}")
    lines += ["", f"chosen (*): escalation rate {100 * chosen.rate:.2f} % <= budget {100 * budget:.2f} %, "
                  f"combined accuracy {100 * chosen.accuracy:.2f} % "
                  f"({100 * (chosen.accuracy - curve.device_accuracy):+.2f} pts over the device alone)"
              if chosen.n_escalated else
              f"chosen: escalate nothing: no threshold within the budget {100 * budget:.2f} % improves accuracy",
              f"policy: {policy.describe()}"]
    if wrote:
        lines += [f"wrote {what}: {path}" for what, path in wrote.items()]
    else:
        lines.append("nothing written: give --policy-out FILE (then `edge-runtime bundle create ... --escalation "
                     "FILE`) or --key/--version/--out for a new signed bundle")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - `edge-runtime escalation` is the entry point
    from edge_runtime.cli import main

    sys.exit(main(["escalation", *sys.argv[1:]]))

"""Retrain the sample tabular classifier when the cloud asks, and sign the result as the next bundle.

Why: ``cloud-sync serve --retrain-command CMD`` runs ``CMD <request.json>`` when an alert rule marked
``retrain`` fires. This is the command for the sample tabular model (built by build_tabular.py): it
retrains the same recipe on the original training split plus any labelled feedback rows, refuses a
model that scores below --min-accuracy on the original held-out test split, and writes a signed
bundle whose version is the base bundle's plus one (integer versions; semantic versions bump the
patch). The bundle's reference profile is the rows the new model was trained on, and its manifest
carries the test accuracy. Bundles have no field for free-form notes, so the request (id, reason,
alert, data window) is recorded in ``DIR/tabular-<version>.retrain_request.json`` beside the bundle,
outside the signed files, with the manifest's sha256 to tie the two together.

Usage:
  python models/retrain_tabular.py --base BUNDLE --key PRIV --out-dir DIR
      [--feedback-x X.npy --feedback-y Y.npy] [--min-accuracy 0.9] REQUEST.json
  cloud-sync serve --retrain-command "python models/retrain_tabular.py --base BUNDLE --key PRIV --out-dir DIR"

REQUEST.json may be left out when $RETRAIN_REQUEST names it. Progress goes to stderr; the last line
of stdout is one JSON object: {"bundle", "version", "accuracy", "base_version", "request", "rows":
{"train", "feedback"}}.

Exit status: 0 a bundle was written; 1 an unexpected failure; 2 bad input (the request, the base
bundle, the key, the feedback files, or the new version's directory already exists); 3 the request or
the base bundle is for another model; 4 the retrained model is below --min-accuracy (nothing written).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from _common import load_script, logger

MODEL = "tabular"
N_FEATURES = 30
CLASSES = (0, 1)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_WRONG_MODEL, EXIT_TOO_INACCURATE = 0, 1, 2, 3, 4

_log = logger(Path(__file__).stem)


class RetrainError(Exception):
    """A refusal with the exit status that says which kind."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- the request -------------------------------------------------------------------------------------

def _ms(obj: dict[str, Any], key: str, where: str) -> int:
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise RetrainError(f"{where}: '{key}' must be a non-negative integer of milliseconds, "
                           f"got {v!r} ({type(v).__name__})")
    return v


@dataclass(frozen=True)
class RetrainRequest:
    """What cloud_sync.hub sends. Keys the hub may add later are ignored; missing or mistyped ones are not."""

    id: str
    model: str
    reason: str
    since_ms: int
    until_ms: int
    created_ms: int
    alert: dict[str, Any] | None
    metrics: dict[str, Any] | None

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RetrainRequest:
        if not isinstance(d, dict):
            raise RetrainError(f"{where}: expected a JSON object, got {type(d).__name__}")
        for key in ("id", "model", "reason"):
            v = d.get(key)
            if not isinstance(v, str) or (key != "reason" and not v.strip()):
                raise RetrainError(f"{where}: '{key}' must be a {'' if key == 'reason' else 'non-empty '}string, "
                                   f"got {v!r} ({type(v).__name__})")
        window = d.get("data_window")
        if not isinstance(window, dict):
            raise RetrainError(f"{where}: 'data_window' must be an object with since_ms and until_ms, "
                               f"got {window!r} ({type(window).__name__})")
        since, until = _ms(window, "since_ms", f"{where} data_window"), _ms(window, "until_ms", f"{where} data_window")
        if since > until:
            raise RetrainError(f"{where}: data_window since_ms {since} is after until_ms {until}")
        for key in ("alert", "metrics"):
            if d.get(key) is not None and not isinstance(d[key], dict):
                raise RetrainError(f"{where}: '{key}' must be an object or null, got {type(d[key]).__name__}")
        return cls(d["id"], d["model"], d["reason"], since, until, _ms(d, "created_ms", where), d.get("alert"),
                   d.get("metrics"))


def read_request(path: Path) -> RetrainRequest:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RetrainError(f"request {path}: cannot read: {e}") from e
    try:
        d = json.loads(text)
    except ValueError as e:
        raise RetrainError(f"request {path}: not valid JSON: {e}") from e
    req = RetrainRequest.from_dict(d, f"request {path}")
    if req.model not in (MODEL, "*"):
        raise RetrainError(f"request {req.id} is for model {req.model!r}; this script retrains {MODEL!r} "
                           "(or a request for '*')", EXIT_WRONG_MODEL)
    return req


# -- versions ----------------------------------------------------------------------------------------

_SEMVER_CORE = re.compile(r"^(\d+)\.(\d+)\.(\d+)")


def next_version(version: str) -> str:
    """ "7" -> "8"; "1.4.2" -> "1.4.3"; a pre-release or build suffix is dropped ("1.4.0-rc.1" -> "1.4.1")."""
    from edge_runtime.bundle import parse_version
    from edge_runtime.errors import EdgeRuntimeError

    s = str(version).strip()
    try:
        parse_version(s)
    except EdgeRuntimeError as e:
        raise RetrainError(f"base bundle version: {e}") from e
    if s.isdigit():
        return str(int(s) + 1)
    m = _SEMVER_CORE.match(s)
    if m is None:  # parse_version accepted it, so this is unreachable
        raise RetrainError(f"base bundle version {s!r} is not a semantic version")
    major, minor, patch = m.groups()
    return f"{major}.{minor}.{int(patch) + 1}"


# -- inputs ------------------------------------------------------------------------------------------

def read_base(path: Path) -> dict[str, Any]:
    """The base bundle's manifest (directory or .tar); it is read, not verified: the devices verify."""
    from edge_runtime.bundle import inspect_bundle
    from edge_runtime.errors import EdgeRuntimeError

    try:
        manifest = inspect_bundle(path)["manifest"]
    except EdgeRuntimeError as e:
        raise RetrainError(f"--base {path}: {e}") from e
    name, version = manifest.get("name"), manifest.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool):
        raise RetrainError(f"--base {path}: the manifest has no usable version (got {version!r})")
    if name != MODEL:
        raise RetrainError(f"--base {path} is a bundle of model {name!r}; this script retrains {MODEL!r}",
                           EXIT_WRONG_MODEL)
    return manifest


def read_feedback(x_path: Path, y_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labelled rows: X float [N, 30] (finite), y [N] in {0, 1}."""
    arrays = []
    for flag, p in (("--feedback-x", x_path), ("--feedback-y", y_path)):
        try:
            a = np.load(p, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RetrainError(f"{flag} {p}: cannot read a .npy array: {e}") from e
        if not isinstance(a, np.ndarray):
            raise RetrainError(f"{flag} {p}: expected one .npy array, got a {type(a).__name__} archive")
        if a.dtype.kind not in "biuf":
            raise RetrainError(f"{flag} {p}: expected numbers, got dtype {a.dtype}")
        arrays.append(a)
    x, y = arrays
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise RetrainError(f"--feedback-x {x_path}: expected shape [N, {N_FEATURES}] (raw features in "
                           f"sklearn's breast-cancer order), got {list(x.shape)}")
    if not np.isfinite(x).all():
        raise RetrainError(f"--feedback-x {x_path}: {int((~np.isfinite(x)).any(axis=1).sum())} rows hold "
                           "NaN or infinite values")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise RetrainError(f"--feedback-y {y_path}: expected shape [N], got {list(y.shape)}")
    if len(y) != len(x):
        raise RetrainError(f"--feedback-y {y_path} has {len(y)} labels for the {len(x)} rows of --feedback-x")
    bad = ~np.isin(y, CLASSES)
    if bad.any():
        raise RetrainError(f"--feedback-y {y_path}: labels must be 0 or 1, got {sorted(set(y[bad].tolist()))[:5]} "
                           f"({int(bad.sum())} rows)")
    return x.astype(np.float32), y.astype(np.int64)


def check_key(path: Path) -> None:
    """Read the signing key before training, so a wrong path fails in a second, not after the work."""
    from edge_runtime.adapters import ed25519
    from edge_runtime.errors import KeyFileError

    try:
        ed25519.read_private(path)
    except KeyFileError as e:
        raise RetrainError(f"--key: {e}") from e


# -- the recipe --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Recipe:
    """build_tabular's model as it builds it: the unfitted pipeline, its data split, and its export args."""

    pipeline: Any
    split: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, x_test, y_train, y_test
    export_args: dict[str, Any]


def tabular_recipe() -> Recipe:
    """Run build_tabular.build with its export step replaced by a recorder, so the retrained model is the
    same recipe on the same split without restating either here. build() trains the base model in the
    process (milliseconds); its fitted pipeline is cloned unfitted."""
    from sklearn.base import clone

    script = load_script("build_tabular")  # a fresh module object: the replacement stays local to it
    signature = inspect.signature(_common.export_sklearn_classifier)
    seen: dict[str, Any] = {}

    def record(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(signature.bind(*args, **kwargs).arguments)
        return {}

    script.export_sklearn_classifier = record
    with tempfile.TemporaryDirectory(prefix="retrain-recipe-") as tmp:
        script.build(Path(tmp))
    if not seen:
        raise RuntimeError("build_tabular.build no longer calls export_sklearn_classifier; update tabular_recipe")
    x_train, x_test, y_train, y_test = (np.asarray(a) for a in seen.pop("split"))
    pipe = seen.pop("pipe")
    seen.pop("out_dir")
    seen.pop("log")
    return Recipe(clone(pipe), (x_train, x_test, y_train, y_test), seen)


# -- retrain -----------------------------------------------------------------------------------------

def retrain(request: RetrainRequest, base: Path, key: Path, out_dir: Path, feedback: tuple[Path, Path] | None,
            min_accuracy: float) -> dict[str, Any]:
    """Validate everything, retrain, gate on accuracy, bundle; return the summary printed to stdout."""
    from edge_runtime.bundle import MANIFEST, CreateOptions, create_bundle
    from edge_runtime.profiles import load_profile

    manifest = read_base(base)
    base_version = str(manifest["version"])
    version = next_version(base_version)
    bundle_dir = out_dir / f"{MODEL}-{version}"
    if bundle_dir.exists():
        raise RetrainError(f"{bundle_dir} already exists (bundles are never overwritten): retrain from a newer "
                           "--base or choose another --out-dir")
    check_key(key)
    fx, fy = read_feedback(*feedback) if feedback else (np.empty((0, N_FEATURES), np.float32),
                                                         np.empty(0, np.int64))
    _log(f"request {request.id} ({request.model}): {request.reason or 'no reason given'}")
    _log(f"base {base} version {base_version} -> {version}")

    recipe = tabular_recipe()
    x_train, x_test, y_train, y_test = recipe.split
    if x_train.shape[1] != N_FEATURES:
        raise RuntimeError(f"build_tabular's data has {x_train.shape[1]} features, this script expects {N_FEATURES}")
    x_all = np.concatenate([x_train.astype(np.float32), fx])
    y_all = np.concatenate([y_train.astype(np.int64), fy])
    _log(f"retraining on {len(x_train)} training rows + {len(fx)} feedback rows; held-out test {len(x_test)} rows")
    pipe = recipe.pipeline.fit(x_all, y_all)

    with tempfile.TemporaryDirectory(prefix=f"retrain-{MODEL}-") as tmp:
        work = Path(tmp)
        args = recipe.export_args
        summary = _common.export_sklearn_classifier(pipe, args["classifier_type"], args["name"], args["doc"], work,
                                                    (x_all, x_test, y_all, y_test), _log, args.get("extra"),
                                                    args.get("input_name", "input"))
        accuracy = float(summary["onnx_test_accuracy"])
        if accuracy < min_accuracy:
            raise RetrainError(f"the retrained model scores {accuracy:.4f} on the {len(x_test)} held-out test rows, "
                               f"below --min-accuracy {min_accuracy}: no bundle written", EXIT_TOO_INACCURATE)
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refusal leaves nothing behind
        name = args["name"]
        train_y = work / f"{name}.train_y.npy"
        np.save(train_y, y_all)
        opts = CreateOptions(name=MODEL, reference=str(work / f"{name}.train_x.npy"), labels=str(train_y),
                             test_data=str(work / f"{name}.test_x.npy"), test_labels=str(work / f"{name}.test_y.npy"))
        bundle = create_bundle(work / f"{name}.onnx", version, key, bundle_dir, opts, load_profile("generic"),
                               progress=_log)
    new_manifest_bytes = (bundle / MANIFEST).read_bytes()
    bundle_accuracy = float(json.loads(new_manifest_bytes)["metrics"]["test"]["accuracy"])
    rows = {"train": len(x_train), "feedback": len(fx)}
    record = {
        "request": {"id": request.id, "model": request.model, "reason": request.reason,
                    "data_window": {"since_ms": request.since_ms, "until_ms": request.until_ms},
                    "created_ms": request.created_ms, "alert": request.alert, "metrics": request.metrics},
        "bundle": bundle.name, "manifest_sha256": hashlib.sha256(new_manifest_bytes).hexdigest(),
        "version": version, "base": {"path": str(base), "version": base_version}, "accuracy": bundle_accuracy,
        "min_accuracy": min_accuracy, "rows": rows,
        "feedback": {"x": str(feedback[0]), "y": str(feedback[1])} if feedback else None,
        "retrained_ms": int(time.time() * 1000),
    }
    record_path = out_dir / f"{bundle.name}.retrain_request.json"
    tmp_record = record_path.with_name(record_path.name + ".part")
    tmp_record.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp_record.replace(record_path)
    _log(f"bundle {bundle} (test accuracy {bundle_accuracy:.4f}); request recorded in {record_path.name}")
    return {"bundle": str(bundle.resolve()), "version": version, "accuracy": bundle_accuracy,
            "base_version": base_version, "request": request.id, "rows": rows}


# -- command line ------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("request", nargs="?", type=Path,
                    help="the retraining request JSON (default: $RETRAIN_REQUEST); cloud-sync appends it last")
    ap.add_argument("--base", type=Path, required=True, help="the current tabular bundle (directory or .tar)")
    ap.add_argument("--key", type=Path, required=True, help="ed25519 private key file that signs the new bundle")
    ap.add_argument("--out-dir", type=Path, required=True, help="where tabular-<version>/ is written")
    ap.add_argument("--feedback-x", type=Path, help="labelled feedback rows: float [N, 30] .npy")
    ap.add_argument("--feedback-y", type=Path, help="their labels: [N] .npy of 0/1")
    ap.add_argument("--min-accuracy", type=float, default=0.9,
                    help="refuse a model below this held-out test accuracy (default 0.9)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from edge_runtime.errors import EdgeRuntimeError

    ap = _parser()
    args = ap.parse_args(argv)
    if (args.feedback_x is None) != (args.feedback_y is None):
        ap.error("--feedback-x and --feedback-y go together")
    request_path = args.request or (Path(os.environ["RETRAIN_REQUEST"]) if os.environ.get("RETRAIN_REQUEST")
                                    else None)
    if request_path is None:
        ap.error("give the request JSON as the last argument or in $RETRAIN_REQUEST")
    start = time.perf_counter()
    try:
        request = read_request(request_path)
        summary = retrain(request, args.base, args.key, args.out_dir,
                          (args.feedback_x, args.feedback_y) if args.feedback_x else None, args.min_accuracy)
    except RetrainError as e:
        _log(f"error: {e}")
        return e.exit_code
    except EdgeRuntimeError as e:  # from create_bundle: a clear message, but not a refusal of ours
        _log(f"error: {e}")
        return EXIT_FAILED
    _log(f"done in {time.perf_counter() - start:.2f} s")
    print(json.dumps(summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""Model bundles: a model with everything a device needs to trust it and run it.

A bundle is a directory (or a ``.tar`` of one) holding ``model.onnx``, ``manifest.json`` (name,
version, sha256 and size of every file, input/output spec, preprocessing, accuracy at build,
quantization, the reference profile's summary, smoke-test files, constraints), the reference profile,
smoke-test inputs with their expected outputs, and ``manifest.sig``: an ed25519 signature over the
exact bytes of ``manifest.json``. Verification checks the signature first, so nothing else in an
unsigned or tampered bundle is trusted; then every file's size and hash, that no file is missing or
extra, onnx's checker, and a smoke run whose outputs must match the expected ones.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from edge_runtime.errors import BundleError, EdgeRuntimeError, MissingExtraError

log = logging.getLogger(__name__)

SCHEMA = "edge-runtime.bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MODEL = "model.onnx"
REFERENCE = "reference_profile.json"
SMOKE_INPUTS = "samples/inputs.npz"
SMOKE_EXPECTED = "samples/expected.npz"

# Archive limits: a bundle is a model, not a disk image.
MAX_MEMBER_BYTES = 2 * 1024**3
MAX_TOTAL_BYTES = 4 * 1024**3
MAX_MEMBERS = 1000

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")


# -- versions ------------------------------------------------------------------------------------

def parse_version(v: str | int) -> tuple[Any, ...]:
    """A comparable key for an integer version ("7") or a semantic version ("1.4.0-rc.1").

    Integers and semantic versions are not mixed within one model's history; a pre-release sorts
    before its release, as semver says."""
    s = str(v).strip()
    if s.isdigit():
        return (int(s),)
    m = _SEMVER.match(s)
    if not m:
        raise EdgeRuntimeError(f"version must be an integer or semantic version like 1.2.3, got {v!r}")
    major, minor, patch, pre = m.groups()
    pre_key: tuple[Any, ...] = (1,) if pre is None else (0, *((0, int(p)) if p.isdigit() else (1, p)
                                                             for p in pre.split(".")))
    return (int(major), int(minor), int(patch), pre_key)


# -- files -----------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _listed_files(root: Path) -> list[str]:
    """Every file under ``root`` except the manifest and its signature, as POSIX relative paths."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out.append(p.relative_to(root).as_posix())  # reported, and refused, as an extra file
        elif p.is_file():
            rel = p.relative_to(root).as_posix()
            if rel not in (MANIFEST, SIGNATURE):
                out.append(rel)
    return out


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


# -- reference profile -----------------------------------------------------------------------------

def reference_profile(x: np.ndarray, input_name: str, top1: np.ndarray | None = None) -> dict[str, Any]:
    """Training-data statistics the drift detectors compare live inputs against, with thresholds
    calibrated to a false-alarm rate (see :mod:`edge_runtime.core.drift`): per feature the count of
    finite values, mean, variance, min, max, NaN rate, quantiles and a histogram on the training
    deciles, and the model's class frequencies on that data."""
    from edge_runtime.core.drift import build_reference

    return build_reference(np.asarray(x), top1, input_name=input_name)


# -- keys --------------------------------------------------------------------------------------------

def _ed25519() -> Any:
    try:
        from edge_runtime.adapters import ed25519
    except ImportError as e:
        raise MissingExtraError("signing and verifying bundles", "signing", "PyNaCl") from e
    return ed25519


def load_public_keys(paths: Iterable[str | Path]) -> list[Any]:
    ed = _ed25519()
    return [ed.read_public(p) for p in paths]


# -- create ----------------------------------------------------------------------------------------

@dataclass
class CreateOptions:
    name: str | None = None
    reference: str | None = None
    labels: str | None = None
    test_data: str | None = None
    test_labels: str | None = None
    preprocess: dict[str, Any] | None = None
    profiles: list[str] = field(default_factory=list)
    device_tags: list[str] = field(default_factory=list)
    expires_at: str | None = None
    quantize_report: str | None = None
    escalation: str | None = None  # escalation.json from `edge-runtime escalation tune --policy-out`
    smoke_samples: int = 8
    smoke_rtol: float = 1e-3
    smoke_atol: float = 1e-4
    archive: bool = False


def _run_model(engine: Any, x: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Outputs of ``engine`` over rows of ``x`` (single-input models), in batches."""
    name = engine.spec.inputs[0].name
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(x), batch if engine.spec.batchable else 1):
        chunk = x[i:i + batch] if engine.spec.batchable else x[i]
        outs.append(engine.session.run(None, {name: chunk}))
    return [np.concatenate([o[k] for o in outs]) if engine.spec.batchable else np.stack([o[k] for o in outs])
            for k in range(len(outs[0]))]


def _top1(engine: Any, outputs: list[np.ndarray]) -> np.ndarray | None:
    from edge_runtime.pipeline import Postprocessor

    labels = Postprocessor(engine.spec).labels(outputs)
    return None if labels is None else np.asarray(labels).reshape(-1)


def _load_rows(path: str, engine: Any, what: str) -> np.ndarray:
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"{what} {path}: cannot read: {e}") from e
    if isinstance(x, np.lib.npyio.NpzFile):
        raise EdgeRuntimeError(f"{what} {path}: give one .npy array of rows (multi-input models: not yet)")
    t = engine.spec.inputs[0]
    if t.dtype is not None and x.dtype != t.dtype:
        x = x.astype(t.dtype)
    return x


def create_bundle(model: str | Path, version: str, key_path: str | Path, out: str | Path,
                  opts: CreateOptions, profile: Any, progress: Callable[[str], None] = log.info) -> Path:
    """Build, sign and write a bundle; returns the directory (or the .tar with ``opts.archive``)."""
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.core.inputs import make_feeds
    from edge_runtime.pipeline import resolve_model

    parse_version(version)
    key = _ed25519().read_private(key_path)
    src = resolve_model(model)
    engine = OnnxEngine(src.model_path, profile, name=opts.name or src.name)
    if src.preprocess is None:
        src = resolve_model(model, engine.metadata)
    out = Path(out)
    workdir = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent if out.parent.exists() else None))
    try:
        (workdir / "samples").mkdir()
        shutil.copyfile(src.model_path, workdir / MODEL)
        manifest: dict[str, Any] = {
            "schema": SCHEMA, "name": opts.name or src.name, "version": str(version),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "model": {"file": MODEL, **engine.spec.to_dict(), **_model_info(src.model_path)},
            "preprocess": opts.preprocess if opts.preprocess is not None
            else (src.preprocess.to_dict() if src.preprocess else None),
            "metrics": {}, "quantization": _quantization(src.model_path, opts.quantize_report),
            "reference_profile": None, "constraints": {}, "signed_by": key.public.key_id,
        }
        ref_x = None
        if opts.reference:
            progress(f"reference profile from {opts.reference}")
            ref_x = _load_rows(opts.reference, engine, "--reference")
            top1 = _top1(engine, _run_model(engine, ref_x))
            ref = reference_profile(ref_x, engine.spec.inputs[0].name, top1)
            (workdir / REFERENCE).write_text(json.dumps(ref, indent=1) + "\n", encoding="utf-8")
            manifest["reference_profile"] = {"file": REFERENCE, "schema": ref["schema"],
                                             "kind": ref["kind"], "n_samples": ref["n_samples"],
                                             "n_features": len(ref["features"])}
            if opts.labels:
                manifest["metrics"]["reference"] = _accuracy(engine, ref_x, opts.labels)
        if opts.test_data:
            if not opts.test_labels:
                raise EdgeRuntimeError("--test-data needs --test-labels")
            progress(f"accuracy on {opts.test_data}")
            manifest["metrics"]["test"] = _accuracy(engine, _load_rows(opts.test_data, engine, "--test-data"),
                                                    opts.test_labels)
        # Smoke test: a few inputs and the outputs this model gives for them here and now.
        if ref_x is not None and engine.spec.batchable and len(engine.spec.inputs) == 1:
            feeds = {engine.spec.inputs[0].name: ref_x[: opts.smoke_samples]}
        else:
            feeds = make_feeds(engine.spec, batch=min(opts.smoke_samples, 4) if engine.spec.batchable else 1,
                               seed=7)
        outputs = engine.session.run(None, feeds)
        expected = {t.name: o for t, o in zip(engine.spec.outputs, outputs, strict=True)
                    if isinstance(o, np.ndarray) and o.dtype != object}
        np.savez(workdir / SMOKE_INPUTS, **feeds)
        np.savez(workdir / SMOKE_EXPECTED, **expected)
        manifest["smoke"] = {"inputs": SMOKE_INPUTS, "expected": SMOKE_EXPECTED, "rtol": opts.smoke_rtol,
                             "atol": opts.smoke_atol, "outputs": sorted(expected)}
        constraints: dict[str, Any] = {}
        if opts.profiles:
            constraints["profiles"] = list(opts.profiles)
        if opts.device_tags:
            constraints["device_tags"] = list(opts.device_tags)
        if opts.expires_at:
            constraints["expires_at"] = _parse_time(opts.expires_at).isoformat().replace("+00:00", "Z")
        manifest["constraints"] = constraints
        if opts.escalation:
            manifest["escalation"] = _escalation(opts.escalation, workdir)
        manifest["files"] = {rel: {"sha256": sha256_file(workdir / rel), "size": (workdir / rel).stat().st_size}
                             for rel in _listed_files(workdir)}
        body = manifest_bytes(manifest)
        (workdir / MANIFEST).write_bytes(body)
        sig = {"alg": "ed25519", "key_id": key.public.key_id,
               "signature": base64.b64encode(key.sign(body)).decode()}
        (workdir / SIGNATURE).write_text(json.dumps(sig) + "\n", encoding="utf-8")
        progress(f"signed with key {key.public.key_id}: {len(manifest['files'])} files")
        if opts.archive:
            _write_tar(workdir, out)
        else:
            if out.exists():
                raise EdgeRuntimeError(f"{out} exists; choose a new --out (bundles are never overwritten)")
            workdir.rename(out)
        return out
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _model_info(path: Path) -> dict[str, Any]:
    try:
        from edge_runtime.adapters.onnx_tools import model_info
    except ImportError:
        return {}
    return model_info(path)


def _quantization(model_path: Path, report: str | None) -> dict[str, Any] | None:
    """What `edge-runtime quantize` chose, when its report is given or lies beside the model."""
    p = Path(report) if report else model_path.with_name("quantize_report.json")
    if not p.is_file():
        return None
    try:
        r = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise EdgeRuntimeError(f"{p}: not valid JSON: {e}") from e
    chosen = r.get("chosen") or {}
    variant = next((v for v in r.get("variants", []) if v.get("name") == chosen.get("name")), {})
    return {"variant": chosen.get("name"), "speedup": chosen.get("speedup"), "reason": chosen.get("reason"),
            "accuracy": variant.get("accuracy"), "agreement": variant.get("agreement"),
            "measured_on": (r.get("machine") or {}).get("cpu")}


def _escalation(path: str, workdir: Path) -> dict[str, Any]:
    """Carry the escalation document as escalation.json; the manifest's ``escalation`` entry holds its
    policy, which the agent reads from the verified manifest."""
    from edge_runtime.core.escalation import ESCALATION_FILE, manifest_entry

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgeRuntimeError(f"--escalation {path}: cannot read: {e}") from e
    entry = manifest_entry(doc, origin=path)
    (workdir / ESCALATION_FILE).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return entry


def _accuracy(engine: Any, x: np.ndarray, labels_path: str) -> dict[str, Any]:
    y = np.load(labels_path, allow_pickle=False).reshape(-1)
    if len(y) != len(x):
        raise EdgeRuntimeError(f"{labels_path} has {len(y)} labels for {len(x)} rows")
    top1 = _top1(engine, _run_model(engine, x))
    if top1 is None:
        raise EdgeRuntimeError("accuracy needs a classifier (a 2-D score output or a 1-D label output)")
    return {"accuracy": round(float((top1 == y).mean()), 6), "n": len(y)}


def _parse_time(s: str) -> datetime:
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as e:
        raise EdgeRuntimeError(f"time must be ISO 8601 like 2027-01-31T00:00:00Z, got {s!r}") from e
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _write_tar(src_dir: Path, out: Path) -> None:
    """A deterministic tar: sorted members, fixed owner and mtime, regular files only."""
    if out.exists():
        raise EdgeRuntimeError(f"{out} exists; choose a new --out (bundles are never overwritten)")
    tmp = out.with_name(out.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(src_dir.rglob("*")):
            if not p.is_file():
                continue
            info = tar.gettarinfo(str(p), arcname=p.relative_to(src_dir).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with p.open("rb") as f:
                tar.addfile(info, f)
    tmp.replace(out)


# -- open and verify -------------------------------------------------------------------------------

def safe_extract(archive: Path, dest: Path, max_member: int = MAX_MEMBER_BYTES,
                 max_total: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS) -> None:
    """Extract a bundle archive, refusing links, devices, absolute or parent paths and oversize
    members before anything is written."""
    name = str(archive)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            if len(members) > max_members:
                raise BundleError("unsafe_archive", f"{len(members)} members, at most {max_members}", bundle=name)
            total = 0
            for m in members:
                p = PurePosixPath(m.name)
                if m.issym() or m.islnk():
                    raise BundleError("unsafe_archive", f"member {m.name!r} is a link", bundle=name)
                if not (m.isfile() or m.isdir()):
                    raise BundleError("unsafe_archive", f"member {m.name!r} is not a regular file", bundle=name)
                if p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\")):
                    raise BundleError("unsafe_archive", f"member {m.name!r} points outside the bundle",
                                      bundle=name)
                if m.size > max_member:
                    raise BundleError("unsafe_archive", f"member {m.name!r} is {m.size} bytes, at most "
                                      f"{max_member}", bundle=name)
                total += m.size
                if total > max_total:
                    raise BundleError("unsafe_archive", f"members add up to over {max_total} bytes", bundle=name)
            dest.mkdir(parents=True, exist_ok=True)
            for m in members:
                target = dest / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                f = tar.extractfile(m)
                if f is None:
                    raise BundleError("unsafe_archive", f"member {m.name!r} has no data", bundle=name)
                with f, target.open("wb") as w:
                    shutil.copyfileobj(f, w)
    except (tarfile.ReadError, EOFError, tarfile.CompressionError) as e:
        raise BundleError("truncated_archive", f"not a complete tar archive: {e}", bundle=name) from e


def open_bundle(path: str | Path, workdir: Path | None = None) -> Path:
    """The bundle's directory: ``path`` itself, or an archive extracted into ``workdir`` (a new
    temporary directory when not given; the caller owns it)."""
    p = Path(path)
    if p.is_dir():
        if not (p / MANIFEST).is_file():
            raise BundleError("not_a_bundle", f"no {MANIFEST} in {p}", bundle=str(p))
        return p
    if not p.is_file():
        raise BundleError("not_a_bundle", "no such file or directory", bundle=str(p))
    dest = workdir or Path(tempfile.mkdtemp(prefix="edge-bundle-"))
    safe_extract(p, dest)
    if not (dest / MANIFEST).is_file():
        raise BundleError("not_a_bundle", f"the archive holds no {MANIFEST}", bundle=str(p))
    return dest


def is_bundle(path: str | Path) -> bool:
    p = Path(path)
    return (p.is_dir() and (p / MANIFEST).is_file()) or (p.is_file() and p.suffix == ".tar")


@dataclass
class Verified:
    """A bundle that passed every check; ``engine`` is the session the smoke run used."""

    directory: Path
    manifest: dict[str, Any]
    key_id: str
    checks: list[dict[str, Any]]
    engine: Any = None


def verify_bundle(path: str | Path, keys: list[Any], *, profile: Any = None, now: datetime | None = None,
                  smoke: bool = True, workdir: Path | None = None) -> Verified:
    """Check a bundle; raise :class:`BundleError` with the first failure's code and a clear message."""
    directory = open_bundle(path, workdir)
    name = str(path)
    checks: list[dict[str, Any]] = []

    def check(what: str, t0: float, detail: str = "") -> None:
        checks.append({"check": what, "ok": True, "ms": round((time.perf_counter() - t0) * 1000, 2),
                       **({"detail": detail} if detail else {})})

    t0 = time.perf_counter()
    body = (directory / MANIFEST).read_bytes()
    sig_path = directory / SIGNATURE
    if not sig_path.is_file():
        raise BundleError("missing_signature", f"{SIGNATURE} is missing: the bundle is not signed", bundle=name)
    try:
        sig = json.loads(sig_path.read_text(encoding="utf-8"))
        signature = base64.b64decode(sig["signature"], validate=True)
        signer = str(sig["key_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise BundleError("bad_signature", f"{SIGNATURE} is not a valid signature file: {e}", bundle=name) from e
    if not keys:
        raise BundleError("unknown_key", "no public key is configured to verify it with", bundle=name)
    matching = [k for k in keys if k.key_id == signer]
    if not matching:
        known = ", ".join(k.key_id for k in keys)
        raise BundleError("unknown_key", f"signed by key {signer}, which is not one of the configured keys "
                          f"({known})", bundle=name)
    if not matching[0].verify(body, signature):
        raise BundleError("bad_signature", f"the signature of {MANIFEST} does not verify with key {signer}: "
                          "the manifest was changed after signing, or the signature is forged", bundle=name)
    check("signature", t0, f"key {signer}")

    t0 = time.perf_counter()
    try:
        manifest = json.loads(body)
        files = manifest["files"]
        if manifest.get("schema") != SCHEMA:
            raise BundleError("bad_manifest", f"schema {manifest.get('schema')!r}, expected {SCHEMA!r}",
                              bundle=name)
        parse_version(manifest["version"])
        if manifest.get("escalation") is not None:  # the agent acts on this policy: refuse an invalid one
            from edge_runtime.core.escalation import read_document

            read_document(manifest["escalation"], origin=f"{MANIFEST} escalation")
    except (ValueError, KeyError, TypeError, EdgeRuntimeError) as e:
        if isinstance(e, BundleError):
            raise
        raise BundleError("bad_manifest", f"{MANIFEST}: {e}", bundle=name) from e
    present = set(_listed_files(directory))
    for rel in sorted(set(files) - present):
        raise BundleError("missing_file", f"{rel} is listed in the manifest but missing", bundle=name)
    for rel in sorted(present - set(files)):
        raise BundleError("extra_file", f"{rel} is not listed in the manifest", bundle=name)
    for rel, meta in sorted(files.items()):
        p = directory / rel
        size = p.stat().st_size
        if size != meta["size"]:
            raise BundleError("size_mismatch", f"{rel} is {size} bytes, the manifest says {meta['size']}",
                              bundle=name)
        digest = sha256_file(p)
        if digest != meta["sha256"]:
            raise BundleError("hash_mismatch", f"{rel} has sha256 {digest[:16]}..., the manifest says "
                              f"{meta['sha256'][:16]}...", bundle=name)
    check("files", t0, f"{len(files)} files, sizes and sha256")

    t0 = time.perf_counter()
    constraints = manifest.get("constraints") or {}
    if constraints.get("expires_at"):
        expires = _parse_time(constraints["expires_at"])
        if (now or datetime.now(UTC)) >= expires:
            raise BundleError("expired", f"expired at {constraints['expires_at']}", bundle=name)
    if constraints.get("profiles") and profile is not None and profile.name not in constraints["profiles"]:
        raise BundleError("wrong_profile", f"made for profiles {constraints['profiles']}, this device runs "
                          f"{profile.name}", bundle=name)
    check("constraints", t0)

    t0 = time.perf_counter()
    try:
        from edge_runtime.adapters.onnx_tools import check_model
    except ImportError:
        checks.append({"check": "onnx_checker", "ok": True, "skipped": "onnx is not installed (models extra); "
                       "onnxruntime's own load check still runs"})
    else:
        problem = check_model(directory / MODEL)
        if problem:
            raise BundleError("onnx_checker", f"onnx's checker rejects {MODEL}: {problem}", bundle=name)
        check("onnx_checker", t0)

    engine = None
    if smoke:
        engine = _smoke(directory, manifest, profile, name, checks)
    return Verified(directory, manifest, signer, checks, engine)


def _smoke(directory: Path, manifest: dict[str, Any], profile: Any, name: str,
           checks: list[dict[str, Any]]) -> Any:
    from edge_runtime.adapters.onnx_engine import OnnxEngine
    from edge_runtime.errors import ModelLoadError
    from edge_runtime.profiles import load_profile

    t0 = time.perf_counter()
    try:
        engine = OnnxEngine(directory / MODEL, profile or load_profile("generic"), name=manifest.get("name"))
    except ModelLoadError as e:
        raise BundleError("model_load", str(e), bundle=name) from e
    smoke = manifest.get("smoke") or {}
    if not smoke:
        checks.append({"check": "smoke", "ok": True, "skipped": "the bundle has no smoke test"})
        return engine
    with np.load(directory / smoke["inputs"], allow_pickle=False) as f:
        feeds = {k: f[k] for k in f.files}
    with np.load(directory / smoke["expected"], allow_pickle=False) as f:
        expected = {k: f[k] for k in f.files}
    try:
        outputs = engine.session.run(None, feeds)
    except Exception as e:
        raise BundleError("smoke_mismatch", f"the smoke run failed: {str(e).splitlines()[0]}", bundle=name) from e
    got = {t.name: o for t, o in zip(engine.spec.outputs, outputs, strict=True)}
    rtol, atol = float(smoke.get("rtol", 1e-3)), float(smoke.get("atol", 1e-4))
    for out_name, want in expected.items():
        have = np.asarray(got.get(out_name))
        if have.shape != want.shape:
            raise BundleError("smoke_mismatch", f"output {out_name!r} has shape {list(have.shape)}, expected "
                              f"{list(want.shape)}", bundle=name)
        if want.dtype.kind in "fc":
            if not np.allclose(have, want, rtol=rtol, atol=atol, equal_nan=True):
                worst = float(np.nanmax(np.abs(have.astype(np.float64) - want)))
                raise BundleError("smoke_mismatch", f"output {out_name!r} differs from the expected values by up "
                                  f"to {worst:.3g} (rtol {rtol}, atol {atol})", bundle=name)
        elif not np.array_equal(have, want):
            n = int((have != want).sum())
            raise BundleError("smoke_mismatch", f"output {out_name!r}: {n} of {want.size} values differ from "
                              "the expected ones", bundle=name)
    checks.append({"check": "smoke", "ok": True, "ms": round((time.perf_counter() - t0) * 1000, 2),
                   "detail": f"{len(expected)} outputs match on {len(next(iter(feeds.values())))} inputs, "
                             f"providers {engine.providers}"})
    return engine


def inspect_bundle(path: str | Path) -> dict[str, Any]:
    """What a bundle says about itself, without verifying anything (``bundle verify`` does that)."""
    with tempfile.TemporaryDirectory(prefix="edge-bundle-") as tmp:
        directory = open_bundle(path, Path(tmp) / "b")
        try:
            manifest = json.loads((directory / MANIFEST).read_bytes())
        except ValueError as e:
            raise BundleError("bad_manifest", f"{MANIFEST} is not valid JSON: {e}", bundle=str(path)) from e
        sig_path = directory / SIGNATURE
        sig = None
        if sig_path.is_file():
            try:
                sig = {k: v for k, v in json.loads(sig_path.read_text()).items() if k != "signature"}
            except ValueError:
                sig = {"error": "unreadable"}
        listed = set(manifest.get("files", {}))
        present = set(_listed_files(directory))
        return {"path": str(path), "manifest": manifest, "signature": sig,
                "files_present": sorted(present), "unlisted_files": sorted(present - listed),
                "missing_files": sorted(listed - present)}

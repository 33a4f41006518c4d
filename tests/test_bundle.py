"""Signed bundles: every way a bundle can be wrong is refused with its own code and a clear message."""

from __future__ import annotations

import base64
import io
import json
import shutil
import stat
import subprocess
import sys
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_runtime.adapters import ed25519
from edge_runtime.bundle import (
    MANIFEST,
    SIGNATURE,
    CreateOptions,
    create_bundle,
    inspect_bundle,
    manifest_bytes,
    parse_version,
    reference_profile,
    safe_extract,
    sha256_file,
    verify_bundle,
)
from edge_runtime.errors import BundleError, EdgeRuntimeError, KeyFileError
from edge_runtime.profiles import load_profile
from tests.conftest import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    ed25519.write_keypair(ed25519.generate(), d / "release")
    ed25519.write_keypair(ed25519.generate(), d / "other")
    return {"priv": d / "release", "pub": d / "release.pub", "other_priv": d / "other", "other_pub": d / "other.pub"}


@pytest.fixture(scope="module")
def good(models_dir: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, profile) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "digits-1"
    opts = CreateOptions(reference=str(models_dir / "digits_mlp.test_x.npy"),
                         labels=str(models_dir / "digits_mlp.test_y.npy"))
    return create_bundle(models_dir / "digits_mlp.onnx", "1.0.0", keys["priv"], out, opts, profile)


@pytest.fixture
def copy(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "b"
    shutil.copytree(good, dst)
    return dst


def pub(keys: dict[str, Path], which: str = "pub") -> list[ed25519.PublicKey]:
    return [ed25519.read_public(keys[which])]


def refused(path: Path, keys: list, code: str, **kw: object) -> BundleError:
    with pytest.raises(BundleError) as ei:
        verify_bundle(path, keys, **kw)
    assert ei.value.code == code, str(ei.value)
    return ei.value


def resign(directory: Path, key_path: Path) -> None:
    """Recompute the manifest's file table and sign it again: a bundle forged by a key holder."""
    manifest = json.loads((directory / MANIFEST).read_bytes())
    for rel in manifest["files"]:
        p = directory / rel
        manifest["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    body = manifest_bytes(manifest)
    (directory / MANIFEST).write_bytes(body)
    key = ed25519.read_private(key_path)
    (directory / SIGNATURE).write_text(json.dumps({"alg": "ed25519", "key_id": key.public.key_id,
                                                   "signature": base64.b64encode(key.sign(body)).decode()}))


def test_a_good_bundle_verifies_and_says_what_it_checked(good: Path, keys: dict[str, Path], profile) -> None:
    v = verify_bundle(good, pub(keys), profile=profile)
    assert [c["check"] for c in v.checks] == ["signature", "files", "constraints", "onnx_checker", "smoke"]
    m = v.manifest
    assert m["name"] == "digits_mlp" and m["version"] == "1.0.0"
    assert set(m["files"]) == {"model.onnx", "reference_profile.json", "samples/inputs.npz", "samples/expected.npz"}
    assert m["metrics"]["reference"]["accuracy"] > 0.9
    assert m["model"]["inputs"][0]["name"] == "input"
    assert m["reference_profile"]["n_features"] == 64
    assert v.engine is not None and v.engine.providers == ["CPUExecutionProvider"]


def test_tampered_model_byte(copy: Path, keys: dict[str, Path]) -> None:
    model = copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    e = refused(copy, pub(keys), "hash_mismatch")
    assert "model.onnx" in str(e)


def test_tampered_manifest(copy: Path, keys: dict[str, Path]) -> None:
    text = (copy / MANIFEST).read_text().replace('"version": "1.0.0"', '"version": "9.0.0"')
    (copy / MANIFEST).write_text(text)
    assert "changed after signing" in str(refused(copy, pub(keys), "bad_signature"))


def test_wrong_key_and_forged_key_id(copy: Path, keys: dict[str, Path]) -> None:
    assert "not one of the configured keys" in str(refused(copy, pub(keys, "other_pub"), "unknown_key"))
    # Signed by another key that claims the release key's id:
    other = ed25519.read_private(keys["other_priv"])
    sig = json.loads((copy / SIGNATURE).read_text())
    sig["signature"] = base64.b64encode(other.sign((copy / MANIFEST).read_bytes())).decode()
    (copy / SIGNATURE).write_text(json.dumps(sig))
    refused(copy, pub(keys), "bad_signature")


def test_missing_signature_and_no_configured_key(copy: Path, keys: dict[str, Path]) -> None:
    refused(copy, [], "unknown_key")
    (copy / SIGNATURE).unlink()
    refused(copy, pub(keys), "missing_signature")


def test_extra_and_missing_files(copy: Path, keys: dict[str, Path]) -> None:
    (copy / "notes.txt").write_text("hello")
    assert "notes.txt" in str(refused(copy, pub(keys), "extra_file"))
    (copy / "notes.txt").unlink()
    (copy / "samples" / "expected.npz").unlink()
    assert "samples/expected.npz" in str(refused(copy, pub(keys), "missing_file"))


def test_size_mismatch(copy: Path, keys: dict[str, Path]) -> None:
    with (copy / "reference_profile.json").open("a") as f:
        f.write(" ")
    refused(copy, pub(keys), "size_mismatch")


def test_smoke_mismatch_even_when_signed(copy: Path, keys: dict[str, Path]) -> None:
    with np.load(copy / "samples" / "expected.npz") as f:
        expected = {k: f[k] for k in f.files}
    expected["probabilities"] = expected["probabilities"] + 0.05
    np.savez(copy / "samples" / "expected.npz", **expected)
    resign(copy, keys["priv"])
    assert "differs from the expected values" in str(refused(copy, pub(keys), "smoke_mismatch"))


def test_constraints_expiry_and_profile(models_dir: Path, keys: dict[str, Path], tmp_path: Path, profile) -> None:
    opts = CreateOptions(profiles=["rpi4"], expires_at="2027-01-01T00:00:00Z")
    b = create_bundle(models_dir / "digits_mlp.onnx", "2", keys["priv"], tmp_path / "c", opts, profile)
    refused(b, pub(keys), "wrong_profile", profile=load_profile("x86-generic"))
    verify_bundle(b, pub(keys), profile=load_profile("rpi4"), now=datetime(2026, 12, 1, tzinfo=UTC))
    refused(b, pub(keys), "expired", profile=load_profile("rpi4"), now=datetime(2027, 1, 1, tzinfo=UTC))


def test_archive_round_trip_and_truncation(models_dir: Path, keys: dict[str, Path], tmp_path: Path, profile) -> None:
    tar = create_bundle(models_dir / "cnn.onnx", "3", keys["priv"], tmp_path / "cnn.tar",
                        CreateOptions(archive=True), profile)
    assert tar.is_file() and tarfile.is_tarfile(tar)
    verify_bundle(tar, pub(keys), workdir=tmp_path / "x")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    refused(cut, pub(keys), "truncated_archive", workdir=tmp_path / "y")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"definitely not a tar file" * 40)
    refused(junk, pub(keys), "truncated_archive", workdir=tmp_path / "z")


def hostile_tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return path


@pytest.mark.parametrize("make", [
    lambda: [tarfile.TarInfo("../escape.txt")],
    lambda: [tarfile.TarInfo("/etc/evil")],
    lambda: [tarfile.TarInfo("a/../../b")],
    lambda: [_link("model.onnx", "/etc/passwd", tarfile.SYMTYPE)],
    lambda: [_link("model.onnx", "manifest.json", tarfile.LNKTYPE)],
    lambda: [_link("dev", "", tarfile.CHRTYPE)],
])
def test_hostile_archives_are_refused_before_anything_is_written(tmp_path: Path, make) -> None:
    bad = hostile_tar(tmp_path / "bad.tar", make())
    dest = tmp_path / "out"
    with pytest.raises(BundleError) as ei:
        safe_extract(bad, dest)
    assert ei.value.code == "unsafe_archive"
    assert not dest.exists() and not (tmp_path / "escape.txt").exists()


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    t = tarfile.TarInfo(name)
    t.type = kind
    t.linkname = target
    return t


def test_oversize_members_are_refused(tmp_path: Path) -> None:
    bad = hostile_tar(tmp_path / "big.tar", [tarfile.TarInfo("model.onnx")], data=b"0" * 5000)
    with pytest.raises(BundleError, match="at most 1000") as ei:
        safe_extract(bad, tmp_path / "o", max_member=1000)
    assert ei.value.code == "unsafe_archive"


def test_keys_files_modes_and_mixups(tmp_path: Path) -> None:
    priv, pubf = ed25519.write_keypair(ed25519.generate(), tmp_path / "k")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    with pytest.raises(KeyFileError, match="exists"):
        ed25519.write_keypair(ed25519.generate(), tmp_path / "k")
    with pytest.raises(KeyFileError, match="private key file"):
        ed25519.read_public(priv)
    with pytest.raises(KeyFileError, match="not an edge-runtime private key"):
        ed25519.read_private(pubf)
    priv.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        ed25519.read_private(priv)


@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 30)), min_size=2, max_size=6))
def test_semantic_versions_order_like_tuples(vs: list[tuple[int, int, int]]) -> None:
    keyed = sorted(vs, key=lambda v: parse_version(".".join(map(str, v))))
    assert keyed == sorted(vs)


def test_version_rules() -> None:
    assert parse_version("1.0.0-rc.1") < parse_version("1.0.0") < parse_version("1.0.1")
    assert parse_version("1.0.0-alpha") < parse_version("1.0.0-alpha.1") < parse_version("1.0.0-beta")
    assert parse_version("9") < parse_version("10")
    for bad in ("1.0", "v1.2.3", "01.2.3", "", "1.2.3.4"):
        with pytest.raises(EdgeRuntimeError):
            parse_version(bad)


def test_reference_profile_statistics() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(1000, 3))
    x[::10, 2] = np.nan
    ref = reference_profile(x, "input")
    f0, f2 = ref["features"][0], ref["features"][2]
    assert ref["kind"] == "tabular" and ref["n_samples"] == 1000
    assert f0["mean"] == pytest.approx(x[:, 0].mean()) and f0["var"] == pytest.approx(x[:, 0].var())
    assert f2["nan_rate"] == pytest.approx(0.1) and f2["count"] == 900
    assert sum(f0["histogram"]["counts"]) == 1000 and len(f0["histogram"]["edges"]) == 9
    const = reference_profile(np.ones((50, 1)), "input")["features"][0]
    assert const["var"] == 0 and sum(const["histogram"]["counts"]) == 50


def test_inspect_shows_without_verifying(copy: Path) -> None:
    (copy / "extra.bin").write_bytes(b"1")
    info = inspect_bundle(copy)
    assert info["manifest"]["name"] == "digits_mlp" and info["unlisted_files"] == ["extra.bin"]


def test_cli_keygen_create_verify_inspect(models_dir: Path, tmp_path: Path) -> None:
    cli("keygen", "--out", str(tmp_path / "k"))
    b = tmp_path / "b.tar"
    cli("bundle", "create", "--model", str(models_dir / "digits_mlp.onnx"), "--version", "4", "--key",
        str(tmp_path / "k"), "--out", str(b), "--archive", "--reference", str(models_dir / "digits_mlp.test_x.npy"),
        "--test-data", str(models_dir / "digits_mlp.test_x.npy"), "--test-labels",
        str(models_dir / "digits_mlp.test_y.npy"), "--name", "digits", "--preprocess", '{"scale": 1.0}')
    r = json.loads(cli("bundle", "verify", str(b), "--key", str(tmp_path / "k.pub"), "--json").stdout)
    assert r["ok"] and r["name"] == "digits" and r["version"] == "4"
    info = json.loads(cli("bundle", "inspect", str(b), "--json").stdout)
    assert info["manifest"]["metrics"]["test"]["accuracy"] > 0.9
    assert info["manifest"]["preprocess"]["scale"] == 1.0
    cli("keygen", "--out", str(tmp_path / "k2"))
    proc = cli("bundle", "verify", str(b), "--key", str(tmp_path / "k2.pub"), "--json", check=False)
    assert proc.returncode == 1 and json.loads(proc.stdout)["code"] == "unknown_key"
    assert "[unknown_key]" in proc.stderr


def test_run_verifies_bundles_and_refuses_a_tampered_one(good: Path, keys: dict[str, Path], tmp_path: Path,
                                                          models_dir: Path) -> None:
    r = json.loads(cli("run", "--model", str(good), "--key", str(keys["pub"]), "--source",
                       f"npy:{models_dir / 'digits_mlp.test_x.npy'}", "--max-inputs", "20", "--json").stdout)
    assert r["pipelines"][0]["predictions"] == 20 and r["pipelines"][0]["name"] == "digits_mlp"
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-1] + b"\0")
    proc = cli("run", "--model", str(bad), "--source", "synthetic", "--max-inputs", "5", check=False,
               env={"EDGE_RUNTIME_PUBLIC_KEYS": str(keys["pub"])})
    assert proc.returncode == 1 and "[hash_mismatch]" in proc.stderr


def test_an_agent_on_the_old_model_keeps_serving_while_a_bad_bundle_is_refused(
        good: Path, keys: dict[str, Path], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    agent = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(good), "--key",
                              str(keys["pub"]), "--source", "stdin", "--report-json", str(report),
                              "--predictions", "-"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert agent.stdin is not None and agent.stdout is not None
        row = json.dumps([0.0] * 64) + "\n"
        agent.stdin.write(row)
        agent.stdin.flush()
        first = json.loads(agent.stdout.readline())
        bad = tmp_path / "v2"
        shutil.copytree(good, bad)
        (bad / "extra").write_text("x")
        proc = cli("bundle", "verify", str(bad), "--key", str(keys["pub"]), check=False)
        assert proc.returncode == 1 and "[extra_file]" in proc.stderr
        agent.stdin.write(row)
        agent.stdin.flush()
        second = json.loads(agent.stdout.readline())
        assert second.pop("id") != first.pop("id")  # every prediction has its own id
        assert second == first  # same model, same answer, still serving
        agent.stdin.close()
        assert agent.wait(timeout=30) == 0
    finally:
        agent.kill()
    assert json.loads(report.read_text())["pipelines"][0]["predictions"] == 2

"""`edge-runtime escalation tune` on the real device/cloud pair built by models/build_escalation_pair.py:
real onnxruntime sessions, real signed bundles. The tuned policy must reach the verified manifest, and the
device applying it to the same rows must escalate exactly what the curve counted."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edge_runtime.adapters import ed25519
from edge_runtime.bundle import MANIFEST, SIGNATURE, CreateOptions, create_bundle, manifest_bytes, verify_bundle
from edge_runtime.cli import main
from edge_runtime.core.escalation import (
    ESCALATION_FILE,
    ESCALATION_SCHEMA,
    EscalationPolicy,
    decide,
)
from edge_runtime.errors import BundleError
from tests.conftest import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(models_dir: Path) -> Path:
    return models_dir / "escalation"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    ed25519.write_keypair(ed25519.generate(), d / "release")
    ed25519.write_keypair(ed25519.generate(), d / "other")
    return {"priv": d / "release", "pub": d / "release.pub", "other_priv": d / "other", "other_pub": d / "other.pub"}


@pytest.fixture(scope="module")
def device_bundle(pair: Path, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, profile) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "digits-device-1"
    opts = CreateOptions(name="digits-device", reference=str(pair / "train_x.npy"))
    return create_bundle(pair / "device.onnx", "1.0.0", keys["priv"], out, opts, profile)


def tune(capsys: pytest.CaptureFixture[str], pair: Path, bundle: Path, *extra: str) -> dict[str, Any]:
    """`escalation tune --json` on the validation split, in this process."""
    rc = main(["escalation", "tune", "--bundle", str(bundle), "--data", str(pair / "val_x.npy"),
               "--labels", str(pair / "val_y.npy"), "--profile", "x86-generic", "--json", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def failing(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, *args: str) -> str:
    assert main(["escalation", "tune", "--profile", "x86-generic", *args]) == 1
    capsys.readouterr()
    return caplog.text


def device_probabilities(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["probabilities"], {"input": x})[0]


def test_help_lists_the_options() -> None:
    out = cli("escalation", "tune", "--help").stdout
    for word in ("--bundle", "--data", "--labels", "--budget", "--cloud-model", "--rule", "--json", "--policy-out",
                 "--key", "--version", "--out", "--trust", "--share", "upper bound"):
        assert word in out, word
    assert "--escalation" in cli("bundle", "create", "--help").stdout


def test_tuned_policy_goes_into_a_bundle_that_verifies(capsys, pair: Path, device_bundle: Path, keys, tmp_path: Path,
                                                        profile) -> None:
    policy_file = tmp_path / "escalation.json"
    r = tune(capsys, pair, device_bundle, "--budget", "5%", "--cloud-model", str(pair / "cloud.onnx"),
             "--share", "features", "--policy-out", str(policy_file))
    summary = json.loads((pair / "pair.json").read_text())
    doc = r["document"]
    tuned, curve, chosen = doc["tuned"], doc["curve"], r["chosen"]
    assert doc["schema"] == ESCALATION_SCHEMA and len(curve["points"]) == 61
    assert tuned["device_accuracy"] == pytest.approx(summary["device"]["val_accuracy"], abs=1e-6)
    assert tuned["cloud_accuracy"] == pytest.approx(summary["cloud"]["val_accuracy"], abs=1e-6)
    assert not tuned["cloud_assumed_correct"] and curve["points"][0]["accuracy"] == tuned["device_accuracy"]
    assert 0 < chosen["rate"] <= 0.05 and chosen["accuracy"] > tuned["device_accuracy"]
    policy = EscalationPolicy.from_dict(r["policy"])
    assert policy.score_below == chosen["threshold"] and policy.margin_below is None and policy.publishes
    assert json.loads(policy_file.read_text()) == doc

    # `bundle create --escalation FILE` signs it into a new bundle; the verified manifest exposes the policy
    out = tmp_path / "digits-device-2"
    rc = main(["bundle", "create", "--model", str(pair / "device.onnx"), "--version", "1.1.0", "--key",
               str(keys["priv"]), "--out", str(out), "--name", "digits-device", "--escalation", str(policy_file),
               "--profile", "x86-generic"])
    assert rc == 0
    v = verify_bundle(out, [ed25519.read_public(keys["pub"])], profile=profile)
    entry = v.manifest["escalation"]
    assert set(entry) == {"file", "schema", "policy", "tuned"} and entry["file"] == ESCALATION_FILE
    assert EscalationPolicy.from_dict(entry["policy"]) == policy and entry["tuned"] == tuned
    assert ESCALATION_FILE in v.manifest["files"] and json.loads((out / ESCALATION_FILE).read_text()) == doc

    # the device, deciding on the same rows with the policy it reads from the manifest, escalates exactly
    # the rows the curve counted
    x = np.load(pair / "val_x.npy")
    assert decide(EscalationPolicy.from_dict(entry["policy"]), device_probabilities(out / "model.onnx", x)).count \
        == chosen["n_escalated"]


def test_without_a_cloud_model_the_curve_is_an_upper_bound(capsys, pair: Path, device_bundle: Path) -> None:
    assumed = tune(capsys, pair, device_bundle, "--budget", "0.05")
    real = tune(capsys, pair, device_bundle, "--budget", "5%", "--cloud-model", str(pair / "cloud.onnx"))
    upper = assumed["document"]["tuned"]
    assert upper["cloud_assumed_correct"] and upper["cloud_accuracy"] is None
    for a, b in zip(assumed["document"]["curve"]["points"], real["document"]["curve"]["points"], strict=True):
        assert a["threshold"] == b["threshold"] and a["accuracy"] >= b["accuracy"]
    assert main(["escalation", "tune", "--bundle", str(device_bundle), "--data", str(pair / "val_x.npy"),
                 "--labels", str(pair / "val_y.npy"), "--budget", "5%", "--profile", "x86-generic"]) == 0
    text = capsys.readouterr().out
    assert "ASSUMED" in text and "upper bound" in text and "device only" in text and "nothing written" in text
    assert "share = none: inputs never leave this device" in text  # the default policy publishes nothing


def test_budget_forms_and_the_margin_rule(capsys, pair: Path, device_bundle: Path) -> None:
    cloud = ("--cloud-model", str(pair / "cloud.onnx"))
    assert tune(capsys, pair, device_bundle, "--budget", "10%", *cloud)["chosen"] == \
        tune(capsys, pair, device_bundle, "--budget", "0.1", *cloud)["chosen"]
    m = tune(capsys, pair, device_bundle, "--budget", "10%", "--rule", "margin", *cloud)
    assert m["policy"]["margin_below"] == m["chosen"]["threshold"] and m["policy"]["score_below"] is None
    assert m["document"]["curve"]["rule"] == "margin" and m["chosen"]["rate"] <= 0.10
    x = np.load(pair / "val_x.npy")
    scores = device_probabilities(pair / "device.onnx", x)
    assert decide(EscalationPolicy.from_dict(m["policy"]), scores).count == m["chosen"]["n_escalated"]


def test_resigning_makes_a_new_newer_bundle_and_leaves_the_source_alone(capsys, pair: Path, device_bundle: Path,
                                                                         keys, tmp_path: Path, profile) -> None:
    before = {p.name: p.read_bytes() for p in device_bundle.rglob("*") if p.is_file()}
    out = tmp_path / "digits-device-1.0.1.tar"
    r = tune(capsys, pair, device_bundle, "--budget", "5%", "--cloud-model", str(pair / "cloud.onnx"), "--share",
             "features", "--max-per-minute", "12", "--key", str(keys["priv"]), "--version", "1.0.1", "--out", str(out))
    assert r["wrote"] == {"bundle": str(out)}
    v = verify_bundle(out, [ed25519.read_public(keys["pub"])], profile=profile, workdir=tmp_path / "x")
    m = v.manifest
    assert m["version"] == "1.0.1" and m["derived_from"]["version"] == "1.0.0"
    assert m["escalation"]["policy"] == r["policy"] and m["escalation"]["policy"]["max_per_minute"] == 12
    assert set(m["files"]) >= {"model.onnx", ESCALATION_FILE, "reference_profile.json"}
    assert {p.name: p.read_bytes() for p in device_bundle.rglob("*") if p.is_file()} == before
    assert "escalation" not in verify_bundle(device_bundle, [ed25519.read_public(keys["pub"])], smoke=False).manifest

    # the new bundle's policy is the base of the next tuning; the same version again is refused
    again = tune(capsys, pair, out, "--budget", "2%")
    assert again["policy"]["max_per_minute"] == 12 and again["policy"]["share"] == "features"


def test_resigning_refuses_bad_sources_and_bad_versions(capsys, caplog, pair: Path, device_bundle: Path, keys,
                                                         tmp_path: Path, profile) -> None:
    common = ["--data", str(pair / "val_x.npy"), "--labels", str(pair / "val_y.npy"), "--budget", "5%"]
    text = failing(capsys, caplog, "--bundle", str(device_bundle), *common, "--key", str(keys["priv"]),
                   "--version", "1.0.0", "--out", str(tmp_path / "same"))
    assert "must be newer than the source bundle's 1.0.0" in text and not (tmp_path / "same").exists()
    assert "needs all of --key, --version and --out" in failing(capsys, caplog, "--bundle", str(device_bundle),
                                                               *common, "--key", str(keys["priv"]))
    tampered = tmp_path / "tampered"
    shutil.copytree(device_bundle, tampered)
    model = tampered / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    text = failing(capsys, caplog, "--bundle", str(tampered), *common, "--key", str(keys["priv"]), "--version",
                   "2.0.0", "--out", str(tmp_path / "laundered"))
    assert "hash_mismatch" in text and not (tmp_path / "laundered").exists()

    # a source signed by another key verifies only with --trust; then it is re-signed with ours
    other = create_bundle(pair / "device.onnx", "3.0.0", keys["other_priv"], tmp_path / "other-3", CreateOptions(),
                          profile)
    text = failing(capsys, caplog, "--bundle", str(other), *common, "--key", str(keys["priv"]), "--version",
                   "3.0.1", "--out", str(tmp_path / "o"))
    assert "unknown_key" in text
    r = tune(capsys, pair, other, "--budget", "5%", "--key", str(keys["priv"]), "--version", "3.0.1", "--out",
             str(tmp_path / "o"), "--trust", str(keys["other_pub"]))
    v = verify_bundle(r["wrote"]["bundle"], [ed25519.read_public(keys["pub"])], profile=profile)
    assert v.manifest["derived_from"]["signed_by"] == ed25519.read_public(keys["other_pub"]).key_id


def test_data_errors_say_what_was_expected(capsys, caplog, pair: Path, device_bundle: Path) -> None:
    base = ["--bundle", str(device_bundle), "--budget", "5%"]
    text = failing(capsys, caplog, *base, "--data", str(pair / "val_x.npy"), "--labels", str(pair / "test_y.npy"))
    assert "expected 359 integer classes" in text and "got int64[360]" in text
    text = failing(capsys, caplog, *base, "--data", str(pair / "val_y.npy"), "--labels", str(pair / "val_y.npy"))
    assert "the rows do not fit the model" in text and "expected 2 dims" in text
    text = failing(capsys, caplog, "--bundle", str(device_bundle), "--budget", "50", "--data",
                   str(pair / "val_x.npy"), "--labels", str(pair / "val_y.npy"))
    assert "--budget: expected a fraction between 0 and 1" in text
    text = failing(capsys, caplog, *base, "--data", str(pair / "val_x.npy"), "--labels", str(pair / "val_y.npy"),
                   "--cloud-model", str(pair / "cloud.onnx"), "--cloud-data", str(pair / "test_x.npy"))
    assert "--cloud-data has 360 rows, --data 359" in text


def resign(directory: Path, key_path: Path, edit: Any) -> None:
    """Change the manifest and sign it again: what a key holder could do."""
    manifest = json.loads((directory / MANIFEST).read_bytes())
    edit(manifest)
    body = manifest_bytes(manifest)
    (directory / MANIFEST).write_bytes(body)
    key = ed25519.read_private(key_path)
    (directory / SIGNATURE).write_text(json.dumps({"alg": "ed25519", "key_id": key.public.key_id,
                                                   "signature": base64.b64encode(key.sign(body)).decode()}))


def test_verify_refuses_a_signed_bundle_whose_policy_is_invalid(capsys, pair: Path, device_bundle: Path, keys,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "b"
    tune(capsys, pair, device_bundle, "--budget", "5%", "--key", str(keys["priv"]), "--version", "1.0.2", "--out",
         str(out))
    resign(out, keys["priv"], lambda m: m["escalation"]["policy"].update(score_below=2.0))
    with pytest.raises(BundleError) as ei:
        verify_bundle(out, [ed25519.read_public(keys["pub"])], smoke=False)
    assert ei.value.code == "bad_manifest" and "score_below" in str(ei.value) and "(0, 1]" in str(ei.value)


def test_bundle_create_refuses_a_bad_escalation_file(caplog, pair: Path, keys, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": ESCALATION_SCHEMA, "policy": {"share": "everything"}}))
    rc = main(["bundle", "create", "--model", str(pair / "device.onnx"), "--version", "1", "--key",
               str(keys["priv"]), "--out", str(tmp_path / "never"), "--escalation", str(bad), "--profile",
               "x86-generic"])
    assert rc == 1 and "share" in caplog.text and "everything" in caplog.text
    assert not (tmp_path / "never").exists()

"""`edge-runtime doctor`: every check gives a verdict on this machine, against a real broker and real signed
bundles, and the thresholds and cpuinfo parsing hold on chosen values."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_runtime import doctor
from edge_runtime.doctor import VERDICTS, Check, Probes, cpu_check, cpu_features, exit_code, format_table, run_checks
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent

# Real machines' /proc/cpuinfo, trimmed to the lines that matter.
PI4 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU part\t: 0xd08

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""
PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU part\t: 0xd0b
"""
X86_VNNI = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 bmi2 avx512f avx512bw avx512_vnni
"""
X86_AVX2 = "flags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_OLD = "flags\t\t: fpu sse sse2 ssse3\n"

FAST = Probes(providers=lambda _t: ["CPUExecutionProvider"])  # skips the onnxruntime child interpreter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-runtime")
    sub = p.add_subparsers(dest="command")
    doctor.add_parser(sub)
    return p


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# -- pure parts -------------------------------------------------------------------------------------

def test_cpuinfo_pi4_has_neon_without_dot_product() -> None:
    assert cpu_features(PI4) == {"fp", "asimd", "evtstrm", "crc32", "cpuid"}
    c = cpu_check(PI4, "aarch64")
    assert c.verdict == "ok"
    assert "no dot-product instructions: int8 may not beat fp32" in c.detail
    assert "edge-runtime quantize" in c.detail


def test_cpuinfo_pi5_has_dot_product() -> None:
    c = cpu_check(PI5, "aarch64")
    assert c.verdict == "ok"
    assert "asimddp" in c.detail
    assert "int8 matmuls fast" in c.detail


@pytest.mark.parametrize(("text", "verdict", "words"), [
    (X86_VNNI, "ok", "AVX512-VNNI: int8 matmuls fast"),
    (X86_AVX2, "ok", "AVX2, no VNNI"),
    (X86_OLD, "warn", "no AVX2"),
])
def test_cpuinfo_x86(text: str, verdict: str, words: str) -> None:
    c = cpu_check(text, "x86_64")
    assert (c.verdict, words in c.detail) == (verdict, True), c


def test_an_emulated_arm_machine_reading_the_hosts_x86_cpuinfo_is_not_called_x86() -> None:
    c = cpu_check(X86_VNNI, "aarch64")  # qemu-user passes the host's /proc/cpuinfo through
    assert c.verdict == "warn" and "VNNI" not in c.detail and "emulated" in c.detail, c


def test_cpuinfo_missing_or_empty_is_skipped() -> None:
    assert cpu_check(None).verdict == "skip"
    assert cpu_check("processor\t: 0\n", "riscv64").verdict == "skip"


def test_check_refuses_unknown_verdicts() -> None:
    with pytest.raises(ValueError, match="verdict must be one of ok, warn, fail, skip, got 'bad'"):
        Check("x", "bad")


def test_table_is_aligned_and_ends_with_the_verdict() -> None:
    checks = [Check("python", "ok", "3.11.7"), Check("broker", "fail", "refused"), Check("tls", "skip", "")]
    lines = format_table(checks).splitlines()
    assert lines[0].split() == ["CHECK", "VERDICT", "DETAIL"]
    col = lines[0].index("VERDICT")
    assert [ln[col:col + 4] for ln in lines[1:4]] == ["OK  ", "FAIL", "SKIP"]
    assert lines[-1] == "verdict: FAIL (1 ok, 0 warn, 1 fail, 1 skip)"
    assert exit_code(checks) == 1
    assert exit_code([Check("a", "ok"), Check("b", "warn"), Check("c", "skip")]) == 0


def test_onnxruntime_1_21_fails_on_aarch64_only(monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"edge-runtime": "0.1.0", "numpy": "2.1.0", "onnxruntime": "1.21.0", "paho-mqtt": "1.6.1"}

    def fake(*names: str) -> tuple[str, str] | None:
        return next(((n, versions[n]) for n in names if n in versions), None)

    monkeypatch.setattr(doctor, "_dist_version", fake)
    pi = by_name(doctor.package_checks("aarch64"))
    assert pi["onnxruntime"].verdict == "fail"
    assert "SIGILL" in pi["onnxruntime"].detail and "23957" in pi["onnxruntime"].detail
    assert pi["paho-mqtt"].verdict == "fail" and "paho-mqtt>=2" in pi["paho-mqtt"].detail
    assert pi["opencv"].verdict == "skip" and "camera and video" in pi["opencv"].detail
    assert pi["pynacl"].verdict == "warn" and "signing" in pi["pynacl"].detail
    assert pi["onnx"].verdict == "skip" and "quantize" in pi["onnx"].detail
    assert by_name(doctor.package_checks("x86_64"))["onnxruntime"].verdict == "warn"


# -- the real machine ---------------------------------------------------------------------------------

def test_real_machine_every_check_gives_a_verdict(tmp_path: Path) -> None:
    checks = run_checks(state_dir=tmp_path)
    names = [c.name for c in checks]
    for expected in ("python", "edge-runtime", "numpy", "onnxruntime", "paho-mqtt", "opencv", "pynacl", "onnx",
                     "profile", "providers", "cpu", "disk", "clock", "broker", "tls", "bundle", "thermal"):
        assert expected in names
    assert all(c.verdict in VERDICTS and c.detail for c in checks), checks
    got = by_name(checks)
    assert got["python"].verdict == "ok"
    assert got["providers"].verdict == "ok", got["providers"]  # a real onnxruntime, asked in a child process
    assert "CPUExecutionProvider" in got["providers"].detail
    assert got["broker"].verdict == got["bundle"].verdict == got["tls"].verdict == "skip"
    if not doctor._temperatures():
        assert got["thermal"] == Check("thermal", "skip", "no thermal zones (VM/container)")


def test_one_crashing_probe_does_not_stop_the_others(tmp_path: Path) -> None:
    def boom() -> str:
        raise OSError("cpuinfo unreadable")

    checks = run_checks(state_dir=tmp_path, probes=Probes(cpuinfo=boom, providers=FAST.providers))
    got = by_name(checks)
    assert got["cpu"].verdict == "fail"
    assert "OSError: cpuinfo unreadable" in got["cpu"].detail
    assert got["disk"].verdict == "ok" and got["clock"].verdict == "ok"
    assert exit_code(checks) == 1


def test_old_python_fails(tmp_path: Path) -> None:
    checks = run_checks(state_dir=tmp_path, probes=Probes(python_version=lambda: (3, 10, 12),
                                                          providers=FAST.providers))
    assert by_name(checks)["python"] == Check("python", "fail", "3.10.12: edge-runtime needs Python 3.11 or later")
    assert exit_code(checks) == 1


def test_strict_profile_with_a_missing_provider_fails(tmp_path: Path) -> None:
    got = by_name(run_checks(profile_name="jetson-orin-nano", state_dir=tmp_path, probes=FAST))
    assert got["providers"].verdict == "fail"
    assert "TensorrtExecutionProvider" in got["providers"].detail and "strict" in got["providers"].detail
    lax = doctor.providers_check(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"],
                                 strict=False, profile="p")
    assert lax.verdict == "warn"


def test_unknown_profile_fails_and_providers_are_skipped(tmp_path: Path) -> None:
    got = by_name(run_checks(profile_name="no-such-board", state_dir=tmp_path, probes=FAST))
    assert got["profile"].verdict == "fail" and "unknown device profile" in got["profile"].detail
    assert got["providers"].verdict == "skip"


def test_unset_clock_and_hot_zone_warn(tmp_path: Path) -> None:
    probes = Probes(now=lambda: datetime(1970, 1, 1, 0, 0, 12, tzinfo=UTC),
                    temperatures=lambda: {"cpu-thermal": 82.5, "gpu": 40.0}, providers=FAST.providers)
    got = by_name(run_checks(state_dir=tmp_path, probes=probes))
    assert got["clock"].verdict == "warn" and "1970-01-01T00:00:12Z" in got["clock"].detail
    assert got["thermal"].verdict == "warn" and "cpu-thermal 82.5 C" in got["thermal"].detail
    cool = doctor.thermal_check({"cpu-thermal": 55.0})
    assert cool.verdict == "ok"


# -- disk ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("free", "verdict"), [(5 * 10**9, "ok"), (10**9, "ok"), (999_999_999, "warn"),
                                               (100 * 10**6, "warn"), (99_999_999, "fail"), (0, "fail")])
def test_free_disk_thresholds(tmp_path: Path, free: int, verdict: str) -> None:
    seen: list[Path] = []

    def probe(p: Path) -> int:
        seen.append(p)
        return free

    got = by_name(run_checks(state_dir=tmp_path, probes=Probes(free_bytes=probe, providers=FAST.providers)))
    assert got["disk"].verdict == verdict, got["disk"]
    assert seen == [tmp_path.resolve()]


def test_free_disk_real_probe_and_missing_state_dir(tmp_path: Path) -> None:
    import shutil

    real = by_name(run_checks(state_dir=tmp_path / "not" / "yet", probes=FAST))["disk"]
    expected = doctor.disk_check(shutil.disk_usage(tmp_path).free, str(tmp_path / "not" / "yet")).verdict
    assert real.verdict == expected
    assert str(tmp_path / "not" / "yet") in real.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_state_dir_fails(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        disk = by_name(run_checks(state_dir=ro, probes=FAST))["disk"]
    finally:
        ro.chmod(0o700)
    assert disk.verdict == "fail" and "not writable" in disk.detail


# -- broker -------------------------------------------------------------------------------------------

@pytest.mark.integration
def test_broker_real_mosquitto_ok(mosquitto: tuple[str, int], tmp_path: Path) -> None:
    host, port = mosquitto
    got = by_name(run_checks(state_dir=tmp_path, broker=f"mqtt://{host}:{port}", probes=FAST))["broker"]
    assert got.verdict == "ok", got
    assert "MQTT 5 CONNECT accepted" in got.detail


@pytest.mark.integration
def test_broker_closed_port_fails(tmp_path: Path) -> None:
    port = free_port()
    got = by_name(run_checks(state_dir=tmp_path, broker=f"mqtt://127.0.0.1:{port}", timeout_s=1.0,
                             probes=FAST))["broker"]
    assert got.verdict == "fail", got
    assert f"cannot reach 127.0.0.1:{port}" in got.detail


@pytest.mark.integration
def test_broker_refusing_the_connect_fails_with_its_reason(broker_factory, tmp_path: Path) -> None:
    b = broker_factory("allow_anonymous false\n")
    got = by_name(run_checks(state_dir=tmp_path, broker=f"mqtt://{b.host}:{b.port}", timeout_s=2.0,
                             probes=FAST))["broker"]
    assert got.verdict == "fail", got
    assert "accepts TCP but not an MQTT 5 CONNECT: broker refused the connection: Not authorized" in got.detail


def test_bad_broker_url_fails_clearly(tmp_path: Path) -> None:
    got = by_name(run_checks(state_dir=tmp_path, broker="http://example", probes=FAST))["broker"]
    assert got.verdict == "fail" and "mqtt://host:1883" in got.detail


# -- TLS files ----------------------------------------------------------------------------------------

def test_tls_files(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n")
    key.chmod(0o644)
    junk = tmp_path / "ca.pem"
    junk.write_text("hello\n")
    checks = run_checks(state_dir=tmp_path, tls_files=[key, junk, tmp_path / "missing.crt"], probes=FAST)
    got = by_name(checks)
    assert got["tls client.key"].verdict == "warn" and "chmod 600" in got["tls client.key"].detail
    assert got["tls ca.pem"].verdict == "warn"
    assert got["tls missing.crt"].verdict == "fail" and "cannot read" in got["tls missing.crt"].detail
    key.chmod(0o600)
    assert doctor._tls_file(str(key)).verdict == "ok"
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        assert doctor._tls_file(str(ca)).verdict == "ok"
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    assert doctor._tls_file(str(broken)).verdict == "fail"


# -- bundles ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A digits bundle signed with one key, plus a second key it is not signed with."""
    from _common import load_script

    from edge_runtime.adapters import ed25519
    from edge_runtime.bundle import CreateOptions, create_bundle
    from edge_runtime.profiles import load_profile

    models = tmp_path_factory.mktemp("models")
    load_script("build_digits_mlp").build(models)  # this model only: about 1.5 s instead of all of them
    keys = tmp_path_factory.mktemp("keys")
    ed25519.write_keypair(ed25519.generate(), keys / "release")
    ed25519.write_keypair(ed25519.generate(), keys / "other")
    out = tmp_path_factory.mktemp("bundles") / "digits-1"
    create_bundle(models / "digits_mlp.onnx", "1.0.0", keys / "release", out,
                  CreateOptions(reference=str(models / "digits_mlp.test_x.npy")), load_profile("x86-generic"),
                  progress=lambda _m: None)
    return {"bundle": out, "pub": keys / "release.pub", "other": keys / "other.pub"}


@pytest.mark.integration
def test_signed_bundle_ok(signed: dict[str, Path], tmp_path: Path) -> None:
    got = by_name(run_checks(state_dir=tmp_path, bundle=signed["bundle"], keys=[signed["pub"]], probes=FAST))
    assert got["bundle"].verdict == "ok", got["bundle"]
    assert "1.0.0 signed by" in got["bundle"].detail


@pytest.mark.integration
def test_tampered_bundle_and_wrong_key_fail(signed: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(signed["bundle"], bad)
    model = bad / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    checks = run_checks(state_dir=tmp_path, bundle=bad, keys=[signed["pub"]], probes=FAST)
    got = by_name(checks)["bundle"]
    assert got.verdict == "fail" and got.detail.startswith("hash_mismatch: "), got
    assert exit_code(checks) == 1
    other = by_name(run_checks(state_dir=tmp_path, bundle=signed["bundle"], keys=[signed["other"]],
                               probes=FAST))["bundle"]
    assert other.verdict == "fail" and other.detail.startswith("unknown_key: ")
    nokey = by_name(run_checks(state_dir=tmp_path, bundle=signed["bundle"], probes=FAST))["bundle"]
    assert nokey.verdict == "fail" and "no public key" in nokey.detail


# -- command line -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_cmd_doctor_json_and_exit_code(signed: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_RUNTIME_BROKER", raising=False)
    monkeypatch.delenv("EDGE_RUNTIME_PUBLIC_KEYS", raising=False)
    args = parser().parse_args(["doctor", "--json", "--state-dir", str(tmp_path), "--bundle", str(signed["bundle"]),
                                "--key", str(signed["pub"]), "--timeout", "1"])
    assert args.command == "doctor"
    assert doctor.cmd_doctor(args, probes=FAST) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exit_code"] == 0 and out["verdict"] in ("ok", "warn")
    rows = {c["name"]: c for c in out["checks"]}
    assert rows["bundle"]["verdict"] == "ok"
    assert set(out["counts"]) == set(VERDICTS)

    args = parser().parse_args(["doctor", "--state-dir", str(tmp_path), "--broker", f"mqtt://127.0.0.1:{free_port()}",
                                "--timeout", "0.5"])
    assert doctor.cmd_doctor(args, probes=FAST) == 1
    text = capsys.readouterr().out
    assert "broker" in text and text.splitlines()[-1].startswith("verdict: FAIL")


@pytest.mark.integration
def test_doctor_as_a_user_runs_it(tmp_path: Path) -> None:
    code = ("import argparse, sys\nfrom edge_runtime import doctor\n"
            "p = argparse.ArgumentParser(prog='edge-runtime')\nsub = p.add_subparsers(dest='command')\n"
            "doctor.add_parser(sub)\nsys.exit(doctor.cmd_doctor(p.parse_args(sys.argv[1:])))")
    env = {k: v for k, v in os.environ.items() if k not in ("EDGE_RUNTIME_BROKER", "EDGE_RUNTIME_STATE_DIR")}
    proc = subprocess.run([sys.executable, "-c", code, "doctor", "--json", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False)
    out = json.loads(proc.stdout)
    assert proc.returncode == out["exit_code"], proc.stderr
    assert all(c["verdict"] in VERDICTS for c in out["checks"])
    proc = subprocess.run([sys.executable, "-c", code, "doctor", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, check=True)
    for flag in ("--profile", "--state-dir", "--broker", "--bundle", "--key", "--tls-file", "--json", "--timeout",
                 "--log-level"):
        assert flag in proc.stdout


def test_import_is_light() -> None:
    code = "import sys, json\nimport edge_runtime.doctor\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout)}
    assert not loaded & {"onnxruntime", "cv2", "paho", "nacl", "onnx", "numpy"}

"""devices/pi_check.py (`make pi-check`) on the host: its command line and pure helpers; nothing is emulated."""

from __future__ import annotations

import ast
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "devices" / "pi_check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pi_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pi_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


pc = _load()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_help_names_the_emulated_cpus_and_exit_codes() -> None:
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    assert "cortex-a72" in proc.stdout and "cortex-a76" in proc.stdout
    assert "Exit status" in proc.stdout


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    work = tmp_path / "pi"
    proc = run_script("--dry-run", "--work", str(work), "--cpu", "cortex-a76", "--inputs", "3")
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime>=1.17,!=1.21.0" in proc.stdout
    assert "manylinux_2_28_aarch64" in proc.stdout and "manylinux2014_aarch64" in proc.stdout
    assert "cortex-a76" in proc.stdout and "profile rpi5" in proc.stdout and "cortex-a72" not in proc.stdout
    assert "run 3 inputs" in proc.stdout
    assert not work.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--cpu", "cortex-a53"], "invalid choice"),
    (["--inputs", "0"], "--inputs must be at least 1"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--bench-seconds", "0"], "--bench-seconds must be positive"),
    (["--test", "tests/no_such_test.py"], "no such file"),
    (["--no-tests", "--test", "tests/test_stats.py"], "contradict"),
])
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str) -> None:
    proc = run_script("--dry-run", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_requirements_follow_pyproject_and_add_the_test_tools() -> None:
    reqs = pc.requirements(ROOT / "pyproject.toml")
    names = [pc._req_name(r) for r in reqs]
    assert {"numpy", "onnxruntime", "paho-mqtt", "pytest", "pytest-timeout", "hypothesis"} <= set(names)
    assert any(r.startswith("onnxruntime") and "!=1.21.0" in r for r in reqs)


def test_requirements_fall_back_to_bare_names_without_a_dev_extra(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["numpy>=2"]\n',
                                             encoding="utf-8")
    assert pc.requirements(tmp_path / "pyproject.toml") == ["numpy>=2", "pytest", "pytest-timeout", "hypothesis"]


def test_host_mirror_reads_both_source_formats() -> None:
    deb822 = ("Types: deb\n# URIs: http://snapshot.debian.org/archive/debian/1\n"
              "URIs: http://deb.debian.org/debian-security\n\n"
              "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm\n")
    assert pc.host_mirror([deb822]) == "http://mirror.example/debian"
    one_line = ("# deb http://old.example/debian bookworm main\n"
                "deb [arch=amd64] http://ftp.example/debian bookworm main\n")
    assert pc.host_mirror(["", one_line]) == "http://ftp.example/debian"
    assert pc.host_mirror(["deb https://packages.example.com/apt stable main\n"]) == pc.DEFAULT_MIRROR


def test_sources_are_arm64_only_and_signed() -> None:
    text = pc.sources_deb822("http://m/debian", "http://m/debian-security", "bookworm")
    assert text.count("Architectures: arm64") == 2
    assert text.count(f"Signed-By: {pc.KEYRING}") == 2
    assert "Suites: bookworm bookworm-updates" in text and "Suites: bookworm-security" in text


def test_deb_file_names_come_from_apts_simulation() -> None:
    sim = ("NOTE: This is only a simulation!\n"
           "Inst libc6 (2.36-9+deb12u10 Debian:12.11/stable [arm64])\n"
           "Inst media-types (10.0.0 Debian:12.11/stable [all])\n"
           "Inst tar [1.34] (1:1.34+dfsg-1.2+deb12u1 Debian:12.11/stable [arm64])\n"
           "Conf libc6 (2.36-9+deb12u10 Debian:12.11/stable [arm64])\n")
    assert pc.debs_from_simulation(sim) == ["libc6_2.36-9+deb12u10_arm64.deb", "media-types_10.0.0_all.deb",
                                            "tar_1%3a1.34+dfsg-1.2+deb12u1_arm64.deb"]


def test_pytest_counts_read_the_last_summary_line() -> None:
    out = "....\nFAILED tests/x.py::y - in the middle\n1 failed, 330 passed, 3 deselected in 210.12s (0:03:30)\n"
    assert pc.pytest_counts(out) == {"failed": 1, "passed": 330, "deselected": 3}
    assert pc.pytest_counts("2 passed, 1 error in 3.0s") == {"passed": 2, "errors": 1}
    assert pc.pytest_counts("no summary here") == {}


def test_predictions_are_compared_label_by_label_and_within_a_score_tolerance() -> None:
    want = {"digits": [(1, 0.9), (2, 0.8)], "cnn": [(3, 0.5), (4, 0.6)]}
    assert pc.compare_predictions({"digits": [(1, 0.9002), (2, 0.8)], "cnn": [(3, 0.5), (4, 0.6)]}, want, 2) == []
    assert pc.compare_predictions({"digits": [(1, 0.9), (7, 0.8)], "cnn": want["cnn"]}, want, 2) == [
        "digits: 1/2 labels agree with the host"]
    assert pc.compare_predictions({"digits": want["digits"], "cnn": [(3, 0.5), (4, 0.7)]}, want, 2) == [
        "cnn: scores differ from the host's by up to 0.1"]
    assert pc.compare_predictions({"digits": want["digits"]}, want, 2) == [
        "cnn: 0 predictions under emulation, 2 on the host, 2 asked"]


def test_predictions_file_is_read_per_pipeline_in_order(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"pipeline": "a", "id": "x-1", "label": 2, "score": 0.5}\n\n'
                    '{"pipeline": "b", "id": "x-2", "label": 0, "score": 1}\n'
                    '{"pipeline": "a", "id": "x-3", "label": 1, "score": 0.25}\n', encoding="utf-8")
    assert pc.read_predictions(path) == {"a": [(2, 0.5), (1, 0.25)], "b": [(0, 1.0)]}


@pytest.mark.parametrize("as_root", [True, False])
def test_wrapper_runs_qemu_inside_a_mount_namespace(tmp_path: Path, as_root: bool) -> None:
    text = pc.render_wrapper(cpu="cortex-a76", sysroot=tmp_path / "sys root",
                             pythonpath=[tmp_path / "p", tmp_path / "s"], pycache=tmp_path / "c",
                             qemu="/usr/bin/qemu-aarch64-static", as_root=as_root)
    assert f"-L '{tmp_path / 'sys root'}' -cpu cortex-a76" in text
    assert "mount -t tmpfs" in text and "/sys/devices/system/cpu/cpu*/cache" in text
    assert ("--map-root-user" in text) is not as_root
    assert f"PYTHONPATH={tmp_path / 'p'}:{tmp_path / 's'}" in text
    sh = shutil.which("sh")
    if sh:
        wrapper = tmp_path / "python3"
        wrapper.write_text(text, encoding="utf-8")
        proc = subprocess.run([sh, "-n", str(wrapper)], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr


# What the emulated interpreter has: the agent's core dependencies and the test tools, nothing built by
# the `models` extra (scikit-learn) and no cloud side.
ALLOWED_IMPORTS = {"numpy", "hypothesis", "pytest", "edge_runtime", "tests"}


@pytest.mark.parametrize("path", pc.DEFAULT_TESTS)
def test_default_emulated_tests_stay_pure_core(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    stdlib = set(sys.stdlib_module_names)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            assert top in stdlib or top in ALLOWED_IMPORTS, f"{path} imports {name}"
            if top == "edge_runtime":
                assert name.startswith(("edge_runtime.core", "edge_runtime.errors")), f"{path} imports {name}"
        if isinstance(node, ast.arg):
            assert node.arg != "models_dir", f"{path} uses the models_dir fixture (scikit-learn)"

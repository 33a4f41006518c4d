"""Shared fixtures: sample models built once per test session by the scripts in models/."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"

sys.path.insert(0, str(MODELS_DIR))
from _common import load_script  # noqa: E402 - models/ holds scripts, not a package


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models")
    load_script("build_all").build(out)
    return out


@pytest.fixture(scope="session")
def profile():
    from edge_runtime.profiles import load_profile

    return load_profile("x86-generic")


def cli(*args: str, stdin: str | None = None, timeout: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``edge-runtime ARGS`` in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "edge_runtime.cli", *args], input=stdin, text=True,
                          capture_output=True, timeout=timeout, env={**os.environ, **(env or {})},
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"edge-runtime {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    import shutil

    sbin = Path("/usr/sbin/mosquitto")  # not on a non-root user's PATH
    path = shutil.which("mosquitto") or (str(sbin) if sbin.exists() else None)
    if path is None:
        raise AssertionError("Debian's mosquitto is not installed; `make test` installs it when run as root "
                             "(else: sudo apt-get install mosquitto)")
    return path


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto on a free loopback port, with its own config; stopped after the test."""
    import socket

    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise AssertionError(f"mosquitto did not start on port {port}: {err}") from None
                time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()

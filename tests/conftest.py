"""Shared fixtures: sample models built once per test session by the scripts in models/."""

from __future__ import annotations

import getpass
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


class Mosquitto:
    """A real Mosquitto on a loopback port with its own generated config; restartable on the same port
    (persistence off unless the config says otherwise)."""

    def __init__(self, workdir: Path, extra_conf: str = "allow_anonymous true\n", port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.conf = workdir / f"mosquitto-{self.port}.conf"
        # Started as root, Mosquitto drops to its own user, which cannot read the test's private files.
        self.conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\nuser {getpass.getuser()}\n"
                             f"{extra_conf}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        import socket

        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise AssertionError(f"mosquitto did not start on port {self.port}: {err}") from None
                time.sleep(0.05)
            else:
                return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


@pytest.fixture
def mosquitto(tmp_path: Path):
    """A real Mosquitto (anonymous access) on a free loopback port; stopped after the test."""
    broker = Mosquitto(tmp_path).start()
    try:
        yield broker.host, broker.port
    finally:
        broker.stop()


@pytest.fixture
def broker_factory(tmp_path: Path):
    """Start brokers with extra config lines; every one is stopped after the test."""
    made: list[Mosquitto] = []

    def make(extra_conf: str = "allow_anonymous true\n") -> Mosquitto:
        b = Mosquitto(tmp_path, extra_conf).start()
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            b.stop()

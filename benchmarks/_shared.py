"""What the benchmark scripts (and the test suite's broker fixtures) share: building the sample models
when they are missing, and a Mosquitto of their own on a free loopback port.

benchmarks/ holds scripts, not a package: each script puts this folder on sys.path to import it.
"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def ensure_models(models_dir: Path, needed: Iterable[str], log: Callable[[str], None]) -> dict[str, Any]:
    """Build the sample models into ``models_dir`` (models/build_all.py) unless ``needed`` are there."""
    needed = list(needed)
    missing = [m for m in needed if not (models_dir / m).is_file()]
    if not missing:
        log(f"models present in {models_dir}")
        return {"built": False, "dir": str(models_dir)}
    log(f"building sample models into {models_dir} (missing: {', '.join(missing)})")
    cmd = [sys.executable, str(REPO / "models" / "build_all.py"), "--out", str(models_dir)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"model build failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    still = [m for m in needed if not (models_dir / m).is_file()]
    if still:
        raise RuntimeError(f"model build did not write {', '.join(still)}")
    return {"built": True, "dir": str(models_dir), "seconds": round(time.monotonic() - t0, 2)}


def mosquitto_binary() -> str:
    sbin = Path("/usr/sbin/mosquitto")  # not on a non-root user's PATH
    path = shutil.which("mosquitto") or (str(sbin) if sbin.exists() else None)
    if path is None:
        raise RuntimeError("Debian's mosquitto is not installed; `make test` installs it when run as root "
                           "(else: sudo apt-get install mosquitto)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """A real Mosquitto on a loopback port with its own generated config and log file; restartable on
    the same port. Only the listener, persistence (off), the user to run as and ``extra_conf`` are set:
    everything else (max_queued_messages 1000, max_inflight_messages 20, ...) is Mosquitto's default."""

    def __init__(self, workdir: Path, extra_conf: str = "allow_anonymous true\n", port: int | None = None,
                 name: str | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        stem = f"mosquitto-{name or self.port}"
        self.conf = workdir / f"{stem}.conf"
        self.log_path = workdir / f"{stem}.log"
        # Started as root, Mosquitto drops to its own user, which cannot read private temp files.
        self.conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\nuser {getpass.getuser()}\n"
                             f"{extra_conf}")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start on port {self.port}: "
                                       f"{self.log_path.read_text(errors='replace')[-1000:]}") from None
                time.sleep(0.05)
            else:
                return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_lines(self, needle: str) -> list[str]:
        try:
            return [ln for ln in self.log_path.read_text(errors="replace").splitlines() if needle in ln]
        except OSError:
            return []

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

"""The agent under systemd's notify protocol, against a real datagram socket as NOTIFY_SOCKET: READY
once it serves, WATCHDOG while its pipelines live (idle included), STATUS lines, STOPPING on SIGTERM;
and no WATCHDOG once a pipeline is stuck, so systemd restarts it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_runtime.adapters.onnx_engine import OnnxEngine
from edge_runtime.pipeline import Pipeline
from edge_runtime.runtime import Agent

pytestmark = pytest.mark.integration


def listen(path: Path) -> tuple[socket.socket, list[str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    got: list[str] = []

    def loop() -> None:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return
    threading.Thread(target=loop, daemon=True).start()
    return sock, got


def test_ready_watchdog_status_and_stopping_from_a_running_agent(models_dir: Path, tmp_path: Path) -> None:
    sock, got = listen(tmp_path / "notify.sock")
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "run", "--model",
                             str(models_dir / "digits_mlp.onnx"), "--source", "stdin", "--status-interval", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 30
        while sum(m == "WATCHDOG=1" for m in got) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert got and got[0].startswith("READY=1"), got
        assert sum(m == "WATCHDOG=1" for m in got) >= 4   # idle on stdin, and alive
        assert any(m.startswith("STATUS=digits_mlp:") for m in got)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-2000:]
        assert "STOPPING=1" in got
    finally:
        proc.kill()
        sock.close()


class Stuck:
    """A source whose read never returns (a wedged camera driver): a fault."""

    name = "stuck"

    def __init__(self) -> None:
        self.release = threading.Event()

    def read(self, timeout: float | None = None):
        self.release.wait()
        from edge_runtime.sources import EndOfSource

        raise EndOfSource

    def close(self) -> None:
        pass


def test_a_stuck_pipeline_stops_the_watchdog_pings(models_dir: Path, profile, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    sock, got = listen(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    src = Stuck()
    agent = Agent([Pipeline("d", OnnxEngine(models_dir / "digits_mlp.onnx", profile), src)], status_interval_s=0)
    agent.stall_s = 1.5
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        early = sum(m == "WATCHDOG=1" for m in got)
        time.sleep(2.5)  # past stall_s: no sign of life from the pipeline thread
        assert agent.stalled() == ["d"]
        n = sum(m == "WATCHDOG=1" for m in got)
        time.sleep(1.5)
        assert early >= 1 and sum(m == "WATCHDOG=1" for m in got) == n  # the pings stopped
    finally:
        src.release.set()
        t.join(10)
        sock.close()
    assert agent.stalled() == []  # it ended: nothing is stalled

"""systemd integration: the notify protocol against real datagram sockets, the unit file, install.sh."""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime import sdnotify
from edge_runtime.sdnotify import Notifier, watchdog_interval_s

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "devices" / "systemd" / "edge-runtime.service"
INSTALL = ROOT / "devices" / "install.sh"


def test_public_surface() -> None:
    assert sdnotify.__all__ == ["Notifier", "watchdog_interval_s"]


# ---------------------------------------------------------------- notifier


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound AF_UNIX datagram socket standing in for systemd, and its $NOTIFY_SOCKET spelling."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(2.0)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        spec = path
    else:
        name = f"edge-runtime-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        spec = "@" + name
    try:
        yield spec, sock
    finally:
        sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages_reach_the_socket(notify_socket: tuple[str, socket.socket]) -> None:
    spec, sock = notify_socket
    with Notifier({"NOTIFY_SOCKET": spec}) as n:
        assert n.enabled
        assert n.ready()
        assert recv(sock) == "READY=1"
        assert n.ready(status="serving 2 pipelines")
        assert recv(sock) == "READY=1\nSTATUS=serving 2 pipelines"
        assert n.status("digits 41.2/s\np99 3 ms")
        assert recv(sock) == "STATUS=digits 41.2/s p99 3 ms"  # a newline would start a bogus field
        assert n.watchdog()
        assert recv(sock) == "WATCHDOG=1"
        assert n.extend_timeout(20_000_000)
        assert recv(sock) == "EXTEND_TIMEOUT_USEC=20000000"
        assert n.stopping()
        assert recv(sock) == "STOPPING=1"
        assert n.sent == 6 and n.failed == 0


def test_extend_timeout_rejects_a_bad_argument() -> None:
    n = Notifier({})
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="positive number of microseconds"):
            n.extend_timeout(bad)  # type: ignore[arg-type]


def test_no_op_without_notify_socket() -> None:
    n = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not n.enabled
    assert n.ping_interval_s is None  # a watchdog without a socket to ping is ignored
    assert not n.ready("x") and not n.watchdog() and not n.status("x") and not n.stopping()
    assert not n.tick(100.0)
    assert n.sent == 0 and n.failed == 0


def test_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled


def test_unsupported_socket_kind_is_disabled(caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled and not n.ready()
    assert "neither a path nor an abstract" in caplog.text


def test_send_errors_are_logged_once_and_never_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert not n.ready()
    assert not n.watchdog()
    assert not n.status("x")
    assert n.failed == 3 and n.sent == 0
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    n.close()


def test_tick_pings_at_half_the_watchdog_interval(notify_socket: tuple[str, socket.socket]) -> None:
    spec, sock = notify_socket
    n = Notifier({"NOTIFY_SOCKET": spec, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    assert n.ping_interval_s == 15.0
    sent = [t for t in (0.0, 0.5, 14.9, 15.0, 15.5, 29.9, 30.0, 31.0) if n.tick(1000.0 + t)]
    assert sent == [0.0, 15.0, 30.0]
    assert [recv(sock) for _ in sent] == ["WATCHDOG=1"] * 3
    n.close()


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": " 500000 "}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),  # inherited from a watched parent
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-1"}, None),
    ({"WATCHDOG_USEC": "30s"}, None),
    ({"WATCHDOG_USEC": ""}, None),
])
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval_s(env, pid=4242) == expected


def test_watchdog_pid_defaults_to_ours() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None


def test_watchdog_pid_mismatch_means_no_pings(notify_socket: tuple[str, socket.socket]) -> None:
    spec, _ = notify_socket
    n = Notifier({"NOTIFY_SOCKET": spec, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=4242)
    assert n.ping_interval_s is None
    assert not n.tick(0.0)
    n.close()


# ---------------------------------------------------------------- unit file


def read_unit(path: Path) -> configparser.ConfigParser:
    """systemd's ini dialect is close enough to configparser's once keys stay case-sensitive and a key may
    repeat (the later value wins here, which is all these checks need)."""
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",), comment_prefixes=("#", ";"),
                                   empty_lines_in_values=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(path, encoding="utf-8")
    return cp


def test_unit_has_the_required_settings() -> None:
    u = read_unit(UNIT)
    svc = u["Service"]
    expected = {
        "Type": "notify", "NotifyAccess": "main", "WatchdogSec": "30", "Restart": "on-failure", "RestartSec": "5",
        "User": "edge-runtime", "Group": "edge-runtime", "SupplementaryGroups": "video",
        "ExecStart": "/opt/edge-runtime/venv/bin/edge-runtime run --config /etc/edge-runtime/agent.toml",
        "StateDirectory": "edge-runtime", "ReadWritePaths": "/var/lib/edge-runtime",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "MemoryMax": "512M", "StandardOutput": "journal",
    }
    assert {k: svc.get(k) for k in expected} == expected
    assert "Environment=EDGE_RUNTIME_STATE_DIR=/var/lib/edge-runtime" in UNIT.read_text().splitlines()
    assert u["Install"]["WantedBy"] == "multi-user.target"
    # Device access is an opt-in example: an active DeviceAllow= would close every other device.
    assert "#DeviceAllow=char-video4linux rw" in UNIT.read_text()
    assert "DeviceAllow" not in svc


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart's binary exists; /opt/edge-runtime is not installed on a test machine, so
    # a copy runs /bin/true instead and every other line is checked as written.
    text = UNIT.read_text().replace("ExecStart=/opt/edge-runtime/venv/bin/edge-runtime ", "ExecStart=/bin/true ")
    assert text != UNIT.read_text()
    unit = tmp_path / UNIT.name
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=30, check=False)
    # Unknown keys and bad values are warnings on stderr with rc 0, so both must be clean for this unit.
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if UNIT.name in line]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert complaints == []


# ---------------------------------------------------------------- install.sh


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=30, check=False)


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under root with its content hash, mode and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[p.relative_to(root).as_posix()] = (digest, st.st_mode, st.st_mtime_ns)
    return out


def test_install_is_idempotent_and_uninstall_keeps_config_and_state(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = install("--prefix", str(root), "--no-venv", "--no-enable")
    assert first.returncode == 0, first.stderr
    assert "not creating the system user" in first.stdout
    unit = root / "etc/systemd/system/edge-runtime.service"
    config = root / "etc/edge-runtime/agent.toml"
    assert unit.read_bytes() == UNIT.read_bytes()
    assert config.is_file()
    for d in ("etc/edge-runtime/keys", "var/lib/edge-runtime", "opt/edge-runtime"):
        assert (root / d).is_dir(), d
    assert "useradd --system" in (root / "opt/edge-runtime/INSTALL-NOTES").read_text()
    assert not (root / "opt/edge-runtime/venv").exists()
    before = snapshot(root)

    second = install("--prefix", str(root), "--no-venv", "--no-enable")
    assert second.returncode == 0, second.stderr
    assert "nothing changed" in second.stdout
    assert snapshot(root) == before

    config.write_text("# mine\n")
    third = install("--prefix", str(root), "--no-venv", "--no-enable")
    assert "kept the existing" in third.stdout and "nothing changed" in third.stdout
    assert config.read_text() == "# mine\n"

    gone = install("--prefix", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not unit.exists()
    assert not (root / "opt/edge-runtime").exists()
    assert config.read_text() == "# mine\n"
    assert (root / "var/lib/edge-runtime").is_dir()
    assert "kept" in gone.stdout
    again = install("--prefix", str(root), "--uninstall")
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_install_writes_a_placeholder_without_an_example(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "devices/systemd").mkdir(parents=True)
    shutil.copy(UNIT, src / "devices/systemd")
    root = tmp_path / "root"
    root.mkdir()
    proc = install("--prefix", str(root), "--source", str(src), "--no-venv", "--no-enable")
    assert proc.returncode == 0, proc.stderr
    assert "placeholder" in proc.stdout
    assert (root / "etc/edge-runtime/agent.toml").read_text().startswith("# edge-runtime agent configuration")


@pytest.mark.parametrize("args", [["--bogus"], ["--prefix"], ["--prefix", "/nonexistent/edge-runtime-test"],
                                  ["--extras", "vision;rm"]])
def test_install_rejects_bad_arguments(args: list[str]) -> None:
    proc = install(*args)
    assert proc.returncode == 2
    assert "install.sh:" in proc.stderr

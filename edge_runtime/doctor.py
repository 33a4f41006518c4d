"""`edge-runtime doctor`: check that this machine can run the agent, and say what is wrong in words.

Each check is a small function that returns one or more :class:`Check` values; :func:`run_checks` runs
them one by one and turns a check that raises into a "fail" row, so one broken probe never hides the
others. What the checks read from the machine (free space, the clock, /proc/cpuinfo, thermal zones,
onnxruntime's providers) goes through :class:`Probes`, so tests can give them any value. The pure
parts (cpuinfo parsing, thresholds, the table) do no I/O.

Nothing heavy is imported here: package versions come from the installed distributions' metadata,
onnxruntime's providers from a child interpreter (an onnxruntime that dies on import, as 1.21.0 does
with SIGILL on a Pi 4, then fails one row instead of the doctor), paho-mqtt only when a broker is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["VERDICTS", "Check", "Probes", "add_parser", "cmd_doctor", "cpu_check", "cpu_features",
           "disk_check", "exit_code", "format_table", "run_checks"]

log = logging.getLogger(__name__)

VERDICTS = ("ok", "warn", "fail", "skip")

DISK_WARN_BYTES = 1_000_000_000  # 1 GB: an outbox, a few bundles and their rollbacks
DISK_FAIL_BYTES = 100_000_000  # 100 MB: one model bundle may not fit
HOT_C = 80.0  # a Pi starts throttling at 80-85 C
MIN_YEAR = 2024  # a clock before this was never set (no RTC, no NTP yet)
ORT_BAD = {"1.21.0": "onnxruntime 1.21.0 dies with SIGILL on import on a Raspberry Pi 4 "
                     "(upstream issue 23957): install 1.22 or later"}


@dataclass(frozen=True)
class Check:
    """One row of the report: what was checked, the verdict, and a sentence a person can act on."""

    name: str
    verdict: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, got {self.verdict!r} "
                             f"({type(self.verdict).__name__}) for check {self.name!r}")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "verdict": self.verdict, "detail": self.detail}


# -- probes: everything read from the machine -------------------------------------------------------

def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def _read_cpuinfo() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None


def _temperatures() -> dict[str, float]:
    from edge_runtime.sysinfo import temperatures_c

    return temperatures_c()


_PROVIDERS_CODE = ("import json\nfrom edge_runtime.adapters.onnx_engine import available_providers\n"
                   "print(json.dumps(available_providers()))")


def _ort_providers(timeout_s: float) -> list[str]:
    """onnxruntime's compiled-in providers, asked of a child interpreter; raises RuntimeError with the
    reason when the child dies (a signal), fails or hangs."""
    try:
        proc = subprocess.run([sys.executable, "-c", _PROVIDERS_CODE], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"importing onnxruntime took more than {timeout_s:.0f} s") from e
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise RuntimeError(f"importing onnxruntime killed the interpreter with {sig}")
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no error output"])[-1]
        raise RuntimeError(f"importing onnxruntime failed: {last}")
    return [str(p) for p in json.loads(proc.stdout)]


def _python_version() -> tuple[int, ...]:
    return tuple(sys.version_info[:3])


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Probes:
    """What the checks read from the machine; replace any of them to test a check on chosen values."""

    free_bytes: Callable[[Path], int] = _free_bytes
    now: Callable[[], datetime] = _now
    cpuinfo: Callable[[], str | None] = _read_cpuinfo
    machine: Callable[[], str] = platform.machine
    temperatures: Callable[[], dict[str, float]] = _temperatures
    providers: Callable[[float], list[str]] = _ort_providers
    python_version: Callable[[], tuple[int, ...]] = _python_version


# -- pure parts ---------------------------------------------------------------------------------------

def _vtuple(v: str) -> tuple[int, ...]:
    """The leading numeric parts of a version string: "4.10.0.84" -> (4, 10, 0, 84), "2.0rc1" -> (2, 0)."""
    out = []
    for part in v.split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if len(digits) != len(part):
            break
    return tuple(out)


def cpu_features(cpuinfo: str) -> set[str]:
    """Every CPU flag named on a ``flags`` (x86) or ``Features`` (Arm) line of /proc/cpuinfo."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(value.split())
    return found


def cpu_check(cpuinfo: str | None, machine: str = "") -> Check:
    """What the CPU's SIMD features mean for int8 inference (onnxruntime's MLAS kernels)."""
    if cpuinfo is None:
        return Check("cpu", "skip", "no /proc/cpuinfo to read CPU features from")
    f = cpu_features(cpuinfo)
    if not f:
        return Check("cpu", "skip", f"/proc/cpuinfo lists no flags or Features ({machine or 'unknown CPU'})")
    measure = "measure with `edge-runtime quantize`"
    arm = machine in ("aarch64", "arm64", "armv7l", "armv8l")
    # Under qemu-user, /proc/cpuinfo is the host's: on an Arm machine, x86 flags mean nothing.
    x86 = not arm and (bool(f & {"sse2", "avx", "avx2"}) or machine in ("x86_64", "amd64", "i686"))
    if x86:
        if f & {"avx512_vnni", "avx_vnni", "avx512vnni"}:
            kind = "AVX512-VNNI" if f & {"avx512_vnni", "avx512vnni"} else "AVX-VNNI"
            return Check("cpu", "ok", f"{kind}: int8 matmuls fast")
        if "avx2" in f:
            return Check("cpu", "ok", f"AVX2, no VNNI: int8 runs, often but not always faster than fp32; {measure}")
        return Check("cpu", "warn", f"no AVX2: slow kernels for fp32 and int8 alike; {measure}")
    if "asimd" in f or "neon" in f:
        extra = ", i8mm" if "i8mm" in f else ""
        if "asimddp" in f:
            return Check("cpu", "ok", f"NEON + dot product (asimddp{extra}): int8 matmuls fast")
        return Check("cpu", "ok", f"NEON, no dot-product instructions: int8 may not beat fp32; {measure}")
    if arm:
        return Check("cpu", "warn", f"{machine}, but /proc/cpuinfo lists no NEON/asimd (emulated? it may be the "
                     "host's): measure with `edge-runtime bench`")
    return Check("cpu", "warn", f"no NEON/asimd or AVX2 found ({machine or 'unknown CPU'}): expect slow inference")


def disk_check(free: int, where: str) -> Check:
    gb = free / 1e9
    text = f"{gb:.2f} GB free in {where}" if gb >= 1 else f"{free / 1e6:.0f} MB free in {where}"
    if free < DISK_FAIL_BYTES:
        return Check("disk", "fail", f"{text}: below 100 MB, bundles and the outbox will not fit")
    if free < DISK_WARN_BYTES:
        return Check("disk", "warn", f"{text}: below 1 GB, the outbox and bundle rollbacks may run out")
    return Check("disk", "ok", text)


def clock_check(now: datetime) -> Check:
    stamp = now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    if now.year < MIN_YEAR:
        return Check("clock", "warn", f"system clock reads {stamp}: looks unset (no RTC and no NTP yet?); "
                     "TLS certificates and bundle expiry checks will be wrong until it is set")
    return Check("clock", "ok", stamp)


def thermal_check(temps: dict[str, float]) -> Check:
    if not temps:
        return Check("thermal", "skip", "no thermal zones (VM/container)")
    text = ", ".join(f"{k} {v:.1f} C" for k, v in sorted(temps.items(), key=lambda kv: -kv[1]))
    hot = [k for k, v in temps.items() if v >= HOT_C]
    if hot:
        return Check("thermal", "warn", f"{text}: {', '.join(sorted(hot))} at or above {HOT_C:.0f} C, "
                     "expect throttling (cooling? case?)")
    return Check("thermal", "ok", text)


def providers_check(requested: Sequence[str], available: Sequence[str], *, strict: bool, profile: str) -> Check:
    missing = [p for p in requested if p not in available]
    have = ", ".join(available) or "none"
    if not missing:
        return Check("providers", "ok", f"profile {profile} wants {', '.join(requested)}; installed: {have}")
    text = f"profile {profile} wants {', '.join(missing)}, not in this onnxruntime (installed: {have})"
    if strict:
        return Check("providers", "fail", f"{text}; strict_providers is set, so the agent will refuse to start")
    return Check("providers", "warn", f"{text}; onnxruntime falls back to the others")


# -- package versions ---------------------------------------------------------------------------------

def _dist_version(*names: str) -> tuple[str, str] | None:
    for n in names:
        try:
            return n, metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def package_checks(machine: str) -> list[Check]:
    out: list[Check] = []
    found = _dist_version("edge-runtime")
    if found:
        out.append(Check("edge-runtime", "ok", found[1]))
    else:
        from edge_runtime import __version__

        out.append(Check("edge-runtime", "warn", f"{__version__}, run from a source tree (not pip-installed)"))

    found = _dist_version("numpy")
    if not found:
        out.append(Check("numpy", "fail", "not installed: the agent needs numpy >= 1.24"))
    elif _vtuple(found[1]) < (1, 24):
        out.append(Check("numpy", "fail", f"{found[1]}: the agent needs >= 1.24"))
    else:
        out.append(Check("numpy", "ok", found[1]))

    found = _dist_version("onnxruntime", "onnxruntime-gpu")
    if not found:
        out.append(Check("onnxruntime", "fail", "not installed: needed to run models "
                         "(pip install onnxruntime; on a Jetson, NVIDIA's onnxruntime-gpu wheel)"))
    else:
        dist, v = found
        label = v if dist == "onnxruntime" else f"{v} ({dist})"
        if v in ORT_BAD and machine in ("aarch64", "arm64", "armv7l"):
            out.append(Check("onnxruntime", "fail", f"{label}: {ORT_BAD[v]}"))
        elif v in ORT_BAD:
            out.append(Check("onnxruntime", "warn", f"{label}: excluded by edge-runtime's requirements "
                             "(SIGILL on a Raspberry Pi 4); fine on this CPU, but do not ship it to a Pi"))
        elif _vtuple(v) < (1, 17):
            out.append(Check("onnxruntime", "fail", f"{label}: edge-runtime needs >= 1.17"))
        else:
            out.append(Check("onnxruntime", "ok", label))

    found = _dist_version("paho-mqtt")
    if not found:
        out.append(Check("paho-mqtt", "fail", "not installed: syncing to the cloud needs paho-mqtt >= 2"))
    elif _vtuple(found[1]) < (2,):
        out.append(Check("paho-mqtt", "fail", f"{found[1]}: the v1 API (Debian's python3-paho-mqtt); "
                         "pip install 'paho-mqtt>=2,<3'"))
    elif _vtuple(found[1]) >= (3,):
        out.append(Check("paho-mqtt", "warn", f"{found[1]}: edge-runtime is tested with 2.x"))
    else:
        out.append(Check("paho-mqtt", "ok", found[1]))

    found = _dist_version("opencv-python-headless", "opencv-python", "opencv-contrib-python-headless",
                          "opencv-contrib-python")
    if found:
        v = found[1]
        if _vtuple(v) >= (5,):
            out.append(Check("opencv", "warn", f"{v} ({found[0]}): edge-runtime uses the 4.x API; pin '<5'"))
        else:
            out.append(Check("opencv", "ok", f"{v} ({found[0]})"))
    else:
        out.append(Check("opencv", "skip", "not installed: camera and video sources need it "
                         "(pip install 'edge-runtime[vision]')"))

    found = _dist_version("PyNaCl")
    if found:
        out.append(Check("pynacl", "ok", found[1]))
    else:
        out.append(Check("pynacl", "warn", "not installed: bundle signatures cannot be verified, so rollouts and "
                         "`bundle verify` will not work (pip install 'edge-runtime[signing]')"))

    found = _dist_version("onnx")
    if found:
        out.append(Check("onnx", "ok", found[1]))
    else:
        out.append(Check("onnx", "skip", "not installed: `edge-runtime quantize` and the onnx checker in bundle "
                         "verification need it (pip install 'edge-runtime[models]')"))
    return out


# -- checks that touch the outside ------------------------------------------------------------------

def _state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    return Path(state_dir or os.environ.get("EDGE_RUNTIME_STATE_DIR") or ".").expanduser().resolve()


def _disk(state_dir: Path, probes: Probes) -> Check:
    where = state_dir
    while not where.exists() and where != where.parent:  # not created yet: the filesystem it will live on
        where = where.parent
    check = disk_check(probes.free_bytes(where), str(state_dir))
    if where == state_dir and not os.access(state_dir, os.W_OK | os.X_OK):
        return Check("disk", "fail", f"{state_dir} is not writable by this user; {check.detail}")
    return check


def _broker(url: str, timeout_s: float) -> Check:
    try:
        from edge_runtime.adapters.mqtt_transport import BrokerConfig, MqttTransport
    except ImportError as e:
        return Check("broker", "fail", f"cannot load the MQTT adapter ({e}): is paho-mqtt >= 2 installed?")
    cfg = BrokerConfig.from_url(url, f"edge-runtime-doctor-{socket.gethostname()}-{os.getpid()}",
                                session_expiry_s=0)
    where = f"{cfg.host}:{cfg.port}"
    t0 = time.monotonic()
    try:
        socket.create_connection((cfg.host, cfg.port), timeout=timeout_s).close()
    except OSError as e:
        return Check("broker", "fail", f"cannot reach {where} over TCP within {timeout_s:g} s: {e}")
    tcp_ms = (time.monotonic() - t0) * 1000

    # A real MQTT CONNECT through the agent's own adapter; its log lines carry the broker's refusal reason.
    lines: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                lines.append(record.getMessage())

    tlog = logging.getLogger("edge_runtime.adapters.mqtt_transport")
    keep, propagate = _Keep(), tlog.propagate
    tlog.addHandler(keep)
    tlog.propagate = False
    transport = MqttTransport(cfg)
    try:
        transport.start()
        deadline = time.monotonic() + max(timeout_s - tcp_ms / 1000, 0.5)
        connected = False
        while not connected and not lines and time.monotonic() < deadline:  # a refusal ends the wait early
            connected = transport.wait_connected(0.05)
    finally:
        transport.stop(timeout=1.0)
        tlog.removeHandler(keep)
        tlog.propagate = propagate
    proto = "MQTT 5" if cfg.protocol == 5 else "MQTT 3.1.1"
    if connected:
        return Check("broker", "ok", f"{where}: {proto} CONNECT accepted{' over TLS' if cfg.tls else ''} "
                     f"(TCP {tcp_ms:.1f} ms)")
    why = lines[0] if lines else f"no CONNACK within {timeout_s:g} s"
    return Check("broker", "fail", f"{where} accepts TCP but not an {proto} CONNECT: {why}")


def _tls_file(path: str) -> Check:
    name = f"tls {Path(path).name}"
    p = Path(path)
    try:
        text = p.read_text(errors="replace")
    except OSError as e:
        return Check(name, "fail", f"cannot read {path}: {e.strerror or e}")
    if not text.strip():
        return Check(name, "fail", f"{path} is empty")
    if "PRIVATE KEY-----" in text:
        mode = p.stat().st_mode & 0o777
        if mode & 0o077:
            return Check(name, "warn", f"{path}: private key readable by group or others (mode {mode:o}); "
                         "chmod 600")
        return Check(name, "ok", f"{path}: private key, mode {mode:o}")
    if "-----BEGIN CERTIFICATE-----" in text:
        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as e:
            return Check(name, "fail", f"{path}: a PEM certificate that does not parse: {e}")
        count = text.count("-----BEGIN CERTIFICATE-----")
        return Check(name, "ok", f"{path}: {count} certificate{'s' if count > 1 else ''}")
    return Check(name, "warn", f"{path} is readable but holds no PEM certificate or private key")


def _bundle(bundle: str, keys: Sequence[str], profile: Any, now: datetime) -> Check:
    if not keys:
        return Check("bundle", "fail", "no public key to verify it with (--key, $EDGE_RUNTIME_PUBLIC_KEYS or "
                     "/etc/edge-runtime/keys/*.pub)")
    from edge_runtime.bundle import load_public_keys, verify_bundle
    from edge_runtime.errors import BundleError, EdgeRuntimeError

    with tempfile.TemporaryDirectory(prefix="edge-doctor-") as work:
        try:
            v = verify_bundle(bundle, load_public_keys(keys), profile=profile, now=now, smoke=False,
                              workdir=Path(work))
        except BundleError as e:
            return Check("bundle", "fail", f"{e.code}: {e}")
        except EdgeRuntimeError as e:
            return Check("bundle", "fail", str(e))
    n_files = len(v.manifest.get("files", {}))
    return Check("bundle", "ok", f"{v.manifest.get('name')} {v.manifest.get('version')} signed by {v.key_id}; "
                 f"{n_files} files match the manifest")


# -- running ------------------------------------------------------------------------------------------

def _guarded(name: str, fn: Callable[[], Check | Iterable[Check]]) -> list[Check]:
    try:
        got = fn()
    except Exception as e:
        log.debug("check %s raised", name, exc_info=True)
        return [Check(name, "fail", f"the check itself failed: {type(e).__name__}: {e}")]
    return [got] if isinstance(got, Check) else list(got)


def run_checks(*, profile_name: str | None = None, state_dir: str | os.PathLike[str] | None = None,
               broker: str | None = None, bundle: str | os.PathLike[str] | None = None,
               keys: Sequence[str | os.PathLike[str]] = (), tls_files: Sequence[str | os.PathLike[str]] = (),
               timeout_s: float = 3.0, probes: Probes | None = None) -> list[Check]:
    """Every check, in report order. Never raises for a failing check: it becomes a "fail" row."""
    pr = probes or Probes()
    checks: list[Check] = []
    machine = platform.machine()
    with contextlib.suppress(Exception):
        machine = pr.machine()

    def python() -> Check:
        v = pr.python_version()
        text = ".".join(map(str, v))
        if tuple(v[:2]) >= (3, 11):
            return Check("python", "ok", f"{text} ({sys.executable})")
        return Check("python", "fail", f"{text}: edge-runtime needs Python 3.11 or later")

    checks += _guarded("python", python)
    checks += _guarded("packages", lambda: package_checks(machine))

    prof: list[Any] = []

    def profile() -> Check:
        from edge_runtime.profiles import detect_profile, load_profile

        p = load_profile(profile_name) if profile_name else detect_profile()
        prof.append(p)
        how = "chosen" if profile_name else "detected"
        return Check("profile", "ok", f"{p.name} ({how}; {p.path})")

    checks += _guarded("profile", profile)

    def providers() -> Check:
        if not prof:
            return Check("providers", "skip", "no device profile to compare with")
        p = prof[0]
        avail = pr.providers(max(30.0, timeout_s))
        return providers_check(p.providers, avail, strict=p.strict_providers, profile=p.name)

    checks += _guarded("providers", providers)
    checks += _guarded("cpu", lambda: cpu_check(pr.cpuinfo(), machine))
    checks += _guarded("disk", lambda: _disk(_state_dir(state_dir), pr))
    checks += _guarded("clock", lambda: clock_check(pr.now()))
    checks += _guarded("broker", lambda: _broker(broker, timeout_s) if broker
                       else Check("broker", "skip", "no --broker given"))
    if tls_files:
        for f in tls_files:
            checks += _guarded(f"tls {Path(f).name}", lambda f=f: _tls_file(str(f)))
    else:
        checks.append(Check("tls", "skip", "no --tls-file given"))

    def bundle_check() -> Check:
        if not bundle:
            return Check("bundle", "skip", "no --bundle given")
        return _bundle(str(bundle), [str(k) for k in keys], prof[0] if prof else None, pr.now())

    checks += _guarded("bundle", bundle_check)
    checks += _guarded("thermal", lambda: thermal_check(pr.temperatures()))
    return checks


def overall(checks: Sequence[Check]) -> str:
    """The worst verdict: fail, then warn, else ok."""
    verdicts = {c.verdict for c in checks}
    return "fail" if "fail" in verdicts else "warn" if "warn" in verdicts else "ok"


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.verdict == "fail" for c in checks) else 0


def format_table(checks: Sequence[Check]) -> str:
    rows = [("CHECK", "VERDICT", "DETAIL")] + [(c.name, c.verdict.upper(), c.detail) for c in checks]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}".rstrip() for a, b, c in rows]
    counts = ", ".join(f"{sum(c.verdict == v for c in checks)} {v}" for v in VERDICTS)
    lines.append(f"verdict: {overall(checks).upper()} ({counts})")
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> dict[str, Any]:
    return {"verdict": overall(checks), "exit_code": exit_code(checks),
            "counts": {v: sum(c.verdict == v for c in checks) for v in VERDICTS},
            "checks": [c.to_dict() for c in checks]}


# -- command line -------------------------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``doctor`` to an ``add_subparsers()`` object; returns the new parser."""
    p = subparsers.add_parser(
        "doctor", help="check this machine: Python, packages, providers, CPU, disk, clock, broker, keys",
        description="Check that this machine can run the agent: Python and package versions, onnxruntime's "
                    "providers against the device profile, CPU features for int8, free disk, the clock, "
                    "the broker, TLS files, a bundle's signature and temperatures. Exits 1 when a check fails.",
    )
    p.add_argument("--profile", metavar="P",
                   help="device profile name or path to a .toml (default: detected from this machine)")
    p.add_argument("--state-dir", metavar="DIR", default=None,
                   help="where the agent keeps its state (default: $EDGE_RUNTIME_STATE_DIR, else the current "
                        "directory)")
    p.add_argument("--broker", metavar="URL", default=None,
                   help="connect to this MQTT broker (mqtt://host:1883, mqtts://...; also $EDGE_RUNTIME_BROKER)")
    p.add_argument("--bundle", metavar="PATH", help="check this bundle's signature and files (no smoke run)")
    p.add_argument("--key", action="append", default=[], metavar="PUB",
                   help="public key for --bundle (repeatable; also $EDGE_RUNTIME_PUBLIC_KEYS and "
                        "/etc/edge-runtime/keys/*.pub)")
    p.add_argument("--tls-file", action="append", default=[], metavar="PATH",
                   help="a CA, certificate or key file that must be readable (repeatable)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--timeout", type=float, default=3.0, metavar="S",
                   help="network timeout per check in seconds (default 3)")
    p.add_argument("--log-level", default=os.environ.get("EDGE_RUNTIME_LOG_LEVEL", "warning"),
                   choices=["debug", "info", "warning", "error"], help="default: warning")
    return p


def cmd_doctor(args: argparse.Namespace, probes: Probes | None = None) -> int:
    keys: list[str] = list(args.key)
    if args.bundle:
        from edge_runtime.cli import _public_key_paths

        keys = _public_key_paths(keys)
    checks = run_checks(profile_name=args.profile, state_dir=args.state_dir,
                        broker=args.broker or os.environ.get("EDGE_RUNTIME_BROKER"), bundle=args.bundle,
                        keys=keys, tls_files=args.tls_file, timeout_s=args.timeout, probes=probes)
    if args.json:
        print(json.dumps(to_json(checks), indent=2))
    else:
        print(format_table(checks))
    return exit_code(checks)

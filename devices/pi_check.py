"""`make pi-check`: install, import and serve the agent on aarch64 under qemu-user, without a Pi.

For each emulated CPU (Cortex-A72 as in a Raspberry Pi 4, Cortex-A76 as in a Pi 5) it runs Debian
bookworm's arm64 CPython 3.11 under ``qemu-aarch64-static -L SYSROOT -cpu ...`` with the project's
dependencies installed from PyPI's aarch64 wheels, and checks:

  import  numpy, onnxruntime (version and providers), paho-mqtt and the installed edge_runtime wheel
  bench   ``edge-runtime bench`` on the digits MLP (figures are emulated: they say nothing of Pi speed)
  run     ``edge-runtime run`` of the digits MLP and the CNN over the first rows of their test sets
          (npy sources); exit 0, and labels and scores equal to the same run on this x86 host
  tests   the agent's pure-core tests (they import only edge_runtime.core, numpy and hypothesis),
          against the installed wheel

Everything it fetches stays under build/pi-check/ (git-ignored), so a second run needs no network:
  apt/      a private apt state (arm64 package lists and .debs); the host's apt configuration is not
            touched, only its mirror address and keyring are read
  sysroot/  the .debs extracted with ``dpkg-deb -x``
  wheels/   the aarch64 wheels; site/ holds them installed with ``pip --target``
  project/  this tree's wheel, rebuilt and reinstalled every run (its build backend is kept in
            build-deps/, so the build needs no network either)
  bin/CPU/python3  the emulated interpreter as one command (usable by hand after a run)
  logs/     one log per step; a failing step's tail is printed

Only qemu-user-static comes from the host's apt (installed when run as root). Exit status: 0 when every
step passed on every CPU, 1 when one failed, 2 for a usage or host-setup problem.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QEMU = "qemu-aarch64-static"

# Emulated CPU -> the device profile it stands for (devices/<profile>.toml).
CPUS = {"cortex-a72": "rpi4", "cortex-a76": "rpi5"}

# Debian's arm64 CPython 3.11 and the shared libraries numpy and onnxruntime's wheels link against;
# apt resolves the rest of the closure (libc6, libssl3, libffi8, libexpat1, ...).
SUITE = "bookworm"
DEBS = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1", "zlib1g", "libffi8",
        "libssl3", "libexpat1")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# bookworm's glibc is 2.36. pip 23 does not widen a --platform manylinux tag to older glibc versions,
# so the tags wheels actually carry are named too.
PLATFORMS = ("manylinux_2_36_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64")
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis")

# Test modules that import only edge_runtime.core, edge_runtime.errors, numpy and hypothesis and need no
# model built by scikit-learn; about two minutes per CPU under emulation on a 2-core x86 host.
DEFAULT_TESTS = ("tests/test_stats.py", "tests/test_histogram.py", "tests/test_validation.py",
                 "tests/test_rollout_core.py", "tests/test_protocol.py")
# Three Hypothesis properties of the pure-Python codec that take two minutes per CPU between them;
# `--full-tests` keeps them (the host's `make test` always runs them).
SLOW_TESTS = ("test_pack_batches_respects_the_cap_and_keeps_every_record_in_order",
              "test_every_message_type_round_trips",
              "test_valid_messages_with_one_value_changed_give_a_message_or_a_protocol_error")

# (pipeline name, model file, test inputs); run under emulation and on the host, predictions compared.
RUN_MODELS = (("digits", "digits_mlp.onnx", "digits_mlp.test_x.npy"), ("cnn", "cnn.onnx", "cnn.test_x.npy"))
SCORE_TOLERANCE = 1e-3

TIMEOUTS = {"import": 300, "bench": 300, "run": 900, "tests": 1800}

IMPORT_PROBE = """\
import json, platform, sys
import numpy, onnxruntime, paho.mqtt, edge_runtime
try:
    from numpy._core._multiarray_umath import __cpu_features__ as feats
except ImportError:
    feats = {}
print(json.dumps({
    "machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__,
    "numpy_cpu_features": sorted(k for k, v in feats.items() if v),
    "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers(),
    "paho_mqtt": paho.mqtt.__version__, "edge_runtime": edge_runtime.__version__,
    "edge_runtime_path": edge_runtime.__file__,
}))
"""

WRAPPER = """\
#!/bin/sh
# Debian {suite} arm64 CPython 3.11 under qemu-user as a {cpu}, with the pi-check site on its path.
# Written by devices/pi_check.py; `make pi-check` rewrites it. qemu's -0 makes this script the
# interpreter's argv[0], so sys.executable (and every interpreter the tests start) comes through here.
#
# onnxruntime >= 1.28 reads the host's CPU-cache files (/sys/devices/system/cpu/cpu*/cache) at import
# and can crash under qemu: the interpreter runs in a private mount namespace with an empty tmpfs over
# each of those directories. Child interpreters (sys.executable is this script) are already inside.
if [ "${{PI_CHECK_NS:-}}" != {cpu_q} ]; then
    exec unshare {unshare_user}--mount --propagation private /bin/sh -c '
        for d in /sys/devices/system/cpu/cpu*/cache; do
            [ -d "$d" ] || continue
            mount -t tmpfs -o size=4k,mode=0555 pi-check "$d" || exit 125
        done
        PI_CHECK_NS={cpu_q} exec "$0" "$@"' "$0" "$@"
fi
PYTHONHOME={sysroot_q}/usr
PYTHONPATH={pythonpath_q}
PYTHONPYCACHEPREFIX={pycache_q}
PYTHONNOUSERSITE=1
export PYTHONHOME PYTHONPATH PYTHONPYCACHEPREFIX PYTHONNOUSERSITE
exec {qemu_q} -L {sysroot_q} -cpu {cpu_q} -0 "$0" {sysroot_q}/usr/bin/python3.11 "$@"
"""


class SetupError(Exception):
    """The host cannot run the check (missing tool, failed download); exit status 2."""


# ---------------------------------------------------------------- pure helpers (tested on the host)


def requirements(pyproject: Path) -> list[str]:
    """The core dependencies of pyproject.toml as written (so `!=1.21.0` holds) plus the test tools."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    dev = project.get("optional-dependencies", {}).get("dev", [])
    for tool in TEST_TOOLS:
        spec = next((d for d in dev if _req_name(d) == tool), tool)
        reqs.append(spec)
    return reqs


def _req_name(spec: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9._-]+)", spec)
    return m.group(1).lower().replace("_", "-") if m else ""


def pip_platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for tag in PLATFORMS:
        args += ["--platform", tag]
    return args


def host_mirror(texts: Sequence[str]) -> str:
    """The Debian mirror the host's apt sources use (deb822 or one-line style), else deb.debian.org."""
    for text in texts:
        for raw in text.splitlines():
            line = raw.strip()
            if line.startswith("#"):
                continue
            if line.startswith("URIs:"):
                uris = line.split()[1:]
            elif line.startswith("deb "):
                uris = [w for w in line.split()[1:] if not w.startswith("[")][:1]
            else:
                continue
            for uri in uris:
                if uri.rstrip("/").endswith("/debian") and "security" not in uri:
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def sources_deb822(mirror: str, security: str, suite: str) -> str:
    return (f"Types: deb\nURIs: {mirror}\nSuites: {suite} {suite}-updates\nComponents: main\n"
            f"Architectures: arm64\nSigned-By: {KEYRING}\n\n"
            f"Types: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
            f"Architectures: arm64\nSigned-By: {KEYRING}\n")


def debs_from_simulation(output: str) -> list[str]:
    """The .deb file names apt will fetch, from `apt-get install -s` lines such as
    'Inst libc6 (2.36-9+deb12u10 Debian:12.11/stable [arm64])' (an epoch's ':' is '%3a' in file names)."""
    names = []
    for m in re.finditer(r"^Inst (\S+) (?:\[[^]]*\] )?\((\S+) .*\[(\w+)\]\)", output, re.MULTILINE):
        pkg, version, arch = m.groups()
        names.append(f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb")
    return names


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's last summary line ('331 passed, 3 deselected in 210.1s')."""
    for line in reversed(output.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", line)
        if found and " in " in line:
            return {("errors" if kind == "error" else kind): int(n) for n, kind in found}
    return {}


def read_predictions(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{pipeline: [(label, score), ...]} from `edge-runtime run --predictions`, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["pipeline"], []).append((rec["label"], float(rec["score"])))
    return out


def compare_predictions(got: dict[str, list[tuple[int, float]]], want: dict[str, list[tuple[int, float]]],
                        n: int) -> list[str]:
    """Problems found comparing emulated predictions with the host's; empty when they agree."""
    problems = []
    for name in sorted(want):
        g, w = got.get(name, []), want[name]
        if len(g) != n or len(w) != n:
            problems.append(f"{name}: {len(g)} predictions under emulation, {len(w)} on the host, {n} asked")
            continue
        labels = sum(a[0] == b[0] for a, b in zip(g, w, strict=True))
        worst = max(abs(a[1] - b[1]) for a, b in zip(g, w, strict=True))
        if labels != n:
            problems.append(f"{name}: {labels}/{n} labels agree with the host")
        elif worst > SCORE_TOLERANCE:
            problems.append(f"{name}: scores differ from the host's by up to {worst:.2g}")
    return problems


def render_wrapper(*, cpu: str, sysroot: Path, pythonpath: Sequence[Path], pycache: Path, qemu: str,
                   as_root: bool) -> str:
    q = shlex.quote
    return WRAPPER.format(suite=SUITE, cpu=cpu, cpu_q=q(cpu), sysroot_q=q(str(sysroot)),
                          pythonpath_q=q(":".join(str(p) for p in pythonpath)), pycache_q=q(str(pycache)),
                          qemu_q=q(qemu), unshare_user="" if as_root else "--map-root-user ")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


# ---------------------------------------------------------------- running things


class Console:
    """Progress lines with the time since start; one lock so parallel CPUs do not interleave."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.lock = threading.Lock()

    def say(self, msg: str) -> None:
        t = time.monotonic() - self.start
        with self.lock:
            print(f"[pi-check {int(t // 60)}:{int(t % 60):02d}] {msg}", flush=True)


# Set on Ctrl-C: the running steps kill their process groups and no further step starts.
STOP = threading.Event()


def run_logged(cmd: Sequence[str], log: Path, *, console: Console, label: str, timeout: float,
               cwd: Path | None = None, env: dict[str, str] | None = None,
               progress: Callable[[Path], str] | None = None) -> tuple[int, str]:
    """Run cmd with stdout+stderr to log and a heartbeat line every 30 s. It runs in its own process
    group (an emulated pytest starts child interpreters), killed whole on timeout or interruption."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True)
        start = time.monotonic()
        next_beat = start + 30
        try:
            while True:
                try:
                    rc = proc.wait(timeout=1)
                    break
                except subprocess.TimeoutExpired:
                    now = time.monotonic()
                    if STOP.is_set():
                        raise KeyboardInterrupt from None
                    if now - start > timeout:
                        _kill_group(proc)
                        out.write(f"\npi-check: killed after {timeout:.0f} s\n")
                        rc = 124
                        break
                    if now >= next_beat:
                        extra = progress(log) if progress else ""
                        console.say(f"{label}: still running ({fmt_s(now - start)}){extra}")
                        next_beat = now + 30
        except BaseException:
            _kill_group(proc)
            raise
    return rc, log.read_text(encoding="utf-8", errors="replace")


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)
    proc.wait()


def pytest_progress(log: Path) -> str:
    pcts = re.findall(r"\[\s*(\d+)%\]", log.read_text(encoding="utf-8", errors="replace"))
    return f", {pcts[-1]}% of the tests done" if pcts else ""


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines()[-lines:])


@dataclass
class Step:
    name: str
    status: str = "SKIP"        # PASS, FAIL or SKIP
    seconds: float = 0.0
    detail: str = ""


@dataclass
class CpuResult:
    cpu: str
    profile: str
    steps: list[Step] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status == "PASS" for s in self.steps)


@dataclass
class Plan:
    cpus: list[str]
    tests: list[str]
    deselect_slow: bool
    bench_seconds: float
    inputs: int
    jobs: int
    work: Path
    models: Path
    refresh: bool
    dry_run: bool = False


class Checker:
    def __init__(self, plan: Plan, console: Console) -> None:
        self.plan = plan
        self.console = console
        self.work = plan.work
        self.apt = self.work / "apt"
        self.sysroot = self.work / "sysroot"
        self.wheels = self.work / "wheels"
        self.site = self.work / "site"
        self.project = self.work / "project"
        self.logs = self.work / "logs"
        self.as_root = os.geteuid() == 0
        self.qemu = ""
        self.host_predictions: dict[str, list[tuple[int, float]]] = {}
        self.versions: dict[str, str] = {}

    # -- host set-up

    def say(self, msg: str) -> None:
        self.console.say(msg)

    def host_cmd(self, cmd: Sequence[str], log_name: str, label: str, timeout: float = 900,
                 cwd: Path | None = None) -> str:
        rc, out = run_logged(cmd, self.logs / log_name, console=self.console, label=label, timeout=timeout,
                             cwd=cwd)
        if rc != 0:
            raise SetupError(f"{label} failed (exit {rc}); log {self.logs / log_name}:\n{tail(out)}")
        return out

    def ensure_qemu(self) -> None:
        found = shutil.which(QEMU)
        if not found:
            if not self.as_root:
                raise SetupError(f"{QEMU} is missing: run 'sudo apt-get install qemu-user-static' "
                                 "(Debian's package; pi-check installs it itself when run as root)")
            self.say("installing Debian's qemu-user-static (apt-get) ...")
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            for cmd in (["apt-get", "update", "-qq"],
                        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-user-static"]):
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                if proc.returncode != 0:
                    raise SetupError(f"{shlex.join(cmd)} failed:\n{tail(proc.stdout + proc.stderr)}")
            found = shutil.which(QEMU)
            if not found:
                raise SetupError(f"qemu-user-static is installed but {QEMU} is not on PATH")
        self.qemu = found
        version = subprocess.run([found, "--version"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"version (\S+)", version)
        self.versions["qemu"] = m.group(1) if m else "?"
        known = subprocess.run([found, "-cpu", "help"], capture_output=True, text=True, check=False).stdout.split()
        missing = [c for c in self.plan.cpus if c not in known]
        if missing:
            raise SetupError(f"{QEMU} {self.versions['qemu']} does not emulate {', '.join(missing)}")
        for tool in ("unshare", "dpkg-deb", "apt-get"):
            if not shutil.which(tool):
                raise SetupError(f"{tool} is missing (Debian's util-linux, dpkg and apt provide them)")
        unshare = ["unshare"] + ([] if self.as_root else ["--map-root-user"]) + ["--mount", "true"]
        proc = subprocess.run(unshare, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SetupError("cannot create a mount namespace (needed to hide /sys CPU-cache files from "
                             f"onnxruntime under qemu): {shlex.join(unshare)}: {proc.stderr.strip()}; run as "
                             "root or enable unprivileged user namespaces")

    def apt_args(self) -> list[str]:
        a = self.apt
        opts = {
            "APT::Architecture": "arm64", "APT::Architectures::": "arm64",
            "Dir::Etc::SourceList": "/dev/null", "Dir::Etc::SourceParts": a / "sources.list.d",
            "Dir::Etc::Preferences": "/dev/null", "Dir::Etc::PreferencesParts": a / "preferences.d",
            "Dir::State": a, "Dir::State::Lists": a / "lists", "Dir::State::status": a / "status",
            "Dir::Cache": a / "cache", "Debug::NoLocking": "1", "Acquire::Languages": "none",
            "APT::Install-Recommends": "false",
        }
        if self.as_root:  # apt's _apt user cannot write into build/
            opts["APT::Sandbox::User"] = "root"
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def ensure_sysroot(self) -> None:
        mirror = os.environ.get("PI_CHECK_MIRROR") or host_mirror(self._apt_source_texts())
        security = os.environ.get("PI_CHECK_SECURITY_MIRROR") or DEFAULT_SECURITY_MIRROR
        want = {"suite": SUITE, "mirror": mirror, "security": security, "packages": sorted(DEBS)}
        stamp = self.sysroot / ".pi-check.json"
        cached = _read_json(stamp)
        if not self.plan.refresh and cached.get("config") == want:
            self.versions["python"] = cached.get("python", "python3.11")
            self.say(f"arm64 sysroot: cached ({self.versions['python']}, {len(cached.get('debs', []))} packages)")
            return
        for d in ("sources.list.d", "preferences.d", "lists/partial", "cache/archives/partial"):
            (self.apt / d).mkdir(parents=True, exist_ok=True)
        (self.apt / "status").touch()
        (self.apt / "sources.list.d" / "debian-arm64.sources").write_text(
            sources_deb822(mirror, security, SUITE), encoding="utf-8")
        self.say(f"arm64 package lists from {mirror} ({SUITE}; a private apt state in {self.apt}) ...")
        t = time.monotonic()
        self.host_cmd(["apt-get", *self.apt_args(), "update"], "apt-update.log", "apt-get update (arm64)")
        sim = self.host_cmd(["apt-get", *self.apt_args(), "install", "-s", *DEBS], "apt-resolve.log",
                            "apt-get install -s (arm64)")
        archives = self.apt / "cache" / "archives"
        debs = [archives / name for name in debs_from_simulation(sim)]
        if not debs:
            raise SetupError(f"apt resolved no packages; log {self.logs / 'apt-resolve.log'}")
        self.say(f"arm64 .debs: {', '.join(DEBS)} and their dependencies, {len(debs)} packages ...")
        self.host_cmd(["apt-get", *self.apt_args(), "install", "-y", "--download-only", *DEBS],
                      "apt-download.log", "apt-get install --download-only (arm64)")
        missing = [p.name for p in debs if not p.is_file()]
        if missing:
            raise SetupError(f"apt did not leave {', '.join(missing)} in {archives}")
        self.say(f"  {_mb(sum(p.stat().st_size for p in debs))} of .debs after {fmt_s(time.monotonic() - t)}; "
                 f"dpkg-deb -x into {self.sysroot}")
        if self.sysroot.exists():
            shutil.rmtree(self.sysroot)
        self.sysroot.mkdir(parents=True)
        for deb in debs:
            self.host_cmd(["dpkg-deb", "-x", str(deb), str(self.sysroot)], "dpkg-deb.log", f"dpkg-deb -x {deb.name}")
        # Empty site directories inside the sysroot: without them qemu's -L lookup falls through to the
        # host's /usr/lib/python3/dist-packages (x86 modules).
        for d in ("usr/lib/python3/dist-packages", "usr/local/lib/python3.11/dist-packages"):
            (self.sysroot / d).mkdir(parents=True, exist_ok=True)
        version = next((p.name.split("_")[1] for p in debs if p.name.startswith("python3.11-minimal_")), "?")
        self.versions["python"] = f"python3.11 {version}"
        stamp.write_text(json.dumps({"config": want, "python": self.versions["python"],
                                     "debs": sorted(p.name for p in debs)}, indent=1), encoding="utf-8")

    @staticmethod
    def _apt_source_texts() -> list[str]:
        paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources")),
                 *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
        return [p.read_text(encoding="utf-8", errors="replace") for p in paths if p.is_file()]

    def ensure_wheels(self) -> None:
        reqs = requirements(ROOT / "pyproject.toml")
        want = {"requirements": reqs, "platforms": list(PLATFORMS)}
        stamp = self.site / ".pi-check.json"
        if not self.plan.refresh and _read_json(stamp).get("config") == want:
            self.say(f"aarch64 wheels: cached ({', '.join(_read_json(stamp).get('installed', []))})")
            return
        pip = [sys.executable, "-m", "pip"]
        self.say(f"aarch64 wheels from PyPI: {' '.join(reqs)} ...")
        t = time.monotonic()
        self.wheels.mkdir(parents=True, exist_ok=True)
        self.host_cmd([*pip, "download", "--dest", str(self.wheels), *pip_platform_args(), *reqs],
                      "pip-download.log", "pip download (aarch64)")
        size = sum(p.stat().st_size for p in self.wheels.glob("*.whl"))
        self.say(f"  {_mb(size)} in {self.wheels} after {fmt_s(time.monotonic() - t)}; installing into {self.site}")
        if self.site.exists():
            shutil.rmtree(self.site)
        self.host_cmd([*pip, "install", "--no-index", "--find-links", str(self.wheels), "--target", str(self.site),
                       *pip_platform_args(), *reqs], "pip-install.log", "pip install --target (aarch64)")
        installed = sorted(p.name.removesuffix(".dist-info") for p in self.site.glob("*.dist-info"))
        stamp.write_text(json.dumps({"config": want, "installed": installed}, indent=1), encoding="utf-8")
        self.say(f"  {len(installed)} distributions, {_mb(_du(self.site))} installed")

    def install_project(self) -> None:
        """Build this tree's wheel offline (the build backend is cached too) and install it on its own."""
        backend = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]["requires"]
        build_deps = self.work / "build-deps"
        stamp = build_deps / ".pi-check.json"
        if self.plan.refresh or _read_json(stamp).get("config") != backend:
            self.say(f"build backend for the host: {' '.join(backend)} ...")
            build_deps.mkdir(parents=True, exist_ok=True)
            self.host_cmd([sys.executable, "-m", "pip", "download", "--dest", str(build_deps), *backend],
                          "pip-build-deps.log", "pip download (build backend)")
            stamp.write_text(json.dumps({"config": backend}), encoding="utf-8")
        dist = self.work / "dist"
        if dist.exists():
            shutil.rmtree(dist)
        self.say("edge-runtime wheel (pure Python, built here) ...")
        self.host_cmd([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--find-links", str(build_deps),
                       "--wheel-dir", str(dist), str(ROOT)], "project-wheel.log", "pip wheel (edge-runtime)")
        wheel = next(dist.glob("edge_runtime-*.whl"))
        if self.project.exists():
            shutil.rmtree(self.project)
        self.host_cmd([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                       str(self.project), str(wheel)], "project-install.log", "pip install --target (edge-runtime)")
        self.say(f"  {wheel.name} installed into {self.project}")

    def ensure_models(self) -> None:
        needed = [self.plan.models / f for _, model, data in RUN_MODELS for f in (model, data)]
        if all(p.is_file() for p in needed):
            return
        self.say(f"sample models missing: models/build_all.py --out {self.plan.models} ...")
        self.host_cmd([sys.executable, str(ROOT / "models" / "build_all.py"), "--out", str(self.plan.models)],
                      "build-models.log", "models/build_all.py")

    def run_args(self, profile: str, out: Path) -> list[str]:
        args = ["-m", "edge_runtime.cli", "run", "--profile", profile, "--no-sync", "--no-drift",
                "--max-inputs", str(self.plan.inputs), "--status-interval", "0",
                "--report-json", str(out / "report.json"), "--predictions", str(out / "predictions.jsonl")]
        for name, model, data in RUN_MODELS:
            args += ["--model", f"{name}={self.plan.models / model}", "--source", f"npy:{self.plan.models / data}"]
        return args

    def host_reference(self) -> None:
        out = self.work / "runs" / "host"
        out.mkdir(parents=True, exist_ok=True)
        self.say(f"host reference: edge-runtime run, {self.plan.inputs} inputs per model, on this machine ...")
        env = {**_clean_env(), "PYTHONPATH": str(ROOT)}
        rc, text = run_logged([sys.executable, *self.run_args("x86-generic", out)], self.logs / "host-run.log",
                              console=self.console, label="host run", timeout=300, cwd=out, env=env)
        if rc != 0:
            raise SetupError(f"the host reference run failed (exit {rc}; run pi-check with the project's venv "
                             f"python):\n{tail(text)}")
        self.host_predictions = read_predictions(out / "predictions.jsonl")

    def write_wrapper(self, cpu: str) -> Path:
        path = self.work / "bin" / cpu / "python3"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_wrapper(cpu=cpu, sysroot=self.sysroot, pythonpath=[self.project, self.site],
                                       pycache=self.work / "pycache", qemu=self.qemu, as_root=self.as_root),
                        encoding="utf-8")
        path.chmod(0o755)
        return path

    # -- per CPU

    def check_cpu(self, cpu: str) -> CpuResult:
        result = CpuResult(cpu, CPUS[cpu])
        python = self.write_wrapper(cpu)
        out = self.work / "runs" / cpu
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        env = _clean_env()
        steps: list[tuple[str, Callable[[Step], None]]] = [
            ("import", lambda s: self.step_import(s, python, out, env)),
            ("bench", lambda s: self.step_bench(s, python, out, env, result.profile)),
            ("run", lambda s: self.step_run(s, python, out, env, result.profile)),
        ]
        if self.plan.tests:
            steps.append(("tests", lambda s: self.step_tests(s, python, out, env)))
        for name, fn in steps:
            step = Step(name)
            result.steps.append(step)
            if STOP.is_set():
                step.detail = "not run: interrupted"
                continue
            if name != "import" and result.steps[0].status == "FAIL":
                step.detail = "not run: the import failed"
                continue
            self.say(f"{cpu}: {name} ...")
            t = time.monotonic()
            try:
                fn(step)
            except StepFailed as e:
                step.status, step.detail = "FAIL", str(e)
            except KeyboardInterrupt:
                step.detail = "interrupted"
                continue
            step.seconds = time.monotonic() - t
            if step.status == "FAIL":
                self.say(f"{cpu}: {name} FAILED after {fmt_s(step.seconds)}: {step.detail}")
            else:
                self.say(f"{cpu}: {name} passed in {fmt_s(step.seconds)}: {step.detail}")
        return result

    def emulated(self, step: Step, cpu_dir: Path, python: Path, args: Sequence[str], env: dict[str, str],
                 progress: Callable[[Path], str] | None = None, cwd: Path | None = None) -> str:
        log = self.logs / f"{cpu_dir.name}-{step.name}.log"
        rc, text = run_logged([str(python), *args], log, console=self.console, label=f"{cpu_dir.name}: {step.name}",
                              timeout=TIMEOUTS[step.name], cwd=cwd or cpu_dir, env=env, progress=progress)
        if rc != 0:
            why = "timed out" if rc == 124 else f"exit {rc}"
            if rc < 0 or rc > 128:
                why += " (killed by a signal in the emulated process)"
            raise StepFailed(f"{why}; log {log}:\n{tail(text)}")
        return text

    def step_import(self, step: Step, python: Path, out: Path, env: dict[str, str]) -> None:
        text = self.emulated(step, out, python, ["-c", IMPORT_PROBE], env)
        info = _last_json(text)
        if info is None:
            raise StepFailed(f"no report from the import probe:\n{tail(text)}")
        (out / "import.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        if info["machine"] != "aarch64":
            raise StepFailed(f"the interpreter reports machine {info['machine']!r}, not aarch64")
        if not info["edge_runtime_path"].startswith(str(self.project)):
            raise StepFailed(f"edge_runtime came from {info['edge_runtime_path']}, not the installed wheel")
        step.status = "PASS"
        step.detail = (f"python {info['python']}, numpy {info['numpy']}, onnxruntime {info['onnxruntime']} "
                       f"{info['providers']}, paho-mqtt {info['paho_mqtt']}, edge-runtime {info['edge_runtime']}")
        feats = [f for f in info["numpy_cpu_features"] if f.startswith("ASIMD")]
        if feats:
            step.detail += f"; numpy sees {' '.join(feats)}"

    def step_bench(self, step: Step, python: Path, out: Path, env: dict[str, str], profile: str) -> None:
        model = self.plan.models / "digits_mlp.onnx"
        text = self.emulated(step, out, python, ["-m", "edge_runtime.cli", "bench", "--model", str(model),
                                                 "--profile", profile, "--seconds", str(self.plan.bench_seconds),
                                                 "--warmup", "0.2", "--json"], env)
        res = _last_json(text, multiline=True)
        if not res or "bare_us" not in res:
            raise StepFailed(f"no JSON result from bench:\n{tail(text)}")
        if res.get("agent_errors"):
            raise StepFailed(f"{res['agent_errors']} errors in the agent loop")
        step.status = "PASS"
        step.detail = (f"digits_mlp p50 bare {res['bare_us']:.0f} us, agent {res['agent_us']:.0f} us "
                       f"({res['agent']['iterations']} runs, rss {res['rss_mb']:.0f} MB; emulated, not Pi speed)")

    def step_run(self, step: Step, python: Path, out: Path, env: dict[str, str], profile: str) -> None:
        text = self.emulated(step, out, python, self.run_args(profile, out), env)
        report = _read_json(out / "report.json")
        if not report:
            raise StepFailed(f"no report.json:\n{tail(text)}")
        errors = {p["name"]: p["errors"]["total"] for p in report.get("pipelines", []) if p["errors"]["total"]}
        if errors:
            raise StepFailed(f"inference errors {errors}:\n{tail(text)}")
        problems = compare_predictions(read_predictions(out / "predictions.jsonl"), self.host_predictions,
                                       self.plan.inputs)
        if problems:
            raise StepFailed("; ".join(problems))
        step.status = "PASS"
        per = ", ".join(f"{p['name']} {p['predictions']}" for p in report["pipelines"])
        step.detail = f"exit 0, predictions {per}; labels and scores match the x86 host"

    def step_tests(self, step: Step, python: Path, out: Path, env: dict[str, str]) -> None:
        # --import-mode=append: edge_runtime comes from the installed wheel, not the source tree; the
        # working directory (Hypothesis's example database) stays under build/.
        args = ["-m", "pytest", "-p", "no:cacheprovider", "--import-mode=append", "-q",
                *[str(ROOT / t) for t in self.plan.tests]]
        if self.plan.deselect_slow:
            args += ["-k", " and ".join(f"not {name}" for name in SLOW_TESTS)]
        try:
            text = self.emulated(step, out, python, args, env, progress=pytest_progress)
        except StepFailed as e:
            log = self.logs / f"{out.name}-{step.name}.log"
            counts = pytest_counts(log.read_text(encoding="utf-8", errors="replace"))
            if counts:
                raise StepFailed(f"pytest: {', '.join(f'{n} {k}' for k, n in counts.items())}; {e}") from None
            raise
        counts = pytest_counts(text)
        if not counts.get("passed") or counts.get("failed") or counts.get("errors"):
            raise StepFailed(f"pytest: {counts or 'no summary'}\n{tail(text)}")
        step.status = "PASS"
        step.detail = ", ".join(f"{n} {k}" for k, n in counts.items()) + f" ({len(self.plan.tests)} files)"


class StepFailed(Exception):
    pass


def _clean_env() -> dict[str, str]:
    """The environment minus the host interpreter's and the agent's own settings."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH", "PYTHONUSERBASE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("EDGE_RUNTIME_")}
    env.pop("PI_CHECK_NS", None)
    return env


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _last_json(text: str, *, multiline: bool = False) -> dict[str, Any] | None:
    """The last JSON object in a log: one line, or (multiline) the block from the last line that is '{'."""
    lines = text.splitlines()
    if multiline:
        starts = [i for i, line in enumerate(lines) if line == "{"]
        for i in reversed(starts):
            depth_end = next((j for j in range(i, len(lines)) if lines[j] == "}"), None)
            if depth_end is not None:
                try:
                    return json.loads("\n".join(lines[i:depth_end + 1]))
                except ValueError:
                    continue
        return None
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def summary_table(results: Sequence[CpuResult], total_s: float, versions: dict[str, str]) -> str:
    names = ["import", "bench", "run", "tests"]
    names = [n for n in names if any(s.name == n for r in results for s in r.steps)]
    head = [f"{r.cpu} ({r.profile})" for r in results]
    width = max(22, *(len(h) + 2 for h in head))
    lines = [f"pi-check summary: qemu {versions.get('qemu', '?')}, Debian {SUITE} arm64 "
             f"{versions.get('python', 'python3.11')}", "",
             f"  {'step':<8}" + "".join(f"{h:<{width}}" for h in head)]
    for n in names:
        row = ""
        for r in results:
            s = next((s for s in r.steps if s.name == n), None)
            cell = "-" if s is None else (f"{s.status}  {fmt_s(s.seconds)}" if s.status != "SKIP" else "SKIP")
            row += f"{cell:<{width}}"
        lines.append(f"  {n:<8}{row}")
    lines.append(f"  {'total':<8}" + "".join(f"{fmt_s(sum(s.seconds for s in r.steps)):<{width}}"
                                             for r in results))
    lines.append("")
    for r in results:
        for s in r.steps:
            if s.detail:
                first = s.detail.splitlines()[0]
                lines.append(f"  {r.cpu} {s.name}: {first}")
    verdict = "PASS" if results and all(r.ok for r in results) else "FAIL"
    lines += ["", f"pi-check: {verdict} in {fmt_s(total_s)} (wall, set-up included)"]
    return "\n".join(lines)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pi_check.py",
        description="Prove without a Pi that the agent installs, imports and serves on aarch64: Debian's arm64 "
                    "Python 3.11 and PyPI's aarch64 wheels under qemu-user, as a Pi 4 (Cortex-A72) and a Pi 5 "
                    "(Cortex-A76). Downloads are cached under build/pi-check/.",
        epilog="Exit status: 0 all passed, 1 a check failed, 2 usage or host set-up problem. Environment: "
               "PI_CHECK_MIRROR / PI_CHECK_SECURITY_MIRROR override the Debian mirrors (default: the host's).")
    p.add_argument("--cpu", action="append", choices=sorted(CPUS), metavar="CPU",
                   help=f"emulate this CPU (repeatable; default: all of {', '.join(CPUS)})")
    p.add_argument("--test", action="append", metavar="PATH",
                   help="a test file to run under emulation (repeatable; default: the pure-core set "
                        f"{' '.join(Path(t).name for t in DEFAULT_TESTS)})")
    p.add_argument("--full-tests", action="store_true",
                   help="keep the three slowest codec properties of test_protocol.py (about 2 min more per CPU)")
    p.add_argument("--no-tests", action="store_true", help="skip the tests under emulation")
    p.add_argument("--bench-seconds", type=float, default=1.0, metavar="S",
                   help="seconds per `edge-runtime bench` phase (default 1)")
    p.add_argument("--inputs", type=int, default=8, metavar="N",
                   help="inputs per model in the `edge-runtime run` check (default 8; the CNN takes about 1.5 s "
                        "per input under emulation)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="CPUs emulated at the same time (default 1; each keeps one host core busy)")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "pi-check", metavar="DIR",
                   help="cache and output directory (default build/pi-check)")
    p.add_argument("--models", type=Path, default=ROOT / "build" / "models", metavar="DIR",
                   help="sample models, built with models/build_all.py if missing (default build/models)")
    p.add_argument("--refresh", action="store_true",
                   help="fetch package lists, .debs and wheels again (newer security updates and releases)")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    return p


def parse_plan(argv: Sequence[str] | None) -> Plan:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inputs < 1:
        parser.error("--inputs must be at least 1")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.bench_seconds <= 0:
        parser.error("--bench-seconds must be positive")
    if args.no_tests and args.test:
        parser.error("--no-tests and --test contradict each other")
    tests = [] if args.no_tests else list(args.test or DEFAULT_TESTS)
    for t in tests:
        if not (ROOT / t).is_file():
            parser.error(f"--test {t}: no such file under {ROOT}")
    cpus = list(dict.fromkeys(args.cpu or CPUS))
    deselect = not args.full_tests and tests == list(DEFAULT_TESTS)
    return Plan(cpus=cpus, tests=tests, deselect_slow=deselect, bench_seconds=args.bench_seconds,
                inputs=args.inputs, jobs=min(args.jobs, len(cpus)), work=args.work.resolve(),
                models=args.models.resolve(), refresh=args.refresh, dry_run=args.dry_run)


def describe(plan: Plan) -> str:
    lines = [f"work directory  {plan.work}", f"sample models   {plan.models}",
             f"qemu            {QEMU} -L {plan.work / 'sysroot'} -cpu CPU (Debian's qemu-user-static)",
             f"sysroot         Debian {SUITE} arm64: {' '.join(DEBS)} (+ dependencies), dpkg-deb -x",
             f"wheels          pip download {' '.join(pip_platform_args())} "
             f"{' '.join(requirements(ROOT / 'pyproject.toml'))}",
             "project         pip wheel --no-deps --no-index . (build backend cached in build-deps/); "
             "pip install --no-deps --target project/"]
    for cpu in plan.cpus:
        lines.append(f"{cpu:<15} profile {CPUS[cpu]}: import; bench {plan.bench_seconds:g} s; run {plan.inputs} "
                     f"inputs of {', '.join(m for _, m, _ in RUN_MODELS)}; "
                     + (f"pytest {' '.join(plan.tests)}" + (" (3 slow codec properties deselected)"
                                                            if plan.deselect_slow else "")
                        if plan.tests else "no tests"))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_plan(argv)
    if plan.dry_run:
        print(describe(plan))
        return 0
    console = Console()
    checker = Checker(plan, console)
    try:
        checker.ensure_qemu()
        checker.ensure_sysroot()
        checker.ensure_wheels()
        checker.install_project()
        checker.ensure_models()
        checker.host_reference()
    except SetupError as e:
        print(f"pi-check: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pi-check: interrupted", file=sys.stderr)
        return 130
    console.say(f"set-up done; emulating {', '.join(plan.cpus)}"
                + (f", {plan.jobs} at a time" if plan.jobs > 1 else ""))
    pool = ThreadPoolExecutor(max_workers=plan.jobs)
    try:
        results = list(pool.map(checker.check_cpu, plan.cpus))
    except KeyboardInterrupt:
        STOP.set()
        pool.shutdown(wait=True, cancel_futures=True)
        print("pi-check: interrupted", file=sys.stderr)
        return 130
    pool.shutdown()
    print()
    print(summary_table(results, time.monotonic() - console.start, checker.versions))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

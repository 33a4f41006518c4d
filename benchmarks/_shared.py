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


# -- PostgreSQL ---------------------------------------------------------------------------------------

POSTGRES_MISSING = "postgresql not installed (apt-get install postgresql)"


def postgres_bin_dir() -> Path | None:
    """The folder of initdb/postgres/pg_isready/psql: $PG_BINDIR, Debian's newest
    /usr/lib/postgresql/<major>/bin, or the one holding initdb on PATH; None when not installed."""
    import os

    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = [d for d in debian.iterdir() if d.name.isdigit()]
        candidates += [d / "bin" for d in sorted(majors, key=lambda d: int(d.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for c in candidates:
        if all((c / name).is_file() for name in ("initdb", "postgres", "pg_isready", "psql")):
            return c
    return None


class Postgres:
    """A throwaway PostgreSQL cluster: ``initdb`` into a fresh temp folder, ``postgres`` on a free
    loopback port (trust authentication, superuser ``postgres``), everything deleted by :meth:`stop`.

    PostgreSQL refuses to run as root: as root, the cluster folder belongs to the ``postgres`` user
    that Debian's package creates and both programs run as that user. Durability is off (fsync,
    synchronous_commit, full_page_writes): a test server that loses everything on a crash anyway starts
    and writes faster. The system's own PostgreSQL service is neither needed nor touched.
    """

    def __init__(self, bin_dir: Path | None = None, user: str = "postgres") -> None:
        import os

        found = bin_dir or postgres_bin_dir()
        if found is None:
            raise RuntimeError(POSTGRES_MISSING)
        self.bin_dir = found
        self.host = "127.0.0.1"
        self.port = free_port()
        self.superuser = "postgres"
        self.run_as = user if os.geteuid() == 0 else None
        self.base: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def _popen_user(self) -> dict[str, Any]:
        return {"user": self.run_as, "group": self.run_as, "extra_groups": []} if self.run_as else {}

    def start(self, timeout: float = 20.0) -> Postgres:
        import os
        import pwd
        import tempfile

        self.base = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        if self.run_as:
            try:
                pw = pwd.getpwnam(self.run_as)
            except KeyError:
                self.stop()
                raise RuntimeError(f"running as root and there is no {self.run_as!r} user to run PostgreSQL as "
                                   "(Debian's postgresql package creates it)") from None
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        data = self.base / "data"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        init = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", self.superuser, "-A", "trust",
                               "-E", "UTF8", "--no-locale", "--no-sync"], cwd=self.base, env=env,
                              capture_output=True, text=True, check=False, timeout=120, **self._popen_user())
        if init.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed (exit {init.returncode}): {(init.stderr or init.stdout)[-1000:]}")
        self.log_path = self.base / "postgres.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "postgres"), "-D", str(data), "-k", str(self.base), "-p", str(self.port),
             "-c", f"listen_addresses={self.host}", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", "max_connections=50"],
            cwd=self.base, env=env, stdout=self._log, stderr=subprocess.STDOUT, **self._popen_user())
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin_dir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port)],
                             check=False, timeout=10).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log_path.read_text(errors="replace")[-1000:]
                self.stop()
                raise RuntimeError(f"postgres did not start on port {self.port}: {log}")
            time.sleep(0.05)
        return self

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        out = subprocess.run([str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              "-h", self.host, "-p", str(self.port), "-U", self.superuser, "-d", dbname, "-c", sql],
                             capture_output=True, text=True, check=False, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed: {out.stderr.strip()}")
        return out.stdout

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@{self.host}:{self.port}/{dbname}"

    def stop(self) -> None:
        import signal

        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown: clients still connected are cut off
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

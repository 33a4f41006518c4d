"""Shared fixtures: sample models built once per test session by the scripts in models/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"

sys.path.insert(0, str(MODELS_DIR))
from _common import load_script  # noqa: E402 - models/ holds scripts, not a package

sys.path.insert(0, str(ROOT / "benchmarks"))
from _shared import Mosquitto, free_port, mosquitto_binary  # noqa: E402, F401 - shared with the benchmarks


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


# -- stores: SQLite always, PostgreSQL where it can be started --------------------------------------

from _shared import POSTGRES_MISSING, Postgres, postgres_bin_dir  # noqa: E402 - shared with the benchmarks


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL for the whole session (initdb + start: about a second); skips the
    test when the server or psycopg is not installed."""
    if postgres_bin_dir() is None:
        pytest.skip(POSTGRES_MISSING)
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'edge-runtime[postgres]')")
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's server, for this test alone."""
    import uuid

    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:16]}")


@pytest.fixture(params=["sqlite", "postgres"])
def any_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a new, empty store goes: a SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def any_store(any_store_url: str):
    """An open store on each engine (see ``any_store_url``); closed after the test."""
    from cloud_sync.store import open_store

    store = open_store(any_store_url)
    try:
        yield store
    finally:
        store.close()

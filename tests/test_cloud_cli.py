"""`cloud-sync export`, run as a user would (a fresh interpreter) on real stores."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloud_sync.cli import parse_since
from cloud_sync.store import open_store
from edge_runtime.core.protocol import Record

pytestmark = pytest.mark.integration

HOUR_MS = 3_600_000


def cloud_sync(*args: str, code: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """``cloud-sync ARGS``; with ``code``, that Python runs first in the same interpreter."""
    prog = ["-m", "cloud_sync.cli"] if code is None else \
        ["-c", f"{code}\nimport sys\nfrom cloud_sync.cli import main\nsys.exit(main())"]
    return subprocess.run([sys.executable, *prog, *args], capture_output=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def fill(url: str) -> list[dict]:
    """Two devices; per device 3 records from two hours ago and 6 of every kind from ten minutes ago.
    Returns every record as export yields it."""
    now = int(time.time() * 1000)
    old, recent = now - 2 * HOUR_MS, now - HOUR_MS // 6
    with open_store(url) as store:
        for dev in ("dev-b", "dev-a"):
            recs = [Record(i, "p", old + i, {"m": "digits_mlp", "y": i, "note": 'comma, "quote"\nnewline'})
                    for i in range(3)]
            recs += [Record(10, "m", recent, {"pipeline": "digits", "latency_ms": 1.25}),
                     Record(11, "d", recent + 1, {"model": "digits_mlp", "model_version": "3",
                                                  "start_ms": recent - 60_000, "end_ms": recent,
                                                  "summary": {"psi": 0.2}}),
                     Record(12, "e", recent + 2, {"name": "model_swapped", "severity": "info", "ref": "ro-1"}),
                     Record(13, "p", recent + 3, {"m": "digits_mlp", "y": 7, "p": 0.93}),
                     Record(14, "m", recent + 4, {"pipeline": "digits", "latency_ms": 2.5}),
                     Record(15, "p", recent + 5, {"m": "digits_mlp", "y": 8, "p": 0.5})]
            store.insert_records(dev, "boot-1", recs, now)
        return list(store.export(0))


@pytest.fixture
def sqlite_store(tmp_path: Path) -> tuple[str, list[dict]]:
    url = str(tmp_path / "cloud.db")
    return url, fill(url)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_export_to_a_file(sqlite_store: tuple[str, list[dict]], tmp_path: Path, fmt: str) -> None:
    url, rows = sqlite_store
    out = tmp_path / f"out.{fmt}"
    proc = cloud_sync("export", "--db", url, "--since", "2020-01-01T00:00:00Z", "--format", fmt, "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b""
    assert f"export: 18 rows to {out}" in proc.stderr.decode()
    assert not out.with_name(out.name + ".partial").exists()
    if fmt == "jsonl":
        got = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        got = [{**r, "seq": int(r["seq"]), "created_ms": int(r["created_ms"]), "received_ms": int(r["received_ms"]),
                "payload": json.loads(r["payload"])} for r in csv.DictReader(io.StringIO(out.read_text(), newline=""))]
    assert got == rows


def test_export_jsonl_to_stdout_from_each_engine(any_store_url: str) -> None:
    rows = fill(any_store_url)
    proc = cloud_sync("export", "--db", any_store_url, "--since", "-1h", "--kind", "m,drift")
    assert proc.returncode == 0, proc.stderr.decode()
    got = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    want = [r for r in rows if r["kind"] in ("m", "d")]
    assert got == want and len(got) == 6
    assert [(r["device_id"], r["seq"]) for r in got] == [("dev-a", 10), ("dev-b", 10), ("dev-a", 11), ("dev-b", 11),
                                                         ("dev-a", 14), ("dev-b", 14)]


def test_export_reports_progress_on_stderr(sqlite_store: tuple[str, list[dict]]) -> None:
    url, _rows = sqlite_store
    proc = cloud_sync("export", "--db", url, "--since", "-3h", "--format", "csv", "--progress-rows", "5")
    assert proc.returncode == 0
    lines = proc.stderr.decode().splitlines()
    assert [ln.split(" rows")[0] for ln in lines] == ["export: 5", "export: 10", "export: 15", "export: 18"]
    assert len(proc.stdout.decode().splitlines()) == 1 + 18


def test_export_parquet(sqlite_store: tuple[str, list[dict]], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow not installed")
    url, rows = sqlite_store
    out = tmp_path / "out.parquet"
    proc = cloud_sync("export", "--db", url, "--since", "-3h", "--format", "parquet", "--kind", "p",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr.decode()
    table = pq.read_table(out)
    assert table.column_names == ["device_id", "boot_id", "seq", "kind", "created_ms", "received_ms", "payload"]
    got = [{**r, "payload": json.loads(r["payload"])} for r in table.to_pylist()]
    assert got == [r for r in rows if r["kind"] == "p"]


def test_export_parquet_without_pyarrow_says_what_to_install(sqlite_store: tuple[str, list[dict]],
                                                              tmp_path: Path) -> None:
    url, _rows = sqlite_store
    out = tmp_path / "out.parquet"
    proc = cloud_sync("export", "--db", url, "--since", "-1h", "--format", "parquet", "--out", str(out),
                      code="import sys; sys.modules['pyarrow'] = None")
    assert proc.returncode == 1
    assert "--format parquet needs pyarrow, which is not installed: pip install pyarrow" in proc.stderr.decode()
    assert list(tmp_path.glob("out.parquet*")) == []


def test_export_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    proc = cloud_sync("export", "--db", str(missing), "--since", "-1h")
    assert proc.returncode == 1
    assert "no SQLite store here" in proc.stderr.decode()
    assert not missing.exists()
    proc = cloud_sync("export", "--db", str(missing), "--since", "last tuesday")
    assert proc.returncode == 2
    assert "'last tuesday' is neither an ISO 8601 time" in proc.stderr.decode()
    proc = cloud_sync("export", "--db", str(missing), "--since", "-1h", "--kind", "p,Metric")
    assert proc.returncode == 2
    assert "'Metric' is not a record kind" in proc.stderr.decode()


def test_parse_since() -> None:
    now = 1_764_167_513_000
    assert parse_since("-1h", now) == now - HOUR_MS
    assert parse_since("-7d", now) == now - 7 * 24 * HOUR_MS
    assert parse_since("-90s", now) == now - 90_000
    assert parse_since("-1.5m", now) == now - 90_000
    assert parse_since("-2w", now) == now - 14 * 24 * HOUR_MS
    assert parse_since("2025-11-26T14:31:53Z", now) == 1_764_167_513_000
    assert parse_since("2025-11-26T15:31:53+01:00", now) == 1_764_167_513_000
    assert parse_since("2025-11-26T14:31:53.250", now) == 1_764_167_513_250  # no zone: UTC
    assert parse_since("1970-01-01", now) == 0
    for bad in ("1h", "-1y", "yesterday", ""):
        with pytest.raises(ValueError, match="neither an ISO 8601 time"):
            parse_since(bad, now)

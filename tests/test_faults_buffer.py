"""The outbox under real faults: a writer process killed with SIGKILL at random points, a corrupt
file, a disk budget that runs out. Whatever a writer was told is committed must be there after."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from edge_runtime.adapters.sqlite_buffer import Buffer, BufferConfig, Key

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent

# The child appends in a loop, like the runtime: queued appends + flush, or append_many; and acks like
# the sync. It prints a line only after the call returned, so a printed line is a promise.
CHILD = textwrap.dedent("""
    import random, sys
    from edge_runtime.adapters.sqlite_buffer import Buffer, BufferConfig
    path, seed = sys.argv[1], int(sys.argv[2])
    rng = random.Random(seed)
    buf = Buffer.open(BufferConfig(path=path, device_id="dev"), now=0.0)
    print("boot", buf.boot_id, flush=True)
    seq = 0
    def payload(s):
        return b"%s:%d:" % (buf.boot_id.encode(), s) + b"x" * rng.randrange(0, 200)
    while True:
        n = rng.randrange(1, 300)
        if rng.random() < 0.5:
            for i in range(n):
                buf.append("prediction", payload(seq + i), float(seq + i))
            r = buf.flush()
        else:
            r = buf.append_many("metric", [payload(seq + i) for i in range(n)], float(seq))
        assert len(r) == n, (r, n)
        seq += n
        print("committed", r.start, r.stop, flush=True)
        if rng.random() < 0.2:
            keys = [rec.key for rec in buf.peek(rng.randrange(1, 200), 1 << 20)]
            print("acking", " ".join(f"{k.boot_id}/{k.seq}" for k in keys), flush=True)
            buf.ack(keys)
            print("acked", flush=True)
""")


def run_child_and_kill(path: Path, seed: int, rng: random.Random) -> list[str]:
    """Start a writer, let it commit a random number of times, SIGKILL it at a random moment."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(seed)], stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout is not None
        lines: list[str] = []
        target = rng.randrange(1, 25)
        deadline = time.monotonic() + 5
        try:
            while len(lines) < target and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
            time.sleep(rng.random() * 0.02)  # land anywhere: mid-append, mid-commit, mid-ack
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        # Read the rest through the same buffered reader: communicate() would skip what it holds.
        rest = proc.stdout.read()
        proc.stdout.close()
        err.seek(0)
        assert proc.returncode == -signal.SIGKILL, err.read()
    # Each line is one write after its call returned; a line cut short by the kill promises nothing.
    return ("".join(lines) + rest).split("\n")[:-1]


def test_records_reported_committed_survive_sigkill_exactly_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    rng = random.Random(1234)
    committed: list[Key] = []          # in commit order, across boots
    acked: set[Key] = set()            # acks that returned
    maybe_acked: set[Key] = set()      # acks in progress when the child died
    started = time.monotonic()
    kills = 0
    for run in range(20):
        lines = run_child_and_kill(path, seed=run, rng=rng)
        kills += 1
        boot = None
        pending_ack: set[Key] = set()
        for line in lines:
            word, *rest = line.split(" ")
            if word == "boot":
                boot = rest[0]
            elif word == "committed":
                assert boot is not None
                committed.extend(Key("dev", boot, s) for s in range(int(rest[0]), int(rest[1])))
            elif word == "acking":
                pending_ack = {Key("dev", b, int(s)) for b, s in (k.split("/") for k in rest if k)}
            elif word == "acked":
                acked |= pending_ack
                pending_ack = set()
        maybe_acked |= pending_ack

        # Reopen as the next start would, and check the promise.
        with Buffer.open(BufferConfig(path=path, device_id="dev"), now=0.0) as buf:
            assert buf.recovered_from is None
            present = buf.peek(10**9, 1 << 40)
            keys = [r.key for r in present]
            assert len(keys) == len(set(keys)), "a record is stored twice"
            position = {k: i for i, k in enumerate(committed)}
            reported = [k for k in keys if k in position]
            assert [position[k] for k in reported] == sorted(position[k] for k in reported), "out of order"
            keyset = set(keys)
            missing = [k for k in committed if k not in keyset and k not in acked and k not in maybe_acked]
            assert not missing, f"run {run}: {len(missing)} committed records lost, first {missing[:3]}"
            assert not keyset & acked, "an acked record came back"
            for r in present:
                assert r.payload.startswith(b"%s:%d:" % (r.key.boot_id.encode(), r.key.seq))
            # The sync acks a random prefix now and then, so later runs see a mix of acked and pending.
            if rng.random() < 0.5 and keys:
                done = keys[:rng.randrange(len(keys) + 1)]
                buf.ack(done)
                acked |= set(done)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        conn.close()
    assert kills == 20
    assert len(committed) > 1000, "the children committed too little to test anything"
    assert time.monotonic() - started < 20


def test_a_garbage_header_is_moved_aside_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Buffer.open(BufferConfig(path=path, device_id="dev"), now=0.0) as buf:
        buf.append_many("event", [b"precious"] * 100, 1.0)
    with path.open("r+b") as f:
        f.write(os.urandom(100))
    damaged = path.read_bytes()
    with Buffer.open(BufferConfig(path=path, device_id="dev"), now=1_800_000_000.0) as buf:
        assert buf.recovered_from is not None
        moved = Path(buf.recovered_from)
        assert moved.name.startswith("outbox.db.corrupt-20270115T")
        assert moved.read_bytes() == damaged  # kept byte for byte for whoever wants to salvage it
        assert buf.pending_count() == 0
        assert buf.append_many("event", [b"after"], 2.0) == range(1)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    conn.close()


def test_an_exhausted_disk_budget_keeps_accepting_and_counts_drops(tmp_path: Path) -> None:
    """max_mb evicts by priority as records come; the hard cap (the file's page limit) stands in for a
    full disk and is hit too, because the bound is set above it."""
    path = tmp_path / "outbox.db"
    cfg = BufferConfig(path=path, device_id="dev", max_mb=1.0, hard_limit_mb=0.5)
    rng = random.Random(5)
    sent = {"prediction": 0, "event": 0}
    with Buffer.open(cfg, now=0.0) as buf:
        for i in range(400):
            kind = "event" if i % 50 == 0 else "prediction"
            n = 1 if kind == "event" else 64
            buf.append_many(kind, [rng.randbytes(rng.randrange(50, 250)) for _ in range(n)], float(i))
            sent[kind] += n
        stats = buf.stats()
        assert stats.dropped_by_reason["full"]["prediction"] > 0
        assert stats.dropped["event"] == 0
        assert stats.pending["event"] == sent["event"]
        assert stats.pending["prediction"] + stats.dropped["prediction"] == sent["prediction"]
        newest = buf.peek(10**9, 1 << 40)[-1]
        assert newest.created == 399.0
    assert path.stat().st_size <= 0.5 * 2**20
    with Buffer.open(cfg, now=0.0) as buf:  # the counts survive a restart
        assert buf.stats().dropped == stats.dropped

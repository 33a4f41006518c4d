"""Outbox append throughput, end-to-end sync through Mosquitto, and a naive PUBACK-deletes baseline.

What it does (see benchmarks/RESULTS.md, section "Sync (issue 5)"):

1. **Buffer append.** Appends N prediction records (the payload the agent writes, e.g.
   ``{"m":"digits_mlp","y":7,"p":0.931234}``) to a fresh outbox, once with ``Buffer.append_many`` in
   batches of 256 and once with ``Buffer.append`` + ``Buffer.flush`` every 64 records, and reports
   records/s and the file's bytes per record after N records (WAL checkpointed by close).
2. **Sync end to end.** Pre-fills an outbox with N predictions, starts ``cloud_sync``'s
   ``IngestService`` (its own SQLite store) on a fresh Mosquitto, then runs the agent's own ``Uplink``
   on that outbox (``Sync`` + ``MqttTransport``, a tick every 50 ms) until the outbox is empty and the
   store holds all N. Reports records/s from the first batch sent to the commit of the last record,
   lost records (store count and gaps in seqs), duplicates (received by the ingest, and stored) and
   batches resent. Device and cloud share this one process (and its GIL).
3. **Naive baseline, same run.** One QoS 1 publish per record from a local SQLite table, the row
   deleted when paho's PUBACK arrives (``on_publish``), to a Mosquitto with its default settings
   (``max_queued_messages`` 1000, persistence off) and a slow subscriber with a persistent session
   (MQTT 5, clean start off, session expiry 1 h) that sleeps ``--naive-sleep-ms`` per message and
   commits each into its own SQLite store. Waits until the subscriber has been idle for 1 s, at most
   ``--naive-settle`` s after the last PUBACK. Reports records/s and the records the subscriber never
   got although the publisher deleted them: Mosquitto drops QoS 1 messages past the queue limit
   without telling the publisher.
4. Prints a table and writes the raw results, ``machine_info()``, the command and a UTC timestamp to
   ``--out``.

Exit status: 0 when every step ran, whatever the targets say; 1 when a step failed.

Usage: python benchmarks/sync_bench.py [--quick] [--records N] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sqlite3
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import Mosquitto  # noqa: E402

from cloud_sync.service import IngestService  # noqa: E402
from edge_runtime.adapters.sqlite_buffer import Buffer, BufferConfig  # noqa: E402
from edge_runtime.sysinfo import cpu_seconds, machine_info  # noqa: E402
from edge_runtime.uplink import Uplink, UplinkConfig  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "sync_bench.json"
DEVICE = "bench-dev"
MODEL = "digits_mlp"

# Targets (information only).
MIN_APPEND_RPS = 50_000        # Buffer.append_many, batches of 256
MIN_DRAIN_RPS = 10_000         # end to end, first send to last commit
MAX_BYTES_PER_RECORD = 500     # outbox file per prediction record


def log(msg: str) -> None:
    print(f"[sync_bench] {msg}", file=sys.stderr, flush=True)


# -- data ------------------------------------------------------------------------------------------

def prediction_payloads(n: int, seed: int = 5) -> list[bytes]:
    """What ``Uplink.prediction`` writes for an argmax model with a score (same formatting)."""
    rng = random.Random(seed)
    return [f'{{"m":{json.dumps(MODEL)},"y":{rng.randrange(10)},"p":{rng.uniform(0.3, 1.0):.6g}}}'.encode()
            for _ in range(n)]


def buffer_config(path: Path) -> BufferConfig:
    """The outbox as the agent opens it (UplinkConfig's defaults)."""
    d = UplinkConfig(broker_url="mqtt://127.0.0.1", device_id=DEVICE, buffer_path=str(path))
    return BufferConfig(path=path, device_id=DEVICE, max_mb=d.buffer_max_mb, max_age_s=d.buffer_max_age_s,
                        synchronous=d.synchronous)


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def fill_outbox(path: Path, payloads: list[bytes], boot_id: str) -> None:
    with Buffer.open(buffer_config(path), now=time.time(), boot_id=boot_id) as buf:
        for i in range(0, len(payloads), 256):
            buf.append_many("prediction", payloads[i:i + 256], time.time())


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


# -- 1. buffer append --------------------------------------------------------------------------------

def bench_append(n: int, tmp: Path) -> dict[str, Any]:
    payloads = prediction_payloads(n)
    created_ms = int(time.time() * 1000)
    wire = sum(len(f'[{i},"p",{created_ms},'.encode()) + len(pl) + 1 for i, pl in enumerate(payloads))
    out: dict[str, Any] = {"records": n, "payload_bytes_mean": round(sum(map(len, payloads)) / n, 1),
                           "wire_record_bytes_mean": round(wire / n, 1)}
    for mode in ("append_many_256", "append_flush_64"):
        path = tmp / f"append-{mode}.db"
        buf = Buffer.open(buffer_config(path), now=time.time())
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        if mode == "append_many_256":
            for i in range(0, n, 256):
                buf.append_many("prediction", payloads[i:i + 256], time.time())
        else:
            for i, pl in enumerate(payloads, 1):
                buf.append("prediction", pl, time.time())
                if i % 64 == 0:
                    buf.flush()
            buf.flush()
        dt = time.perf_counter() - t0
        cpu = cpu_seconds() - cpu0
        st = buf.stats()
        open_bytes = st.db_bytes + st.wal_bytes
        pending = buf.pending_count()
        buf.close()  # checkpoints the WAL into the file and removes it
        closed = file_bytes(path)
        out[mode] = {"seconds": round(dt, 4), "records_per_s": round(n / dt), "cpu_seconds": round(cpu, 3),
                     "pending_after": pending, "file_bytes_closed": closed,
                     "bytes_per_record": round(closed / n, 1),
                     "db_plus_wal_bytes_open": open_bytes, "stored_bytes_accounted": st.stored_bytes}
        log(f"append {mode}: {n / dt:,.0f} records/s, {closed / n:.1f} B/record on disk")
        if pending != n:
            raise RuntimeError(f"{mode}: {pending} records pending after appending {n}")
    return out


# -- 2. sync end to end --------------------------------------------------------------------------------

def bench_sync(n: int, tmp: Path, timeout: float) -> dict[str, Any]:
    outbox = tmp / "sync-outbox.db"
    store_path = tmp / "sync-cloud.db"
    prefill_boot = "prefill" + os.urandom(4).hex()
    t0 = time.perf_counter()
    fill_outbox(outbox, prediction_payloads(n, seed=11), prefill_boot)
    log(f"sync: outbox pre-filled with {n} predictions in {time.perf_counter() - t0:.1f} s "
        f"({file_bytes(outbox) / 1e6:.1f} MB)")
    with Mosquitto(tmp, name="sync") as broker:
        svc = IngestService(broker.url, str(store_path), client_id="bench-cloud")
        marks: dict[str, float] = {}
        handle = svc.ingest.handle

        def timed_handle(topic: str, payload: bytes, now_ms: int) -> list[tuple[str, bytes, int, bool]]:
            replies = handle(topic, payload, now_ms)  # returns after the store's commit
            if "last_commit" not in marks and svc.ingest.stats.records_new >= n:
                marks["last_commit"] = time.perf_counter()
            return replies

        svc.ingest.handle = timed_handle  # type: ignore[method-assign]
        svc.start()
        uplink: Uplink | None = None
        try:
            if not svc.transport.wait_connected(10):
                raise RuntimeError("the ingest did not connect to Mosquitto")
            time.sleep(0.3)  # let the SUBACK come back before the first batch goes out
            uplink = Uplink(UplinkConfig(broker_url=broker.url, device_id=DEVICE, buffer_path=str(outbox)))
            publish = uplink.sync.publish

            def timed_publish(topic: str, payload: bytes, qos: int, retain: bool) -> int | None:
                mid = publish(topic, payload, qos, retain)
                if mid is not None:
                    marks.setdefault("first_send", time.perf_counter())
                return mid

            uplink.sync.publish = timed_publish  # type: ignore[method-assign]
            pending0 = uplink.buffer.pending_count()
            cpu0 = cpu_seconds()
            marks["start"] = time.perf_counter()
            uplink.start()
            up = uplink

            def progress() -> bool:
                if "outbox_empty" not in marks and up.buffer.pending_count() == 0:
                    marks["outbox_empty"] = time.perf_counter()
                return "outbox_empty" in marks and "last_commit" in marks

            drained = wait_for(progress, timeout)
            cpu = cpu_seconds() - cpu0
            report = uplink.stop(drain_timeout_s=0)
            uplink = None
            ingest = svc.stats()
            drop_log = broker.log_lines("dropped")
        finally:
            if uplink is not None:
                uplink.stop(drain_timeout_s=0)
            svc.stop()
    with sqlite3.connect(store_path) as db:
        rows, distinct, lo, hi = db.execute(
            "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM records WHERE device_id=? AND boot_id=?",
            (DEVICE, prefill_boot)).fetchone()
        total = db.execute("SELECT count(*) FROM records").fetchone()[0]
    gaps = n - distinct if rows else n
    first = marks.get("first_send", marks["start"])
    end = marks.get("last_commit")
    rps = round(n / (end - first)) if drained and end else None
    s = report["sync"]
    out = {
        "records": n, "pending_at_start": pending0, "drained": drained, "timeout_s": timeout,
        "records_per_s": rps,
        "seconds_first_send_to_last_commit": round(end - first, 3) if end else None,
        "seconds_start_to_outbox_empty": (round(marks["outbox_empty"] - marks["start"], 3)
                                         if "outbox_empty" in marks else None),
        "connect_seconds": round(first - marks["start"], 3),
        "process_cpu_seconds": round(cpu, 2),
        "stored": rows, "stored_total": total, "seq_min": lo, "seq_max": hi,
        "lost": n - distinct, "seq_gaps": gaps,
        "duplicates_received": ingest["records_duplicate"], "duplicates_stored": rows - distinct,
        "batches_sent": s["batches_sent"], "batches_resent": s["batches_resent"], "acks": s["acks"],
        "records_per_batch": round(n / s["batches_sent"], 1) if s["batches_sent"] else None,
        "outbox_pending_after": report["pending"], "broker_drop_log": drop_log[:5], "ingest": ingest,
        "uplink": report,
    }
    log(f"sync: {rps or 0:,} records/s end to end, lost {out['lost']}, duplicates received "
        f"{out['duplicates_received']}, batches {s['batches_sent']} (+{s['batches_resent']} resent)")
    return out


# -- 3. the naive baseline -----------------------------------------------------------------------------

class SlowSubscriber:
    """A 'cloud' that stores each QoS 1 message in its own SQLite store, slowly, on paho's thread."""

    def __init__(self, broker: Mosquitto, db_path: Path, topic: str, sleep_s: float) -> None:
        self.topic = topic
        self.sleep_s = sleep_s
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE records (seq INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        self.received = 0
        self.last_message = time.monotonic()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive-cloud", protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600  # a persistent session: the broker queues for us while we are slow
        self.client.connect(broker.host, broker.port, 30, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: Any, _u: Any, flags: Any, reason_code: Any, _p: Any) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        client.subscribe(self.topic, qos=1)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        time.sleep(self.sleep_s)  # the work a real consumer does per message
        seq = json.loads(msg.payload)[0]
        self.db.execute("INSERT OR IGNORE INTO records VALUES (?, ?)", (seq, msg.payload.decode()))
        self.received += 1
        self.last_message = time.monotonic()

    def stored(self) -> list[int]:
        return [s for (s,) in self.db.execute("SELECT seq FROM records ORDER BY seq")]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()


class NaivePublisher:
    """One QoS 1 publish per record; the record's row is deleted when paho reports its PUBACK."""

    def __init__(self, broker: Mosquitto, db_path: Path, payloads: list[bytes], max_outstanding: int = 1000) -> None:
        self.db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY, created_ms INTEGER, payload BLOB)")
        now_ms = int(time.time() * 1000)
        self.db.execute("BEGIN")
        self.db.executemany("INSERT INTO outbox VALUES (?, ?, ?)", [(i, now_ms, p) for i, p in enumerate(payloads)])
        self.db.execute("COMMIT")
        self.n = len(payloads)
        self.lock = threading.Lock()  # never held while calling paho (paho calls on_publish under its own lock)
        self.by_mid: dict[int, int] = {}
        self.early: set[int] = set()  # PUBACKs that beat the publisher's bookkeeping
        # paho's mids wrap at 65535; keep far fewer than that unacknowledged.
        self.window = threading.BoundedSemaphore(max_outstanding)
        self.deleted = 0
        self.refused = 0
        self.done = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="naive-dev", protocol=mqtt.MQTTv5)
        self.client.on_publish = self._on_publish
        self.client.connect(broker.host, broker.port, 30)
        self.client.loop_start()

    def _delete(self, seq: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE seq = ?", (seq,))  # autocommit: one transaction per record
        self.deleted += 1
        if self.deleted == self.n:
            self.done.set()

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason_code: Any, _p: Any) -> None:
        if reason_code is not None and getattr(reason_code, "is_failure", False):
            self.refused += 1
        with self.lock:
            seq = self.by_mid.pop(mid, None)
            if seq is None:
                self.early.add(mid)
            else:
                self._delete(seq)
        self.window.release()

    def run(self, topic: str, deadline: float) -> int:
        """Publish every row; returns how many were handed to paho before the deadline."""
        sent = 0
        rows = self.db.execute("SELECT seq, created_ms, payload FROM outbox ORDER BY seq").fetchall()
        for seq, created_ms, payload in rows:
            if not self.window.acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
            body = f'[{seq},"p",{created_ms},{payload.decode()}]'.encode()
            info = self.client.publish(topic, body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"naive publish failed: {mqtt.error_string(info.rc)}")
            sent += 1
            with self.lock:
                if info.mid in self.early:
                    self.early.discard(info.mid)
                    self._delete(seq)
                else:
                    self.by_mid[info.mid] = seq
        return sent

    def remaining(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.db.close()


def bench_naive(n: int, tmp: Path, sleep_ms: float, settle_s: float, timeout: float) -> dict[str, Any]:
    topic = f"naive/v1/{DEVICE}/records"
    with Mosquitto(tmp, name="naive") as broker:
        sub = SlowSubscriber(broker, tmp / "naive-cloud.db", topic, sleep_ms / 1000)
        pub: NaivePublisher | None = None
        try:
            if not sub.subscribed.wait(10):
                raise RuntimeError("the naive subscriber did not get its SUBACK")
            pub = NaivePublisher(broker, tmp / "naive-outbox.db", prediction_payloads(n, seed=23))
            t0 = time.perf_counter()
            sent = pub.run(topic, time.monotonic() + timeout)
            all_acked = pub.done.wait(max(0.0, timeout - (time.perf_counter() - t0)))
            t_acked = time.perf_counter()
            received_at_last_puback = sub.received
            log(f"naive: {pub.deleted} of {n} PUBACKed and deleted in {t_acked - t0:.1f} s; "
                f"the subscriber has {received_at_last_puback}; waiting for it to go idle")
            # Wait for the subscriber: until it has been idle for 1 s, at most settle_s after the last PUBACK.
            settle_deadline = time.monotonic() + settle_s
            while time.monotonic() < settle_deadline and time.monotonic() - sub.last_message < 1.0:
                time.sleep(0.05)
            settled = time.monotonic() - sub.last_message >= 1.0
            t_end = time.perf_counter()
            remaining = pub.remaining()
            deleted, refused = pub.deleted, pub.refused
            sub_received = sub.received
            drop_log = broker.log_lines("dropped")
        finally:
            if pub is not None:
                pub.close()
            stored = set(sub.stored())
            sub.close()
    lost = n - len(stored)
    rps = round(deleted / (t_acked - t0)) if deleted else None
    out = {
        "records": n, "subscriber_sleep_ms": sleep_ms, "settle_s": settle_s, "published": sent,
        "all_pubacked": all_acked, "deleted_on_puback": deleted, "refused_pubacks": refused,
        "outbox_remaining": remaining, "records_per_s": rps, "seconds_to_last_puback": round(t_acked - t0, 3),
        "subscriber_received_at_last_puback": received_at_last_puback,
        "subscriber_received": sub_received, "subscriber_idle_at_end": settled,
        "seconds_waited_after_last_puback": round(t_end - t_acked, 2),
        "subscriber_records_per_s": round(sub_received / (t_end - t0), 1),
        "stored": len(stored), "lost": lost,
        "lost_after_delete": len(set(range(n)) - stored) - remaining,
        "first_missing_seq": min(set(range(n)) - stored, default=None),
        "broker_drop_log": drop_log[:5],
        "broker": {"max_queued_messages": 1000, "max_inflight_messages": 20, "persistence": False,
                   "note": "Mosquitto 2 defaults; the generated config sets only listener, user, "
                           "persistence false, allow_anonymous true"},
    }
    log(f"naive: {rps or 0:,} records/s (PUBACK-deleted), subscriber stored {len(stored)} of {n}: lost {lost}")
    return out


# -- report --------------------------------------------------------------------------------------------

def fmt(v: Any, spec: str = ",") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20k records (CI)")
    ap.add_argument("--records", type=int, help="records per step (default 100000; --quick 20000)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"raw results (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--naive-sleep-ms", type=float, default=2.0, help="the slow subscriber's work per message")
    ap.add_argument("--naive-settle", type=float, default=10.0,
                    help="wait at most S seconds after the last PUBACK for the subscriber (default 10)")
    ap.add_argument("--sync-timeout", type=float, help="give up the drain after S seconds (default 30 + N/1000)")
    args = ap.parse_args(argv)
    n = args.records or (20_000 if args.quick else 100_000)
    if n < 1:
        ap.error("--records must be >= 1")
    sync_timeout = args.sync_timeout or 30.0 + n / 1000
    naive_timeout = 30.0 + n / 200
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[sync_bench] %(name)s: %(message)s")
    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
        "records": n, "quick": args.quick, "errors": {},
    }
    log(f"{n} records per step")
    steps: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
        ("append", lambda t: bench_append(n, t)),
        ("sync", lambda t: bench_sync(n, t, sync_timeout)),
        ("naive", lambda t: bench_naive(n, t, args.naive_sleep_ms, args.naive_settle, naive_timeout)),
    ]
    for name, step in steps:
        with tempfile.TemporaryDirectory(prefix=f"sync_bench-{name}-") as tmp:
            t0 = time.perf_counter()
            try:
                results[name] = step(Path(tmp))
            except Exception as e:
                results["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"{name} failed:\n{traceback.format_exc()}")
            results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    a, s, nv = results.get("append", {}), results.get("sync", {}), results.get("naive", {})
    many = a.get("append_many_256", {})
    flush64 = a.get("append_flush_64", {})
    ratio = (round(s["records_per_s"] / nv["records_per_s"], 2)
             if s.get("records_per_s") and nv.get("records_per_s") else None)
    results["summary"] = {
        "append_many_256_records_per_s": many.get("records_per_s"),
        "append_flush_64_records_per_s": flush64.get("records_per_s"),
        "bytes_per_record": many.get("bytes_per_record"),
        "sync_records_per_s": s.get("records_per_s"), "sync_lost": s.get("lost"),
        "sync_duplicates_received": s.get("duplicates_received"), "sync_duplicates_stored": s.get("duplicates_stored"),
        "sync_batches_resent": s.get("batches_resent"),
        "naive_records_per_s": nv.get("records_per_s"), "naive_lost": nv.get("lost"),
        "sync_over_naive_throughput": ratio,
    }

    def target(name: str, value: Any, ok: Callable[[Any], bool]) -> dict[str, Any]:
        return {"target": name, "value": value, "met": None if value is None else ok(value)}

    results["targets"] = [
        target(f"append >= {MIN_APPEND_RPS:,} records/s (append_many, 256)", many.get("records_per_s"),
               lambda v: v >= MIN_APPEND_RPS),
        target(f"drain >= {MIN_DRAIN_RPS:,} records/s end to end", s.get("records_per_s"),
               lambda v: v >= MIN_DRAIN_RPS),
        target(f"<= {MAX_BYTES_PER_RECORD} B on disk per prediction record", many.get("bytes_per_record"),
               lambda v: v <= MAX_BYTES_PER_RECORD),
        target("sync loses nothing", s.get("lost"), lambda v: v == 0),
    ]
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nSync benchmark, {n:,} prediction records per step ({machine_info()['cpu']}, "
          f"{machine_info()['cores']} cores)\n")
    rows = [
        ("buffer append_many (256/commit)", f"{fmt(many.get('records_per_s'))} records/s", ""),
        ("buffer append + flush every 64", f"{fmt(flush64.get('records_per_s'))} records/s", ""),
        ("outbox bytes per record", f"{fmt(many.get('bytes_per_record'), '.1f')} B",
         f"payload {fmt(a.get('payload_bytes_mean'), '.1f')} B"),
        ("sync end to end (Mosquitto)", f"{fmt(s.get('records_per_s'))} records/s",
         f"lost {fmt(s.get('lost'))}, duplicates received {fmt(s.get('duplicates_received'))} / stored "
         f"{fmt(s.get('duplicates_stored'))}, batches resent {fmt(s.get('batches_resent'))}"),
        ("naive QoS 1, delete on PUBACK", f"{fmt(nv.get('records_per_s'))} records/s",
         f"lost {fmt(nv.get('lost'))} of {n:,} (subscriber stored {fmt(nv.get('stored'))})"),
        ("sync / naive throughput", f"{fmt(ratio, '.2f')}x", ""),
    ]
    w = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    for label, value, note in rows:
        print(f"  {label:<{w}}  {value:>{w2}}  {note}")
    print("\nTargets (information only):")
    for t in results["targets"]:
        verdict = "n/a " if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        print(f"  {verdict}  {t['target']}: {fmt(t['value'])}")
    if results["errors"]:
        print(f"\nFailed steps: {', '.join(results['errors'])}")
    print(f"\nRaw results: {args.out}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Fleet simulation: N devices through a real Mosquitto into `cloud-sync serve` with 1, 2 and 4 ingest workers.

What it does (every case on a fresh Mosquitto with its default settings, persistence off; everything on
127.0.0.1):

1. **Devices.** ``--devices`` simulated devices (default 1,000; ``--quick``: 20) live in a few worker
   processes (``--procs``, default one per 250 devices, at most 4). A worker drives all its devices from
   one thread: one paho client each (MQTT 5, clean start off, Last Will = offline status, as the agent
   connects) on paho's external-loop API (``on_socket_*`` callbacks, ``loop_read``/``loop_write``/
   ``loop_misc``) over one epoll selector. Each device speaks the agent's wire format
   (``edge_runtime.core.protocol``): a retained ``Status``; every ``1 / --rate`` s a ``RecordBatch`` of
   ``--records-per-batch`` predictions (plus a metric snapshot every ``--metrics-interval`` s and a real
   drift summary every ``--drift-interval`` s, as records of the same stream, seqs from 0 per boot); the
   status again every ``--status-interval`` s; QoS 0 telemetry every ``--telemetry-interval`` s. Like the
   agent's sync it keeps at most 4 batches in flight, keeps a batch until the cloud's ``Ack`` names it,
   resends after 10 s, and after a reconnect sends everything unacknowledged again.
2. **Baseline: bare broker round trip.** The same devices at the same load, answered by an echo process
   instead of the cloud: one paho client on the same shared subscription that returns an ``Ack`` built
   from the batch id alone (no JSON decoding of the records, no store).
3. **Cloud cases.** ``cloud-sync serve --broker mqtt://... --group fleet`` as 1, 2 and 4 processes
   (``--workers``; MQTT 5, so ``$share/fleet/edge/v1/+/records`` splits the batches between them), on
   each store of ``--stores``: SQLite (one file shared by the processes: WAL, ``synchronous=FULL``,
   writers take turns) and PostgreSQL (``benchmarks/_shared.Postgres``, restarted here with fsync and
   synchronous commit on, so that an acknowledged record is durable as with SQLite; skipped with a note
   when Debian's postgresql is missing).
4. **Measured, per case**, over a ``--seconds`` window after ``--warmup`` s:
   - latency of every batch first published in the window: from the device handing it to paho to the
     device reading the cloud's ``Ack`` for it. The cloud publishes the ack only after its store commit
     returned, so this is publish -> committed -> ack back: an upper bound of publish -> commit, and the
     baseline's round trip is the same path without the cloud. p50/p90/p99/p99.9/max; also from the
     creation of a batch's first record (adds the wait for a free in-flight slot);
   - throughput: batches acknowledged per second (devices' count) and records committed per second (the
     store's ``received_ms`` inside the window);
   - lost and duplicated, after the drain (devices stop generating and wait up to ``--drain`` s for their
     acks) and after the serve processes stopped: every ``(device, boot, seq)`` a device generated is
     looked up in the store; lost = generated, not stored and no longer held by its device (an agent
     deletes a record only on an ack); held = not stored yet, still in the device's outbox when the drain
     ended (an overloaded cloud; not lost); duplicated = stored rows beyond one per generated key (the
     records and the metrics/drift/events tables); resends that the store ignored are counted apart;
   - CPU (% of one core, from ``/proc/<pid>/stat`` over the window) and RSS (``VmRSS`` at the end and
     its peak while sampled) of Mosquitto, of each cloud process, of the device workers; the machine's
     busy share from ``/proc/stat``.
5. **Rollout** (a separate step; ``--no-rollout`` skips it): devices as above (at ``--rollout-rate``,
   default ``--rate``) with metric snapshots every ``--rollout-metrics-interval`` s, ``--rollout-workers``
   serve process(es) (default 1, the first with the dashboard's JSON API on a free loopback port). With
   several, the rollout lives in the first process only, which sees only the records the shared
   subscription hands it: a device whose snapshots always go to another worker holds a stage back. It
   starts a rollout of a ``--bundle-kb`` bundle of the model (version 1 -> 2) to the whole fleet through
   ``POST /api/v1/rollouts`` (level 5, steps 10, 50, 100 %, each at least ``--stage-seconds`` and 20
   samples, gates p99 and error rate) and watches ``GET /api/v1/rollouts``. The devices obey their
   retained ``cmd/rollout`` orders as the agent does: the device state machine of
   ``edge_runtime.core.rollout``, the bundle fetched from its retained manifest and chunks (each chunk's
   and the whole file's sha256 checked; signature and model checks are not simulated),
   ``rollout_<state>`` events, a new retained status, the ``rollout`` object in every metric snapshot.
   Reported: seconds from the start to 10/50/90/100 % of the devices active on the candidate (the
   devices' own clocks), to the cloud's ``done``, per stage; the plan's floor (the sum of its stages'
   minimum times) is the baseline.
6. Prints a table with ratios to the baseline of the same device count, a "Targets" section, and writes
   the raw figures (per case: latency percentiles and quantiles for plotting, per-worker split, CPU,
   RSS, store checks), ``machine_info()``, the command and UTC times to ``--out``.

``--devices 250,500,1000`` sweeps device counts (each with every case): ``latency_vs_devices`` in the
JSON is ready to plot. ``--broker-conf 'set_tcp_nodelay true'`` adds lines to the broker's config: with
Mosquitto's default (Nagle's algorithm on) about 40 ms of every round trip is TCP's delayed ACK, in
the baseline as in the cloud cases. A hard ``--timeout`` bounds the whole run; every child process is
stopped on the way out, also on Ctrl-C or a failure.

Exit status: 0 when every case ran, whatever the targets say; 1 when a case failed or lost records.

Usage: python benchmarks/fleet_sim.py [--quick] [--devices N[,N...]] [--rate R] [--seconds S]
       [--workers 1,2,4] [--stores sqlite,postgres] [--no-rollout] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import io
import json
import logging
import math
import os
import random
import re
import selectors
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from edge_runtime import __version__  # noqa: E402
from edge_runtime.core import protocol as p  # noqa: E402
from edge_runtime.core.rollout import ModelRef, RolloutError, RolloutMachine  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "fleet_sim.json"
MODEL = "digits_mlp"
VERSION_NOW, VERSION_NEXT = "1", "2"
GROUP = "fleet"
PREFIX = "sim"
WINDOW = 4              # batches in flight per device (the agent's UplinkConfig.window)
RESEND_AFTER_S = 10.0   # the agent's UplinkConfig.resend_after_s
MAX_BATCH_BYTES = 64 * 1024 + 4096  # what the agent's Sync packs at most
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999)

# Targets (information only).
TARGET_DEVICES = 1000
TARGET_P99_MS = 1000.0


def log(msg: str) -> None:
    print(f"[fleet_sim {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt(v: Any, spec: str = ",.1f") -> str:
    return "-" if v is None else format(v, spec)


# ==================================================================================================
# /proc readings (Linux)

def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mb(pid: int, field: str) -> float | None:
    """``VmRSS``/``VmHWM`` of a process in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except OSError:
        return None
    vals = [int(x) for x in first[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


class ProcSampler:
    """CPU over a window (two readings) and RSS sampled every ``every`` s, for named processes."""

    def __init__(self, pids: dict[str, int], every: float = 0.5) -> None:
        self.pids = pids
        self.every = every
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self.cpu0: dict[str, float | None] = {}
        self.t0 = 0.0
        self.m0: tuple[int, int] | None = None

    def _sample_rss(self) -> None:
        for name, pid in self.pids.items():
            v = proc_mb(pid, "VmRSS")
            if v is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), v)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample_rss()

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = {n: proc_cpu_seconds(pid) for n, pid in self.pids.items()}
        self.m0 = machine_ticks()
        self._sample_rss()
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        dt = time.monotonic() - self.t0
        cpu1 = {n: proc_cpu_seconds(pid) for n, pid in self.pids.items()}
        m1 = machine_ticks()
        self._sample_rss()
        self._stop.set()
        self._thread.join(2)
        out: dict[str, Any] = {"seconds": round(dt, 2), "processes": {}}
        for name, pid in self.pids.items():
            a, b = self.cpu0.get(name), cpu1.get(name)
            out["processes"][name] = {
                "pid": pid, "cpu_percent": None if a is None or b is None else round(100 * (b - a) / dt, 1),
                "rss_mb": proc_mb(pid, "VmRSS"), "rss_peak_mb": self.peak.get(name),
                "hwm_mb": proc_mb(pid, "VmHWM")}
        if self.m0 and m1 and m1[1] > self.m0[1]:
            out["machine_busy_percent"] = round(100 * (m1[0] - self.m0[0]) / (m1[1] - self.m0[1]), 1)
        return out


# ==================================================================================================
# The device side: one worker process, many devices, one thread.

def _props_connect() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600  # as the agent's transport: the broker keeps our subscriptions
    return props


class SimDevice:
    """One simulated agent: its MQTT client, its record stream and in-flight window, its rollout state."""

    def __init__(self, sim: Sim, device_id: str, rng: random.Random) -> None:
        self.sim = sim
        self.id = device_id
        self.rng = rng
        self.boot_id = f"{rng.getrandbits(64):016x}"
        self.seq = 0
        self.kinds: Counter[str] = Counter()
        self.pending: list[p.Record] = []
        self.pending_since = 0.0
        # batch_id -> [topic, payload, n_records, first_pub, last_pub, created, in_window]
        self.inflight: dict[str, list[Any]] = {}
        self.connected = False
        self.subscribed = False
        self.conn = 0
        self.next_reconnect = 0.0
        self.counters: Counter[str] = Counter()
        self.version = VERSION_NOW
        self.machine = RolloutMachine(ModelRef(MODEL, VERSION_NOW))
        self.role = "baseline"
        self.since_ms = int(time.time() * 1000)
        self.predictions = 0
        self.role_predictions0 = 0
        self.commands: set[str] = set()
        self.order: dict[str, Any] | None = None
        self.fetch: dict[str, Any] | None = None
        self.active_wall: float | None = None
        self.first_order_wall: float | None = None
        self.fetch_ms: float | None = None
        self.status_due = True
        self.next_tick = self.next_metric = self.next_drift = self.next_status = self.next_telemetry = 0.0
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5, userdata=self)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_socket_open = sim.sock_open
        c.on_socket_close = sim.sock_close
        c.on_socket_register_write = sim.sock_want_write
        c.on_socket_unregister_write = sim.sock_done_write
        self.client = c

    # -- connection -------------------------------------------------------------------------------

    def connect(self) -> None:
        self.conn += 1
        will = p.last_will(self.id, self.boot_id, time_ms=int(time.time() * 1000), agent_version=__version__,
                           conn=self.conn)
        self.client.will_set(will.topic, will.to_wire(), qos=will.QOS, retain=will.RETAIN)
        try:
            if self.conn == 1:
                self.client.connect(self.sim.host, self.sim.port, 30, clean_start=False, properties=_props_connect())
            else:
                self.client.reconnect()
        except OSError as e:
            self.counters["connect_failures"] += 1
            self.next_reconnect = time.monotonic() + 1.0
            if self.counters["connect_failures"] <= 3:
                log(f"{self.id}: connect failed: {e}")

    def _on_connect(self, client: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if reason_code.is_failure:
            self.counters["connect_refused"] += 1
            return
        self.connected = True
        if self.conn > 1:
            self.counters["reconnects"] += 1
        client.subscribe(p.device_subscription(self.id), qos=1)
        self.status_due = True
        for f in self.inflight.values():  # the broker may have no session for us: send again, oldest first
            f[4] = 0.0
        self.sim.dirty.add(self)

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if self.connected and not self.sim.closing:
            self.counters["disconnects"] += 1
            if self.counters["disconnects"] <= 3:
                log(f"{self.id}: disconnected: {reason_code}")
        self.connected = False
        self.next_reconnect = time.monotonic() + 1.0

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, codes: Any, _props: Any) -> None:
        if any(getattr(rc, "is_failure", False) for rc in codes or []):
            self.counters["subscribe_refused"] += 1
            return
        if not self.subscribed:
            self.subscribed = True
            self.sim.subscribed += 1

    # -- what arrives -------------------------------------------------------------------------------

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.monotonic()
        topic, payload = msg.topic, bytes(msg.payload)
        if topic.startswith(p.BUNDLE_TOPIC_PREFIX + "/"):
            self._bundle_message(topic, payload)
            return
        try:
            m = p.decode(topic, payload)
        except p.ProtocolError as e:
            self.counters[f"bad_{e.reason}"] += 1
            return
        if isinstance(m, p.Ack):
            self._ack(m, now)
        elif isinstance(m, p.Command) and m.kind == "rollout":
            self._order(m)

    def _ack(self, ack: p.Ack, now: float) -> None:
        f = self.inflight.pop(ack.batch_id, None)
        if f is None:
            self.counters["acks_unknown"] += 1  # a resent batch acknowledged twice
            return
        if ack.rejected:
            self.counters["batches_rejected"] += 1
            return
        n = sum(p.ranges_count(br.ranges) for br in ack.acked if br.boot_id == self.boot_id)
        if n != f[2]:
            self.counters["acks_short"] += 1
            return
        self.counters["records_acked"] += n
        self.counters["batches_acked"] += 1
        sim = self.sim
        if f[6]:
            sim.lat_ms.append((now - f[3]) * 1000)
            sim.created_lat_ms.append((now - f[5]) * 1000)
        if sim.in_window(now):
            sim.window["acks"] += 1
            sim.window["records_acked"] += n
        sim.dirty.add(self)  # a free slot in the window

    # -- the record stream ----------------------------------------------------------------------------

    def _append(self, kind: str, payload: dict[str, Any], created_ms: int) -> None:
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.append(p.Record(self.seq, kind, created_ms, payload))
        self.seq += 1
        self.kinds[kind] += 1

    def event(self, name: str, ref: str, message: str, severity: str = "info") -> None:
        ev = p.Event(name, severity, message[:200], ref)
        self._append(p.EVENT, ev.to_payload(), int(time.time() * 1000))

    def tick(self, now: float) -> None:
        """One period: predictions, and the metric snapshot, drift summary, status, telemetry that are due."""
        ms = int(time.time() * 1000)
        rng = self.rng
        for _ in range(self.sim.records_per_batch):
            self.predictions += 1
            self._append(p.PREDICTION, {"i": f"{self.id}-{self.seq}", "m": MODEL, "y": rng.randrange(10),
                                        "p": round(rng.uniform(0.55, 1.0), 4)}, ms)
        if now >= self.next_metric:
            self.next_metric = now + self.sim.metrics_interval
            self._append(p.METRIC, self.metric_snapshot(ms), ms)
        if now >= self.next_drift:
            self.next_drift = now + self.sim.drift_interval
            env = p.DriftSummary(MODEL, self.version, ms - int(self.sim.drift_interval * 1000), ms,
                                 self.sim.drift_summary)
            self._append(p.DRIFT, env.to_payload(), ms)
        if now >= self.next_status:
            self.next_status = now + self.sim.status_interval
            self.status_due = True
        if self.connected and now >= self.next_telemetry:
            self.next_telemetry = now + self.sim.telemetry_interval
            t = p.Telemetry(self.id, self.boot_id, ms, {"cpu_percent": round(rng.uniform(5, 40), 1),
                                                         "rss_mb": 82.5, "uptime_s": round(now - self.sim.t_go, 1),
                                                         "pending": len(self.pending)})
            self._publish(t.topic, t.to_wire(), t.QOS, t.RETAIN)

    def metric_snapshot(self, ms: int) -> dict[str, Any]:
        """What the agent's pipeline reports (README: metric snapshots), with the ``rollout`` object."""
        rng = self.rng
        p50 = round(rng.uniform(700, 900), 1)
        shadow = None
        if self.role == "shadow":
            n = self.predictions - self.role_predictions0
            shadow = {"n": n, "agreement_rate": 0.99, "delta_mean": 0.01, "latency_p50_ms": 0.9,
                      "latency_p99_ms": 2.0, "errors": 0, "error_rate": 0.0}
        return {"pipeline": MODEL, "model_version": self.version, "window_s": self.sim.metrics_interval,
                "inputs": self.predictions, "predictions": self.predictions,
                "throughput_per_s": self.sim.records_per_batch * self.sim.rate,
                "latency_us": {"count": self.predictions, "p50": p50, "p90": round(p50 * 1.2, 1),
                               "p99": round(p50 * 1.9, 1), "p99.9": round(p50 * 2.4, 1), "mean": round(p50 * 1.05, 1),
                               "min": round(p50 * 0.7, 1), "max": round(p50 * 3, 1)},
                "errors": {}, "low_confidence": 0, "null_outputs": 0, "low_confidence_rate": 0.0, "labels": {},
                "drift_alarm": False, "cpu_percent": round(rng.uniform(5, 40), 1), "rss_mb": 82.5,
                "temperature_c": None, "uptime_s": round(time.monotonic() - self.sim.t_go, 1),
                "rollout": {"rollout_id": self.machine.rollout_id, "state": self.machine.state, "role": self.role,
                            "candidate_version": self.machine.candidate.version if self.machine.candidate else None,
                            "since_ms": self.since_ms, "samples": max(0, self.predictions - self.role_predictions0),
                            "shadow": shadow, "reason": self.machine.reason}}

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> bool:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.counters["publish_errors"] += 1
            return False
        self.sim.messages_published += 1
        if self.sim.in_window(time.monotonic()):
            self.sim.window["messages"] += 1
        return True

    def flush(self, now: float) -> None:
        """Status when due; resends that are due; then new batches while the window has room."""
        if not self.connected:
            return
        if self.status_due:
            self.status_due = False
            st = p.Status(self.id, True, self.boot_id, int(time.time() * 1000), __version__,
                          (p.ModelStatus(MODEL, self.version, self.machine_state()),), (), self.conn)
            self._publish(st.topic, st.to_wire(), st.QOS, st.RETAIN)
        for f in self.inflight.values():
            if now - f[4] >= RESEND_AFTER_S:
                self.counters["batches_resent" if f[4] > 0 else "batches_resent_after_reconnect"] += 1
                if not self._publish(f[0], f[1], p.RecordBatch.QOS, False):
                    return
                f[4] = now
        while self.pending and len(self.inflight) < WINDOW:
            packed = p.pack_batches(self.pending, MAX_BATCH_BYTES, device_id=self.id, boot_id=self.boot_id)[0]
            created = self.pending_since
            del self.pending[:packed.stop]
            self.pending_since = now
            if not self._publish(packed.topic, packed.payload, p.RecordBatch.QOS, False):
                self.counters["records_unsent"] += packed.stop
                return
            in_window = self.sim.in_window(now)
            self.inflight[packed.batch_id] = [packed.topic, packed.payload, packed.stop, now, now, created, in_window]
            self.counters["batches_sent"] += 1
            if in_window:
                self.sim.window["batches"] += 1
                self.sim.window["records"] += packed.stop

    def machine_state(self) -> str:
        return "active" if self.machine.state in ("idle", "failed", "rolled_back") else self.machine.state

    # -- rollouts: the agent's side, simulated ------------------------------------------------------------

    def _order(self, cmd: p.Command) -> None:
        if cmd.command_id in self.commands:
            return
        self.commands.add(cmd.command_id)
        if self.first_order_wall is None:
            self.first_order_wall = time.time()
        prm = cmd.params
        role, rid = str(prm.get("role")), str(prm.get("rollout_id"))
        bundle = prm.get("bundle") or {}
        self.order = prm
        if role in ("shadow", "candidate"):
            if self.machine.state == "shadow" and self.machine.rollout_id == rid and role == "candidate":
                self._transition("promote", f"cloud: role candidate in rollout {rid}")
                self._became(role, active=True)
                return
            if self.machine.state in ("downloading", "verifying") or (
                    self.machine.rollout_id == rid and self.machine.state in ("active", "shadow")):
                return
            try:
                self._transition("start_download", f"rollout {rid}: role {role}", rollout_id=rid,
                                 name=str(bundle["name"]), version=str(bundle["version"]), sha256=str(bundle["sha256"]))
            except (RolloutError, KeyError) as e:
                self.event("rollout_refused", rid, str(e), "warning")
                return
            bid = str(bundle["bundle_id"])
            self.fetch = {"bundle_id": bid, "role": role, "t0": time.monotonic(), "manifest": None, "chunks": {},
                          "asked": set()}
            self.client.subscribe(p.bundle_manifest_topic(bid), qos=1)
        elif role == "baseline" and self.machine.state in ("shadow", "active") and self.machine.rollout_id == rid:
            self._transition("rollback", f"cloud: role baseline in rollout {rid}")
            self.version = self.machine.active.version if self.machine.active else VERSION_NOW
            self._became("baseline", active=False)

    def _transition(self, event: str, reason: str, **details: Any) -> None:
        t = self.machine.apply(event, reason=reason, now_ms=int(time.time() * 1000), **details)
        self.event(f"rollout_{t.to_state}", self.machine.rollout_id or MODEL, f"{MODEL}: {t.from_state} -> "
                   f"{t.to_state}: {reason}", "warning" if t.to_state in ("failed", "rolled_back") else "info")

    def _became(self, role: str, *, active: bool) -> None:
        self.role = role
        self.since_ms = int(time.time() * 1000)
        self.role_predictions0 = self.predictions
        if active:
            self.version = self.machine.active.version if self.machine.active else self.version
            self.active_wall = time.time()
        self.status_due = True
        self.sim.dirty.add(self)

    def _bundle_message(self, topic: str, payload: bytes) -> None:
        f = self.fetch
        if f is None or not payload:
            return
        try:
            bid, part = p.parse_bundle_topic(topic)
        except p.ProtocolError:
            self.counters["bad_bundle_topic"] += 1
            return
        if bid != f["bundle_id"]:
            return
        if part == "manifest":
            if f["manifest"] is not None:
                return
            try:
                f["manifest"] = p.BundleManifest.from_wire(payload, topic)
            except p.ProtocolError as e:
                self._fetch_failed(f"manifest: {e}")
                return
            self._ask_chunks()
            return
        m = f["manifest"]
        if m is None or not isinstance(part, int) or part in f["chunks"]:
            return
        if hashlib.sha256(payload).hexdigest() != m.chunks[part]:
            self._fetch_failed(f"chunk {part}: sha256 mismatch")
            return
        f["chunks"][part] = payload
        self.client.unsubscribe(m.chunk_topic(part))
        if len(f["chunks"]) < m.count:
            self._ask_chunks()
            return
        whole = b"".join(f["chunks"][i] for i in range(m.count))
        order_sha = str(((self.order or {}).get("bundle") or {}).get("sha256"))
        self.client.unsubscribe(m.topic)
        if hashlib.sha256(whole).hexdigest() != m.sha256 or m.sha256 != order_sha:
            self._fetch_failed("the file's sha256 is not the order's")
            return
        self.fetch = None
        self.fetch_ms = (time.monotonic() - f["t0"]) * 1000
        self._transition("download_done", f"{m.count} chunk(s), {m.size} bytes, sha256 checked")
        if f["role"] == "shadow":
            self._transition("verified_shadow", "checked (simulated): runs beside the active model")
            self._became("shadow", active=False)
        else:
            self._transition("verified_activate", "checked (simulated): serving the candidate")
            self._became("candidate", active=True)

    def _ask_chunks(self) -> None:
        """A few exact chunk topics at a time, as the agent's fetcher asks (never c/+)."""
        f = self.fetch
        assert f is not None
        m = f["manifest"]
        waiting = [i for i in f["asked"] if i not in f["chunks"]]
        for i in range(m.count):
            if len(waiting) >= 4:
                break
            if i not in f["asked"]:
                f["asked"].add(i)
                waiting.append(i)
                self.client.subscribe(m.chunk_topic(i), qos=1)

    def _fetch_failed(self, why: str) -> None:
        self.fetch = None
        self.counters["fetch_failed"] += 1
        with contextlib.suppress(RolloutError):
            self._transition("download_failed", why)

    def held_ranges(self) -> list[tuple[int, int]]:
        """The seqs this device still holds (not acknowledged): the outbox a real agent keeps on disk."""
        out = [tuple(int(x) for x in bid.rpartition(":")[2].split("-")) for bid in self.inflight]
        if self.pending:
            out.append((self.pending[0].seq, self.pending[-1].seq))
        return sorted(out)  # type: ignore[arg-type]

    def result(self) -> dict[str, Any]:
        return {"id": self.id, "boot_id": self.boot_id, "generated": self.seq, "kinds": dict(self.kinds),
                "held": self.held_ranges(),
                "pending": len(self.pending), "unacked_batches": len(self.inflight),
                "unacked_records": sum(f[2] for f in self.inflight.values()), "counters": dict(self.counters),
                "version": self.version, "state": self.machine.state, "active_wall": self.active_wall,
                "first_order_wall": self.first_order_wall, "fetch_ms": self.fetch_ms}


class Sim:
    """One worker process: its devices, one epoll selector, the timers; stdin says go and stop."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.host, self.port = cfg["host"], int(cfg["port"])
        self.rate = float(cfg["rate"])
        self.records_per_batch = int(cfg["records_per_batch"])
        self.metrics_interval = float(cfg["metrics_interval"])
        self.drift_interval = float(cfg["drift_interval"])
        self.status_interval = float(cfg["status_interval"])
        self.telemetry_interval = float(cfg["telemetry_interval"])
        self.drift_summary = cfg["drift_summary"]
        self.sel = selectors.DefaultSelector()
        self.dirty: set[SimDevice] = set()
        self.subscribed = 0
        self.closing = False
        self.messages_published = 0
        self.lat_ms: list[float] = []
        self.created_lat_ms: list[float] = []
        self.window: Counter[str] = Counter()
        self.win_start = self.win_end = math.inf
        self.t_go = time.monotonic()
        rng = random.Random(cfg["seed"])
        self.devices = [SimDevice(self, f"{PREFIX}-{cfg['first'] + k:05d}", random.Random(rng.getrandbits(64)))
                        for k in range(cfg["count"])]
        self._stdin = b""
        self.go_at: float | None = None
        self.stop_requested = False

    # paho's external-loop callbacks
    def sock_open(self, _c: Any, dev: SimDevice, sock: Any) -> None:
        self.sel.register(sock, selectors.EVENT_READ, dev)

    def sock_close(self, _c: Any, _dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(sock)

    def sock_want_write(self, _c: Any, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, dev)

    def sock_done_write(self, _c: Any, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.modify(sock, selectors.EVENT_READ, dev)

    def in_window(self, now: float) -> bool:
        return self.win_start <= now < self.win_end

    def _stdin_lines(self) -> list[str]:
        try:
            data = os.read(sys.stdin.fileno(), 4096)
        except OSError:
            data = b""
        if not data:  # the parent is gone or closed our stdin: stop
            self.stop_requested = True
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sys.stdin.fileno())
            return []
        self._stdin += data
        *lines, self._stdin = self._stdin.split(b"\n")
        return [ln.decode().strip() for ln in lines]

    def _poll(self, timeout: float) -> None:
        for key, mask in self.sel.select(timeout):
            if key.data is None:
                for line in self._stdin_lines():
                    if line.startswith("go "):
                        self.go_at = float(line.split()[1])
                    elif line == "stop":
                        self.stop_requested = True
                continue
            c = key.data.client
            if mask & selectors.EVENT_READ:
                c.loop_read()
            if mask & selectors.EVENT_WRITE:
                c.loop_write()

    def _misc(self, now: float) -> None:
        for d in self.devices:
            if d.client.socket() is not None:
                d.client.loop_misc()
            elif now >= d.next_reconnect and not self.closing:
                d.connect()

    def run(self) -> dict[str, Any]:
        self.sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
        t0 = time.monotonic()
        for d in self.devices:
            d.connect()
            self._poll(0)
        deadline = t0 + float(self.cfg["connect_timeout"])
        while self.subscribed < len(self.devices):
            if time.monotonic() > deadline or self.stop_requested:
                raise RuntimeError(f"{self.subscribed} of {len(self.devices)} devices connected and subscribed in "
                                   f"{self.cfg['connect_timeout']} s")
            self._poll(0.05)
            self._flush_dirty(time.monotonic())
        print("ready " + json.dumps({"connect_s": round(time.monotonic() - t0, 2)}), flush=True)
        while self.go_at is None and not self.stop_requested:
            self._poll(0.1)
            self._flush_dirty(time.monotonic())
        if self.go_at is None:
            return self._result()
        start = time.monotonic() + (self.go_at - time.time())
        self.t_go = start
        self.win_start = start + float(self.cfg["warmup"])
        gen_end = self.win_start + float(self.cfg["seconds"])
        self.win_end = gen_end
        period = 1.0 / self.rate
        heap: list[tuple[float, int]] = []
        for i, d in enumerate(self.devices):  # devices are not synchronised: each starts at its own phase
            d.next_tick = start + d.rng.uniform(0, period)
            d.next_metric = d.next_tick + d.rng.uniform(0, self.metrics_interval)
            d.next_drift = d.next_tick + d.rng.uniform(0, self.drift_interval)
            d.next_status = d.next_tick + d.rng.uniform(0, self.status_interval)
            d.next_telemetry = d.next_tick + d.rng.uniform(0, self.telemetry_interval)
            heapq.heappush(heap, (d.next_tick, i))
        next_misc = time.monotonic() + 1.0
        while True:
            now = time.monotonic()
            if self.stop_requested or now >= gen_end:
                break
            timeout = max(0.0, min((heap[0][0] if heap else now + 0.05) - now, 0.05))
            self._poll(timeout)
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                due, i = heapq.heappop(heap)
                d = self.devices[i]
                d.tick(now)
                self.dirty.add(d)
                heapq.heappush(heap, (due + period, i))
            self._flush_dirty(now)
            if now >= next_misc:
                next_misc = now + 1.0
                self._misc(now)
                self.dirty.update(d for d in self.devices if d.inflight)
        self.win_end = min(self.win_end, time.monotonic())
        # Drain: nothing new, everything generated acknowledged (or the drain time is up).
        drain_end = time.monotonic() + float(self.cfg["drain"])
        self.dirty.update(self.devices)
        while time.monotonic() < drain_end:
            if not any(d.pending or d.inflight for d in self.devices):
                break
            self._poll(0.05)
            now = time.monotonic()
            self._flush_dirty(now)
            if now >= next_misc:
                next_misc = now + 1.0
                self._misc(now)
                self.dirty.update(d for d in self.devices if d.pending or d.inflight)
        drained = not any(d.pending or d.inflight for d in self.devices)
        # Batches of the window still without an ack: their latency is at least their age now (counted in,
        # as a lower bound, so that an overloaded cloud cannot look fast by leaving its slowest out).
        now = time.monotonic()
        censored = [(now - f[3]) * 1000 for d in self.devices for f in d.inflight.values() if f[6]]
        self.lat_ms += censored
        return self._result(drained=drained, drain_s=round(now - self.win_end, 2), censored=len(censored))

    def _flush_dirty(self, now: float) -> None:
        while self.dirty:
            self.dirty.pop().flush(now)

    def _result(self, **extra: Any) -> dict[str, Any]:
        return {**extra, "window_s": round(self.win_end - self.win_start, 3) if self.win_start < math.inf else None,
                "window": dict(self.window), "messages_published": self.messages_published,
                "lat_ms": [round(x, 3) for x in self.lat_ms],
                "created_lat_ms": [round(x, 3) for x in self.created_lat_ms],
                "devices": [d.result() for d in self.devices], "peak_rss_mb": proc_mb(os.getpid(), "VmHWM")}

    def close(self) -> None:
        self.closing = True
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.client.disconnect()
                d.client.loop_write()


def run_worker(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us (stdin); Ctrl-C goes to it
    sim = Sim(cfg)
    try:
        res = sim.run()
    except Exception as e:
        print("error " + json.dumps({"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}),
              flush=True)
        return 1
    finally:
        sim.close()
    print("result " + json.dumps(res, separators=(",", ":")), flush=True)
    return 0


# ==================================================================================================
# The baseline's responder: an echo that acknowledges from the batch id alone.

_HEAD_RE = re.compile(rb'^\{"v":1,"batch_id":"([^"]+)","boot_id":"([^"]+)"')


def run_echo(host: str, port: int) -> int:
    """Acks every batch on the shared subscription without decoding its records or storing anything."""
    stats: Counter[str] = Counter()
    ready = threading.Event()
    stop = threading.Event()

    def on_connect(client: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        client.subscribe(p.shared_subscription(GROUP, p.RecordBatch.KIND), qos=1)

    def on_message(client: Any, _u: Any, msg: Any) -> None:
        stats["messages"] += 1
        m = _HEAD_RE.match(msg.payload)
        if m is None:
            stats["unparsed"] += 1
            return
        batch_id, boot_id = m.group(1).decode(), m.group(2).decode()
        first, _, last = batch_id.rpartition(":")[2].partition("-")
        device_id = msg.topic.split("/")[2]
        ack = p.Ack(device_id, batch_id, (p.BootRanges(boot_id, ((int(first), int(last)),)),))
        client.publish(ack.topic, ack.to_wire(), qos=1)
        stats["acks"] += 1

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="echo-0", protocol=mqtt.MQTTv5)
    c.on_connect = on_connect
    c.on_subscribe = lambda *_a: ready.set()
    c.on_message = on_message
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    c.connect(host, port, 30)
    c.loop_start()
    if ready.wait(10):
        print("echo subscribed", file=sys.stderr, flush=True)
    stop.wait()
    c.disconnect()
    c.loop_stop()
    print("stopped: " + json.dumps(dict(stats)), file=sys.stderr, flush=True)
    return 0


# ==================================================================================================
# The parent: brokers, stores, cloud processes, workers; measuring; cleaning up.

class Children:
    """Every child process this run started, stopped on the way out whatever happened."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
        proc = subprocess.Popen(cmd, start_new_session=True, **kw)  # Ctrl-C reaches the parent only
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, 5.0)


class Interrupted(Exception):
    """SIGTERM, or the overall --timeout: stop everything and report what was measured."""


def _durable_postgres() -> Any:
    """``_shared.Postgres`` (initdb, a free loopback port, trust auth), then restarted with fsync and
    synchronous commit on: an acknowledged record must be on disk, as the SQLite store promises."""
    from _shared import Postgres

    pg = Postgres().start()
    assert pg.proc is not None and pg.base is not None
    pg.proc.send_signal(signal.SIGINT)
    pg.proc.wait(20)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    pg.proc = subprocess.Popen(
        [str(pg.bin_dir / "postgres"), "-D", str(pg.base / "data"), "-k", str(pg.base), "-p", str(pg.port),
         "-c", f"listen_addresses={pg.host}", "-c", "max_connections=50", "-c", "fsync=on",
         "-c", "synchronous_commit=on", "-c", "full_page_writes=on"],
        cwd=pg.base, env=env, stdout=pg._log, stderr=subprocess.STDOUT, **pg._popen_user())
    deadline = time.monotonic() + 30
    while subprocess.run([str(pg.bin_dir / "pg_isready"), "-q", "-h", pg.host, "-p", str(pg.port)],
                         check=False, timeout=10).returncode != 0:
        if pg.proc.poll() is not None or time.monotonic() > deadline:
            pg.stop()
            raise RuntimeError("postgres did not restart with durability on")
        time.sleep(0.05)
    settings = pg.psql("SHOW fsync").strip(), pg.psql("SHOW synchronous_commit").strip()
    if settings != ("on", "on"):
        pg.stop()
        raise RuntimeError(f"postgres restarted with fsync/synchronous_commit {settings}, expected on/on")
    return pg


def make_drift_summary() -> dict[str, Any]:
    """A real drift summary (what the agent's monitor sends for 8 features, 10 classes), made once."""
    import numpy as np

    from edge_runtime.core import drift

    rng = np.random.default_rng(3)
    ref = drift.build_reference(rng.normal(size=(2000, 8)).astype(np.float32), rng.integers(0, 10, size=2000),
                                kind="tabular")
    monitor = drift.DriftMonitor(ref, model=MODEL)
    monitor.update(rng.normal(size=(1000, 8)).astype(np.float32), rng.integers(0, 10, size=1000))
    return monitor.take_summary().to_dict(distances=False)


def make_bundle(path: Path, size_kb: int) -> Path:
    """A bundle archive as far as the cloud reads one (manifest name and version); the devices check its
    hashes, not its model (a real agent would also verify the signature and run the model)."""
    model = random.Random(11).randbytes(size_kb * 1024)
    manifest = json.dumps({"schema": "edge-runtime.bundle/1", "name": MODEL, "version": VERSION_NEXT,
                           "metrics": {"test": {"accuracy": 0.97}},
                           "files": {"model.onnx": {"size": len(model),
                                                    "sha256": hashlib.sha256(model).hexdigest()}}}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("manifest.json", manifest), ("model.onnx", model)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def plan_text(stage_s: float) -> str:
    return f"""name = "fleet-sim"
model = "{MODEL}"
automation_level = 5

[defaults]
min_samples = 20
min_time_s = {stage_s:g}

[[step]]
percent = 10

[[step]]
percent = 50

[[step]]
percent = 100

[gates]
p99_latency_ms_max = 50.0
error_rate_max = 0.01
"""


def percentiles(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    s = sorted(xs)

    def q(f: float) -> float:
        return round(s[min(len(s) - 1, max(0, math.ceil(f * len(s)) - 1))], 2)

    return {"n": len(s), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "p99.9": q(0.999), "max": round(s[-1], 2),
            "mean": round(sum(s) / len(s), 2), "quantiles": {str(f): q(f) for f in QUANTILES}}


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{req.method} {url}: HTTP {e.code}: {e.read().decode(errors='replace')[:500]}") from None


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class Probe:
    """A device that sends one record at a time until the responder acknowledges it: the responders
    are subscribed. Its records are left out of every count (device id ``probe-0``)."""

    def __init__(self, host: str, port: int) -> None:
        self.acks: set[str] = set()
        self.seq = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe-0", protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect(host, port, 30)
        self.c.subscribe(p.device_subscription("probe-0"), qos=1)
        self.c.loop_start()

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with contextlib.suppress(p.ProtocolError):
            m = p.decode(msg.topic, bytes(msg.payload))
            if isinstance(m, p.Ack):
                self.acks.add(m.batch_id)

    def round_trip(self, timeout: float) -> bool:
        self.seq += 1
        b = p.pack_batches([p.Record(self.seq, p.EVENT, int(time.time() * 1000), {"name": "probe"})],
                           device_id="probe-0", boot_id="probe")[0]
        self.c.publish(b.topic, b.payload, qos=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b.batch_id in self.acks:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Case:
    """One measured run: a fresh Mosquitto, the responder (echo or k serve processes on a store), the
    device workers; tears everything down in ``close``."""

    def __init__(self, ctx: Context, *, devices: int, responder: str, workers: int = 0, store: str | None = None,
                 http: bool = False, metrics_interval: float | None = None, rate: float | None = None) -> None:
        self.ctx = ctx
        self.args = ctx.args
        self.n = devices
        self.responder = responder
        self.k = workers
        self.store = store
        self.http = http
        self.metrics_interval = metrics_interval or self.args.metrics_interval
        self.rate = rate
        self.dir = Path(tempfile.mkdtemp(prefix=f"{responder}{workers or ''}-{store or 'none'}-", dir=ctx.tmp))
        self.broker: Any = None
        self.responders: list[subprocess.Popen[Any]] = []
        self.logs: list[Path] = []
        self.workers: list[subprocess.Popen[Any]] = []
        self.db_url: str | None = None
        self.http_url: str | None = None
        self.ready_info: list[dict[str, Any]] = []

    # -- setting up ---------------------------------------------------------------------------------

    def start(self) -> None:
        from _shared import Mosquitto, free_port

        self.broker = Mosquitto(self.dir, "allow_anonymous true\n" + self.args.broker_conf.replace("\\n", "\n") + "\n")
        self.broker.start()
        if self.responder == "echo":
            lg = self.dir / "echo.log"
            self.logs.append(lg)
            self.responders.append(self.ctx.children.start(
                [sys.executable, __file__, "--echo", "--broker-port", str(self.broker.port)],
                stdout=subprocess.DEVNULL, stderr=lg.open("wb")))
        else:
            self.db_url = self.ctx.new_store(self.store or "sqlite", self.dir)
            http_port = free_port() if self.http else None
            for i in range(self.k):
                lg = self.dir / f"serve-{i}.log"
                self.logs.append(lg)
                http = f"127.0.0.1:{http_port}" if (i == 0 and http_port) else "off"
                cmd = [sys.executable, "-m", "cloud_sync.cli", "serve", "--broker", self.broker.url, "--db",
                       self.db_url, "--group", GROUP, "--client-id", f"cloud-sync-{i}", "--http", http,
                       "--bundles-dir", str(self.dir / f"bundles-{i}"), "--stats-interval", "0",
                       "--log-level", "info"]
                self.responders.append(self.ctx.children.start(cmd, cwd=self.dir, stdout=subprocess.DEVNULL,
                                                               stderr=lg.open("wb")))
            if http_port:
                self.http_url = f"http://127.0.0.1:{http_port}"
        needle = "echo subscribed" if self.responder == "echo" else "connected to"

        def all_up() -> bool:
            for proc, lg in zip(self.responders, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"{lg.name} exited {proc.returncode}: {lg.read_text(errors='replace')[-1500:]}")
            return all(needle in lg.read_text(errors="replace") for lg in self.logs)

        wait_for(all_up, 60, f"{len(self.logs)} responder(s) to connect")
        probe = Probe(self.broker.host, self.broker.port)
        try:
            wait_for(lambda: probe.round_trip(0.5), 30, "the responder's first ack")
            for _ in range(2 * max(1, self.k)):  # every shared subscriber answers
                probe.round_trip(2.0)
        finally:
            probe.close()
        if self.http_url:
            wait_for(self._http_ok, 30, "the dashboard's API")

    def _http_ok(self) -> bool:
        try:
            http_json(f"{self.http_url}/healthz", timeout=2)
        except (OSError, RuntimeError, ValueError):
            return False
        return True

    def start_devices(self, seconds: float, warmup: float) -> None:
        a = self.args
        procs = max(1, min(a.procs or min(4, math.ceil(self.n / 250)), self.n))
        per = [self.n // procs + (1 if i < self.n % procs else 0) for i in range(procs)]
        first = 0
        for i, count in enumerate(per):
            cfg = {"host": self.broker.host, "port": self.broker.port, "first": first, "count": count,
                   "seed": 1000 * a.seed + i, "rate": self.rate or a.rate, "records_per_batch": a.records_per_batch,
                   "metrics_interval": self.metrics_interval, "drift_interval": a.drift_interval,
                   "status_interval": a.status_interval, "telemetry_interval": a.telemetry_interval,
                   "drift_summary": self.ctx.drift_summary, "warmup": warmup, "seconds": seconds,
                   "drain": a.drain, "connect_timeout": 60 + count / 20}
            path = self.dir / f"worker-{i}.json"
            path.write_text(json.dumps(cfg))
            self.workers.append(self.ctx.children.start([sys.executable, __file__, "--worker", str(path)],
                                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            first += count
        for w in self.workers:
            assert w.stdout is not None
            line = w.stdout.readline().strip()
            if not line.startswith("ready"):
                rest = line + (w.stdout.read() if w.poll() is not None else "")
                raise RuntimeError(f"a device worker did not start: {rest[-2000:]}")
            self.ready_info.append(json.loads(line[len("ready "):]))

    def go(self, delay: float = 0.5) -> float:
        t0 = time.time() + delay
        for w in self.workers:
            assert w.stdin is not None
            w.stdin.write(f"go {t0:.6f}\n")
            w.stdin.flush()
        return t0

    def tell_stop(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                assert w.stdin is not None
                w.stdin.write("stop\n")
                w.stdin.flush()

    def pids(self) -> dict[str, int]:
        out = {"mosquitto": self.broker.proc.pid}
        for i, r in enumerate(self.responders):
            out[f"echo-{i}" if self.responder == "echo" else f"serve-{i}"] = r.pid
        for i, w in enumerate(self.workers):
            out[f"devices-{i}"] = w.pid
        return out

    def collect(self, timeout: float) -> list[dict[str, Any]]:
        out = []
        deadline = time.monotonic() + timeout
        for w in self.workers:
            try:
                stdout, _ = w.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()
                raise RuntimeError("a device worker did not finish in time") from None
            lines = [ln for ln in stdout.splitlines() if ln.startswith(("result ", "error "))]
            if not lines:
                raise RuntimeError(f"a device worker exited {w.returncode} without a result")
            kind, _, body = lines[-1].partition(" ")
            obj = json.loads(body)
            if kind == "error":
                raise RuntimeError(f"a device worker failed: {obj['error']}\n{obj.get('trace', '')}")
            out.append(obj)
        return out

    # -- tearing down ---------------------------------------------------------------------------------

    def stop_responders(self) -> list[dict[str, Any]]:
        stats = []
        for proc, lg in zip(self.responders, self.logs, strict=True):
            rc = self.ctx.children.stop(proc, 15)
            text = lg.read_text(errors="replace")
            m = re.findall(r"stopped: (\{.*\})", text)
            s: dict[str, Any] = json.loads(m[-1]) if m else {}
            s["exit_code"] = rc
            s["errors_logged"] = len(re.findall(r"^(?:ERROR|CRITICAL) ", text, re.MULTILINE))
            s["warnings_logged"] = len(re.findall(r"^WARNING ", text, re.MULTILINE))
            stats.append(s)
        self.responders = []
        return stats

    def close(self) -> None:
        for w in self.workers:
            with contextlib.suppress(OSError, ValueError):
                if w.stdin is not None:
                    w.stdin.close()
            self.ctx.children.stop(w, 5)
        for r in self.responders:
            self.ctx.children.stop(r, 10)
        self.responders = []
        if self.broker is not None:
            self.broker.stop()


class Context:
    """What the cases share: arguments, child processes, the temp folder, the store servers."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children = Children()
        self.drift_summary = make_drift_summary()
        self.postgres: Any = None
        self.databases = 0

    def new_store(self, kind: str, case_dir: Path) -> str:
        """An empty store, migrated here once so that the serve processes start together on it."""
        from cloud_sync.store import open_store

        if kind == "sqlite":
            url = str(case_dir / "cloud.db")
        else:
            if self.postgres is None:
                self.postgres = _durable_postgres()
            self.databases += 1
            url = self.postgres.create_database(f"fleet_{self.databases}")
        open_store(url).close()
        return url

    def close(self) -> None:
        self.children.stop_all()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


# -- checking the store --------------------------------------------------------------------------------

def _store_rows(url: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if url.startswith(("postgresql://", "postgres://")):
        import psycopg

        with psycopg.connect(url) as conn:
            return list(conn.execute(sql.replace("?", "%s"), args).fetchall())
    import sqlite3

    db = sqlite3.connect(url)
    try:
        return list(db.execute(sql, args).fetchall())
    finally:
        db.close()


def check_store(url: str, devices: list[dict[str, Any]], window_ms: tuple[int, int]) -> dict[str, Any]:
    """Every generated key looked up. Lost: generated, not stored and no longer held by its device (the
    device dropped it after an ack, or never had it); undelivered: not stored yet, still held by its
    device (a real agent keeps it in its outbox and sends it on); duplicated: stored rows beyond one per
    generated key, in the records table or in the metrics/drift/events tables."""
    like = f"{PREFIX}-%"
    per_key: dict[tuple[str, str], tuple[int, int, int]] = {}
    for dev, boot, n, lo, hi in _store_rows(
            url, "SELECT device_id, boot_id, count(*), min(seq), max(seq) FROM records WHERE device_id LIKE ? "
                 "GROUP BY device_id, boot_id", (like,)):
        per_key[(dev, boot)] = (int(n), int(lo), int(hi))

    def complete(d: dict[str, Any]) -> bool:
        # the primary key makes each stored key unique: count and range then say it all
        g = int(d["generated"])
        return per_key.get((d["id"], d["boot_id"]), (0, 0, -1)) == ((g, 0, g - 1) if g else (0, 0, -1))

    partial = {(d["id"], d["boot_id"]) for d in devices if not complete(d)}
    seqs: dict[tuple[str, str], set[int]] = {k: set() for k in partial}
    if partial:
        for dev, boot, seq in _store_rows(url, "SELECT device_id, boot_id, seq FROM records WHERE device_id LIKE ?",
                                          (like,)):
            if (dev, boot) in seqs:
                seqs[(dev, boot)].add(int(seq))
    generated = matched = extra = lost = undelivered = 0
    examples = []
    for d in devices:
        g = int(d["generated"])
        generated += g
        key = (d["id"], d["boot_id"])
        n = per_key.pop(key, (0, 0, -1))[0]
        if key not in partial:
            matched += g
            continue
        stored = seqs[key]
        inside = sum(1 for x in stored if 0 <= x < g)
        matched += inside
        extra += n - inside
        missing = set(range(g)) - stored
        held = {x for a, b in d.get("held", ()) for x in range(a, b + 1)}
        undelivered += len(missing & held)
        lost += len(missing - held)
        if missing - held and len(examples) < 10:
            examples.append({"device": d["id"], "generated": g, "stored": inside, "held": len(held),
                             "missing_not_held": sorted(missing - held)[:10]})
    extra += sum(v[0] for v in per_key.values())  # rows under keys no device generated
    kinds_sent: Counter[str] = Counter()
    for d in devices:
        kinds_sent.update(d["kinds"])
    kinds_stored = {k: int(n) for k, n in _store_rows(
        url, "SELECT kind, count(*) FROM records WHERE device_id LIKE ? GROUP BY kind", (like,))}
    fan = {}
    for table, kind in (("metrics", p.METRIC), ("drift", p.DRIFT), ("events", p.EVENT)):
        (n,), = _store_rows(url, f"SELECT count(*) FROM {table} WHERE device_id LIKE ?", (like,))
        fan[table] = {"rows": int(n), "sent": kinds_sent.get(kind, 0)}
    fan_dup = sum(max(0, v["rows"] - v["sent"]) for v in fan.values())
    (in_window,), = _store_rows(url, "SELECT count(*) FROM records WHERE device_id LIKE ? AND received_ms >= ? "
                                     "AND received_ms < ?", (like, *window_ms))
    return {"generated": generated, "stored": matched + extra, "lost": lost, "undelivered_held_by_devices": undelivered,
            "duplicated": extra + fan_dup, "rows_beyond_generated_keys": extra, "fan_out_tables": fan,
            "kinds_sent": dict(kinds_sent), "kinds_stored": kinds_stored, "lost_examples": examples,
            "records_committed_in_window": int(in_window)}


# -- one case, measured --------------------------------------------------------------------------------

def merge_workers(results: list[dict[str, Any]]) -> dict[str, Any]:
    devices = [d for r in results for d in r["devices"]]
    lat = [x for r in results for x in r["lat_ms"]]
    clat = [x for r in results for x in r["created_lat_ms"]]
    window: Counter[str] = Counter()
    counters: Counter[str] = Counter()
    for r in results:
        window.update(r["window"])
    for d in devices:
        counters.update(d["counters"])
    win_s = min((r["window_s"] for r in results if r.get("window_s")), default=None)
    return {"devices": devices, "lat": lat, "clat": clat, "window": dict(window), "window_s": win_s,
            "counters": dict(counters), "drained": all(r.get("drained") for r in results),
            "drain_s": max((r.get("drain_s") or 0 for r in results), default=None),
            "censored": sum(r.get("censored") or 0 for r in results),
            "unacked_records": sum(d["unacked_records"] for d in devices),
            "pending_records": sum(d["pending"] for d in devices),
            "worker_peak_rss_mb": [r.get("peak_rss_mb") for r in results]}


def run_case(ctx: Context, n: int, responder: str, workers: int = 0, store: str | None = None) -> dict[str, Any]:
    a = ctx.args
    label = "echo (bare broker round trip)" if responder == "echo" else f"serve x{workers} on {store}"
    log(f"{n:,} devices, {label}: starting broker and responder(s)")
    case = Case(ctx, devices=n, responder=responder, workers=workers, store=store)
    try:
        case.start()
        log(f"{n:,} devices, {label}: connecting devices")
        t_conn = time.monotonic()
        case.start_devices(a.seconds, a.warmup)
        connect_s = round(time.monotonic() - t_conn, 2)
        t0 = case.go()
        log(f"{n:,} devices, {label}: connected in {connect_s} s; publishing for {a.warmup:g} s warm-up + "
            f"{a.seconds:g} s measured")
        time.sleep(max(0.0, t0 + a.warmup - time.time()))
        sampler = ProcSampler(case.pids())
        sampler.start()
        win_wall = (int(time.time() * 1000), 0)
        end = t0 + a.warmup + a.seconds
        while time.time() < end:
            time.sleep(min(5.0, max(0.0, end - time.time())))
            if time.time() < end - 1:
                log(f"  ... {end - time.time():.0f} s of the window left")
        usage = sampler.stop()
        win_wall = (win_wall[0], int(time.time() * 1000))
        log(f"{n:,} devices, {label}: window over; draining (at most {a.drain:g} s)")
        merged = merge_workers(case.collect(a.drain + 60))
        responder_stats = case.stop_responders()
        store_check = check_store(case.db_url, merged["devices"], win_wall) if case.db_url else None
        broker_drops = case.broker.log_lines("dropped")
    finally:
        case.close()
    return summarize_case(n, responder, workers, store, connect_s, merged, usage, responder_stats, store_check,
                          broker_drops)


def summarize_case(n: int, responder: str, workers: int, store: str | None, connect_s: float,
                   merged: dict[str, Any], usage: dict[str, Any], responder_stats: list[dict[str, Any]],
                   store_check: dict[str, Any] | None, broker_drops: list[str]) -> dict[str, Any]:
    procs = usage["processes"]

    def total(prefix: str, key: str) -> float | None:
        vals = [v[key] for name, v in procs.items() if name.startswith(prefix) and v.get(key) is not None]
        return round(sum(vals), 1) if vals else None

    win_s = merged["window_s"] or usage["seconds"]
    w = merged["window"]
    c = merged["counters"]
    generated = sum(d["generated"] for d in merged["devices"])
    out: dict[str, Any] = {
        "devices": n, "responder": responder, "workers": workers or None, "store": store,
        "case": "echo" if responder == "echo" else f"serve-x{workers}-{store}",
        "connect_s": connect_s, "window_s": round(win_s, 2),
        "latency_ms": percentiles(merged["lat"]), "latency_from_created_ms": percentiles(merged["clat"]),
        "latency_unacked_at_end": merged["censored"],
        "batches_acked_per_s": round(w.get("acks", 0) / win_s, 1),
        "records_acked_per_s": round(w.get("records_acked", 0) / win_s, 1),
        "batches_published_per_s": round(w.get("batches", 0) / win_s, 1),
        "messages_published_per_s": round(w.get("messages", 0) / win_s, 1),
        "records_generated": generated, "drained": merged["drained"], "drain_s": merged["drain_s"],
        "unacked_records_at_end": merged["unacked_records"], "pending_records_at_end": merged["pending_records"],
        "device_counters": c, "batches_resent": c.get("batches_resent", 0),
        "reconnects": c.get("reconnects", 0), "acks_for_unknown_batches": c.get("acks_unknown", 0),
        "usage": usage,
        "broker_cpu_percent": procs.get("mosquitto", {}).get("cpu_percent"),
        "broker_rss_mb": procs.get("mosquitto", {}).get("rss_peak_mb"),
        "cloud_cpu_percent": total("serve-", "cpu_percent") if responder != "echo" else total("echo-", "cpu_percent"),
        "cloud_rss_mb": total("serve-", "rss_peak_mb") if responder != "echo" else total("echo-", "rss_peak_mb"),
        "devices_cpu_percent": total("devices-", "cpu_percent"),
        "devices_rss_mb": total("devices-", "rss_peak_mb"),
        "machine_busy_percent": usage.get("machine_busy_percent"),
        "other_processes_cpu_percent": None if usage.get("machine_busy_percent") is None else round(
            max(0.0, usage["machine_busy_percent"] * (os.cpu_count() or 1)
                - sum(v["cpu_percent"] or 0 for v in procs.values())), 1),
        "responders": responder_stats, "broker_drop_log": broker_drops[:5], "worker_peak_rss_mb":
            merged["worker_peak_rss_mb"],
    }
    acks = out["batches_acked_per_s"]
    out["cloud_cpu_ms_per_batch"] = (round(out["cloud_cpu_percent"] * 10 / acks, 3)
                                     if acks and out["cloud_cpu_percent"] is not None else None)
    if store_check is not None:
        out["store_check"] = store_check
        out["lost"] = store_check["lost"]
        out["duplicated"] = store_check["duplicated"]
        out["undelivered"] = store_check["undelivered_held_by_devices"]
        out["records_committed_per_s"] = round(store_check["records_committed_in_window"] / win_s, 1)
        out["duplicates_ignored_by_store"] = sum(s.get("records_duplicate", 0) for s in responder_stats)
        out["records_per_worker"] = [s.get("records_new") for s in responder_stats]
    else:
        out["lost"] = out["duplicated"] = out["undelivered"] = None
        out["unacked_in_baseline"] = merged["unacked_records"] + merged["pending_records"]
    lat = out["latency_ms"]
    log(f"  -> p50 {fmt(lat.get('p50'), '.1f')} ms, p99 {fmt(lat.get('p99'), '.1f')} ms, "
        f"{out['batches_acked_per_s']:,.0f} batches/s acked, lost {fmt(out['lost'], ',')}, "
        f"duplicated {fmt(out['duplicated'], ',')}, undelivered (still held by devices) "
        f"{fmt(out['undelivered'], ',')}, resent {out['batches_resent']}")
    return out


# -- the rollout step ---------------------------------------------------------------------------------

def run_rollout(ctx: Context, n: int, store: str) -> dict[str, Any]:
    a = ctx.args
    k = a.rollout_workers
    log(f"rollout: {n:,} devices, serve x{k} on {store}, bundle {a.bundle_kb} KB")
    case = Case(ctx, devices=n, responder="serve", workers=k, store=store, http=True,
                metrics_interval=a.rollout_metrics_interval, rate=a.rollout_rate)
    bundle = make_bundle(case.dir / f"{MODEL}-{VERSION_NEXT}.tar", a.bundle_kb)
    out: dict[str, Any] = {"devices": n, "workers": k, "store": store, "bundle_bytes": bundle.stat().st_size,
                           "rate": a.rollout_rate,
                           "metrics_interval_s": a.rollout_metrics_interval, "stage_min_s": a.stage_seconds}
    try:
        case.start()
        case.start_devices(a.rollout_timeout + 30, 0.0)
        t_go = case.go()
        api = case.http_url
        wait_for(lambda: http_json(f"{api}/api/v1/fleet")["devices"]["online"] >= n, 60 + n / 50,
                 f"{n} devices online in the fleet view", step=0.5)
        # the fleet view needs each device's first metric snapshot (the serving version) before a start
        time.sleep(max(0.0, t_go + a.rollout_metrics_interval + 1.0 - time.time()))
        plan = plan_text(a.stage_seconds)
        out["plan"] = plan
        floor = 3 * a.stage_seconds
        t_start = time.time()
        started = http_json(f"{api}/api/v1/rollouts", {"plan": plan, "bundle": str(bundle), "by": "fleet-sim"},
                            timeout=120)
        rid = started["id"]
        out["start_request_s"] = round(time.time() - t_start, 3)
        log(f"rollout {rid}: started ({out['start_request_s']} s to publish the bundle and the first orders); "
            f"watching (at most {a.rollout_timeout:g} s)")
        stages: list[dict[str, Any]] = [{"stage": started["stage"], "state": started["state"],
                                        "seen_s": round(time.time() - t_start, 2)}]
        deadline = time.time() + a.rollout_timeout
        final = started
        last_log = time.time()
        while time.time() < deadline:
            time.sleep(0.25)
            cur = next(r for r in http_json(f"{api}/api/v1/rollouts") if r["id"] == rid)
            final = cur
            if (cur["stage"], cur["state"]) != (stages[-1]["stage"], stages[-1]["state"]):
                stages.append({"stage": cur["stage"], "state": cur["state"], "seen_s": round(time.time() - t_start, 2),
                               "cohorts": cur.get("cohorts")})
                log(f"  rollout {rid}: {cur['state']} at {cur['stage']} after {stages[-1]['seen_s']} s")
            elif time.time() - last_log > 10:
                last_log = time.time()
                log(f"  rollout {rid}: {cur['state']} at {cur['stage']}: {cur.get('reason')}")
            if cur["state"] in ("done", "rolled_back", "failed"):
                break
        # the devices' last reports and the status of the last activations reach the cloud
        time.sleep(min(3.0, a.rollout_metrics_interval + 1))
        case.tell_stop()
        merged = merge_workers(case.collect(a.drain + 60))
        responder_stats = case.stop_responders()
        store_check = check_store(case.db_url, merged["devices"], (0, 1)) if case.db_url else None
    finally:
        case.close()
    actives = sorted(d["active_wall"] - t_start for d in merged["devices"] if d["active_wall"] is not None)
    orders = sorted(d["first_order_wall"] - t_start for d in merged["devices"] if d["first_order_wall"] is not None)
    fetch = [d["fetch_ms"] for d in merged["devices"] if d["fetch_ms"] is not None]

    def at(frac: float) -> float | None:
        need = math.ceil(frac * n)
        return round(actives[need - 1], 2) if len(actives) >= need else None

    out.update({
        "rollout_id": rid, "final_state": final["state"], "final_stage": final["stage"], "stages": stages,
        "reason": final.get("reason"), "gates": final.get("gates"),
        "seconds_to_first_order": round(orders[0], 2) if orders else None,
        "seconds_to_active": {"10%": at(0.1), "50%": at(0.5), "90%": at(0.9), "100%": at(1.0)},
        "devices_active": len(actives), "devices_on_candidate": sum(1 for d in merged["devices"]
                                                                    if d["version"] == VERSION_NEXT),
        "seconds_to_done": next((s["seen_s"] for s in stages if s["state"] == "done"), None),
        "plan_floor_s": floor, "bundle_fetch_ms": percentiles(fetch),
        "lost": store_check["lost"] if store_check else None,
        "duplicated": store_check["duplicated"] if store_check else None,
        "latency_ms": percentiles(merged["lat"]), "batches_resent": merged["counters"].get("batches_resent", 0),
        "fetch_failures": merged["counters"].get("fetch_failed", 0), "responders": responder_stats,
        "store_check": store_check,
    })
    s100 = out["seconds_to_active"]["100%"]
    out["ratio_to_plan_floor"] = round(s100 / floor, 2) if s100 and floor else None
    log(f"rollout {rid}: {final['state']}; 100 % active after {fmt(s100, '.1f')} s (plan floor {floor:g} s), "
        f"done after {fmt(out['seconds_to_done'], '.1f')} s; lost {fmt(out['lost'], ',')}")
    return out


# ==================================================================================================
# Report

def print_report(results: dict[str, Any], out_path: Path) -> None:
    m = results["machine"]
    a = results["settings"]
    print(f"\nFleet simulation: devices at {a['rate']:g} batch/s each ({a['records_per_batch']} predictions per batch; "
          f"metric snapshot every {a['metrics_interval']:g} s, drift summary every {a['drift_interval']:g} s, status "
          f"every {a['status_interval']:g} s, telemetry every {a['telemetry_interval']:g} s), {a['seconds']:g} s "
          f"measured after {a['warmup']:g} s; Mosquitto {results.get('mosquitto_version') or ''} defaults"
          f"{' + ' + repr(a['broker_conf']) if a['broker_conf'] else ''}; "
          f"{m['cpu']}, {m['cores']} cores\n")
    print("Latency: device publish -> the cloud's ack read by the device (the ack follows the store commit); "
          "baseline: the same with an echo responder (no cloud).\n")
    head = ("devices", "case", "store", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "p99 x base", "acks/s",
            "records/s", "lost", "dup", "held", "resent", "broker CPU%", "cloud CPU%", "ms/batch", "cloud RSS MB",
            "devices CPU%", "others CPU%")
    rows = [head]
    for r in results["runs"]:
        if "error" in r:
            rows.append((f"{r['devices']:,}", r["case"], r.get("store") or "-", "failed", *[""] * (len(head) - 4)))
            continue
        lat = r["latency_ms"]
        rows.append((f"{r['devices']:,}", "echo (baseline)" if r["responder"] == "echo" else f"serve x{r['workers']}",
                     r.get("store") or "-", fmt(lat.get("p50"), ".1f"), fmt(lat.get("p99"), ".1f"),
                     fmt(lat.get("p99.9"), ".1f"), fmt(lat.get("max"), ".0f"), fmt(r.get("p99_ratio"), ".2f"),
                     fmt(r["batches_acked_per_s"], ",.0f"),
                     fmt(r.get("records_committed_per_s", r["records_acked_per_s"]), ",.0f"),
                     fmt(r.get("lost"), ","), fmt(r.get("duplicated"), ","), fmt(r.get("undelivered"), ","),
                     fmt(r["batches_resent"], ","),
                     fmt(r["broker_cpu_percent"]), fmt(r["cloud_cpu_percent"]), fmt(r["cloud_cpu_ms_per_batch"], ".2f"),
                     fmt(r["cloud_rss_mb"]), fmt(r["devices_cpu_percent"]), fmt(r["other_processes_cpu_percent"])))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  " + "  ".join(f"{row[i]:<{widths[i]}}" if i in (1, 2) else f"{row[i]:>{widths[i]}}"
                               for i in range(len(head))))
    notes = ("records/s: committed in the window (the store's received_ms) for serve, acknowledged for the echo.",
             "held: records not stored when the drain ended, still in their devices' outboxes (not lost).",
             "resent: batches sent again after 10 s without an ack.",
             "CPU: % of one core over the window; cloud: all its processes; ms/batch: cloud CPU per batch "
             "acknowledged;",
             "  others: every process outside this benchmark (from /proc/stat). RSS: peak, cloud processes "
             "together.",
             "Batches of the window still unacknowledged at the end count in the percentiles with their age then "
             "(a lower bound).")
    print("\n" + "\n".join(f"  {n}" for n in notes))
    ro = results.get("rollout")
    if ro and "error" not in ro:
        t = ro["seconds_to_active"]
        print(f"\nRollout {MODEL} {VERSION_NOW} -> {VERSION_NEXT} to {ro['devices']:,} devices "
              f"({ro['bundle_bytes']:,}-byte bundle; level 5, steps 10/50/100 %, each >= {ro['stage_min_s']:g} s "
              f"and 20 samples; serve "
              f"x{ro['workers']} on {ro['store']}; {ro['rate']:g} batch/s per device, metric snapshots every "
              f"{ro['metrics_interval_s']:g} s):")
        print(f"  {ro['final_state']} at {ro['final_stage']}; first order after "
              f"{fmt(ro['seconds_to_first_order'], '.2f')} s; "
              f"active on the candidate: 10 % after {fmt(t['10%'], '.1f')} s, 50 % {fmt(t['50%'], '.1f')} s, "
              f"90 % {fmt(t['90%'], '.1f')} s, 100 % {fmt(t['100%'], '.1f')} s; cloud 'done' after "
              f"{fmt(ro['seconds_to_done'], '.1f')} s")
        print(f"  baseline: the plan's floor (3 stages x {ro['stage_min_s']:g} s) = {ro['plan_floor_s']:g} s -> "
              f"100 % active at {fmt(ro['ratio_to_plan_floor'], '.2f')}x the floor; bundle fetch + check per device "
              f"p50 {fmt(ro['bundle_fetch_ms'].get('p50'), '.0f')} ms, "
              f"p99 {fmt(ro['bundle_fetch_ms'].get('p99'), '.0f')} ms; "
              f"records lost {fmt(ro['lost'], ',')}, duplicated {fmt(ro['duplicated'], ',')}; ingest p99 during the "
              f"rollout {fmt(ro['latency_ms'].get('p99'), '.1f')} ms")
        print("  stages: " + ", ".join(f"{s['state']}@{s['stage']} {s['seen_s']:.1f} s" for s in ro["stages"]))
    elif ro:
        print(f"\nRollout: failed: {ro['error']}")
    print("\nTargets (information only):")
    for t in results["targets"]:
        verdict = "n/a " if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        print(f"  {verdict}  {t['target']}: {t['value']}")
    if results["errors"]:
        print(f"\nFailed: {'; '.join(f'{k}: {v}' for k, v in results['errors'].items())}")
    print(f"\nReproduce: {results['command']}")
    print(f"Raw results: {out_path}")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in results["runs"]:
        if r.get("responder") == "echo" or "error" in r:
            continue
        who = f"{r['devices']:,} devices, serve x{r['workers']} on {r['store']}"
        p99 = r["latency_ms"].get("p99")
        if r["devices"] >= TARGET_DEVICES:
            out.append({"target": f"{who}: p99 publish -> commit (ack) < {TARGET_P99_MS:g} ms at "
                                  f"{results['settings']['rate']:g} msg/s per device",
                        "value": f"{fmt(p99, '.1f')} ms", "met": None if p99 is None else p99 < TARGET_P99_MS})
        out.append({"target": f"{who}: 0 lost, 0 duplicated",
                    "value": f"lost {r['lost']}, duplicated {r['duplicated']}",
                    "met": r["lost"] == 0 and r["duplicated"] == 0})
    ro = results.get("rollout")
    if ro and "error" not in ro:
        out.append({"target": f"rollout: 100 % of {ro['devices']:,} devices active, 0 lost",
                    "value": f"{ro['devices_active']:,} active ({fmt(ro['seconds_to_active']['100%'], '.1f')} s), "
                             f"state {ro['final_state']}, lost {ro['lost']}",
                    "met": ro["devices_active"] == ro["devices"] and ro["final_state"] == "done" and ro["lost"] == 0})
    return out


# ==================================================================================================

def parse_list(text: str, kind: Callable[[str], Any]) -> list[Any]:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def mosquitto_version() -> str | None:
    from _shared import mosquitto_binary

    try:
        out = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, RuntimeError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="20 devices at 2/s, 4 s measured, workers 1,2, SQLite only, a short rollout (CI: < 60 s)")
    ap.add_argument("--devices", help="simulated devices, or a comma-separated sweep (default 1000; --quick 20)")
    ap.add_argument("--rate", type=float, help="record batches per second per device (default 1; --quick 2)")
    ap.add_argument("--records-per-batch", type=int, default=10, help="predictions per batch (default 10)")
    ap.add_argument("--metrics-interval", type=float, default=10.0, help="metric snapshot every S s (default 10)")
    ap.add_argument("--drift-interval", type=float, default=30.0, help="drift summary every S s (default 30)")
    ap.add_argument("--status-interval", type=float, default=30.0, help="retained status every S s (default 30)")
    ap.add_argument("--telemetry-interval", type=float, default=10.0, help="QoS 0 telemetry every S s (default 10)")
    ap.add_argument("--seconds", type=float, help="measured window per case (default 30; --quick 4)")
    ap.add_argument("--warmup", type=float, help="seconds of load before the window (default 5; --quick 1)")
    ap.add_argument("--drain", type=float, default=15.0,
                    help="after the window, wait at most S s for every ack (default 15: one resend fits)")
    ap.add_argument("--workers", help="serve process counts (default 1,2,4; --quick 1,2)")
    ap.add_argument("--stores", help="sqlite and/or postgres (default sqlite,postgres; --quick sqlite); postgres "
                                     "needs Debian's postgresql and psycopg, else it is skipped with a note")
    ap.add_argument("--procs", type=int, help="device worker processes (default one per 250 devices, at most 4)")
    ap.add_argument("--no-rollout", action="store_true", help="skip the rollout step")
    ap.add_argument("--rollout-only", action="store_true", help="only the rollout step (no baseline, no cases)")
    ap.add_argument("--rollout-workers", type=int, default=1, help="serve processes for the rollout (default 1)")
    ap.add_argument("--rollout-metrics-interval", type=float, help="metric snapshots during the rollout (default 2; "
                                                                     "--quick 1)")
    ap.add_argument("--rollout-rate", type=float, help="record batches per second per device during the rollout "
                                                       "(default: --rate)")
    ap.add_argument("--stage-seconds", type=float, help="each rollout stage's min_time_s (default 2; --quick 1)")
    ap.add_argument("--bundle-kb", type=int, default=100, help="rollout bundle size (default 100 KB: 2 chunks)")
    ap.add_argument("--rollout-timeout", type=float, help="give the rollout at most S s (default 180; --quick 30)")
    ap.add_argument("--broker-conf", default="", help="extra mosquitto.conf lines ('\\n'-separated), e.g. "
                                                      "'max_queued_messages 10000' (default: none, Mosquitto defaults)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, help="hard limit for the whole run in s (default 3600; --quick 120)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help=f"raw results (default {DEFAULT_OUT.relative_to(REPO)})")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--broker-port", type=int, help=argparse.SUPPRESS)
    return ap


def apply_defaults(args: argparse.Namespace, ap: argparse.ArgumentParser) -> None:
    q = args.quick
    args.device_counts = parse_list(args.devices or ("20" if q else "1000"), int)
    args.rate = args.rate or (2.0 if q else 1.0)
    args.seconds = args.seconds or (4.0 if q else 30.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if q else 5.0)
    args.worker_counts = parse_list(args.workers or ("1,2" if q else "1,2,4"), int)
    args.store_list = parse_list(args.stores or ("sqlite" if q else "sqlite,postgres"), str)
    args.rollout_metrics_interval = args.rollout_metrics_interval or (1.0 if q else 2.0)
    args.rollout_rate = args.rollout_rate or args.rate
    args.stage_seconds = args.stage_seconds or (1.0 if q else 2.0)
    args.rollout_timeout = args.rollout_timeout or (30.0 if q else 180.0)
    args.timeout = args.timeout or (120.0 if q else 3600.0)
    if q:
        args.drain = min(args.drain, 12.0)
    if min(args.device_counts) < 1 or args.rate <= 0 or args.seconds <= 0 or min(args.worker_counts) < 1:
        ap.error("--devices, --rate, --seconds and --workers must be positive")
    if args.rollout_only and args.no_rollout:
        ap.error("--rollout-only and --no-rollout exclude each other")
    bad = [s for s in args.store_list if s not in ("sqlite", "postgres")]
    if bad:
        ap.error(f"--stores: unknown {bad}; expected sqlite and/or postgres")


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    if args.echo:
        return run_echo("127.0.0.1", args.broker_port)
    apply_defaults(args, ap)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="[fleet_sim] %(name)s: %(message)s")
    from edge_runtime.sysinfo import machine_info

    results: dict[str, Any] = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])]),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine_info(),
        "mosquitto_version": mosquitto_version(), "quick": args.quick,
        "settings": {k: getattr(args, k) for k in ("rate", "records_per_batch", "metrics_interval", "drift_interval",
                                                   "status_interval", "telemetry_interval", "seconds", "warmup",
                                                   "drain", "device_counts", "worker_counts", "store_list", "seed",
                                                   "broker_conf")},
        "measures": ("latency_ms: device publish (handed to paho) -> the cloud's Ack read by the device; the cloud "
                     "acks after its store commit returned. latency_from_created_ms: from the batch's first record's "
                     "creation (adds waiting for a free in-flight slot). Baseline (responder echo): the same path with "
                     "an echo that acks from the batch id, no decoding, no store."),
        "runs": [], "errors": {}, "notes": [],
    }
    results["settings"]["window_batches_in_flight"] = WINDOW
    results["settings"]["resend_after_s"] = RESEND_AFTER_S
    stores = list(args.store_list)
    if "postgres" in stores:
        from _shared import POSTGRES_MISSING, postgres_bin_dir

        why = POSTGRES_MISSING if postgres_bin_dir() is None else None
        try:
            import psycopg  # noqa: F401
        except ImportError:
            why = "psycopg is not installed (pip install 'edge-runtime[postgres]')"
        if why:
            stores.remove("postgres")
            results["notes"].append(f"postgres skipped: {why}")
            log(f"postgres skipped: {why}")

    def on_signal(signum: int, _frame: Any) -> None:
        raise Interrupted("SIGTERM" if signum == signal.SIGTERM else f"the overall --timeout of {args.timeout:g} s")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where a shell started us with SIGINT ignored
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(max(1, int(args.timeout)))
    with contextlib.suppress(ValueError, OSError):  # 1,000 sockets in the broker and the parent's children
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536) if hard != resource.RLIM_INFINITY else 65536,
                                                    hard))
    t_all = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="fleet_sim-") as tmp_s:
            ctx = Context(args, Path(tmp_s))
            try:
                plan: list[tuple[int, str, int, str | None]] = []
                for n in args.device_counts if not args.rollout_only else ():
                    plan.append((n, "echo", 0, None))
                    plan += [(n, "serve", k, s) for s in stores for k in args.worker_counts]
                log(f"{len(plan)} case(s): " + ", ".join(f"{n}/{r}{k or ''}{'/' + s if s else ''}"
                                                         for n, r, k, s in plan))
                for n, responder, k, store in plan:
                    name = f"{n}-{'echo' if responder == 'echo' else f'serve-x{k}-{store}'}"
                    try:
                        results["runs"].append(run_case(ctx, n, responder, k, store))
                    except (Interrupted, KeyboardInterrupt):
                        raise
                    except Exception as e:
                        results["errors"][name] = f"{type(e).__name__}: {e}"
                        results["runs"].append({"devices": n, "responder": responder, "workers": k or None,
                                                "store": store, "case": name, "error": str(e)})
                        log(f"{name} failed:\n{traceback.format_exc()}")
                if not args.no_rollout:
                    try:
                        results["rollout"] = run_rollout(ctx, max(args.device_counts), stores[0])
                    except (Interrupted, KeyboardInterrupt):
                        raise
                    except Exception as e:
                        results["errors"]["rollout"] = f"{type(e).__name__}: {e}"
                        results["rollout"] = {"error": str(e)}
                        log(f"rollout failed:\n{traceback.format_exc()}")
            finally:
                ctx.close()
    except (Interrupted, KeyboardInterrupt) as e:
        results["errors"]["interrupted"] = str(e) or "Ctrl-C"
        log(f"interrupted ({results['errors']['interrupted']}): every child process stopped")
    finally:
        signal.alarm(0)
    results["seconds_total"] = round(time.monotonic() - t_all, 1)
    add_ratios(results)
    results["targets"] = targets(results)
    results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
    for r in results["runs"]:
        if r.get("lost"):
            results["errors"].setdefault("lost", []).append(r["case"])  # type: ignore[union-attr]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_report(results, args.out)
    return 1 if results["errors"] else 0


def add_ratios(results: dict[str, Any]) -> None:
    """Each cloud case against the baseline of its device count; quantiles vs device count for plots."""
    base = {r["devices"]: r for r in results["runs"] if r.get("responder") == "echo" and "error" not in r}
    curves: dict[str, list[dict[str, Any]]] = {}
    for r in results["runs"]:
        if "error" in r:
            continue
        b = base.get(r["devices"])
        if b is not None:
            for key in ("p50", "p99"):
                bv, v = b["latency_ms"].get(key), r["latency_ms"].get(key)
                r[f"{key}_ratio"] = round(v / bv, 2) if bv and v is not None else None
            bt = b["batches_acked_per_s"]
            r["throughput_ratio"] = round(r["batches_acked_per_s"] / bt, 3) if bt else None
        curves.setdefault(r["case"], []).append(
            {"devices": r["devices"], "quantiles_ms": r["latency_ms"].get("quantiles")})
    results["latency_vs_devices"] = curves


if __name__ == "__main__":
    sys.exit(main())

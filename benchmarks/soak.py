"""Soak: one real agent on a real model for a long time, with broker restarts and cloud outages on a
schedule; does memory, file descriptors, threads, CPU, the outbox or the latency tail drift?

What it runs (all real processes, nothing mocked):

- a Mosquitto of its own on a free loopback port (``_shared.Mosquitto``, restartable on that port);
- ``cloud-sync serve --broker ... --db cloud.db --http off`` (SQLite store), as a subprocess;
- ``edge-runtime run --model digits_mlp.onnx --source synthetic:RATE --broker ... --buffer outbox.db
  --metrics-port P --metrics-interval WINDOW``: the agent, fed at a fixed rate by its own paced
  synthetic source, syncing every prediction through its durable outbox.

Faults, on a fixed schedule from the agent's start (t = 0): the broker is stopped and, after
``--broker-down-seconds``, started again on the same port every ``--broker-restart-every`` seconds
(Mosquitto runs without persistence: every session and queued message is forgotten); the cloud is
stopped (SIGTERM) every ``--cloud-outage-every`` seconds and started again ``--outage-seconds`` later
on the same store. Every fault ends at least one window plus 12 s (the agent's resend timer, 10 s,
and a reconnect) before the soak does, so the end is measured on a quiet system. Each fault is
logged with its time and kept in the JSON.

How each figure is obtained, every ``--sample-seconds`` (a sample):

- RSS, threads: ``VmRSS`` and ``Threads`` of ``/proc/<agent pid>/status``.
- open fds: the number of entries in ``/proc/<agent pid>/fd``.
- CPU %: the change of utime + stime (``/proc/<agent pid>/stat``) over the wall time since the last
  sample, in % of one core.
- outbox: ``edge_runtime_outbox_pending_records`` (committed, not yet acknowledged by the cloud) from
  the agent's Prometheus ``/metrics``; plus the outbox file size (db + WAL) from the file system.
  Also scraped: ``_sync_connected``, ``_predictions_total``, ``_sync_acked_records_total``.
- the rest of the host: the machine's busy CPU time (``/proc/stat``, steal included) minus the
  agent's, in % of one core, and the 1-minute load average. On a shared machine a neighbour's load
  moves the latency tail; this says when that happened (the cloud and Mosquitto count here too).
- latency p50/p90/p99/p99.9 per window: the agent's own durable metric snapshots (``metric`` records,
  one per ``--window-seconds``, sent through the outbox and read back from the cloud store). Each is
  computed by the agent from the difference of its fine log-linear latency histogram over exactly
  that window (within 0.4%); ``latency`` = preprocess + infer + postprocess, per input. The
  Prometheus histogram is not used for percentiles: its buckets (... 250, 500, 1000, 2500 us) are
  2-2.5x wide, so a p99 interpolated in them can be off by half its value. Progress lines show the
  newest window the cloud has stored (it lags while the cloud is down). After the run every sample
  also gets the p50/p99 of its window.

Trend and verdicts (information only): samples and windows before ``--warmup-seconds`` are left out.
The **baseline** is the first full latency window that starts after the warm-up; each sampled
figure's baseline is the median of the samples inside that window, its "end" the median of the
samples in the last full window. RSS growth per hour is the least-squares slope over all
post-warm-up samples (with its standard error), and again over their second half: growth that
stops (a cache reaching its bound) shows as a second-half slope near 0. The default warm-up (300 s)
covers what grows to a bound by design (onnxruntime's arena, SQLite's page cache, the agent's book
of its last 20,000 prediction ids: 200 s at 100/s). p99 stability compares the median window p99 of
the last third of the post-warm-up windows with that of the first third, next to the CPU the rest
of the host used in each. For each fault: the peak outbox depth and how long after the fault
ended the outbox was back under its threshold (max(50, 2 x baseline depth)); a fault followed by
the next one before that is judged together with the next.

At the end the agent gets SIGTERM (it finishes the batch in hand, sends a last metric snapshot and
drains its outbox for up to ``--drain-seconds``), then the cloud is given time to commit, stopped,
and its store is compared with the outbox: every record the agent committed (the outbox's
``next_seq`` per boot) must be in the store exactly once (lost = committed seqs neither stored nor
still pending; duplicated = stored rows minus distinct keys; resends the cloud deduplicated are
counted from its own ``stopped:`` statistics line), and the report's prediction count must equal the
prediction records stored.

Exit status: 0 when the soak ran to its end, whatever the targets say; 1 when a step failed (a
process died, the hard ``--timeout`` hit); 130 on a second Ctrl-C (the first one, once the agent
serves, ends the soak early and still does the final accounting).

Usage: python benchmarks/soak.py [--minutes 30 | --quick] [--rate HZ] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import Mosquitto, ensure_models, free_port  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "out" / "soak.json"
DEFAULT_MODELS = REPO / "benchmarks" / "out" / "models"
DEVICE = "soak-1"

# Targets (information only).
MAX_RSS_MB_PER_HOUR = 2.0      # least-squares RSS slope after warm-up
MAX_FD_GROWTH = 1              # open fds, end window vs baseline window (medians)
MAX_THREAD_GROWTH = 1          # threads, same
MAX_P99_RATIO = 1.25           # median window p99, last third / first third
MAX_CPU_RATIO = 1.25           # CPU %, end / baseline (or +1 point, whichever is larger)

# After a broker restart the agent may publish before the cloud has subscribed again; the broker drops
# those batches and the agent sends them again after its resend timer (10 s). No fault ends later than
# one window plus this before the end, so the last window is quiet.
RECOVERY_ALLOWANCE_S = 12.0

# Per-mode defaults; any flag given on the command line wins.
# The default warm-up covers what grows to a bound by design: onnxruntime's arena, SQLite's page cache,
# and the agent's book of its last 20,000 prediction ids (200 s at 100/s).
FULL = {"minutes": 30.0, "sample_seconds": 5.0, "window_seconds": 60.0, "warmup_seconds": 300.0,
        "broker_restart_every": 240.0, "broker_down_seconds": 2.0, "cloud_outage_every": 330.0,
        "outage_seconds": 30.0, "drain_seconds": 30.0}
# Quick: broker restarts at 30 and 60 s, a cloud outage at 45-53 s, quiet from 61 s; about 90 s in all.
QUICK = {"minutes": 1.4, "sample_seconds": 2.0, "window_seconds": 10.0, "warmup_seconds": 10.0,
         "broker_restart_every": 30.0, "broker_down_seconds": 1.0, "cloud_outage_every": 45.0,
         "outage_seconds": 8.0, "drain_seconds": 20.0}


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class HardTimeout(Exception):
    """The whole soak ran past ``--timeout``."""


# -- pure helpers -------------------------------------------------------------------------------------

@dataclass
class Fault:
    kind: str                      # "broker_restart" or "cloud_outage"
    start: float                   # scheduled, seconds after the agent's start
    end: float
    actual_start: float | None = None
    actual_end: float | None = None
    wall_start: str | None = None
    peak_pending: int | None = None
    recovered_after_s: float | None = None
    overlapped: bool = False       # the next fault began before the outbox was back: judged with that one


def fault_schedule(duration_s: float, broker_every: float, broker_down_s: float, cloud_every: float,
                   outage_s: float, quiet_tail_s: float) -> list[Fault]:
    """Broker restarts at k * broker_every and cloud outages at k * cloud_every (k >= 1), none starting
    later than ``duration_s - quiet_tail_s`` - its own length, sorted by start."""
    faults: list[Fault] = []
    for kind, every, length in (("broker_restart", broker_every, broker_down_s),
                                ("cloud_outage", cloud_every, outage_s)):
        if every <= 0:
            continue
        k = 1
        while k * every + length <= duration_s - quiet_tail_s:
            faults.append(Fault(kind, k * every, k * every + length))
            k += 1
    return sorted(faults, key=lambda f: (f.start, f.kind))


def slope_per_hour(ts: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    """Least-squares slope of ys over ts (seconds), per hour, and its standard error."""
    n = len(ts)
    if n < 3:
        return None, None
    mt, my = sum(ts) / n, sum(ys) / n
    sxx = sum((t - mt) ** 2 for t in ts)
    if sxx == 0:
        return None, None
    b = sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / sxx
    a = my - b * mt
    resid = sum((y - a - b * t) ** 2 for t, y in zip(ts, ys, strict=True))
    se = math.sqrt(resid / (n - 2) / sxx)
    return b * 3600.0, se * 3600.0


def parse_prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value for every sample line of the text exposition format (summed over label
    sets under the bare name as well, which is what this script needs for single-pipeline agents)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            v = float(value)
        except ValueError:
            continue
        out[key] = v
        bare = key.split("{", 1)[0]
        if bare != key:
            out[bare] = out.get(bare, 0.0) + v
    return out


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None else round(v, nd)


def fault_recovery(series: list[dict[str, Any]], faults: list[Fault]) -> float:
    """Fill each injected fault's peak outbox depth and recovery time; return the threshold used: the
    outbox is "back" once its depth is under max(50, 2 x its median while broker and cloud were up)."""
    quiet = [s["buffer_pending"] for s in series
             if s.get("buffer_pending") is not None and s.get("broker_up", True) and s.get("cloud_up", True)]
    threshold = max(50.0, 2.0 * (_median(quiet) or 0.0))
    injected = [f for f in faults if f.actual_start is not None]
    for i, f in enumerate(injected):
        assert f.actual_start is not None
        f_end = f.actual_end if f.actual_end is not None else f.end
        nxt = injected[i + 1].actual_start if i + 1 < len(injected) else math.inf
        assert nxt is not None
        during = [s for s in series if f.actual_start <= s["t"] < nxt and s.get("buffer_pending") is not None]
        if during:
            f.peak_pending = int(max(s["buffer_pending"] for s in during))
        back = [s for s in during if s["t"] >= f_end and s["buffer_pending"] <= threshold]
        f.recovered_after_s = round(back[0]["t"] - f_end, 1) if back else None
        f.overlapped = not back and nxt != math.inf
    return threshold


def summarize(series: list[dict[str, Any]], windows: list[dict[str, Any]], faults: list[Fault],
              warmup_s: float, window_s: float) -> dict[str, Any]:
    """Baselines, ends, ranges and trends of every figure, the fault recoveries, and the p99 check."""
    out: dict[str, Any] = {"recovery_threshold_records": fault_recovery(series, faults)}
    # A window is disturbed when a fault, or the time until the outbox was back after it, overlaps it.
    spans = []
    for f in faults:
        if f.actual_start is None:
            continue
        f_end = f.actual_end if f.actual_end is not None else f.end
        spans.append((f.actual_start, f_end + (f.recovered_after_s or 0.0)))
    for w in windows:
        w["disturbed"] = any(a < w["t_end"] and b > w["t_start"] for a, b in spans)
    post = [s for s in series if s["t"] >= warmup_s]
    full = [w for w in windows if not w["partial"] and w["t_start"] >= warmup_s - 1.0]
    out.update({"samples_after_warmup": len(post), "windows_after_warmup": len(full)})
    if not post:
        return out
    if full:
        base_w = next((w for w in full if not w["disturbed"]), full[0])
        base_span = (base_w["t_start"], base_w["t_end"])
        end_span = (full[-1]["t_start"], full[-1]["t_end"])
        out["baseline_window_disturbed"] = base_w["disturbed"]
    else:  # too short for a full window: the first and last window's worth of samples
        base_w = None
        base_span = (post[0]["t"], post[0]["t"] + window_s)
        end_span = (post[-1]["t"] - window_s, post[-1]["t"])
    out["baseline_span_s"] = [round(x, 1) for x in base_span]
    out["end_span_s"] = [round(x, 1) for x in end_span]

    def inside(span: tuple[float, float]) -> list[dict[str, Any]]:
        got = [s for s in post if span[0] <= s["t"] <= span[1]]
        return got or [min(post, key=lambda s: abs(s["t"] - span[0]))]

    base_samples, end_samples = inside(base_span), inside(end_span)
    figures: dict[str, Any] = {}
    for key in ("rss_mb", "fds", "threads", "cpu_pct", "buffer_pending", "outbox_mb", "host_other_cpu_pct", "load1"):
        pts = [(s["t"], s[key]) for s in post if s.get(key) is not None]
        if not pts:
            continue
        ys = [y for _, y in pts]
        slope, se = slope_per_hour([t for t, _ in pts], ys)
        late, late_se = slope_per_hour([t for t, _ in pts[len(pts) // 2:]], ys[len(ys) // 2:])
        base = _median([s[key] for s in base_samples if s.get(key) is not None])
        end = _median([s[key] for s in end_samples if s.get(key) is not None])
        figures[key] = {"baseline": _r(base), "end": _r(end), "min": _r(min(ys)), "max": _r(max(ys)),
                        "end_minus_baseline": _r(None if base is None or end is None else end - base),
                        "slope_per_hour": _r(slope, 3), "slope_stderr_per_hour": _r(se, 3),
                        "second_half_slope_per_hour": _r(late, 3), "second_half_slope_stderr_per_hour": _r(late_se, 3)}
    for key in ("p50_us", "p90_us", "p99_us", "p999_us", "throughput_per_s"):
        vals = [(w["t_end"], w[key]) for w in full if w.get(key) is not None]
        if not vals:
            continue
        ys = [y for _, y in vals]
        slope, se = slope_per_hour([t for t, _ in vals], ys)
        base = base_w.get(key) if base_w is not None else None
        figures[key] = {"baseline": base, "end": ys[-1], "min": min(ys), "max": max(ys),
                        "median": _r(statistics.median(ys)),
                        "end_minus_baseline": _r(None if base is None else ys[-1] - base),
                        "slope_per_hour": _r(slope, 3), "slope_stderr_per_hour": _r(se, 3)}
    out["figures"] = figures

    with_p99 = [w for w in full if w.get("p99_us") is not None]
    if with_p99:
        p99 = [w["p99_us"] for w in with_p99]
        third = max(1, len(p99) // 3)
        first, last = statistics.median(p99[:third]), statistics.median(p99[-third:])
        other = [w.get("host_other_cpu_pct") for w in with_p99]
        out["p99"] = {"windows": len(p99), "first_third_median_us": _r(first), "last_third_median_us": _r(last),
                      "host_other_cpu_pct_first_third": _r(_median(other[:third])),
                      "host_other_cpu_pct_last_third": _r(_median(other[-third:])),
                      "last_over_first": _r(last / first if first else None, 3),
                      "spread_us": _r(max(p99) - min(p99)),
                      "cv": _r(statistics.pstdev(p99) / statistics.mean(p99), 3) if len(p99) > 1 else None,
                      "median_in_disturbed_windows_us": _r(_median([w["p99_us"] for w in with_p99
                                                                    if w["disturbed"]])),
                      "median_in_quiet_windows_us": _r(_median([w["p99_us"] for w in with_p99
                                                               if not w["disturbed"]]))}
    return out


def targets(summary: dict[str, Any], faults: list[Fault], accounting: dict[str, Any]) -> list[dict[str, Any]]:
    fig = summary.get("figures", {})

    def t(name: str, value: Any, ok: Callable[[Any], bool]) -> dict[str, Any]:
        return {"target": name, "value": value, "met": None if value is None else bool(ok(value))}

    rss = fig.get("rss_mb", {})
    cpu = fig.get("cpu_pct", {})
    cpu_limit = None
    if cpu.get("baseline") is not None:
        cpu_limit = max(cpu["baseline"] * MAX_CPU_RATIO, cpu["baseline"] + 1.0)
    judged = [f for f in faults if f.actual_start is not None and not f.overlapped]
    return [
        t(f"RSS growth <= {MAX_RSS_MB_PER_HOUR} MB/h (least-squares slope after warm-up)",
          rss.get("slope_per_hour"), lambda v: v <= MAX_RSS_MB_PER_HOUR),
        t(f"open fds: end - baseline <= {MAX_FD_GROWTH}", fig.get("fds", {}).get("end_minus_baseline"),
          lambda v: v <= MAX_FD_GROWTH),
        t(f"threads: end - baseline <= {MAX_THREAD_GROWTH}", fig.get("threads", {}).get("end_minus_baseline"),
          lambda v: v <= MAX_THREAD_GROWTH),
        t(f"CPU: end <= max({MAX_CPU_RATIO} x baseline, baseline + 1 point)", cpu.get("end"),
          lambda v: cpu_limit is not None and v <= cpu_limit),
        t(f"p99 stable: median window p99, last third / first third <= {MAX_P99_RATIO}",
          summary.get("p99", {}).get("last_over_first"), lambda v: v <= MAX_P99_RATIO),
        t("outbox back under its threshold after every fault (overlapped ones: with the next)",
          None if not judged else f"{sum(f.recovered_after_s is not None for f in judged)}/{len(judged)}",
          lambda v: v == f"{len(judged)}/{len(judged)}"),
        t("records: 0 lost", accounting.get("lost"), lambda v: v == 0),
        t("records: 0 duplicated in the store", accounting.get("duplicated_stored"), lambda v: v == 0),
        t("predictions reported == prediction records stored", accounting.get("predictions_match"),
          lambda v: v is True),
    ]


# -- processes ------------------------------------------------------------------------------------------

class ProcProbe:
    """RSS, threads, open fds and CPU % of one process from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")
        self._last: tuple[float, float] | None = None

    def cpu_seconds(self) -> float:
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 (state) is index 0
        return (int(fields[11]) + int(fields[12])) / self.tick

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        status = Path(f"/proc/{self.pid}/status").read_text()
        vals = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        cpu = self.cpu_seconds()
        pct = None
        if self._last is not None and now > self._last[0]:
            pct = round(100.0 * (cpu - self._last[1]) / (now - self._last[0]), 1)
        self._last = (now, cpu)
        return {"rss_mb": round(int(vals["VmRSS"].split()[0]) / 1024.0, 2), "threads": int(vals["Threads"]),
                "fds": sum(1 for _ in Path(f"/proc/{self.pid}/fd").iterdir()), "cpu_pct": pct}


class HostProbe:
    """The whole machine: CPU busy time of all cores (/proc/stat, steal included: a neighbour VM's load
    is noise too) and the 1-minute load average, to tell the agent's drift from its neighbours'."""

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self._last: tuple[int, int] | None = None

    def sample(self, agent_cpu_pct: float | None) -> dict[str, Any]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        total, idle = sum(fields[:8]), fields[3] + fields[4]  # user..steal; idle + iowait
        pct = None
        if self._last is not None and total > self._last[0]:
            busy = (total - self._last[0]) - (idle - self._last[1])
            pct = round(100.0 * self.cores * busy / (total - self._last[0]), 1)  # % of one core
        self._last = (total, idle)
        other = None if pct is None or agent_cpu_pct is None else round(max(0.0, pct - agent_cpu_pct), 1)
        return {"host_cpu_pct": pct, "host_other_cpu_pct": other,
                "load1": float(Path("/proc/loadavg").read_text().split()[0])}


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Cloud:
    """``cloud-sync serve`` on the soak's broker and SQLite store; stopped and started for outages."""

    def __init__(self, broker_url: str, db: Path, log_path: Path) -> None:
        self.cmd = [sys.executable, "-m", "cloud_sync.cli", "serve", "--broker", broker_url, "--db", str(db),
                    "--http", "off", "--stats-interval", "0", "--client-id", "soak-cloud"]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        self.starts += 1
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as f:
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                         start_new_session=True)  # Ctrl-C reaches the soak only
        deadline = time.monotonic() + timeout
        while b"ingesting from" not in self._read_from(offset):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"cloud-sync serve did not start: {self._read_from(offset)[-1500:]!r}")
            time.sleep(0.05)

    def _read_from(self, offset: int) -> bytes:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read()

    def stop(self) -> int | None:
        rc = _stop_process(self.proc, 20)
        self.proc = None
        return rc

    def stats(self) -> list[dict[str, Any]]:
        """The ``stopped: {...}`` statistics line of every serve process so far."""
        out = []
        if self.log_path.exists():
            for m in re.finditer(r"stopped: (\{.*\})", self.log_path.read_text(errors="replace")):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(m.group(1)))
        return out


def _read_only(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)


def latest_window(store: Path) -> dict[str, Any] | None:
    """The newest metric snapshot the cloud has stored (None before the first, or when unreadable)."""
    try:
        conn = _read_only(store)
        try:
            row = conn.execute("SELECT payload FROM records WHERE device_id = ? AND kind = 'm' "
                               "ORDER BY created_ms DESC LIMIT 1", (DEVICE,)).fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    return json.loads(row[0]) if row else None


def file_mb(path: Path) -> float:
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    return round(size / 2**20, 3)


# -- the soak ----------------------------------------------------------------------------------------

@dataclass
class Config:
    model: Path
    rate: float
    duration_s: float
    sample_s: float
    window_s: float
    warmup_s: float
    broker_every: float
    broker_down_s: float
    cloud_every: float
    outage_s: float
    drain_s: float
    timeout_s: float
    workdir: Path
    profile: str | None = None
    metrics: bool = True


class Soak:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        w = cfg.workdir
        self.outbox, self.store = w / "outbox.db", w / "cloud.db"
        self.report_path, self.agent_log = w / "agent-report.json", w / "agent.log"
        self.broker = Mosquitto(w, name="soak")
        self.cloud = Cloud(self.broker.url, self.store, w / "cloud.log")
        self.metrics_port = free_port() if cfg.metrics else 0
        self.agent_cmd = [sys.executable, "-m", "edge_runtime.cli", "run", "--model", str(cfg.model),
                          "--source", f"synthetic:{cfg.rate:g}", "--broker", self.broker.url, "--device-id", DEVICE,
                          "--buffer", str(self.outbox), "--metrics-interval", f"{cfg.window_s:g}",
                          "--drain-timeout", f"{cfg.drain_s:g}", "--report-json", str(self.report_path),
                          "--status-interval", "60", "--no-rollouts"]
        if cfg.metrics:
            self.agent_cmd += ["--metrics-port", str(self.metrics_port)]
        if cfg.profile:
            self.agent_cmd += ["--profile", cfg.profile]
        self.agent: subprocess.Popen[bytes] | None = None
        self.probe: ProcProbe | None = None
        self.host = HostProbe()
        self.t0 = 0.0
        self.wall0 = 0.0
        self.series: list[dict[str, Any]] = []
        self.faults = fault_schedule(cfg.duration_s, cfg.broker_every, cfg.broker_down_s, cfg.cloud_every,
                                     cfg.outage_s, quiet_tail_s=cfg.window_s + RECOVERY_ALLOWANCE_S)
        self.events: list[tuple[float, str, Fault]] = sorted(
            [(f.start, "begin", f) for f in self.faults] + [(f.end, "end", f) for f in self.faults],
            key=lambda e: (e[0], e[1] == "begin"))  # an "end" before a "begin" at the same time
        self.interrupted = False
        self.agent_report: dict[str, Any] = {}

    def t(self) -> float:
        return time.monotonic() - self.t0

    # -- phases --

    def start(self) -> None:
        self.broker.start()
        self.cloud.start()
        log(f"broker {self.broker.url}, cloud store {self.store}")
        with self.agent_log.open("ab") as f:
            self.agent = subprocess.Popen(self.agent_cmd, stdout=subprocess.DEVNULL, stderr=f, cwd=REPO,
                                          start_new_session=True)
        self.t0, self.wall0 = time.monotonic(), time.time()
        self.probe = ProcProbe(self.agent.pid)
        log(f"agent pid {self.agent.pid}: {shlex.join(self.agent_cmd)}")
        if self.cfg.metrics:  # the agent is serving once /metrics answers
            deadline = time.monotonic() + 60
            while self.scrape() is None:
                self._check_agent()
                if time.monotonic() > deadline:
                    raise RuntimeError("the agent's /metrics never answered")
                time.sleep(0.2)
        log(f"agent serving after {self.t():.1f} s; {len(self.faults)} faults scheduled: "
            + ", ".join(f"{f.kind} at {f.start:g}-{f.end:g} s" for f in self.faults))

    def _check_agent(self) -> None:
        assert self.agent is not None
        if self.agent.poll() is not None:
            tail = self.agent_log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the agent exited early with status {self.agent.returncode}: {tail}")

    def scrape(self) -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return parse_prometheus(r.read().decode())
        except OSError:
            return None

    def sample(self) -> dict[str, Any]:
        assert self.probe is not None
        s: dict[str, Any] = {"t": round(self.t(), 2)}
        s.update(self.probe.sample())
        s.update(self.host.sample(s["cpu_pct"]))
        prom = (self.scrape() if self.cfg.metrics else None) or {}
        get = prom.get
        pending, connected = get("edge_runtime_outbox_pending_records"), get("edge_runtime_sync_connected")
        s.update({"buffer_pending": None if pending is None else int(pending), "outbox_mb": file_mb(self.outbox),
                  "connected": None if connected is None else int(connected),
                  "predictions": get("edge_runtime_predictions_total"),
                  "acked": get("edge_runtime_sync_acked_records_total"),
                  "broker_up": self.broker.proc is not None, "cloud_up": self.cloud.up})
        self.series.append(s)
        return s

    def progress(self, s: dict[str, Any]) -> None:
        w = latest_window(self.store)
        lat = w.get("latency_us", {}) if w else {}
        state = "" if s["broker_up"] and s["cloud_up"] else (
            " [" + ", ".join(x for x, up in (("broker down", s["broker_up"]), ("cloud down", s["cloud_up"]))
                             if not up) + "]")
        cpu = "-" if s["cpu_pct"] is None else f"{s['cpu_pct']:.1f}"
        pend = "-" if s["buffer_pending"] is None else f"{s['buffer_pending']}"
        other = "-" if s["host_other_cpu_pct"] is None else f"{s['host_other_cpu_pct']:.0f}"
        log(f"t={s['t']:7.1f}s rss {s['rss_mb']:.1f} MB, fds {s['fds']}, threads {s['threads']}, cpu {cpu}%, "
            f"outbox {pend} pending ({s['outbox_mb']:.2f} MB), stored window p50/p99 "
            f"{lat.get('p50', '-')}/{lat.get('p99', '-')} us; rest of host {other}% cpu, load {s['load1']:.2f}"
            f"{state}")

    def inject(self, what: str, f: Fault) -> None:
        now = self.t()
        if what == "begin":
            f.actual_start, f.wall_start = round(now, 2), datetime.now(UTC).isoformat(timespec="seconds")
            if f.kind == "broker_restart":
                self.broker.stop()
                log(f"FAULT t={now:.1f}s: broker stopped (restart on port {self.broker.port} in "
                    f"{f.end - f.start:g} s)")
            else:
                self.cloud.stop()
                log(f"FAULT t={now:.1f}s: cloud stopped (outage of {f.end - f.start:g} s)")
        elif f.kind == "broker_restart":
            self.broker.start()
            f.actual_end = round(self.t(), 2)
            log(f"FAULT t={f.actual_end:.1f}s: broker started again")
        else:
            self.cloud.start()
            f.actual_end = round(self.t(), 2)
            log(f"FAULT t={f.actual_end:.1f}s: cloud started again")

    def loop(self) -> None:
        cfg = self.cfg
        next_sample = self.t()
        try:
            while self.t() < cfg.duration_s:
                self._check_agent()
                while self.events and self.events[0][0] <= self.t():
                    _, what, f = self.events.pop(0)
                    self.inject(what, f)
                if self.t() >= next_sample:
                    self.progress(self.sample())
                    while next_sample <= self.t():
                        next_sample += cfg.sample_s
                wake = min([next_sample, cfg.duration_s] + ([self.events[0][0]] if self.events else []))
                time.sleep(min(max(wake - self.t(), 0.01), 0.5))
        except KeyboardInterrupt:
            self.interrupted = True
            log("interrupted: stopping the agent cleanly and checking the records (Ctrl-C again to abort)")

    def finish(self) -> dict[str, Any]:
        """Restore whatever is down, stop the agent cleanly, let the cloud commit, stop it; account."""
        for _, what, f in [e for e in self.events if e[1] == "end" and e[2].actual_start is not None]:
            self.inject(what, f)
        self.events = []
        if self.broker.proc is None or self.broker.proc.poll() is not None:  # e.g. killed by the Ctrl-C
            self.broker.stop()
            self.broker.start()
        if not self.cloud.up:
            self.cloud.start()
        assert self.agent is not None
        log(f"t={self.t():.1f}s: stopping the agent (SIGTERM; it drains its outbox for up to {self.cfg.drain_s:g} s)")
        self.agent.send_signal(signal.SIGTERM)
        rc = self.agent.wait(self.cfg.drain_s + 60)
        agent_stop_s = round(self.t(), 1)
        report = json.loads(self.report_path.read_text()) if self.report_path.exists() else {}
        committed, pending_seqs = self._outbox_state()
        total = sum(committed.values())
        deadline = time.monotonic() + 30
        while self._stored_count() < total - sum(len(v) for v in pending_seqs.values()):
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        self.cloud.stop()
        acc = self._account(committed, pending_seqs, report)
        acc.update({"agent_exit_status": rc, "agent_stopped_at_s": agent_stop_s})
        self.agent_report = report
        return acc

    def _outbox_state(self) -> tuple[dict[str, int], dict[str, set[int]]]:
        conn = sqlite3.connect(self.outbox)
        try:
            committed = dict(conn.execute("SELECT boot_id, next_seq FROM boots WHERE device_id = ?", (DEVICE,)))
            pending: dict[str, set[int]] = {}
            for boot, seq in conn.execute("SELECT boot_id, seq FROM outbox WHERE device_id = ?", (DEVICE,)):
                pending.setdefault(boot, set()).add(seq)
        finally:
            conn.close()
        return committed, pending

    def _stored_count(self) -> int:
        try:
            conn = _read_only(self.store)
            try:
                return int(conn.execute("SELECT count(*) FROM records WHERE device_id = ?", (DEVICE,)).fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error:
            return -1

    def _account(self, committed: dict[str, int], pending: dict[str, set[int]],
                 report: dict[str, Any]) -> dict[str, Any]:
        conn = _read_only(self.store)
        try:
            rows = conn.execute("SELECT boot_id, seq, kind FROM records WHERE device_id = ?", (DEVICE,)).fetchall()
        finally:
            conn.close()
        keys = {(b, s) for b, s, _ in rows}
        by_kind: dict[str, int] = {}
        for _, _, k in rows:
            by_kind[k] = by_kind.get(k, 0) + 1
        lost = sum(1 for boot, n in committed.items() for seq in range(n)
                   if (boot, seq) not in keys and seq not in pending.get(boot, set()))
        unexpected = sum(1 for b, s in keys if b not in committed or not 0 <= s < committed[b])
        predictions = sum(p.get("predictions", 0) for p in report.get("pipelines", []))
        pending_n = sum(len(v) for v in pending.values())
        pending_p = 0
        if pending_n:
            conn = sqlite3.connect(self.outbox)
            try:
                pending_p = conn.execute("SELECT count(*) FROM outbox WHERE device_id = ? AND kind = 'prediction'",
                                         (DEVICE,)).fetchone()[0]
            finally:
                conn.close()
        cloud_stats = self.cloud.stats()
        uplink = report.get("uplink", {})
        dropped = uplink.get("buffer", {}).get("dropped", {})
        return {
            "boots": len(committed), "committed": sum(committed.values()), "stored": len(keys),
            "stored_rows": len(rows), "stored_by_kind": by_kind, "left_in_outbox": pending_n, "lost": lost,
            "duplicated_stored": len(rows) - len(keys), "unexpected_stored": unexpected,
            "outbox_dropped": sum(dropped.values()) if isinstance(dropped, dict) else dropped,
            "predictions_reported": predictions, "prediction_records_stored": by_kind.get("p", 0),
            "predictions_match": bool(report) and predictions == by_kind.get("p", 0) + pending_p,
            "duplicates_received_by_cloud": sum(s.get("records_duplicate", 0) for s in cloud_stats),
            "cloud_rejected": [s.get("rejected") for s in cloud_stats if s.get("rejected")],
            "cloud_starts": self.cloud.starts,
        }

    def windows(self) -> list[dict[str, Any]]:
        """Every metric snapshot of the agent in the store, as a latency window on the soak's clock."""
        try:
            conn = _read_only(self.store)
            try:
                rows = conn.execute("SELECT created_ms, payload FROM records WHERE device_id = ? AND kind = 'm' "
                                    "ORDER BY created_ms", (DEVICE,)).fetchall()
            finally:
                conn.close()
        except sqlite3.Error:
            return []
        out = []
        for created_ms, payload in rows:
            m = json.loads(payload)
            lat = m.get("latency_us", {})
            t_end = created_ms / 1000.0 - self.wall0
            t_start = t_end - float(m.get("window_s", 0.0))
            out.append({
                "t_start": round(t_start, 2), "t_end": round(t_end, 2), "window_s": m.get("window_s"),
                "partial": float(m.get("window_s", 0.0)) < 0.75 * self.cfg.window_s, "count": lat.get("count", 0),
                "p50_us": lat.get("p50"), "p90_us": lat.get("p90"), "p99_us": lat.get("p99"),
                "p999_us": lat.get("p99.9"), "max_us": lat.get("max"), "throughput_per_s": m.get("throughput_per_s"),
                "agent_rss_mb": m.get("rss_mb"), "agent_cpu_pct": m.get("cpu_percent"),
                "faults": [i for i, f in enumerate(self.faults) if f.actual_start is not None
                           and f.actual_start < t_end and (f.actual_end or f.end) > t_start],
            })
        return out

    def close(self) -> None:
        """Stop everything still running (any failure path lands here)."""
        if self.agent is not None and self.agent.poll() is None:
            _stop_process(self.agent, self.cfg.drain_s + 10)
        self.cloud.stop()
        self.broker.stop()


# -- output ------------------------------------------------------------------------------------------

def fmt(v: Any, spec: str = ".1f") -> str:
    if v is None:
        return "-"
    if isinstance(v, (bool, str)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return format(v, spec)


def print_report(r: dict[str, Any]) -> None:
    s, acc, cfg = r.get("summary", {}), r.get("accounting", {}), r["config"]
    faults = r.get("faults", [])
    kinds = [f["kind"] for f in faults if f["actual_start"] is not None]
    m = r["machine"]
    ran = r.get("ran_s", 0)
    length = f"{ran / 60:.1f} min" if ran >= 600 else f"{ran:.0f} s"
    print(f"\nSoak: {Path(cfg['model']).name} at {cfg['rate']:g}/s for {length}, "
          f"{kinds.count('broker_restart')} broker restarts, {kinds.count('cloud_outage')} cloud outages "
          f"({m.get('cpu')}, {m.get('cores')} cores)")
    if ran < 600:
        print("note: under 10 minutes the per-hour trends are extrapolations of seconds of data; judge "
              "leaks from a long run")
    span = s.get("baseline_span_s")
    disturbed = " (every one was: the first taken)" if s.get("baseline_window_disturbed") else ""
    print(f"baseline: the first full {cfg['window_s']:g} s latency window after the {cfg['warmup_s']:g} s warm-up "
          f"with no fault or recovery in it{disturbed}" + (f", t = {span[0]:g}-{span[1]:g} s" if span else "")
          + "; end: the last full window\n")
    rows = [("RSS (MB)", "rss_mb"), ("open fds", "fds"), ("threads", "threads"), ("CPU (% of a core)", "cpu_pct"),
            ("outbox pending (records)", "buffer_pending"), ("outbox file (MB)", "outbox_mb"),
            ("latency p50 (us)", "p50_us"), ("latency p99 (us)", "p99_us"), ("latency p99.9 (us)", "p999_us"),
            ("throughput (/s)", "throughput_per_s"), ("rest of the host CPU (% of a core)", "host_other_cpu_pct"),
            ("load average, 1 min", "load1")]
    head = f"  {'figure':<36}{'baseline':>10}{'end':>10}{'min':>10}{'max':>10}   {'trend per hour (+- s.e.)':<26}"
    print(head)
    fig = s.get("figures", {})
    for label, key in rows:
        f = fig.get(key)
        if not f:
            continue
        slope = f.get("slope_per_hour")
        trend = "-" if slope is None else f"{slope:+.2f} +- {f.get('slope_stderr_per_hour') or 0:.2f}"
        print(f"  {label:<36}{fmt(f['baseline']):>10}{fmt(f['end']):>10}{fmt(f['min']):>10}{fmt(f['max']):>10}   "
              f"{trend:<26}")
    rss = fig.get("rss_mb", {})
    if rss.get("second_half_slope_per_hour") is not None:
        print(f"\n  RSS slope over the second half of the samples after warm-up: "
              f"{rss['second_half_slope_per_hour']:+.2f} +- {rss['second_half_slope_stderr_per_hour']:.2f} MB/h")
    p99 = s.get("p99")
    if p99:
        print(f"\n  p99 over {p99['windows']} windows: first third median {fmt(p99['first_third_median_us'])} us, "
              f"last third {fmt(p99['last_third_median_us'])} us (ratio {fmt(p99['last_over_first'], '.3f')}), "
              f"spread {fmt(p99['spread_us'])} us, CV {fmt(p99['cv'], '.3f')}")
        print(f"  median p99 in windows with a fault or its recovery {fmt(p99['median_in_disturbed_windows_us'])} us, "
              f"in quiet ones {fmt(p99['median_in_quiet_windows_us'])} us; CPU used by the rest of the host: "
              f"first third {fmt(p99['host_other_cpu_pct_first_third'])}%, "
              f"last third {fmt(p99['host_other_cpu_pct_last_third'])}% of a core")
    if faults:
        print(f"\n  faults (outbox threshold {fmt(s.get('recovery_threshold_records'), 'g')} records):")
        for f in faults:
            if f["actual_start"] is None:
                continue
            rec = (f"back under it {f['recovered_after_s']:g} s after" if f["recovered_after_s"] is not None
                   else "the next fault began before it was back" if f["overlapped"] else "NOT back by the end")
            print(f"    t={f['actual_start']:7.1f}s {f['kind']:<15} until t={fmt(f['actual_end'])}s, "
                  f"peak outbox {fmt(f['peak_pending'])} records, {rec}")
    if acc:
        print(f"\n  records: committed {fmt(acc.get('committed'))}, stored {fmt(acc.get('stored'))}, "
              f"lost {fmt(acc.get('lost'))}, duplicated {fmt(acc.get('duplicated_stored'))}, "
              f"left in outbox {fmt(acc.get('left_in_outbox'))}, dropped by the outbox {fmt(acc.get('outbox_dropped'))}"
              f"; resends deduplicated by the cloud {fmt(acc.get('duplicates_received_by_cloud'))}")
        print(f"  predictions: reported {fmt(acc.get('predictions_reported'))}, "
              f"stored {fmt(acc.get('prediction_records_stored'))}")
    print("\nTargets (information only):")
    for t in r.get("targets", []):
        verdict = "n/a " if t["met"] is None else ("PASS" if t["met"] else "FAIL")
        print(f"  {verdict}  {t['target']}: {fmt(t['value'], '.3g')}")
    if r.get("errors"):
        print(f"\nFailed: {'; '.join(r['errors'])}")
    print(f"\nreproduce: {r['command']}")
    print(f"raw results: {r['out']}")


# -- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="84 s: 2 broker restarts and 1 cloud outage, 10 s windows (CI)")
    ap.add_argument("--minutes", type=float, help="soak length after the agent starts (default 30; --quick 1.4)")
    ap.add_argument("--rate", type=float, default=100.0, help="inputs per second (default 100)")
    ap.add_argument("--sample-seconds", type=float, help="sampling period (default 5; --quick 2)")
    ap.add_argument("--window-seconds", type=float,
                    help="latency window = the agent's --metrics-interval (default 60; --quick 10)")
    ap.add_argument("--warmup-seconds", type=float, help="left out of the trend (default 300; --quick 10)")
    ap.add_argument("--broker-restart-every", type=float, metavar="S",
                    help="restart the broker every S seconds (default 240; --quick 30; 0: never)")
    ap.add_argument("--broker-down-seconds", type=float, help="broker down time per restart (default 2; --quick 1)")
    ap.add_argument("--cloud-outage-every", type=float, metavar="S",
                    help="stop the cloud every S seconds (default 330; --quick 45; 0: never)")
    ap.add_argument("--outage-seconds", type=float, help="cloud outage length (default 30; --quick 8)")
    ap.add_argument("--drain-seconds", type=float, help="the agent's --drain-timeout at the end (default 30; quick 20)")
    ap.add_argument("--timeout", type=float, help="hard limit for the whole soak (default: its length + 300 s)")
    ap.add_argument("--model", type=Path, help="an .onnx model (default: digits_mlp from --models-dir)")
    ap.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS,
                    help=f"sample models, built when missing (default {DEFAULT_MODELS.relative_to(REPO)})")
    ap.add_argument("--profile", help="device profile passed to the agent")
    ap.add_argument("--workdir", type=Path, help="keep the outbox, store and logs here (default: a temp dir, "
                                                  "deleted unless the soak failed)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"raw results (default "
                                                                    f"{DEFAULT_OUT.relative_to(REPO)})")
    args = ap.parse_args(argv)
    d = QUICK if args.quick else FULL

    def pick(name: str) -> float:
        v = getattr(args, name)
        return float(d[name] if v is None else v)

    minutes = pick("minutes")
    if minutes <= 0 or args.rate <= 0:
        ap.error("--minutes and --rate must be positive")
    model = args.model
    if model is None:
        ensure_models(args.models_dir, ["digits_mlp.onnx"], log)
        model = args.models_dir / "digits_mlp.onnx"
    duration = minutes * 60.0
    own_dir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="soak-")) if own_dir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    metrics = importlib.util.find_spec("prometheus_client") is not None
    if not metrics:
        log("prometheus-client is not installed (the prometheus extra): no outbox depth or sync state, "
            "only the outbox file size")
    cfg = Config(model=model.resolve(), rate=args.rate, duration_s=duration, sample_s=pick("sample_seconds"),
                 window_s=pick("window_seconds"), warmup_s=pick("warmup_seconds"),
                 broker_every=pick("broker_restart_every"), broker_down_s=pick("broker_down_seconds"),
                 cloud_every=pick("cloud_outage_every"), outage_s=pick("outage_seconds"),
                 drain_s=pick("drain_seconds"), timeout_s=args.timeout or duration + 300.0, workdir=workdir,
                 profile=args.profile, metrics=metrics)
    from edge_runtime.sysinfo import machine_info

    command = shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else [__file__, *argv])])
    results: dict[str, Any] = {
        "command": command, "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(), "quick": args.quick,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "method": {
            "rss_mb": "VmRSS of /proc/<agent pid>/status", "threads": "Threads of /proc/<agent pid>/status",
            "fds": "entries of /proc/<agent pid>/fd",
            "cpu_pct": "delta utime+stime of /proc/<agent pid>/stat over the wall time between samples",
            "buffer_pending": "edge_runtime_outbox_pending_records from the agent's /metrics",
            "outbox_mb": "size of the outbox file plus its WAL",
            "latency": "the agent's metric snapshot records (one per window, from its fine histogram's "
                       "difference over the window), read from the cloud store",
            "baseline": "first full latency window starting after the warm-up; sampled figures: median of its samples",
            "rss_growth": "least-squares slope of rss_mb over the samples after the warm-up (and their second half)",
            "host_other_cpu_pct": "busy time of all cores from /proc/stat (steal included) minus the agent's, "
                                  "in % of one core",
            "load1": "/proc/loadavg",
        },
        "errors": [], "out": str(args.out),
    }

    def alarm(_sig: int, _frame: Any) -> None:
        raise HardTimeout(f"hard timeout: the soak ran past {cfg.timeout_s:g} s")

    def term(_sig: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, alarm)
    signal.signal(signal.SIGTERM, term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    signal.alarm(math.ceil(cfg.timeout_s))
    soak = Soak(cfg)
    results["agent_command"] = shlex.join(soak.agent_cmd)
    results["cloud_command"] = shlex.join(soak.cloud.cmd)
    log(f"{minutes:g} min at {args.rate:g}/s on {cfg.model.name}, sampling every {cfg.sample_s:g} s, "
        f"windows of {cfg.window_s:g} s, warm-up {cfg.warmup_s:g} s; work dir {workdir}")
    status = 0
    try:
        try:
            soak.start()
            soak.loop()
            results["ran_s"] = round(soak.t(), 1)
            results["interrupted"] = soak.interrupted
            results["accounting"] = soak.finish()
            if results["accounting"]["agent_exit_status"] != 0:
                results["errors"].append(f"agent exited with {results['accounting']['agent_exit_status']}")
        except (RuntimeError, HardTimeout, OSError, sqlite3.Error, subprocess.TimeoutExpired) as e:
            results["errors"].append(f"{type(e).__name__}: {e}")
            log(f"failed: {type(e).__name__}: {e}")
        except KeyboardInterrupt:
            results["errors"].append("aborted by an interrupt")
            status = 130
        finally:
            signal.alarm(0)
            soak.close()
        results.setdefault("ran_s", round(soak.t(), 1) if soak.t0 else 0.0)
        windows = soak.windows()
        for s in soak.series:  # each sample gets its latency window's p50/p99 (for plots)
            w = next((w for w in windows if w["t_start"] < s["t"] <= w["t_end"]), None)
            s["p50_us"], s["p99_us"] = (w["p50_us"], w["p99_us"]) if w else (None, None)
        for w in windows:  # and each window the load the rest of the host put on the CPU meanwhile
            w["host_other_cpu_pct"] = _r(_median([s["host_other_cpu_pct"] for s in soak.series
                                                  if w["t_start"] < s["t"] <= w["t_end"]]))
        results["summary"] = summarize(soak.series, windows, soak.faults, cfg.warmup_s, cfg.window_s)
        results["faults"] = [asdict(f) for f in soak.faults]
        results["series"] = soak.series
        results["windows"] = windows
        results["targets"] = targets(results["summary"], soak.faults, results.get("accounting", {}))
        rep = soak.agent_report
        results["agent_report"] = {k: rep.get(k) for k in ("duration_s", "stopped_by", "cpu_percent", "rss_mb",
                                                           "peak_rss_mb", "uplink") if k in rep}
        results["finished_utc"] = datetime.now(UTC).isoformat(timespec="seconds")
        results["workdir"] = str(workdir)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print_report(results)
    finally:
        if own_dir and not results["errors"]:
            shutil.rmtree(workdir, ignore_errors=True)
        elif results["errors"]:
            log(f"logs kept in {workdir}")
    if status:
        return status
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

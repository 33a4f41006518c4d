"""The agent: hosts one or more pipelines, owns their threads, the signals and the final report.

One thread per pipeline (never per sample). SIGINT/SIGTERM ask every pipeline to stop after the
batch in hand; the report is written either way.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_runtime import __version__
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.feedback import FeedbackRouter
from edge_runtime.pipeline import Pipeline
from edge_runtime.sources import close_quietly
from edge_runtime.sysinfo import cpu_seconds, peak_rss_mb, rss_mb, temperature_c, temperatures_c

log = logging.getLogger(__name__)


@dataclass
class _Worker:
    pipeline: Pipeline
    max_inputs: int | None
    thread: threading.Thread | None = None
    stopped_by: str = "running"
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Agent:
    def __init__(self, pipelines: list[Pipeline], *, max_inputs: int | None = None,
                 status_interval_s: float = 30.0, extra_report: dict[str, Any] | None = None,
                 on_metrics: Callable[[list[dict[str, Any]]], None] | None = None, metrics_interval_s: float = 60.0,
                 on_telemetry: Callable[[dict[str, Any]], None] | None = None, telemetry_interval_s: float = 10.0,
                 feedback: FeedbackRouter | None = None) -> None:
        if not pipelines:
            raise ValueError("an agent needs at least one pipeline")
        self.workers = [_Worker(p, max_inputs) for p in pipelines]
        self.status_interval_s = status_interval_s
        self.extra_report = extra_report or {}
        # Periodic reports from the main thread: durable metric snapshots (one per pipeline) and the
        # live telemetry view; each hook's failure is logged and the agent goes on serving.
        self.on_metrics = on_metrics
        self.metrics_interval_s = metrics_interval_s
        self.on_telemetry = on_telemetry
        self.telemetry_interval_s = telemetry_interval_s
        self.feedback_router = feedback
        self._machine_marks: dict[str, tuple[float, float]] = {}
        # systemd (Type=notify): READY once every pipeline runs, WATCHDOG while the loops make progress,
        # STATUS with the throughput, STOPPING on the way out. A no-op without $NOTIFY_SOCKET.
        from edge_runtime.sdnotify import Notifier

        self.notifier = Notifier()
        self.stall_s = 60.0  # no pipeline progress for this long (with inputs waiting): stop pinging
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self.started_at = datetime.now(UTC)
        self._t0 = time.monotonic()
        self._cpu0 = cpu_seconds()

    def stop(self, reason: str = "stopped") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.notifier.stopping()
        self._stop.set()
        for w in self.workers:
            w.pipeline.stopping = True

    def _work(self, w: _Worker) -> None:
        p = w.pipeline
        step = p.step
        limit = w.max_inputs
        try:
            while not self._stop.is_set():
                if not step():
                    w.stopped_by = self.stop_reason if p.stopping else "end_of_source"
                    break
                if limit is not None and p.metrics.inputs >= limit:
                    w.stopped_by = "max_inputs"
                    break
            else:
                w.stopped_by = self.stop_reason or "stopped"
        except Exception as e:  # a source that died (camera unplugged); the other pipelines go on
            w.stopped_by, w.error = "error", f"{type(e).__name__}: {e}"
            if isinstance(e, EdgeRuntimeError):
                log.error("pipeline %s stopped: %s", p.name, w.error)
            else:
                log.exception("pipeline %s stopped", p.name)
        finally:
            close_quietly(p.source)
            w.done.set()

    def run(self) -> dict[str, Any]:
        """Run every pipeline to its end (source exhausted, --max-inputs, or a stop request)."""
        with _signals(self):
            self._t0 = time.monotonic()
            self._cpu0 = cpu_seconds()
            for w in self.workers:
                w.pipeline.started = self._t0
                w.pipeline.beat_ns = time.perf_counter_ns()
                w.thread = threading.Thread(target=self._work, args=(w,), name=f"pipeline-{w.pipeline.name}",
                                            daemon=True)
                w.thread.start()
            now = time.monotonic()
            self.notifier.ready(status=f"serving {len(self.workers)} pipeline(s)")
            next_status = now + self.status_interval_s
            next_metrics = now + self.metrics_interval_s
            next_telemetry = now + min(self.telemetry_interval_s, 2.0)  # the first one soon after start
            while not all(w.done.is_set() for w in self.workers):
                # Short waits keep signal handling prompt; an idle agent wakes twice a second at most.
                self.workers[0].done.wait(0.5)
                now = time.monotonic()
                if not self.stalled():
                    self.notifier.tick(now)  # a stuck pipeline stops the pings: systemd restarts the agent
                if self.status_interval_s > 0 and now >= next_status:
                    next_status += self.status_interval_s
                    line = self.status_line()
                    log.info("%s", line)
                    self.notifier.status(line)
                if self.on_telemetry is not None and self.telemetry_interval_s > 0 and now >= next_telemetry:
                    next_telemetry = now + self.telemetry_interval_s
                    self._hook("telemetry", lambda: self.on_telemetry(self.telemetry()))  # type: ignore[misc]
                if self.on_metrics is not None and self.metrics_interval_s > 0 and now >= next_metrics:
                    next_metrics = now + self.metrics_interval_s
                    self._hook("metrics", lambda: self.on_metrics(self.metric_snapshots()))  # type: ignore[misc]
            for w in self.workers:
                assert w.thread is not None
                w.thread.join()
        return self.report()

    def stalled(self) -> list[str]:
        """Pipelines whose thread has shown no sign of life (an input served, or an idle poll of its source,
        at least every ``poll_s``) for ``stall_s``: a hung model run or a source read that never returns."""
        limit = time.perf_counter_ns() - int(self.stall_s * 1e9)
        return [w.pipeline.name for w in self.workers if not w.done.is_set() and w.pipeline.beat_ns < limit]

    @staticmethod
    def _hook(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("%s report failed; serving goes on", what)

    def machine(self, key: str) -> dict[str, Any]:
        """CPU % of this process since the last call with the same ``key`` (the run's start at first),
        RSS, the hottest thermal zone and uptime."""
        now, cpu = time.monotonic(), cpu_seconds()
        t0, c0 = self._machine_marks.get(key, (self._t0, self._cpu0))
        self._machine_marks[key] = (now, cpu)
        dt = now - t0
        return {"cpu_percent": round(100.0 * (cpu - c0) / dt, 1) if dt > 0 else 0.0, "rss_mb": rss_mb(),
                "temperature_c": temperature_c(), "uptime_s": round(now - self._t0, 1)}

    def metric_snapshots(self) -> list[dict[str, Any]]:
        """One durable metric snapshot per pipeline (``metric`` records), over the interval since the last."""
        now = time.monotonic()
        machine = self.machine("metrics")
        out = []
        for w in self.workers:
            p = w.pipeline
            last = p.metric_marks.get("metrics", self._t0)
            out.append({"pipeline": p.name, **p.metric_window(now - last, "metrics"), **machine})
        return out

    def telemetry(self) -> dict[str, Any]:
        """The live view: machine metrics and each pipeline's snapshot since the last telemetry."""
        now = time.monotonic()
        pipes = {}
        for w in self.workers:
            p = w.pipeline
            last = p.metric_marks.get("telemetry", self._t0)
            pipes[p.name] = p.metric_window(now - last, "telemetry")
        return {**self.machine("telemetry"), "pipelines": pipes}

    def feedback(self, ref: Any, label: Any) -> bool:
        """Delayed true label for the prediction with id ``ref`` (or the input with that id); False
        when the id is unknown or the agent keeps no prediction ids."""
        if self.feedback_router is None:
            return False
        return self.feedback_router.label(ref, label)

    def status_line(self) -> str:
        parts = []
        elapsed = time.monotonic() - self._t0
        for w in self.workers:
            m = w.pipeline.metrics
            lat = m.stages["latency"]
            p50 = lat.quantile(0.5) / 1000 if lat.count else float("nan")
            p99 = lat.quantile(0.99) / 1000 if lat.count else float("nan")
            parts.append(f"{w.pipeline.name}: {m.predictions / max(elapsed, 1e-9):.1f}/s, "
                         f"p50 {p50:.0f} us, p99 {p99:.0f} us, {m.error_total} errors")
        temp = temperature_c()
        return "; ".join(parts) + f"; rss {rss_mb():.0f} MB" + (f"; {temp:.0f} C" if temp is not None else "")

    def report(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self._t0
        cpu = cpu_seconds() - self._cpu0
        reasons = {w.stopped_by for w in self.workers}
        return {
            "edge_runtime": __version__,
            **self.extra_report,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "duration_s": round(elapsed, 3),
            "stopped_by": reasons.pop() if len(reasons) == 1 else sorted(reasons),
            "cpu_percent": round(100.0 * cpu / elapsed, 1) if elapsed > 0 else 0.0,
            "rss_mb": rss_mb(),
            "peak_rss_mb": peak_rss_mb(),
            "temperature_c": temperatures_c() or None,
            **({"feedback": self.feedback_router.report()} if self.feedback_router is not None else {}),
            "pipelines": [{**w.pipeline.report(), "stopped_by": w.stopped_by,
                           **({"error": w.error} if w.error else {})} for w in self.workers],
        }


@contextmanager
def _signals(agent: Agent) -> Iterator[None]:
    """SIGINT/SIGTERM stop the agent cleanly; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if agent._stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.info("%s received: stopping after the batch in hand", name)
        agent.stop(f"signal:{name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def write_report(report: dict[str, Any], path: str | Path) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a report."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    tmp.replace(p)

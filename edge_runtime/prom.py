"""Prometheus exposition of the running agent (``--metrics-port``).

A custom collector reads the live state at scrape time: the pipelines' counters and latency
histograms, drift monitors, rollout state machines, the outbox and the sync link. Nothing is
recorded per inference, so an agent nobody scrapes pays nothing. ``prometheus_client`` is the
optional ``prometheus`` extra and is imported only when a collector or server is built.

Counters carry the ``pipeline`` label only: they are cumulative across model swaps, so a
``model_version`` label would move the series on every swap. ``edge_runtime_model_info`` names the
version for joins. Drift metrics do carry ``model_version``, because each model brings its own
monitor whose alarm count starts from zero.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_runtime.core.histogram import N_BUCKETS, bucket_bounds
from edge_runtime.core.rollout import STATES
from edge_runtime.errors import ConfigError, EdgeRuntimeError, MissingExtraError
from edge_runtime.sysinfo import cpu_seconds, rss_mb, temperatures_c

if TYPE_CHECKING:
    from edge_runtime.pipeline import Pipeline
    from edge_runtime.runtime import Agent

log = logging.getLogger(__name__)

# The exported ``le`` boundaries in seconds. Each fine LatencyHistogram bucket is counted under the
# first boundary at or above its largest value, so a cumulative count is exact up to the one fine
# bucket (under 1/128 of its value wide) that straddles each boundary.
LE_SECONDS: tuple[float, ...] = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

DRIFT_KINDS = ("data", "prediction")  # always exported (0 or 1), so an alert sees 0 rather than nothing


def _le_index() -> np.ndarray:
    """For each fine bucket, the index of its ``le`` boundary (``len(LE_SECONDS)``: +Inf only)."""
    le_ns = np.asarray([round(s * 1e9) for s in LE_SECONDS], dtype=np.int64)
    tops = np.empty(N_BUCKETS, dtype=np.int64)
    for i in range(N_BUCKETS):
        lo, width = bucket_bounds(i)
        tops[i] = lo + width - 1
    return np.searchsorted(le_ns, tops, side="left")


_LE_INDEX = _le_index()


def _require() -> Any:
    try:
        import prometheus_client
    except ImportError as e:
        raise MissingExtraError("--metrics-port", "prometheus", "prometheus-client") from e
    return prometheus_client


def cumulative_buckets(counts: list[int]) -> list[int]:
    """Cumulative counts per ``LE_SECONDS`` boundary, then +Inf (the total), from fine bucket counts."""
    per = np.bincount(_LE_INDEX, weights=np.asarray(counts, dtype=np.float64), minlength=len(LE_SECONDS) + 1)
    return [int(c) for c in np.cumsum(per)]


class AgentCollector:
    """A ``prometheus_client`` collector (its ``collect()`` protocol) over an :class:`Agent`, optionally
    its :class:`~edge_runtime.uplink.Uplink` and its rollout deployers by pipeline name."""

    def __init__(self, agent: Agent, *, uplink: Any = None, deployers: Mapping[str, Any] | None = None) -> None:
        _require()  # fail at start-up, not at the first scrape
        self.agent = agent
        self.uplink = uplink
        self.deployers = dict(deployers or {})

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        def counter(name: str, doc: str, labels: list[str]) -> Any:
            return CounterMetricFamily(name, doc, labels=labels)

        def gauge(name: str, doc: str, labels: list[str]) -> Any:
            return GaugeMetricFamily(name, doc, labels=labels)

        pl = ["pipeline"]
        inputs = counter("edge_runtime_inputs_total", "Records read from the source, good or bad.", pl)
        predictions = counter("edge_runtime_predictions_total", "Samples that went through the model.", pl)
        errors = counter("edge_runtime_errors_total", "Inputs skipped or failed, by reason.", [*pl, "reason"])
        low = counter("edge_runtime_low_confidence_total",
                      "Predictions whose top-1 score is below the pipeline's threshold.", pl)
        null = counter("edge_runtime_null_outputs_total", "Predictions whose scores are NaN/Inf.", pl)
        latency = HistogramMetricFamily("edge_runtime_stage_latency_seconds",
                                        "Time per batch in each stage (latency: preprocess to postprocess).",
                                        labels=[*pl, "stage"])
        throughput = gauge("edge_runtime_throughput_per_second", "Predictions per second since the start.", pl)
        info = gauge("edge_runtime_model_info", "The model version each pipeline serves.", [*pl, "model_version"])
        dl = [*pl, "model_version"]
        alarm_open = gauge("edge_runtime_drift_alarm_open", "1 while a drift alarm of this kind is open.",
                           [*dl, "kind"])
        alarms_total = counter("edge_runtime_drift_alarms_total", "Drift alarms opened by this model's monitor.",
                               dl)
        window_score = gauge("edge_runtime_drift_window_score",
                             "The last complete window's data drift score (1 = alarm level).", dl)
        rollout = gauge("edge_runtime_rollout_state", "1 for the rollout state the pipeline is in.",
                        [*pl, "state"])

        now = time.monotonic()
        for w in self.agent.workers:
            p: Pipeline = w.pipeline
            m = p.metrics
            name, version = p.name, p.version or ""
            inputs.add_metric([name], m.inputs)
            predictions.add_metric([name], m.predictions)
            for reason, n in sorted(dict(m.errors).items()):
                errors.add_metric([name, reason], n)
            low.add_metric([name], m.low_confidence)
            null.add_metric([name], m.null_outputs)
            for stage, h in m.stages.items():
                counts = list(h.counts)  # one copy, so +Inf and _count agree while the pipeline records
                cum = cumulative_buckets(counts)
                buckets = [(floatToGoString(le), c) for le, c in zip(LE_SECONDS, cum, strict=False)]
                buckets.append(("+Inf", cum[-1]))
                latency.add_metric([name, stage], buckets, sum_value=h.total / 1e9)
            elapsed = now - p.started
            throughput.add_metric([name], m.predictions / elapsed if elapsed > 0 else 0.0)
            info.add_metric([name, version], 1)
            drift = p.drift
            if drift is not None:
                open_kinds = {a.kind for a in drift.open_alarms}
                for kind in sorted(open_kinds | set(DRIFT_KINDS)):
                    alarm_open.add_metric([name, version, kind], 1 if kind in open_kinds else 0)
                alarms_total.add_metric([name, version], drift.alarms_total)
                last = drift.last_window
                if last is not None and "score" in last:
                    window_score.add_metric([name, version], float(last["score"]))
            deployer = self.deployers.get(name)
            if deployer is not None:
                state = _rollout_state(deployer)
                if state is not None:
                    for s in STATES if state in STATES else (*STATES, state):
                        rollout.add_metric([name, s], 1 if s == state else 0)

        yield from (inputs, predictions, errors, low, null, latency, throughput, info, alarm_open, alarms_total,
                    window_score, rollout)

        rss = gauge("edge_runtime_process_rss_bytes", "Resident set size of the agent process.", [])
        rss.add_metric([], rss_mb() * 1024 * 1024)
        cpu = counter("edge_runtime_cpu_seconds_total", "User + system CPU time of the agent process.", [])
        cpu.add_metric([], cpu_seconds())
        temp = gauge("edge_runtime_temperature_celsius", "Thermal zone readings.", ["zone"])
        for zone, c in temperatures_c().items():
            temp.add_metric([zone], c)
        yield from (rss, cpu, temp)

        if self.uplink is not None:
            yield from self._uplink(counter, gauge)

    def _uplink(self, counter: Any, gauge: Any) -> Iterator[Any]:
        up = self.uplink
        try:  # a closed or failing outbox leaves these out; the rest of the scrape is still served
            pending_n = up.buffer.pending_count()
            stats = up.buffer.stats()
        except EdgeRuntimeError as e:
            log.warning("metrics: outbox not readable: %s", e)
            return
        pending = gauge("edge_runtime_outbox_pending_records", "Committed records not yet acknowledged.", [])
        pending.add_metric([], pending_n)
        dropped = counter("edge_runtime_outbox_dropped_total", "Outbox records dropped, by reason and kind.",
                          ["reason", "kind"])
        for reason, kinds in sorted(stats.dropped_by_reason.items()):
            for kind, n in sorted(kinds.items()):
                dropped.add_metric([reason, kind], n)
        connected = gauge("edge_runtime_sync_connected", "1 while the broker connection is up.", [])
        connected.add_metric([], 1 if up.transport.connected else 0)
        sent = counter("edge_runtime_sync_batches_sent_total", "Record batches published.", [])
        sent.add_metric([], up.sync.stats.batches_sent)
        acked = counter("edge_runtime_sync_acked_records_total", "Records the cloud acknowledged.", [])
        acked.add_metric([], up.sync.stats.records_acked)
        yield from (pending, dropped, connected, sent, acked)


def _rollout_state(deployer: Any) -> str | None:
    try:
        return str(deployer.state()["state"])
    except Exception as e:  # a deployer mid-change must not fail the whole scrape
        log.warning("metrics: rollout state of %s not readable: %s", getattr(deployer, "name", "?"), e)
        return None


@dataclass
class MetricsServer:
    """The running exporter; ``port`` is the bound one (useful with port 0)."""

    server: Any
    thread: Any
    addr: str
    port: int

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def make_registry(agent: Agent, *, uplink: Any = None, deployers: Mapping[str, Any] | None = None) -> Any:
    """A fresh ``CollectorRegistry`` (not the global default) holding only the agent's collector."""
    _require()
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(agent, uplink=uplink, deployers=deployers))
    return registry


def start_metrics_server(agent: Agent, port: int, *, addr: str = "127.0.0.1", uplink: Any = None,
                         deployers: Mapping[str, Any] | None = None) -> MetricsServer:
    """Serve ``/metrics`` on ``addr:port`` from a daemon thread until ``.shutdown()``.

    Raises MissingExtraError without ``prometheus-client`` and ConfigError when the port cannot be bound."""
    prom = _require()
    registry = make_registry(agent, uplink=uplink, deployers=deployers)
    try:
        started = prom.start_http_server(port, addr=addr, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {addr}:{port}: {e}", key="metrics_port") from e
    if not isinstance(started, tuple):  # before 0.17 the server was not returned and cannot be stopped
        raise MissingExtraError("--metrics-port", "prometheus", "prometheus-client>=0.17")
    server, thread = started
    return MetricsServer(server, thread, addr, int(server.server_address[1]))

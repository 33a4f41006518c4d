"""Per-pipeline metrics: stage latency histograms, counters by error reason, label frequencies, and
output health (low-confidence and null outputs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_runtime.core.histogram import LatencyHistogram

STAGES = ("read", "preprocess", "infer", "postprocess", "latency")


@dataclass
class PipelineMetrics:
    """``latency`` is preprocess + infer + postprocess of one batch: the time the agent spends on it,
    without the time spent waiting for the input (which ``read`` includes for live sources)."""

    stages: dict[str, LatencyHistogram] = field(
        default_factory=lambda: {s: LatencyHistogram() for s in STAGES})
    inputs: int = 0          # records read from the source, good or bad
    predictions: int = 0     # samples that went through the model
    batches: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    labels: dict[int, int] = field(default_factory=dict)
    low_confidence: int = 0  # predictions whose top-1 score is below the pipeline's threshold
    null_outputs: int = 0    # predictions whose scores are NaN/Inf (or empty): nothing usable came out

    def record_batch(self, t0: int, t1: int, t2: int, t3: int, t4: int, n: int) -> None:
        """Stage times of one batch from its five clock readings (ns): read ends at t1, preprocess at
        t2, infer at t3, postprocess at t4. One call instead of five keeps the hot path short."""
        st = self.stages
        st["read"].record(t1 - t0)
        st["preprocess"].record(t2 - t1)
        st["infer"].record(t3 - t2)
        st["postprocess"].record(t4 - t3)
        st["latency"].record(t4 - t1)
        self.predictions += n
        self.batches += 1

    def count_error(self, reason: str, n: int = 1) -> int:
        c = self.errors.get(reason, 0) + n
        self.errors[reason] = c
        return c

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def snapshot(self, elapsed_s: float) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "predictions": self.predictions,
            "batches": self.batches,
            "throughput_per_s": round(self.predictions / elapsed_s, 2) if elapsed_s > 0 else 0.0,
            "errors": {"total": self.error_total, "by_reason": dict(sorted(self.errors.items()))},
            "latency_us": {s: h.summary_us() for s, h in self.stages.items()},
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "outputs": self.output_rates(),
        }

    def output_rates(self) -> dict[str, Any]:
        n = self.predictions
        return {"low_confidence": self.low_confidence, "null": self.null_outputs,
                "low_confidence_rate": round(self.low_confidence / n, 6) if n else 0.0,
                "null_rate": round(self.null_outputs / n, 6) if n else 0.0}

    def window(self, previous: dict[str, Any] | None, elapsed_s: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """The metric snapshot sent every interval, and the state the next call needs as ``previous``.

        Counters (inputs, predictions, errors, labels, low-confidence, null) are cumulative since the
        agent started; throughput and the latency percentiles are over the interval since ``previous``
        (the first interval: since the start)."""
        hist = self.stages["latency"].snapshot()  # the pipeline thread may record meanwhile
        window_hist = hist
        predictions0 = 0
        if previous is not None:
            window_hist = hist.minus(previous["hist"])
            predictions0 = previous["predictions"]
        n = self.predictions
        snap = {"window_s": round(elapsed_s, 3), "inputs": self.inputs, "predictions": n,
                "throughput_per_s": round((n - predictions0) / elapsed_s, 3) if elapsed_s > 0 else 0.0,
                "latency_us": window_hist.summary_us(), "errors": dict(sorted(self.errors.items())),
                "low_confidence": self.low_confidence, "null_outputs": self.null_outputs,
                "low_confidence_rate": round(self.low_confidence / n, 6) if n else 0.0,
                "labels": {str(k): v for k, v in sorted(self.labels.items())}}
        return snap, {"hist": hist, "predictions": n}

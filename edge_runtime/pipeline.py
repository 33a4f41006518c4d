"""One model's pipeline: read -> preprocess + check -> infer -> postprocess -> metrics.

No threads and no clock of its own beyond ``perf_counter_ns`` for stage timing: the runtime drives
``step()`` from one thread per pipeline, and ``bench`` drives the very same ``step()`` to measure the
agent loop against bare ``session.run``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.core.drift import MAX_WIRE_WINDOWS, prediction_distances
from edge_runtime.core.metrics import PipelineMetrics
from edge_runtime.core.preprocess import METADATA_KEY, Preprocessor, PreprocessSpec, ResizeFn, resize_nearest
from edge_runtime.core.spec import ModelSpec, SampleValidator
from edge_runtime.errors import ConfigError, InputValidationError, ModelLoadError
from edge_runtime.sources import EndOfSource, Record, Source

log = logging.getLogger(__name__)

ResultSink = Callable[[list[Record], np.ndarray | None, np.ndarray | None, list[Any]], None]


@dataclass(frozen=True)
class ModelRef:
    """Where a model's file, preprocessing and identity come from (a .onnx file or a bundle dir)."""

    model_path: Path
    name: str
    version: str | None
    preprocess: PreprocessSpec | None
    preprocess_origin: str | None
    reference: Path | None = None  # the bundle's reference_profile.json, for drift monitoring
    metrics: dict[str, Any] | None = None  # the bundle manifest's accuracy at build, for concept drift
    escalation: dict[str, Any] | None = None  # the bundle manifest's escalation entry (policy, tuning)


def resolve_model(path_or_bundle: str | Path, metadata: dict[str, str] | None = None) -> ModelRef:
    """A bundle directory (``model.onnx`` + ``manifest.json``) or an .onnx file. The preprocessing
    spec comes from the manifest, else ``<model>.preprocess.json``, else the model's metadata."""
    p = Path(path_or_bundle)
    name, version, spec, origin = p.stem, None, None, None
    metrics = escalation = None
    if p.is_dir():
        manifest = p / "manifest.json"
        model = p / "model.onnx"
        if not model.is_file():
            raise ModelLoadError(f"{p} is a directory without model.onnx: not a model bundle")
        if manifest.is_file():
            try:
                m = json.loads(manifest.read_text(encoding="utf-8"))
            except ValueError as e:
                raise ModelLoadError(f"{manifest}: not valid JSON: {e}") from e
            name = str(m.get("name", p.name))
            version = str(m["version"]) if "version" in m else None
            metrics = m.get("metrics") or None
            escalation = m.get("escalation") or None
            if m.get("preprocess"):
                spec, origin = PreprocessSpec.from_dict(m["preprocess"], str(manifest)), str(manifest)
        else:
            name = p.name
        p = model
    elif not p.is_file():
        raise ModelLoadError(f"model not found: {p}")
    if spec is None:
        side = p.with_suffix(".preprocess.json")
        if side.is_file():
            try:
                spec = PreprocessSpec.from_dict(json.loads(side.read_text(encoding="utf-8")), str(side))
            except ValueError as e:
                raise ConfigError(f"not valid JSON: {e}", path=str(side)) from e
            origin = str(side)
        elif metadata and METADATA_KEY in metadata:
            origin = f"{p} metadata '{METADATA_KEY}'"
            try:
                spec = PreprocessSpec.from_dict(json.loads(metadata[METADATA_KEY]), origin)
            except ValueError as e:
                raise ConfigError(f"not valid JSON: {e}", path=origin) from e
    ref_file = p.parent / "reference_profile.json"
    return ModelRef(p, name, version, spec, origin,
                    ref_file if p.name == "model.onnx" and ref_file.is_file() else None, metrics, escalation)


@dataclass
class _Swap:
    engine: Any
    runners: dict[int, Any]
    postprocess: Postprocessor
    version: str
    drift: Any = None
    concept: Any = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Shadow:
    engine: Any
    runners: dict[int, Any]
    postprocess: Postprocessor
    version: str
    stats: Any
    every: int
    batches: int = 0


class Postprocessor:
    """Top-1 label and score per sample, from the first 2-D float output (scores/probabilities),
    else from a 1-D integer output (labels). Models with neither are passed through."""

    def __init__(self, spec: ModelSpec) -> None:
        self.scores_index: int | None = None
        self.labels_index: int | None = None
        floats = [i for i, t in enumerate(spec.outputs)
                  if t.dtype is not None and t.dtype.kind == "f" and t.rank == 2]
        preferred = [i for i in floats if any(w in spec.outputs[i].name.lower() for w in ("prob", "score"))]
        if preferred or floats:
            self.scores_index = (preferred or floats)[0]
        ints = [i for i, t in enumerate(spec.outputs) if t.dtype is not None and t.dtype.kind in "iu"
                and t.rank == 1]
        if ints:
            self.labels_index = ints[0]

    def labels(self, outputs: list[Any]) -> np.ndarray | None:
        if self.scores_index is not None:
            return outputs[self.scores_index].argmax(axis=1)
        if self.labels_index is not None:
            return outputs[self.labels_index]
        return None


class Pipeline:
    """Runs one model over one source. ``step()`` processes one micro-batch (one sample when
    ``batch == 1``) and returns False when the source is exhausted."""

    _DRIFT_QUEUE = 64  # chunks of drift_every samples the drift thread may fall behind

    def __init__(self, name: str, engine: Any, source: Source, *, preprocess: PreprocessSpec | None = None,
                 batch: int = 1, max_wait_s: float = 0.005, resize_fn: ResizeFn = resize_nearest,
                 sink: ResultSink | None = None, poll_s: float = 0.25, drift: Any = None,
                 drift_every: int = 64, on_drift: Callable[[list[Any]], None] | None = None,
                 concept: Any = None, on_summary: Callable[..., None] | None = None,
                 summary_interval_s: float = 60.0, low_confidence: float = 0.5, health: Any = None,
                 on_health: Callable[[list[Any]], None] | None = None, version: str = "",
                 drift_thread: bool = False) -> None:
        self.name = name
        self.version = version
        self.engine = engine
        self.source = source
        self.spec: ModelSpec = engine.spec
        max_batch = self.spec.max_batch
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch}")
        if max_batch is not None and batch > max_batch:
            inputs = ", ".join(t.describe() for t in self.spec.inputs)
            raise ConfigError(f"model {name} takes at most {max_batch} sample per run (inputs {inputs}), "
                              f"got --batch {batch}")
        self.batch = batch
        self.max_wait_s = max_wait_s
        self.poll_s = poll_s
        self.metrics = PipelineMetrics()
        self.validate = SampleValidator(self.spec)
        self.validate_batch = SampleValidator(self.spec, batched=True)
        self._input_set = frozenset(self.spec.input_names)
        self.first_input = self.spec.inputs[0].name
        self.single_input = len(self.spec.inputs) == 1
        self.preprocessor = (Preprocessor(preprocess, self.first_input, resize_fn)
                             if preprocess is not None and not preprocess.is_identity
                             and not getattr(source, "preprocessed", False) else None)
        self.postprocess = Postprocessor(self.spec)
        self.sink = sink
        self.low_confidence = low_confidence  # top-1 scores below this count as low-confidence outputs
        self.batchable = self.spec.batchable
        # Build (and so warm up: the IOBinding check runs the model) the runners of the usual batch
        # sizes now, not on the first input.
        self._runners: dict[int, Any] = {n: engine.runner(n) for n in {1, batch}}
        # Model changes (rollouts): a prepared swap waits here until the pipeline thread takes it between
        # two inputs; a shadow candidate runs after the active model's answer is out.
        self._pending_swap: _Swap | None = None
        self.swaps = 0
        self._shadow: _Shadow | None = None
        self.stopping = False
        self.beat_ns = time.perf_counter_ns()  # the thread's last sign of life (the agent's watchdog reads it)
        # Drift monitoring: inputs are gathered per sample (a reference append) and handed to the
        # monitor every ``drift_every`` samples, so its vectorised update costs ~2 us per sample.
        self.drift = drift
        self.drift_every = drift_every
        self.on_drift = on_drift
        # Frame-health checks (covered lens, frozen feed, out of focus) need no reference; they and an
        # image reference look at the raw frames, computing the image features once for both.
        self.health = health
        self.on_health = on_health
        self._drift_raw = health is not None or (drift is not None and drift.reference.kind == "image")
        self._gather = drift is not None or health is not None
        self._health_step = 0  # pixel step of the frame-health subsample (from the first frame)
        self._drift_rows: list[Any] = []
        self._drift_top1: list[int] = []
        self._drift_seen = 0
        # The monitor runs on its own thread, fed chunks of ``drift_every`` samples through a short
        # queue: the inference thread only appends references and hands over the list.
        # Inline by default: measured on 2 cores, a monitor thread raised p99 latency for rows and for
        # frames alike (its small numpy operations hold the GIL, and each GIL hand-over can cost the
        # inference thread up to the 5 ms switch interval), while inline monitoring cost 4% of
        # throughput and no p99 (benchmarks/RESULTS.md). The thread suits monitors whose chunks are
        # long (full-resolution image references on a slow device): --drift-thread.
        self._drift_jobs: queue.Queue[tuple[list[Any], list[Any], int]] | None = (
            queue.Queue(maxsize=self._DRIFT_QUEUE) if drift_thread else None)
        self._drift_thread: threading.Thread | None = None
        self._error_lock = threading.Lock()
        # Drift summaries go out every ``summary_interval_s`` and when an alarm opens or closes.
        self.on_summary = on_summary
        self.summary_interval_s = summary_interval_s
        self._summary_since = time.time()
        self.concept = concept  # a LabelTracker fed by label feedback (from the sync thread)
        self._labels_seen = 0
        self._feedback_lock = threading.Lock()
        self._earlier_alarms: list[dict[str, Any]] = []  # alarms of the monitors of versions swapped out
        self.extra_state: dict[str, Callable[[], Any]] = {}  # more keys of metric snapshots (e.g. rollout)
        self._window_state: dict[str, dict[str, Any]] = {}
        self.metric_marks: dict[str, float] = {}  # when each periodic report last took a window
        self.started = time.monotonic()

    # -- the hot path -------------------------------------------------------------------------

    def step(self) -> bool:
        """Read, check and run one micro-batch. False once the source is exhausted (or stopping)."""
        if self._pending_swap is not None:
            self._apply_swap()
        if self.batch == 1:
            return self._step_one()
        clock = time.perf_counter_ns
        t0 = clock()
        records, raw, ended = self._read_batch()
        t1 = clock()
        if raw:
            groups = self._check_and_stack(records, raw)
            t2 = clock()
            for feeds, recs in groups:
                self._infer(feeds, recs, len(recs), t0, t1, t2)
                t0 = t1 = t2 = clock()  # a further group has no read or preprocess time of its own
        return not ended and not self.stopping

    def _step_one(self) -> bool:
        """``step`` for batch 1, the latency-critical case: the same stages with less bookkeeping."""
        clock = time.perf_counter_ns
        t0 = clock()
        while True:
            try:
                rec = self.source.read(self.poll_s)
            except EndOfSource:
                return False
            except InputValidationError as e:
                self.metrics.inputs += 1
                self._error(e.reason, 1, str(e))
                return True
            if rec is not None:
                break
            if self.stopping:
                return False
            t0 = self.beat_ns = clock()  # idle polling is not read time (and shows the thread is alive)
        t1 = clock()
        self.metrics.inputs += 1
        try:
            feeds = self.validate(self._to_sample(rec))
        except InputValidationError as e:
            self._error(e.reason, 1, str(e))
            return True
        if self.batchable:
            feeds = {k: v[None] for k, v in feeds.items()}
        t2 = clock()
        self._infer(feeds, [rec], 1, t0, t1, t2)
        return True

    def _infer(self, feeds: dict[str, np.ndarray], records: list[Record], n: int,
               t0: int, t1: int, t2: int) -> None:
        run = self._runners.get(n)
        if run is None:
            run = self._runners[n] = self.engine.runner(n)
        try:
            outputs = run(feeds)
        except Exception as e:  # onnxruntime's runtime errors (e.g. a bad value inside the graph)
            self._error("inference", n, f"inference failed: {str(e).splitlines()[0][:300]}")
            return
        t3 = self.beat_ns = time.perf_counter_ns()
        labels = self.postprocess.labels(outputs)
        top = None
        if labels is not None:
            m = self.metrics
            counts = m.labels
            si = self.postprocess.scores_index
            if n == 1:
                lab = int(labels[0])
                counts[lab] = counts.get(lab, 0) + 1
                if si is not None:
                    scores = outputs[si]
                    t = float(scores[0, lab])
                    if self.sink is not None or self._shadow is not None:
                        top = scores[0, labels]
                    if not t >= self.low_confidence:  # also true for NaN
                        if math.isfinite(t):
                            m.low_confidence += 1
                        else:
                            m.null_outputs += 1
            else:
                for lab in labels.tolist():
                    counts[lab] = counts.get(lab, 0) + 1
                if si is not None:
                    top = outputs[si][np.arange(n), labels]
                    null = n - np.count_nonzero(np.isfinite(top))
                    low = np.count_nonzero(top < self.low_confidence)  # NaN compares False: not counted
                    if null:
                        low -= np.count_nonzero(top == -np.inf)  # -inf is null, not low
                        m.null_outputs += int(null)
                    m.low_confidence += int(low)
        if self.sink is not None:
            self.sink(records, labels, top, outputs)
        self.metrics.record_batch(t0, t1, t2, t3, time.perf_counter_ns(), n)
        if self._gather:
            self._gather_drift(feeds, records, labels, n)
        if self._shadow is not None and labels is not None:
            self._run_shadow(self._shadow, feeds, labels, top, n)

    def _gather_drift(self, feeds: dict[str, np.ndarray], records: list[Record], labels: Any, n: int) -> None:
        if self._drift_raw:
            if self.drift is None:  # frame health only: keep the subsample it checks, not whole frames
                k = self._health_step or self._health_step_for(records[0])
                self._drift_rows.extend(r[::k, ::k] if k > 1 else r for r in records)
            else:
                self._drift_rows.extend(records)
        else:
            x = feeds[self.first_input]
            if self.batchable:
                self._drift_rows.extend(x[i] for i in range(n))
            else:
                self._drift_rows.append(x)
        if labels is not None:
            self._drift_top1.extend(labels.tolist() if n > 1 else (int(labels[0]),))
        if len(self._drift_rows) >= self.drift_every:
            self.flush_drift()

    def _health_step_for(self, frame: Any) -> int:
        shape = getattr(frame, "shape", ())
        side = max(shape[:2]) if len(shape) == 3 else 0
        self._health_step = max(1, -(-side // self.health.settings.max_side)) if side else 1
        return self._health_step

    def flush_drift(self) -> None:
        """Hand the gathered inputs to the drift monitor's thread (or run the monitor here, with
        ``drift_thread=False``). If that thread is more than ``_DRIFT_QUEUE`` chunks behind, the chunk
        is dropped and counted (reason ``drift_dropped``): monitoring never slows inference."""
        rows, top1 = self._drift_rows, self._drift_top1
        if not rows:
            return
        self._drift_rows, self._drift_top1 = [], []
        job = (rows, top1, self._drift_seen)
        self._drift_seen += len(rows)
        if self._drift_jobs is None:
            self._monitor(*job)
            return
        if self._drift_thread is None:
            self._drift_thread = threading.Thread(target=self._drift_loop, name=f"drift-{self.name}", daemon=True)
            self._drift_thread.start()
        try:
            self._drift_jobs.put_nowait(job)
        except queue.Full:
            self._error("drift_dropped", len(rows), f"drift monitor {self._DRIFT_QUEUE} chunks behind: "
                        f"{len(rows)} samples not monitored")

    def _drift_loop(self) -> None:
        assert self._drift_jobs is not None
        while True:
            job = self._drift_jobs.get()
            try:
                self._monitor(*job)
            finally:
                self._drift_jobs.task_done()

    def drain_drift(self) -> None:
        """Flush, and wait until the monitor has seen every gathered sample (reports, the end of a run)."""
        self.flush_drift()
        if self._drift_jobs is not None and self._drift_thread is not None:
            self._drift_jobs.join()

    def _monitor(self, rows: list[Any], top1: list[Any], seen: int) -> None:
        """Drift monitor and frame-health checks over one chunk of samples (the drift thread)."""
        changed: list[Any] = []
        try:
            x = np.stack([np.asarray(r) for r in rows])
            top = np.asarray(top1) if len(top1) == len(rows) else None
            if self._drift_raw:
                from edge_runtime.core.image_features import frame_features

                feats = frame_features(x)
                if self.health is not None:
                    self._health_events(self.health.update(x, seen, features=feats))
                if self.drift is not None:
                    changed = self.drift.update_features(feats, top, seen)
            elif self.drift is not None:
                changed = self.drift.update(x, top, seen)
        except Exception as e:
            self._error("drift", len(rows), f"drift monitor failed: {e}")
            return
        for alarm in changed:
            state = "OPEN" if alarm.is_open else "closed"
            log.warning("%s: %s drift alarm %s at sample %d (start ~%d): %s", self.name, alarm.kind, state,
                        alarm.detected_index if alarm.is_open else alarm.closed_index, alarm.start_index,
                        alarm.reason)
        if changed and self.on_drift is not None:
            self.on_drift(changed)
        if self.on_summary is not None and self.drift is not None and (
                changed or time.time() - self._summary_since >= self.summary_interval_s
                or self.drift.period_windows >= MAX_WIRE_WINDOWS):
            self.emit_summary()

    def _health_events(self, events: list[Any]) -> None:
        for ev in events:
            if ev.action == "start":
                log.warning("%s: frame health: %s since frame %d (measure %.3g)", self.name, ev.reason, ev.index,
                            ev.value)
            else:
                log.info("%s: frame health: %s ended at frame %d", self.name, ev.reason, ev.index)
        if events and self.on_health is not None:
            self.on_health(events)

    def emit_summary(self) -> None:
        """Hand the drift summary of the complete windows since the last one to ``on_summary``, with
        the label tracker's state (``None`` without one)."""
        if self.drift is None or self.on_summary is None:
            return
        now = time.time()
        summary = self.drift.take_summary()
        if summary.windows:  # the version that answered these inputs (a swap emits the old one's first)
            self.on_summary(summary, self._summary_since, now,
                            self.concept.state() if self.concept is not None else None, self.version)
        self._summary_since = now

    def _read_batch(self) -> tuple[list[Record], list[dict[str, Any]], bool]:
        """Up to ``batch`` records and their samples (preprocessed, not yet checked), and whether the
        source ended. The first record is waited for (in ``poll_s`` slices, so a stop request is
        seen); the rest of a micro-batch only until ``max_wait_s`` after the first arrived."""
        records: list[Record] = []
        raw: list[dict[str, Any]] = []
        deadline = None
        read = self.source.read
        while len(raw) < self.batch:
            if deadline is None:
                timeout = self.poll_s
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            try:
                rec = read(timeout)
            except EndOfSource:
                return records, raw, True
            except InputValidationError as e:
                self.metrics.inputs += 1
                self._error(e.reason, 1, str(e))
                continue
            if rec is None:
                if deadline is None and not raw:
                    if self.stopping:
                        return records, raw, True
                    self.beat_ns = time.perf_counter_ns()
                    continue
                break
            self.metrics.inputs += 1
            try:
                raw.append(self._to_sample(rec))
            except InputValidationError as e:
                self._error(e.reason, 1, str(e))
                continue
            records.append(rec)
            if deadline is None:
                deadline = time.monotonic() + self.max_wait_s
        return records, raw, False

    def _to_sample(self, rec: Record) -> dict[str, Any]:
        """A record as {input name: array}, with the model's preprocessing applied."""
        if type(rec) is dict:
            if "id" in rec and "id" not in self._input_set:  # the input's own id, not a tensor
                rec = {k: v for k, v in rec.items() if k != "id"}
            if self.preprocessor is not None and self.first_input in rec:
                rec = {**rec, self.first_input: self.preprocessor(rec[self.first_input])}
            return rec
        if not self.single_input:
            raise InputValidationError("missing_input", ", ".join(self.spec.input_names[1:]),
                                       f"named inputs {list(self.spec.input_names)}", "one unnamed array")
        if self.preprocessor is not None:
            rec = self.preprocessor(rec)
        return {self.first_input: rec}

    def _check_and_stack(self, records: list[Record], raw: list[dict[str, Any]]
                         ) -> list[tuple[dict[str, np.ndarray], list[Record]]]:
        """Feeds for a micro-batch, each with the records it holds. The whole batch is stacked and
        checked at once (one check instead of N); only when that fails are the samples checked one by
        one, to skip and count just the bad ones. Samples whose dynamic dims differ run one by one."""
        names = self._input_set
        if len(raw) > 1 and all(s.keys() == names for s in raw):
            try:
                stacked = {k: np.stack([np.asarray(s[k]) for s in raw]) for k in self.spec.input_names}
                return [(self.validate_batch(stacked), records)]
            except (InputValidationError, ValueError, TypeError):
                pass
        good: list[dict[str, np.ndarray]] = []
        kept: list[Record] = []
        for rec, sample in zip(records, raw, strict=True):
            try:
                good.append(self.validate(sample))
            except InputValidationError as e:
                self._error(e.reason, 1, str(e))
                continue
            kept.append(rec)
        if len(good) > 1:
            try:
                return [({k: np.stack([s[k] for s in good]) for k in good[0]}, kept)]
            except ValueError:
                pass
        return [({k: v[None] for k, v in s.items()}, [r]) for s, r in zip(good, kept, strict=True)]

    # -- model changes: hot swap and shadow ----------------------------------------------------

    def _check_compatible(self, engine: Any) -> None:
        def sig(spec: ModelSpec) -> list[tuple[Any, ...]]:  # dynamic dims match whatever they are named
            return [(d["name"], d["dtype"], tuple(x if isinstance(x, int) else None for x in d["shape"] or ()))
                    for d in (t.to_dict() for t in spec.inputs)]

        have, got = sig(self.spec), sig(engine.spec)
        if have != got:
            raise ModelLoadError(f"model {engine.name} takes inputs {got}, the running model {have}: "
                                 "a swap needs the same inputs")

    def prepare_swap(self, engine: Any, version: str, *, drift: Any = None, concept: Any = None) -> _Swap:
        """Everything a swap needs, built off the hot path (the runners are built, so the new session has
        run once). Raises ModelLoadError when the new model takes other inputs."""
        self._check_compatible(engine)
        runners = {n: engine.runner(n) for n in {1, self.batch, *self._runners}}
        return _Swap(engine, runners, Postprocessor(engine.spec), version, drift, concept)

    def swap(self, engine: Any, version: str, *, drift: Any = None, concept: Any = None,
             timeout_s: float | None = 10.0) -> bool:
        """Replace the model between two inputs: none is dropped or answered twice. Returns once the
        pipeline thread switched (True), or after ``timeout_s`` with the swap still pending (False; it
        happens before the next input). ``drift``/``concept``: the new model's monitors (None: keep)."""
        sw = self.prepare_swap(engine, version, drift=drift, concept=concept)
        self._pending_swap = sw
        return sw.done.wait(timeout_s)

    def _apply_swap(self) -> None:
        sw = self._pending_swap
        self._pending_swap = None
        if sw is None:
            return
        old = self.version
        if self._gather:
            self.drain_drift()  # the old model's inputs go to the old monitor
        if sw.drift is not None:
            self.emit_summary()  # and its last windows go out under the old version
            if self.drift is not None:
                self._earlier_alarms.extend({**a.to_dict(), "model_version": old} for a in self.drift.alarms)
        self.engine, self._runners, self.postprocess, self.version = sw.engine, sw.runners, sw.postprocess, sw.version
        if sw.drift is not None:
            self.drift = sw.drift
            self._drift_raw = self.health is not None or sw.drift.reference.kind == "image"
            self._gather = True
        if sw.concept is not None:
            self.concept = sw.concept
        self.swaps += 1
        sw.done.set()
        log.info("%s: model swapped %s -> %s between two inputs", self.name, old or "?", sw.version or "?")

    def set_shadow(self, engine: Any | None, version: str = "", *, every: int = 1) -> Any:
        """Run ``engine`` beside the active model on every ``every``-th batch, after the active answer was
        delivered, comparing its outputs (agreement, score deltas, its latency); never acted on. None
        stops it. Returns the new :class:`~edge_runtime.core.rollout.ShadowStats` (or None)."""
        if engine is None:
            self._shadow = None
            return None
        from edge_runtime.core.rollout import ShadowStats

        if every < 1:
            raise ConfigError(f"shadow every must be >= 1, got {every}")
        self._check_compatible(engine)
        post = Postprocessor(engine.spec)
        if post.scores_index is None and post.labels_index is None:
            raise ModelLoadError(f"shadow model {engine.name} has no label or score output to compare")
        runners = {n: engine.runner(n) for n in {1, self.batch}}
        sh = _Shadow(engine, runners, post, version, ShadowStats(), every)
        self._shadow = sh
        return sh.stats

    def _run_shadow(self, sh: _Shadow, feeds: dict[str, np.ndarray], labels: Any, top: Any, n: int) -> None:
        sh.batches += 1
        if sh.batches % sh.every:
            return
        run = sh.runners.get(n)
        try:
            if run is None:
                run = sh.runners[n] = sh.engine.runner(n)
            t = time.perf_counter_ns()
            out = run(feeds)
            elapsed = time.perf_counter_ns() - t
            cand = sh.postprocess.labels(out)
            si = sh.postprocess.scores_index
            cand_top = out[si][np.arange(n), cand] if si is not None else np.full(n, np.nan)
            act_top = top if top is not None else np.full(n, np.nan)
            sh.stats.update_batch(np.asarray(labels).reshape(-1), np.asarray(act_top).reshape(-1),
                                  np.asarray(cand).reshape(-1), np.asarray(cand_top).reshape(-1), elapsed)
        except Exception as e:  # the candidate's failure is a finding, not the pipeline's
            sh.stats.add_errors(n)
            if sh.stats.errors <= 5 * n:
                log.warning("%s: shadow model %s failed: %s", self.name, sh.version, str(e).splitlines()[0][:300])

    # -- errors and reporting -----------------------------------------------------------------

    def _error(self, reason: str, n: int, message: str) -> None:
        with self._error_lock:  # the drift thread counts its errors too
            count = self.metrics.count_error(reason, n)
        # Log the first few of each reason, then every 1000th, so a bad feed cannot flood the journal.
        if count <= 5 or count % 1000 == 0:
            log.warning("%s: %s [%s #%d, input skipped]", self.name, message, reason, count)

    def feedback(self, predicted: Any, label: Any) -> None:
        """A delayed true label for one of this pipeline's predictions (concept drift)."""
        if self.concept is None:
            return
        if isinstance(predicted, int) and isinstance(label, str):
            with contextlib.suppress(ValueError):
                label = int(label)  # "7" from a JSON file or a person's answer
        with self._feedback_lock:  # the sync thread and a stdin source may both deliver labels
            was = self.concept.drift_detected
            self.concept.update(np.asarray([predicted]), np.asarray([label]), self._labels_seen)
            self._labels_seen += 1
            raised = self.concept.drift_detected and not was
        if raised:
            log.warning("%s: concept drift: accuracy on delayed labels fell (alarm at label %d, change ~%s)",
                        self.name, self._labels_seen, self.concept.change_index)

    def report(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        out = {"name": self.name, "model": self.engine.describe(), "source": self.source.name,
               "batch": self.batch, "elapsed_s": round(elapsed, 3), **self.metrics.snapshot(elapsed)}
        if self._gather:
            self.drain_drift()
        if self.drift is not None:
            self.emit_summary()
            out["drift"] = {"samples": self._drift_seen, "kind": self.drift.reference.kind,
                            "alarms": [a.to_dict() for a in self.drift.alarms],
                            "earlier_versions_alarms": list(self._earlier_alarms),
                            "alarmed": bool(self.drift.alarms), "state": self.drift.state()}
            out["prediction_shift"] = self._prediction_shift()
        if self.health is not None:
            out["frame_health"] = self.health.state()
        if self._shadow is not None:
            out["shadow"] = {"version": self._shadow.version, **self._shadow.stats.summary()}
        if self.swaps:
            out["swaps"] = self.swaps
        if self.concept is not None:
            out["concept"] = {"labels": self._labels_seen, "alarmed": self.concept.drift_detected,
                              "state": self.concept.state()}
        return out

    def _prediction_shift(self) -> dict[str, Any]:
        """The output distribution of the whole run against the reference's (no labels needed): class
        frequencies on the device and in the reference data, their distances, and the alarms of the
        calibrated per-window test."""
        ref = self.drift.reference
        alarms = [a.to_dict() for a in self.drift.alarms if a.kind == "prediction"]
        if ref.classes is None:
            return {"available": False, "reason": "the reference profile has no output distribution",
                    "alarms": alarms, "alarmed": bool(alarms)}
        live = self.metrics.labels
        total = sum(live.values())
        ref_counts = np.asarray(ref.class_counts, dtype=np.float64)
        ref_total = float(ref_counts.sum()) or 1.0
        classes = [str(c) for c in ref.classes]
        return {"available": True, "alarmed": bool(alarms), "alarms": alarms,
                "classes": classes,
                "live": {str(k): round(v / total, 4) for k, v in sorted(live.items())} if total else {},
                "reference": {c: round(float(n) / ref_total, 4) for c, n in zip(classes, ref_counts, strict=True)},
                "distances": prediction_distances(ref, dict(live)) or {}}

    def metric_window(self, elapsed_s: float, key: str = "metrics") -> dict[str, Any]:
        """The periodic metric snapshot (see :meth:`PipelineMetrics.window`) with this pipeline's drift
        and label-feedback state, over the interval since the last call with the same ``key`` (each
        periodic report keeps its own); called from the agent's main thread."""
        snap, self._window_state[key] = self.metrics.window(self._window_state.get(key), elapsed_s)
        self.metric_marks[key] = time.monotonic()
        snap["model_version"] = self.version
        for name, fn in self.extra_state.items():
            snap[name] = fn()
        snap["drift_alarm"] = bool(self.drift.open_alarms) if self.drift is not None else False
        if self.concept is not None:
            snap["accuracy"] = self.concept.accuracy
            snap["labelled"] = self.concept.labels
        return snap

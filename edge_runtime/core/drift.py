"""Drift: reference profiles, distances, sequential detectors, calibrated thresholds, the monitor.

Pure: batches, predictions, labels and sample indices come in; numbers, alarms and summaries go out.
Nothing here reads a clock, a file or a socket.

What is compared
    Every feature (a tabular column, or an image-level feature of :mod:`image_features`) is binned on
    the reference profile's fixed edges (training deciles by default). A window's bin counts, plus a
    "missing" category for NaN/Inf, are compared with the reference's: PSI and Jensen-Shannon (base 2,
    0..1) with an additive pseudo-count of 0.5 per category on both sides (:data:`SMOOTHING`, Jeffreys'
    prior: it keeps empty bins finite and is applied identically in calibration, so it biases nothing
    the thresholds do not know about), and a KS statistic, the largest gap between the two binned CDFs
    of the finite values. Top-1 predictions are compared with the reference class frequencies (PSI, JS
    and Pearson's chi-square, with classes the reference never saw pooled into one "other" class).
    Per window each feature also yields a rank z-score: the window's mean reference mid-rank ("what
    fraction of the reference lies below this value"), standardised with its exact tie-corrected null
    variance; a two-sided CUSUM per feature accumulates these, catching small persistent shifts that a
    single window cannot see.

How thresholds are calibrated (``calibrate``, method ``simulated-max/1``)
    The target is a false-alarm rate per sample, default 1 per 100,000, for the whole model. With
    tumbling windows of W samples that is a per-window probability alpha = rate * W, split between the
    window distances (50%), the feature CUSUMs (25%) and the prediction distances (25%; its share goes
    to the others when the reference has no outputs). An alarm "opens" once per episode (hysteresis
    below), so bounding the per-window probability of an opening bounds the rate.

    Under the null, a window's category counts are multinomial; the true distribution is unknown and
    is drawn from the posterior given the reference counts (Dirichlet with a 0.5 prior), once per
    "universe" (50) and kept for a run of windows, so the simulation includes the reference's own
    estimation error. Enough windows are simulated for ~50 expected exceedances (15,000-20,000 at the
    default target), vectorised: 1-2 s for 64 features on a 2-core x86 VM. Every statistic is divided by
    its own per-feature 99th percentile (plus a floor worth a handful of samples, so constant features
    do not dominate), and the threshold is the (1 - alpha') quantile of the maximum over all features and
    statistics: this corrects for multiple testing directly rather than by Bonferroni (and is valid
    whatever the per-feature scale); alpha' is alpha shrunk by a one-sided 90% margin for the Monte Carlo
    error. The close threshold is the 90% quantile of the same null maximum; an alarm closes after
    ``close_windows`` (3) consecutive windows below it.

    The CUSUM on rank z-scores (each window's z clipped to +-4, so one heavy-tailed window cannot decide)
    has a per-feature allowance k: half the target shift (``cusum_shift``), but at least 3.5 times the
    spread of the persistent offset that a plausible-but-wrong reference gives that feature's z across
    the simulated universes. Below that, a CUSUM compared against a small reference drifts upwards and
    alarms forever; so with a small reference it only sees shifts of a few standard errors per window.
    Its decision interval h is the smallest for which the simulated up-crossings, summed over features
    and both sides, stay within the CUSUM's share. A prediction test is calibrated the same way on the
    class counts.

    Measured (tests/test_drift.py and the report): without reference uncertainty, fresh windows from
    the reference histogram exceed the distance thresholds at 77-96% of the calibrated rate; with it
    (the default), streams resampled from the reference data raise 6-100 times fewer false alarms than
    the target, since their distribution is exactly the reference's.

Limits, honestly
    * Samples are assumed exchangeable within the stream. Autocorrelated inputs (consecutive video
      frames, sensor readings) carry less information than their count; the thresholds are then too
      low and false alarms more frequent than the target. Set ``effective_sample_fraction`` (e.g. 0.1
      for a camera at 30 fps whose scene changes over seconds) or subsample before monitoring.
    * Features are simulated independently. For positively dependent features (the usual case: pixels,
      correlated sensors) the true rate of the maximum is lower than simulated, so calibration is
      conservative; the tests measure it on real, correlated data.
    * The reference sample is assumed to come from the deployment distribution. If training data were
      collected elsewhere the monitor will, correctly but perhaps unhelpfully, report drift.
    * Binning loses information (a change entirely within one decile bin is invisible), and changes in
      the joint distribution with unchanged marginals are not detected at all.
    * Only complete windows are tested; a partial window at the end of a stream is reported in the
      summary counts but not tested. Summary distances (over many windows) are descriptive: the
      calibrated thresholds apply to single windows only.
    * A label tracker's reference accuracy is an estimate too; give ``reference_count`` and the test is
      made against its upper confidence bound on the error rate.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edge_runtime.core import image_features
from edge_runtime.core.stats import FeatureStats
from edge_runtime.errors import EdgeRuntimeError

__all__ = [
    "CALIBRATION_METHOD",
    "REFERENCE_SCHEMA",
    "REFERENCE_SCHEMA_V1",
    "SMOOTHING",
    "SUMMARY_SCHEMA",
    "Alarm",
    "Calibration",
    "CalibrationSettings",
    "Cusum",
    "DriftMonitor",
    "DriftSummary",
    "LabelTracker",
    "PageHinkley",
    "Reference",
    "ReferenceProfileError",
    "build_reference",
    "calibrate",
    "chi_square",
    "extract_features",
    "js_divergence",
    "ks_binned",
    "load_reference",
    "merge_summaries",
    "psi",
]

REFERENCE_SCHEMA_V1 = "edge-runtime.reference/1"
REFERENCE_SCHEMA = "edge-runtime.reference/2"
SUMMARY_SCHEMA = "edge-runtime.drift-summary/1"
CALIBRATION_METHOD = "simulated-max/1"
SMOOTHING = 0.5
Z_CLIP = 4.0
BIAS_GUARD = 3.5
MAX_SUMMARY_ALARMS = 5
KINDS = ("tabular", "image", "tensor")
FEATURE_STATISTICS = ("psi", "js", "ks")
PREDICTION_STATISTICS = ("psi", "js", "chi2")
_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
_LN2 = math.log(2.0)


class ReferenceProfileError(EdgeRuntimeError, ValueError):
    """A reference profile (or its calibration) is malformed; says which field, expected and got."""


# -- distances -------------------------------------------------------------------------------------

def _proportions(counts: np.ndarray, mask: np.ndarray, smoothing: float) -> np.ndarray:
    c = (counts + smoothing) * mask
    tot = c.sum(axis=-1, keepdims=True)
    return c / np.where(tot > 0, tot, 1.0)


class _Categorical:
    """Reference category counts prepared for PSI, JS and chi-square against many live windows.

    Categories where ``mask`` is 0 (padding for features with fewer bins) are left out: there both
    proportions are set to 1, so every term (p - q) ln(p/q), p ln p, m ln m vanishes without a branch.
    JS uses H(m) - (H(p) + H(q)) / 2 with H(q) computed once: two logarithms per category, not three."""

    def __init__(self, ref_counts: np.ndarray, mask: np.ndarray, smoothing: float = SMOOTHING) -> None:
        self.mask = mask.astype(np.float64)
        self.pad = 1.0 - self.mask
        self.smoothing = smoothing
        self.q = _proportions(ref_counts.astype(np.float64), self.mask, smoothing)
        self.q_safe = self.q + self.pad
        self.log_q = np.log(self.q_safe)
        self.q_log_q = (self.q_safe * self.log_q).sum(axis=-1)
        self.extra = smoothing * self.mask.sum(axis=-1)

    def __call__(self, live: np.ndarray, *, chi2: bool = False) -> dict[str, np.ndarray]:
        """PSI, JS (bits) and optionally Pearson chi-square over the last axis. An empty window scores 0.
        Live counts must be 0 in masked categories."""
        n = live.sum(axis=-1)
        p = (live + self.smoothing) * self.mask / (n + self.extra)[..., None] + self.pad
        log_p = np.log(p)
        psi_v = ((p - self.q_safe) * (log_p - self.log_q)).sum(axis=-1)
        m = 0.5 * (p + self.q_safe)
        js_v = (0.5 * ((p * log_p).sum(axis=-1) + self.q_log_q) - (m * np.log(m)).sum(axis=-1)) / _LN2
        empty = n <= 0
        out = {"psi": np.where(empty, 0.0, np.maximum(psi_v, 0.0)),
               "js": np.where(empty, 0.0, np.clip(js_v, 0.0, 1.0))}
        if chi2:
            # sum (o - n q)^2 / (n q) = sum o^2 / (n q) - n, as sum q = 1 and sum o = n over valid categories.
            chi = (live * live / self.q_safe).sum(axis=-1) / np.where(empty, 1.0, n) - n
            out["chi2"] = np.where(empty, 0.0, np.maximum(chi, 0.0))
        return out


def _cdf(counts: np.ndarray) -> np.ndarray:
    tot = counts.sum(axis=-1, keepdims=True)
    return np.cumsum(counts, axis=-1) / np.where(tot > 0, tot, 1.0)


def _pair(reference_counts: Any, live_counts: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(live_counts, dtype=np.float64)
    if r.shape[-1] != c.shape[-1]:
        raise ValueError(f"reference and live counts need the same bins, got {r.shape[-1]} and {c.shape[-1]}")
    if np.any(r < 0) or np.any(c < 0):
        raise ValueError("counts must be >= 0")
    return r, c


def _scalar_or_array(v: np.ndarray) -> Any:
    return float(v) if v.ndim == 0 else v


def psi(reference_counts: Any, live_counts: Any, *, smoothing: float = SMOOTHING) -> Any:
    """Population stability index over the last axis: sum (p - q) ln(p / q), both sides smoothed with
    ``smoothing`` pseudo-counts per bin. Accepts counts (or proportions for the reference)."""
    r, c = _pair(reference_counts, live_counts)
    return _scalar_or_array(_Categorical(r, np.ones(r.shape[-1]), smoothing)(c)["psi"])


def js_divergence(reference_counts: Any, live_counts: Any, *, smoothing: float = SMOOTHING) -> Any:
    """Jensen-Shannon divergence in bits (0 = same, 1 = disjoint), smoothed as :func:`psi`."""
    r, c = _pair(reference_counts, live_counts)
    return _scalar_or_array(_Categorical(r, np.ones(r.shape[-1]), smoothing)(c)["js"])


def chi_square(reference_counts: Any, live_counts: Any, *, smoothing: float = SMOOTHING) -> Any:
    """Pearson's chi-square of live counts against the (smoothed) reference proportions."""
    r, c = _pair(reference_counts, live_counts)
    return _scalar_or_array(_Categorical(r, np.ones(r.shape[-1]), smoothing)(c, chi2=True)["chi2"])


def ks_binned(reference_counts: Any, live_counts: Any) -> Any:
    """Largest absolute gap between the two binned CDFs (0 when the live side is empty). On binned
    data this is a lower bound of the exact two-sample KS statistic."""
    r, c = _pair(reference_counts, live_counts)
    d = np.abs(_cdf(c) - _cdf(r)).max(axis=-1)
    return _scalar_or_array(np.where(c.sum(axis=-1) > 0, d, 0.0))


# -- features --------------------------------------------------------------------------------------

def _resolve_kind(x: np.ndarray, kind: str) -> str:
    if kind != "auto":
        if kind not in KINDS:
            raise ValueError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
        return kind
    if x.ndim <= 2:
        return "tabular"
    if x.ndim == 4 and x.shape[-1] == 3 and x.dtype == np.uint8:
        return "image"
    return "tensor"


def extract_features(x: Any, kind: str) -> np.ndarray:
    """Rows of monitored features ``[n, F]`` float64 from a batch of model inputs.

    ``tabular``: the columns (``[n, F]``, or ``[n]`` as one feature); ``image``: the four image-level
    features of BGR frames ``[n, H, W, 3]``; ``tensor``: each sample's mean and standard deviation over
    its finite values (a coarse but cheap summary of arbitrary tensors)."""
    a = np.asarray(x)
    if kind == "tabular":
        if a.ndim == 1:
            return a.astype(np.float64).reshape(-1, 1)
        if a.ndim != 2:
            raise ValueError(f"tabular inputs must be rows [n, F], got shape {list(a.shape)}")
        return a.astype(np.float64, copy=False)
    if kind == "image":
        return image_features.frame_features(a)
    if kind == "tensor":
        if a.ndim < 2:
            raise ValueError(f"tensor inputs need a batch axis, got shape {list(a.shape)}")
        flat = a.reshape(a.shape[0], -1).astype(np.float64)
        fin = np.isfinite(flat)
        n = fin.sum(axis=1)
        safe = np.maximum(n, 1)
        mean = np.where(fin, flat, 0.0).sum(axis=1) / safe
        var = np.where(fin, (flat - mean[:, None]) ** 2, 0.0).sum(axis=1) / safe
        out = np.stack([mean, np.sqrt(var)], axis=1)
        out[n == 0] = np.nan
        return out
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _feature_names(kind: str, n_features: int) -> list[str] | None:
    if kind == "image":
        return list(image_features.FEATURE_NAMES)
    if kind == "tensor":
        return ["mean", "std"]
    return None if n_features else []


# -- reference profile -----------------------------------------------------------------------------

def _feature_profile(j: int, col: np.ndarray, n_bins: int) -> dict[str, Any]:
    finite = col[np.isfinite(col)]
    n = col.size
    f: dict[str, Any] = {"index": j, "count": int(finite.size), "nan_count": int(n - finite.size),
                         "nan_rate": round(float((n - finite.size) / n), 6) if n else 0.0}
    if finite.size:
        qs = np.quantile(finite, _QUANTILES)
        probs = np.linspace(1.0 / n_bins, 1.0 - 1.0 / n_bins, n_bins - 1)
        edges = np.unique(np.quantile(finite, probs))
        counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=edges.size + 1)
        var = float(finite.var())
        f.update({"mean": float(finite.mean()), "var": var, "std": math.sqrt(var), "min": float(finite.min()),
                  "max": float(finite.max()),
                  "quantiles": {str(q): float(v) for q, v in zip(_QUANTILES, qs, strict=True)},
                  "histogram": {"edges": [float(e) for e in edges], "counts": counts.tolist()}})
    return f


def build_reference(x: np.ndarray, outputs_top1: np.ndarray | None, *, kind: str = "auto", n_bins: int = 10,
                    calibration: CalibrationSettings | None = None, rng_seed: int = 0,
                    input_name: str | None = None) -> dict[str, Any]:
    """The reference profile (schema ``edge-runtime.reference/2``) of training inputs ``x`` and, when
    given, the model's top-1 predictions on them, with calibrated thresholds.

    Keeps every field of ``/1`` (per feature: count, nan_rate, mean, var, min, max, quantiles, a
    histogram on ``n_bins``-quantile edges) and adds ``nan_count`` and ``std`` per feature,
    ``n_bins``, ``feature_names`` (image and tensor kinds), ``outputs.class_counts`` and
    ``calibration``. ``calibration=None`` calibrates with the default :class:`CalibrationSettings`."""
    a = np.asarray(x)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"reference data needs at least one sample, got shape {list(a.shape)}")
    if n_bins < 2:
        raise ValueError(f"n_bins must be >= 2, got {n_bins}")
    k = _resolve_kind(a, kind)
    feats = extract_features(a, k)
    n = int(a.shape[0])
    d: dict[str, Any] = {"schema": REFERENCE_SCHEMA, "kind": k, "input": input_name, "n_samples": n,
                         "sample_shape": list(a.shape[1:]), "n_bins": n_bins,
                         "features": [_feature_profile(j, feats[:, j], n_bins) for j in range(feats.shape[1])]}
    names = _feature_names(k, feats.shape[1])
    if names:
        d["feature_names"] = names
    if outputs_top1 is not None:
        top = np.asarray(outputs_top1).reshape(-1)
        if top.size != n:
            raise ValueError(f"outputs_top1 must hold one label per sample ({n}), got {top.size}")
        if not np.issubdtype(top.dtype, np.integer):
            if not np.all(np.isfinite(top)) or np.any(top != np.round(top)):
                raise ValueError("outputs_top1 must be integer class labels")
            top = top.astype(np.int64)
        labels, counts = np.unique(top, return_counts=True)
        d["outputs"] = {"class_frequencies": {str(int(c)): round(float(m) / n, 6)
                                              for c, m in zip(labels, counts, strict=True)},
                        "class_counts": {str(int(c)): int(m) for c, m in zip(labels, counts, strict=True)},
                        "n": n}
    ref = load_reference(d)
    d["calibration"] = calibrate(ref, calibration, seed=rng_seed).to_dict()
    return d


@dataclass(frozen=True, eq=False)
class Reference:
    """A validated reference profile, as arrays. Build with :func:`load_reference`.

    ``counts`` is ``[F, E + 1]`` (finite-value histogram, padded with zeros past a feature's own bins);
    ``class_counts`` has one entry per class in ``classes`` (ascending)."""

    schema: str
    kind: str
    input: str | None
    n_samples: int
    sample_shape: tuple[int, ...]
    feature_names: tuple[str, ...] | None
    edges: tuple[tuple[float, ...], ...]
    counts: np.ndarray
    nan_counts: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    classes: tuple[int, ...] | None
    class_counts: np.ndarray | None
    calibration: Calibration | None
    fingerprint: str

    @property
    def n_features(self) -> int:
        return len(self.edges)

    def stats_zero(self) -> FeatureStats:
        return FeatureStats.zero(self.n_features, [list(e) for e in self.edges])

    def category_counts(self) -> np.ndarray:
        """``[F, E + 2]``: the finite histogram then the missing (non-finite) count."""
        return np.concatenate([self.counts, self.nan_counts[:, None]], axis=1).astype(np.float64)


def _fail(msg: str) -> ReferenceProfileError:
    return ReferenceProfileError(f"reference profile: {msg}")


def _num(v: Any, what: str, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _fail(f"{what} must be a finite number, got {v!r} ({type(v).__name__})")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise _fail(f"{what} must be in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(v: Any, what: str, *, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise _fail(f"{what} must be an integer >= {lo}, got {v!r} ({type(v).__name__})")
    return v


def _fingerprint(edges: Sequence[Sequence[float]], counts: np.ndarray, nan: np.ndarray,
                 classes: Sequence[int] | None, class_counts: np.ndarray | None) -> str:
    payload = json.dumps([[list(map(float, e)) for e in edges], counts.tolist(), nan.tolist(),
                          list(classes) if classes is not None else None,
                          class_counts.tolist() if class_counts is not None else None], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_reference(d: dict[str, Any]) -> Reference:
    """Validate a reference profile dict (``edge-runtime.reference/1`` or ``/2``) into a :class:`Reference`.

    ``/1`` profiles have no calibration (a :class:`DriftMonitor` calibrates them when it starts) and
    ``/1`` tensor profiles pool all values into one feature, which the monitor cannot use."""
    if isinstance(d, Reference):
        return d
    if not isinstance(d, dict):
        raise _fail(f"expected a JSON object, got {type(d).__name__}")
    schema = d.get("schema")
    if schema not in (REFERENCE_SCHEMA_V1, REFERENCE_SCHEMA):
        raise _fail(f"schema must be {REFERENCE_SCHEMA_V1!r} or {REFERENCE_SCHEMA!r}, got {schema!r}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise _fail(f"kind must be one of {KINDS}, got {kind!r}")
    n_samples = _int(d.get("n_samples"), "n_samples", lo=1)
    feats = d.get("features")
    if not isinstance(feats, list) or not feats:
        raise _fail(f"features must be a non-empty list, got {type(feats).__name__}")
    edges: list[tuple[float, ...]] = []
    hists: list[list[int]] = []
    nan = np.zeros(len(feats), dtype=np.int64)
    mean = np.full(len(feats), np.nan)
    std = np.full(len(feats), np.nan)
    for j, f in enumerate(feats):
        where = f"features[{j}]"
        if not isinstance(f, dict):
            raise _fail(f"{where} must be an object, got {type(f).__name__}")
        count = _int(f.get("count"), f"{where}.count")
        if "nan_count" in f:
            nan[j] = _int(f["nan_count"], f"{where}.nan_count")
        else:
            rate = _num(f.get("nan_rate", 0.0), f"{where}.nan_rate", lo=0.0, hi=1.0)
            total = count / (1.0 - rate) if rate < 1.0 else float(n_samples)
            nan[j] = max(0, round(total - count))
        if count == 0:
            edges.append(())
            hists.append([0])
            continue
        h = f.get("histogram")
        if not isinstance(h, dict):
            raise _fail(f"{where}.histogram must be an object with edges and counts")
        e, c = h.get("edges"), h.get("counts")
        if not isinstance(e, list) or not isinstance(c, list):
            raise _fail(f"{where}.histogram.edges and .counts must be lists")
        ev = tuple(_num(v, f"{where}.histogram.edges") for v in e)
        if any(b <= a for a, b in itertools.pairwise(ev)):
            raise _fail(f"{where}.histogram.edges must be strictly increasing, got {list(ev)}")
        cv = [_int(v, f"{where}.histogram.counts") for v in c]
        if len(cv) != len(ev) + 1:
            raise _fail(f"{where}.histogram needs len(edges) + 1 = {len(ev) + 1} counts, got {len(cv)}")
        if sum(cv) != count:
            raise _fail(f"{where}.histogram.counts sum to {sum(cv)}, count says {count}")
        edges.append(ev)
        hists.append(cv)
        mean[j] = _num(f.get("mean"), f"{where}.mean")
        var = _num(f.get("var"), f"{where}.var", lo=0.0)
        std[j] = math.sqrt(var)
    width = max(len(h) for h in hists)
    counts = np.zeros((len(feats), width), dtype=np.int64)
    for j, h in enumerate(hists):
        counts[j, : len(h)] = h
    names = d.get("feature_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(feats)
                              or not all(isinstance(s, str) for s in names)):
        raise _fail(f"feature_names must be {len(feats)} strings, got {names!r}")
    classes: tuple[int, ...] | None = None
    class_counts: np.ndarray | None = None
    outputs = d.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, dict):
            raise _fail(f"outputs must be an object, got {type(outputs).__name__}")
        freq = outputs.get("class_frequencies")
        cc = outputs.get("class_counts")
        src = cc if isinstance(cc, dict) else freq
        if not isinstance(src, dict) or not src:
            raise _fail("outputs.class_frequencies must be a non-empty object {label: frequency}")
        try:
            pairs = sorted((int(k), v) for k, v in src.items())
        except ValueError as e:
            raise _fail(f"outputs class labels must be integers, got {sorted(src)!r}") from e
        classes = tuple(k for k, _ in pairs)
        if src is cc:
            class_counts = np.array([_int(v, f"outputs.class_counts[{k}]") for k, v in pairs], dtype=np.float64)
        else:
            vals = np.array([_num(v, f"outputs.class_frequencies[{k}]", lo=0.0, hi=1.0) for k, v in pairs])
            n_out = outputs.get("n", n_samples)
            class_counts = vals / max(vals.sum(), 1e-12) * _int(n_out, "outputs.n", lo=1)
    sample_shape = d.get("sample_shape", [])
    fp = _fingerprint(edges, counts, nan, classes, class_counts)
    cal = None
    if d.get("calibration") is not None:
        cal = Calibration.from_dict(d["calibration"], n_features=len(feats), has_predictions=classes is not None)
        if cal.fingerprint != fp:
            raise _fail(f"calibration was computed for another profile (fingerprint {cal.fingerprint}, "
                        f"this profile {fp})")
    for a in (counts, nan, mean, std):
        a.flags.writeable = False
    if class_counts is not None:
        class_counts.flags.writeable = False
    inp = d.get("input")
    return Reference(schema=schema, kind=kind, input=inp if isinstance(inp, str) else None, n_samples=n_samples,
                     sample_shape=tuple(int(s) for s in sample_shape) if isinstance(sample_shape, list) else (),
                     feature_names=tuple(names) if names else None, edges=tuple(edges), counts=counts,
                     nan_counts=nan, mean=mean, std=std, classes=classes, class_counts=class_counts,
                     calibration=cal, fingerprint=fp)


# -- the statistics of a window, shared by the monitor and the calibration ---------------------------

class _FeatureTests:
    """Per-feature window statistics against one reference: PSI, JS, KS on the binned counts and the
    rank z-score for the CUSUM. Works on counts of any leading shape ``[..., F, E + 2]`` so the
    calibration's simulated windows and the monitor's live window go through the same code."""

    def __init__(self, ref: Reference, effective_sample_fraction: float = 1.0) -> None:
        self.n_bins = ref.counts.shape[1]
        n_edges = np.array([len(e) for e in ref.edges])
        valid = np.arange(self.n_bins)[None, :] <= n_edges[:, None]
        self.mask = np.concatenate([valid, np.ones((ref.n_features, 1), bool)], axis=1).astype(np.float64)
        self.ref_counts = ref.category_counts()
        self.categorical = _Categorical(self.ref_counts, self.mask)
        fin = ref.counts.astype(np.float64)
        self.ref_cdf = _cdf(fin)
        tot = fin.sum(axis=1, keepdims=True)
        share = fin / np.where(tot > 0, tot, 1.0)
        # Mid-ranks of each bin under the reference; their mean is exactly 1/2 and their variance
        # (1 - sum share^3) / 12 (the tie-corrected Mann-Whitney variance).
        self.mid = np.cumsum(share, axis=1) - share / 2.0
        self.rank_var = np.maximum((1.0 - (share**3).sum(axis=1)) / 12.0, 0.0)
        self.fraction = effective_sample_fraction

    def __call__(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        c = np.asarray(counts, dtype=np.float64)
        out = self.categorical(c)
        fin = c[..., : self.n_bins]
        n_fin = fin.sum(axis=-1)
        ks = np.where(n_fin > 0, np.abs(_cdf(fin) - self.ref_cdf).max(axis=-1), 0.0)
        mean_rank = (fin * self.mid).sum(axis=-1) / np.where(n_fin > 0, n_fin, 1.0)
        se2 = self.rank_var / np.where(n_fin > 0, n_fin * self.fraction, 1.0)
        ok = (n_fin > 0) & (self.rank_var > 1e-12)
        z = np.where(ok, (mean_rank - 0.5) / np.sqrt(np.where(ok, se2, 1.0)), 0.0)
        # One window's contribution to the CUSUM is clipped: large single-window shifts are the window
        # tests' job, and sparse features have heavy-tailed z that would otherwise set the interval.
        out["ks"] = ks
        out["z"] = np.clip(z, -Z_CLIP, Z_CLIP)
        return out


class _PredictionTests:
    """Window class counts (reference classes, then "other") against the reference frequencies."""

    def __init__(self, ref: Reference) -> None:
        if ref.classes is None or ref.class_counts is None:
            raise ValueError("the reference profile has no outputs (class frequencies)")
        self.classes = np.asarray(ref.classes, dtype=np.int64)
        self.ref_counts = np.concatenate([ref.class_counts, [0.0]])
        self.mask = np.ones(self.ref_counts.size)
        self.categorical = _Categorical(self.ref_counts, self.mask)
        k = self.classes.size
        self._dense = bool(self.classes[0] == 0 and self.classes[-1] == k - 1)

    def categories(self, top1: np.ndarray) -> np.ndarray:
        t = np.asarray(top1).reshape(-1).astype(np.int64, copy=False)
        k = self.classes.size
        if self._dense:
            return np.where((t >= 0) & (t < k), t, k)
        pos = np.clip(np.searchsorted(self.classes, t), 0, k - 1)
        return np.where(self.classes[pos] == t, pos, k)

    def counts(self, top1: np.ndarray) -> np.ndarray:
        return np.bincount(self.categories(top1), minlength=self.classes.size + 1).astype(np.float64)

    def __call__(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        return self.categorical(np.asarray(counts, dtype=np.float64), chi2=True)


def prediction_distances(reference: Reference, label_counts: dict[Any, int]) -> dict[str, float] | None:
    """PSI, Jensen-Shannon and chi-square of predicted-class counts (``{label: count}``, as a run
    accumulates them) against the reference's output distribution; classes the reference never saw
    pool into "other". None without reference outputs or counts. Descriptive: the calibrated test
    runs per window inside :class:`DriftMonitor`."""
    if reference.classes is None or reference.class_counts is None or not label_counts:
        return None
    pt = _PredictionTests(reference)
    labels = np.fromiter((int(k) for k in label_counts), dtype=np.int64, count=len(label_counts))
    weights = np.fromiter(label_counts.values(), dtype=np.float64, count=len(label_counts))
    counts = np.bincount(pt.categories(labels), weights=weights, minlength=pt.classes.size + 1)
    v = pt(counts)
    return {s: round(float(v[s]), 4) for s in PREDICTION_STATISTICS}


# -- calibration -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CalibrationSettings:
    """What the calibration aims for and how hard it simulates (see the module docstring)."""

    false_alarms_per_sample: float = 1e-5   # whole model: distances + CUSUMs + predictions
    window: int = 500
    n_simulations: int | None = None       # simulated windows; None: ~50 expected exceedances per share
    max_simulations: int = 400_000
    universes: int = 50                     # true distributions drawn from the reference's posterior
    reference_uncertainty: bool = True
    effective_sample_fraction: float = 1.0  # < 1 for autocorrelated streams (see Limits)
    share_distances: float = 0.5
    share_cusum: float = 0.25
    share_predictions: float = 0.25
    close_quantile: float = 0.9
    close_windows: int = 3
    cusum_shift: float = 1.5                # persistent shift (window rank z units) the CUSUM is tuned for

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarms_per_sample * self.window < 0.5:
            raise ValueError(f"false_alarms_per_sample * window must be in (0, 0.5), got "
                             f"{self.false_alarms_per_sample} * {self.window}")
        if self.window < 10:
            raise ValueError(f"window must be >= 10 samples, got {self.window}")
        if self.n_simulations is not None and self.n_simulations < 1000:
            raise ValueError(f"n_simulations must be >= 1000, got {self.n_simulations}")
        if self.universes < 1:
            raise ValueError(f"universes must be >= 1, got {self.universes}")
        if not 0.0 < self.effective_sample_fraction <= 1.0:
            raise ValueError(f"effective_sample_fraction must be in (0, 1], got {self.effective_sample_fraction}")
        shares = (self.share_distances, self.share_cusum, self.share_predictions)
        if min(shares) < 0 or self.share_distances <= 0 or self.share_cusum <= 0:
            raise ValueError(f"shares must be >= 0 (distances and cusum > 0), got {shares}")
        if not 0.5 <= self.close_quantile < 1.0:
            raise ValueError(f"close_quantile must be in [0.5, 1), got {self.close_quantile}")
        if self.close_windows < 1 or self.cusum_shift <= 0:
            raise ValueError("close_windows must be >= 1 and cusum_shift > 0")


@dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds, stored in the reference profile under ``"calibration"``.

    Feature thresholds are per statistic and per feature; an alarm opens when any statistic of any
    feature exceeds its threshold (or a feature CUSUM exceeds ``cusum_h``) and closes after
    ``close_windows`` windows in which all are below their close thresholds (and every CUSUM below
    half its interval). ``simulated_rates`` are the per-window opening probabilities achieved on the
    simulated null, for the record."""

    method: str
    fingerprint: str
    false_alarms_per_sample: float
    window: int
    n_simulations: int
    universes: int
    seed: int
    reference_uncertainty: bool
    effective_sample_fraction: float
    close_windows: int
    close_quantile: float
    shares: dict[str, float]
    thresholds: dict[str, tuple[float, ...]]
    close_thresholds: dict[str, tuple[float, ...]]
    cusum_k: tuple[float, ...]     # allowance per feature (window rank-z units)
    cusum_h: float
    prediction_thresholds: dict[str, float] | None
    prediction_close: dict[str, float] | None
    simulated_rates: dict[str, float] = field(default_factory=dict)

    @property
    def expected_false_alarms_per_sample(self) -> float:
        return sum(self.simulated_rates.values()) / self.window

    def to_dict(self) -> dict[str, Any]:
        def r(v: float) -> float:
            return float(f"{v:.6g}")

        return {
            "method": self.method, "fingerprint": self.fingerprint,
            "false_alarms_per_sample": self.false_alarms_per_sample, "window": self.window,
            "n_simulations": self.n_simulations, "universes": self.universes, "seed": self.seed,
            "reference_uncertainty": self.reference_uncertainty,
            "effective_sample_fraction": self.effective_sample_fraction,
            "close_windows": self.close_windows, "close_quantile": self.close_quantile,
            "shares": dict(self.shares),
            "features": {"thresholds": {s: [r(v) for v in t] for s, t in self.thresholds.items()},
                         "close": {s: [r(v) for v in t] for s, t in self.close_thresholds.items()}},
            "cusum": {"k": [r(v) for v in self.cusum_k], "h": r(self.cusum_h)},
            "predictions": None if self.prediction_thresholds is None else {
                "thresholds": {s: r(v) for s, v in self.prediction_thresholds.items()},
                "close": {s: r(v) for s, v in (self.prediction_close or {}).items()}},
            "simulated_rates": {k: r(v) for k, v in self.simulated_rates.items()},
            "expected_false_alarms_per_sample": r(self.expected_false_alarms_per_sample),
        }

    @classmethod
    def from_dict(cls, d: Any, *, n_features: int, has_predictions: bool) -> Calibration:
        if not isinstance(d, dict):
            raise _fail(f"calibration must be an object, got {type(d).__name__}")
        if d.get("method") != CALIBRATION_METHOD:
            raise _fail(f"calibration.method must be {CALIBRATION_METHOD!r}, got {d.get('method')!r}")
        try:
            feats = d["features"]
            thr = {s: tuple(_num(v, f"calibration thresholds.{s}", lo=0.0) for v in feats["thresholds"][s])
                   for s in FEATURE_STATISTICS}
            close = {s: tuple(_num(v, f"calibration close.{s}", lo=0.0) for v in feats["close"][s])
                     for s in FEATURE_STATISTICS}
            pred = d.get("predictions")
            pthr = pclose = None
            if pred is not None:
                pthr = {s: _num(pred["thresholds"][s], f"calibration predictions.{s}", lo=0.0)
                        for s in PREDICTION_STATISTICS}
                pclose = {s: _num(pred["close"][s], f"calibration predictions close.{s}", lo=0.0)
                          for s in PREDICTION_STATISTICS}
            out = cls(method=d["method"], fingerprint=str(d["fingerprint"]),
                      false_alarms_per_sample=_num(d["false_alarms_per_sample"], "false_alarms_per_sample", lo=0.0),
                      window=_int(d["window"], "calibration.window", lo=1),
                      n_simulations=_int(d["n_simulations"], "n_simulations"),
                      universes=_int(d.get("universes", 1), "universes", lo=1), seed=int(d["seed"]),
                      reference_uncertainty=bool(d.get("reference_uncertainty", True)),
                      effective_sample_fraction=_num(d.get("effective_sample_fraction", 1.0),
                                                     "effective_sample_fraction", lo=0.0, hi=1.0),
                      close_windows=_int(d["close_windows"], "close_windows", lo=1),
                      close_quantile=_num(d.get("close_quantile", 0.9), "close_quantile", lo=0.0, hi=1.0),
                      shares={str(k): float(v) for k, v in d.get("shares", {}).items()},
                      thresholds=thr, close_thresholds=close,
                      cusum_k=_per_feature(d["cusum"]["k"], "cusum.k", n_features),
                      cusum_h=_num(d["cusum"]["h"], "cusum.h", lo=0.0),
                      prediction_thresholds=pthr, prediction_close=pclose,
                      simulated_rates={str(k): float(v) for k, v in d.get("simulated_rates", {}).items()})
        except (KeyError, TypeError) as e:
            raise _fail(f"calibration misses or mangles a field ({e!r})") from e
        for s in FEATURE_STATISTICS:
            if len(out.thresholds[s]) != n_features or len(out.close_thresholds[s]) != n_features:
                raise _fail(f"calibration thresholds.{s} must have {n_features} entries, "
                            f"got {len(out.thresholds[s])}")
        if has_predictions and out.prediction_thresholds is None:
            raise _fail("calibration has no prediction thresholds but the profile has outputs")
        return out


def _per_feature(v: Any, what: str, n_features: int) -> tuple[float, ...]:
    if isinstance(v, list):
        out = tuple(_num(x, what, lo=0.0) for x in v)
        if len(out) != n_features:
            raise _fail(f"{what} must have {n_features} entries, got {len(out)}")
        return out
    return (_num(v, what, lo=0.0),) * n_features


def _multinomial(rng: np.random.Generator, n: int, p: np.ndarray) -> np.ndarray:
    """Multinomial counts for each row of probabilities ``p`` (``[..., C]``) by conditional binomials,
    vectorised over rows (numpy's ``multinomial`` loops over them in C but is slower here)."""
    out = np.empty(p.shape, dtype=np.float64)
    rem = np.full(p.shape[:-1], n, dtype=np.int64)
    rest = np.ones(p.shape[:-1])
    for c in range(p.shape[-1] - 1):
        pc = p[..., c]
        k = rng.binomial(rem, np.clip(pc / np.maximum(rest, 1e-300), 0.0, 1.0))
        out[..., c] = k
        rem -= k
        rest -= pc
    out[..., -1] = rem
    return out


def _simulate(rng: np.random.Generator, ref_counts: np.ndarray, mask: np.ndarray, n_windows: int,
              universes: int, window: int, fraction: float, uncertainty: bool,
              stats: Any) -> tuple[dict[str, np.ndarray], int]:
    """Null windows ``[universes, per_universe, F]`` of each statistic. Each universe draws one true
    distribution per feature from the reference's Dirichlet posterior and keeps it for its windows."""
    per = max(1, math.ceil(n_windows / universes))
    w_eff = max(1, round(window * fraction))
    alpha = (ref_counts + SMOOTHING) * mask
    base = ref_counts * mask / np.maximum((ref_counts * mask).sum(axis=-1, keepdims=True), 1e-300)
    out: dict[str, list[np.ndarray]] = {}
    for _ in range(universes):
        if uncertainty:
            g = rng.standard_gamma(alpha)
            p = g / np.maximum(g.sum(axis=-1, keepdims=True), 1e-300)
        else:
            p = base
        counts = _multinomial(rng, w_eff, np.broadcast_to(p, (per, *p.shape)))
        if w_eff != window:
            counts *= window / w_eff   # same proportions, the smoothing weighs as in a real window
        for k, v in stats(counts).items():
            out.setdefault(k, []).append(v.astype(np.float32))   # halves the memory; 1e-7 is plenty
    return {k: np.stack(v) for k, v in out.items()}, per


def _quantile_level(alpha: float, n: int) -> float:
    """alpha shrunk by a one-sided 90% Monte Carlo margin: the chance of ~alpha*n exceedances in n
    simulated windows being luckily few."""
    return alpha * max(0.25, 1.0 - 1.2816 / math.sqrt(max(alpha * n, 1e-9)))


def _max_threshold(values: dict[str, np.ndarray], floors: dict[str, float], alpha: float,
                   close_q: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Thresholds such that the maximum over features and statistics of value/scale exceeds its
    threshold in a fraction alpha of simulated windows (values: ``[n, F]`` per statistic)."""
    scales = {s: np.quantile(v, 0.99, axis=0) + floors[s] for s, v in values.items()}
    u = np.max(np.stack([(v / scales[s]).max(axis=1) for s, v in values.items()]), axis=0)
    n = u.size
    level = _quantile_level(alpha, n)
    t_open = float(np.quantile(u, 1.0 - level, method="higher"))
    t_close = float(np.quantile(u, close_q))
    rate = float(np.mean(u > t_open))
    return ({s: t_open * sc for s, sc in scales.items()}, {s: t_close * sc for s, sc in scales.items()}, rate)


def _lindley(x: np.ndarray, s0: np.ndarray) -> np.ndarray:
    """Paths of S_t = max(0, S_{t-1} + x_t) along axis 0, from S_0 = ``s0`` (closed form)."""
    c = np.cumsum(x, axis=0)
    return c - np.minimum(-s0, np.minimum.accumulate(c, axis=0))


def _cusum_interval(z: np.ndarray, k: np.ndarray, alpha: float) -> tuple[float, float]:
    """Smallest h whose simulated up-crossing rate, summed over features and both sides, is at most
    ``alpha`` per window. ``z``: ``[universes, per, F]`` null window z-scores."""
    los, his = [], []
    for sign in (1.0, -1.0):
        x = np.moveaxis(sign * z - k, 1, 0)           # time first: [per, universes, F]
        s = _lindley(x, np.zeros(x.shape[1:]))
        prev = np.concatenate([np.zeros((1, *s.shape[1:])), s[:-1]])
        up = s > prev
        los.append(prev[up])
        his.append(s[up])
    lo = np.sort(np.concatenate(los))
    hi = np.sort(np.concatenate(his))
    n_windows = z.shape[0] * z.shape[1]
    target = _quantile_level(alpha, n_windows) * n_windows
    # An alarm (S_t > h, S_{t-1} <= h) happens for h in [prev, s): count(h) = #{lo <= h} - #{hi <= h},
    # constant between breakpoints; h is the first breakpoint after the last count above target.
    points = np.unique(np.concatenate([lo, hi, [0.0]]))
    count = np.searchsorted(lo, points, side="right") - np.searchsorted(hi, points, side="right")
    above = np.nonzero(count > target)[0]
    h = float(points[above[-1] + 1]) if above.size else float(points[0])
    h = max(h, 1e-6)
    crossings = (np.searchsorted(lo, h, side="right") - np.searchsorted(hi, h, side="right"))
    return h, float(crossings / n_windows)


def calibrate(reference: Reference | dict[str, Any], settings: CalibrationSettings | None = None, *,
              seed: int = 0) -> Calibration:
    """Thresholds for the reference's features (and outputs) meeting ``settings``' false-alarm rate,
    by simulation (see the module docstring). Deterministic for a given seed."""
    ref = load_reference(reference) if isinstance(reference, dict) else reference
    s = settings or CalibrationSettings()
    rng = np.random.default_rng(seed)
    has_pred = ref.classes is not None
    total_share = s.share_distances + s.share_cusum + (s.share_predictions if has_pred else 0.0)
    alpha = s.false_alarms_per_sample * s.window
    a_dist = alpha * s.share_distances / total_share
    a_cusum = alpha * s.share_cusum / total_share
    a_pred = alpha * s.share_predictions / total_share if has_pred else 0.0
    # ~50 expected exceedances for the distances' share (~25 for the CUSUM's): enough for a quantile
    # whose Monte Carlo error the margin in _quantile_level covers.
    n_sim = s.n_simulations or min(s.max_simulations, max(4000, math.ceil(50.0 / a_dist)))
    w_eff = max(1, round(s.window * s.effective_sample_fraction))
    tests = _FeatureTests(ref, s.effective_sample_fraction)
    sims, per = _simulate(rng, tests.ref_counts, tests.mask, n_sim, s.universes, s.window,
                          s.effective_sample_fraction, s.reference_uncertainty, tests)
    n_done = s.universes * per
    flat = {k: v.reshape(n_done, -1) for k, v in sims.items()}
    # Floors: what a handful of samples moving would score, so that features whose null is almost
    # always 0 (constant ones) do not set everyone's threshold.
    floors = {"psi": 5.0 / w_eff, "js": 1.0 / w_eff, "ks": 2.0 / w_eff, "chi2": 1.0}
    thr, close, rate_dist = _max_threshold({st: flat[st] for st in FEATURE_STATISTICS}, floors, a_dist,
                                           s.close_quantile)
    # CUSUM allowance per feature: half the target shift, but at least BIAS_GUARD times the spread of the
    # persistent offset a wrong-but-plausible reference gives each feature's z (measured across the
    # simulated universes). Below that, a CUSUM fed a biased reference drifts up and alarms forever.
    z = sims["z"]
    if not s.reference_uncertainty:
        bias_sd = np.zeros(ref.n_features)
    elif s.universes >= 10:
        bias_sd = z.mean(axis=1).std(axis=0)
    else:
        bias_sd = np.sqrt(w_eff / np.maximum(ref.counts.sum(axis=1), 1.0))
    k = np.maximum(s.cusum_shift / 2.0, BIAS_GUARD * bias_sd)
    h, rate_cusum = _cusum_interval(z, k, a_cusum)
    rates = {"distances": rate_dist, "cusum": rate_cusum}
    pthr = pclose = None
    if has_pred:
        pt = _PredictionTests(ref)
        n_pred = s.n_simulations or min(s.max_simulations, max(4000, math.ceil(50.0 / a_pred)))
        psims, _ = _simulate(rng, pt.ref_counts[None, :], pt.mask[None, :], n_pred, s.universes, s.window,
                                s.effective_sample_fraction, s.reference_uncertainty, pt)
        pflat = {k2: v.reshape(-1, 1) for k2, v in psims.items()}
        pt_open, pt_close, rate_pred = _max_threshold(pflat, floors, a_pred, s.close_quantile)
        pthr = {st: float(v[0]) for st, v in pt_open.items()}
        pclose = {st: float(v[0]) for st, v in pt_close.items()}
        rates["predictions"] = rate_pred
    return Calibration(
        method=CALIBRATION_METHOD, fingerprint=ref.fingerprint, false_alarms_per_sample=s.false_alarms_per_sample,
        window=s.window, n_simulations=n_done, universes=s.universes, seed=seed,
        reference_uncertainty=s.reference_uncertainty, effective_sample_fraction=s.effective_sample_fraction,
        close_windows=s.close_windows, close_quantile=s.close_quantile,
        shares={"distances": s.share_distances / total_share, "cusum": s.share_cusum / total_share,
                "predictions": (s.share_predictions / total_share) if has_pred else 0.0},
        thresholds={st: tuple(float(v) for v in thr[st]) for st in FEATURE_STATISTICS},
        close_thresholds={st: tuple(float(v) for v in close[st]) for st in FEATURE_STATISTICS},
        cusum_k=tuple(float(v) for v in k), cusum_h=h, prediction_thresholds=pthr, prediction_close=pclose,
        simulated_rates=rates)


# -- sequential detectors ----------------------------------------------------------------------------

def _as_rows(x: Any, channels: int) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        a = a.reshape(1, 1)
    elif a.ndim == 1:
        a = a.reshape(-1, 1) if channels == 1 else a.reshape(1, -1)
    if a.ndim != 2 or a.shape[1] != channels:
        raise ValueError(f"expected values [n] or [n, {channels}], got shape {list(np.shape(x))}")
    return a


def _indices(index: Any, n: int, seen: int) -> np.ndarray:
    if index is None:
        return np.arange(seen, seen + n, dtype=np.int64)
    if np.ndim(index) == 0:
        return np.arange(int(index), int(index) + n, dtype=np.int64)
    idx = np.asarray(index, dtype=np.int64).reshape(-1)
    if idx.size != n:
        raise ValueError(f"index must give one position per observation ({n}), got {idx.size}")
    return idx


class Cusum:
    """Two-sided (or one-sided) CUSUM of Page (1954) on standardised values, over parallel channels.

    Each observation x becomes z = (x - mean) / std; the upper statistic accumulates z - k and the
    lower one -z - k, each floored at 0; a channel alarms when either exceeds ``h``. For Gaussian z a
    shift of 2k standard deviations is detected fastest, and the mean run to a false alarm is at least
    about exp(2k h) (the log-likelihood-ratio CUSUM's e^h bound). NaN observations are skipped.

    ``drift_detected`` latches until :meth:`reset`; the statistic keeps updating (``cap`` bounds it, so
    that it falls back quickly once a change ends). ``change_index`` estimates where the change
    began: the first observation of the excursion that crossed ``h``."""

    def __init__(self, mean: Any = 0.0, std: Any = 1.0, *, k: Any = 0.5, h: float = 5.0,
                 side: str = "both", cap: float | None = None) -> None:
        m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        sd = np.atleast_1d(np.asarray(std, dtype=np.float64))
        kk = np.atleast_1d(np.asarray(k, dtype=np.float64))
        m, sd, kk = np.broadcast_arrays(m, sd, kk)
        if m.ndim != 1:
            raise ValueError("mean, std and k must be scalars or 1-D (one per channel)")
        if np.any(~np.isfinite(sd)) or np.any(sd < 0) or np.any(~np.isfinite(m)):
            raise ValueError("mean must be finite and std finite and >= 0")
        if np.any(~np.isfinite(kk)) or np.any(kk < 0) or not h > 0:
            raise ValueError(f"k must be >= 0 and h > 0, got k={k}, h={h}")
        if side not in ("both", "up", "down"):
            raise ValueError(f"side must be 'both', 'up' or 'down', got {side!r}")
        if cap is not None and cap < h:
            raise ValueError(f"cap must be >= h ({h}), got {cap}")
        self.mean, self.std, self.k = m.copy(), sd.copy(), kk.copy()
        self.h, self.side, self.cap = float(h), side, cap
        self.channels = m.size
        self.n_seen = 0          # observations so far; numbers them when no index is given (kept by reset)
        self.reset()

    def reset(self) -> None:
        c = self.channels
        self.upper = np.zeros(c)
        self.lower = np.zeros(c)
        self._run_up = np.full(c, -1, dtype=np.int64)      # index where the current excursion began
        self._run_down = np.full(c, -1, dtype=np.int64)
        self.detected = np.zeros(c, dtype=bool)
        self.alarm_indices = np.full(c, -1, dtype=np.int64)
        self.change_indices = np.full(c, -1, dtype=np.int64)

    @property
    def drift_detected(self) -> bool:
        return bool(self.detected.any())

    @property
    def alarm_index(self) -> int | None:
        """Index of the first alarm over all channels, None if none."""
        a = self.alarm_indices[self.detected]
        return int(a.min()) if a.size else None

    @property
    def change_index(self) -> int | None:
        c = self.change_indices[self.detected]
        return int(c.min()) if c.size else None

    @property
    def statistic(self) -> np.ndarray:
        return np.maximum(self.upper, self.lower)

    def update(self, x: Any, index: int | None = None) -> bool:
        return self.update_batch(np.reshape(np.asarray(x, dtype=np.float64), (1, -1)),
                                 None if index is None else [index])

    def update_batch(self, x: Any, index: Any = None) -> bool:
        """Feed observations ``[n]`` (one channel) or ``[n, channels]``; ``index`` (start, or one per
        row) numbers them for alarm reporting (default: a running count). Returns True if a channel
        alarmed for the first time in this batch."""
        a = _as_rows(x, self.channels)
        n = a.shape[0]
        if n == 0:
            return False
        idx = _indices(index, n, self.n_seen)
        self.n_seen += n
        sd = np.where(self.std > 0, self.std, 1.0)
        z = (a - self.mean) / sd
        # A skipped observation (NaN, or a channel without spread) adds 0: the statistic stays put.
        skip = ~np.isfinite(z) | (self.std <= 0)
        new = np.zeros(self.channels, dtype=bool)
        for sign, side in ((1.0, "up"), (-1.0, "down")):
            if self.side not in ("both", side):
                continue
            inc = np.where(skip, 0.0, sign * z - self.k)
            if self.cap is None and n > 1:
                new |= self._batch(side, inc, idx)
            else:
                new |= self._rows(side, inc, idx)
        return bool(new.any())

    def _rows(self, side: str, inc: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Row by row (a capped walk has no closed form; the monitor feeds one row per window)."""
        state = self.upper if side == "up" else self.lower
        run = self._run_up if side == "up" else self._run_down
        hi = np.inf if self.cap is None else self.cap
        new = np.zeros(self.channels, dtype=bool)
        for t in range(inc.shape[0]):
            s = np.minimum(np.maximum(state + inc[t], 0.0), hi)
            run[:] = np.where(s > 0, np.where(state > 0, run, idx[t]), -1)
            cross = (s > self.h) & ~self.detected
            if cross.any():
                self.detected |= cross
                self.alarm_indices[cross] = idx[t]
                self.change_indices[cross] = run[cross]
                new |= cross
            state[:] = s
        return new

    def _batch(self, side: str, inc: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Vectorised over rows with the closed form of the walk (uncapped)."""
        n = inc.shape[0]
        state = self.upper if side == "up" else self.lower
        run = self._run_up if side == "up" else self._run_down
        path = _lindley(inc, state)
        prev = np.concatenate([state[None], path[:-1]])
        starts = (path > 0) & (prev <= 0)
        pos_t = np.maximum.accumulate(np.where(starts, np.arange(n)[:, None], -1), axis=0)
        run_at = np.where(pos_t >= 0, idx[np.maximum(pos_t, 0)], run[None, :])
        cross = (path > self.h) & ~self.detected[None, :]
        hit = cross.any(axis=0)
        if hit.any():
            t = np.argmax(cross, axis=0)
            cols = np.nonzero(hit)[0]
            self.detected[cols] = True
            self.alarm_indices[cols] = idx[t[cols]]
            self.change_indices[cols] = run_at[t[cols], cols]
        last = path[-1]
        run[:] = np.where(last > 0, run_at[-1], -1)
        state[:] = last
        return hit

    def state(self) -> dict[str, Any]:
        return {"k": self.k.tolist(), "h": self.h, "n": self.n_seen, "max_statistic": float(self.statistic.max()),
                "drift_detected": self.drift_detected, "alarm_index": self.alarm_index,
                "change_index": self.change_index}


class PageHinkley:
    """Page-Hinkley test for a change in the mean of a stream, as river's: with x̄_t the running mean,
    m_t = sum(x_i - x̄_i - delta) for increases (and the mirror for decreases); an alarm when
    m_t - min(m) exceeds ``threshold`` after ``min_samples`` observations. Unlike :class:`Cusum` it
    needs no reference mean (it learns the mean from the stream's start), which also means a stream
    that starts drifted looks normal. ``delta`` and ``threshold`` are in the data's units."""

    def __init__(self, *, delta: float = 0.005, threshold: float = 50.0, min_samples: int = 30,
                 direction: str = "both") -> None:
        if delta < 0 or threshold <= 0 or min_samples < 1:
            raise ValueError("delta must be >= 0, threshold > 0 and min_samples >= 1")
        if direction not in ("both", "up", "down"):
            raise ValueError(f"direction must be 'both', 'up' or 'down', got {direction!r}")
        self.delta, self.threshold, self.min_samples, self.direction = delta, threshold, min_samples, direction
        self._next = 0           # numbers observations when no index is given (kept by reset)
        self.reset()

    def reset(self) -> None:
        """Start over: the mean is learnt again from the next observation."""
        self.n_seen = 0
        self._sum = 0.0
        self._m = {"up": 0.0, "down": 0.0}
        self._min = {"up": 0.0, "down": 0.0}
        # Index of the first observation after the running minimum of m; None while that observation
        # has not arrived yet (the minimum was the last one seen).
        self._after_min: dict[str, int | None] = {"up": None, "down": None}
        self.drift_detected = False
        self.alarm_index: int | None = None
        self.change_index: int | None = None

    @property
    def statistic(self) -> float:
        return max(self._m[s] - self._min[s] for s in ("up", "down") if self.direction in ("both", s))

    def update(self, x: float, index: int | None = None) -> bool:
        return self.update_batch([x], None if index is None else [index])

    def update_batch(self, x: Any, index: Any = None) -> bool:
        """Feed a 1-D batch (NaNs skipped); returns True if the alarm was raised in this batch."""
        a = np.asarray(x, dtype=np.float64).reshape(-1)
        idx = _indices(index, a.size, self._next)
        self._next = int(idx[-1]) + 1 if idx.size else self._next
        keep = np.isfinite(a)
        a, idx = a[keep], idx[keep]
        n = a.size
        if n == 0:
            return False
        counts = self.n_seen + np.arange(1, n + 1)
        means = (self._sum + np.cumsum(a)) / counts
        self._sum += float(a.sum())
        self.n_seen += n
        new = False
        for side, sign in (("up", 1.0), ("down", -1.0)):
            if self.direction not in ("both", side):
                continue
            if self._after_min[side] is None:
                self._after_min[side] = int(idx[0])
            m = self._m[side] + np.cumsum(sign * (a - means) - self.delta)
            run_min = np.minimum(np.minimum.accumulate(m), self._min[side])
            stat = m - run_min
            hits = np.nonzero((stat > self.threshold) & (counts >= self.min_samples))[0]
            if hits.size and not self.drift_detected:
                t = int(hits[0])
                self.drift_detected, new = True, True
                self.alarm_index = int(idx[t])
                # The change began just after the minimum the statistic is measured from (a new
                # minimum only when strictly lower, as in the state update below).
                j = int(np.argmin(m[: t + 1]))
                self.change_index = int(idx[j + 1]) if m[j] < self._min[side] else self._after_min[side]
            j = int(np.argmin(m))
            if m[j] < self._min[side]:
                self._after_min[side] = int(idx[j + 1]) if j + 1 < n else None
            self._m[side] = float(m[-1])
            self._min[side] = float(run_min[-1])
        return new

    def state(self) -> dict[str, Any]:
        return {"n": self.n_seen, "statistic": self.statistic, "threshold": self.threshold,
                "drift_detected": self.drift_detected, "alarm_index": self.alarm_index,
                "change_index": self.change_index}


# -- concept drift from delayed labels ---------------------------------------------------------------

class LabelTracker:
    """Concept drift from (prediction, label) pairs that arrive late: a one-sided Bernoulli CUSUM on
    the error stream, testing the reference error rate p0 against p0 + ``min_drop``.

    Each labelled sample adds its log-likelihood ratio (ln(p1/p0) for an error, ln((1-p1)/(1-p0)) for a
    hit) to a statistic floored at 0; an alarm when it exceeds h = ln(1 / false_alarms_per_label), so the
    mean run between false alarms is at least 1 / false_alarms_per_label labels (Lorden's bound for
    the likelihood-ratio CUSUM) when the true error rate is p0. With ``reference_count`` (the number of
    labels the reference accuracy was measured on), p0 is the 97.5% upper bound of the reference error
    rate, so its estimation error does not count as drift. Rolling accuracy covers the last ``window``
    labels (a ring buffer)."""

    def __init__(self, reference_accuracy: float, *, min_drop: float = 0.1, false_alarms_per_label: float = 1e-5,
                 window: int = 500, reference_count: int | None = None) -> None:
        if not 0.0 < reference_accuracy <= 1.0:
            raise ValueError(f"reference_accuracy must be in (0, 1], got {reference_accuracy}")
        if not 0.0 < min_drop < 1.0:
            raise ValueError(f"min_drop must be in (0, 1), got {min_drop}")
        if not 0.0 < false_alarms_per_label < 1.0:
            raise ValueError(f"false_alarms_per_label must be in (0, 1), got {false_alarms_per_label}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        p0 = 1.0 - reference_accuracy
        if reference_count:
            p0 = p0 + 1.96 * math.sqrt(max(p0 * (1.0 - p0), 0.25 / reference_count) / reference_count)
        self.reference_accuracy = reference_accuracy
        self.p0 = min(max(p0, 1e-4), 0.98)
        self.p1 = min(self.p0 + min_drop, 0.999)
        self.h = math.log(1.0 / false_alarms_per_label)
        self._llr_err = math.log(self.p1 / self.p0)
        self._llr_ok = math.log((1.0 - self.p1) / (1.0 - self.p0))
        self._cusum = Cusum(0.0, 1.0, k=0.0, h=self.h, side="up")
        self._ring = np.zeros(window, dtype=bool)
        self._ring_n = 0
        self._ring_pos = 0
        self.labels = 0
        self.correct = 0

    @property
    def drift_detected(self) -> bool:
        return self._cusum.drift_detected

    @property
    def alarm_index(self) -> int | None:
        return self._cusum.alarm_index

    @property
    def change_index(self) -> int | None:
        return self._cusum.change_index

    @property
    def accuracy(self) -> float | None:
        """Accuracy over the last ``window`` labels (None before the first)."""
        if self._ring_n == 0:
            return None
        return float(self._ring[: self._ring_n].mean())

    def update(self, predictions: Any, labels: Any, sample_index: Any = None) -> bool:
        """Feed aligned predictions and labels (``sample_index``: where the first, or one per pair);
        returns True if the alarm was raised in this batch."""
        p = np.asarray(predictions).reshape(-1)
        y = np.asarray(labels).reshape(-1)
        if p.size != y.size:
            raise ValueError(f"predictions and labels must align, got {p.size} and {y.size}")
        if p.size == 0:
            return False
        hit = p == y
        self.labels += int(hit.size)
        self.correct += int(hit.sum())
        w = self._ring.size
        tail = hit[-w:]
        pos = (self._ring_pos + np.arange(tail.size)) % w
        self._ring[pos] = tail
        self._ring_pos = int((self._ring_pos + tail.size) % w)
        self._ring_n = min(w, self._ring_n + tail.size)
        llr = np.where(hit, self._llr_ok, self._llr_err)
        return self._cusum.update_batch(llr, sample_index)

    def reset(self) -> None:
        """Forget the test (after the caller acted, e.g. rolled back); counters and ring stay."""
        self._cusum.reset()

    def state(self) -> dict[str, Any]:
        return {"labels": self.labels, "accuracy": self.accuracy,
                "overall_accuracy": self.correct / self.labels if self.labels else None,
                "reference_accuracy": self.reference_accuracy, "p0": round(self.p0, 6), "p1": round(self.p1, 6),
                "statistic": round(float(self._cusum.upper[0]), 4), "threshold": round(self.h, 4),
                "drift_detected": self.drift_detected, "alarm_index": self.alarm_index,
                "change_index": self.change_index}


# -- the monitor -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alarm:
    """One drift episode. ``start_index`` estimates the first drifted sample; ``detected_index`` is where
    the alarm opened (the end of the window that raised it); ``end_index`` (None while open) is the start
    of the quiet run that closed it and ``closed_index`` the end of the window that closed it."""

    kind: str                      # "data" or "prediction"
    start_index: int
    detected_index: int
    reason: str
    features: tuple[int, ...] = ()
    peak: float = 0.0              # highest statistic/threshold ratio while open
    windows: int = 1
    end_index: int | None = None
    closed_index: int | None = None

    @property
    def is_open(self) -> bool:
        return self.closed_index is None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "start": self.start_index, "detected": self.detected_index,
                "end": self.end_index, "closed": self.closed_index, "reason": self.reason,
                "features": list(self.features), "peak": round(self.peak, 3), "windows": self.windows}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alarm:
        return cls(kind=str(d["kind"]), start_index=int(d["start"]), detected_index=int(d["detected"]),
                   reason=str(d.get("reason", "")), features=tuple(int(f) for f in d.get("features", ())),
                   peak=float(d.get("peak", 0.0)), windows=int(d.get("windows", 1)),
                   end_index=None if d.get("end") is None else int(d["end"]),
                   closed_index=None if d.get("closed") is None else int(d["closed"]))


# Alarm hysteresis, one table: (state, event) -> (next state, action).
#   trigger: a statistic above its open threshold (or a CUSUM past its interval)
#   quiet:   every statistic below its close threshold (and every CUSUM below half its interval)
#   neither: in between; an open alarm stays open and its quiet count restarts
_HYSTERESIS = {
    ("closed", "trigger"): ("open", "open_alarm"),
    ("closed", "quiet"): ("closed", None),
    ("closed", "neither"): ("closed", None),
    ("open", "trigger"): ("open", "extend"),
    ("open", "neither"): ("open", "extend"),
    ("open", "quiet"): ("open", "count_quiet"),    # closes after close_windows quiet windows in a row
}


class DriftMonitor:
    """Per-model drift monitor: tumbling windows of ``window`` samples, calibrated tests at each window's
    end, hysteresis so a drifted stream gives one alarm. Feed it after postprocessing, per batch::

        monitor = DriftMonitor(load_reference(profile))
        for alarm in monitor.update(inputs_batch, top1_batch, sample_index):
            ...   # alarm.is_open: drift started; else it ended

    Memory is fixed: one window of features (``window x F`` float64) plus per-window class counts.
    A reference without calibration for this window size (a ``/1`` profile, or another window), or any
    reference when ``settings`` are given, is calibrated when the monitor is built (1-2 s for 64
    features; deterministic for a given ``seed``)."""

    def __init__(self, reference: Reference | dict[str, Any], *, window: int | None = None,
                 settings: CalibrationSettings | None = None, model: str | None = None, seed: int = 0,
                 max_alarms: int = 100) -> None:
        ref = load_reference(reference) if isinstance(reference, dict) else reference
        if ref.schema == REFERENCE_SCHEMA_V1 and ref.kind == "tensor":
            raise ReferenceProfileError("a reference/1 tensor profile pools every value into one feature; "
                                        "rebuild it with drift.build_reference to monitor this model")
        cal = ref.calibration
        w = window or (settings.window if settings else None) or (cal.window if cal else 500)
        if cal is None or cal.window != w or settings is not None:
            base = settings or CalibrationSettings()
            cal = calibrate(ref, replace(base, window=w), seed=seed)
        self.reference = ref
        self.calibration = cal
        self.model = model
        self.window = w
        self._tests = _FeatureTests(ref, cal.effective_sample_fraction)
        self._thr = np.stack([np.asarray(cal.thresholds[s]) for s in FEATURE_STATISTICS])
        self._close = np.stack([np.asarray(cal.close_thresholds[s]) for s in FEATURE_STATISTICS])
        self._thr_safe = np.where(self._thr > 0, self._thr, 1e-300)
        self._close_safe = np.where(self._close > 0, self._close, 1e-300)
        f = ref.n_features
        # Capped a little above h: under persistent drift the statistic stays above h (the alarm stays
        # open), and once drift ends it falls below h/2, the close condition, within a few windows.
        self._cusum = Cusum(np.zeros(f), np.ones(f), k=np.asarray(cal.cusum_k), h=cal.cusum_h,
                            cap=1.25 * cal.cusum_h)
        self._pred = _PredictionTests(ref) if ref.classes is not None and cal.prediction_thresholds else None
        self._stats0 = ref.stats_zero()
        self._buf = np.empty((w, f))
        self._fill = 0
        self._win_start = 0
        self._win_cls = np.zeros(0 if self._pred is None else self._pred.classes.size + 1)
        self._next_index = 0
        self.samples = 0
        self.windows = 0
        self._open: dict[str, Alarm] = {}
        self._quiet: dict[str, tuple[int, int]] = {}    # kind -> (quiet windows in a row, first quiet start)
        self._alarms: list[Alarm] = []
        self._max_alarms = max_alarms
        self.alarms_total = 0
        self.last_window: dict[str, Any] | None = None
        self._reset_period()

    # -- feeding -----------------------------------------------------------------------------------

    def update(self, inputs: Any, top1: Any = None, sample_index: int | None = None) -> list[Alarm]:
        """Add a batch of model inputs (as the reference's kind expects: rows, or BGR frames for image
        references) and, optionally, its top-1 predictions (ignored when the reference has no outputs);
        ``sample_index`` numbers the batch's first sample (default: continues from the last batch).
        Returns the alarms opened or closed by the windows this batch completed."""
        return self.update_features(extract_features(inputs, self.reference.kind), top1, sample_index)

    def update_features(self, features: Any, top1: Any = None, sample_index: int | None = None) -> list[Alarm]:
        """As :meth:`update`, with the monitored features already extracted (``[n, F]``)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.reference.n_features:
            raise ValueError(f"expected features [n, {self.reference.n_features}], got shape {list(x.shape)}")
        n = x.shape[0]
        cats = None
        if top1 is not None and self._pred is not None:
            t = np.asarray(top1).reshape(-1)
            if t.size != n:
                raise ValueError(f"top1 must hold one label per sample ({n}), got {t.size}")
            cats = self._pred.categories(t)
        start = self._next_index if sample_index is None else int(sample_index)
        self._next_index = start + n
        self.samples += n
        events: list[Alarm] = []
        pos = 0
        while pos < n:
            if self._fill == 0:
                self._win_start = start + pos
            take = min(self.window - self._fill, n - pos)
            self._buf[self._fill: self._fill + take] = x[pos: pos + take]
            if cats is not None:
                self._win_cls += np.bincount(cats[pos: pos + take], minlength=self._win_cls.size)
            self._fill += take
            pos += take
            if self._fill == self.window:
                events += self._end_window(start + pos)
                self._fill = 0
        return events

    # -- window end ----------------------------------------------------------------------------------

    def _end_window(self, end: int) -> list[Alarm]:
        stats = self._stats0.empty_like().update_batch(self._buf)
        counts = np.concatenate([stats.hist, stats.nan_count[:, None]], axis=1)
        t = self._tests(counts)
        vals = np.stack([t[s] for s in FEATURE_STATISTICS])            # [S, F]
        ratio = vals / self._thr_safe
        feat_score = ratio.max(axis=0)
        score = float(feat_score.max())
        close_score = float((vals / self._close_safe).max())
        self._cusum.update_batch(t["z"][None, :], [self._win_start])
        cus = self._cusum.statistic / self._cusum.h
        events: list[Alarm] = []
        cus_on = cus > 1.0
        trigger = score > 1.0 or bool(cus_on.any())
        quiet = close_score < 1.0 and float(cus.max()) < 0.5
        over = np.nonzero((feat_score > 1.0) | cus_on)[0]
        top = tuple(int(i) for i in over[np.argsort(-feat_score[over])][:5])
        stat_names = sorted({FEATURE_STATISTICS[i] for i in np.nonzero((ratio > 1.0).any(axis=1))[0]})
        reasons = [*stat_names, *(["cusum"] if cus_on.any() else [])]
        start = self._win_start
        if cus_on.any() and score <= 1.0:
            # Raised by the CUSUM alone: the change began where the crossing excursion began.
            starts = self._cusum.change_indices[cus_on & self._cusum.detected]
            if starts.size:
                start = min(start, int(starts.min()))
        ev = self._step("data", trigger, quiet, start, end, top, "+".join(reasons) or "drift",
                        max(score, float(cus.max())))
        if ev is not None:
            events.append(ev)
            if not ev.is_open:
                self._cusum.reset()
        pred_info: dict[str, Any] | None = None
        n_cls = float(self._win_cls.sum()) if self._pred is not None else 0.0
        if self._pred is not None and n_cls > 0:
            cal = self.calibration
            assert cal.prediction_thresholds is not None and cal.prediction_close is not None
            pv = self._pred(self._win_cls)
            pr = {s: float(pv[s]) / max(cal.prediction_thresholds[s], 1e-300) for s in PREDICTION_STATISTICS}
            pc = max(float(pv[s]) / max(cal.prediction_close[s], 1e-300) for s in PREDICTION_STATISTICS)
            pscore = max(pr.values())
            pred_info = {"score": round(pscore, 4), **{s: round(float(pv[s]), 5) for s in PREDICTION_STATISTICS}}
            # Predictions are only tested on windows where every sample came with one.
            if n_cls >= self.window:
                pev = self._step("prediction", pscore > 1.0, pc < 1.0, self._win_start, end, (),
                                 "+".join(s for s, v in pr.items() if v > 1.0) or "prediction", pscore)
                if pev is not None:
                    events.append(pev)
        self.windows += 1
        self.last_window = {
            "start": self._win_start, "end": end, "score": round(score, 4), "close_score": round(close_score, 4),
            "cusum": round(float(cus.max()), 4),
            "top": [[int(i), round(float(feat_score[i]), 3)] for i in np.argsort(-feat_score)[:3]],
            "prediction": pred_info}
        self._period_stats = self._period_stats.merge(stats)
        if self._pred is not None:
            self._period_cls = self._period_cls + self._win_cls
            self._win_cls = np.zeros_like(self._win_cls)
        if self._period_start is None:
            self._period_start = self._win_start
        self._period_end = end
        self._period_windows += 1
        self._period_cusum = max(self._period_cusum, float(cus.max()))
        self._period_peak = np.maximum(self._period_peak, feat_score)
        if pred_info is not None and n_cls >= self.window:
            self._period_pred_peak = max(self._period_pred_peak, float(pred_info["score"]))
        self._period_events.extend(events)
        return events

    def _step(self, kind: str, trigger: bool, quiet: bool, start: int, end: int, features: tuple[int, ...],
              reason: str, score: float) -> Alarm | None:
        state = "open" if kind in self._open else "closed"
        event = "trigger" if trigger else ("quiet" if quiet else "neither")
        nxt, action = _HYSTERESIS[(state, event)]
        if action == "open_alarm":
            alarm = Alarm(kind=kind, start_index=start, detected_index=end, reason=reason, features=features,
                          peak=score)
            self._open[kind] = alarm
            self._quiet[kind] = (0, 0)
            self._record(alarm, new=True)
            return alarm
        if state == "closed":
            return None
        cur = self._open[kind]
        merged = tuple(dict.fromkeys(cur.features + features))[:5]
        cur = replace(cur, peak=max(cur.peak, score), windows=cur.windows + 1, features=merged)
        if action == "count_quiet":
            n_quiet, since = self._quiet[kind]
            n_quiet, since = n_quiet + 1, (since if n_quiet else self._win_start)
            if n_quiet >= self.calibration.close_windows:
                closed = replace(cur, end_index=since, closed_index=end)
                del self._open[kind]
                self._record(closed, new=False)
                return closed
            self._quiet[kind] = (n_quiet, since)
        else:
            self._quiet[kind] = (0, 0)
        self._open[kind] = cur
        self._record(cur, new=False)
        assert nxt == "open"
        return None

    def _record(self, alarm: Alarm, *, new: bool) -> None:
        if new:
            self.alarms_total += 1
            self._alarms.append(alarm)
            if len(self._alarms) > self._max_alarms:
                # Drop the oldest closed alarm; open ones (at most one per kind) always stay.
                for i, a in enumerate(self._alarms):
                    if not a.is_open:
                        del self._alarms[i]
                        break
            return
        for i in range(len(self._alarms) - 1, -1, -1):
            a = self._alarms[i]
            if a.kind == alarm.kind and a.detected_index == alarm.detected_index:
                self._alarms[i] = alarm
                return

    # -- reading -------------------------------------------------------------------------------------

    @property
    def alarms(self) -> tuple[Alarm, ...]:
        """Alarms so far, oldest first (the oldest closed ones beyond ``max_alarms`` are dropped)."""
        return tuple(self._alarms)

    @property
    def open_alarms(self) -> tuple[Alarm, ...]:
        return tuple(self._open.copy().values())  # a copy: readable while the monitor's thread updates

    def state(self) -> dict[str, Any]:
        """A JSON-ready snapshot for reports and status lines."""
        cal = self.calibration
        return {"model": self.model, "window": self.window, "samples": self.samples, "windows": self.windows,
                "pending": self._fill, "alarms_total": self.alarms_total,
                "open": [a.to_dict() for a in self._open.values()], "last_window": self.last_window,
                "calibration": {"method": cal.method, "false_alarms_per_sample": cal.false_alarms_per_sample,
                                "expected_false_alarms_per_sample": cal.expected_false_alarms_per_sample,
                                "window": cal.window},
                "reference": self.reference.fingerprint}

    def _reset_period(self) -> None:
        self._period_stats = self._stats0.empty_like()
        self._period_cls = np.zeros(0 if self._pred is None else self._pred.classes.size + 1)
        self._period_start: int | None = None
        self._period_end: int | None = None
        self._period_windows = 0
        self._period_cusum = 0.0
        self._period_peak = np.zeros(self.reference.n_features)
        self._period_pred_peak = 0.0
        self._period_events: list[Alarm] = []

    def summary(self) -> DriftSummary:
        """A mergeable summary of the complete windows since the last :meth:`take_summary`."""
        alarms: dict[tuple[str, int], Alarm] = {}
        for a in [*self._period_events, *self._open.values()]:
            alarms[(a.kind, a.detected_index)] = a
        for a in self._open.values():      # the latest state of alarms still open
            alarms[(a.kind, a.detected_index)] = a
        st = self._period_stats
        peaks = {int(j): round(float(v), 2) for j, v in enumerate(self._period_peak) if v > 0}
        summary = DriftSummary(
            reference=self.reference.fingerprint, model=self.model, start=self._period_start,
            end=self._period_end, n=int(st.total[0]) if st.n_features else 0, windows=self._period_windows,
            hist=tuple(tuple(int(c) for c in st.histogram(j)) for j in range(st.n_features)),
            nan=tuple(int(c) for c in st.nan_count), mean=_sig_of_scale(st.mean, st.std, 4), std=_sig(st.std, 4),
            top=_top(peaks),
            classes=self.reference.classes if self._pred is not None else None,
            class_counts=None if self._pred is None else tuple(int(c) for c in self._period_cls),
            prediction_score=round(self._period_pred_peak, 2), cusum=round(self._period_cusum, 2),
            alarms=tuple(alarms.values())[-MAX_SUMMARY_ALARMS:])
        return summary.with_distances(self.reference)

    @property
    def period_windows(self) -> int:
        """Complete windows since the last :meth:`take_summary`."""
        return self._period_windows

    def take_summary(self) -> DriftSummary:
        """:meth:`summary`, then start a new period."""
        s = self.summary()
        self._reset_period()
        return s


# -- summaries ---------------------------------------------------------------------------------------

def _sig(values: Any, digits: int) -> tuple[float | None, ...]:
    return tuple(None if v is None or not math.isfinite(v) else float(f"{v:.{digits}g}") for v in values)


def _sig_of_scale(values: Any, scales: Any, digits: int) -> tuple[float | None, ...]:
    """Means to ``digits`` significant digits of their feature's spread (a mean of 0.00996 with a
    standard deviation of 1.004 is sent as 0.01): no precision that the spread does not carry."""
    out: list[float | None] = []
    for v, sc in zip(values, scales, strict=True):
        if v is None or not math.isfinite(v):
            out.append(None)
        elif sc is None or not math.isfinite(sc) or sc <= 0 or abs(v) < sc:
            decimals = digits - 1 - math.floor(math.log10(sc)) if sc and math.isfinite(sc) and sc > 0 else None
            out.append(float(f"{v:.{digits}g}") if decimals is None else round(float(v), decimals) + 0.0)
        else:
            out.append(float(f"{v:.{digits}g}"))
    return tuple(out)


def _dec(values: Any, decimals: int) -> tuple[float, ...]:
    return tuple(round(float(v), decimals) + 0.0 for v in values)   # + 0.0: no "-0.0" in the JSON


def _top(scores: dict[int, float], n: int = 3) -> tuple[tuple[int, float], ...]:
    return tuple(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


MAX_WIRE_WINDOWS = 8  # windows per summary sent from a device (bounds the counts' digits, so the size)


@dataclass(frozen=True, eq=False)
class DriftSummary:
    """What a device reports about drift over a run of complete windows, without raw inputs.

    Per feature: histogram counts on the reference bins, non-finite counts, mean and standard deviation
    (4 significant digits), and PSI and KS of the pooled counts against the reference (3 decimals;
    descriptive: thresholds are calibrated for single windows). ``top`` lists the features with the
    highest single-window score (statistic / threshold, 1 = alarm level) and ``score`` the highest;
    class counts and their distances; the peak CUSUM ratio; the alarms open or closed in the run.

    Summaries of one reference merge (:func:`merge_summaries`, :meth:`merge`) into the summary of the
    combined samples: counts, window scores and peaks exactly, moments up to their rounding, distances
    recomputed from the merged counts. ``to_dict`` is versioned (:data:`SUMMARY_SCHEMA`) and compact;
    its wire form (``distances=False``) for 64 continuous features with ten bins each and ten classes
    is about 3.4 KB for one 500-sample window and stays under 4 KB up to :data:`MAX_WIRE_WINDOWS`
    windows (counts grow a digit per tenfold); agents send a summary at least that often. It is the
    ``summary`` object of a protocol drift record."""

    reference: str
    model: str | None
    start: int | None
    end: int | None
    n: int
    windows: int
    hist: tuple[tuple[int, ...], ...]
    nan: tuple[int, ...]
    mean: tuple[float | None, ...]
    std: tuple[float | None, ...]
    top: tuple[tuple[int, float], ...] = ()
    classes: tuple[int, ...] | None = None
    class_counts: tuple[int, ...] | None = None     # one per class, then "other"
    prediction_score: float = 0.0
    distances: dict[str, tuple[float, ...]] | None = None
    prediction_distances: dict[str, float] | None = None
    cusum: float = 0.0
    alarms: tuple[Alarm, ...] = ()

    @property
    def score(self) -> float:
        return self.top[0][1] if self.top else 0.0

    def with_distances(self, reference: Reference | dict[str, Any] | None) -> DriftSummary:
        """This summary with distances recomputed against ``reference`` (None: dropped)."""
        if reference is None:
            return replace(self, distances=None, prediction_distances=None)
        ref = load_reference(reference) if isinstance(reference, dict) else reference
        if ref.fingerprint != self.reference:
            raise ValueError(f"summary is for reference {self.reference}, not {ref.fingerprint}")
        if len(self.hist) != ref.n_features:
            raise ValueError(f"summary has {len(self.hist)} features, reference {ref.n_features}")
        counts = np.zeros((ref.n_features, ref.counts.shape[1] + 1))
        for j, h in enumerate(self.hist):
            if len(h) != len(ref.edges[j]) + 1:
                raise ValueError(f"summary histogram of feature {j} has {len(h)} bins, reference "
                                 f"{len(ref.edges[j]) + 1}")
            counts[j, : len(h)] = h
        counts[:, -1] = self.nan
        t = _FeatureTests(ref)(counts)
        dist = {s: _dec(t[s], 3) for s in ("psi", "ks")}
        pdist = None
        if self.class_counts is not None and ref.classes is not None and sum(self.class_counts) > 0:
            pt = _PredictionTests(ref)
            if len(self.class_counts) != pt.classes.size + 1:
                raise ValueError(f"summary has {len(self.class_counts)} class counts, reference "
                                 f"{pt.classes.size} classes + other")
            pv = pt(np.asarray(self.class_counts, dtype=np.float64))
            pdist = {s: round(float(pv[s]), 4) for s in PREDICTION_STATISTICS}
        return replace(self, distances=dist, prediction_distances=pdist, classes=ref.classes)

    def to_dict(self, *, distances: bool = True) -> dict[str, Any]:
        """The versioned dict. ``distances=False`` leaves the per-feature distances out (receivers with
        the reference recompute them from the counts: :meth:`with_distances`) and keeps only the
        largest of each, as ``max_distances`` ``{"psi": [feature, value], ...}``: the wire form, which
        keeps a 64-feature summary of up to :data:`MAX_WIRE_WINDOWS` windows under 4 KB."""
        out: dict[str, Any] = {
            "schema": SUMMARY_SCHEMA, "reference": self.reference, "model": self.model,
            "start": self.start, "end": self.end, "n": self.n, "windows": self.windows,
            "features": {"hist": [list(h) for h in self.hist],
                         "nan": {str(j): c for j, c in enumerate(self.nan) if c},
                         "mean": list(self.mean), "std": list(self.std)},
            "score": self.score, "top": [[j, v] for j, v in self.top],
        }
        if self.distances is not None:
            if distances:
                out["distances"] = {s: list(v) for s, v in self.distances.items()}
            else:
                out["max_distances"] = {s: [int(np.argmax(v)), max(v)] for s, v in self.distances.items() if v}
        if self.class_counts is not None:
            out["predictions"] = {"classes": None if self.classes is None else list(self.classes),
                                  "counts": list(self.class_counts), "score": self.prediction_score,
                                  **(self.prediction_distances or {})}
        out["cusum"] = self.cusum
        out["alarms"] = [a.to_dict() for a in self.alarms]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> DriftSummary:
        """Validate a summary dict (as received: sizes and types checked, nothing trusted)."""
        if not isinstance(d, dict) or d.get("schema") != SUMMARY_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"drift summary: expected schema {SUMMARY_SCHEMA!r}, got {got!r}")
        try:
            f = d["features"]
            hist = tuple(tuple(int(c) for c in h) for h in f["hist"])
            nf = len(hist)
            nan_d = f.get("nan", {})
            nan = [0] * nf
            for j, c in nan_d.items():
                if not 0 <= int(j) < nf:
                    raise ValueError(f"features.nan names feature {j}, out of range")
                nan[int(j)] = int(c)
            mean = tuple(None if v is None else float(v) for v in f["mean"])
            std = tuple(None if v is None else float(v) for v in f["std"])
            if not (len(mean) == len(std) == nf):
                raise ValueError("features.hist, mean and std must have one entry per feature")
            if any(c < 0 for h in hist for c in h) or any(c < 0 for c in nan):
                raise ValueError("counts must be >= 0")
            p = d.get("predictions")
            dist = d.get("distances")
            out = cls(
                reference=str(d["reference"]), model=None if d.get("model") is None else str(d["model"]),
                start=None if d.get("start") is None else int(d["start"]),
                end=None if d.get("end") is None else int(d["end"]), n=int(d["n"]), windows=int(d["windows"]),
                hist=hist, nan=tuple(nan), mean=mean, std=std,
                top=tuple((int(j), float(v)) for j, v in d.get("top", [])),
                classes=None if p is None or p.get("classes") is None else tuple(int(c) for c in p["classes"]),
                class_counts=None if p is None else tuple(int(c) for c in p["counts"]),
                prediction_score=0.0 if p is None else float(p.get("score", 0.0)),
                distances=None if dist is None else {s: tuple(float(v) for v in dist[s]) for s in ("psi", "ks")},
                prediction_distances=None if p is None or "psi" not in p else {
                    s: float(p[s]) for s in PREDICTION_STATISTICS},
                cusum=float(d.get("cusum", 0.0)),
                alarms=tuple(Alarm.from_dict(a) for a in d.get("alarms", [])))
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            raise ValueError(f"drift summary: missing or malformed field ({e!r})") from e
        if any(not 0 <= j < nf for j, _ in out.top):
            raise ValueError("drift summary: top names a feature out of range")
        bad = [j for j in range(nf) if sum(hist[j]) + nan[j] != out.n]
        if bad:
            raise ValueError(f"drift summary: counts of feature {bad[0]} add up to "
                             f"{sum(hist[bad[0]]) + nan[bad[0]]}, n says {out.n}")
        return out

    def merge(self, other: DriftSummary, reference: Reference | dict[str, Any] | None = None) -> DriftSummary:
        """The summary of both runs of samples (two devices, or two periods of one device). Distances
        are recomputed when ``reference`` is given, else dropped (distances do not add)."""
        if self.reference != other.reference:
            raise ValueError(f"cannot merge summaries of different references ({self.reference}, {other.reference})")
        if len(self.hist) != len(other.hist) or any(len(a) != len(b) for a, b in zip(self.hist, other.hist,
                                                                                        strict=True)):
            raise ValueError("cannot merge summaries with different features or bins")
        if (self.class_counts is not None and other.class_counts is not None
                and len(self.class_counts) != len(other.class_counts)):
            raise ValueError("cannot merge summaries with different classes")
        hist = tuple(tuple(x + y for x, y in zip(a, b, strict=True)) for a, b in zip(self.hist, other.hist,
                                                                                    strict=True))
        nan = tuple(x + y for x, y in zip(self.nan, other.nan, strict=True))
        na = np.array([sum(h) for h in self.hist], dtype=np.float64)
        nb = np.array([sum(h) for h in other.hist], dtype=np.float64)
        ma, mb, sa, sb = (np.array([np.nan if v is None else v for v in t], dtype=np.float64)
                          for t in (self.mean, other.mean, self.std, other.std))
        ma, mb = np.where(na > 0, ma, 0.0), np.where(nb > 0, mb, 0.0)
        va, vb = np.where(na > 0, sa, 0.0) ** 2, np.where(nb > 0, sb, 0.0) ** 2
        n = na + nb
        safe = np.where(n > 0, n, 1.0)
        delta = mb - ma
        # Chan et al. on (count, mean, M2 = var * count), as FeatureStats.merge.
        mean = ma + delta * nb / safe
        m2 = va * na + vb * nb + delta**2 * na * nb / safe
        std = np.sqrt(np.maximum(m2, 0.0) / safe)
        if self.class_counts is None or other.class_counts is None:
            cc = self.class_counts or other.class_counts
        else:
            cc = tuple(x + y for x, y in zip(self.class_counts, other.class_counts, strict=True))
        peaks: dict[int, float] = {}
        for j, v in (*self.top, *other.top):
            peaks[j] = max(v, peaks.get(j, v))
        starts = [s for s in (self.start, other.start) if s is not None]
        ends = [e for e in (self.end, other.end) if e is not None]
        alarms = {(a.kind, a.detected_index): a for a in (*self.alarms, *other.alarms)}
        merged = DriftSummary(
            reference=self.reference, model=self.model if self.model == other.model else None,
            start=min(starts) if starts else None, end=max(ends) if ends else None, n=self.n + other.n,
            windows=self.windows + other.windows, hist=hist, nan=nan,
            mean=_sig([m if c > 0 else None for m, c in zip(mean.tolist(), n.tolist(), strict=True)], 4),
            std=_sig([v if c > 0 else None for v, c in zip(std.tolist(), n.tolist(), strict=True)], 4),
            top=_top(peaks), classes=self.classes or other.classes, class_counts=cc,
            prediction_score=max(self.prediction_score, other.prediction_score),
            cusum=max(self.cusum, other.cusum),
            alarms=tuple(sorted(alarms.values(), key=lambda a: (a.detected_index, a.kind)))[-MAX_SUMMARY_ALARMS:])
        return merged.with_distances(reference)


def merge_summaries(a: dict[str, Any], b: dict[str, Any],
                    reference: Reference | dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge two summary dicts (for the cloud: fleet-level drift without raw inputs). With the
    reference profile, distances are recomputed from the merged counts; without, they are dropped."""
    return DriftSummary.from_dict(a).merge(DriftSummary.from_dict(b), reference).to_dict()

"""Streaming per-feature statistics in fixed memory that merge exactly.

A device updates :class:`FeatureStats` from whole batches of rows (``[n, F]``), ships ``to_dict()``
partials, and the cloud merges them: merging is exact for counts, NaN counts, min, max and the
histogram, and exact up to floating-point rounding for the mean and variance, which combine with the
parallel formula of Chan, Golub and LeVeque (1979) rather than from sums of squares, so a feature
with a large mean and a small spread keeps its variance. Memory is ``O(F * bins)`` whatever the
stream length.

Non-finite values (NaN, +Inf, -Inf) are counted in ``nan_count`` and otherwise ignored: a sensor that
reports NaN must neither crash the monitor nor shift its mean. The histogram counts finite values on
fixed edges (the reference profile's deciles); a value equal to an edge falls in the bin to its right,
as ``np.searchsorted(edges, x, side="right")`` places it. Quantiles read back from the histogram are
estimates (linear within a bin, bounded by the exact min and max), and merge for free because the
counts do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["STATS_SCHEMA", "FeatureStats"]

STATS_SCHEMA = "edge-runtime.feature-stats/1"

EdgesLike = Sequence[Sequence[float]] | np.ndarray | None


def _pad_edges(edges: EdgesLike, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature edge lists as one ``[F, E]`` array padded with +inf, and each list's length.

    Padding with +inf keeps the vectorised bin index (number of edges <= x) right for every finite
    x, so features with fewer distinct deciles (discrete or constant ones) share one array."""
    if edges is None:
        return np.zeros((n_features, 0)), np.zeros(n_features, dtype=np.int64)
    if isinstance(edges, np.ndarray) and edges.ndim == 2:
        rows = [r[np.isfinite(r)] for r in edges.astype(np.float64)]
    else:
        rows = [np.asarray(e, dtype=np.float64).reshape(-1) for e in edges]
    if len(rows) != n_features:
        raise ValueError(f"edges: expected one edge list per feature ({n_features}), got {len(rows)}")
    for j, r in enumerate(rows):
        if not np.all(np.isfinite(r)):
            raise ValueError(f"edges of feature {j}: expected finite values, got {r.tolist()}")
        if r.size > 1 and np.any(np.diff(r) <= 0):
            raise ValueError(f"edges of feature {j}: expected strictly increasing values, got {r.tolist()}")
    n_edges = np.array([r.size for r in rows], dtype=np.int64)
    width = int(n_edges.max()) if n_features else 0
    padded = np.full((n_features, width), np.inf)
    for j, r in enumerate(rows):
        padded[j, : r.size] = r
    return padded, n_edges


class FeatureStats:
    """Count, NaN count, mean, variance, min, max and a fixed-edge histogram for each of F features.

    ``update_batch`` changes the object in place (it is the device's accumulator); ``merge`` returns a
    new object and leaves both operands alone (it is what the cloud does with partials)."""

    __slots__ = ("_count", "_edges", "_hist", "_m2", "_max", "_mean", "_min", "_n_edges", "_nan", "_offsets")

    def __init__(self, edges: np.ndarray, n_edges: np.ndarray, count: np.ndarray, nan: np.ndarray,
                 mean: np.ndarray, m2: np.ndarray, lo: np.ndarray, hi: np.ndarray, hist: np.ndarray) -> None:
        # Use zero() or from_dict(); this constructor trusts its arrays.
        self._edges = edges
        self._n_edges = n_edges
        self._count = count
        self._nan = nan
        self._mean = mean
        self._m2 = m2
        self._min = lo
        self._max = hi
        self._hist = hist
        # Flat histogram index of bin 0 of each feature, for one bincount over the whole batch.
        self._offsets = np.arange(edges.shape[0], dtype=np.int64) * hist.shape[1]

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def zero(cls, n_features: int, edges: EdgesLike = None) -> FeatureStats:
        """Empty statistics for ``n_features`` features; ``edges`` is one increasing list per feature
        (may differ in length), or None for no histogram (one bin holding every finite value)."""
        if n_features < 0:
            raise ValueError(f"n_features must be >= 0, got {n_features}")
        padded, n_edges = _pad_edges(edges, n_features)
        f = n_features
        return cls(padded, n_edges, np.zeros(f, np.int64), np.zeros(f, np.int64), np.zeros(f), np.zeros(f),
                   np.full(f, np.inf), np.full(f, -np.inf), np.zeros((f, padded.shape[1] + 1), np.int64))

    @classmethod
    def of(cls, x: np.ndarray, edges: EdgesLike = None) -> FeatureStats:
        """Statistics of one batch ``x`` (``[n, F]``)."""
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected rows of features [n, F], got shape {list(x.shape)}")
        return cls.zero(x.shape[1], edges).update_batch(x)

    def empty_like(self) -> FeatureStats:
        """Empty statistics on the same edges (the edge arrays are shared: they never change)."""
        f = self.n_features
        return FeatureStats(self._edges, self._n_edges, np.zeros(f, np.int64), np.zeros(f, np.int64),
                            np.zeros(f), np.zeros(f), np.full(f, np.inf), np.full(f, -np.inf),
                            np.zeros_like(self._hist))

    def copy(self) -> FeatureStats:
        return FeatureStats(self._edges, self._n_edges, self._count.copy(), self._nan.copy(), self._mean.copy(),
                            self._m2.copy(), self._min.copy(), self._max.copy(), self._hist.copy())

    # -- updating ----------------------------------------------------------------------------------

    def bin_index(self, x: np.ndarray) -> np.ndarray:
        """Histogram bin of each value of ``x`` (``[n, F]``): the number of the feature's edges <= x.
        Meaningless for non-finite values (the caller masks them)."""
        idx = np.zeros(x.shape, dtype=np.uint8 if self._edges.shape[1] < 255 else np.int64)
        # One comparison of the whole batch per edge rank: a few vector ops for the usual 9 edges,
        # where a reduction over a short last axis (or a searchsorted per feature) costs far more.
        for e in range(self._edges.shape[1]):
            idx += x >= self._edges[:, e]
        return idx

    def update_batch(self, x: np.ndarray) -> FeatureStats:
        """Add the rows of ``x`` (``[n, F]``; NaN and +-Inf allowed, counted as non-finite); returns self."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features [n, {self.n_features}], "
                             f"got shape {list(x.shape)}")
        if x.shape[0] == 0:
            return self
        finite = np.isfinite(x)
        nb = finite.sum(axis=0)
        self._nan += x.shape[0] - nb
        if not finite.all():
            xz = np.where(finite, x, 0.0)
            has = nb > 0
            nb_safe = np.where(has, nb, 1)
            mb = xz.sum(axis=0) / nb_safe
            dev = np.where(finite, x - mb, 0.0)
            self._min = np.minimum(self._min, np.where(finite, x, np.inf).min(axis=0))
            self._max = np.maximum(self._max, np.where(finite, x, -np.inf).max(axis=0))
            idx = self.bin_index(xz)
            flat = (idx + self._offsets)[finite]
        else:
            mb = x.mean(axis=0)
            dev = x - mb
            self._min = np.minimum(self._min, x.min(axis=0))
            self._max = np.maximum(self._max, x.max(axis=0))
            flat = (self.bin_index(x) + self._offsets).reshape(-1)
        m2b = np.einsum("ij,ij->j", dev, dev)
        self._hist += np.bincount(flat, minlength=self._hist.size).reshape(self._hist.shape)
        self._combine_moments(nb, mb, m2b)
        return self

    def _combine_moments(self, nb: np.ndarray, mb: np.ndarray, m2b: np.ndarray) -> None:
        # Chan et al.: exact for any split of the stream, and stable when the mean dwarfs the spread.
        na = self._count
        n = na + nb
        safe = np.where(n > 0, n, 1)
        delta = mb - self._mean
        self._mean = np.where(n > 0, self._mean + delta * (nb / safe), 0.0)
        self._m2 = self._m2 + m2b + delta * delta * (na * nb / safe)
        self._count = n

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Statistics of both streams together, as a new object (order of streams does not matter)."""
        if self.n_features != other.n_features or not np.array_equal(self._edges, other._edges):
            raise ValueError("cannot merge statistics with different features or histogram edges "
                             f"({self.n_features} vs {other.n_features} features)")
        out = self.copy()
        out._nan += other._nan
        out._min = np.minimum(out._min, other._min)
        out._max = np.maximum(out._max, other._max)
        out._hist += other._hist
        out._combine_moments(other._count, other._mean, other._m2)
        return out

    __add__ = merge

    # -- accessors ---------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return int(self._count.shape[0])

    @property
    def edges(self) -> list[np.ndarray]:
        return [self._edges[j, : self._n_edges[j]].copy() for j in range(self.n_features)]

    @property
    def padded_edges(self) -> np.ndarray:
        """Edges as ``[F, E]`` padded with +inf (read-only view)."""
        v = self._edges.view()
        v.flags.writeable = False
        return v

    @property
    def n_edges(self) -> np.ndarray:
        return self._n_edges.copy()

    @property
    def count(self) -> np.ndarray:
        """Finite values seen, per feature."""
        return self._count.copy()

    @property
    def nan_count(self) -> np.ndarray:
        """Non-finite values (NaN, +-Inf) seen, per feature."""
        return self._nan.copy()

    @property
    def total(self) -> np.ndarray:
        return self._count + self._nan

    @property
    def nan_rate(self) -> np.ndarray:
        t = self.total
        return np.where(t > 0, self._nan / np.where(t > 0, t, 1), 0.0)

    @property
    def mean(self) -> np.ndarray:
        return np.where(self._count > 0, self._mean, np.nan)

    @property
    def m2(self) -> np.ndarray:
        return self._m2.copy()

    @property
    def var(self) -> np.ndarray:
        """Population variance (``np.var``'s default, as the reference profile stores it)."""
        c = self._count
        return np.where(c > 0, np.maximum(self._m2, 0.0) / np.where(c > 0, c, 1), np.nan)

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    @property
    def min(self) -> np.ndarray:
        return np.where(self._count > 0, self._min, np.nan)

    @property
    def max(self) -> np.ndarray:
        return np.where(self._count > 0, self._max, np.nan)

    @property
    def hist(self) -> np.ndarray:
        """Histogram counts ``[F, E + 1]``; bins past a feature's own ``n_edges + 1`` are always 0."""
        return self._hist.copy()

    def histogram(self, feature: int) -> np.ndarray:
        return self._hist[feature, : self._n_edges[feature] + 1].copy()

    def quantile(self, q: float) -> np.ndarray:
        """Estimate of each feature's ``q``-quantile from the histogram (NaN where no finite value).

        Linear interpolation inside the bin holding rank ``q * count``; the outer bins are bounded by
        the exact min and max, so the estimate never leaves the observed range."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        out = np.full(self.n_features, np.nan)
        have = self._count > 0
        if not have.any():
            return out
        lo, hi = self._min[have, None], self._max[have, None]
        edges, hist = self._edges[have], self._hist[have]
        # Bin bounds clamped to the observed range (the outer bins end at min and max, padded +inf
        # edges become the max).
        lo_all = np.clip(np.concatenate([lo, edges], axis=1), lo, hi)
        hi_all = np.clip(np.concatenate([edges, hi], axis=1), lo, hi)
        cum = np.cumsum(hist, axis=1)
        rank = q * self._count[have]
        i = np.minimum((cum < rank[:, None]).sum(axis=1), hist.shape[1] - 1)
        rows = np.arange(i.size)
        prev = np.where(i > 0, cum[rows, np.maximum(i - 1, 0)], 0)
        in_bin = hist[rows, i]
        frac = np.where(in_bin > 0, (rank - prev) / np.where(in_bin > 0, in_bin, 1), 0.0)
        est = lo_all[rows, i] + np.clip(frac, 0.0, 1.0) * (hi_all[rows, i] - lo_all[rows, i])
        out[have] = np.clip(est, lo[:, 0], hi[:, 0])   # rounding must not step outside [min, max]
        return out

    # -- serialisation -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Compact, JSON-ready and lossless (floats as Python floats; empty features' min/max as None)."""
        have = self._count > 0
        return {
            "schema": STATS_SCHEMA,
            "edges": [e.tolist() for e in self.edges],
            "count": self._count.tolist(),
            "nan": self._nan.tolist(),
            "mean": self._mean.tolist(),
            "m2": self._m2.tolist(),
            "min": [float(v) if h else None for v, h in zip(self._min, have, strict=True)],
            "max": [float(v) if h else None for v, h in zip(self._max, have, strict=True)],
            "hist": [self.histogram(j).tolist() for j in range(self.n_features)],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureStats:
        if not isinstance(d, dict) or d.get("schema") != STATS_SCHEMA:
            got = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"feature stats: expected schema {STATS_SCHEMA!r}, got {got!r}")
        try:
            edges = d["edges"]
            f = len(edges)
            out = cls.zero(f, edges)
            count = np.asarray(d["count"], dtype=np.int64)
            nan = np.asarray(d["nan"], dtype=np.int64)
            mean = np.asarray(d["mean"], dtype=np.float64)
            m2 = np.asarray(d["m2"], dtype=np.float64)
            lo = np.array([np.inf if v is None else v for v in d["min"]], dtype=np.float64)
            hi = np.array([-np.inf if v is None else v for v in d["max"]], dtype=np.float64)
            hists = d["hist"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"feature stats: missing or malformed field ({e!r})") from e
        for name, arr in (("count", count), ("nan", nan), ("mean", mean), ("m2", m2), ("min", lo), ("max", hi)):
            if arr.shape != (f,):
                raise ValueError(f"feature stats: {name!r} must have {f} entries, got shape {list(arr.shape)}")
        if np.any(count < 0) or np.any(nan < 0):
            raise ValueError("feature stats: counts must be >= 0")
        if len(hists) != f:
            raise ValueError(f"feature stats: 'hist' must have {f} entries, got {len(hists)}")
        hist = np.zeros_like(out._hist)
        for j, raw in enumerate(hists):
            h = np.asarray(raw, dtype=np.int64)
            if h.shape != (int(out._n_edges[j]) + 1,) or np.any(h < 0):
                raise ValueError(f"feature stats: histogram of feature {j} must be {int(out._n_edges[j]) + 1} "
                                 f"counts >= 0, got {h.tolist()}")
            if int(h.sum()) != int(count[j]):
                raise ValueError(f"feature stats: histogram of feature {j} sums to {int(h.sum())}, "
                                 f"count says {int(count[j])}")
            hist[j, : h.size] = h
        return cls(out._edges, out._n_edges, count, nan, mean, m2, lo, hi, hist)

    def __repr__(self) -> str:
        return f"FeatureStats(features={self.n_features}, count={self._count.tolist()[:4]}...)"

"""Fixed-memory latency histogram (log-linear buckets, HdrHistogram's layout).

Values are integer nanoseconds. Each power of two is split into ``2**SUB_BITS`` equal buckets, so a
bucket is never wider than 1/128 of the values in it: a percentile read back is within 0.4% of the
true sample (the bucket's midpoint is reported, clamped to the exact min and max). Recording is a few
integer operations on a Python list, cheap enough for the hot path. Histograms merge by adding
counts, so per-pipeline or per-device partials combine exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SUB_BITS = 7
SUB = 1 << SUB_BITS
MAX_BITS = 43  # 2**43 ns is about 2.4 hours; larger values land in the last bucket (max stays exact)
N_BUCKETS = (MAX_BITS - SUB_BITS + 1) * SUB
_MAX_VALUE = (1 << MAX_BITS) - 1

QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p99.9": 0.999}


def bucket_index(v: int) -> int:
    """Bucket of a non-negative integer value (values below 2*SUB have a bucket each)."""
    if v < SUB:
        return v if v > 0 else 0
    v = min(v, _MAX_VALUE)
    shift = v.bit_length() - SUB_BITS - 1
    return (shift + 1) * SUB + (v >> shift) - SUB


def bucket_bounds(i: int) -> tuple[int, int]:
    """Inclusive lower bound and width of bucket ``i``."""
    if i < 2 * SUB:
        return i, 1
    shift = i // SUB - 1
    return (SUB + i % SUB) << shift, 1 << shift


class LatencyHistogram:
    """Counts of nanosecond latencies in fixed memory; ``record`` is the hot-path call."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * N_BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, ns: int) -> None:
        ns = max(ns, 0)
        if ns < SUB:
            i = ns
        else:
            v = ns if ns <= _MAX_VALUE else _MAX_VALUE
            shift = v.bit_length() - SUB_BITS - 1
            i = (shift + 1) * SUB + (v >> shift) - SUB
        self.counts[i] += 1
        if self.count == 0:
            self.min = self.max = ns
        elif ns > self.max:
            self.max = ns
        elif ns < self.min:
            self.min = ns
        self.count += 1
        self.total += ns

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add ``other`` into ``self`` (in place) and return ``self``."""
        if other.count == 0:
            return self
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        if self.count == 0:
            self.min, self.max = other.min, other.max
        else:
            self.min = min(self.min, other.min)
            self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total
        return self

    def snapshot(self) -> LatencyHistogram:
        """A copy that is consistent (``count`` equals the sum of the buckets) even while another thread
        records into this one: the counts are copied once and the count is taken from them."""
        out = LatencyHistogram()
        out.counts = list(self.counts)
        out.count = sum(out.counts)
        out.total, out.min, out.max = self.total, self.min, self.max
        return out

    def minus(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """A new histogram of what was recorded after ``earlier``, a copy of this one taken before
        (fixed buckets make this exact for counts and percentiles; min and max stay those of the
        whole run, clipped to the buckets still holding samples)."""
        out = LatencyHistogram()
        counts = [a - b for a, b in zip(self.counts, earlier.counts, strict=True)]
        if any(c < 0 for c in counts):
            raise ValueError("minus: the earlier histogram holds samples this one does not")
        out.counts = counts
        out.count = self.count - earlier.count
        out.total = self.total - earlier.total
        if out.count:
            nz = [i for i, c in enumerate(counts) if c]
            lo_first, _ = bucket_bounds(nz[0])
            lo_last, width_last = bucket_bounds(nz[-1])
            out.min = max(self.min, lo_first)
            out.max = min(self.max, lo_last + width_last - 1)
        return out

    def __iadd__(self, other: LatencyHistogram) -> LatencyHistogram:
        return self.merge(other)

    def quantile(self, q: float) -> float:
        """Value (ns) at quantile ``q`` in [0, 1]: the midpoint of the bucket holding that rank."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0:
            return float("nan")
        rank = max(1, int(np.ceil(q * self.count)))
        cum = np.cumsum(np.asarray(self.counts, dtype=np.int64))
        i = int(np.searchsorted(cum, rank))
        lo, width = bucket_bounds(i)
        mid = lo + (width - 1) / 2.0
        return float(min(max(mid, self.min), self.max))

    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")

    def summary_us(self) -> dict[str, float | int]:
        """Percentiles, mean and max in microseconds (rounded to 0.1 us), plus the count."""
        out: dict[str, float | int] = {"count": self.count}
        if self.count == 0:
            return out
        cum = np.cumsum(np.asarray(self.counts, dtype=np.int64))
        for key, q in QUANTILES.items():
            rank = max(1, int(np.ceil(q * self.count)))
            lo, width = bucket_bounds(int(np.searchsorted(cum, rank)))
            v = min(max(lo + (width - 1) / 2.0, self.min), self.max)
            out[key] = round(v / 1000.0, 1)
        out["mean"] = round(self.total / self.count / 1000.0, 1)
        out["min"] = round(self.min / 1000.0, 1)
        out["max"] = round(self.max / 1000.0, 1)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Sparse form: only non-empty buckets, so a mostly idle histogram is small on the wire."""
        nz = [[i, c] for i, c in enumerate(self.counts) if c]
        return {"v": 1, "sub_bits": SUB_BITS, "count": self.count, "total": self.total,
                "min": self.min, "max": self.max, "buckets": nz}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyHistogram:
        if d.get("v") != 1 or d.get("sub_bits") != SUB_BITS:
            raise ValueError(f"histogram layout v={d.get('v')} sub_bits={d.get('sub_bits')} "
                             f"is not v=1 sub_bits={SUB_BITS}")
        h = cls()
        for i, c in d["buckets"]:
            if not (0 <= i < N_BUCKETS) or c < 0:
                raise ValueError(f"bucket {i} with count {c} is out of range")
            h.counts[i] = int(c)
        h.count, h.total = int(d["count"]), int(d["total"])
        h.min, h.max = int(d["min"]), int(d["max"])
        if sum(h.counts) != h.count:
            raise ValueError(f"bucket counts add up to {sum(h.counts)}, header says {h.count}")
        return h

"""Which model variant to ship: the fastest one that keeps accuracy, never one slower than fp32.

Pure: the timings and accuracy figures are measured elsewhere (``edge_runtime.quantize``); this
module only compares them, so the rule can be tested on made-up tables.
"""

from __future__ import annotations

from dataclasses import dataclass

BASELINE = "fp32"


@dataclass(frozen=True)
class VariantResult:
    """What was measured for one variant. ``error`` set means it could not be built, loaded or run."""

    name: str
    median_us: float | None = None
    accuracy: float | None = None  # top-1 % on labelled eval data
    agreement: float | None = None  # top-1 % agreeing with fp32 (or % of samples allclose to fp32)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.median_us is not None and self.median_us > 0


@dataclass(frozen=True)
class Choice:
    name: str
    speedup: float  # fp32 median / chosen median; 1.0 when fp32 is kept
    accuracy_drop_pts: float  # 0.0 when fp32 is kept
    reason: str


def find_baseline(variants: list[VariantResult]) -> VariantResult:
    """The fp32 result; every comparison is against it, so it must have been measured."""
    for v in variants:
        if v.name == BASELINE:
            if not v.ok:
                raise ValueError(f"the {BASELINE} baseline has no timing: {v.error or 'not measured'}")
            return v
    raise ValueError(f"no '{BASELINE}' variant among {[v.name for v in variants]}")


def speedup(v: VariantResult, base: VariantResult) -> float | None:
    """fp32 median / variant median (above 1: faster than fp32)."""
    if not v.ok or base.median_us is None:
        return None
    return base.median_us / v.median_us  # type: ignore[operator]  # ok implies median_us > 0


def accuracy_drop(v: VariantResult, base: VariantResult) -> float | None:
    """Points lost against fp32: from labelled accuracy when both have it, else 100 - agreement.
    None when neither was measured, so such a variant cannot be shown to be accurate enough."""
    if v.name == base.name:
        return 0.0
    if v.accuracy is not None and base.accuracy is not None:
        return base.accuracy - v.accuracy
    if v.agreement is not None:
        return 100.0 - v.agreement
    return None


def choose_variant(variants: list[VariantResult], max_accuracy_drop_pts: float,
                   min_speedup: float) -> Choice:
    """The fastest variant within ``max_accuracy_drop_pts`` of fp32 and at least ``min_speedup`` times
    faster than it; fp32 otherwise. A ``min_speedup`` below 1 counts as 1: never one slower than fp32."""
    base = find_baseline(variants)
    need = max(min_speedup, 1.0)
    eligible: list[tuple[float, float, VariantResult]] = []
    rejected: list[str] = []
    for v in variants:
        if v.name == base.name:
            continue
        if not v.ok:
            rejected.append(f"{v.name} failed")
            continue
        s = speedup(v, base)
        d = accuracy_drop(v, base)
        assert s is not None
        if d is None:
            rejected.append(f"{v.name} accuracy unknown")
        elif d > max_accuracy_drop_pts + 1e-9:
            rejected.append(f"{v.name} {s:.2f}x but {_drop_text(d)}")
        elif s < need:
            rejected.append(f"{v.name} only {s:.2f}x")
        else:
            eligible.append((v.median_us, d, v))  # type: ignore[arg-type]  # ok implies a median
    if not eligible:
        why = f" ({'; '.join(rejected)})" if rejected else ""
        return Choice(BASELINE, 1.0, 0.0, f"kept {BASELINE}: no variant at least {need:.2f}x faster "
                                          f"within {max_accuracy_drop_pts:g} pts{why}")
    _, d, best = min(eligible, key=lambda e: (e[0], e[1]))
    s = speedup(best, base)
    assert s is not None
    return Choice(best.name, s, d, f"{best.name}: {s:.2f}x faster than {BASELINE}, {_drop_text(d)}")


def _drop_text(d: float) -> str:
    if abs(d) < 0.005:
        return "accuracy unchanged"
    return f"accuracy {-d:+.2f} pts"

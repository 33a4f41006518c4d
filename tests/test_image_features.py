"""Image-level features and frame-health checks on synthetic frames and the sample CNN's test frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_runtime.core import drift
from edge_runtime.core.image_features import (
    FEATURE_NAMES,
    HealthSettings,
    ImageHealth,
    frame_features,
    luma,
)


def box_blur(frames: np.ndarray, r: int = 2) -> np.ndarray:
    f = frames.astype(np.float32)
    pad = np.pad(f, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    k = 2 * r + 1
    acc = np.zeros_like(f)
    for dy in range(k):
        for dx in range(k):
            acc += pad[:, dy:dy + f.shape[1], dx:dx + f.shape[2]]
    return np.clip(acc / (k * k) + 0.5, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def frames(models_dir: Path) -> np.ndarray:
    return np.load(models_dir / "cnn.test_x.npy")


def test_features_of_simple_frames() -> None:
    gray = np.full((16, 16, 3), 100, np.uint8)
    blue = np.zeros((16, 16, 3), np.uint8)
    blue[..., 0] = 255
    check = np.indices((16, 16)).sum(axis=0) % 2 * 255
    checker = np.repeat(check[:, :, None], 3, axis=2).astype(np.uint8)
    f = frame_features(np.stack([gray, blue, checker]))
    assert f.shape == (3, len(FEATURE_NAMES)) and f.dtype == np.float64
    assert f[0].tolist() == pytest.approx([100.0, 0.0, 0.0, 0.0], abs=1e-4)
    assert f[1, 0] == pytest.approx(0.114 * 255, rel=1e-5)       # BGR order, BT.601 weights
    assert f[1, 3] == pytest.approx(1.0)                          # pure blue is fully saturated
    assert f[2, 1] == pytest.approx(127.5, rel=1e-4)
    assert f[2, 2] == pytest.approx((4 * 255) ** 2, rel=1e-4)    # Laplacian +-1020 on a checkerboard
    assert luma(gray).shape == (1, 16, 16)


def test_batch_equals_frame_by_frame_and_blur_drops_when_blurred(frames: np.ndarray) -> None:
    x = frames[:20]
    batch = frame_features(x)
    single = np.concatenate([frame_features(f) for f in x])
    np.testing.assert_allclose(batch, single, rtol=1e-6)
    blurred = frame_features(box_blur(x))
    assert np.all(blurred[:, 2] < 0.5 * batch[:, 2])
    np.testing.assert_allclose(blurred[:, 0], batch[:, 0], rtol=0.02)   # brightness barely moves
    with pytest.raises(ValueError, match=r"expected BGR frames \[H, W, 3\] or \[N, H, W, 3\], got shape \[4, 4\]"):
        frame_features(np.zeros((4, 4)))


def stream_with(frames: np.ndarray, start: int, stop: int, make: str) -> np.ndarray:
    out = frames.copy()
    if make == "uniform":
        out[start:stop] = 30                                         # a hand over the lens
    elif make == "frozen":
        out[start:stop] = frames[start]
    elif make == "blurry":
        out[start:stop] = box_blur(frames[start:stop])               # focus lost
    return out


@pytest.mark.parametrize("reason", ["uniform", "frozen", "blurry"])
def test_each_condition_gives_one_start_and_one_end_event(frames: np.ndarray, reason: str) -> None:
    x = stream_with(frames[:200], 60, 140, reason)
    health = ImageHealth(HealthSettings(blur_min=100.0))
    events = []
    for i in range(0, len(x), 16):
        events += health.update(x[i:i + 16], i)
    assert [(e.reason, e.action) for e in events] == [(reason, "start"), (reason, "end")], events
    start, end = events
    assert 60 <= start.index <= 62 if reason != "frozen" else start.index == 60
    assert 140 <= end.index <= 141
    assert health.active == {"uniform": False, "frozen": False, "blurry": False}
    assert health.state()["flagged_frames"][reason] >= 70


def test_normal_frames_raise_no_event(frames: np.ndarray) -> None:
    health = ImageHealth(HealthSettings(blur_min=100.0))
    assert health.update(frames) == []


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=8))
def test_events_do_not_depend_on_batch_boundaries(sizes: list[int]) -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 255, size=(120, 8, 8, 3), dtype=np.uint8)
    x[30:70] = 10
    x[90:110] = x[90]
    one = ImageHealth(HealthSettings(on_frames=2, off_frames=3, frozen_frames=5)).update(x)
    h = ImageHealth(HealthSettings(on_frames=2, off_frames=3, frozen_frames=5))
    got, i = [], 0
    for n in sizes * 20:
        if i >= len(x):
            break
        got += h.update(x[i:i + n], i)
        i += n
    got += h.update(x[i:], i) if i < len(x) else []
    assert got == one
    assert [(e.reason, e.action, e.index) for e in one] == [("uniform", "start", 30), ("uniform", "end", 70),
                                                             ("frozen", "start", 90), ("frozen", "end", 110)]


def test_dimmed_camera_raises_image_drift(frames: np.ndarray) -> None:
    """Image-level features feed the same drift monitor: a camera at 60% exposure is drift."""
    ref = drift.build_reference(frames[:300], None, calibration=drift.CalibrationSettings(window=50))
    assert ref["kind"] == "image" and ref["feature_names"] == list(FEATURE_NAMES)
    monitor = drift.DriftMonitor(drift.load_reference(ref))
    rng = np.random.default_rng(3)
    for _ in range(2):
        assert monitor.update(frames[300:][rng.permutation(150)]) == []
    dim = (frames[300:] * 0.6).astype(np.uint8)
    alarms = monitor.update(dim)
    assert [a.kind for a in alarms] == ["data"]
    assert alarms[0].start_index == 300
    assert 0 in alarms[0].features   # brightness

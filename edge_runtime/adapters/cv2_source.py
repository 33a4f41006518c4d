"""The one module that imports OpenCV (vision extra): video files and cameras as sources.

Frames come out as HxWx3 uint8 BGR arrays; the model's preprocessing spec does the rest.
"""

from __future__ import annotations

import logging
import time

import cv2
import numpy as np

from edge_runtime.errors import SourceError

log = logging.getLogger(__name__)


class EndOfVideo(Exception):
    pass


def resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area interpolation when shrinking (no aliasing), linear when enlarging."""
    shrink = h < img.shape[0] or w < img.shape[1]
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class VideoSource:
    preprocessed = False
    frames = True  # raw BGR frames: the agent runs its frame-health checks on them

    def __init__(self, path: str, loop: bool = False) -> None:
        from edge_runtime.sources import EndOfSource

        self._end = EndOfSource
        self.name = f"video:{path}"
        self.path, self.loop = path, loop
        self._cap = cv2.VideoCapture(path)
        if not self._cap.isOpened():
            raise SourceError(f"cannot open video {path} (missing file or unsupported codec)")

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if not ok:
            if not self.loop:
                raise self._end
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, frame = self._cap.read()
            if not ok:
                raise self._end
        return frame

    def close(self) -> None:
        self._cap.release()


class CameraSource:
    """A V4L2 camera (index or device path) or a stream URL. Read failures are retried; after
    ``max_failures`` in a row (camera unplugged) the source gives up with a SourceError."""

    preprocessed = False
    frames = True  # raw BGR frames: the agent runs its frame-health checks on them

    def __init__(self, device: int | str, max_failures: int = 50) -> None:
        self.name = f"camera:{device}"
        self.device = device
        self.max_failures = max_failures
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            raise SourceError(f"cannot open camera {device!r} (is it connected, and may this user read it?)")
        self._failures = 0

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        ok, frame = self._cap.read()
        if ok:
            self._failures = 0
            return frame
        self._failures += 1
        if self._failures >= self.max_failures:
            raise SourceError(f"camera {self.device!r}: {self._failures} reads in a row failed")
        time.sleep(min(0.05 * self._failures, 1.0) if timeout is None else min(timeout, 0.05))
        return None

    def close(self) -> None:
        self._cap.release()

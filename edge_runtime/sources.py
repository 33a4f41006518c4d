"""Input sources: ``synthetic``, ``npy:FILE`` (or .npz), ``csv:FILE``, ``stdin`` (JSON lines),
``video:FILE`` and ``camera:N`` (OpenCV, vision extra).

A source's ``read(timeout)`` returns one record, None when nothing arrived within ``timeout`` seconds
(live sources), raises :class:`EndOfSource` when it is exhausted and :class:`InputValidationError`
(reason ``decode``) for a record it could not parse, after which it can still be read.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_runtime.core.inputs import make_feeds
from edge_runtime.core.spec import ModelSpec
from edge_runtime.errors import InputValidationError, MissingExtraError, SourceError

Record = np.ndarray | dict[str, Any]


class EndOfSource(Exception):
    """The source has no more records."""


class Source(Protocol):
    """``preprocessed`` is True for sources whose records are model tensors already (synthetic):
    the model's preprocessing spec is not applied to them."""

    name: str
    preprocessed: bool

    def read(self, timeout: float | None = None) -> Record | None: ...

    def close(self) -> None: ...


SOURCE_HELP = ("synthetic[:HZ] | npy:FILE(.npy/.npz) | csv:FILE | stdin | video:FILE | camera:N")


class SyntheticSource:
    """Random inputs matching the model spec, cycled from a small pre-made pool so that reading costs
    next to nothing; ``synthetic:10`` paces them at 10 per second."""

    preprocessed = True

    def __init__(self, spec: ModelSpec, rate_hz: float | None = None, pool: int = 16,
                 overrides: dict[str, tuple[int, ...]] | None = None, dims: dict[str, int] | None = None,
                 seed: int = 0) -> None:
        self.name = "synthetic" if rate_hz is None else f"synthetic:{rate_hz:g}"
        feeds = make_feeds(spec, overrides, batch=pool if spec.batchable else 1, dims=dims, seed=seed)
        if spec.batchable:
            self._pool = [{k: np.ascontiguousarray(v[i]) for k, v in feeds.items()} for i in range(pool)]
        else:
            self._pool = [feeds]
        self._i = 0
        self._period = 1.0 / rate_hz if rate_hz else 0.0
        self._next = time.monotonic()

    def read(self, timeout: float | None = None) -> Record | None:
        if self._period:
            wait = self._next - time.monotonic()
            if wait > 0:
                if timeout is not None and wait > timeout:
                    time.sleep(timeout)
                    return None
                time.sleep(wait)
            self._next = max(self._next + self._period, time.monotonic() - self._period)
        rec = self._pool[self._i]
        self._i = (self._i + 1) % len(self._pool)
        return rec

    def close(self) -> None:
        pass


class ArraySource:
    """Rows of a .npy array (one input) or of each array in a .npz (named inputs). Files up to
    ``MMAP_ABOVE`` bytes are read into memory (a row is then a cheap view); larger ones are mapped."""

    MMAP_ABOVE = 256 * 1024 * 1024

    preprocessed = False

    def __init__(self, path: str, loop: bool = False) -> None:
        self.name = f"npy:{path}"
        self.loop = loop
        try:
            big = Path(path).stat().st_size > self.MMAP_ABOVE
            obj = np.load(path, mmap_mode="r" if big else None, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise SourceError(f"cannot read {path}: {e}") from e
        if isinstance(obj, np.lib.npyio.NpzFile):
            self._arrays: dict[str, np.ndarray] | None = {k: obj[k] for k in obj.files}
            lengths = {len(a) for a in self._arrays.values()}
            if len(lengths) != 1:
                raise SourceError(f"{path}: arrays have different row counts {sorted(lengths)}")
            self._n = lengths.pop()
            self._array = None
        else:
            if obj.ndim == 0:
                raise SourceError(f"{path}: a scalar array has no rows")
            self._arrays, self._array, self._n = None, obj, len(obj)
        self._i = 0

    def read(self, timeout: float | None = None) -> Record | None:
        if self._i >= self._n:
            if not self.loop or self._n == 0:
                raise EndOfSource
            self._i = 0
        i = self._i
        self._i += 1
        if self._array is not None:
            return self._array[i]
        assert self._arrays is not None
        return {k: a[i] for k, a in self._arrays.items()}

    def close(self) -> None:
        pass


class CsvSource:
    """Numeric CSV rows -> float64 vectors; a first row that is not numeric is taken as a header."""

    preprocessed = False

    def __init__(self, path: str, loop: bool = False) -> None:
        self.name = f"csv:{path}"
        self.path, self.loop = path, loop
        try:
            self._f = Path(path).open(newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise SourceError(f"cannot open {path}: {e.strerror or e}") from e
        self._reader = csv.reader(self._f)
        self._line = 0
        self._header_checked = False

    def read(self, timeout: float | None = None) -> Record | None:
        while True:
            try:
                row = next(self._reader)
            except StopIteration:
                if not self.loop or self._line == 0:
                    raise EndOfSource from None
                self._f.seek(0)
                self._reader, self._line, self._header_checked = csv.reader(self._f), 0, False
                continue
            self._line += 1
            if not row or all(not c.strip() for c in row):
                continue
            try:
                return np.array([float(c) if c.strip() else np.nan for c in row], dtype=np.float64)
            except ValueError:
                if not self._header_checked and self._line == 1:
                    self._header_checked = True
                    continue
                bad = next(c for c in row if not _is_float(c))
                raise InputValidationError("decode", self.name, "numeric CSV cells",
                                           f"{bad!r} on line {self._line}") from None
            finally:
                self._header_checked = True

    def close(self) -> None:
        self._f.close()


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return bool(not s.strip())
    return True


class StdinSource:
    """JSON lines on a file descriptor (stdin by default): ``[...]`` for a single-input model or
    ``{"input_name": [...], ...}``, optionally with ``"id": "..."`` (the input's id, which its
    prediction then carries). A line ``{"feedback": [[id, label], ...]}`` (or one
    ``{"feedback": {"id": ..., "label": ...}}``) is delayed label feedback, handed to ``on_feedback``
    rather than to the model. Waits with select(), so an idle agent uses no CPU."""

    MAX_LINE = 16 * 1024 * 1024

    preprocessed = False

    def __init__(self, fd: int | None = None) -> None:
        self.name = "stdin"
        self._fd = sys.stdin.fileno() if fd is None else fd
        self._buf = bytearray()
        self._eof = False
        self._line = 0
        self.on_feedback: Callable[[list[tuple[Any, Any]]], None] | None = None

    def read(self, timeout: float | None = None) -> Record | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0 or (self._eof and self._buf):
                end = nl if nl >= 0 else len(self._buf)
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                self._line += 1
                if not line.strip():
                    continue
                rec = self._decode(line)
                if rec is None:
                    continue
                return rec
            if self._eof:
                raise EndOfSource
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._fd], [], [], wait)
            if not ready:
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self._eof = True
            self._buf += chunk
            if len(self._buf) > self.MAX_LINE and b"\n" not in self._buf:
                self._buf.clear()
                self._line += 1
                raise InputValidationError("decode", "stdin", f"a JSON line under {self.MAX_LINE} bytes",
                                           "a longer line (dropped)")

    def _decode(self, line: bytes) -> Record | None:
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise InputValidationError("decode", "stdin", "one JSON value per line",
                                       f"invalid JSON on line {self._line}: {e.msg}") from None
        if isinstance(obj, list):
            try:
                return np.asarray(obj)
            except ValueError:
                raise InputValidationError("decode", "stdin", "a rectangular array",
                                           f"a ragged list on line {self._line}") from None
        if isinstance(obj, dict):
            if "feedback" in obj and self.on_feedback is not None:
                self.on_feedback(self._feedback(obj["feedback"]))
                return None
            return {str(k): v if k == "id" and isinstance(v, str) else np.asarray(v) for k, v in obj.items()}
        raise InputValidationError("decode", "stdin", "a JSON array or object",
                                   f"{type(obj).__name__} on line {self._line}")

    def _feedback(self, fb: Any) -> list[tuple[Any, Any]]:
        items = [fb] if isinstance(fb, dict) else fb
        out = []
        if isinstance(items, list):
            for it in items:
                if isinstance(it, dict) and "id" in it and "label" in it:
                    out.append((it["id"], it["label"]))
                elif isinstance(it, list) and len(it) == 2:
                    out.append((it[0], it[1]))
                else:
                    break
            else:
                return out
        raise InputValidationError("feedback", "stdin", '{"feedback": [[id, label], ...]} or '
                                   '{"feedback": {"id": ..., "label": ...}}', f"{str(fb)[:80]} on line {self._line}")

    def close(self) -> None:
        pass


def open_source(spec_str: str, model: ModelSpec, *, loop: bool = False,
                overrides: dict[str, tuple[int, ...]] | None = None, dims: dict[str, int] | None = None
                ) -> Source:
    kind, _, arg = spec_str.partition(":")
    if kind == "synthetic":
        rate = None
        if arg:
            try:
                rate = float(arg.removesuffix("hz").removesuffix("Hz"))
            except ValueError:
                raise SourceError(f"synthetic rate must be inputs per second, got {arg!r}") from None
            if rate <= 0:
                raise SourceError(f"synthetic rate must be positive, got {arg!r}")
        return SyntheticSource(model, rate_hz=rate, overrides=overrides, dims=dims)
    if kind in ("npy", "npz"):
        return ArraySource(_need_arg(kind, arg), loop=loop)
    if kind == "csv":
        return CsvSource(_need_arg(kind, arg), loop=loop)
    if kind == "stdin":
        return StdinSource()
    if kind in ("video", "camera"):
        try:
            from edge_runtime.adapters import cv2_source
        except ImportError as e:
            raise MissingExtraError(f"the {kind} source", "vision", "opencv-python-headless") from e
        if kind == "video":
            return cv2_source.VideoSource(_need_arg(kind, arg), loop=loop)
        index = arg or "0"
        if not index.isdigit():
            return cv2_source.CameraSource(index)  # a device path such as /dev/video2 or a stream URL
        return cv2_source.CameraSource(int(index))
    raise SourceError(f"unknown source {spec_str!r}; expected {SOURCE_HELP}")


def _need_arg(kind: str, arg: str) -> str:
    if not arg:
        raise SourceError(f"the {kind} source needs a file: {kind}:PATH")
    return arg


def close_quietly(src: Source) -> None:
    with contextlib.suppress(Exception):
        src.close()

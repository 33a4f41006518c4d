"""Chunk planning and download progress for bundle delivery, with no I/O.

A file of ``size`` bytes is cut into ``ceil(size / chunk_size)`` chunks; chunk ``i`` starts at
``i * chunk_size`` and the last one holds the remainder. :class:`ChunkProgress` records which chunks
are on disk *and verified*, as a bitmap (one bit per chunk: 3072 chunks persist in 768 bytes), so that
an interrupted download resumes with exactly the chunks it still lacks. The adapter that writes the
file owns the disk and decides when to persist this state (``to_dict``/``from_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

from edge_runtime.core.protocol import (
    DEFAULT_CHUNK_BYTES,
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_CHUNKS,
    MAX_CHUNK_BYTES,
    MIN_CHUNK_BYTES,
)

__all__ = ["Chunk", "ChunkProgress", "choose_chunk_size", "chunk_count", "plan_chunks"]


class Chunk(NamedTuple):
    index: int
    offset: int
    length: int


def _check_sizes(size: int, chunk_size: int) -> None:
    if type(size) is not int or size < 0:
        raise ValueError(f"size must be an int >= 0, got {size!r}")
    if type(chunk_size) is not int or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")


def chunk_count(size: int, chunk_size: int) -> int:
    """``ceil(size / chunk_size)``: 0 for an empty file."""
    _check_sizes(size, chunk_size)
    return -(-size // chunk_size)


def plan_chunks(size: int, chunk_size: int) -> tuple[Chunk, ...]:
    """Every chunk of a ``size``-byte file, in order: ``(index, offset, length)``."""
    n = chunk_count(size, chunk_size)
    return tuple(Chunk(i, i * chunk_size, min(chunk_size, size - i * chunk_size)) for i in range(n))


def choose_chunk_size(size: int, preferred: int = DEFAULT_CHUNK_BYTES) -> int:
    """``preferred``, doubled as often as needed for the file to fit :data:`MAX_BUNDLE_CHUNKS` chunks
    (the manifest lists one digest per chunk and must fit one message)."""
    _check_sizes(size, preferred)
    if size > MAX_BUNDLE_BYTES:
        raise ValueError(f"the file is {size} bytes, bundles are at most {MAX_BUNDLE_BYTES}")
    if not MIN_CHUNK_BYTES <= preferred <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size is {preferred}, expected {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    chunk_size = preferred
    while chunk_count(size, chunk_size) > MAX_BUNDLE_CHUNKS:
        chunk_size *= 2
    # Doubling can overshoot the cap only when preferred is not a power of two; the cap always fits.
    return min(chunk_size, MAX_CHUNK_BYTES)


class ChunkProgress:
    """Which of ``count`` chunks are stored and verified: a bitmap with a running count.

    ``add`` and ``discard`` say whether they changed anything, so a duplicate chunk is recognised
    without a second lookup. Not thread-safe: its owner (the download adapter) holds the lock.
    """

    __slots__ = ("_bits", "_done", "count")

    def __init__(self, count: int) -> None:
        if type(count) is not int or count < 0:
            raise ValueError(f"count must be an int >= 0, got {count!r}")
        self.count = count
        self._bits = bytearray((count + 7) // 8)
        self._done = 0

    def _check(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self.count:
            raise IndexError(f"chunk index {index!r} is outside 0..{self.count - 1}")

    def has(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> bool:
        """Mark chunk ``index`` stored; False when it already was."""
        if self.has(index):
            return False
        self._bits[index >> 3] |= 1 << (index & 7)
        self._done += 1
        return True

    def discard(self, index: int) -> bool:
        """Mark chunk ``index`` missing again (found corrupt on disk); False when it already was."""
        if not self.has(index):
            return False
        self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        self._done -= 1
        return True

    @property
    def done(self) -> int:
        return self._done

    @property
    def complete(self) -> bool:
        return self._done == self.count

    def missing(self) -> list[int]:
        """Indices still to fetch, in order."""
        return list(self.iter_missing())

    def iter_missing(self) -> Iterator[int]:
        bits = self._bits
        for byte_i, byte in enumerate(bits):
            if byte == 0xFF:
                continue
            base = byte_i << 3
            for bit in range(8):
                i = base + bit
                if i >= self.count:
                    return
                if not byte & (1 << bit):
                    yield i

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "bits": self._bits.hex()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChunkProgress:
        """The inverse of :meth:`to_dict`; ValueError on anything that is not exactly that shape."""
        try:
            count, bits = d["count"], d["bits"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"progress must be an object with count and bits, got {d!r:.80}") from e
        if type(count) is not int or count < 0 or type(bits) is not str:
            raise ValueError(f"progress count/bits have the wrong types: {count!r:.20} / {type(bits).__name__}")
        raw = bytearray.fromhex(bits)
        if len(raw) != (count + 7) // 8:
            raise ValueError(f"progress bitmap is {len(raw)} bytes, {count} chunks need {(count + 7) // 8}")
        if count % 8 and raw and raw[-1] >> (count % 8):
            raise ValueError("progress bitmap marks chunks past the last one")
        p = cls(count)
        p._bits = raw
        p._done = sum(b.bit_count() for b in raw)
        return p

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ChunkProgress) and (self.count, self._bits) == (other.count, other._bits)

    __hash__ = None  # type: ignore[assignment] - mutable

    def __repr__(self) -> str:
        return f"ChunkProgress({self._done}/{self.count})"

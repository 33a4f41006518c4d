"""Reconnect backoff: exponential with full jitter, so a fleet that lost its broker at the same moment
does not reconnect at the same moment. Pure: the caller sleeps and supplies the random source."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Delays grow ``min_s * factor**n`` up to ``max_s``; each delay is drawn uniformly from
    ``[(1 - jitter) * d, d]``. ``reset()`` after a connection that held."""

    min_s: float = 1.0
    max_s: float = 60.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.min_s <= self.max_s) or self.factor < 1 or not (0 <= self.jitter <= 1):
            raise ValueError(f"bad backoff settings: min {self.min_s}, max {self.max_s}, factor {self.factor}, "
                             f"jitter {self.jitter}")

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.min_s * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        return self.rng.uniform((1.0 - self.jitter) * ceiling, ceiling)

    def reset(self) -> None:
        self.attempts = 0

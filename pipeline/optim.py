"""Learning-rate schedules shared by the local (worker) and server optimizers.

A schedule maps a step count (server rounds on the parameter server) to a multiplier of the
base learning rate. Pure Python, no arrays: the parameter server calls it once per update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """Learning-rate multiplier as a function of the step count.

    ``kind``: ``constant``; ``step`` (times ``gamma`` every ``step_size`` steps); ``cosine``
    (from 1 down to ``min_factor`` over ``total_steps``). ``warmup`` steps of linear warm-up
    from ``1/warmup`` to 1 come first for every kind.
    """

    kind: str = "constant"
    warmup: int = 0
    step_size: int = 1000
    gamma: float = 0.5
    total_steps: int = 0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.kind!r}; use one of {', '.join(SCHEDULES)}")
        if self.warmup < 0 or self.step_size < 1 or not 0 < self.gamma <= 1:
            raise ValueError("schedule needs warmup >= 0, step_size >= 1 and 0 < gamma <= 1")

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate at ``step`` (0-based)."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        t = step - self.warmup
        if self.kind == "step":
            return self.gamma ** (t // self.step_size)
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup)
            frac = min(1.0, t / span)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))
        return 1.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "kind": self.kind,
            "warmup": self.warmup,
            "step_size": self.step_size,
            "gamma": self.gamma,
            "total_steps": self.total_steps,
            "min_factor": self.min_factor,
        }

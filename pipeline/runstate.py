"""The training driver's state as named types: the run, its best model, early stopping.

:class:`RunState` is what a checkpoint keeps of a run besides the parameter server's state
(pipeline.checkpoint writes and reads it); :class:`EarlyStopping` is the stopping rule, a pure
counter testable alone. The estimators' in-process loop can use the same two.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BestModel:
    """The weights of the best validation epoch so far (``epoch`` -1: none recorded yet)."""

    loss: float = math.inf
    params: np.ndarray | None = None
    epoch: int = -1


@dataclass
class RunState:
    """Where a run is: ``epoch`` is the one running (or next to run), ``done_tasks`` the
    training tasks of that epoch already finished, ``history`` the records of the epochs done.
    ``done_results`` holds what finished tasks of that epoch trained (name -> ``samples``, the
    rows of its ranges, ``trained``, those trained by its last attempt, and ``loss``), so that
    an epoch resumed after some of them still records all its rows and its loss."""

    job: str
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    done_tasks: set[str] = field(default_factory=set)
    done_results: dict[str, dict] = field(default_factory=dict)
    best: BestModel = field(default_factory=BestModel)
    n_threads: int = 0  # the thread count the epochs were planned for, kept for --resume (0: unknown)
    last_checkpoint: float = 0.0  # time.monotonic() of the last checkpoint (not saved)

    @property
    def samples(self) -> int:
        """Training samples seen in the recorded epochs."""
        return sum(int(h.get("samples", 0)) for h in self.history)

    def epoch_totals(self, ran: Collection[str]) -> tuple[int, int, float]:
        """The running epoch's rows so far (every finished task's, those finished before a resume
        within the epoch included: the server absorbed them), the rows the tasks ``ran`` trained
        in this attempt, and the loss over the rows each finished task trained in its last
        attempt, from ``done_results`` (a task an earlier version's checkpoint recorded without
        one is left out)."""
        done = [self.done_results[n] for n in sorted(self.done_tasks) if n in self.done_results]
        rows = sum(d["trained"] for d in done)
        loss = sum(d["loss"] * d["trained"] for d in done if d["trained"]) / max(rows, 1)
        return sum(d["samples"] for d in done), sum(self.done_results[n]["trained"] for n in ran), loss

    def finish_epoch(self) -> None:
        """The epoch recorded last in ``history`` is over: the next one starts with no task done."""
        self.epoch = self.history[-1]["epoch"] + 1 if self.history else self.epoch + 1
        self.done_tasks = set()
        self.done_results = {}


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a validation loss ``min_delta`` below the best,
    once ``min_samples`` training samples have been seen (``patience`` 0: never stop).

    ``epoch`` is the index of the next epoch :meth:`update` is told about; ``improved`` says
    whether the last one set a new best (the first epoch always does)."""

    patience: int
    min_delta: float = 0.0
    min_samples: int = 0
    best_loss: float = math.inf
    best_epoch: int = -1
    epoch: int = 0
    seen: int = 0
    improved: bool = False

    def update(self, val_loss: float, samples: int) -> bool:
        """Count one more epoch with ``val_loss`` over ``samples`` training samples; whether to stop."""
        epoch = self.epoch
        self.epoch += 1
        self.seen += int(samples)
        self.improved = val_loss < self.best_loss - self.min_delta or self.best_epoch < 0
        if self.improved:
            self.best_loss, self.best_epoch = float(val_loss), epoch
        return bool(self.patience) and epoch - self.best_epoch >= self.patience and self.seen >= self.min_samples

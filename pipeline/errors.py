"""Errors users see: every one carries a one-line message naming the problem and the fix."""

from __future__ import annotations

from dataclasses import dataclass


class PipelineError(Exception):
    """Base class of the errors the ``pipeline`` command reports as one line (exit status 1)."""


class StoreError(PipelineError):
    """A dataset store is missing, malformed, corrupted or would be clobbered."""


class IngestError(PipelineError):
    """A source file cannot be ingested (format, content, options)."""


class ConfigError(PipelineError):
    """A training configuration key, type or value is wrong."""


class CheckpointError(PipelineError):
    """A checkpoint or model file is missing, corrupted or of an unsupported format."""


class TrainingError(PipelineError):
    """Training cannot go on (divergence, no workers, parameter-server refusal)."""


class JobFailedError(TrainingError):
    """The parameter server failed the job (divergence, a bad update): every participant's
    request gets its message; the driver reports it, so a training task ends with it quietly."""


class PSError(ValueError):
    """A request the parameter server refuses (unknown job, wrong length or dtype, ...)."""


class ShardLostError(PSError):
    """A parameter-server shard is unreachable (its worker died): the driver restores the
    shards from the last checkpoint and trains the rounds since it again."""


@dataclass(frozen=True)
class TaskFailure:
    """A task's deterministic failure, returned as its value rather than raised: the data is
    what it is (a corrupted or missing chunk, a store that changed), so Dask must not retry
    the task (re-reading a corrupted chunk twice more) nor log the worker's traceback; the
    driver raises ``error`` as the one-line error. Other exceptions (a lost worker, a bug) are
    raised and retried as before."""

    error: PipelineError


def as_task_failure(exc: PipelineError) -> TaskFailure:
    """``exc`` without its traceback and cause (they stay on the worker)."""
    try:
        clean = type(exc)(*exc.args)
    except Exception:  # noqa: BLE001 - an unusual constructor: its message is what matters
        clean = PipelineError(str(exc))
    return TaskFailure(clean)

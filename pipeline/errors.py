"""Errors users see: every one carries a one-line message naming the problem and the fix."""

from __future__ import annotations


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


class PSError(ValueError):
    """A request the parameter server refuses (unknown job, wrong length or dtype, ...)."""


class ShardLostError(PSError):
    """A parameter-server shard is unreachable (its worker died): the driver restores the
    shards from the last checkpoint and trains the rounds since it again."""

"""A parameter server that lives inside the Dask scheduler.

One formulation covers every mode (FedOpt's): a participant (a training task on a worker)
pulls weights ``w_v``, runs ``local_steps`` minibatch steps with its local optimizer and pushes
``delta = w_v - w_local`` with the number of samples it saw. The server treats the delta as a
gradient for its own optimizer (server SGD with lr 1 on the sum of deltas adds every
participant's progress; with ``aggregate="mean"`` it is plain model averaging).

Modes
-----
``sync``
    Rounds (BSP). The server waits for one delta from every active participant, combines them
    weighted by samples in a fixed order (sorted participant names, so runs reproduce) and
    releases the next round. Participants the driver announced for an epoch are waited for
    until they join or their task ends.
``async``
    Each delta is applied as it arrives, optionally damped by its staleness.
``ssp``
    Stale-synchronous: async, but a participant more than ``staleness`` pushes ahead of the
    slowest active participant waits.

A participant that leaves (its task ended, erred or was cancelled, or its worker died) leaves
the round at once: no barrier ever waits for the dead. A message still in flight from it (a
cancelled task computes until its next push), or from a task of a job its driver closed, gets
the reply ``{"status": "left"}`` and changes nothing: the task ends there, and the scheduler
logs no error. A name that never joined is refused (:class:`PSError`).

The package, from the wire up (each module imports only those above it):

``wire``
    Vectors as zero-copy float32 frames, and deltas compressed as fp16, bf16, top-k or int8
    (with error feedback on the worker), checked from their header without unpickling.
``shm``
    Same-host transport: shared-memory segments the server creates for a sync round's delta
    (one per participant) and weights (one per job), attached by workers on its host, checked
    by a nonce (``ps_shared_memory``).
``job``
    :class:`Job`: one job's weights, server optimizer (:class:`pipeline.optim.ServerOptimizer`),
    participants and rounds; the rules of the three modes. Needs no scheduler.
``extension``
    :class:`ParameterServerExtension`: the scheduler routes ``ps_*``, one short handler each,
    and the plugin hooks that drop participants whose task or worker is gone.
``install``
    The plugin that installs the extension on a scheduler that was not preloaded, and
    :func:`dask_setup` so that ``dask scheduler --preload pipeline.ps`` installs it on a real
    cluster; both hand the extension to the dashboard (:mod:`pipeline.dashboard`) as the source
    of its read-only job snapshots (:mod:`pipeline.jobview`).
``client``
    :class:`ParameterServer`: the handle on one job, one method per route, usable from the
    driver and from inside tasks.
``shard``
    The sharded server (``ps_shards > 0``): the vector split by range over jobs (:class:`Job`) on
    workers started with ``--resources ps-shard=1``, the worker plugin that installs them, and
    :class:`pipeline.ps.shard.ShardedParameterServer`, the same methods as
    :class:`ParameterServer` sent to every shard in parallel. The scheduler then keeps only
    the shard map and forwards drops (see the module's docstring).
"""

from __future__ import annotations

from pipeline.errors import PSError
from pipeline.optim import SERVER_OPTIMIZERS, ServerOptimizer
from pipeline.ps.client import ParameterServer
from pipeline.ps.extension import EXTENSION_NAME, ROUTES, ParameterServerExtension
from pipeline.ps.install import InstallParameterServer, dask_setup, install, register_dashboard_page
from pipeline.ps.job import MODES, Job, Participant
from pipeline.ps.shard import SHARD_RESOURCE, InstallShard, ShardedParameterServer, ShardExtension
from pipeline.ps.wire import (
    CODECS,
    DeltaCompressor,
    check_job_id,
    compress,
    decode_delta,
    decode_opt_state,
    decode_vector,
    encode_opt_state,
    encode_vector,
)

__all__ = [
    "CODECS",
    "EXTENSION_NAME",
    "MODES",
    "ROUTES",
    "SERVER_OPTIMIZERS",
    "DeltaCompressor",
    "SHARD_RESOURCE",
    "InstallParameterServer",
    "InstallShard",
    "Job",
    "PSError",
    "ParameterServer",
    "ParameterServerExtension",
    "Participant",
    "ServerOptimizer",
    "ShardExtension",
    "ShardedParameterServer",
    "check_job_id",
    "compress",
    "dask_setup",
    "decode_delta",
    "decode_opt_state",
    "decode_vector",
    "encode_opt_state",
    "encode_vector",
    "install",
    "register_dashboard_page",
]

register_dashboard_page()

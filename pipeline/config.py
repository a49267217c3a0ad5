"""The training configuration: one typed dataclass, a comment on every default.

Read from TOML (flat keys, or grouped in one level of tables whose names only group keys: a
key set twice, or ``[server] lr`` that would read as the local ``lr``, is refused), overridden with
``key=value`` strings; an unknown key, a wrong type or a bad value is a :class:`ConfigError`
naming the key. The resolved configuration is printed at start and saved with the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pipeline.allocator import MAX_MMAP_THRESHOLD_MB
from pipeline.errors import ConfigError

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "step")
LOSSES = ("auto", "softmax_ce", "bce_logits", "mse")
LOCAL_OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw")
SERVER_OPTIMIZERS = ("sgd", "momentum", "adam", "fedadam", "adagrad", "yogi")
MODES = ("sync", "async", "ssp")
SCHEDULES = ("constant", "step", "cosine")
BACKENDS = ("auto", "cpu", "numpy", "cuda")
COMPRESSIONS = ("none", "fp16", "bf16", "topk", "int8")  # pipeline.ps.wire.CODECS
PARTITIONS = ("iid", "dirichlet", "classes", "column")
DP_MODES = ("off", "central", "local")  # pipeline.privacy.DP_MODES
STRATEGIES = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
# The removed key `placement`: "dynamic" (what every run does) is still read, so that the
# configurations saved with earlier runs resume; "federated" is refused with this hint.
PLACEMENT_HINT = (
    "placement = 'federated' was replaced by sites (a sites file) or clients (simulated clients); see docs/federated.md"
)
MAX_WIDTH = 1 << 16
MAX_PARAMS = 1 << 28
MAX_SEED = (1 << 32) - 1  # seeds NumPy's generators, which take no negative seed
MAX_PS_SHARDS = 64  # parameter-server shards (one worker each)
# the keys only a federated run (sites or simulated clients) acts on: refused elsewhere unless at
# their defaults (TrainConfig.check_federated_keys); server_tau also serves a plain run's fedadam,
# adagrad or yogi server optimizer
FEDERATED_KEYS = (
    "partition",
    "partition_alpha",
    "partition_classes",
    "partition_column",
    "rounds",
    "fraction_fit",
    "min_clients",
    "round_deadline",
    "min_responses",
    "local_epochs",
    "min_sites",
    "site_grace",
    "eval_every",
    "strategy",
    "proximal_mu",
    "aggregator",
    "trim_fraction",
    "krum_f",
    "buffer_size",
    "concurrency",
)
# a decimal number without a digit on one side of its point (`.001`, `1.`, `5.e-4`), which TOML refuses
_POINT_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass
class TrainConfig:
    """Everything that defines a training run (see the comment on each field)."""

    # --- model -----------------------------------------------------------------------------
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # hidden widths; [] = linear/logistic
    # identity | sigmoid | tanh | relu | leaky_relu | step (hidden layers). step is the perceptron's
    # threshold (1 if x > 0 else 0), trained by the straight-through gradient (kernels/reference.py)
    activation: str = "relu"
    loss: str = "auto"  # auto: softmax cross-entropy (classification) or MSE (regression)
    # --- local optimizer (runs on the workers) ---------------------------------------------
    optimizer: str = "adam"  # sgd | momentum | nesterov | rmsprop | adam | adamw
    lr: float = 1e-3  # local learning rate
    momentum: float = 0.9  # momentum / nesterov coefficient
    beta1: float = 0.9  # adam / adamw: decay of the gradient average
    beta2: float = 0.999  # adam / adamw: decay of the squared-gradient average
    rho: float = 0.99  # rmsprop: decay of the squared-gradient average (PyTorch's alpha, 0.99)
    weight_decay: float = 0.0  # L2 (adamw: decoupled) weight decay
    # rows per minibatch; 0 = full batch: each training task takes one step with the mean gradient
    # of all its rows (streamed, accumulated over 4096-row pieces); one task per worker thread
    # and epoch, so with `aggregate = "mean"` and the sgd server at lr 1 an epoch is one step of
    # full-batch gradient descent over every training row (`ema = 0` saves those weights)
    batch_size: int = 256
    local_steps: int = 8  # minibatches between pushes to the parameter server
    overlap: bool = False  # keep computing while a push is in flight; its reply is folded in later
    # overlap: local steps taken on the old weights before the reply is folded in (waiting for it
    # if it has not arrived): 1 hides a round behind one step; >= local_steps folds at the next push
    overlap_steps: int = 1
    # --- parameter server (runs in the scheduler) --------------------------------------------
    mode: str = "sync"  # sync (rounds, reproducible) | async | ssp (bounded staleness)
    staleness: int = 2  # ssp: how many pushes a participant may run ahead of the slowest
    damping: bool = False  # async/ssp: divide the server step by 1 + staleness
    # sgd (lr 1 = add every worker's progress) | momentum | adam | fedadam (adam without bias
    # correction, eps = server_tau) | adagrad | yogi (federated runs: set by `strategy`)
    server_optimizer: str = "sgd"
    server_lr: float = 1.0  # server learning rate applied to the combined delta
    server_momentum: float = 0.9  # server momentum optimizer's coefficient (not the local `momentum`)
    server_beta1: float = 0.9  # server adam: decay of the delta average (not the local `beta1`)
    server_beta2: float = 0.999  # server adam: decay of the squared-delta average
    aggregate: str = "sum"  # sync: sum (scaled mean) or mean (plain model averaging) of deltas
    schedule: str = "constant"  # server learning-rate schedule: constant | step | cosine
    warmup: int = 0  # server rounds of linear learning-rate warm-up
    step_size: int = 1000  # step schedule: rounds between decays
    gamma: float = 0.5  # step schedule: decay factor
    ema: float = 0.999  # average the weights over rounds (decay <= ema): the model validated and saved; 0 = off
    # deltas on the wire: none (float32) | fp16 | bf16 (half the bytes) | topk (the largest
    # topk_fraction of entries, ~8 bytes each) | int8 (a quarter, a float32 scale per 4096 entries).
    # Replies (weights) stay float32 unless compress_replies. With ps_shards each shard's slice is
    # encoded on its own. bench/README.md, "Compressed deltas", has the accuracy cost.
    compression: str = "none"
    topk_fraction: float = 0.1  # topk: share of a delta's entries sent per push (k = ceil(fraction x n))
    error_feedback: bool = True  # keep what compression dropped on the worker and add it to the next delta
    # sync: the server's replies carry the change of the weights in the same codec (fp16 | bf16 |
    # int8) instead of the float32 weights; the rounding of one reply goes out with the next
    compress_replies: bool = False
    # split the parameters by range over this many server shards on workers started with
    # `--resources ps-shard=1` (the scheduler then only coordinates); 0 = one server in the scheduler
    ps_shards: int = 0
    # sync rounds of workers on the scheduler's host move deltas and weights through shared
    # memory instead of TCP (same floats; docs/architecture.md); false = always TCP
    ps_shared_memory: bool = True
    # sync: the training tasks of one worker process (a worker with --nthreads N, e.g. one per
    # host) sum their deltas into one push per round (a sample-weighted mean: the same round up to
    # the order of float sums), so the server receives one message per process, not per task
    combine_pushes: bool = False
    # --- data and epochs ---------------------------------------------------------------------
    epochs: int = 100  # maximum number of passes over the training rows (early stopping ends sooner)
    patience: int = 5  # stop after this many epochs without validation improvement (0 = never)
    min_delta: float = 1e-4  # smallest validation-loss decrease that counts as improvement
    # Early stopping may end the run only after this many training samples: small stores
    # (1.5M samples = 100 epochs of 15k rows) train about as long as scikit-learn's MLP would,
    # large ones stop by patience alone. Without it, california_housing stopped at test R^2
    # 0.762 (scikit-learn 0.800) on a noisy validation plateau; with it, 0.801.
    min_samples: int = 1_500_000
    # fraction of the store's rows held out for validation: that share of every row chunk, one
    # row drawn by `seed` from each of as many equal strata (whatever order the rows are in)
    validation: float = 0.1
    validation_store: str = ""  # a separate validation store; overrides `validation`
    rows_per_task: int = 0  # rows a training task covers; 0 = about 4 tasks per worker thread
    # sync: training GFLOP per share per epoch below which fewer shares (workers) train; a small
    # store can learn in fewer epochs in one share than over several (bench/findings.md, e.g. 20);
    # 0 = one share per worker thread
    min_share_gflop: float = 0.0
    shuffle_chunks: int = 4  # row chunks mixed by the loader's shuffle buffer
    prefetch: int = 2  # chunks read ahead by the loader's background thread
    # a store whose rows take at most this many MiB (on a worker also at most a quarter of its
    # memory limit, and what leaves it below Dask's pause fraction with its other memory) has
    # them kept in memory after their first read, decoded and without the held-out rows: later
    # epochs do not read and decompress the store again (same batches); a larger store streams
    # from disk every epoch. 0 = always stream
    row_cache_mb: int = 1024
    normalize: bool = True  # standardize features with the store's mean/std
    # --- federated learning (docs/federated.md) ----------------------------------------------
    # A sites file (TOML: [sites.NAME] store = "path as that site's workers see it"); each site's
    # rows stay on the Dask workers started with `--resources NAME=1`. "" = not federated
    sites: str = ""
    clients: int = 0  # simulated clients: row-index views of the one store; 0 = off
    partition: str = "iid"  # simulated clients: iid | dirichlet | classes | column
    partition_alpha: float = 0.5  # dirichlet concentration over labels (smaller = more skewed)
    partition_classes: int = 2  # "classes": labels per client
    partition_column: str = ""  # "column": a feature column whose value names the client
    rounds: int = 50  # federated rounds (replace `epochs` in federated runs)
    fraction_fit: float = 1.0  # share of the available clients sampled per round
    min_clients: int = 1  # at least this many clients per round (and to start one)
    round_deadline: float = 600.0  # seconds after which a round closes with what has arrived
    min_responses: float = 0.5  # share of the sampled clients needed to apply a round at its deadline
    local_epochs: int = 1  # passes over its rows each sampled client makes per round
    min_sites: int = 1  # fewer live sites than this for no_worker_timeout stops the run
    # seconds the start waits for the other sites once max(min_sites, min_clients) have reported;
    # the run then starts without them and they join when they report (docs/federated.md)
    site_grace: float = 30.0
    eval_every: int = 1  # rounds between per-site evaluations
    strategy: str = "fedavg"  # fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad
    proximal_mu: float = 0.0  # FedProx proximal term (fedprox needs > 0)
    server_tau: float = 1e-3  # FedOpt adaptivity (fedadam / fedyogi / fedadagrad)
    aggregator: str = "mean"  # mean (weighted by samples) | median | trimmed_mean | krum
    trim_fraction: float = 0.1  # trimmed_mean: share cut at each end
    krum_f: int = 1  # krum: assumed Byzantine clients
    buffer_size: int = 0  # async federated (FedBuff): deltas per server step; 0 = clients per round
    concurrency: int = 0  # async federated: clients training at once; 0 = sampled clients per round
    # --- runtime ---------------------------------------------------------------------------
    backend: str = "cpu"  # kernels: cpu (Numba) | numpy | cuda | auto
    # `pipeline train` on a store of fewer rows trains in its own process with the same kernels
    # (one share, as a one-worker cluster would) unless --workers or --scheduler asks for a
    # cluster: starting a cluster costs more than it saves there (bench/findings.md,
    # "Where a step and a cold run go"). 0 = always a cluster.
    cluster_min_rows: int = 100_000
    # BLAS threads of that training in the command's own process: 1 keeps the run equal to a
    # one-worker cluster's, weight for weight, and safe on a machine that other work shares (a
    # multi-threaded GEMM waits for all its threads at every call: under load here a step took
    # 4-5x longer); 2 or more use that many cores of a machine of its own (the whole command on
    # 5 epochs of a 60k x 784 store 1.3-1.6x faster on 2 idle cores: bench/findings.md, "BLAS
    # threads in process"), with the rounding of a multi-threaded BLAS. The estimators' fits in
    # this process use it too. A cluster's workers take theirs from the nanny's environment
    # (cluster/README.md): a run on a cluster refuses any other value than 1
    # (:meth:`check_on_cluster`) rather than leave it without effect.
    blas_threads: int = 1
    checkpoint_seconds: float = 60.0  # checkpoint the server at most this often mid-epoch
    join_timeout: float = 120.0  # sync: seconds to wait for an announced participant to start
    barrier_timeout: float = 600.0  # seconds a push may wait at a barrier before failing
    no_worker_timeout: float = 300.0  # seconds to wait for capacity when every worker is gone
    seed: int = 0  # seeds initialization, shuffling and the validation split (0 to 2**32 - 1)
    # Workers whose environment fixed a glibc malloc tunable (a Dask nanny sets
    # MALLOC_TRIM_THRESHOLD_) lose glibc's dynamic mmap threshold: every array over 128 KiB is a
    # fresh mmap that page-faults in (2 MB vector ops 17x slower). Training tasks set it to this
    # many MiB once per worker process (glibc's own ceiling, 32), and the trim threshold to twice
    # that (pipeline/allocator.py); 0 = leave the allocator alone.
    mmap_threshold_mb: int = MAX_MMAP_THRESHOLD_MB
    # --- privacy (docs/privacy.md; sync mode) ----------------------------------------------
    # off | central (the parameter server clips each update on arrival and noises the round's
    # sum) | local (each site clips and noises its own update before it leaves)
    dp: str = "off"
    clip_norm: float = 1.0  # L2 clip of each update (the starting clip when clip_quantile > 0)
    clip_quantile: float = 0.0  # central: adaptive clipping to this quantile of update norms; 0 = fixed clip
    noise_multiplier: float = 0.0  # Gaussian noise std = noise_multiplier x clip_norm (on the round's sum)
    dp_delta: float = 1e-5  # the delta epsilon is reported at (well below 1 / participants)
    target_epsilon: float = 0.0  # stop before a round would take epsilon above this; 0 = no budget
    secure_aggregation: bool = False  # pairwise-masked updates: the server only ever sees their sum

    # ----------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` for the first key with a bad value."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                # nan compares false with everything: a nan min_delta made every epoch "no
                # improvement"; an infinite lr or weight_decay diverges at the first step
                raise ConfigError(f"config key '{f.name}' = {value!r} is invalid: must be a finite number")
        checks: list[tuple[str, bool, str]] = [
            ("activation", self.activation in ACTIVATIONS, f"one of {ACTIVATIONS}"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            ("optimizer", self.optimizer in LOCAL_OPTIMIZERS, f"one of {LOCAL_OPTIMIZERS}"),
            ("server_optimizer", self.server_optimizer in SERVER_OPTIMIZERS, f"one of {SERVER_OPTIMIZERS}"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            ("backend", self.backend in BACKENDS, f"one of {BACKENDS}"),
            ("aggregate", self.aggregate in ("sum", "mean"), "'sum' or 'mean'"),
            ("lr", self.lr > 0, "> 0"),
            ("server_lr", self.server_lr > 0, "> 0"),
            ("overlap_steps", self.overlap_steps >= 1, ">= 1 (local steps before a reply is folded in)"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("rho", 0 <= self.rho < 1, "in [0, 1) (PyTorch's default 0.99)"),
            ("server_momentum", 0 <= self.server_momentum < 1, "in [0, 1)"),
            ("server_beta1", 0 <= self.server_beta1 < 1, "in [0, 1)"),
            ("server_beta2", 0 <= self.server_beta2 < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("batch_size", 0 <= self.batch_size <= 1 << 20, "between 0 (full batch) and 1048576"),
            ("local_steps", 1 <= self.local_steps <= 1 << 20, ">= 1"),
            ("staleness", self.staleness >= 0, ">= 0"),
            ("epochs", 1 <= self.epochs <= 1 << 20, ">= 1"),
            ("patience", self.patience >= 0, ">= 0"),
            (
                "min_delta",
                self.min_delta >= 0,
                ">= 0 (a decrease of the validation loss smaller than this is no improvement)",
            ),
            ("min_samples", self.min_samples >= 0, ">= 0"),
            ("validation", 0 <= self.validation < 1, "in [0, 1)"),
            ("rows_per_task", self.rows_per_task >= 0, ">= 0"),
            ("min_share_gflop", self.min_share_gflop >= 0, ">= 0 (0 = one share per worker thread)"),
            ("shuffle_chunks", self.shuffle_chunks >= 1, ">= 1"),
            ("row_cache_mb", self.row_cache_mb >= 0, ">= 0 (0 = always stream from the store)"),
            ("prefetch", self.prefetch >= 1, ">= 1"),
            ("warmup", self.warmup >= 0, ">= 0"),
            ("step_size", self.step_size >= 1, ">= 1"),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("ema", 0 <= self.ema < 1, "in [0, 1) (0 = off, e.g. 0.999)"),
            ("compression", self.compression in COMPRESSIONS, f"one of {COMPRESSIONS}"),
            ("topk_fraction", 0 < self.topk_fraction <= 1, "in (0, 1] (e.g. 0.1: 10% of the entries per push)"),
            ("ps_shards", 0 <= self.ps_shards <= MAX_PS_SHARDS, f"between 0 (in the scheduler) and {MAX_PS_SHARDS}"),
            ("blas_threads", self.blas_threads >= 1, ">= 1 (1 = a worker's single thread)"),
            ("checkpoint_seconds", self.checkpoint_seconds > 0, "> 0"),
            ("join_timeout", self.join_timeout > 0, "> 0"),
            ("barrier_timeout", self.barrier_timeout > 0, "> 0"),
            ("no_worker_timeout", self.no_worker_timeout > 0, "> 0"),
            (
                "mmap_threshold_mb",
                0 <= self.mmap_threshold_mb <= MAX_MMAP_THRESHOLD_MB,
                f"between 0 (leave it alone) and {MAX_MMAP_THRESHOLD_MB}",
            ),
            ("hidden", all(1 <= h <= MAX_WIDTH for h in self.hidden), f"widths between 1 and {MAX_WIDTH}"),
            ("seed", 0 <= self.seed <= MAX_SEED, f"between 0 and {MAX_SEED}"),
            ("dp", self.dp in DP_MODES, f"one of {DP_MODES}"),
            ("clip_norm", self.clip_norm > 0, "> 0"),
            ("clip_quantile", 0 <= self.clip_quantile < 1, "in [0, 1) (0 = a fixed clip, e.g. 0.5 = the median norm)"),
            ("noise_multiplier", self.noise_multiplier >= 0, ">= 0"),
            ("dp_delta", 0 < self.dp_delta < 1, "in (0, 1), e.g. 1e-5"),
            ("target_epsilon", self.target_epsilon >= 0, ">= 0 (0 = no budget)"),
            ("clients", 0 <= self.clients <= 1 << 24, "between 0 (off) and 16777216"),
            ("partition", self.partition in PARTITIONS, f"one of {PARTITIONS}"),
            ("partition_alpha", self.partition_alpha > 0, "> 0 (smaller = more skewed)"),
            ("partition_classes", self.partition_classes >= 1, ">= 1"),
            ("rounds", 1 <= self.rounds <= 1 << 20, ">= 1"),
            ("fraction_fit", 0 < self.fraction_fit <= 1, "in (0, 1]"),
            ("min_clients", self.min_clients >= 1, ">= 1"),
            ("round_deadline", self.round_deadline > 0, "> 0 (seconds)"),
            ("min_responses", 0 < self.min_responses <= 1, "in (0, 1]"),
            ("local_epochs", 1 <= self.local_epochs <= 1 << 16, ">= 1"),
            ("min_sites", self.min_sites >= 1, ">= 1"),
            ("site_grace", self.site_grace >= 0, ">= 0 (seconds)"),
            ("eval_every", self.eval_every >= 1, ">= 1"),
            ("strategy", self.strategy in STRATEGIES, f"one of {STRATEGIES}"),
            ("proximal_mu", self.proximal_mu >= 0, ">= 0"),
            ("server_tau", self.server_tau > 0, "> 0"),
            ("aggregator", self.aggregator in AGGREGATORS, f"one of {AGGREGATORS}"),
            ("trim_fraction", 0 <= self.trim_fraction < 0.5, "in [0, 0.5)"),
            ("krum_f", self.krum_f >= 0, ">= 0"),
            ("buffer_size", self.buffer_size >= 0, ">= 0 (0 = the clients of a round)"),
            ("concurrency", self.concurrency >= 0, ">= 0 (0 = the clients sampled per round)"),
        ]
        for key, ok, want in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' = {getattr(self, key)!r} is invalid: must be {want}")
        # the weights between the hidden layers alone, whatever the data's features and outputs: refused
        # here, before any path (a store's run, an estimator's fit in this process) allocates them
        between = sum(a * b + b for a, b in zip(self.hidden[:-1], self.hidden[1:], strict=True))
        if between > MAX_PARAMS:
            raise ConfigError(
                f"config key 'hidden' = {self.hidden} is invalid: {between:,} parameters between the hidden layers "
                f"alone (limit {MAX_PARAMS:,}); use narrower layers"
            )
        self._validate_replies()
        self._validate_combining()
        self._validate_federation()
        self._validate_privacy()

    def _validate_replies(self) -> None:
        """Compressed replies: a dense codec, one set of weights shared by every participant."""
        if not self.compress_replies:
            return
        if self.compression not in ("fp16", "bf16", "int8"):
            why = (
                " (replies of top-k changes would leave most weights behind the server's)"
                if self.compression == "topk"
                else ""
            )
            raise ConfigError(
                f"config key 'compress_replies' needs compression = 'fp16', 'bf16' or 'int8', not "
                f"{self.compression!r}{why}; set compress_replies = false or one of those codecs"
            )
        if self.mode != "sync":
            raise ConfigError(
                f"config key 'compress_replies' needs mode = 'sync', not {self.mode!r} (a reply is the change of "
                "the weights every participant holds, which only sync rounds keep equal)"
            )
        if self.sites or self.clients:
            raise ConfigError(
                "config key 'compress_replies' does not apply to a federated run (its clients take the weights "
                "once per round); set compress_replies = false"
            )

    def _validate_combining(self) -> None:
        """Summed pushes: sync rounds whose combined delta is the weighted mean of float32 deltas."""
        if not self.combine_pushes:
            return
        clash = [
            (self.mode != "sync", f"mode = 'sync' (rounds), not {self.mode!r}"),
            (self.aggregator != "mean", f"aggregator = 'mean' (a sum of deltas), not {self.aggregator!r}"),
            (self.compression != "none", f"compression = 'none' (float32 deltas to sum), not {self.compression!r}"),
            (self.dp != "off", f"dp = 'off' (each update is clipped and noised on its own), not {self.dp!r}"),
            (self.secure_aggregation, "secure_aggregation = false (masked updates travel one by one)"),
            (self.overlap, "overlap = false (the tasks wait for each other's deltas before a push)"),
            (bool(self.sites or self.clients), "a run that is not federated (a site's client pushes once a round)"),
        ]
        for bad, need in clash:
            if bad:
                raise ConfigError(f"config key 'combine_pushes' needs {need}; set combine_pushes = false")

    def _validate_privacy(self) -> None:
        """The privacy keys that only make sense together."""
        key = "dp" if self.dp != "off" else "secure_aggregation"
        if (self.dp != "off" or self.secure_aggregation) and self.mode != "sync":
            raise ConfigError(
                f"config key '{key}' = {getattr(self, key)!r} needs mode = 'sync' (rounds of updates), "
                f"not {self.mode!r}"
            )
        if (self.dp != "off" or self.secure_aggregation) and self.aggregator != "mean":
            raise ConfigError(
                f"config key '{key}' = {getattr(self, key)!r} needs aggregator = 'mean' (the privacy and the "
                f"masked sum are those of a sum of clipped updates), not {self.aggregator!r}"
            )
        if self.target_epsilon > 0 and (self.dp == "off" or self.noise_multiplier == 0):
            raise ConfigError(
                f"config key 'target_epsilon' = {self.target_epsilon!r} needs dp = 'central' or 'local' and "
                "noise_multiplier > 0 (without noise epsilon is infinite)"
            )
        if self.secure_aggregation and (self.dp == "local" or self.clip_quantile > 0):
            key = "dp" if self.dp == "local" else "clip_quantile"
            raise ConfigError(
                f"config key '{key}' = {getattr(self, key)!r} does not combine with secure_aggregation: the "
                "masked sum needs updates inside a fixed clip (use dp = 'central' with a fixed clip_norm)"
            )
        if self.secure_aggregation and self.compression != "none":
            raise ConfigError(
                f"config key 'compression' = {self.compression!r} does not combine with secure_aggregation: "
                "masked updates are exact integers that a lossy codec would break; set compression = 'none'"
            )
        if (self.dp != "off" or self.secure_aggregation) and self.ps_shards:
            raise ConfigError(
                f"config key '{key}' = {getattr(self, key)!r} needs the parameter server in the scheduler "
                f"(clipping and masks cover the whole update, not a shard's range); set ps_shards = 0"
            )
        if self.secure_aggregation and self.clients:
            raise ConfigError(
                f"config key 'secure_aggregation' does not apply to simulated clients (clients = {self.clients}): "
                "they train one after another in a task, and the key exchange needs every client of a round "
                "at once; use real sites (--sites) or secure_aggregation = false"
            )
        if self.clip_quantile > 0 and self.dp != "central":
            raise ConfigError(
                f"config key 'clip_quantile' = {self.clip_quantile!r} needs dp = 'central' (adaptive clipping "
                "runs on the parameter server)"
            )

    def _validate_federation(self) -> None:
        """The federation keys that only make sense together."""
        if (self.sites or self.clients) and self.ps_shards:
            raise ConfigError(
                f"config key 'ps_shards' = {self.ps_shards} does not apply to a federated run (its rounds "
                "use the parameter server in the scheduler); set ps_shards = 0"
            )
        if self.sites and self.clients:
            raise ConfigError(
                f"config keys 'sites' = {self.sites!r} and 'clients' = {self.clients} are exclusive: a sites "
                "file federates real sites, clients simulates them on one store; set one of them"
            )
        if self.clients and self.partition == "column" and not self.partition_column:
            raise ConfigError(
                "config key 'partition' = 'column' needs partition_column: the feature column whose value "
                "names each client"
            )
        if self.strategy == "fedprox" and self.proximal_mu <= 0:
            raise ConfigError(
                "config key 'strategy' = 'fedprox' needs proximal_mu > 0 (e.g. 0.01); with 0 it is fedavg"
            )
        if self.aggregator == "krum" and self.min_clients < 2 * self.krum_f + 3:
            raise ConfigError(
                f"config key 'aggregator' = 'krum' with krum_f = {self.krum_f} needs min_clients >= "
                f"{2 * self.krum_f + 3} (2 f + 3 clients per round); raise min_clients or lower krum_f"
            )

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """A config from ``base`` (defaults when None) updated by ``values``, type-checked."""
        hints = _type_hints(cls)
        merged = dataclasses.asdict(base) if base is not None else {}
        for key, value in values.items():
            if key == "placement":
                # removed: "dynamic" is what every run does (configurations of earlier runs
                # still resume); federated training is the sites or clients keys now
                if value == "dynamic":
                    continue
                raise ConfigError(PLACEMENT_HINT)
            if key not in hints:
                raise ConfigError(f"unknown config key '{key}'; known keys: {', '.join(cls.keys())}")
            merged[key] = _coerce(key, value, hints[key])
        return cls(**merged)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(path)!r} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(path)!r} is not valid TOML: {exc}") from None
        return cls.from_dict(_flatten(data, os.fspath(path)), base)

    def with_overrides(self, assignments: list[str] | tuple[str, ...]) -> TrainConfig:
        """Apply ``key=value`` strings (TOML values, or bare strings)."""
        values: dict[str, Any] = {}
        for item in assignments:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            try:
                values[key] = tomllib.loads(f"v = {raw.strip()}")["v"]
            except tomllib.TOMLDecodeError:
                # TOML wants digits on both sides of a decimal point; for a number key `lr=.001` and
                # `lr=1.` are the numbers they spell, not the text '.001' it would refuse as text
                number = _type_hints(TrainConfig).get(key) in (float, int, "float", "int")
                values[key] = float(raw) if number and _POINT_NUMBER.fullmatch(raw.strip()) else raw.strip()
        return TrainConfig.from_dict(values, self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def server_privacy(self) -> dict[str, Any]:
        """The privacy keys set that only a cluster's parameter server can honour (it clips,
        noises, accounts or masks the rounds): ``{"dp": ...}`` and/or ``{"secure_aggregation":
        True}``; empty when none is. Training in this process refuses them."""
        asked: dict[str, Any] = {}
        if self.dp != "off":
            asked["dp"] = self.dp
        if self.secure_aggregation:
            asked["secure_aggregation"] = True
        return asked

    def check_on_cluster(self) -> None:
        """Refuse the keys that only training in this process honours, for a run on a Dask
        cluster: ``blas_threads`` other than 1 (a worker's BLAS threads come from its nanny's
        environment). A ConfigError names the fix."""
        if self.blas_threads != 1:
            raise ConfigError(
                f"blas_threads = {self.blas_threads} sets the BLAS threads of training in this process, and this "
                "run trains on a Dask cluster, whose workers take theirs from the nanny's environment: leave "
                'blas_threads at 1 and set distributed.nanny.pre-spawn-environ (cluster/README.md, "BLAS threads"), '
                "or train in this process (a store under cluster_min_rows rows, without --workers or --scheduler)"
            )

    def check_federated_keys(self) -> None:
        """Refuse the keys only a federated run acts on (``sites`` or ``clients``: rounds,
        sampling, strategy, robust aggregation, ...) set to other than their defaults in a run
        that is not federated, where they would be silently ignored. A ConfigError names them."""
        if self.sites or self.clients:
            return
        default = TrainConfig()
        unused = [k for k in FEDERATED_KEYS if getattr(self, k) != getattr(default, k)]
        if unused:
            shown = ", ".join(f"{k} = {getattr(self, k)!r}" for k in unused)
            raise ConfigError(
                f"{shown}: {'this key applies' if len(unused) == 1 else 'these keys apply'} only to federated runs "
                "(a sites file or clients = N), and this run is not federated: leave "
                f"{'it' if len(unused) == 1 else 'them'} unset, or train federated (docs/federated.md)"
            )

    def to_toml(self) -> str:
        lines = [TOML_HEADER]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def _flatten(data: dict[str, Any], path: str) -> dict[str, Any]:
    """The keys of a config file, top level and one level of tables (``[model]``,
    ``[optimizer]``, ...) whose names only group keys; a key set twice, a key in a table that
    would read as another key (``[server] lr`` is the local ``lr``, not ``server_lr``) and a
    table nested in a table are refused."""
    known = set(TrainConfig.keys())
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(key: str, value: Any, place: str) -> None:
        if key in flat:
            raise ConfigError(f"config file {path!r} sets '{key}' twice ({where[key]} and {place}); keep one")
        flat[key], where[key] = value, place

    for name, value in data.items():
        if not isinstance(value, dict):
            put(name, value, "top level")
            continue
        for key, inner in value.items():
            if isinstance(inner, dict):
                raise ConfigError(
                    f"config file {path!r}: table [{name}.{key}] is nested; tables only group keys, one "
                    f"level deep: put its keys in [{name}] or at the top level"
                )
            meant = f"{name}_{key}"
            if meant in known:
                raise ConfigError(
                    f"config file {path!r}: '{key}' in table [{name}] would set the local '{key}' (table "
                    f"names only group keys); write {meant} = {json.dumps(inner)} for the {name}'s setting, "
                    f"or move '{key}' out of [{name}]"
                )
            put(key, inner, f"[{name}]")
    return flat


# The first line of every config.toml a run writes (:meth:`TrainConfig.to_toml`, since the first
# version): what tells a run's config.toml from a user's
TOML_HEADER = "# resolved training configuration"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class, once per class (resolving them compiles every
    annotation string: ~2 ms for TrainConfig, paid by every estimator fit before). Read only."""
    return get_type_hints(cls)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints widen to floats, nothing else converts."""
    name = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    if hint is bool or name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif hint is int or name == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float or name == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str or name == "str":
        if isinstance(value, str):
            return value
    elif str(hint).startswith("list[int]"):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            parts = [p for p in value.replace(",", " ").split() if p]
            if all(p.lstrip("-").isdigit() for p in parts):
                value = [int(p) for p in parts]
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return list(value)
        name = "list of ints"
    raise ConfigError(f"config key '{key}' must be {name}, got {value!r} ({type(value).__name__})")

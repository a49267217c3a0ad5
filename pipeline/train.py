"""The training driver: epochs of tasks on the cluster, evaluation, checkpoints, the run directory.

The driver never touches rows. It plans row ranges of the store into tasks, submits them each
epoch (faster workers take more; sync mode runs one participant per worker thread so every
round has all of them), evaluates on the workers at each epoch end,
checkpoints the parameter server's state atomically, stops early, and writes the history and
the final model to the run directory::

    RUN_DIR/config.toml      resolved configuration
    RUN_DIR/checkpoint.npz   server state (weights, optimizer state, round, epoch, position)
                             and, sync, each share's local optimizer state
    RUN_DIR/model.npz        the trained model (best validation epoch), see pipeline.model
    RUN_DIR/history.json     per-epoch and per-round metrics
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.checkpoint import (
    Checkpoint,
    UnreadableFileError,
    kept_rounds,
    load_file,
    read_checkpoint,
    read_meta,
    write_checkpoint,
)
from pipeline.config import TOML_HEADER, TrainConfig
from pipeline.errors import (
    CheckpointError,
    ConfigError,
    PipelineError,
    ShardLostError,
    StoreError,
    TaskFailure,
    TrainingError,
)
from pipeline.metrics import array_metrics, finish_metrics, merge_metrics
from pipeline.model import Model
from pipeline.plan import (  # noqa: F401 - the planning helpers, also importable from here
    EpochPlan,
    Ranges,
    default_rows_per_task,
    epoch_work,
    group_ranges,
    held_out_count,
    n_sync_shares,
    plan_epochs,
    row_ranges,
    split_rows,
    train_flops_per_row,
)
from pipeline.privacy import resumed_privacy
from pipeline.progress import Progress
from pipeline.runstate import BestModel, EarlyStopping, RunState
from pipeline.store import (
    Store,
    for_workers,
    is_url,
    layout_mismatch,
    layout_of,
    open_store,
    outermost_store,
    store_marker,
)

if TYPE_CHECKING:  # imported where a cluster is used: training in process never loads distributed
    from pipeline.ps import ParameterServer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# The model and the tasks' configuration (planning the epochs: pipeline.plan)
# --------------------------------------------------------------------------------------------


def build_spec(store: Store, cfg: TrainConfig) -> tuple[dict, dict | None]:
    """The model spec for this store and config, and the regression target scaling (or None)."""
    if store.task == "classification":
        n_out = len(store.classes or [])
        if n_out < 2:
            raise StoreError(f"store {store.path!r} has fewer than 2 classes; nothing to learn")
        loss = "softmax_ce" if cfg.loss == "auto" else cfg.loss
        if loss == "mse":
            raise ConfigError("config key 'loss' = 'mse' does not fit a classification store")
        if loss == "bce_logits" and n_out != 2:
            raise ConfigError("config key 'loss' = 'bce_logits' needs a binary store")
        if loss == "bce_logits":
            raise ConfigError("config key 'loss' = 'bce_logits' is for multi-label targets; use softmax_ce")
        target = None
    else:
        n_out = 1 if store.y.ndim == 1 else int(store.y.shape[1])
        loss = "mse" if cfg.loss == "auto" else cfg.loss
        if loss != "mse":
            raise ConfigError(f"config key 'loss' = {loss!r} does not fit a regression store; use mse")
        mean = np.atleast_1d(np.asarray(store.y_mean, dtype=np.float64))
        std = np.atleast_1d(np.asarray(store.y_std, dtype=np.float64))
        target = {"mean": mean, "std": np.where(std > 0, std, 1.0)}
    widths = [store.n_features, *cfg.hidden, n_out]
    n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))
    from pipeline.config import MAX_PARAMS

    if n_params > MAX_PARAMS:
        raise ConfigError(
            f"config key 'hidden' = {cfg.hidden} gives {n_params:,} parameters (limit {MAX_PARAMS:,}); "
            "use narrower layers"
        )
    spec = {
        "n_in": store.n_features,
        "hidden": list(cfg.hidden),
        "n_out": n_out,
        "activation": cfg.activation,
        "loss": loss,
    }
    return spec, target


def store_stats(store: Store) -> dict[str, Any]:
    """What a model trained on ``store`` depends on besides its layout: the rows, the feature
    statistics it standardizes with, the classes and names (JSON-safe). A checkpoint records
    it, so a resume on other data (another store, or the store ingested again) is refused."""
    return json.loads(
        json.dumps(
            {
                "n_rows": store.n_rows,
                "feature_names": list(store.feature_names),
                "classes": None if store.classes is None else [str(c) for c in store.classes],
                "mean": np.asarray(store.mean, dtype=np.float64).tolist(),
                "std": np.asarray(store.std, dtype=np.float64).tolist(),
                "y_mean": np.asarray(store.y_mean, dtype=np.float64).tolist(),
                "y_std": np.asarray(store.y_std, dtype=np.float64).tolist(),
            }
        )
    )


# the model spec's keys set by the configuration (the others, n_in and n_out, by the store)
_SPEC_KEYS = ("hidden", "activation", "loss")


def resume_mismatch(meta: dict[str, Any], spec: dict, stats: dict[str, Any], path: Path, store: str) -> str | None:
    """Why the checkpoint at ``path`` (its ``meta`` record) cannot be resumed with the model
    ``spec`` and a store of ``stats`` (:func:`store_stats`) at ``store``; None when it can.
    Checkpoints of earlier versions, which did not record the store's statistics, are checked
    by their model spec only."""
    old, where, was = meta.get("spec"), repr(str(path)), meta.get("store")
    same = isinstance(was, str) and os.path.realpath(was) == os.path.realpath(store)  # URLs: compared as text
    trained_on = "the data it started with" if same or not was else f"the store it started with ({was!r})"
    fresh = f"or start a new run (another --out, or --force to replace {str(path.parent)!r})"
    if not isinstance(old, dict):
        return (
            None
            if old == spec
            else f"checkpoint {where} is for a different model or store; resume with the ones it started with, {fresh}"
        )
    for key in _SPEC_KEYS:
        if old.get(key) != spec.get(key):
            value = old.get(key)
            shown = value if isinstance(value, str) else json.dumps(value)  # as --set takes it
            return (
                f"checkpoint {where} was trained with {key} = {value!r}, not {spec.get(key)!r}; resume with "
                f"--set {key}={shown} (or without setting {key}), {fresh}"
            )
    problem = None
    if old.get("n_in") != spec.get("n_in"):
        problem = f"{old.get('n_in')} features, and {store!r} has {spec.get('n_in')}"
    elif old.get("n_out") != spec.get("n_out"):
        problem = f"{old.get('n_out')} outputs (classes or targets), and {store!r} has {spec.get('n_out')}"
    elif old != spec:
        return f"checkpoint {where} is for a different model; resume with the model config it started with, {fresh}"
    saved = meta.get("store_stats")
    if problem is None and isinstance(saved, dict):
        fields = (
            ("n_rows", "row count"),
            ("feature_names", "feature names"),
            ("classes", "classes"),
            ("mean", "feature means"),
            ("std", "feature standard deviations"),
            ("y_mean", "target mean"),
            ("y_std", "target standard deviation"),
        )
        differ = changed(saved, stats, fields)
        if differ:
            n = f" ({saved['n_rows']:,} rows, now {stats['n_rows']:,})" if "row count" in differ else ""
            problem = f"other data: the {differ} of {store!r} differ{n}; it was ingested again, or is another store"
    if problem is None:
        return None
    return f"checkpoint {where} was trained on {problem}; resume with {trained_on}, {fresh}"


def _set_value(v: Any) -> str:
    """A config value as ``--set KEY=VALUE`` takes it (text quoted for the shell, else JSON)."""
    import shlex

    return shlex.quote(v) if isinstance(v, str) else json.dumps(v)


def _validated_on(config: dict[str, Any]) -> str:
    """The validation rows a run's ``config`` (a config dict) names, as a resume refusal says them."""
    if config.get("validation_store"):
        return f"validation_store {config['validation_store']!r}"
    if not config.get("validation"):
        return "no held-out rows (validation = 0)"
    return f"validation = {config['validation']:g} (the rows seed = {config.get('seed', 0)} holds out)"


def holdout_mismatch(was: dict[str, Any], cfg: TrainConfig, path: Path) -> str | None:
    """Why the run whose checkpoint at ``path`` was saved with the config ``was`` cannot resume
    with ``cfg``'s validation rows; None when it can. Another validation store, or other rows
    of the store held out (``validation``, or the ``seed`` that draws them), would train on rows
    the run validated on (or validate on rows it trained on), and its best epoch so far was
    chosen on the old rows: its loss is not comparable with the new ones'."""
    now = cfg.to_dict()
    if any(k not in was for k in ("validation_store", "validation", "seed")):
        return None  # a config of an earlier version: not checked
    old_store, new_store = was["validation_store"], now["validation_store"]
    if old_store or new_store:
        same = bool(old_store and new_store) and os.path.realpath(old_store) == os.path.realpath(new_store)
        differ = [] if same else ["validation_store"]
    else:
        held = was["validation"] and now["validation"]  # the rows held out are drawn by the seed
        differ = [k for k in ("validation", *(("seed",) if held else ())) if was[k] != now[k]]
    if not differ:
        return None
    back = " ".join(f"--set {k}={_set_value(was[k])}" for k in differ)
    return (
        f"checkpoint {str(path)!r} was validated on {_validated_on(was)}, not {_validated_on(now)}: the resumed run "
        "would train on rows it validated on (or the other way round) and compare its best epoch's loss with "
        f"other rows'; resume with {back} (or without setting {' and '.join(differ)}), or start a new run "
        f"(another --out, or --force to replace {str(path.parent)!r})"
    )


# the settings that decide an epoch's tasks and the rows of each minibatch (with the thread count,
# which a resumed epoch keeps): a resume within an epoch skips the batches its tasks pushed
_EPOCH_PLAN_KEYS = ("mode", "batch_size", "rows_per_task", "shuffle_chunks", "seed", "min_share_gflop")


def epoch_plan_mismatch(meta: dict[str, Any], cfg: TrainConfig, path: Path) -> str | None:
    """Why the checkpoint at ``path`` (its ``meta`` record), taken partway through an epoch,
    cannot be resumed with ``cfg``; None when it can (or it was taken between epochs). Its
    finished tasks are known by name and its unfinished ones skip the minibatches they pushed:
    another mode (sync shares against async tasks), batch size, task size, shuffle or seed
    plans other tasks and batches, which would train some of the epoch's rows twice (and count
    them twice in its record) or never."""
    was = meta.get("config")
    if not isinstance(was, dict) or meta.get("federated"):
        return None
    epoch = meta.get("epoch")
    started = meta.get("done_tasks") or any(str(k).startswith(f"e{epoch}-") for k in meta.get("progress") or {})
    if not isinstance(epoch, int) or not started:
        return None
    now = cfg.to_dict()

    def plans(k: str, v: Any) -> Any:  # async and ssp epochs plan the same tasks
        return v == "sync" if k == "mode" else v

    differ = [k for k in _EPOCH_PLAN_KEYS if k in was and plans(k, was[k]) != plans(k, now[k])]
    if not differ:
        return None
    changes = " and ".join(f"{k} = {_set_value(was[k])} -> {_set_value(now[k])}" for k in differ)
    back = " ".join(f"--set {k}={_set_value(was[k])}" for k in differ)
    return (
        f"checkpoint {str(path)!r} was taken partway through epoch {epoch + 1}, planned with the settings it "
        f"started with ({changes}): resumed so, some of its rows would be trained twice or never; finish that "
        f"epoch first with `--resume --set epochs={epoch + 1}` (with {back}, or without setting "
        f"{' and '.join(differ)}), then resume with the new settings and --set epochs={was.get('epochs', 'N')}"
    )


def task_config(cfg: TrainConfig) -> dict[str, Any]:
    """The part of the config that training tasks need (plain, msgpack-friendly).

    ``holdout`` is set when validation rows are held out of the training store: training
    tasks then skip those rows and evaluation tasks read only them (pipeline.loader)."""
    keys = (
        "optimizer lr momentum beta1 beta2 rho weight_decay batch_size local_steps overlap overlap_steps backend seed "
        "shuffle_chunks prefetch row_cache_mb normalize barrier_timeout mmap_threshold_mb compression topk_fraction"
        " error_feedback ps_shards ps_shared_memory combine_pushes dp clip_norm noise_multiplier secure_aggregation"
    ).split()
    out: dict[str, Any] = {k: getattr(cfg, k) for k in keys}
    if cfg.validation > 0 and not cfg.validation_store:
        out["holdout"] = {"fraction": cfg.validation, "seed": cfg.seed}
    return out


def budget_spent_line(privacy: dict, target_epsilon: float) -> str:
    """The log line of a run stopped by its privacy budget (``privacy``: the job's accounting)."""
    return (
        f"privacy budget: stopping after {privacy['rounds']} rounds at epsilon = "
        f"{privacy['epsilon']:.4g} (delta = {privacy['delta']:g}); another round would exceed "
        f"target_epsilon = {target_epsilon:g}"
    )


def privacy_settings(
    cfg: TrainConfig, spent: dict | None = None, sampling_rate: float = 1.0, participants: int = 0
) -> dict | None:
    """The parameter server's privacy settings (:func:`pipeline.privacy.check_privacy`) of
    ``cfg``, going on from the privacy ``spent`` by a checkpointed run; None without privacy.
    ``sampling_rate``: the share of participants taking part in a round (every share of a
    sync epoch takes part in its rounds: 1); ``participants`` per round, when known, lets
    adaptive clipping be refused before training if that many cannot pay for its noisy count."""
    if cfg.dp == "off" and not cfg.secure_aggregation:
        return None
    if cfg.secure_aggregation and participants == 1:
        raise ConfigError(
            "config key 'secure_aggregation' = True needs at least 2 participants per round (this run has 1: "
            "alone, a participant's delta would go unmasked); use more workers or sites, or min_clients >= 2"
        )
    if cfg.clip_quantile > 0 and cfg.noise_multiplier > 0 and participants:
        from pipeline.errors import PSError
        from pipeline.privacy import split_noise

        try:
            split_noise(cfg.noise_multiplier, participants)
        except PSError as exc:
            raise ConfigError(f"config key 'clip_quantile' = {cfg.clip_quantile!r}: {exc}") from None
    spent = spent or {}
    out = {
        "dp": cfg.dp,
        "clip_norm": cfg.clip_norm,
        "clip_quantile": cfg.clip_quantile,
        "noise_multiplier": cfg.noise_multiplier,
        "delta": cfg.dp_delta,
        "target_epsilon": cfg.target_epsilon,
        "sampling_rate": sampling_rate,
        "secure_aggregation": cfg.secure_aggregation,
        "rounds": int(spent.get("rounds", 0)),
    }
    if spent.get("rates"):  # rounds accounted at their own rate (fewer candidates than all)
        out["rates"] = [[float(q), int(n)] for q, n in spent["rates"]]
    if cfg.clip_quantile > 0 and spent.get("clip"):
        out["clip"] = float(spent["clip"])
    if not out["rounds"]:
        check_budget_allows_a_round(cfg, sampling_rate)
    return out


def check_budget_allows_a_round(cfg: TrainConfig, sampling_rate: float = 1.0) -> None:
    """Refuse a run whose ``target_epsilon`` is spent by its first round: it would stop before
    applying any update and save its initial weights as the model."""
    if cfg.dp == "off" or cfg.target_epsilon <= 0 or cfg.noise_multiplier <= 0:
        return
    from pipeline.privacy import RdpAccountant, local_epsilon, noise_for_epsilon

    z, delta, target = cfg.noise_multiplier, cfg.dp_delta, cfg.target_epsilon
    local = cfg.dp == "local"  # not amplified by sampling; sensitivity 2 x clip
    first = local_epsilon(1, z, delta) if local else RdpAccountant(z, sampling_rate, delta).epsilon(rounds=1)
    if first <= target:
        return
    # the noise one round needs: searched only for the message
    if local:
        rate, need = "", 2 * noise_for_epsilon(target, 1, 1.0, delta)
    else:
        share = "every participant" if sampling_rate >= 1 else f"{sampling_rate:.3g} of the participants"
        rate, need = f" ({share} in each)", noise_for_epsilon(target, 1, sampling_rate, delta)
    raise ConfigError(
        f"config key 'target_epsilon' = {target:g} allows no round: one round at noise_multiplier = {z:g}{rate} "
        f"spends epsilon = {first:.3g} (delta = {delta:g}); raise noise_multiplier (above {need:.3g} for even one "
        "round, more for many) or target_epsilon"
        + (
            ", or sample fewer clients per round (fraction_fit)"
            if cfg.dp == "central" and (cfg.sites or cfg.clients)
            else ""
        )
    )


# --------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------


LOCK_NAME = ".lock"
PAUSED_WARNING = 10.0  # seconds every worker is paused before the run says why it waits

# Run directories this process holds, by resolved path: the open lock file and how many
# claims are nested (the command claims before it starts a cluster, the trainer again).
_HELD: dict[str, list] = {}

_CONFIG_LINE = re.compile(r"[A-Za-z_][A-Za-z0-9_]* = (.+)")
# The arrays of a simulated federated run's clients.npz (np.savez: no metadata of its own)
_CLIENTS_ARRAYS = frozenset({"n.npy", "loss.npy", "metric.npy", "round.npy"})
_LOCK_TEXT = re.compile(rb"(\d+ \S+ \d+\n)?")  # what _Claim writes ("" for a moment after creating it)
_TEXT_LIMIT = 1 << 20  # a config.toml or a lock file longer than this is not one a run wrote


def _names(names: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def changed(saved: dict[str, Any], now: dict[str, Any], fields: Sequence[tuple[str, str]]) -> str | None:
    """What of the data a checkpoint recorded (``saved``) differs from ``now``: the ``(key,
    label)`` ``fields`` recorded in ``saved`` whose values differ, their labels joined ("row
    count and feature means"); None when none does."""
    differ = [label for key, label in fields if key in saved and saved[key] != now.get(key)]
    return _names(differ) if differ else None


def _is_run_config(path: Path) -> bool:
    """Whether ``path`` is a config.toml as a run writes it: the header line, then one
    ``key = JSON`` line per setting (TrainConfig.to_toml)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_TEXT_LIMIT + 1)
        lines = data.decode().splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    if len(data) > _TEXT_LIMIT or not lines or lines[0] != TOML_HEADER:
        return False
    for line in lines[1:]:
        m = _CONFIG_LINE.fullmatch(line)
        if m is None:
            return False
        try:
            json.loads(m[1])
        except ValueError:
            return False
    return True


def _is_run_history(path: Path) -> bool:
    """Whether ``path`` is a history.json as a run writes it (every version has written these
    keys: the job, who installed the parameter server, the epochs, the rounds and their columns)."""
    return _history_job(path) is not None


def _history_job(path: Path) -> str | None:
    """The job of the history.json at ``path`` when it is one a run wrote (:func:`_is_run_history`)."""
    try:
        st = path.stat()
    except OSError:
        return None
    # a long run's history is megabytes: parsed once per version of the file (a run replaces
    # it, a new inode), not at every look (each plot's, each check of a command)
    return _history_doc_job(str(path), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _history_doc_job(path: str, ino: int, size: int, mtime_ns: int) -> str | None:
    try:
        doc = json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(doc, dict)
        and isinstance(doc.get("job"), str)
        and "installed_by" in doc
        and isinstance(doc.get("epochs"), list)
        and isinstance(doc.get("rounds"), list)
        and isinstance(doc.get("round_columns"), list)
    )
    return doc["job"] if ok else None


def _is_clients_file(path: Path) -> bool:
    """Whether ``path`` is the clients.npz a run of simulated clients writes."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return set(zf.namelist()) == _CLIENTS_ARRAYS
    except (OSError, zipfile.BadZipFile):
        return False


def _is_lock_file(path: Path) -> bool:
    """Whether ``path`` is a run's lock file (see :class:`_Claim`): empty, or "PID HOST TIME"."""
    try:
        if path.is_symlink() or not path.is_file():
            return False
        with open(path, "rb") as fh:
            data = fh.read(_TEXT_LIMIT + 1)
    except OSError:
        return False
    return _LOCK_TEXT.fullmatch(data) is not None


@dataclass
class RunDir:
    """A run's directory (layout: the module docstring). Its files count as a run's only when
    this program wrote them, which their content shows (:meth:`written_here`): a user's file is
    never removed or written over, ``--force`` included."""

    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.npz"

    @property
    def model(self) -> Path:
        return self.path / "model.npz"

    @property
    def history(self) -> Path:
        return self.path / "history.json"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def lock(self) -> Path:
        return self.path / LOCK_NAME

    @staticmethod
    def run_files() -> tuple[str, ...]:
        """The names a run writes in its directory (besides its lock file)."""
        from pipeline.plots import PLOT_FILES

        return ("config.toml", "checkpoint.npz", "model.npz", "history.json", *PLOT_FILES, "clients.npz")

    def holds_run(self) -> bool:
        """Whether the directory holds anything but its lock file."""
        return self.path.is_dir() and any(p.name != LOCK_NAME for p in self.path.iterdir())

    def written_here(self, name: str) -> bool:
        """Whether the file ``name`` in the directory is one this program wrote, by its content:
        a checkpoint or model carries its kind in its ``__meta__`` record, a config.toml starts
        with :data:`pipeline.config.TOML_HEADER` and holds only ``key = JSON`` lines,
        a history.json has the keys every run writes, a plot is a PNG marked with the job of the
        run's history.json beside it (:func:`pipeline.plots.plot_job`: a user's image of that name,
        matplotlib's included, is not), clients.npz holds the arrays of a simulated run's clients.
        Runs of earlier versions wrote the same, but their plots, which were not marked, count as
        a user's. A symbolic link is never the program's."""
        path = self.path / name
        if path.is_symlink() or not path.is_file():
            return False
        if name in ("checkpoint.npz", "model.npz"):
            meta = read_meta(path)
            return meta is not None and meta.get("kind") == name.removesuffix(".npz")
        if name == "config.toml":
            return _is_run_config(path)
        if name == "history.json":
            return _is_run_history(path)
        if name == "clients.npz":
            return _is_clients_file(path)
        if name == LOCK_NAME:
            return _is_lock_file(path)
        if name in self.run_files():  # a plot: marked with the job of the run's history it was drawn from
            from pipeline.plots import plot_job

            job = _history_job(self.history) if self.written_here("history.json") else None
            return job is not None and plot_job(path) == job
        return False

    def foreign_files(self, skip: tuple[str, ...] = ()) -> list[str]:
        """The names a run writes that the directory holds but this program did not write."""
        return [
            n for n in self.run_files() if n not in skip and os.path.lexists(self.path / n) and not self.written_here(n)
        ]

    def data_store(self) -> Path | None:
        """The Zarr store the directory is or lies in, the outermost (an array lies in its group):
        None when none. A run written into a store would make it a directory no ``--force`` of
        ``synth``, ``ingest`` or ``predict`` replaces."""
        return outermost_store(self.path)

    def _check_place(self, resume: bool) -> None:
        """Refuse a directory that is or lies in a Zarr store, or whose lock file is a user's."""
        store = self.data_store()
        if store is not None:
            marker = store_marker(store)
            fix = (
                "move the run's files to a directory outside it and resume there"
                if resume
                else "choose an --out outside data stores"
            )
            if store == Path(os.path.realpath(self.path)):
                raise TrainingError(
                    f"run directory {str(self.path)!r} is a Zarr store (it holds {marker}), not a place for a "
                    f"run; {fix}"
                )
            shown = os.path.relpath(store) if store.is_relative_to(Path.cwd()) else str(store)
            raise TrainingError(
                f"run directory {str(self.path)!r} lies inside the Zarr store {shown!r}, not a place for a run; {fix}"
            )
        if os.path.lexists(self.lock) and not self.written_here(LOCK_NAME):
            raise TrainingError(
                f"run directory {str(self.path)!r} holds {LOCK_NAME}, which this program did not write and a run "
                f"uses as its lock; move it out of {str(self.path)!r}, or choose another --out"
            )

    def _check_writable(self, resume: bool) -> None:
        """Refuse a run directory that cannot be created, or written in (probed by making and
        removing an entry: nothing is left, and no missing parent is created)."""
        from pipeline.store import unwritable_reason

        where = repr(str(self.path))
        exists = self.path.is_dir()
        anc, why = unwritable_reason(self.path / ".probe" if exists else self.path)
        if why is None:
            return
        shown = os.path.relpath(anc) if anc.is_relative_to(Path.cwd()) else str(anc)
        if exists:
            fix = "make it writable to resume the run" if resume else "make it writable, or choose another --out"
            raise TrainingError(f"cannot write in run directory {where}: {why}; {fix}")
        if anc.exists() and not anc.is_dir():
            raise TrainingError(f"cannot create run directory {where}: {shown!r} is a file; choose another --out")
        raise TrainingError(
            f"cannot create run directory {where}: {why} (in {shown!r}); choose an --out in a writable directory"
        )

    def check(self, resume: bool, force: bool) -> None:
        """Raise if resuming without a checkpoint, or starting over an existing run without
        force; with or without force, if the directory is or lies in a Zarr store, or holds a
        file the run would write over that this program did not write."""
        where = repr(str(self.path))
        self._check_place(resume)
        if resume:
            if not self.checkpoint.is_file():
                if self.written_here("config.toml"):
                    raise CheckpointError(
                        f"nothing to resume: run directory {where} holds the configuration of a "
                        "run that stopped before its first checkpoint; start it again with --force"
                    )
                raise CheckpointError(
                    f"nothing to resume: {str(self.checkpoint)!r} does not exist; train without --resume"
                )
            # a checkpoint that is not one: reading it says what it is (truncated, a text file, ...)
            foreign = self.foreign_files(skip=("checkpoint.npz",))
            if foreign:
                them = "it" if len(foreign) == 1 else "them"
                raise TrainingError(
                    f"run directory {where} holds {_names(foreign)}, which this program did not write and the "
                    f"resumed run would write over; move {them} out of {where} to resume the run"
                )
            self._check_writable(resume)
            return
        if self.path.exists() and not self.path.is_dir():
            raise TrainingError(f"run directory {where} is a file; choose another --out")
        self._check_writable(resume)
        if not self.holds_run():
            return
        foreign = self.foreign_files()
        if foreign:
            them = "it" if len(foreign) == 1 else "them"
            fix = f"move {them} out of {where}, or choose another --out"
            if force:
                raise TrainingError(
                    f"run directory {where} holds {_names(foreign)}, which this program did not write and a run "
                    f"writes (--force replaces only a run's own files); {fix}"
                )
            if self.written_here("checkpoint.npz"):
                raise TrainingError(
                    f"run directory {where} holds a run and {_names(foreign)}, which this program did not write "
                    f"and a run writes; {fix}"
                )
            raise TrainingError(
                f"run directory {where} is not empty and holds no run ({_names(foreign)}: not written by this "
                f"program, and a run writes {'that name' if len(foreign) == 1 else 'those names'}); {fix}"
            )
        if force:
            return
        if self.written_here("checkpoint.npz"):
            raise TrainingError(
                f"run directory {where} already holds a run; pass --resume to continue it, "
                "--force to overwrite it, or choose another --out"
            )
        if self.written_here("config.toml"):
            raise TrainingError(
                f"run directory {where} holds a run that stopped before its first "
                "checkpoint (nothing to resume); pass --force to start it again, or choose another --out"
            )
        own = [n for n in self.run_files() if self.written_here(n)]
        if own:
            raise TrainingError(
                f"run directory {where} holds files of an earlier run ({_names(own)}) but nothing to resume; "
                "pass --force to replace them, or choose another --out"
            )
        raise TrainingError(
            f"run directory {where} is not empty and holds no run; choose another --out, or pass --force to "
            "write the run beside its files (they are kept: --force replaces only a run's own files)"
        )

    def owner(self) -> str | None:
        """Who trains into this directory now ("pid N on HOST"), or None when nobody does.

        The claim is an exclusive ``flock`` on the lock file, which the kernel drops when its
        process ends however it ends: a lock file left by a killed run is not a claim."""
        import fcntl

        key = str(self.path.resolve())
        if key in _HELD:
            return f"pid {os.getpid()} on {_hostname()} (this process)"
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_owner(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def missing_model(self, store: str = "STORE") -> str | None:
        """Why a run directory without ``model.npz`` has none (training, interrupted, failed),
        and what to do; None when it is not a run directory without a model."""
        if not self.path.is_dir() or self.model.exists():
            return None
        where = repr(str(self.path))
        owner = self.owner()
        if owner is not None:
            return (
                f"run directory {where} is still training ({owner}); its model.npz is written when the "
                "run ends: wait for it, or stop it (Ctrl-C or SIGTERM writes a checkpoint) and resume it"
            )
        if self.checkpoint.is_file():
            try:
                _, meta = load_file(self.checkpoint, "checkpoint")
                epoch, store = int(meta["epoch"]), str(meta.get("store") or store)
                federated = isinstance(meta.get("federated"), dict)  # it counts rounds, not epochs
                sites = federated and bool(meta["federated"].get("sites"))  # a federated run: its sites file
            except UnreadableFileError as exc:
                return (
                    f"run directory {where} holds a damaged checkpoint and no model.npz ({exc.problem}): nothing "
                    f"to use or resume; {_damaged_fix(where)}"
                )
            except (CheckpointError, KeyError, TypeError, ValueError):
                return None
            unit = "round" if federated else "epoch"
            resume = f"continue it with `{resume_command(store, self.path, meta.get('cluster'), sites=sites)}`"
            if epoch < 1:  # no epoch finished: no best model to write yet
                return f"run directory {where} holds a run interrupted in its first {unit} (no model.npz); {resume}"
            return (
                f"run directory {where} holds an interrupted run (checkpoint after {epoch} {unit}(s), no "
                f"model.npz); {resume}, or write the model of its best {unit} so far with "
                f"`... --resume --set {unit}s={epoch}`"
            )
        if self.written_here("config.toml"):
            return (
                f"run directory {where} holds a run that stopped before its first checkpoint (no "
                "model.npz); train it again with --force"
            )
        return None

    def claim(self, resume: bool, force: bool) -> _Claim:
        """Claim the directory for one training (a context manager); raise if another process
        trains into it, or if :meth:`check` refuses it. Nested claims in one process share it."""
        return _Claim(self, resume, force)

    def prepare(self, resume: bool, force: bool) -> None:
        self.check(resume, force)
        if resume:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        from pipeline.plots import PLOT_FILES

        # an earlier run's checkpoint, model, history, plots and simulated clients' metrics are
        # not this run's; check has refused a directory where a file of those names is not the
        # program's, and only the program's are removed (all looked at before any goes: a plot
        # is known by the history)
        names = ("checkpoint.npz", "model.npz", "history.json", *PLOT_FILES, "clients.npz")
        for name in [n for n in names if self.written_here(n)]:
            (self.path / name).unlink(missing_ok=True)

    def write_json(self, path: Path, data: Any) -> None:
        self.write_text(path, json.dumps(data, indent=1, default=_json_default))

    def write_text(self, path: Path, text: str) -> None:
        """Write ``text`` to ``path`` whole or not at all (a temporary renamed over it): a write
        that fails (a full disk, a directory made read-only) leaves the file there before, which
        a resumed run reads and :meth:`written_here` knows, never half of one; one line says so."""
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            kept = f"the {path.name} written before is kept" if path.is_file() else "nothing was written"
            again = "continue the run with --resume" if self.written_here("checkpoint.npz") else "start it again"
            raise TrainingError(
                f"cannot write {str(path)!r} ({exc.strerror or type(exc).__name__}); {kept}: free space on its "
                f"disk or make {str(self.path)!r} writable, then {again}"
            ) from None


def _hostname() -> str:
    import socket

    return socket.gethostname()


def _read_owner(fd: int) -> str:
    """Who holds the lock on ``fd``: the holder writes its pid and host just after taking the
    lock, so a claim that lost the race may look before they are there (waited for, briefly)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 200, 0).decode(errors="replace").split()
        except OSError:
            return "another process"
        if len(text) >= 2:
            return f"pid {text[0]} on {text[1]}"
        time.sleep(0.05)
    return "another process"


class _Claim:
    """An exclusive, process-lifetime claim on a run directory (see :meth:`RunDir.claim`)."""

    def __init__(self, run: RunDir, resume: bool, force: bool) -> None:
        self.run, self.resume, self.force = run, resume, force
        self.key = ""
        self.created = False

    def __enter__(self) -> _Claim:
        import fcntl

        run = self.run
        run.check(self.resume, self.force)  # nothing is created for a refused directory
        self.key = str(run.path.resolve())
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return self
        self.created = not run.path.exists()
        if not self.resume:
            run.path.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # a file system without locks: train unclaimed rather than not at all
                    logger.warning("cannot lock %s (%s): concurrent runs into it are not detected", run.lock, exc)
                    break
                owner = _read_owner(fd)
                os.close(fd)
                raise TrainingError(
                    f"run directory {str(run.path)!r} is in use by another training ({owner}); "
                    "wait for it to finish or choose another --out (--force does not take over a live run)"
                ) from None
            try:  # the file may have been removed by its previous owner between open and flock
                same = os.fstat(fd).st_ino == os.stat(run.lock).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {_hostname()} {time.time():.0f}\n".encode(), 0)
        _HELD[self.key] = [fd, 1]
        try:
            run.check(self.resume, self.force)  # again, now that no one else can change it
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            with contextlib.suppress(OSError):
                self.run.lock.unlink()
            os.close(held[0])
            if self.created:  # a directory made for a run that wrote nothing goes again
                with contextlib.suppress(OSError):
                    self.run.path.rmdir()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(type(o).__name__)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    model: Model
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    installed_by: str = ""
    best_epoch: int = -1  # the epoch whose weights ``model`` holds (-1: none recorded)
    privacy: dict = field(default_factory=dict)  # the privacy spent (epsilon, delta, rounds, ...); {} without DP

    @property
    def final(self) -> dict:
        """The last epoch's record."""
        return self.history[-1] if self.history else {}

    @property
    def best(self) -> dict:
        """The record of the epoch the saved model comes from (the best validation epoch)."""
        return saved_epoch({"best_epoch": self.best_epoch, "epochs": self.history})


def saved_epoch(history: dict) -> dict:
    """The epoch record of a run's saved model in its ``history.json`` document: the best
    epoch (the last one when the history does not name it)."""
    epochs = history.get("epochs") or []
    best = history.get("best_epoch")
    for rec in epochs:
        if rec.get("epoch") == best:
            return rec
    return epochs[-1] if epochs else {}


def _total_threads(client: Any) -> dict[str, int]:
    """The threads of each worker that trains: ``ps-shard`` workers are reserved for shards."""
    from pipeline.ps.shard import shard_workers

    info = client.scheduler_info(n_workers=-1)
    reserved = set(shard_workers(info))
    return {w: int(v.get("nthreads", 1)) for w, v in info["workers"].items() if w not in reserved}


def check_validation_store(store: Store, validation_store: str) -> None:
    """Refuse a validation store whose features (count, names, order, encodings), task or
    classes differ from the training store's."""
    from pipeline.inference import store_targets

    vs = open_store(validation_store)
    problem = layout_mismatch(layout_of(store), vs, labels=True)
    if problem is None:
        # the targets too: another column, or another number of them, broadcast against the
        # model's outputs and gave meaningless validation figures (R^2 of -163) to stop on
        (name, k), (vname, vk) = store_targets(store), store_targets(vs)
        if vk != k:
            problem = f"has {vk} target value(s) per row, not {k}"
        elif name is not None and vname is not None and vname != name:
            problem = f"has the target column {vname!r}, not {name!r}"
    if problem:
        raise StoreError(
            f"validation store {validation_store!r} does not match the training store {store.path!r}: "
            f"it {problem}; ingest it with --like {store.path}"
        )


def check_workers_can_open(client: Any, store_path: str) -> None:
    """Fail before training if some worker cannot open the store, naming those workers."""

    def _probe(path: str = store_path) -> str:
        try:
            from pipeline.store import open_store as _open

            _open(path)
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            return f"{type(exc).__name__}: {exc}"
        return ""

    results = client.run(_probe)
    bad = {w: msg for w, msg in results.items() if msg}
    if bad:
        names = ", ".join(sorted(bad))
        first = next(iter(bad.values()))
        raise StoreError(
            f"{len(bad)} of {len(results)} workers cannot open store {store_path!r} ({names}): {first}; "
            "put the store on a path or URL every worker can reach"
        )


def check_backend(backend: str, client: Any = None) -> None:
    """Fail before training when the kernel ``backend`` cannot run: on this machine (no
    ``client``: a local cluster's workers run here), or on some of ``client``'s workers."""
    if backend != "cuda":
        return

    def _probe(name: str = backend) -> str:
        try:
            from kernels import get_backend

            get_backend(name)
        except Exception as exc:  # noqa: BLE001 - reported to the user below
            return str(exc)
        return ""

    results = {"this machine": _probe()} if client is None else client.run(_probe)
    bad = {w: msg for w, msg in results.items() if msg}
    if bad:
        where = (
            "on this machine"
            if client is None
            else f"on {len(bad)} of {len(results)} workers ({', '.join(sorted(bad))})"
        )
        raise ConfigError(f"config key 'backend' = 'cuda' cannot run {where}: {next(iter(bad.values()))}")


@contextlib.contextmanager
def interrupts_between_polls() -> Any:
    """Within the block, Ctrl-C (and SIGTERM where the command turned it into an interrupt) only
    records the signal: the ``check()`` it yields raises the KeyboardInterrupt at the block's
    next poll, outside any call into Dask. An interrupt raised inside one (distributed's
    ``sync``, before its coroutine has started) makes the event loop log a NameError from
    sync's cancel callback. A second signal raises at once. Off the main thread (signals are
    not handled there) ``check()`` does nothing."""
    import signal
    import threading

    pending: list[str] = []

    def check() -> None:
        if pending:
            raise KeyboardInterrupt(pending[0])

    if threading.current_thread() is not threading.main_thread():
        yield check
        return

    def record(signum: int, frame: object) -> None:
        what = "SIGTERM" if signum == signal.SIGTERM else ""
        if pending:
            raise KeyboardInterrupt(what)
        pending.append(what)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    # only where the signal interrupts now: Python's Ctrl-C handler, the command's SIGTERM one
    ours = [
        sig for sig, h in previous.items() if h is signal.default_int_handler or (sig == signal.SIGTERM and callable(h))
    ]
    for sig in ours:
        signal.signal(sig, record)
    try:
        yield check
    finally:
        for sig in ours:
            signal.signal(sig, previous[sig])


def let_job_tasks_stop(client: Any, job: str, timeout: float = 10.0) -> None:
    """After ``job``'s tasks were cancelled: wait until the workers no longer run them
    (:func:`pipeline.worker.stop_job_tasks`), so that the cluster, when the command closes it,
    closes no worker under a running task (each would log its cancellation)."""
    from pipeline.worker import stop_job_tasks

    try:
        still = client.run(stop_job_tasks, job, timeout, on_error="ignore")
    except Exception:
        logger.debug("could not wait for job %s's tasks to stop", job, exc_info=True)
        return
    running = sum(n for n in still.values() if isinstance(n, int))
    if running:
        logger.debug("job %s: %d task(s) still running after %.0f s", job, running, timeout)


class Trainer:
    """Runs one training job on a Dask cluster (see the module docstring)."""

    def __init__(
        self,
        store: str,
        cfg: TrainConfig,
        out: str | os.PathLike,
        client: Any,
        *,
        resume: bool = False,
        force: bool = False,
        log: Callable[[str], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        progress: bool = False,
    ) -> None:
        self.store_path = str(store)
        self.progress = progress
        self.store = open_store(self.store_path)
        for path, st in (
            (self.store_path, self.store),
            *(((cfg.validation_store, open_store(cfg.validation_store)),) if cfg.validation_store else ()),
        ):
            if st.attrs.get("labelled") is False:  # ingested with --unlabelled: y is all zeros
                raise StoreError(
                    f"store {path!r} has no targets (ingested with --unlabelled); train on a labelled store"
                )
        self.cfg = cfg
        self.client = client
        self.run = RunDir(Path(out))
        self.resume = resume
        self.force = force
        self.log = log or (lambda msg: logger.info(msg))
        self.warn = log or (lambda msg: logger.warning(msg))
        self._paused_since: float | None = None  # since when every worker is paused (_note_paused)
        self._paused_said = False
        # the server's rounds and push counts before a resume (_create_job): the new job records only its own
        self._rounds_before: list[list] = []
        self._counts_before: dict[str, int] = {}
        self.train_rows = self.store.n_rows
        self.on_epoch = on_epoch
        self.spec, self.target = build_spec(self.store, cfg)
        self.val_path = cfg.validation_store or self.store_path
        # a validation store is standardized like the training store (the model's statistics)
        self.val_norm = (
            {"mean": self.store.mean.tolist(), "std": self.store.std.tolist()} if cfg.validation_store else None
        )
        if cfg.validation_store:
            check_validation_store(self.store, cfg.validation_store)
        self.job = f"run-{uuid.uuid4().hex[:12]}"

    # -- planning ------------------------------------------------------------------------

    def plan(self, n_threads: int) -> tuple[list[Ranges], Ranges]:
        """Plan the epochs for ``n_threads`` worker threads (:func:`pipeline.plan.plan_epochs`,
        kept in ``self.epoch_plan``); the training tasks and the validation ranges."""
        vs = open_store(self.cfg.validation_store) if self.cfg.validation_store else None
        plan = plan_epochs(self.store, self.cfg, n_threads, self.spec, vs)
        if plan.warning:
            self.warn(plan.warning)
        self.epoch_plan = plan
        self.train_rows = plan.train_rows
        return plan.tasks, plan.val_ranges

    def _train_rows(self, ranges: Ranges) -> int:
        """About how many training rows ``ranges`` hold (see :meth:`EpochPlan.task_rows`)."""
        return self.epoch_plan.task_rows(ranges)

    # -- main loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        # distributed.wait and friends use the *current* client: make it ours for the run
        from distributed.comm.core import CommClosedError

        with self.client.as_current(), self.run.claim(self.resume, self.force):
            try:
                return self._fit()
            except PipelineError:
                raise
            except Exception as exc:
                lost = isinstance(exc, CommClosedError) or "scheduler-connection-lost" in str(exc)
                if not lost and self.client.status == "running":
                    raise
                raise scheduler_lost(self.client, exc, self.run.path, self.store_path) from None

    # -- where the work runs (pipeline.local.LocalTrainer: in this process) -----------------

    def _wait_for_a_worker(self) -> None:
        """A cluster with no worker yet (a job script starts the scheduler, the workers and
        the driver together): wait for one, up to ``no_worker_timeout``, as a run whose workers
        are all gone waits for capacity."""
        if self.client.scheduler_info(n_workers=-1)["workers"]:
            return
        timeout = self.cfg.no_worker_timeout
        self.log(f"the cluster has no workers yet: waiting up to {timeout:.0f} s (no_worker_timeout) for one")
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise TrainingError(
                f"the cluster has had no workers for {timeout:.0f} s; start some with `dask worker ADDRESS`, "
                "or raise no_worker_timeout"
            ) from None

    def _connect(self) -> tuple[str, dict[str, int]]:
        """Install the parameter server and check the workers; who installed it, and the
        workers' thread counts."""
        from pipeline.ps import ParameterServer

        cfg, client = self.cfg, self.client
        if cfg.ps_shards:  # a shard holds a range of at least one parameter
            from kernels.mlp import MLPSpec

            n_params = MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}).n_params
            if cfg.ps_shards > n_params:
                raise TrainingError(
                    f"ps_shards = {cfg.ps_shards} is more than the model's {n_params} parameters; set ps_shards "
                    f"to at most {n_params} (0 = the parameter server in the scheduler)"
                )
        installed_by = ParameterServer.ensure_installed(client)
        self._wait_for_a_worker()
        check_workers_can_open(client, for_workers(self.store_path))
        check_backend(cfg.backend, client)
        if cfg.validation_store:
            check_workers_can_open(client, for_workers(cfg.validation_store))
        threads = _total_threads(client)
        if not threads:  # the workers left while they were checked (a nanny restarting one): wait again
            self._wait_for_a_worker()
            threads = _total_threads(client)
        from pipeline.ps.shard import shard_workers

        n_shard = len(shard_workers(client.scheduler_info(n_workers=-1)))
        if not threads and n_shard:
            raise TrainingError(
                f"the cluster's {n_shard} worker(s) are all started with `--resources ps-shard=1`, reserved for "
                "parameter-server shards; start a worker to train with `dask worker ADDRESS` (without that resource)"
            )
        if not threads:
            raise TrainingError("the cluster has no workers; start some with `dask worker ADDRESS`")
        if cfg.ps_shards > n_shard:
            raise TrainingError(
                f"ps_shards = {cfg.ps_shards} but the cluster has {n_shard} worker(s) started with "
                "`--resources ps-shard=1`; start more with `dask worker ADDRESS --resources ps-shard=1` "
                "or lower ps_shards (0 = the parameter server in the scheduler)"
            )
        # tasks keep off ps-shard workers: restricted (loosely: any worker if all these are
        # gone) to the workers seen here, when there are shard workers to keep off
        self._task_workers = sorted(threads) if n_shard else None
        return installed_by, threads

    def _server(self) -> Any:
        """The handle of this job's parameter server (its shards with ``ps_shards``)."""
        if self.cfg.ps_shards:
            from pipeline.ps.shard import ShardedParameterServer

            return ShardedParameterServer(self.job, self.client, self.cfg.ps_shards)
        from pipeline.ps import ParameterServer

        return ParameterServer(self.job, self.client)

    def _placement(self, workers: list[str] | None) -> dict[str, Any]:
        """``client.submit``'s placement of a training or evaluation task: off ps-shard workers
        (the workers that train, as the scheduler lists them now: a replaced worker is in)."""
        if workers or not getattr(self, "_task_workers", None):
            return {"workers": workers}
        if time.monotonic() - getattr(self, "_task_workers_at", 0.0) > 1.0:  # one look per burst of tasks
            self._task_workers = sorted(_total_threads(self.client)) or self._task_workers
            self._task_workers_at = time.monotonic()
        return {"workers": self._task_workers, "allow_other_workers": True}

    def _span(self, name: str) -> Any:
        """Dask's span around a phase (an epoch), for the dashboard and performance reports."""
        from distributed import span

        return span(name)

    def _fit(self) -> TrainResult:
        """Train (:meth:`_fit_run`); a resume that fails or is stopped before it writes a
        checkpoint puts the run's config.toml back as it was: the settings it was given (``--set``)
        are the run's only once a checkpoint holds them (a plain ``--resume`` trains with its
        checkpoint's), and config.toml says what the run trains with."""
        self._config_before: str | None = None  # the run's config.toml a resume replaced
        self._checkpointed = False
        try:
            return self._fit_run()
        except BaseException:
            if self._config_before is not None and not self._checkpointed:
                try:
                    self.run.write_text(self.run.config, self._config_before)
                except TrainingError as exc:  # the error being raised says what stopped the run
                    logger.warning("%s", exc)
            raise

    def _fit_run(self) -> TrainResult:
        cfg = self.cfg
        self.run.prepare(self.resume, self.force)
        installed_by, threads = self._connect()
        n_threads = sum(threads.values())

        from kernels.mlp import MLPSpec, init_params

        ckpt = self._load_checkpoint() if self.resume else None
        if ckpt is not None:
            params, run = ckpt.params, ckpt.run
            self.job = run.job
            run.n_threads = run.n_threads or n_threads
        else:
            params = init_params(MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}), seed=cfg.seed)
            run = RunState(self.job, best=BestModel(params=params.copy()), n_threads=n_threads)
        self.run_state = run
        self.n_threads = run.n_threads  # the plan's thread count, kept in checkpoints for --resume
        # an epoch resumed after some of its rounds: its sync shares split its rows over the
        # thread count it started with (the server holds each share's position), not today's
        interrupted = 0
        if (
            cfg.mode == "sync"
            and ckpt is not None
            and (run.done_tasks or any(k.startswith(f"e{run.epoch}-") for k in ckpt.progress))
        ):
            interrupted = int(ckpt.meta.get("epoch_threads") or run.n_threads)
        self._max_slots = run.n_threads  # see _epoch_threads
        self._split_slots = 0  # set by _epoch_threads for each epoch
        self._split_said: tuple[int, str] | None = None  # the split last reported, and why
        # a resume at another noise or dp cannot account the checkpoint's rounds: refused
        # before its config is saved (_create_job goes on from the privacy they spent)
        self._spent(ckpt)
        if self.resume and self.run.written_here("config.toml"):
            self._config_before = self.run.config.read_text()
        self.run.write_text(self.run.config, cfg.to_toml())
        self.plan(run.n_threads)
        plan = self.epoch_plan
        ps = self._server()
        self._create_job(ps, params, run, ckpt)
        self.log(
            f"job {self.job}: {len(plan.tasks)} tasks per epoch over {self.store.n_rows:,} rows, "
            f"{len(plan.val_ranges)} validation ranges, "
            f"parameter server installed by {installed_by}"
        )
        if plan.sync_shares and plan.sync_shares < plan.n_threads:
            self.log(
                f"{plan.sync_shares} sync share(s) for {plan.n_threads} worker threads: an epoch "
                f"is {plan.train_rows * train_flops_per_row(self.spec) / 1e9:.1f} GFLOP of "
                "training, under "
                f"min_share_gflop = {cfg.min_share_gflop:g} per share (--set min_share_gflop=0 "
                "uses every thread)"
            )
        stopping = EarlyStopping(
            cfg.patience,
            cfg.min_delta,
            cfg.min_samples,
            best_loss=run.best.loss,
            best_epoch=run.best.epoch,
            epoch=run.epoch,
            seen=run.samples,
        )
        stopped_early = False
        privacy: dict = {}
        run.last_checkpoint = time.monotonic()
        try:
            for epoch in range(run.epoch, cfg.epochs):
                run.epoch = epoch
                threads = self._epoch_threads(epoch, threads, interrupted)
                interrupted = 0
                t0 = time.perf_counter()
                with self._span(f"epoch-{epoch}"):
                    ps, stats, st, val, t_val = self._train_epoch(ps, run, threads)
                t_end = time.perf_counter()
                seconds = t_end - t0
                record = {
                    "epoch": epoch,
                    "rounds": st["version"],
                    "samples": stats["samples"],
                    "train_loss": stats["loss"],
                    "seconds": seconds,
                    # the rows trained in this attempt at the epoch, over its time
                    "samples_per_s": stats.get("trained", stats["samples"]) / seconds if seconds else 0.0,
                    "read_s": stats["read"],
                    "compute_s": stats["compute"],
                    "communicate_s": stats["communicate"],
                    # the driver's view of the epoch: training tasks submitted -> all done, then
                    # the validation pass (``seconds`` is their sum plus bookkeeping); validated
                    # inside the training tasks, ``validate_s`` is the slowest task's share of
                    # ``train_s`` (and the pass itself only fetches the weights)
                    "train_s": t_val - t0,
                    "validate_s": stats["validate"] if val is stats["val"] else t_end - t_val,
                    "validated_in_tasks": val is stats["val"],
                    **{f"val_{k}": v for k, v in val.items() if k != "confusion"},
                    "tasks": stats["tasks"],
                }
                privacy = st.get("privacy") or {}
                if privacy.get("dp", "off") != "off":
                    # the privacy spent up to this epoch's model: epsilon at delta over the rounds
                    record.update(epsilon=privacy["epsilon"], dp_delta=privacy["delta"], dp_rounds=privacy["rounds"])
                run.history.append(record)
                stop = stopping.update(val.get("loss", stats["loss"]), stats["samples"])
                if stopping.improved:
                    run.best = BestModel(stopping.best_loss, st["model"], epoch)
                run.finish_epoch()
                numbers = {k: v for k, v in record.items() if isinstance(v, int | float)}
                self._checkpoint(ps, run, state=st, record=numbers)
                if self.on_epoch is not None:
                    self.on_epoch(record)
                if stop:
                    stopped_early = True
                    self.log(f"early stop: no validation improvement for {cfg.patience} epochs")
                    break
                if privacy.get("exhausted"):
                    stopped_early = True
                    self.log(budget_spent_line(privacy, cfg.target_epsilon))
                    break
        except KeyboardInterrupt:
            self.log("interrupted: writing a checkpoint before stopping")
            if run.history and run.history[-1]["epoch"] == run.epoch:  # recorded: between epochs
                run.finish_epoch()
            self._checkpoint(ps, run)
            let_job_tasks_stop(self.client, self.job)  # cancelled in _run_epoch
            raise
        except TrainingError:
            # a failed job (a diverged run): the other tasks end at their next message to the
            # server; the cluster the command then closes must not close a worker under one
            let_job_tasks_stop(self.client, self.job)
            raise
        finally:
            metrics = {}
            try:
                metrics = ps.metrics(history=True)
                ps.close()
            except Exception:
                logger.debug("could not close job %s", self.job, exc_info=True)
            self._forget_job()
        model = Model.from_training(
            self.store, self.spec, self.target, run.best.params, cfg, run.history, run.best.epoch
        )
        try:
            model.save(self.run.model)
        except CheckpointError as exc:  # a full disk: the checkpoint holds the whole run
            raise CheckpointError(f"{exc} (`--resume` writes the model of the run's checkpoint)") from None
        history_doc = {
            "job": self.job,
            "installed_by": installed_by,
            "best_epoch": run.best.epoch,
            "stopped_early": stopped_early,
            "epochs": run.history,
            "rounds": self._rounds(metrics),
            "round_columns": ["time", "version", "loss", "samples", "deltas"],
            # deltas the server received, and of them those summed into another task's push
            # (combine_pushes): the messages it handled were pushes - summed
            **self._counts(metrics),
        }
        privacy = metrics.get("privacy") or privacy
        if privacy.get("dp", "off") == "off" and not privacy.get("secure_aggregation"):
            privacy = {}
        if privacy:
            history_doc["privacy"] = privacy
        self.run.write_json(self.run.history, history_doc)
        return TrainResult(self.run.path, model, run.history, stopped_early, installed_by, run.best.epoch, privacy)

    def _epoch_threads(self, epoch: int, threads: dict[str, int], interrupted: int = 0) -> dict[str, int]:
        """The training workers' threads at the start of ``epoch`` (``threads``: the last epoch's),
        with one log line if they changed, and the thread count its sync shares split over
        (``self._split_slots``). A sync epoch runs one share per worker thread present when it
        starts: one that left no longer holds a share the others must run beside their own,
        and one that joined gets a share with ``aggregate = "mean"``. With ``"sum"`` every
        share's update adds to each round's step, so a run never has more shares than it
        started with (``self._max_slots``; 2 to 6 shares at once took the validation loss of a
        run from 0.73 to 1.23). An epoch resumed after some of its rounds (``interrupted``: its
        thread count then) keeps its split, and a run with differential privacy or secure
        aggregation keeps the one it started with (their settings count a round's participants)."""
        if self.client is None:  # in this process: one share, always
            return threads
        cfg = self.cfg
        now = _total_threads(self.client) or threads  # none at all: the epoch waits for one
        n_now = sum(now.values())
        privacy = cfg.dp != "off" or cfg.secure_aggregation
        if interrupted:
            split = interrupted
        elif privacy:
            split = self._max_slots
        elif cfg.aggregate == "sum":
            split = min(n_now, self._max_slots)
        else:
            split = n_now
        note = ""
        if interrupted and interrupted != n_now:
            note = f": the split this epoch started with over {interrupted} thread(s)"
        elif split < n_now and privacy:
            note = ", as many as the run started with (the privacy settings count the participants of a round)"
        elif split < n_now:
            note = (
                ', as many as the run started with: with aggregate = "sum" more shares would take larger '
                'steps (aggregate = "mean" gives every worker thread a share)'
            )
        self._split_slots = split
        said = self._split_said or (n_now, "")  # the first epoch here: nothing said yet
        self._split_said = (split, note)
        sync = cfg.mode == "sync"
        if now == threads and not (sync and (split, note) != said):
            return now
        line = f"epoch {epoch + 1}: {n_now} worker thread(s)"
        if now != threads:
            joined, left = sorted(set(now) - set(threads)), sorted(set(threads) - set(now))
            moves = ((joined, "joined"), (left, "left"))
            change = "".join(f"; {len(ws)} worker(s) {verb}: {', '.join(ws)}" for ws, verb in moves if ws)
            line += f" (was {sum(threads.values())}{change})"
        if sync:
            shares = n_sync_shares(self.epoch_plan.train_rows, self.spec, split, cfg.min_share_gflop)
            line += f", {shares} sync share(s){note}"
        self.log(line)
        return now

    def _forget_job(self) -> None:
        """Drop what the workers keep for this job between its tasks (trainers, validation
        batches, store chunks: :func:`pipeline.worker.forget_job`); a worker that cannot is
        skipped (its cache gives the job's entries up to newer jobs)."""
        from pipeline.worker import forget_job

        try:
            self.client.run(forget_job, self.job, on_error="ignore")
        except Exception:
            logger.debug("could not release job %s on the workers", self.job, exc_info=True)

    def _create_job(self, ps: Any, params: np.ndarray, run: RunState, ckpt: Checkpoint | None) -> None:
        """Create the job on the parameter server from ``params`` (and ``ckpt``'s server state)."""
        cfg = self.cfg
        # the checkpoint's rounds up to its version (one pushed while it was written is trained again)
        rounds = ckpt.rounds if ckpt is not None and ckpt.rounds else []
        self._rounds_before = [list(r) for r in rounds if r[1] <= ckpt.version]
        self._counts_before = {k: int(ckpt.meta.get(k, 0)) for k in ("pushes", "summed")} if ckpt is not None else {}
        ps.create(
            params,
            mode=cfg.mode,
            staleness=cfg.staleness,
            damping=cfg.damping,
            aggregate=cfg.aggregate,
            optimizer={
                "name": cfg.server_optimizer,
                "lr": cfg.server_lr,
                "momentum": cfg.server_momentum,
                "beta1": cfg.server_beta1,
                "beta2": cfg.server_beta2,
                "tau": cfg.server_tau,  # fedadam, adagrad and yogi's adaptivity
                "ema": cfg.ema,
            },
            schedule={
                "kind": cfg.schedule,
                "warmup": cfg.warmup,
                "step_size": cfg.step_size,
                "gamma": cfg.gamma,
                "total_steps": self.epoch_plan.rounds_per_epoch * cfg.epochs,
            },
            version=ckpt.version if ckpt else 0,
            optimizer_state=ckpt.optimizer_state if ckpt else None,
            local_states=ckpt.local_states if ckpt else None,  # empty unless sync, same optimizer
            progress=ckpt.progress if ckpt else None,
            epoch=run.epoch,
            join_timeout=cfg.join_timeout,
            compression=cfg.compression,
            topk_fraction=cfg.topk_fraction,
            **(
                {"reply_codec": cfg.compression, "reply_view": ckpt.reply_view if ckpt else None}
                if cfg.compress_replies
                else {}
            ),
            privacy=privacy_settings(
                cfg,
                self._spent(ckpt),
                participants=self.epoch_plan.sync_shares or self.epoch_plan.n_threads,
            ),
        )

    # -- one epoch -------------------------------------------------------------------------

    def _train_epoch(self, ps: Any, run: RunState, threads: dict[str, int]) -> tuple[Any, dict, dict, dict, float]:
        """Train epoch ``run.epoch`` and fetch the server's state after it, validating it
        unless the tasks did: ``(ps, stats, state, val, t_val)``. A lost parameter-server
        shard restores the job from the last checkpoint (``ps`` is then a new handle) and the
        epoch runs again from there."""
        while True:
            try:
                stats = self._run_epoch(ps, run, threads)
                t_val = time.perf_counter()
                st = ps.state()  # the epoch's final model: the best model, the checkpoint
                # validated inside the training tasks (sync), if they all saw these weights
                val = stats["val"] if stats["val_version"] == st["version"] else None
                if val is None:
                    val = self._evaluate(run.epoch, self.epoch_plan.val_ranges)
                return ps, stats, st, val, t_val
            except ShardLostError as exc:
                epoch = run.epoch
                ps = self._restore_shards(ps, run, exc)
                if run.epoch != epoch:  # the last checkpoint is of another epoch: not this loop's
                    raise TrainingError(
                        f"a parameter-server shard was lost and the last checkpoint is of epoch {run.epoch}, "
                        f"not {epoch}; resume the run with --resume"
                    ) from None

    def _check_shards(self, ps: Any, ask: bool = False) -> None:
        """Raise :class:`ShardLostError` if a shard's worker has left the cluster (``ask``:
        or a shard does not answer)."""
        from pipeline.ps.shard import ShardedParameterServer

        if not isinstance(ps, ShardedParameterServer):
            return
        alive = self.client.scheduler_info(n_workers=-1)["workers"]
        gone = [a for a, _, _ in ps.shards if a not in alive]
        if gone:
            raise ShardLostError(f"the worker of parameter-server shard {gone[0]} left the cluster")
        if ask:
            ps.ping()

    def _restore_shards(self, ps: Any, run: RunState, exc: Exception) -> Any:
        """Place the job on the ps-shard workers present from the last checkpoint (or the
        initial weights before the first) under a new job id; the training since is redone.
        Waits up to ``no_worker_timeout`` for enough ps-shard workers (a dead one may still be
        listed for a moment: a placement that fails is tried again)."""
        from kernels.mlp import MLPSpec, init_params

        self.warn(f"{exc}; restoring the parameter server from the last checkpoint (training since it is redone)")
        with contextlib.suppress(Exception):
            ps.close()
        ckpt = read_checkpoint(self.run.checkpoint) if self.run.checkpoint.is_file() else None
        if ckpt is not None:
            params, saved = ckpt.params, ckpt.run
        else:
            params = init_params(MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}), seed=self.cfg.seed)
            saved = RunState(run.job, best=BestModel(params=params.copy()), n_threads=run.n_threads)
        for f in dataclasses.fields(RunState):
            if f.name != "last_checkpoint":
                setattr(run, f.name, getattr(saved, f.name))
        from pipeline.ps.shard import shard_workers

        deadline = time.monotonic() + self.cfg.no_worker_timeout
        while True:
            if len(shard_workers(self.client.scheduler_info(n_workers=-1))) >= self.cfg.ps_shards:
                self.job = run.job = f"run-{uuid.uuid4().hex[:12]}"  # no clash with the lost job's tasks
                ps = self._server()
                try:
                    self._create_job(ps, params, run, ckpt)
                except ShardLostError:
                    with contextlib.suppress(Exception):
                        ps.close()
                else:
                    break
            if time.monotonic() > deadline:
                raise TrainingError(
                    f"fewer than ps_shards = {self.cfg.ps_shards} ps-shard workers answered for "
                    f"{self.cfg.no_worker_timeout:.0f} s after a shard was lost; start one with `dask worker "
                    "ADDRESS --resources ps-shard=1` and resume with --resume"
                ) from None
            time.sleep(0.5)
        self.log(f"job {self.job}: restored on shards {[a for a, _, _ in ps.shards]} at epoch {run.epoch}")
        return ps

    def _run_epoch(self, ps: ParameterServer, run: RunState, threads: dict[str, int]) -> dict[str, Any]:
        """Train epoch ``run.epoch`` of the plan on workers with ``threads`` threads each: submit
        its tasks not in ``run.done_tasks``, add them there as they finish, checkpoint every
        ``checkpoint_seconds``; the epoch's summed task results."""
        from distributed import wait

        from pipeline.worker import train_task

        cfg, client, plan = self.cfg, self.client, self.epoch_plan
        epoch, done_tasks, val_ranges = run.epoch, run.done_tasks, plan.val_ranges
        spec, tcfg = self.spec, task_config(cfg)
        work = epoch_work(plan, cfg, epoch, threads, spec, slots=getattr(self, "_split_slots", 0))
        # Sync: the shares run together and the last to leave closes the epoch, so they can
        # validate its final weights themselves, each on a slice of the validation rows, instead
        # of a separate round of tasks (not after a resume mid-epoch: some shares are done).
        in_task_val = cfg.mode == "sync" and bool(val_ranges) and not done_tasks and bool(work)
        work = [w for w in work if w[0] not in done_tasks]
        val_slices = split_rows(val_ranges, len(work)) if in_task_val else [[] for _ in work]
        keys = [f"train-chunk-{name}-{self.job}" for name, _, _ in work]
        # Announce the shares before any of their tasks exists: a task could otherwise start,
        # join and push before the announcement reached the server, and the first share's
        # rounds would close without the shares not yet joined (seen with two jobs at once)
        if cfg.mode == "sync":
            ps.expect(names=[name for name, _, _ in work], keys=keys, epoch=epoch)
        else:
            ps.expect(names=[], keys=[], epoch=epoch)
        futures = {}
        for key, (name, ranges, workers), val_slice in zip(keys, work, val_slices, strict=True):
            futures[key] = (
                name,
                client.submit(
                    train_task,
                    self.job,
                    name,
                    for_workers(self.store_path),
                    ranges,
                    epoch,
                    spec,
                    tcfg,
                    self.target,
                    (
                        {"path": for_workers(self.val_path), "ranges": val_slice, "norm": self.val_norm}
                        if val_slice
                        else None
                    ),
                    key=key,
                    retries=2,
                    pure=False,
                    **self._placement(workers),
                ),
            )
        pending = {f for _, f in futures.values()}
        results: list[dict] = []
        no_workers_since: float | None = None
        bar = Progress(
            f"epoch {epoch + 1}/{cfg.epochs}",
            total=sum(self._train_rows(ranges) for _, ranges, _ in work),
            enabled=self.progress,
            unit="samples",
        )
        samples0 = ps.metrics()["samples"] if self.progress else 0
        try:
            with interrupts_between_polls() as check_interrupt:
                while pending:
                    check_interrupt()
                    try:
                        wait(pending, timeout=1.0, return_when="FIRST_COMPLETED")
                    except TimeoutError:
                        pass  # nothing finished this second: check workers and checkpoints below
                    done = {f for f in pending if f.done()}
                    pending -= done
                    for f in done:
                        if f.status == "error":
                            self._check_shards(ps, ask=True)  # a lost shard fails tasks: restore it
                            exc = f.exception()
                            if isinstance(exc, TrainingError):
                                raise TrainingError(str(exc)) from None
                            if type(exc).__name__ == "KilledWorker":  # the nanny restarted it, more than once
                                died = int(getattr(exc, "allowed_failures", 2)) + 1
                                raise TrainingError(
                                    f"training task {f.key} failed: the {died} worker process(es) that ran it "
                                    "died under it, most often by going over their memory limit; raise "
                                    "--memory-limit, or lower the rows a task holds (--set shuffle_chunks=1 "
                                    "--set prefetch=1, or ingest with a smaller --chunk-rows)"
                                ) from None
                            raise TrainingError(f"training task {f.key} failed: {type(exc).__name__}: {exc}") from exc
                    finished = [f for f in done if f.status == "finished"]
                    if finished:
                        got = self._task_results(ps, finished, futures)
                        lost = next((r["shard_lost"] for r in got if "shard_lost" in r), None)
                        if lost is not None:  # the task stopped on it (pipeline.worker.train_task)
                            raise ShardLostError(lost)
                        failed = next((r["failure"] for r in got if "failure" in r), None)
                        if failed is not None:  # a data error the task returned: the run's error
                            raise failed.error
                        results.extend(got)
                        done_tasks.update(futures[f.key][0] for f in finished)
                        for r in got:  # kept with checkpoints: a resume within the epoch counts their rows
                            run.done_results[r["name"]] = {
                                "samples": r["samples"] + r.get("skipped_samples", 0),
                                "trained": r["samples"],
                                "loss": r["loss"],
                            }
                        for f in finished:
                            # released at once: if its worker dies later, Dask must not rerun
                            # a task whose updates the parameter server already holds
                            f.release()
                    if pending:
                        no_workers_since = self._check_workers(no_workers_since)
                        self._check_shards(ps)
                    if self.progress:
                        m = ps.metrics()
                        bar.set(m["samples"] - samples0, f"loss {m['loss']:.4f}" if m["loss"] is not None else "")
                    if time.monotonic() - run.last_checkpoint > cfg.checkpoint_seconds:
                        self._checkpoint(ps, run)
                check_interrupt()  # one that came during the last poll
        except BaseException:
            client.cancel(list(pending))
            try:
                self._checkpoint(ps, run)
            except Exception:
                logger.debug("checkpoint after failure did not succeed", exc_info=True)
            raise
        bar.clear()
        # the epoch's rows include those an earlier attempt of a task had trained (its worker left,
        # or the run was stopped and resumed inside the epoch) and those of tasks finished before
        # a resume (their results kept by the checkpoint): the server absorbed them
        ran = {r["name"] for r in results}
        before = {n: run.done_results[n] for n in sorted(done_tasks - ran) if n in run.done_results}
        samples, trained, loss = run.epoch_totals(ran)
        val, val_version, validate = None, None, 0.0
        wanted = {name for (name, _, _), sl in zip(work, val_slices, strict=True) if sl}
        got = {r["name"]: r for r in results if "val" in r}
        versions = {got[n]["val_version"] for n in wanted if n in got}
        if in_task_val and set(got) >= wanted and len(versions) == 1:
            # merged in share order: the same sums whichever worker ran which share
            val = finish_metrics(merge_metrics([array_metrics(got[n]["val"]) for n in sorted(wanted)]), self.target)
            val_version, validate = versions.pop(), max(got[n]["validate"] for n in wanted)
        return {
            "val": val,
            "val_version": val_version,
            "validate": validate,
            "tasks": sorted(
                [
                    *(
                        {
                            "name": r["name"],
                            "worker": r["worker"],
                            "samples": r["samples"] + r.get("skipped_samples", 0),
                        }
                        for r in results
                    ),
                    # finished before a stop: the worker that ran them is not recorded
                    *({"name": n, "worker": "", "samples": e["samples"]} for n, e in before.items()),
                ],
                key=lambda t: t["name"],
            ),
            "samples": samples,
            "trained": trained,
            "loss": loss,
            "read": sum(r["read"] for r in results),
            "compute": sum(r["compute"] for r in results),
            "communicate": sum(r["communicate"] for r in results),
        }

    def _task_results(self, ps: ParameterServer, finished: list, futures: dict) -> list[dict]:
        """The summaries of finished training tasks, as their participants left them with the
        parameter server; a task whose summary is missing is asked for its result."""
        names = [futures[f.key][0] for f in finished]
        got = ps.summaries(names)
        return [got[n] if n in got else f.result() for n, f in zip(names, finished, strict=True)]

    def _check_workers(self, since: float | None) -> float | None:
        """Track how long the cluster has had no workers; fail after ``no_worker_timeout``. Workers
        that are all paused (their memory above Dask's pause fraction) start no task: the run
        waits for them, and says why once they have been paused for ``PAUSED_WARNING`` seconds."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if workers:
            self._note_paused(workers)
            return None
        since = since or time.monotonic()
        if time.monotonic() - since > self.cfg.no_worker_timeout:
            raise TrainingError(
                f"no workers for {self.cfg.no_worker_timeout:.0f} s; start workers or "
                "raise no_worker_timeout (a checkpoint was written; use --resume)"
            )
        return since

    def _note_paused(self, workers: dict[str, dict]) -> None:
        """Log once per episode that every worker is paused (Dask's memory pause), and when they run again."""
        paused = all(w.get("status") == "paused" for w in workers.values())
        if not paused:
            if self._paused_since is not None and self._paused_said:
                self.log("the workers run again")
            self._paused_since, self._paused_said = None, False
            return
        now = time.monotonic()
        if self._paused_since is None:
            self._paused_since = now
        if not self._paused_said and now - self._paused_since >= PAUSED_WARNING:
            self.warn(
                f"every worker has been paused for {now - self._paused_since:.0f} s: its memory is above the "
                "fraction of its limit at which Dask starts no task (distributed.worker.memory.pause, 0.8 by "
                "default); the run waits. Raise --memory-limit, or lower the rows a task holds "
                "(--set shuffle_chunks=1 --set prefetch=1)"
            )
            self._paused_said = True

    def _gather(self, futures: list) -> list:
        """``client.gather`` that gives up after ``no_worker_timeout`` without workers."""
        from distributed import wait

        since = None
        while True:
            try:
                wait(futures, timeout=1.0)
            except TimeoutError:
                since = self._check_workers(since)
                continue
            try:
                results = [f.result(timeout=10) for f in futures]
            except TimeoutError:
                continue  # a worker left with a result: Dask recomputes it, wait again
            failed = next((r for r in results if isinstance(r, TaskFailure)), None)
            if failed is not None:  # a data error a task returned (pipeline.worker.validate_task)
                raise failed.error
            return results

    def _evaluate(self, epoch: int, val_ranges: Ranges) -> dict[str, Any]:
        if not val_ranges:
            return {}
        from pipeline.worker import validate_task

        tcfg = task_config(self.cfg)
        groups = group_ranges(val_ranges, 1 << 16)
        futures = [
            self.client.submit(
                validate_task,
                for_workers(self.val_path),
                g,
                None,
                self.job,
                self.spec,
                tcfg,
                self.target,
                self.val_norm,
                key=f"evaluate-e{epoch}-{i}-{self.job}",
                pure=False,
                retries=2,
                **self._placement(None),
            )
            for i, g in enumerate(groups)
        ]
        return finish_metrics(merge_metrics(self._gather(futures)), self.target)

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint(
        self,
        ps: ParameterServer,
        run: RunState,
        state: dict | None = None,
        record: dict | None = None,
    ) -> None:
        """Write ``run`` and the server's ``state`` (fetched if not given) to the run's checkpoint
        (layout: pipeline.checkpoint); tell the server (and its dashboard) about it, with the
        epoch's ``record`` if one is given."""
        st = state if state is not None else ps.state()
        if "rounds" not in st:  # a cluster's server: its rounds and counts so far, for a resumed run's history.json
            m = ps.metrics(history=True)
            # kept here too: the server keeps its latest rounds only, and a round pushed since
            # ``st`` is not the checkpoint's (a resume trains it again)
            self._rounds_before = self._rounds(m, upto=st["version"])
            st = {**st, "rounds": self._rounds_before, **self._counts(m)}
        if st.get("failed"):
            # a diverged job's weights are not a state to resume from: keep the last good one
            logger.info("not checkpointing job %s: %s", self.job, st["failed"])  # the run's error says it
            if record is not None:
                ps.record(epoch=record)
            return
        write_checkpoint(
            self.run.checkpoint,
            run,
            st,
            config=self.cfg.to_dict(),
            store=self.store_path,
            spec=self.spec,
            store_stats=store_stats(self.store),  # a resume on other data is refused
            in_process=self.client is None,  # `pipeline train --resume` continues where it trained
            # the scheduler and TLS files the run was given: the resume command its hints print
            **({"cluster": cluster} if (cluster := cluster_options(self.client)) else {}),
            # the thread count the running epoch's sync shares split over: a resume within it keeps it
            epoch_threads=getattr(self, "_split_slots", run.n_threads),
        )
        run.last_checkpoint = time.monotonic()
        self._checkpointed = True
        ps.record(epoch=record, checkpoint=True)

    def _spent(self, ckpt: Checkpoint | None) -> dict | None:
        """The privacy ``ckpt``'s rounds spent, as this run's accountant goes on from it
        (:func:`pipeline.privacy.resumed_privacy`: every share of a sync epoch takes part in its
        rounds, a sampling rate of 1)."""
        spent = ckpt.meta.get("privacy") if ckpt is not None else None
        released = ckpt.version if ckpt is not None else 0
        return resumed_privacy(spent, self.cfg.dp, self.cfg.noise_multiplier, 1.0, released)

    def _counts(self, metrics: dict[str, Any]) -> dict[str, int]:
        """The deltas the server received (``pushes``) and those summed into another task's push
        (``summed``): those before a resume (kept by the checkpoint) and the server's."""
        return {k: int(self._counts_before.get(k, 0)) + int(metrics.get(k, 0)) for k in ("pushes", "summed")}

    def _rounds(self, metrics: dict[str, Any], upto: int | None = None) -> list[list]:
        """The run's rounds, as many as :func:`pipeline.checkpoint.kept_rounds` keeps: those kept
        before (by the checkpoint resumed, by the last checkpoint written) and the server's of
        later versions (up to version ``upto`` when given)."""
        last = self._rounds_before[-1][1] if self._rounds_before else -1
        rows = metrics.get("history") or ()
        new = [list(r) for r in rows if r[1] > last and (upto is None or r[1] <= upto)]
        return kept_rounds([*self._rounds_before, *new])

    def _load_checkpoint(self) -> Checkpoint:
        path = self.run.checkpoint
        try:
            ckpt = read_checkpoint(path)
        except UnreadableFileError as exc:
            raise damaged_checkpoint(self.run.path, exc) from None
        problem = resume_mismatch(ckpt.meta, self.spec, store_stats(self.store), path, self.store_path)
        problem = problem or holdout_mismatch(ckpt.config, self.cfg, path)
        problem = problem or epoch_plan_mismatch(ckpt.meta, self.cfg, path)
        if problem is not None:
            raise CheckpointError(problem)
        was = ckpt.config.get("server_optimizer", self.cfg.server_optimizer)
        if was != self.cfg.server_optimizer:
            # its moments and step count belong to the optimizer that made them (another one
            # refuses them; adam would take sgd's step count and skip its bias correction)
            self.log(
                f"server optimizer changed since the checkpoint ({was} -> {self.cfg.server_optimizer}): it starts "
                "with a fresh state (the weights' average is kept)"
            )
            buffers = ckpt.optimizer_state.get("buffers") or {}
            ckpt.optimizer_state = {"t": 0, "buffers": {k: v for k, v in buffers.items() if k == "average"}}
        keys = ("optimizer", "lr", "mode")
        changed = [k for k in keys if ckpt.config.get(k) != getattr(self.cfg, k)]
        if ckpt.local_states and changed:
            # a share's local state belongs to the local optimizer that made it
            self.log("local optimizer or mode changed since the checkpoint: shares start with a fresh local state")
            ckpt.local_states = {}
        return ckpt


def damaged_checkpoint(run_dir: Path, exc: UnreadableFileError) -> CheckpointError:
    """The refusal to resume the run in ``run_dir`` whose checkpoint ``exc`` found damaged: a
    run directory keeps one checkpoint, so the fix is a copy of it or a new start (``--force``
    replaces a checkpoint only when it can tell it is this program's)."""
    where = repr(str(run_dir))
    return CheckpointError(f"cannot resume the run in {where}: {exc.problem}; {_damaged_fix(where)}")


def _damaged_fix(where: str) -> str:
    """What to do with the run directory ``where`` (quoted) whose one checkpoint is damaged."""
    return (
        f"restore its checkpoint.npz from a copy, or move checkpoint.npz out of {where} and start the run again "
        "with --force"
    )


_CLUSTER_OPTIONS = {
    "scheduler": "--scheduler",
    "tls_ca_file": "--tls-ca-file",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
}


def cluster_options(client: Any) -> dict[str, str]:
    """The cluster options of ``pipeline train`` that reach the scheduler ``client`` is connected
    to (a checkpoint's ``cluster`` meta): its address and TLS files (absolute paths), or none for
    a cluster the run started (a local one, gone with the run) or a run in this process."""
    if client is None or getattr(client, "cluster", None) is not None:
        return {}
    address = getattr(client.scheduler, "address", None)
    if not isinstance(address, str) or not address:
        return {}
    out = {"scheduler": address}
    security = getattr(client, "security", None)
    for key, attr in (("tls_ca_file", "tls_ca_file"), ("tls_cert", "tls_client_cert"), ("tls_key", "tls_client_key")):
        path = getattr(security, attr, None)
        if address.startswith("tls://") and isinstance(path, str) and os.path.isfile(path):  # not PEM text
            out[key] = os.path.abspath(path)
    return out


def resume_command(store: str, out: str | os.PathLike, cluster: Any = None, sites: bool = False) -> str:
    """The command that continues the run in ``out`` on ``store``, with the cluster options the
    run was given (``cluster``: :func:`cluster_options`, as its checkpoint keeps them): a hint
    copied as it is printed reaches the run's scheduler (with its TLS files) instead of starting
    a local cluster."""
    import shlex

    words = ["pipeline train", *(["--sites"] if sites else []), shlex.quote(str(store))]
    words += ["--out", shlex.quote(str(out)), "--resume"]
    if isinstance(cluster, dict):
        for key, option in _CLUSTER_OPTIONS.items():
            if isinstance(cluster.get(key), str) and cluster[key]:
                words += [option, shlex.quote(cluster[key])]
    return " ".join(words)


def scheduler_lost(client: Any, exc: BaseException, out: Path, store: str, sites: bool = False) -> TrainingError:
    """The error of a run in ``out`` whose Dask scheduler (``client``'s) went away, with the command
    that resumes it there, or on a new scheduler (``--scheduler ADDRESS`` when the address is
    unknown)."""
    where = getattr(client.scheduler, "address", None) or "its address"
    cluster = {"scheduler": "ADDRESS", **cluster_options(client)}
    return TrainingError(
        f"lost the Dask scheduler at {where} and the parameter server in it ({type(exc).__name__}); the last "
        f"checkpoint is in {str(out)!r}: start a scheduler and the workers, then run "
        f"`{resume_command(store, out, cluster, sites=sites)}`"
        + (" (with the new scheduler's address if it changed)" if cluster["scheduler"] != "ADDRESS" else "")
    )


def check_local_out(out: str | os.PathLike) -> None:
    """Refuse a run directory ``out`` that is a URL (``s3://bucket/run``): a run writes its files
    beside their final names and renames them into place, which object stores cannot do, and
    ``Path`` would silently make ``s3:/bucket/run`` of it, a local directory."""
    if is_url(os.fspath(out)):
        raise ConfigError(
            f"--out {os.fspath(out)!r} is a URL; the run directory (model, checkpoint, history) is written to a "
            "local path and renamed into place, which object stores cannot do: name a local directory and copy "
            "it to the bucket afterwards"
        )


def resumed_config(out: str | os.PathLike) -> TrainConfig:
    """The configuration saved in the checkpoint of run directory ``out``."""
    try:
        _, meta = load_file(RunDir(Path(out)).checkpoint, "checkpoint")
    except UnreadableFileError as exc:
        raise damaged_checkpoint(Path(out), exc) from None
    return TrainConfig.from_dict(meta["config"])


def train(
    store: str | None,
    cfg: TrainConfig | None = None,
    out: str | os.PathLike = "runs/latest",
    *,
    client: Any = None,
    resume: bool = False,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train on ``store`` with ``cfg`` on the cluster of ``client``; write the run to ``out``.
    ``client=None`` trains in this process (pipeline.local). With ``cfg.sites`` (a sites
    file) the run is federated (pipeline.federated): ``store`` must be None, every site's
    store is named in the sites file. A run on a cluster refuses ``blas_threads`` other than 1
    (:meth:`pipeline.config.TrainConfig.check_on_cluster`) before it writes anything."""
    check_local_out(out)
    if resume and cfg is None:
        RunDir(Path(out)).check(resume, force)  # say why there is nothing to resume
        cfg = resumed_config(out)
    if cfg is not None and (client is not None or cfg.sites or cfg.clients):
        cfg.check_on_cluster()  # federated and simulated runs start a cluster without a client
    if cfg is not None:
        cfg.check_federated_keys()  # a plain run would ignore them
    if cfg is not None and cfg.sites:
        if store:
            raise ConfigError(
                f"pass either a store ({store!r}) or a sites file ({cfg.sites!r}), not both: a federated run "
                "reads each site's store from the sites file"
            )
        from pipeline.federated import FederatedTrainer

        return FederatedTrainer(
            cfg, out, client, resume=resume, force=force, log=log, on_epoch=on_epoch, progress=progress
        ).fit()
    if not store:
        raise ConfigError("nothing to train on: pass a store, or a sites file (config key 'sites')")
    if cfg is not None and cfg.clients:
        from pipeline.federated import SimulatedTrainer

        return SimulatedTrainer(
            store, cfg, out, client, resume=resume, force=force, log=log, on_epoch=on_epoch, progress=progress
        ).fit()
    if client is None:
        from pipeline.local import LocalTrainer

        cls: type[Trainer] = LocalTrainer
    else:
        cls = Trainer
    return cls(
        store,
        cfg or TrainConfig(),
        out,
        client,
        resume=resume,
        force=force,
        log=log,
        on_epoch=on_epoch,
        progress=progress,
    ).fit()

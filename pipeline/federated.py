"""The federated driver: rounds of sampled sites, each training on its own rows where they are.

A site is the set of Dask workers started with ``--resources SITE=1``; the sites file
(:mod:`pipeline.sites`) says where each site's store is as its workers see it. The driver never
opens a store: it asks every site for its schema and sums (:func:`pipeline.fedclient.site_info`,
run on the site), refuses sites that disagree, and pools the normalization statistics.

It starts as soon as every site has reported, or ``site_grace`` seconds after
``max(min_sites, min_clients)`` sites have (one log line names the sites it starts without);
fewer reports than that within ``no_worker_timeout`` stop it with one line. The statistics and
class counts pooled from the sites that reported are the run's *plan*, fixed for the run (the
model's statistics). The other sites' report tasks stay pending in Dask until a worker with their
resource registers; between rounds (:meth:`FederatedTrainer._poll_late`, never waiting) a site
whose late report agrees with the plan's schema is *admitted* and trains with the plan's
statistics, and one that differs is refused for the run with one line (never sampled). The plan
and the admitted sites, with the round each joined at, are in every checkpoint: ``--resume``
trains with the same statistics and may still admit the others; every admitted site is asked
for its report again and sampled only once it agrees with the plan (one whose store changed is
refused for the run with one line). The checkpoint also records what each admitted site's
report said of its data (rows, class counts, a digest of its sums): a resume whose sites report
other data before its first round (a store ingested again, or another one at that path) is
refused with one line, as an epoch run's resume on other data is; a site whose changed report
comes later is refused for the run. Then, round after round:

1. the *available* sites are the admitted ones with at least one worker holding their resource; the round
   samples ``max(min_clients, ceil(fraction_fit * available))`` of them with a generator seeded
   by ``(seed, round)`` (a resumed run samples the same); central DP accounts the round at
   ``sampled / available`` (fewer live sites: a higher rate, more privacy spent);
2. the parameter server's sync job expects the round's clients; each sampled site runs
   :func:`pipeline.fedclient.fit_client` (``local_epochs`` over its training rows, one delta
   pushed with its sample count, no waiting);
3. the round applies itself when every sampled client has pushed (the weighted mean of the
   deltas, stepped by the strategy's server optimizer), or closes at ``round_deadline`` with
   what arrived if that is at least ``min_responses`` of the sampled clients (else it is
   discarded); unfinished tasks are cancelled, so a site whose workers died holds nothing up;
4. every ``eval_every`` rounds each live site evaluates the model on its own held-out rows:
   per-site loss and metric, their weighted mean (early stopping and the best model follow
   it) and worst decile go into the history, the dashboard and Prometheus.

A site without workers is left out of the sampling until a worker with its resource returns;
the run stops with one line only when fewer than ``min_sites`` admitted sites have workers for
``no_worker_timeout`` seconds. Each round's history record names the sites admitted (``admitted``)
or refused (``refused``) before it; ``history.json`` gives each site's ``admitted_round``. The
run directory is the one :mod:`pipeline.train` writes (lock, ``config.toml``, ``checkpoint.npz``
after every round, ``history.json``, ``model.npz`` with the plan's mean/std and the classes);
``--resume`` continues at the next round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.checkpoint import UnreadableFileError, read_checkpoint, write_checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, ConfigError, PipelineError, StoreError, TrainingError
from pipeline.fedclient import evaluate_client, evaluate_clients, fit_client, fit_clients, site_info
from pipeline.metrics import array_metrics, finish_metrics, merge_metrics
from pipeline.model import Model
from pipeline.privacy import resumed_privacy
from pipeline.ps import ParameterServer
from pipeline.runstate import BestModel, EarlyStopping, RunState
from pipeline.sites import (
    Federation,
    Site,
    clients_per_round,
    pool_sites,
    read_sites,
    sample_clients,
    schema_mismatch,
    site_resources,
    site_spread,
    sites_digest,
)
from pipeline.store import for_workers
from pipeline.train import (
    RunDir,
    TrainResult,
    budget_spent_line,
    build_spec,
    changed,
    check_backend,
    cluster_options,
    damaged_checkpoint,
    holdout_mismatch,
    let_job_tasks_stop,
    privacy_settings,
    resume_mismatch,
    scheduler_lost,
    store_stats,
    task_config,
)

logger = logging.getLogger(__name__)

# strategy -> the server optimizer that steps the (weighted mean, or robust) combination of a
# round's deltas (pipeline.optim): FedAvg / FedProx plain SGD, FedAvgM server momentum, the
# FedOpt family adaptive steps with tau as their adaptivity (FedAdam: Adam without bias
# correction, eps = tau)
_STRATEGY_OPTIMIZER = {
    "fedavg": "sgd",
    "fedprox": "sgd",
    "fedavgm": "momentum",
    "fedadam": "fedadam",
    "fedyogi": "yogi",
    "fedadagrad": "adagrad",
}


def server_optimizer(cfg: TrainConfig) -> dict[str, Any]:
    """The parameter server's optimizer for ``cfg.strategy``, with ``server_lr``,
    ``server_momentum`` (fedavgm), ``server_beta1``/``server_beta2`` and ``server_tau``
    (fedadam, fedyogi, fedadagrad). FedAvg at ``server_lr`` 1.0 makes the new weights the
    sample-weighted mean of the clients' models."""
    return {
        "name": _STRATEGY_OPTIMIZER[cfg.strategy],
        "lr": cfg.server_lr,
        "momentum": cfg.server_momentum,
        "beta1": cfg.server_beta1,
        "beta2": cfg.server_beta2,
        "tau": cfg.server_tau,
        "ema": cfg.ema,
    }


RESULT_TIMEOUT = 10.0  # seconds to fetch a finished task's result before counting it as lost


def fetched(future: Any, timeout: float = RESULT_TIMEOUT) -> Any:
    """A finished task's result, or None when it cannot be had: its worker died before the
    result was fetched (Dask would recompute it, on a worker of the site that may be gone).
    The round goes on without it instead of waiting."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        future.cancel()
        return None
    except Exception:  # the task's own failure: reported as a missing response
        logger.debug("task %s failed after it finished", future.key, exc_info=True)
        return None


def check_federated_mode(cfg: TrainConfig) -> None:
    """Federated runs are sync (rounds) or async (FedBuff: clients replaced as they finish)."""
    if cfg.mode == "ssp":
        raise ConfigError(
            "config key 'mode' = 'ssp' does not apply to federated runs; use 'sync' (rounds) or 'async' (buffered)"
        )
    if cfg.mode == "async" and cfg.aggregator != "mean":
        raise ConfigError(
            f"config key 'aggregator' = {cfg.aggregator!r} needs rounds (mode = 'sync'); asynchronous federated "
            "training combines buffered deltas by their staleness-weighted mean"
        )


def check_federated_config(cfg: TrainConfig, sites: list[Site]) -> None:
    """Refuse settings a federated run of ``sites`` cannot honour (before any cluster work)."""
    if cfg.validation_store:
        raise ConfigError(
            "config key 'validation_store' does not apply to a federated run: each site validates on "
            "its own held-out rows (set validation, e.g. 0.1)"
        )
    check_federated_mode(cfg)
    if cfg.min_sites > len(sites):
        raise ConfigError(
            f"config key 'min_sites' = {cfg.min_sites} exceeds the {len(sites)} site(s) of {cfg.sites!r}; "
            "lower min_sites or add sites"
        )
    if cfg.min_clients > len(sites):
        raise ConfigError(
            f"config key 'min_clients' = {cfg.min_clients} exceeds the {len(sites)} site(s) of {cfg.sites!r}; "
            "lower min_clients or add sites"
        )


def check_epochs_unset(cfg: TrainConfig, unset: int) -> None:
    """Refuse an ``epochs`` set for a federated run, which trains ``rounds`` (each sampled client
    making ``local_epochs`` passes over its rows) and has no use for it: ``unset`` is what
    ``epochs`` is when nobody set it (the default, or a resumed run's saved value)."""
    if cfg.epochs != unset:
        raise ConfigError(
            f"config key 'epochs' = {cfg.epochs} does not apply to a federated run, which trains rounds "
            f"(rounds = {cfg.rounds}); set rounds instead, e.g. --set rounds={cfg.epochs}, and leave epochs out"
        )


def report_data(info: dict[str, Any]) -> dict[str, Any]:
    """What a site's report (:func:`pipeline.fedclient.site_info`) says of its data, as a
    checkpoint records it for each admitted site: its training and held-out rows, its class
    counts and a digest of its feature (and target) sums, what the plan's statistics pool."""
    sums = json.dumps([info.get(k) for k in ("sum", "sumsq", "y_sum", "y_sumsq")])
    return {
        "rows": int(info["count"]),
        "held_out": int(info.get("n_held_out", 0)),
        "class_counts": [int(c) for c in info.get("class_counts") or []],
        "sums": hashlib.sha256(sums.encode()).hexdigest(),
    }


def data_change(saved: dict[str, Any], info: dict[str, Any]) -> str | None:
    """How a site's report ``info`` differs from the :func:`report_data` ``saved`` when it was
    admitted (None: the same data)."""
    now = report_data(info)
    fields = (
        ("rows", "training rows"),
        ("held_out", "held-out rows"),
        ("class_counts", "class counts"),
        ("sums", "feature sums"),
    )
    differ = changed(saved, now, fields)
    if differ is None:
        return None
    rows = f" ({saved['rows']:,} training rows, now {now['rows']:,})" if "training rows" in differ else ""
    return f"its {differ} differ{rows}"


class FederatedTrainer:
    """Runs one federated training on the sites of ``cfg.sites`` (see the module docstring)."""

    def __init__(
        self,
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
        if client is None:
            raise TrainingError("a federated run needs a Dask cluster (--scheduler ADDRESS, or --workers N)")
        self.cfg = cfg
        self._init_clients()
        self.client = client
        self.run = RunDir(Path(out))
        self.resume = resume
        self.force = force
        self.log = log or (lambda msg: logger.info(msg))
        self.on_epoch = on_epoch
        self.progress = progress
        self.job = f"fed-{uuid.uuid4().hex[:12]}"
        self.store_path = ""
        self._inflight: dict[Any, tuple[str, float, int]] = {}  # async: future -> (client, start, version)
        self._per_round = 1
        self._rate = (1, 1)  # the round being run: (clients sampled, candidates they were sampled from)
        self._late: dict[Any, str] = {}  # site_info futures not yet collected -> their site
        self.admitted: dict[str, int] = {}  # site -> the round it joined at (0: the start)
        self.site_rows: dict[str, tuple[int, int]] = {}  # admitted site -> (training rows, held-out rows)
        self.site_data: dict[str, dict] = {}  # admitted site -> report_data of its report when admitted
        self.refused: dict[str, str] = {}  # site -> why its late report was refused
        # --resume: admitted sites whose report has not agreed with the plan in this process yet
        # (never sampled until it has: a store may have changed between the runs)
        self._unchecked: set[str] = set()
        self._resuming = False  # --resume: the admitted sites' reports are checked before the first round
        self._start_round = 0  # the round the run starts (or resumes) at
        self._events: dict[str, Any] = {}  # admissions and refusals since the last round's record
        self._resumed_fed: dict[str, Any] | None = None  # the checkpoint's federated meta (--resume)

    def _init_clients(self) -> None:
        """The clients of the run: here the sites of the sites file."""
        if not self.cfg.sites:
            raise ConfigError("a federated run needs config key 'sites' (a sites file)")
        self.sites = read_sites(self.cfg.sites)
        check_federated_config(self.cfg, self.sites)
        self.digest = sites_digest(self.sites)
        self.store_of = {s.name: s.store for s in self.sites}
        self.fed: Federation | None = None

    # -- main loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
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
                what = self.cfg.sites or self.store_path
                raise scheduler_lost(self.client, exc, self.run.path, what, sites=bool(self.cfg.sites)) from None
            finally:
                self._drop_late()  # the reports of sites that never came: nothing left pending

    def _fit(self) -> TrainResult:
        cfg, client = self.cfg, self.client
        ckpt = self._load_checkpoint() if self.resume else None
        self._resumed_fed = ckpt.meta.get("federated") if ckpt is not None else None
        self._start_round = ckpt.run.epoch if ckpt is not None else 0
        self.run.prepare(self.resume, self.force)
        installed_by = ParameterServer.ensure_installed(client)
        check_backend(cfg.backend, client)
        schema = self._schema()
        self.spec, self.target = build_spec(schema, cfg)
        self.tcfg = {**task_config(cfg), "local_epochs": cfg.local_epochs, "proximal_mu": cfg.proximal_mu}
        from kernels.mlp import MLPSpec, init_params

        if ckpt is not None:
            if ckpt.spec != self.spec:
                raise CheckpointError(
                    f"checkpoint {str(self.run.checkpoint)!r} is for a different model or schema; resume with "
                    "the same sites and model config"
                )
            params, run = ckpt.params, ckpt.run
            self.job = run.job
        else:
            params = init_params(MLPSpec(**{**self.spec, "hidden": tuple(self.spec["hidden"])}), seed=cfg.seed)
            run = RunState(self.job, best=BestModel(params=params.copy()))
        self._per_round = self._clients_per_round()
        buffer_size = (cfg.buffer_size or self._per_round) if cfg.mode == "async" else 0
        buffered = ckpt.buffer if ckpt is not None else None
        if buffered and len(buffered["deltas"]) >= max(1, buffer_size):
            n = len(buffered["deltas"])
            raise CheckpointError(
                f"checkpoint {str(self.run.checkpoint)!r} holds {n} buffered deltas of an asynchronous run, which "
                f"{'mode = ' + repr(cfg.mode) if cfg.mode != 'async' else f'buffer_size = {buffer_size}'} cannot take; "
                f"resume with mode = 'async' and buffer_size > {n}"
            )
        rate = self._per_round / max(1, self._n_clients())  # the base sampling rate of the accountant
        # refused before the config is saved when the checkpoint's rounds cannot be accounted
        spent, released = (ckpt.meta.get("privacy"), int(ckpt.version)) if ckpt else (None, 0)
        spent = resumed_privacy(spent, cfg.dp, cfg.noise_multiplier, rate, released)
        self.run.write_text(self.run.config, cfg.to_toml())
        ps = ParameterServer(self.job, client)
        ps.create(
            params,
            mode=cfg.mode,
            buffer_size=buffer_size,
            buffer=buffered,  # FedBuff: the deltas buffered when the checkpoint was written
            aggregate="mean",  # the deltas' mean weighted by each client's samples
            aggregator=cfg.aggregator,
            trim_fraction=cfg.trim_fraction,
            krum_f=cfg.krum_f,
            optimizer=server_optimizer(cfg),
            schedule={
                "kind": cfg.schedule,
                "warmup": cfg.warmup,
                "step_size": cfg.step_size,
                "gamma": cfg.gamma,
                "total_steps": cfg.rounds,
            },
            version=ckpt.version if ckpt else 0,
            optimizer_state=ckpt.optimizer_state if ckpt else None,
            epoch=run.epoch,
            join_timeout=cfg.round_deadline + cfg.no_worker_timeout,
            compression=cfg.compression,
            topk_fraction=cfg.topk_fraction,
            # the accountant's amplification: the share of the clients sampled in a round when every
            # one is a candidate; a round sampled from fewer is accounted at its own rate (_round)
            privacy=privacy_settings(
                cfg,
                spent,
                rate,
                participants=self._per_round,
            ),
        )
        self.log(
            f"job {self.job}: {self._describe_clients()}, {cfg.rounds} rounds, "
            f"parameter server installed by {installed_by}"
        )
        if cfg.strategy in ("fedadam", "fedyogi", "fedadagrad") and cfg.server_lr >= 0.5:
            self.log(
                f"warning: strategy {cfg.strategy} at server_lr = {cfg.server_lr:g} steps every weight by about "
                "server_lr each round; adaptive server optimizers usually want 0.01 to 0.1"
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
        privacy: dict[str, Any] = {}
        try:
            for rnd in range(run.epoch, cfg.rounds):
                run.epoch = rnd
                t0 = time.perf_counter()
                if cfg.mode == "async":
                    record = self._round_async(ps, run, rnd)
                else:
                    record = self._round(ps, rnd, self._sample(ps, run, rnd))
                if record is None:  # at its sampling rate this round would overspend the privacy budget
                    stopped_early = True
                    privacy = ps.state().get("privacy") or {}
                    self.log(
                        budget_spent_line(privacy, cfg.target_epsilon)
                        + f" (round {rnd + 1} would sample {self._rate[0]} of {self._rate[1]} candidates)"
                    )
                    break
                record.update(self._take_events())  # the sites admitted or refused before this round
                st = ps.state()
                if st.get("failed"):
                    raise TrainingError(str(st["failed"]))
                record["rounds"] = st["version"]
                privacy = st.get("privacy") or {}
                if privacy.get("dp", "off") != "off":
                    # the privacy spent up to this round's model: epsilon at delta over the rounds applied
                    record.update(epsilon=privacy["epsilon"], dp_delta=privacy["delta"], dp_rounds=privacy["rounds"])
                evaluate = (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds
                if evaluate:
                    record.update(self._evaluate_round(rnd))
                record["seconds"] = time.perf_counter() - t0
                run.history.append(record)
                if evaluate:
                    self._compare_over_the_same_sites(stopping, run, record)
                    stopping.epoch = rnd  # patience counts rounds, whatever eval_every
                    stop = stopping.update(record.get("val_loss", record["train_loss"]), self._samples_since(run))
                    if stopping.improved:
                        run.best = BestModel(stopping.best_loss, st["model"], rnd)
                else:
                    stop = False
                run.finish_epoch()
                self._checkpoint(ps, run, st, record)
                if self.on_epoch is not None:
                    self.on_epoch(record)
                if stop:
                    stopped_early = True
                    self.log(f"early stop: no validation improvement for {cfg.patience} rounds")
                    break
                if privacy.get("exhausted"):
                    stopped_early = True
                    self.log(budget_spent_line(privacy, cfg.target_epsilon))
                    break
        except KeyboardInterrupt:
            self.log("interrupted: writing a checkpoint before stopping")
            self._checkpoint(ps, run)
            raise
        except TrainingError:
            self._checkpoint(ps, run)
            raise
        finally:
            stopped = bool(self._inflight)
            if self._inflight:
                self.client.cancel(list(self._inflight))
                self._inflight.clear()
            metrics: dict[str, Any] = {}
            try:
                metrics = ps.metrics(history=True)
                ps.close()
                if stopped:  # a site's fit still computing ends at its next message, "left"
                    let_job_tasks_stop(self.client, self.job)
            except Exception:
                logger.debug("could not close job %s", self.job, exc_info=True)
        model = Model.from_training(schema, self.spec, self.target, run.best.params, cfg, run.history, run.best.epoch)
        model.save(self.run.model)
        history_doc = {
            "job": self.job,
            "installed_by": installed_by,
            "federated": {**self._history_info(), "strategy": cfg.strategy},
            "best_epoch": run.best.epoch,
            "stopped_early": stopped_early,
            "epochs": run.history,
            "rounds": metrics.get("history", []),
            "round_columns": ["time", "version", "loss", "samples", "deltas"],
        }
        privacy = metrics.get("privacy") or privacy
        if privacy.get("dp", "off") == "off" and not privacy.get("secure_aggregation"):
            privacy = {}
        if privacy:
            history_doc["privacy"] = privacy
        self.run.write_json(self.run.history, history_doc)
        return TrainResult(self.run.path, model, run.history, stopped_early, installed_by, run.best.epoch, privacy)

    @staticmethod
    def _samples_since(run: RunState) -> int:
        """Training samples of the rounds since the previous evaluation (the last one included)."""
        total = 0
        for rec in reversed(run.history):
            if rec is not run.history[-1] and "val_loss" in rec:
                break
            total += int(rec.get("samples", 0))
        return total

    # -- the sites (the hooks a simulation overrides) ---------------------------------------

    def _schema(self) -> Federation:
        """The federation the model is built from: pooled from the sites that report at the start
        (:meth:`_site_infos`), or, on ``--resume``, the plan and admitted sites the checkpoint
        holds (no re-pooling). On resume every site is asked for its report again: an admitted
        site is sampled only once its report agrees with the plan (:meth:`_await_checks`, a
        store may have changed between the runs); sites not admitted yet may join later."""
        saved = self._resumed_fed or {}
        plan = saved.get("plan")
        if plan is not None:
            fed = Federation.from_plan(self.cfg.sites, plan)
            for name, entry in (saved.get("admitted") or {}).items():
                if name in self.store_of:
                    self.admitted[name] = int(entry["round"])
                    self.site_rows[name] = (int(entry["rows"]), int(entry["held_out"]))
                    if isinstance(entry.get("data"), dict):  # checkpoints of earlier versions: none
                        self.site_data[name] = entry["data"]
            awaited = sorted(set(self.store_of) - set(self.admitted))
            self._unchecked = set(self.admitted)
            for name in self.store_of:
                self._ask(name)
            if awaited:
                self.log(
                    f"resuming with the admitted site(s) {', '.join(sorted(self.admitted))} and the run's statistics; "
                    f"site(s) {', '.join(awaited)} may join when they report"
                )
            self.fed = fed
            self._await_checks(self._start_round)
        else:  # a new run, or the checkpoint of an earlier version (every site must report, as then)
            infos = self._site_infos(require_all=self._resumed_fed is not None)
            fed = pool_sites(self.cfg.sites, infos)
            self.admitted = dict.fromkeys(sorted(infos), 0)
            self.site_rows = {n: (fed.rows[n], fed.held_out[n]) for n in infos}
            self.site_data = {n: report_data(infos[n]) for n in infos}
            if self._resumed_fed is None:
                self._events["admitted"] = sorted(infos)
        self.fed = fed
        self.norm = fed.norm() if self.cfg.normalize else None
        return fed

    def _describe_clients(self) -> str:
        rows = ", ".join(f"{n} {self.site_rows[n][0]:,}" for n in sorted(self.admitted))
        awaited = sorted(set(self.store_of) - set(self.admitted))
        return f"federated {self.cfg.strategy} over {len(self.admitted)} sites (training rows: {rows})" + (
            f"; awaiting {', '.join(awaited)}" if awaited else ""
        )

    def _history_info(self) -> dict[str, Any]:
        """Each site of the sites file: its store and, once admitted, its rows and the round it
        joined at (``admitted_round``; 0: at the start), else ``admitted_round`` None and why it
        was refused, if it was; ``planned_from``: the sites whose sums made the statistics."""
        assert self.fed is not None
        sites: dict[str, dict[str, Any]] = {}
        for s in self.sites:
            entry: dict[str, Any] = {"store": s.store}
            if s.name in self.admitted:
                rows, held_out = self.site_rows[s.name]
                entry.update(rows=rows, held_out=held_out, admitted_round=self.admitted[s.name])
            else:
                entry["admitted_round"] = None
                if s.name in self.refused:
                    entry["refused"] = self.refused[s.name]
            sites[s.name] = entry
        return {"sites": sites, "planned_from": sorted(self.fed.rows)}

    def _take_events(self) -> dict[str, Any]:
        """The admissions (``admitted``: sites) and refusals (``refused``: site -> why) since the
        last round's record, for the next one."""
        events, self._events = self._events, {}
        return events

    def _sample(self, ps: ParameterServer, run: RunState, rnd: int) -> list[str]:
        """The sites of round ``rnd``: sampled from those with workers now."""
        cfg = self.cfg
        live = self._live_sites(ps, run)
        n = clients_per_round(len(live), cfg.fraction_fit, cfg.min_clients)
        self._rate = (min(n, len(live)), len(live))
        return sample_clients(live, n, cfg.seed, rnd)

    def _n_clients(self) -> int:
        """The clients a round samples from when every one is available (the privacy
        accountant's population)."""
        return len(self.store_of)

    def _clients_per_round(self) -> int:
        """Clients a round samples when every site is available (async: the buffer's default size)."""
        return clients_per_round(self._n_clients(), self.cfg.fraction_fit, self.cfg.min_clients)

    def _candidates(self, ps: ParameterServer, run: RunState) -> list[str]:
        """Async: the clients a new task may be given (the live sites; waits as rounds do)."""
        return self._live_sites(ps, run)

    def _round_keys(self, sampled: list[str], rnd: int, tag: str) -> dict[str, str | None]:
        """The task key of each sampled client (the server drops a participant whose task ends)."""
        return {site: f"fit-{self.job}-r{rnd}-{site}-{tag}" for site in sampled}

    def _participants(self, sampled: list[str], names: dict[str, str], rnd: int) -> dict[str, str]:
        """The parameter server's participant of each sampled client: its own name (a site
        pushes its own delta)."""
        return dict(names)

    def _secure_weights(self, rows: dict[str, int]) -> dict[str, int] | None:
        """Secure aggregation without DP: the round's participants' training rows, with which
        each scales its delta before masking so that the masked sum makes the sample-weighted
        mean of a plain round (:func:`pipeline.secagg.roster_share`); None otherwise (central
        DP combines the deltas with equal weights)."""
        if not self.cfg.secure_aggregation or self.cfg.dp != "off":
            return None
        return {n: int(r) for n, r in rows.items()}

    def _submit_round(
        self,
        sampled: list[str],
        names: dict[str, str],
        keys: dict[str, str | None],
        rnd: int,
        tag: str,
        parts: dict[str, str] | None = None,
    ) -> dict[Any, list[str]]:
        """Submit the round's training tasks: a future -> the clients it trains (one site each)."""
        weights = self._secure_weights({names[s]: self.site_rows[s][0] for s in sampled if s in self.site_rows})
        return {
            self.client.submit(
                fit_client,
                self.job,
                names[site],
                self.store_of[site],
                rnd,
                self.spec,
                self.tcfg,
                self.target,
                self.norm,
                weights=weights,
                key=keys[site],
                resources={site: 1},
                pure=False,
                retries=0,  # a rerun would push twice: a lost client is a missing response
            ): [site]
            for site in sampled
        }

    def _evaluate_round(self, rnd: int) -> dict[str, Any]:
        return self._evaluate(rnd, self._available())

    def _checkpoint_meta(self) -> dict[str, Any]:
        """The sites' fingerprint, the plan (schema and pooled statistics, fixed for the run) and
        the admitted sites with the round each joined at and what its report said of its data
        (:func:`report_data`): a resumed run trains with the same, on the same data."""
        meta: dict[str, Any] = {"sites": self.digest}
        if self.fed is not None:
            meta["plan"] = self.fed.plan()
            meta["admitted"] = {
                n: {
                    "round": r,
                    "rows": self.site_rows[n][0],
                    "held_out": self.site_rows[n][1],
                    **({"data": self.site_data[n]} if n in self.site_data else {}),
                }
                for n, r in sorted(self.admitted.items())
            }
        return meta

    def _available(self) -> list[str]:
        """The admitted sites with at least one worker declaring their resource now (on resume:
        whose report agreed with the plan in this process)."""
        have = site_resources(self.client.scheduler_info(n_workers=-1))
        return sorted(s for s in self.admitted if have.get(s) and s not in self._unchecked)

    def _await_checks(self, rnd: int) -> None:
        """Resume: wait (at most ``no_worker_timeout``) for the reports of the admitted sites that
        have a worker now and check each against the plan (:meth:`_poll_late`), so that the
        first round samples from the same sites as the run would have without the interruption.
        An admitted site without a worker is checked between rounds when its report comes."""
        from distributed import wait

        t0 = time.monotonic()
        self._resuming = True  # a site reporting other data than the checkpoint's refuses the resume
        try:
            while True:
                self._poll_late(rnd)
                have = site_resources(self.client.scheduler_info(n_workers=-1))
                waiting = sorted(s for s in self._unchecked if have.get(s))
                if not waiting:
                    return
                if time.monotonic() - t0 > self.cfg.no_worker_timeout:
                    self.log(
                        f"resuming without site(s) {', '.join(waiting)} for now: no report within "
                        f"{self.cfg.no_worker_timeout:.0f} s; each is sampled again once its report agrees with the "
                        "run's"
                    )
                    return
                try:
                    wait(list(self._late), timeout=0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    pass
        finally:
            self._resuming = False

    def _refuse_other_data(self, name: str, changed: str) -> None:
        """Refuse the resume (before its first round, nothing written): site ``name``, admitted
        before the checkpoint, now reports other data (``changed``, :func:`data_change`)."""
        planned = self.fed is not None and name in self.fed.rows  # one of the sites the statistics pool
        made = "the run's pooled statistics were made from" if planned else "the model was trained on"
        raise CheckpointError(
            f"checkpoint {str(self.run.checkpoint)!r} was trained on other data: site {name!r} reports other data "
            f"than when it was admitted, which {made} ({changed}); its store "
            f"{self.store_of[name]!r} was ingested again, or is another store; resume with the data it started with "
            f"(restore the store of site {name!r}), or start a new run (another --out, or --force to replace "
            f"{str(self.run.path)!r})"
        )

    def _live_sites(self, ps: ParameterServer, run: RunState) -> list[str]:
        """The sites available for this round; waits while fewer than ``min_sites`` (or
        ``min_clients``) have workers, and stops the run after ``no_worker_timeout``."""
        cfg = self.cfg
        need = max(cfg.min_sites, cfg.min_clients)
        since: float | None = None
        while True:
            self._poll_late(run.epoch)
            live = self._available()
            if len(live) >= need:
                return live
            now = time.monotonic()
            # an admitted site without workers or (resume) not checked again yet, or a site whose
            # report has not come (or was refused)
            missing = sorted(set(self.admitted) - set(live) - self._unchecked)
            unchecked = sorted(self._unchecked)
            unadmitted = sorted(set(self.store_of) - set(self.admitted))
            absent = "; ".join(
                ([f"no worker for {', '.join(missing)}"] if missing else [])
                + ([f"report awaited from {', '.join(unchecked)}"] if unchecked else [])
                + ([f"not admitted: {', '.join(unadmitted)}"] if unadmitted else [])
            )
            if since is None:
                since = now
                self.log(
                    f"waiting for sites: {len(live)} of {len(self.store_of)} are admitted with workers, "
                    f"{need} needed ({absent})"
                )
            elif now - since > cfg.no_worker_timeout:
                raise TrainingError(
                    f"only {len(live)} of {len(self.store_of)} sites were admitted with workers for "
                    f"{cfg.no_worker_timeout:.0f} s "
                    f"({absent}), fewer than min_sites = {cfg.min_sites} / min_clients = "
                    f"{cfg.min_clients}; start workers with `dask worker SCHEDULER --resources SITE=1` or lower "
                    "min_sites (a checkpoint was written; use --resume)"
                )
            time.sleep(0.5)

    def _ask(self, name: str) -> None:
        """Submit :func:`site_info` on site ``name`` (it waits in Dask until a worker declares
        the site's resource); :meth:`_reports` collects it."""
        cfg = self.cfg
        holdout = {"fraction": cfg.validation, "seed": cfg.seed} if cfg.validation > 0 else None
        future = self.client.submit(
            site_info,
            self.store_of[name],
            holdout,
            key=f"site-info-{name}-{self.job}-{uuid.uuid4().hex[:6]}",
            resources={name: 1},
            pure=False,
        )
        self._late[future] = name

    def _reports(self) -> list[tuple[str, dict | None, str | None]]:
        """The site reports that have arrived since the last call, by site: ``(site, info,
        None)``, or ``(site, None, why)`` when its task failed (its store cannot be read). A
        report whose worker left before it was fetched is asked for again."""
        out = []
        for future, name in list(self._late.items()):
            if not future.done():
                continue
            del self._late[future]
            if future.status == "error":
                exc = future.exception()
                out.append((name, None, str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"))
                future.release()
                continue
            info = fetched(future) if future.status == "finished" else None
            future.release()
            if info is None:  # lost with its worker (or cancelled): Dask runs it again when the site is back
                self._ask(name)
                continue
            out.append((name, info, None))
        return sorted(out, key=lambda r: r[0])

    def _drop_late(self) -> None:
        """Cancel the reports still awaited (the run is over)."""
        if self._late:
            try:
                self.client.cancel(list(self._late))
            except Exception:  # the scheduler is gone: nothing is pending there any more
                logger.debug("could not cancel the pending site reports", exc_info=True)
            self._late.clear()

    def _site_infos(self, require_all: bool = False) -> dict[str, dict]:
        """The :func:`site_info` of the sites the run starts with, run on each site.

        The run starts as soon as every site has reported, or ``site_grace`` seconds after
        ``max(min_sites, min_clients)`` sites have (at the latest ``no_worker_timeout`` after
        asking, when that many have); the others' reports stay pending and are collected
        between rounds (:meth:`_poll_late`). Fewer than that many within ``no_worker_timeout``
        stops the run with one line; so does a site that reports a store it cannot read or one
        without targets. ``require_all`` (the checkpoint of an earlier version, whose statistics
        pooled every site): every site must report."""
        from distributed import wait

        cfg = self.cfg
        for name in self.store_of:
            self._ask(name)
        need = len(self.store_of) if require_all else max(cfg.min_sites, cfg.min_clients)
        infos: dict[str, dict] = {}
        t0 = time.monotonic()
        quorum: float | None = None
        announced = False
        while True:
            try:
                wait(list(self._late), timeout=0.5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            for name, info, error in self._reports():
                if error is not None:
                    raise StoreError(
                        f"site {name!r} cannot read its store {self.store_of[name]!r} ({error}); fix its path in "
                        f"{cfg.sites!r}: it is the path as that site's workers see it"
                    )
                if not info or not info.get("labelled", True):
                    raise StoreError(
                        f"site {name!r}'s store {self.store_of[name]!r} has no targets (ingested with --unlabelled); "
                        "every site trains on a labelled store"
                    )
                infos[name] = info
            pending = sorted(set(self.store_of) - set(infos))
            if not pending:
                return infos
            now = time.monotonic()
            if len(infos) >= need:
                quorum = now if quorum is None else quorum
                if now - quorum >= cfg.site_grace or now - t0 >= cfg.no_worker_timeout:
                    break
            elif now - t0 > cfg.no_worker_timeout:
                if require_all:
                    raise TrainingError(
                        f"site(s) {', '.join(pending)} of {cfg.sites!r} did not report within "
                        f"{cfg.no_worker_timeout:.0f} s: no worker declares their resource; start one per site "
                        "with `dask worker SCHEDULER --resources SITE=1`"
                    )
                raise TrainingError(
                    f"only {len(infos)} of {len(self.store_of)} sites of {cfg.sites!r} reported within "
                    f"{cfg.no_worker_timeout:.0f} s (none from {', '.join(pending)}), fewer than min_sites = "
                    f"{cfg.min_sites} / min_clients = {cfg.min_clients}; start a worker per site with "
                    "`dask worker SCHEDULER --resources SITE=1` or lower min_sites"
                )
            if not announced:
                self.log(f"waiting for the first report of site(s) {', '.join(pending)}")
                announced = True
        self.log(
            f"starting with {len(infos)} of {len(self.store_of)} sites: no report from site(s) {', '.join(pending)} "
            f"within {time.monotonic() - t0:.0f} s; each joins the run when a worker with its resource reports a "
            "store of the same schema"
        )
        return infos

    def _poll_late(self, rnd: int) -> None:
        """Admit or refuse the sites whose first report arrived since the last look (between
        rounds; never waits). A site whose schema agrees with the run's (:func:`schema_mismatch`,
        the check the start makes) is admitted from round ``rnd`` on and trains with the run's
        statistics; one that differs, cannot read its store or has no targets is refused for
        this run with one line (it is never sampled). A site admitted before a checkpoint
        (``--resume``) is checked alike: it is sampled again once its report agrees, and is
        refused for this run, with one line, when its store has changed."""
        if not self._late or self.fed is None:
            return
        for name, info, error in self._reports():
            if error is not None:
                problem = f"it cannot read its store {self.store_of[name]!r} ({error})"
            elif not info or not info.get("labelled", True):
                problem = f"its store {self.store_of[name]!r} has no targets (ingested with --unlabelled)"
            else:
                diff = schema_mismatch(self.fed.schema(), info)
                problem = f"its store {diff}" if diff else None
            readmitted = name in self._unchecked
            self._unchecked.discard(name)
            changed = None  # a site of the checkpoint whose store holds other data than when it was admitted
            if problem is None and readmitted and info is not None and name in self.site_data:
                changed = data_change(self.site_data[name], info)
                if changed is not None:
                    if self._resuming:  # before the first round: the resume is refused
                        self._refuse_other_data(name, changed)
                    problem = f"{changed} from its report when it was admitted"
            if problem is not None:
                self.refused[name] = problem
                self._events.setdefault("refused", {})[name] = problem
                if readmitted:  # its store changed since it was admitted: out of the run, and of the checkpoint
                    since = self.admitted.pop(name)
                    self.site_rows.pop(name, None)
                    self.site_data.pop(name, None)
                    fix = "its store" if changed else "its store, or ingest it with --like a reference store,"
                    self.log(
                        f"warning: site {name!r}, admitted at round {since + 1} before the checkpoint, reported before "
                        f"round {rnd + 1} and is refused for this run: {problem}; the run goes on without it (restore "
                        f"{fix} so that it can join a resumed run)"
                    )
                    continue
                self.log(
                    f"warning: site {name!r} reported before round {rnd + 1} and is refused for this run: {problem}; "
                    "the run goes on without it (ingest its store with --like a reference store so that it can join "
                    "a resumed run)"
                )
                continue
            if readmitted:  # the plan's site as before: sampled again (a checkpoint of an earlier version
                # records no data to check: its rows may have grown)
                self.site_rows[name] = (int(info["count"]), int(info.get("n_held_out", 0)))
                self.site_data.setdefault(name, report_data(info))
                continue
            self.admitted[name] = rnd
            self.site_rows[name] = (int(info["count"]), int(info.get("n_held_out", 0)))
            self.site_data[name] = report_data(info)
            self._events.setdefault("admitted", []).append(name)
            self.log(
                f"site {name} reported and joins the run at round {rnd + 1} ({int(info['count']):,} training rows, "
                "trained with the run's statistics)"
            )

    # -- one round -------------------------------------------------------------------------

    def _round(self, ps: ParameterServer, rnd: int, sampled: list[str]) -> dict[str, Any] | None:
        """Run round ``rnd`` with the ``sampled`` sites; its history record (``candidates``: how
        many sites or clients they were sampled from). Central DP accounts the round at its
        own sampling rate, ``sampled / candidates``: None, nothing run, when at that rate the
        round would take epsilon above ``target_epsilon``."""
        from distributed import wait

        cfg, client = self.cfg, self.client
        names = {site: f"r{rnd}-{site}" for site in sampled}  # a site's name, or c<k> (simulated)
        tag = uuid.uuid4().hex[:6]  # fresh keys: a resumed round is not an old one
        keys = self._round_keys(sampled, rnd, tag)
        # the server's participant of each client: itself, or the task that folds its delta
        parts = self._participants(sampled, names, rnd)
        first = {}
        for s in sampled:
            first.setdefault(parts[s], s)
        counts = {p: n for p in first if (n := sum(1 for s in sampled if parts[s] == p)) > 1}
        n_sampled, candidates = self._rate
        rate = n_sampled / candidates if cfg.dp == "central" and candidates else None
        reply = ps.expect(names=list(first), keys=[keys[s] for s in first.values()], epoch=rnd, sampling_rate=rate)
        if reply.get("exhausted"):
            return None
        v0 = int(reply["version"])
        futures = self._submit_round(sampled, names, keys, rnd, tag, parts)
        deadline = time.monotonic() + cfg.round_deadline
        pending = set(futures)
        try:
            while pending and time.monotonic() < deadline:
                try:
                    wait(
                        list(pending),
                        timeout=min(1.0, max(0.05, deadline - time.monotonic())),
                        return_when="FIRST_COMPLETED",
                    )
                except TimeoutError:
                    pass
                pending = {f for f in pending if not f.done()}
                if pending and int(ps.metrics()["version"]) > v0:
                    # every client still in the round has pushed: it applied itself; those
                    # still running are leaving (their summaries), or lost with their worker
                    try:
                        wait(list(pending), timeout=min(2.0, max(0.05, deadline - time.monotonic())))
                    except TimeoutError:
                        pass
                    break
        finally:
            need = max(1, math.ceil(cfg.min_responses * len(sampled)))
            closed = ps.close_round(need, counts)
            unfinished = [f for f in futures if not f.done()]
            if unfinished:
                client.cancel(unfinished)
        # a participant standing for several clients (a folded task) leaves no summary with the
        # server: its task's result carries them, so there is nothing to ask for
        folded = any(parts[s] != names[s] for s in sampled)
        summaries = {} if folded else ps.summaries(list(names.values()))
        errors: dict[str, str] = {}
        results: dict[str, dict] = {}
        for f, group in futures.items():
            got: dict[str, dict] = {}
            if f.status == "finished" and (r := fetched(f)) is not None:
                got = r["clients"] if "clients" in r else {names[group[0]]: r}
            elif f.status == "error":
                exc = f.exception()
                msg = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
                errors.update({site: msg for site in group if names[site] not in summaries})
            for site in group:
                name = names[site]
                if name in summaries:
                    results[site] = summaries[name]
                elif name in got:
                    results[site] = got[name]
            f.release()
        applied = int(closed["version"]) > v0
        # whose deltas the round combined: the server's word (a client that pushed may not have
        # left its summary yet when the round applied itself)
        combined = set(closed["last_applied"] if applied else closed["arrived"])
        responded = sorted(s for s in sampled if parts[s] in combined)
        known = [s for s in responded if s in results]
        for site, err in sorted(errors.items()):
            self.log(f"warning: site {site} failed in round {rnd + 1}: {err}")
        if errors and len(errors) == len(sampled):
            raise TrainingError(
                f"every sampled site failed in round {rnd + 1}; site {min(errors)}: {errors[min(errors)]}"
            )
        samples = sum(int(results[s]["samples"]) for s in known)
        loss = sum(float(results[s]["loss"]) * int(results[s]["samples"]) for s in known) / max(samples, 1)
        missing = sorted(set(sampled) - set(responded))
        if len(sampled) <= 8:
            who = f"sampled {', '.join(sampled)}; responded {', '.join(responded) or 'none'}" + (
                f" (no response from {', '.join(missing)})" if missing else ""
            )
        else:  # many (simulated) clients: counts
            who = f"sampled {len(sampled)} clients; {len(responded)} responded"
        self.log(
            f"round {rnd + 1}/{cfg.rounds}: {who}"
            + (
                f"; applied, version {closed['version']}"
                if applied
                else f"; discarded ({len(responded)} of {need} needed)"
            )
        )
        return {
            "epoch": rnd,
            "round": rnd,
            "sampled": list(sampled),
            "candidates": candidates,
            "responded": responded,
            "applied": applied,
            "samples": samples,
            "train_loss": loss if known else float("nan"),
            "tasks": [
                {"name": names[s], "site": s, "worker": results[s].get("worker"), "samples": results[s]["samples"]}
                for s in known
            ],
        }

    # -- asynchronous federated training ---------------------------------------------------

    def _round_async(self, ps: ParameterServer, run: RunState, rnd: int) -> dict[str, Any]:
        """Round ``rnd`` of asynchronous federated training: ``concurrency`` clients (default: a
        round's worth) train at once; each one that finishes is replaced by a newly sampled one
        (at most one task per client at a time) and its delta joins the server's buffer (FedBuff:
        one step per ``buffer_size`` deltas, each weighted by ``1 / sqrt(1 + staleness)``). The
        round is over once ``clients per round`` clients have finished (those finishing at the
        same moment count too); a task running longer than ``round_deadline`` is cancelled;
        tasks still running carry over into the next round."""
        from distributed import wait

        cfg = self.cfg
        per_round = self._per_round
        concurrency = cfg.concurrency or per_round
        rng = np.random.default_rng([cfg.seed, rnd, 7919])
        self._draws = 0  # simulated clients' candidate draws count within the round: a resumed round draws alike
        ps.expect(names=[], keys=[], epoch=rnd)  # the dashboard's round counter
        submitted: list[str] = []
        results: dict[str, dict] = {}
        done_clients: list[str] = []
        lost: list[str] = []
        errors: dict[str, str] = {}
        seq = 0
        while len(done_clients) + len(lost) < per_round:
            busy = {c for c, _, _ in self._inflight.values()}
            if len(self._inflight) < concurrency:
                free = [c for c in self._candidates(ps, run) if c not in busy]
                for c in rng.permutation(len(free))[: concurrency - len(self._inflight)]:
                    client_name = free[int(c)]
                    tag = uuid.uuid4().hex[:6]
                    name = f"a{rnd}-{seq}-{client_name}"
                    seq += 1
                    for f in self._submit_round([client_name], {client_name: name}, {client_name: None}, rnd, tag):
                        self._inflight[f] = (client_name, time.monotonic(), seq)
                    submitted.append(client_name)
            if not self._inflight:
                time.sleep(0.5)
                continue
            try:
                wait(list(self._inflight), timeout=1.0, return_when="FIRST_COMPLETED")
            except TimeoutError:
                pass
            now = time.monotonic()
            for f in list(self._inflight):
                client_name, started, _ = self._inflight[f]
                if f.done():
                    del self._inflight[f]
                    r = fetched(f) if f.status == "finished" else None
                    if r is not None:
                        summary = next(iter(r["clients"].values())) if "clients" in r else r
                        if not summary.get("late"):
                            results[client_name] = summary
                            done_clients.append(client_name)
                            continue
                    if f.status == "error":
                        exc = f.exception()
                        errors[client_name] = (
                            str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
                        )
                    lost.append(client_name)
                    f.release()
                elif now - started > cfg.round_deadline:  # its worker died, or it is far too slow
                    del self._inflight[f]
                    self.client.cancel([f])
                    lost.append(client_name)
            if errors and not done_clients and len(errors) >= per_round:
                first = min(errors)
                raise TrainingError(f"every client failed in round {rnd + 1}; {first}: {errors[first]}")
        for client_name, err in sorted(errors.items()):
            self.log(f"warning: {client_name} failed in round {rnd + 1}: {err}")
        samples = sum(int(results[c]["samples"]) for c in done_clients)
        loss = sum(float(results[c]["loss"]) * int(results[c]["samples"]) for c in done_clients) / max(samples, 1)
        version = int(ps.metrics()["version"])
        many = len(self.store_of) > 8 if self.store_of else True
        self.log(
            f"round {rnd + 1}/{cfg.rounds} (async): "
            + (
                f"{len(done_clients)} clients finished, {len(lost)} lost"
                if many
                else f"finished {', '.join(done_clients) or 'none'}" + (f"; lost {', '.join(lost)}" if lost else "")
            )
            + f"; version {version}"
        )
        return {
            "epoch": rnd,
            "round": rnd,
            "sampled": len(submitted) if many else sorted(set(submitted)),
            "responded": len(done_clients) if many else sorted(set(done_clients)),
            "applied": True,
            "samples": samples,
            "train_loss": loss if done_clients else float("nan"),
        }

    # -- per-site evaluation ---------------------------------------------------------------

    def _compare_over_the_same_sites(self, stopping: EarlyStopping, run: RunState, record: dict[str, Any]) -> None:
        """The best round is the one of lowest validation loss among rounds evaluated on the
        same sites: a loss pooled over other sites (one joined, one left) is not comparable, and
        the model kept could otherwise predate a site it never trained on. When the evaluated
        sites change, the comparison (and the patience) starts again with this round."""
        sites = sorted(record.get("sites") or {})
        if not sites or run.best.epoch < 0:
            return
        best = next((h for h in reversed(run.history) if h.get("round") == run.best.epoch), None)
        before = sorted((best or {}).get("sites") or {})
        if not before or before == sites:
            return
        self.log(
            f"round {record['round'] + 1}: validated on sites {', '.join(sites)} (the best round so far, "
            f"{run.best.epoch + 1}, on {', '.join(before)}): the best model is chosen among rounds validated on "
            "these sites from now on"
        )
        stopping.best_loss, stopping.best_epoch = math.inf, -1

    def _evaluate(self, rnd: int, sites: list[str]) -> dict[str, Any]:
        """Each live site's metrics on its own held-out rows, their pooled values (``val_*``)
        and spread (``site_mean``, ``site_worst_decile``); sites that do not answer within
        ``round_deadline`` are left out of this evaluation."""
        from distributed import wait

        if not sites:
            return {}
        tag = uuid.uuid4().hex[:6]
        futures = {
            self.client.submit(
                evaluate_client,
                self.job,
                self.store_of[site],
                self.spec,
                self.tcfg,
                self.target,
                self.norm,
                key=f"evaluate-{self.job}-r{rnd}-{site}-{tag}",
                resources={site: 1},
                pure=False,
            ): site
            for site in sites
        }
        try:
            wait(list(futures), timeout=self.cfg.round_deadline)
        except TimeoutError:
            pass
        late = [f for f in futures if not f.done()]
        if late:
            self.client.cancel(late)
        metric = "accuracy" if self.target is None else "r2"
        per_site: dict[str, dict[str, Any]] = {}
        parts = []
        for f, site in sorted(futures.items(), key=lambda kv: kv[1]):
            r = fetched(f) if f.status == "finished" else None
            if r is None:
                continue
            sums = array_metrics(r["sums"])
            m = finish_metrics(sums, self.target)
            if not m.get("n"):
                continue
            parts.append(sums)
            per_site[site] = {"loss": m["loss"], "metric": m[metric], "n": m["n"]}
            f.release()
        if not parts:
            return {}
        pooled = finish_metrics(merge_metrics(parts), self.target)
        spread = site_spread({s: {**v, metric: v["metric"]} for s, v in per_site.items()}, metric)
        return {
            **{f"val_{k}": v for k, v in pooled.items() if k != "confusion"},
            "sites": per_site,
            **spread,
        }

    # -- checkpoints -----------------------------------------------------------------------

    def _checkpoint(
        self, ps: ParameterServer, run: RunState, state: dict | None = None, record: dict | None = None
    ) -> None:
        """Write ``run`` and the server's state to the run's checkpoint (the round, the
        sites' fingerprint); tell the server, with the round's ``record`` if given."""
        try:
            st = state if state is not None else ps.state()
        except Exception:
            logger.debug("no state for a checkpoint of job %s", self.job, exc_info=True)
            return
        shown = None
        if record is not None:
            shown = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            if "sites" in record:
                shown["sites"] = record["sites"]
        if st.get("failed"):
            logger.info("not checkpointing job %s: %s", self.job, st["failed"])  # the run's error says it
            if shown is not None:
                ps.record(epoch=shown)
            return
        write_checkpoint(
            self.run.checkpoint,
            run,
            st,
            config=self.cfg.to_dict(),
            store=self.cfg.sites or self.store_path,
            spec=self.spec,
            in_process=False,
            federated=self._checkpoint_meta(),
            **self._data_meta(),
            **({"cluster": cluster} if (cluster := cluster_options(self.client)) else {}),
        )
        run.last_checkpoint = time.monotonic()
        ps.record(epoch=shown, checkpoint=True)

    def _data_meta(self) -> dict[str, Any]:
        """What a checkpoint records of the data besides the federated meta (a run of sites:
        the sites' reports, in the admitted sites of :meth:`_checkpoint_meta`)."""
        return {}

    def _load_checkpoint(self) -> Any:
        path = self.run.checkpoint
        try:
            ckpt = read_checkpoint(path)
        except UnreadableFileError as exc:
            raise damaged_checkpoint(self.run.path, exc) from None
        fed = ckpt.meta.get("federated")
        if not isinstance(fed, dict):
            raise CheckpointError(
                f"checkpoint {str(path)!r} is of a run that was not federated; resume it without --sites"
            )
        if fed.get("sites") != self.digest:
            raise CheckpointError(
                f"the sites file {self.cfg.sites!r} names other sites or store paths than the run in "
                f"{str(self.run.path)!r} was trained on; resume with the sites file it was started with, "
                "or start a new run (--force)"
            )
        return ckpt


# --------------------------------------------------------------------------------------------
# Simulated clients: row-index views of one store
# --------------------------------------------------------------------------------------------

EVAL_GROUP_ROWS = 1 << 16  # rows of the clients one evaluation task scores


def sample_indices(n_clients: int, n: int, seed: int, round_: int) -> np.ndarray:
    """``n`` of clients ``0 .. n_clients - 1`` (sorted), drawn by a generator seeded with
    ``(seed, round)``: without a list of the clients, whatever their number."""
    if n >= n_clients:
        return np.arange(n_clients)
    rng = np.random.default_rng([int(seed), int(round_), 15485863])
    return np.sort(rng.choice(n_clients, size=n, replace=False))


def client_groups(sizes: np.ndarray, rows: int = EVAL_GROUP_ROWS) -> list[tuple[int, int]]:
    """Consecutive clients in groups of about ``rows`` rows (a client never split): ``(first, stop)``."""
    groups, first, total = [], 0, 0
    for k, size in enumerate(np.asarray(sizes).tolist()):
        if total and total + size > rows:
            groups.append((first, k))
            first, total = k, 0
        total += size
    if first < len(sizes):
        groups.append((first, len(sizes)))
    return groups


class SimulatedTrainer(FederatedTrainer):
    """Federated training of ``cfg.clients`` simulated clients on one store: client ``k`` is a
    row-index view of it from a partition (``cfg.partition``) computed once, out of core, into
    ``OUT/partition/`` (a resumed run reuses it, refuses one made with other settings, and makes it
    again when it was made for other rows: :meth:`pipeline.partition.Partition.stale_for`). Its
    checkpoints record the store's statistics (:func:`pipeline.train.store_stats`): a resume on
    other data is refused as an epoch run's is (:func:`pipeline.train.resume_mismatch`). The sampled
    clients run in ordinary tasks on any worker, a group of them per task reading only their
    rows (and, :meth:`_folds`, pushing one weighted-mean delta for the group); the driver holds the
    partition's offsets and sizes and per-client metric arrays (written to
    ``OUT/clients.npz``), never a Python object per client, so its memory does not grow with
    the number of clients beyond a few numbers each."""

    def __init__(self, store: str, cfg: TrainConfig, out: str | os.PathLike, client: Any, **kw: Any) -> None:
        self._store_arg = str(store)
        super().__init__(cfg, out, client, **kw)
        self.store_path = self._store_arg

    def _init_clients(self) -> None:
        cfg = self.cfg
        if cfg.clients <= 0:
            raise ConfigError("a simulated federated run needs config key 'clients' > 0")
        if cfg.validation_store:
            raise ConfigError(
                "config key 'validation_store' does not apply to simulated clients: the store's held-out rows "
                "(validation) validate the model"
            )
        check_federated_mode(cfg)
        if cfg.min_clients > cfg.clients:
            raise ConfigError(
                f"config key 'min_clients' = {cfg.min_clients} exceeds clients = {cfg.clients}; lower min_clients"
            )
        from pipeline.store import open_store

        self.store_of: dict[str, str] = {}  # no sites
        self._draws = 0
        self._threads: int | None = None  # worker threads when the round was sampled
        self.store = open_store(self._store_arg)
        if self.store.attrs.get("labelled") is False:
            raise StoreError(
                f"store {self._store_arg!r} has no targets (ingested with --unlabelled); train on a labelled store"
            )
        self.stats = store_stats(self.store)  # in every checkpoint: a resume on other data is refused

    @property
    def partition_dir(self) -> Path:
        return self.run.path / "partition"

    def _held_out(self) -> tuple[float, int] | None:
        return (self.cfg.validation, self.cfg.seed) if self.cfg.validation > 0 else None

    def _schema(self) -> Any:
        from pipeline.partition import make_partition, open_partition

        cfg = self.cfg
        args = {
            "alpha": cfg.partition_alpha,
            "classes": cfg.partition_classes,
            "column": cfg.partition_column,
            "seed": cfg.seed,
            "exclude_held_out": self._held_out(),
        }
        part = None
        if self.resume and (self.partition_dir / "meta.json").is_file():
            part = open_partition(self.partition_dir)
            # a partition of other rows (the store written again since) is never used: it is made again
            stale = part.stale_for(self.store)
            problem = part.mismatch(self.store, cfg.clients, cfg.partition, **args)
            if problem and problem != stale:  # made with other settings
                raise CheckpointError(
                    f"the partition in {str(self.partition_dir)!r} was made otherwise ({problem}); resume with the "
                    "settings the run started with, or start a new run (--force)"
                )
            if stale:
                self.log(f"the partition in {str(self.partition_dir)!r} {stale}: partitioning the store again")
                part = None
        if part is None:
            t0 = time.perf_counter()
            part = make_partition(self.store, cfg.clients, cfg.partition, **args, out=self.partition_dir, force=True)
            self.log(
                f"partition: {part.n_clients:,} clients ({cfg.partition}) of {self.store.n_rows:,} rows in "
                f"{time.perf_counter() - t0:.1f} s, kept in {str(self.partition_dir)!r}"
            )
        self.partition = part
        self.sizes = part.sizes()  # (n_clients,) int64: what the driver keeps per client
        self.norm = None  # the tasks standardize with the store's own statistics
        return self.store

    def _describe_clients(self) -> str:
        sizes = self.sizes
        return (
            f"federated {self.cfg.strategy} over {len(sizes):,} simulated clients ({self.cfg.partition}; rows per "
            f"client {int(sizes.min()):,} to {int(sizes.max()):,})"
        )

    def _history_info(self) -> dict[str, Any]:
        sizes = self.sizes
        return {
            "clients": int(len(sizes)),
            "partition": self.cfg.partition,
            "rows_per_client": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        }

    def _sample(self, ps: ParameterServer, run: RunState, rnd: int) -> list[str]:
        cfg = self.cfg
        live = np.flatnonzero(self.sizes > 0)  # a client without rows has nothing to train on
        n = clients_per_round(len(live), cfg.fraction_fit, cfg.min_clients)
        picked = live[sample_indices(len(live), n, cfg.seed, rnd)]
        self._rate = (len(picked), len(live))  # every client with rows is a candidate
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if not workers:
            self._wait_for_workers()
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
        # the round's groups are cut by these threads (one look at the cluster per round)
        self._threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        return [f"c{int(k)}" for k in picked]

    def _wait_for_workers(self) -> None:
        since = time.monotonic()
        while not self.client.scheduler_info(n_workers=-1)["workers"]:
            if time.monotonic() - since > self.cfg.no_worker_timeout:
                raise TrainingError(
                    f"no workers for {self.cfg.no_worker_timeout:.0f} s; start workers or raise no_worker_timeout "
                    "(a checkpoint was written; use --resume)"
                )
            time.sleep(0.5)

    def _n_clients(self) -> int:
        return int(np.count_nonzero(self.sizes))

    def _clients_per_round(self) -> int:
        return clients_per_round(self._n_clients(), self.cfg.fraction_fit, self.cfg.min_clients)

    def _candidates(self, ps: ParameterServer, run: RunState) -> list[str]:
        """Async: a few clients drawn from all of them (never a list of every client)."""
        if not self.client.scheduler_info(n_workers=-1)["workers"]:
            self._wait_for_workers()
        live = np.flatnonzero(self.sizes > 0)
        want = min(len(live), 2 * (self.cfg.concurrency or self._per_round) + 8)
        self._draws += 1
        rng = np.random.default_rng([self.cfg.seed, run.epoch, self._draws, 104723])
        return [f"c{int(k)}" for k in live[rng.choice(len(live), size=want, replace=False)]]

    def _round_keys(self, sampled: list[str], rnd: int, tag: str) -> dict[str, str | None]:
        return dict.fromkeys(sampled)  # several clients per task: none is its task

    def _folds(self) -> bool:
        """Whether a task pushes its clients' deltas folded into one: the server takes their
        plain sample-weighted mean (sync rounds, ``aggregator = "mean"``, no differential
        privacy, no secure aggregation). Robust aggregators, DP and secure aggregation need
        each client's own delta."""
        cfg = self.cfg
        return cfg.mode == "sync" and cfg.aggregator == "mean" and cfg.dp == "off" and not cfg.secure_aggregation

    def _groups(self, sampled: list[str]) -> list[list[str]]:
        """The sampled clients in groups, one task each, of about ``EVAL_GROUP_ROWS`` rows and
        at least one group per worker thread."""
        threads = self._threads  # counted by this round's _sample
        if threads is None:
            workers = self.client.scheduler_info(n_workers=-1)["workers"]
            threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
        ks = np.array([int(c[1:]) for c in sampled], np.int64)
        rows = int(self.sizes[ks].sum())
        n_groups = max(1, min(len(sampled), max(threads, math.ceil(rows / EVAL_GROUP_ROWS))))
        return [[sampled[i] for i in part] for part in np.array_split(np.arange(len(sampled)), n_groups)]

    def _participants(self, sampled: list[str], names: dict[str, str], rnd: int) -> dict[str, str]:
        """Folding (:meth:`_folds`): the clients of a group share the group's participant
        (``r<round>-g<group>``); else each client is its own."""
        if not self._folds():
            return dict(names)
        return {c: f"r{rnd}-g{g}" for g, group in enumerate(self._groups(sampled)) for c in group}

    def _submit_round(
        self,
        sampled: list[str],
        names: dict[str, str],
        keys: dict[str, str | None],
        rnd: int,
        tag: str,
        parts: dict[str, str] | None = None,
    ) -> dict[Any, list[str]]:
        """The sampled clients in groups (:meth:`_groups`; with ``parts``, a task per
        participant): a task trains its clients one after the other, each joining, pushing its
        one delta and leaving as its own participant, or, folding, as one participant pushing
        the group's weighted mean delta (:func:`pipeline.fedclient.fit_clients`)."""
        folded = parts is not None and any(parts[c] != names[c] for c in sampled)
        if folded:
            assert parts is not None
            by: dict[str, list[str]] = {}
            for c in sampled:
                by.setdefault(parts[c], []).append(c)
            groups = list(by.values())
        else:
            groups = self._groups(sampled)
        futures = {}
        for g, group in enumerate(groups):
            futures[
                self.client.submit(
                    fit_clients,
                    self.job,
                    [names[c] for c in group],
                    [int(c[1:]) for c in group],
                    for_workers(self.store_path),
                    for_workers(self.partition_dir),
                    rnd,
                    self.spec,
                    self.tcfg,
                    self.target,
                    parts[group[0]] if folded and parts is not None else None,
                    key=f"fit-{self.job}-r{rnd}-g{g}-{tag}",
                    pure=False,
                    retries=0,
                )
            ] = group
        return futures

    def _round(self, ps: ParameterServer, rnd: int, sampled: list[str]) -> dict[str, Any] | None:
        record = super()._round(ps, rnd, sampled)
        if record is None:
            return None
        # counts, not lists: a round may sample thousands of clients
        record["sampled"] = len(record["sampled"])
        record["responded"] = len(record["responded"])
        record.pop("tasks", None)
        return record

    def _evaluate_round(self, rnd: int) -> dict[str, Any]:
        """The store's held-out rows (``val_*``: early stopping, the best model) and every
        client's own rows in groups of about 64k rows: the spread over clients
        (``site_mean`` weighted by rows, ``site_worst_decile``); the per-client arrays go to
        ``OUT/clients.npz``."""
        from distributed import wait

        from pipeline.plan import VAL_RANGE_ROWS, group_ranges, row_ranges
        from pipeline.worker import evaluate_task

        cfg, client = self.cfg, self.client
        tag = uuid.uuid4().hex[:6]
        val_futures = []
        if self._held_out():
            val_futures = [
                client.submit(
                    evaluate_task,
                    for_workers(self.store_path),
                    g,
                    None,
                    self.job,
                    self.spec,
                    self.tcfg,
                    self.target,
                    None,
                    key=f"evaluate-{self.job}-r{rnd}-v{i}-{tag}",
                    pure=False,
                    retries=2,
                )
                for i, g in enumerate(group_ranges(row_ranges(self.store, VAL_RANGE_ROWS), VAL_RANGE_ROWS))
            ]
        groups = client_groups(self.sizes)
        client_futures = [
            client.submit(
                evaluate_clients,
                self.job,
                for_workers(self.store_path),
                for_workers(self.partition_dir),
                a,
                b,
                self.spec,
                self.tcfg,
                self.target,
                key=f"evaluate-clients-{self.job}-r{rnd}-{a}-{tag}",
                pure=False,
                retries=2,
            )
            for a, b in groups
        ]
        wait(val_futures + client_futures, timeout=max(cfg.round_deadline, cfg.no_worker_timeout))
        out: dict[str, Any] = {}
        done_val = [r for f in val_futures if f.status == "finished" and (r := fetched(f)) is not None]
        if val_futures and len(done_val) == len(val_futures):
            pooled = finish_metrics(merge_metrics(done_val), self.target)
            out.update({f"val_{k}": v for k, v in pooled.items() if k != "confusion"})
        n = np.zeros(len(self.sizes), np.int64)
        loss = np.full(len(self.sizes), np.nan)
        metric = np.full(len(self.sizes), np.nan)
        for (a, b), f in zip(groups, client_futures, strict=True):
            r = fetched(f) if f.status == "finished" else None
            if r is None:
                continue
            n[a:b], loss[a:b], metric[a:b] = r["n"], r["loss"], r["metric"]
        client.cancel([f for f in val_futures + client_futures if not f.done()])
        scored = (n > 0) & np.isfinite(metric)
        if scored.any():
            m, w = metric[scored], n[scored]
            worst = np.sort(m)[: max(1, math.ceil(len(m) / 10))]
            out["site_mean"] = float(np.sum(m * w) / np.sum(w))
            out["site_worst_decile"] = float(np.mean(worst))
            out["clients_evaluated"] = int(scored.sum())
            tmp = self.run.path / ".clients.npz.tmp"
            with open(tmp, "wb") as fh:
                np.savez(fh, n=n, loss=loss, metric=metric, round=np.int64(rnd))
            os.replace(tmp, self.run.path / "clients.npz")
        return out

    def _checkpoint_meta(self) -> dict[str, Any]:
        return {"clients": int(self.cfg.clients), "partition": self.cfg.partition}

    def _data_meta(self) -> dict[str, Any]:
        return {"store_stats": self.stats}

    def _load_checkpoint(self) -> Any:
        path = self.run.checkpoint
        try:
            ckpt = read_checkpoint(path)
        except UnreadableFileError as exc:
            raise damaged_checkpoint(self.run.path, exc) from None
        fed = ckpt.meta.get("federated")
        if not isinstance(fed, dict) or fed.get("clients") is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is not of a run of simulated clients; resume it with its own settings"
            )
        if ckpt.meta.get("store") != self.store_path:
            raise CheckpointError(
                f"checkpoint {str(path)!r} is of store {ckpt.meta.get('store')!r}, not {self.store_path!r}; resume "
                "with the store the run started with"
            )
        # the store at that path ingested again with other rows: refused as an epoch run's resume is
        # (checkpoints of earlier versions record no statistics: checked on the model only)
        problem = resume_mismatch(ckpt.meta, build_spec(self.store, self.cfg)[0], self.stats, path, self.store_path)
        problem = problem or holdout_mismatch(ckpt.config, self.cfg, path)
        if problem is not None:
            raise CheckpointError(problem)
        return ckpt

"""The federated driver: rounds of sampled sites, each training on its own rows where they are.

A site is the set of Dask workers started with ``--resources SITE=1``; the sites file
(:mod:`pipeline.sites`) says where each site's store is as its workers see it. The driver never
opens a store: it asks every site for its schema and sums (:func:`pipeline.fedclient.site_info`,
run on the site), refuses sites that disagree, and pools the normalization statistics. Then,
round after round:

1. the *available* sites are those with at least one worker holding their resource; the round
   samples ``max(min_clients, ceil(fraction_fit * available))`` of them with a generator seeded
   by ``(seed, round)`` (a resumed run samples the same);
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
the run stops with one line only when fewer than ``min_sites`` sites have workers for
``no_worker_timeout`` seconds. The run directory is the one :mod:`pipeline.train` writes
(lock, ``config.toml``, ``checkpoint.npz`` after every round, ``history.json``, ``model.npz``
with the pooled mean/std and the classes); ``--resume`` continues at the next round.
"""

from __future__ import annotations

import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.checkpoint import read_checkpoint, write_checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError, ConfigError, PipelineError, StoreError, TrainingError
from pipeline.fedclient import evaluate_client, fit_client, site_info
from pipeline.metrics import array_metrics, finish_metrics, merge_metrics
from pipeline.model import Model
from pipeline.ps import ParameterServer
from pipeline.runstate import BestModel, EarlyStopping, RunState
from pipeline.sites import (
    Federation,
    Site,
    clients_per_round,
    pool_sites,
    read_sites,
    sample_clients,
    site_resources,
    site_spread,
    sites_digest,
)
from pipeline.train import RunDir, TrainResult, build_spec, check_backend, privacy_settings, task_config

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


def check_federated_config(cfg: TrainConfig, sites: list[Site]) -> None:
    """Refuse settings a federated run of ``sites`` cannot honour (before any cluster work)."""
    if cfg.validation_store:
        raise ConfigError(
            "config key 'validation_store' does not apply to a federated run: each site validates on "
            "its own held-out rows (set validation, e.g. 0.1)"
        )
    if cfg.mode != "sync":
        raise ConfigError(
            f"config key 'mode' = {cfg.mode!r}: federated rounds run in sync mode in this build; set mode = 'sync'"
        )
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
        if not cfg.sites:
            raise ConfigError("a federated run needs config key 'sites' (a sites file)")
        if client is None:
            raise TrainingError("a federated run needs a Dask cluster whose workers declare the sites' resources")
        self.cfg = cfg
        self.sites = read_sites(cfg.sites)
        check_federated_config(cfg, self.sites)
        self.digest = sites_digest(self.sites)
        self.client = client
        self.run = RunDir(Path(out))
        self.resume = resume
        self.force = force
        self.log = log or (lambda msg: logger.info(msg))
        self.on_epoch = on_epoch
        self.progress = progress
        self.job = f"fed-{uuid.uuid4().hex[:12]}"
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
                where = getattr(self.client.scheduler, "address", None) or "its address"
                raise TrainingError(
                    f"lost the Dask scheduler at {where} and the parameter server in it "
                    f"({type(exc).__name__}); the last checkpoint is in {str(self.run.path)!r}: start a "
                    f"scheduler and the sites' workers, then run `pipeline train --sites {self.cfg.sites} "
                    f"--out {self.run.path} --resume --scheduler ADDRESS`"
                ) from None

    def _fit(self) -> TrainResult:
        cfg, client = self.cfg, self.client
        ckpt = self._load_checkpoint() if self.resume else None
        self.run.prepare(self.resume, self.force)
        installed_by = ParameterServer.ensure_installed(client)
        check_backend(cfg.backend, client)
        fed = self.fed = pool_sites(cfg.sites, self._site_infos())
        self.spec, self.target = build_spec(fed, cfg)
        self.norm = fed.norm() if cfg.normalize else None
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
        self.run.config.write_text(cfg.to_toml())
        ps = ParameterServer(self.job, client)
        ps.create(
            params,
            mode="sync",
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
            # the accountant's amplification: the share of the sites sampled in a round
            privacy=privacy_settings(
                cfg,
                ckpt.meta.get("privacy") if ckpt else None,
                clients_per_round(len(self.sites), cfg.fraction_fit, cfg.min_clients) / max(1, len(self.sites)),
                participants=clients_per_round(len(self.sites), cfg.fraction_fit, cfg.min_clients),
            ),
        )
        rows = ", ".join(f"{n} {r:,}" for n, r in fed.rows.items())
        self.log(
            f"job {self.job}: federated {cfg.strategy} over {len(self.sites)} sites (training rows: {rows}), "
            f"{cfg.rounds} rounds, parameter server installed by {installed_by}"
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
                live = self._live_sites(ps, run)
                n = clients_per_round(len(live), cfg.fraction_fit, cfg.min_clients)
                sampled = sample_clients(live, n, cfg.seed, rnd)
                record = self._round(ps, rnd, sampled)
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
                    record.update(self._evaluate(rnd, self._available()))
                record["seconds"] = time.perf_counter() - t0
                run.history.append(record)
                if evaluate:
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
                    self.log(
                        f"privacy budget: stopping after {privacy['rounds']} rounds at epsilon = "
                        f"{privacy['epsilon']:.4g} (delta = {privacy['delta']:g}); another round would exceed "
                        f"target_epsilon = {cfg.target_epsilon:g}"
                    )
                    break
        except KeyboardInterrupt:
            self.log("interrupted: writing a checkpoint before stopping")
            self._checkpoint(ps, run)
            raise
        except TrainingError:
            self._checkpoint(ps, run)
            raise
        finally:
            metrics: dict[str, Any] = {}
            try:
                metrics = ps.metrics(history=True)
                ps.close()
            except Exception:
                logger.debug("could not close job %s", self.job, exc_info=True)
        model = Model.from_training(fed, self.spec, self.target, run.best.params, cfg, run.history)
        model.save(self.run.model)
        history_doc = {
            "job": self.job,
            "installed_by": installed_by,
            "federated": {
                "sites": {
                    s.name: {"store": s.store, "rows": fed.rows[s.name], "held_out": fed.held_out[s.name]}
                    for s in self.sites
                },
                "strategy": cfg.strategy,
            },
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
        from pipeline.plots import save_plots

        save_plots(self.run.path, history_doc)
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

    # -- the sites -------------------------------------------------------------------------

    def _available(self) -> list[str]:
        """The sites with at least one worker declaring their resource now."""
        have = site_resources(self.client.scheduler_info(n_workers=-1))
        return sorted(s for s in self.store_of if have.get(s))

    def _live_sites(self, ps: ParameterServer, run: RunState) -> list[str]:
        """The sites available for this round; waits while fewer than ``min_sites`` (or
        ``min_clients``) have workers, and stops the run after ``no_worker_timeout``."""
        cfg = self.cfg
        need = max(cfg.min_sites, cfg.min_clients)
        since: float | None = None
        while True:
            live = self._available()
            if len(live) >= need:
                return live
            now = time.monotonic()
            if since is None:
                since = now
                missing = sorted(set(self.store_of) - set(live))
                self.log(
                    f"waiting for sites: {len(live)} of {len(self.store_of)} have workers, {need} needed "
                    f"(no worker for {', '.join(missing)})"
                )
            elif now - since > cfg.no_worker_timeout:
                missing = sorted(set(self.store_of) - set(live))
                raise TrainingError(
                    f"only {len(live)} of {len(self.store_of)} sites had workers for {cfg.no_worker_timeout:.0f} s "
                    f"(none for {', '.join(missing)}), fewer than min_sites = {cfg.min_sites} / min_clients = "
                    f"{cfg.min_clients}; start workers with `dask worker SCHEDULER --resources SITE=1` or lower "
                    "min_sites (a checkpoint was written; use --resume)"
                )
            time.sleep(0.5)

    def _site_infos(self) -> dict[str, dict]:
        """Every site's :func:`site_info`, run on the site; waits up to ``no_worker_timeout``
        for sites without workers, and names a site whose store cannot be read."""
        from distributed import wait

        cfg = self.cfg
        holdout = {"fraction": cfg.validation, "seed": cfg.seed} if cfg.validation > 0 else None
        futures = {
            self.client.submit(
                site_info,
                store,
                holdout,
                key=f"site-info-{name}-{self.job}",
                resources={name: 1},
                pure=False,
            ): name
            for name, store in self.store_of.items()
        }
        deadline = time.monotonic() + cfg.no_worker_timeout
        announced = False
        try:
            while True:
                try:
                    wait(list(futures), timeout=1.0)
                except TimeoutError:
                    pass
                pending = sorted(n for f, n in futures.items() if not f.done())
                if not pending:
                    break
                if not announced:
                    self.log(f"waiting for the first report of site(s) {', '.join(pending)}")
                    announced = True
                if time.monotonic() > deadline:
                    raise TrainingError(
                        f"site(s) {', '.join(pending)} of {cfg.sites!r} did not report within "
                        f"{cfg.no_worker_timeout:.0f} s: no worker declares their resource; start one per site "
                        "with `dask worker SCHEDULER --resources SITE=1`"
                    )
        except BaseException:
            self.client.cancel(list(futures))
            raise
        infos = {}
        for f, name in sorted(futures.items(), key=lambda kv: kv[1]):
            if f.status == "error":
                exc = f.exception()
                detail = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
                raise StoreError(
                    f"site {name!r} cannot read its store {self.store_of[name]!r} ({detail}); fix its path in "
                    f"{cfg.sites!r}: it is the path as that site's workers see it"
                )
            info = f.result()
            if not info.get("labelled", True):
                raise StoreError(
                    f"site {name!r}'s store {self.store_of[name]!r} has no targets (ingested with --unlabelled); "
                    "every site trains on a labelled store"
                )
            infos[name] = info
        return infos

    # -- one round -------------------------------------------------------------------------

    def _round(self, ps: ParameterServer, rnd: int, sampled: list[str]) -> dict[str, Any]:
        """Run round ``rnd`` with the ``sampled`` sites; its history record."""
        from distributed import wait

        cfg, client = self.cfg, self.client
        names = {site: f"r{rnd}-{site}" for site in sampled}
        tag = uuid.uuid4().hex[:6]  # fresh keys: a resumed round is not an old one
        keys = {site: f"fit-{self.job}-r{rnd}-{site}-{tag}" for site in sampled}
        reply = ps.expect(names=list(names.values()), keys=list(keys.values()), epoch=rnd)
        v0 = int(reply["version"])
        futures = {
            client.submit(
                fit_client,
                self.job,
                names[site],
                self.store_of[site],
                rnd,
                self.spec,
                self.tcfg,
                self.target,
                self.norm,
                key=keys[site],
                resources={site: 1},
                pure=False,
                retries=0,  # a rerun would push twice: a lost client is a missing response
            ): site
            for site in sampled
        }
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
            closed = ps.close_round(need)
            unfinished = [f for f in futures if not f.done()]
            if unfinished:
                client.cancel(unfinished)
        summaries = ps.summaries(list(names.values()))
        errors: dict[str, str] = {}
        results: dict[str, dict] = {}
        for f, site in futures.items():
            name = names[site]
            if name in summaries:
                results[site] = summaries[name]
            elif f.status == "finished":
                results[site] = f.result()
            elif f.status == "error":
                exc = f.exception()
                errors[site] = str(exc) if isinstance(exc, PipelineError) else f"{type(exc).__name__}: {exc}"
            f.release()
        applied = int(closed["version"]) > v0
        # whose deltas the round combined: the server's word (a client that pushed may not have
        # left its summary yet when the round applied itself)
        combined = set(closed["last_applied"] if applied else closed["arrived"])
        responded = sorted(s for s in sampled if names[s] in combined)
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
        self.log(
            f"round {rnd + 1}/{cfg.rounds}: sampled {', '.join(sampled)}; responded "
            f"{', '.join(responded) or 'none'}"
            + (f" (no response from {', '.join(missing)})" if missing else "")
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
            "responded": responded,
            "applied": applied,
            "samples": samples,
            "train_loss": loss if known else float("nan"),
            "tasks": [
                {"name": names[s], "site": s, "worker": results[s].get("worker"), "samples": results[s]["samples"]}
                for s in known
            ],
        }

    # -- per-site evaluation ---------------------------------------------------------------

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
            if f.status != "finished":
                continue
            sums = array_metrics(f.result()["sums"])
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
            logger.warning("not checkpointing job %s: %s", self.job, st["failed"])
            if shown is not None:
                ps.record(epoch=shown)
            return
        write_checkpoint(
            self.run.checkpoint,
            run,
            st,
            config=self.cfg.to_dict(),
            store=self.cfg.sites,
            spec=self.spec,
            in_process=False,
            federated={"sites": self.digest},
        )
        run.last_checkpoint = time.monotonic()
        ps.record(epoch=shown, checkpoint=True)

    def _load_checkpoint(self) -> Any:
        path = self.run.checkpoint
        ckpt = read_checkpoint(path)
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

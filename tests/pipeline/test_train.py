"""Distributed training end to end on a real LocalCluster with worker processes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings

import numpy as np
import pytest

from pipeline.config import TrainConfig
from pipeline.inference import evaluate_store
from pipeline.model import load_model
from pipeline.store import open_store
from pipeline.train import train

EPOCHS = 20
# Both sides hold out 10% of the training rows and keep the best validation epoch.
COMPARE = {"epochs": EPOCHS, "patience": 0, "validation": 0.1}


@pytest.fixture(scope="module")
def sklearn_accuracy(letter_stores: tuple[str, str]) -> float:
    """scikit-learn's MLPClassifier, same architecture, optimizer, batch, epochs and 10% holdout."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    train_s, test_s = (open_store(p) for p in letter_stores)
    X = (train_s.X[:] - train_s.mean) / train_s.std
    Xt = (test_s.X[:] - train_s.mean) / train_s.std
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier(
            (256, 128),
            batch_size=256,
            learning_rate_init=1e-3,
            max_iter=EPOCHS,
            random_state=0,
            early_stopping=True,
            validation_fraction=0.1,
            n_iter_no_change=EPOCHS,
        )
        clf.fit(X, train_s.y[:])
    return float(clf.score(Xt, test_s.y[:]))


@pytest.fixture(scope="module")
def undisturbed(letter_stores, client, tmp_path_factory) -> dict[str, float]:
    """Test accuracy of an undisturbed run per mode (the reference for the fault tests)."""
    out: dict[str, float] = {}
    for mode in ("sync", "async", "ssp"):
        cfg = TrainConfig(mode=mode, **COMPARE)
        res = train(letter_stores[0], cfg, tmp_path_factory.mktemp(mode), client=client)
        out[mode] = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    return out


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_each_mode_reaches_sklearn_accuracy(mode, undisturbed, sklearn_accuracy):
    assert undisturbed[mode] >= sklearn_accuracy - 0.02, (mode, undisturbed[mode], sklearn_accuracy)


def test_run_directory_holds_model_history_and_config(letter_stores, client, tmp_path):
    res = train(letter_stores[0], TrainConfig(epochs=2, patience=0), tmp_path / "run", client=client)
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {
        "model.npz",
        "history.json",
        "config.toml",
        "checkpoint.npz",
    }
    assert res.installed_by == "preload"
    assert [h["epoch"] for h in res.history] == [0, 1]
    assert res.history[1]["rounds"] > res.history[0]["rounds"] > 0
    # where each epoch's time went, as the driver saw it: sync shares validate inside the
    # training phase, so the validation time is part of train_s
    for h in json.loads((tmp_path / "run" / "history.json").read_text())["epochs"]:
        assert h["validated_in_tasks"] is True
        assert 0 < h["validate_s"] < h["train_s"] <= h["seconds"] < h["train_s"] + 0.5
    model = load_model(tmp_path / "run")
    test = open_store(letter_stores[1])
    pred = model.predict(test.X[:100])
    assert set(pred) <= set(test.classes)


@pytest.mark.parametrize("mode,ema", [("sync", 0.0), ("async", 0.0), ("sync", 0.99), ("async", 0.99)])
def test_epoch_validation_equals_a_separate_pass_over_the_final_weights(mode, ema, letter_stores, client, tmp_path):
    """Sync shares validate the epoch's final weights inside their tasks, each on a slice of the
    validation rows; async epochs use a separate round of validation tasks. Either way the
    epoch's metrics are those of the checkpointed weights over the whole validation store: with
    ``ema``, of the checkpointed average (the model saved), not of the raw weights."""
    from pipeline.checkpoint import load_file
    from pipeline.metrics import finish_metrics
    from pipeline.train import build_spec, row_ranges, task_config
    from pipeline.worker import evaluate_task

    cfg = TrainConfig(mode=mode, epochs=2, patience=0, validation_store=letter_stores[1], ema=ema)
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    rec = res.history[-1]
    assert rec["validated_in_tasks"] is (mode == "sync")
    arrays, _ = load_file(tmp_path / "run" / "checkpoint.npz", "checkpoint")
    model_weights = arrays["opt_average"] if ema else arrays["params"]
    if ema:
        assert not np.array_equal(arrays["opt_average"], arrays["params"])
    if res.history[-1]["val_loss"] <= res.history[0]["val_loss"]:  # the last epoch is the best
        np.testing.assert_array_equal(res.model.params, model_weights)
    test = open_store(letter_stores[1])
    spec, target = build_spec(open_store(letter_stores[0]), cfg)
    sums = client.submit(
        evaluate_task,
        letter_stores[1],
        row_ranges(test, 1 << 20),
        model_weights,
        None,
        spec,
        task_config(cfg),
        target,
        pure=False,
    ).result()
    whole = finish_metrics(sums, target)
    assert rec["val_n"] == whole["n"] == test.n_rows
    assert rec["val_accuracy"] == whole["accuracy"]
    assert rec["val_loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 sums, other batches


def test_split_rows_cuts_ranges_into_equal_consecutive_slices():
    from pipeline.train import split_rows

    ranges = [(0, 10), (20, 23), (30, 50)]
    for parts in (1, 2, 3, 7, 40):
        got = split_rows(ranges, parts)
        assert len(got) == parts
        rows = [r for sl in got for a, b in sl for r in range(a, b)]
        assert rows == [r for a, b in ranges for r in range(a, b)]  # all rows, in order, once
        sizes = [sum(b - a for a, b in sl) for sl in got]
        assert max(sizes) - min(sizes) <= 1


def test_sync_shares_get_equal_rows_whatever_the_tasks(letter_stores, client, tmp_path):
    """rows_per_task 7000 cuts the store into 3 tasks; the two sync shares still train on the
    same number of rows (within one), every row once per epoch."""
    cfg = TrainConfig(
        mode="sync", epochs=2, patience=0, rows_per_task=7000, validation_store=letter_stores[1], min_share_gflop=0
    )
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    n_rows = open_store(letter_stores[0]).n_rows
    for rec in res.history:
        samples = [t["samples"] for t in rec["tasks"]]
        assert len(samples) == 2 and sum(samples) == n_rows
        assert max(samples) - min(samples) <= 1


def test_sync_share_count_follows_the_epoch_s_work():
    from pipeline.train import n_sync_shares, train_flops_per_row

    spec = {"n_in": 16, "hidden": [256, 128], "n_out": 26}
    assert train_flops_per_row(spec) == 6 * (16 * 256 + 256 * 128 + 128 * 26)
    per_row = train_flops_per_row(spec)  # ~0.24 MFLOP: 16,000 rows are ~3.9 GFLOP
    assert n_sync_shares(16_000, spec, 2, 20.0) == 1
    assert n_sync_shares(16_000, spec, 2, 0.0) == 2  # 0: one share per thread
    rows_for_3 = int(3 * 20e9 / per_row) + 1
    assert n_sync_shares(rows_for_3, spec, 8, 20.0) == 3
    assert n_sync_shares(100 * rows_for_3, spec, 8, 20.0) == 8  # never more than the threads
    assert n_sync_shares(10, spec, 0, 20.0) == 1


def test_min_share_gflop_trains_a_small_store_in_one_sync_share(letter_stores, client, tmp_path):
    logs: list[str] = []
    cfg = TrainConfig(mode="sync", epochs=1, patience=0, validation_store=letter_stores[1], min_share_gflop=20)
    res = train(letter_stores[0], cfg, tmp_path / "one", client=client, log=logs.append)
    n_rows = open_store(letter_stores[0]).n_rows
    assert [t["samples"] for t in res.history[0]["tasks"]] == [n_rows]
    assert any("1 sync share(s) for 2 worker threads" in m and "min_share_gflop=0" in m for m in logs), logs
    both = train(letter_stores[0], cfg.with_overrides(["min_share_gflop=0"]), tmp_path / "two", client=client)
    assert len(both.history[0]["tasks"]) == 2  # the default: one share per worker thread


def test_sync_mode_is_reproducible(letter_stores, client, tmp_path):
    cfg = TrainConfig(mode="sync", epochs=2, patience=0, seed=3)
    a = train(letter_stores[0], cfg, tmp_path / "a", client=client)
    b = train(letter_stores[0], cfg, tmp_path / "b", client=client)
    np.testing.assert_array_equal(a.model.params, b.model.params)
    c = train(letter_stores[0], TrainConfig(mode="sync", epochs=2, patience=0, seed=4), tmp_path / "c", client=client)
    assert not np.array_equal(a.model.params, c.model.params)


def test_a_run_on_a_cluster_refuses_blas_threads_before_writing_anything(letter_stores, client, tmp_path):
    """``blas_threads`` sets the BLAS threads of training in this process; a worker's come from
    its nanny's environment, so a cluster run refuses another value than 1 rather than ignore
    it, before its run directory exists; 1 trains."""
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"blas_threads = 2 sets the BLAS threads of training in this process"):
        train(letter_stores[0], TrainConfig(epochs=1, patience=0, blas_threads=2), tmp_path / "run", client=client)
    assert not (tmp_path / "run").exists()
    res = train(letter_stores[0], TrainConfig(epochs=1, patience=0, blas_threads=1), tmp_path / "run", client=client)
    assert len(res.history) == 1


def _kill_worker_mid_task(client, stop: threading.Event, killed: list) -> None:
    """SIGKILL the process of a worker that is running a training task (epoch >= 1)."""
    pids = client.run(os.getpid)
    while not stop.is_set():
        for worker, keys in client.processing().items():
            if any(str(k).startswith("train-chunk-e1-") or str(k).startswith("train-chunk-e2-") for k in keys):
                os.kill(pids[worker], signal.SIGKILL)
                killed.append(worker)
                return
        time.sleep(0.005)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_sigkilled_worker_is_survived(mode, letter_stores, undisturbed, tmp_path):
    from pipeline.connect import cluster_client

    cfg = TrainConfig(mode=mode, **COMPARE)
    stop, killed = threading.Event(), []
    # a cluster of its own: the one shared by the module must not depend on a nanny restart
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as client:
        killer = threading.Thread(target=_kill_worker_mid_task, args=(client, stop, killed), daemon=True)
        killer.start()
        try:
            res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
        finally:
            stop.set()
            killer.join()
        acc = evaluate_store(res.model, letter_stores[1], client)["accuracy"]
    assert killed, "no worker was killed: the test did not exercise worker loss"
    assert len(res.history) == EPOCHS
    assert acc >= undisturbed[mode] - 0.02, (acc, undisturbed[mode])


def test_resume_continues_rounds_and_history(letter_stores, client, tmp_path):
    out = tmp_path / "run"
    first = train(letter_stores[0], TrainConfig(epochs=2, patience=0), out, client=client)
    rounds_after_2 = first.history[-1]["rounds"]
    more = TrainConfig.from_dict({"epochs": 4, "patience": 0})
    resumed = train(letter_stores[0], more, out, client=client, resume=True)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[1] == first.history[1]  # history kept, not recomputed
    assert resumed.history[2]["rounds"] > rounds_after_2
    assert resumed.history[3]["rounds"] > resumed.history[2]["rounds"]
    # history.json's rounds are the whole run's: those before the resume (kept by the checkpoint)
    # and the resumed server's, one per version
    doc = json.loads((out / "history.json").read_text())
    versions = [r[1] for r in doc["rounds"]]
    assert versions == list(range(1, resumed.history[3]["rounds"] + 1))
    assert doc["pushes"] == sum(r[4] for r in doc["rounds"])  # every delta received, before the resume too


def test_sync_resume_at_an_epoch_boundary_repeats_the_uninterrupted_run(letter_stores, client, tmp_path):
    """The checkpoint keeps every sync share's local optimizer state (Adam's moments and step
    count): a run stopped after its first epoch and resumed ends with the weights of a run that
    was never stopped, bit for bit."""
    from pipeline.checkpoint import load_file

    cfg = {"epochs": 3, "patience": 0, "min_share_gflop": 0}
    straight = train(letter_stores[0], TrainConfig(**cfg), tmp_path / "straight", client=client)
    out = tmp_path / "cut"
    train(letter_stores[0], TrainConfig(**{**cfg, "epochs": 1}), out, client=client)
    arrays, meta = load_file(out / "checkpoint.npz", "checkpoint")
    assert sorted(meta["local_states"]) == ["s0", "s1"]
    assert all(sorted(v["arrays"]) == ["m", "v"] and v["t"] > 0 for v in meta["local_states"].values())
    resumed = train(letter_stores[0], TrainConfig(**cfg), out, client=client, resume=True)
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in straight.history]
    a, _ = load_file(out / "checkpoint.npz", "checkpoint")
    b, _ = load_file(tmp_path / "straight" / "checkpoint.npz", "checkpoint")
    for k in ("params", "opt_average", "local0_0", "local1_1"):
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # a state belongs to the local optimizer that made it: a changed learning rate starts afresh
    said: list[str] = []
    train(
        letter_stores[0],
        TrainConfig(**{**cfg, "epochs": 4, "lr": 2e-3}),
        out,
        client=client,
        resume=True,
        log=said.append,
    )
    assert any("fresh local state" in m for m in said), said


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_resume_mid_epoch_runs_only_the_unfinished_tasks(mode, letter_stores, client, tmp_path):
    """A checkpoint written mid-epoch lists the tasks already done; the resumed epoch submits the
    others only, and validates with its own pass (the done shares cannot validate)."""
    from pipeline.checkpoint import load_file, save_file

    out = tmp_path / "run"
    cfg = TrainConfig(mode=mode, epochs=1, patience=0, min_share_gflop=0)
    full = train(letter_stores[0], cfg, out, client=client)
    tasks = sorted(t["name"] for t in full.history[0]["tasks"])
    assert len(tasks) >= 2
    arrays, meta = load_file(out / "checkpoint.npz", "checkpoint")
    meta.update(epoch=0, history=[], done_tasks=tasks[:1], progress={}, best_epoch=-1, best_loss=1e300)
    save_file(out / "checkpoint.npz", "checkpoint", arrays, meta)
    resumed = train(letter_stores[0], None, out, client=client, resume=True)
    (rec,) = resumed.history
    assert sorted(t["name"] for t in rec["tasks"]) == tasks[1:]
    assert 0 < rec["samples"] < full.history[0]["samples"]
    assert rec["validated_in_tasks"] is False and rec["val_n"] == full.history[0]["val_n"]


def test_existing_run_directory_is_not_clobbered(letter_stores, client, tmp_path):
    from pipeline.errors import TrainingError

    out = tmp_path / "run"
    train(letter_stores[0], TrainConfig(epochs=1, patience=0), out, client=client)
    before = (out / "model.npz").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(letter_stores[0], TrainConfig(epochs=1, patience=0), out, client=client)
    assert (out / "model.npz").read_bytes() == before


def test_regression_store_trains_and_reports_r2(client, tmp_path):
    from pipeline.synth import synth

    store = synth(tmp_path / "reg.zarr", rows=6000, features=8, classes=None, seed=1)
    res = train(store.path, TrainConfig(epochs=6, patience=0, hidden=[64]), tmp_path / "run", client=client)
    assert "val_r2" in res.history[-1]
    assert res.history[-1]["val_r2"] > 0.5
    metrics = evaluate_store(res.model, store.path, client)
    assert metrics["r2"] > 0.5 and metrics["rmse"] > 0


def test_min_samples_defers_early_stopping(letter_stores, client, tmp_path):
    # lr 1e-9: the validation loss cannot improve by min_delta, so patience 1 stops at once ...
    base = {"epochs": 4, "patience": 1, "lr": 1e-9, "mode": "sync"}
    stopped = train(letter_stores[0], TrainConfig.from_dict({**base, "min_samples": 0}), tmp_path / "a", client=client)
    assert stopped.stopped_early and len(stopped.history) == 2
    # ... unless fewer than min_samples training samples have been seen
    seen_per_epoch = stopped.history[0]["samples"]
    floor = 3 * seen_per_epoch
    held = train(letter_stores[0], TrainConfig.from_dict({**base, "min_samples": floor}), tmp_path / "b", client=client)
    assert len(held.history) == 3 and held.stopped_early  # stops as soon as the floor is passed


# -- full batch and the server optimizer's own hyperparameters ---------------------------------


@pytest.fixture(scope="module")
def small_regression(tmp_path_factory) -> str:
    from pipeline.synth import synth

    return synth(
        tmp_path_factory.mktemp("small") / "r.zarr",
        rows=3000,
        features=5,
        classes=None,
        noise=0.1,
        seed=3,
        chunk_rows=500,
    ).path


def _final_params(out) -> np.ndarray:
    from pipeline.checkpoint import load_file

    arrays, _ = load_file(out / "checkpoint.npz", "checkpoint")
    return np.asarray(arrays["params"])


def test_full_batch_epoch_is_one_step_of_gradient_descent(small_regression, client, tmp_path):
    """batch_size = 0 on two workers (sync, mean of the shares' deltas, server sgd at lr 1): each
    epoch is one round and the weights are those of full-batch gradient descent over every
    training row, written in plain NumPy."""
    from kernels.mlp import MLPSpec, init_params

    cfg = TrainConfig(
        hidden=[],
        batch_size=0,
        optimizer="sgd",
        lr=0.1,
        aggregate="mean",
        validation=0.0,
        patience=0,
        epochs=3,
        ema=0.0,
        min_share_gflop=0,
        seed=0,
    )
    res = train(small_regression, cfg, tmp_path / "run", client=client)
    assert [h["rounds"] for h in res.history] == [1, 2, 3]  # one step per epoch
    st = open_store(small_regression)
    X = (st.X[:].astype(np.float64) - st.mean) / st.std
    y = ((st.y[:].astype(np.float64) - st.y_mean) / st.y_std).reshape(-1, 1)
    p = init_params(MLPSpec(5, (), 1, loss="mse"), seed=0).astype(np.float64)
    W, b = p[:5].reshape(5, 1), p[5:]
    for _ in range(3):
        r = X @ W + b - y
        W, b = W - 0.1 * 2 * X.T @ r / len(X), b - 0.1 * 2 * r.mean(axis=0)
    np.testing.assert_allclose(_final_params(tmp_path / "run"), np.concatenate([W.ravel(), b]), rtol=1e-4, atol=1e-5)


def test_server_momentum_is_not_the_local_momentum(small_regression, client, tmp_path):
    """server_momentum = 0 makes the server's momentum optimizer plain sgd, bit for bit, while
    the local momentum stays 0.9."""
    base = {"hidden": [8], "epochs": 1, "patience": 0, "min_share_gflop": 0, "optimizer": "momentum"}
    train(small_regression, TrainConfig(**base, server_optimizer="sgd"), tmp_path / "sgd", client=client)
    cfg = TrainConfig(**base, server_optimizer="momentum", server_momentum=0.0, momentum=0.9)
    train(small_regression, cfg, tmp_path / "mom0", client=client)
    np.testing.assert_array_equal(_final_params(tmp_path / "mom0"), _final_params(tmp_path / "sgd"))


def test_server_adam_betas_are_used_and_survive_a_resume(small_regression, client, tmp_path):
    """The server's Adam betas change the run, and a run stopped and resumed (its settings read
    back from the checkpoint) ends with the weights of a run that was never stopped."""
    from pipeline.train import resumed_config

    base = {"hidden": [8], "patience": 0, "min_share_gflop": 0, "server_optimizer": "adam", "server_lr": 0.01}
    betas = {"server_beta1": 0.5, "server_beta2": 0.9}
    train(small_regression, TrainConfig(**base, epochs=2, **betas), tmp_path / "straight", client=client)
    train(small_regression, TrainConfig(**base, epochs=2), tmp_path / "default", client=client)
    assert not np.array_equal(_final_params(tmp_path / "straight"), _final_params(tmp_path / "default"))
    out = tmp_path / "cut"
    train(small_regression, TrainConfig(**base, epochs=1, **betas), out, client=client)
    resumed = resumed_config(out).with_overrides(["epochs=2"])
    assert (resumed.server_beta1, resumed.server_beta2) == (0.5, 0.9)
    train(small_regression, resumed, out, client=client, resume=True)
    np.testing.assert_array_equal(_final_params(out), _final_params(tmp_path / "straight"))


# -- validation rows held out of the training store ----------------------------------------------


def _sorted_store(path, n, chunk_rows=1024, classes=3):
    """``n`` rows sorted by class (``classes`` equal blocks); X[:, 0] is the row's index."""
    import zarr

    from tests.pipeline.helpers import make_store

    make_store(path, n=n, f=2, chunk_rows=chunk_rows)
    g = zarr.open_group(str(path), mode="r+")
    g["y"][:] = (np.arange(n) * classes // n).astype(np.int32)
    return open_store(path)


@pytest.mark.parametrize("n, chunk_rows", [(1500, 1024), (3000, 1024), (1024, 1024), (395_000, 73_728)])
def test_the_validation_fraction_is_held_out_from_every_chunk(n, chunk_rows, tmp_path):
    """Whole chunks of at least 1,024 rows held out 68% of 1,500 rows, 34% of 3,000, none of
    1,024 and 18.7% of a 395k-row store for validation = 0.1."""
    from pipeline.loader import held_out_rows
    from pipeline.train import held_out_count, row_ranges

    st = _sorted_store(tmp_path / "s.zarr", n, chunk_rows)
    for fraction in (0.1, 0.25):
        held = held_out_count(st, fraction, seed=0)
        assert abs(held - fraction * n) <= 1, (n, fraction, held)
        # the same count, range by range, however the store is cut into tasks
        assert held_out_count(st, fraction, 0, row_ranges(st, 700)) == held
        per_chunk = [len(held_out_rows(st, c, fraction, 0)) for c in range(st.n_chunks)]
        for c, k in enumerate(per_chunk):
            sl = st.chunk_slice(c)
            assert abs(k - fraction * (min(sl.stop, n) - sl.start)) <= 1
    rows = np.concatenate([held_out_rows(st, c, 0.1, 0) for c in range(st.n_chunks)])
    assert len(np.unique(rows)) == len(rows) and rows.min() >= 0 and rows.max() < n
    other = np.concatenate([held_out_rows(st, c, 0.1, 1) for c in range(st.n_chunks)])
    assert not np.array_equal(rows, other)  # the seed chooses them


def test_class_sorted_rows_give_a_validation_of_every_class_without_overlap(tmp_path):
    from pipeline.loader import ChunkLoader
    from pipeline.train import row_ranges

    st = _sorted_store(tmp_path / "s.zarr", 1500)
    ranges = row_ranges(st, 400)
    hold = {"fraction": 0.1, "seed": 0}
    seen = {}
    for keep in ("train", "validation"):
        with ChunkLoader(st, ranges=ranges, batch_size=64, normalize=False, holdout={**hold, "keep": keep}) as L:
            batches = list(L.epoch(0))
            assert L.n_rows == sum(len(X) for X, _ in batches)
        seen[keep] = (
            np.concatenate([X[:, 0] for X, _ in batches]).astype(int),
            np.concatenate([y for _, y in batches]),
        )
    train_ids, val_ids = seen["train"][0], seen["validation"][0]
    assert len(val_ids) == 150 and len(train_ids) == 1350
    assert not set(train_ids) & set(val_ids)
    assert sorted([*train_ids, *val_ids]) == list(range(1500))  # every row once, in one part
    counts = np.bincount(seen["validation"][1], minlength=3)
    assert counts.min() >= 45, counts  # each class about a third of the validation rows


def test_a_store_too_small_to_hold_out_a_row_warns(tmp_path):
    from pipeline.train import Trainer

    st = _sorted_store(tmp_path / "s.zarr", 4, classes=2)
    said: list[str] = []
    trainer = Trainer(st.path, TrainConfig(validation=0.1), tmp_path / "run", client=None, log=said.append)
    tasks, val = trainer.plan(2)
    assert val == [] and sum(b - a for t in tasks for a, b in t) == 4
    assert any("holds out no row" in m for m in said), said


def test_training_on_class_sorted_rows_validates_on_every_class(client, tmp_path):
    st = _sorted_store(tmp_path / "s.zarr", 1500)
    res = train(st.path, TrainConfig(epochs=2, patience=0, hidden=[8], validation=0.1), tmp_path / "run", client=client)
    for rec in res.history:
        assert rec["val_n"] == 150
        assert sum(t["samples"] for t in rec["tasks"]) == 1350


def test_an_interrupt_between_polls_is_raised_at_the_next_poll_not_inside_it() -> None:
    """Ctrl-C (or the command's SIGTERM) inside the epoch's polling loop is recorded and raised
    by ``check()``, outside any call into Dask; a second signal raises at once; the handlers
    are restored after the block."""
    import os
    import signal

    from pipeline.train import interrupts_between_polls

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt) as got:
        with interrupts_between_polls() as check:
            check()  # nothing yet
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler ran: recorded, not raised here
            reached = True
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)  # a second one raises at once
                time.sleep(1)
            check()
    assert reached and str(got.value) == ""
    assert signal.getsignal(signal.SIGINT) is before

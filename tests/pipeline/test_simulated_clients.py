"""Simulated federated clients (``clients = N``): row-index views of one store, trained as
ordinary tasks on a real LocalCluster; the partition is computed once and kept with the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.checkpoint import load_file, read_checkpoint
from pipeline.config import TrainConfig
from pipeline.errors import CheckpointError
from pipeline.federated import client_groups, sample_indices
from pipeline.partition import open_partition
from pipeline.train import train

BASE = {"hidden": [32], "lr": 3e-3, "ema": 0.0, "batch_size": 64, "patience": 0}


def test_sampling_and_evaluation_groups_need_no_list_of_clients():
    a = sample_indices(10_000, 100, seed=3, round_=7)
    assert len(set(a.tolist())) == 100 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, sample_indices(10_000, 100, seed=3, round_=7))
    assert not np.array_equal(a, sample_indices(10_000, 100, seed=3, round_=8))
    assert np.array_equal(sample_indices(5, 9, 0, 0), np.arange(5))
    assert client_groups(np.array([5, 5, 5, 20, 1]), rows=10) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_simulated_clients_train_resume_and_keep_their_partition(letter_stores, client, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig.from_dict(
        {**BASE, "clients": 20, "partition": "dirichlet", "partition_alpha": 0.5, "fraction_fit": 0.5, "rounds": 4}
    )
    res = train(letter_stores[0], cfg, run, client=client)
    assert [(e["round"], e["sampled"], e["responded"], e["applied"]) for e in res.history] == [
        (r, 10, 10, True) for r in range(4)
    ]
    last = res.history[-1]
    assert last["val_accuracy"] > 0.1 and last["site_worst_decile"] <= last["site_mean"]
    part = open_partition(run / "partition")
    assert part.n_clients == 20 and part.kind == "dirichlet"
    with np.load(run / "clients.npz") as z:
        assert np.array_equal(z["n"], part.sizes()) and int(z["round"]) == 3  # every client scored
    # resumed: the next round, the same partition (not recomputed)
    before = (run / "partition" / "rows.npy").stat().st_mtime_ns
    more = train(letter_stores[0], cfg.with_overrides(["rounds=6"]), run, client=client, resume=True)
    assert [e["round"] for e in more.history] == list(range(6))
    assert more.history[:4] == res.history
    assert (run / "partition" / "rows.npy").stat().st_mtime_ns == before
    meta = load_file(run / "checkpoint.npz", "checkpoint")[1]
    assert meta["federated"] == {"clients": 20, "partition": "dirichlet"} and meta["epoch"] == 6
    # a resume asking for another partition is refused, naming the difference
    with pytest.raises(CheckpointError, match="was made otherwise"):
        train(
            letter_stores[0], cfg.with_overrides(["rounds=7", "partition_alpha=2.0"]), run, client=client, resume=True
        )
    # and so is one holding out other validation rows, as for an epoch run
    config_before = (run / "config.toml").read_bytes()
    with pytest.raises(CheckpointError, match=r"was validated on validation = 0\.1 .*not validation = 0\.3"):
        train(letter_stores[0], cfg.with_overrides(["rounds=7", "validation=0.3"]), run, client=client, resume=True)
    assert (run / "config.toml").read_bytes() == config_before
    # a damaged checkpoint is named with its fix
    ckpt = run / "checkpoint.npz"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cannot resume the run in .*restore its checkpoint\.npz from a copy"):
        train(letter_stores[0], cfg.with_overrides(["rounds=7"]), run, client=client, resume=True)


def test_asynchronous_simulated_clients_are_replaced_as_they_finish(letter_stores, client, tmp_path):
    cfg = TrainConfig.from_dict(
        {**BASE, "clients": 12, "fraction_fit": 0.5, "rounds": 3, "mode": "async", "concurrency": 3, "buffer_size": 2}
    )
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    assert [e["round"] for e in res.history] == [0, 1, 2]
    assert all(e["responded"] >= 6 for e in res.history)  # a round ends once 6 clients finished
    deltas = sum(e["responded"] for e in res.history)
    # one FedBuff step per 2 deltas; a client still in flight when the last round is recorded
    # (at most `concurrency` = 3) may already have pushed a delta no round counted yet
    assert deltas // 2 <= res.history[-1]["rounds"] <= (deltas + 3) // 2, (res.history[-1]["rounds"], deltas)
    assert res.history[-1]["val_accuracy"] > 0.05


def test_an_interrupted_asynchronous_run_resumes_with_its_buffered_deltas(letter_stores, client, tmp_path):
    # One client in flight at a time: no delta is stale and none is in flight at a round's end,
    # so an asynchronous run is deterministic. 2 clients a round, a server step per 3 deltas:
    # interrupted after round 2 (4 deltas), one delta waits in the buffer; the resumed run
    # must step with it to end where the uninterrupted run ends.
    cfg = TrainConfig.from_dict(
        {**BASE, "clients": 8, "fraction_fit": 0.25, "rounds": 4, "mode": "async", "concurrency": 1, "buffer_size": 3}
    )
    whole = train(letter_stores[0], cfg, tmp_path / "whole", client=client)
    assert [e["responded"] for e in whole.history] == [2, 2, 2, 2] and whole.history[-1]["rounds"] == 2

    def stop_after_round_two(record: dict) -> None:
        if record["round"] == 1:
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(letter_stores[0], cfg, run, client=client, on_epoch=stop_after_round_two)
    cut = read_checkpoint(run / "checkpoint.npz")
    assert cut.version == 1 and cut.run.epoch == 2
    assert cut.buffer is not None and len(cut.buffer["deltas"]) == 1 and cut.buffer["staleness"] == [0]
    assert cut.buffer["samples"][0] > 0 and cut.buffer["deltas"][0].shape == cut.params.shape
    assert np.abs(cut.buffer["deltas"][0]).max() > 0

    resumed = train(letter_stores[0], cfg, run, client=client, resume=True)
    assert [e["round"] for e in resumed.history] == [0, 1, 2, 3]
    end, ref = read_checkpoint(run / "checkpoint.npz"), read_checkpoint(tmp_path / "whole" / "checkpoint.npz")
    assert end.version == ref.version == 2
    np.testing.assert_array_equal(end.params, ref.params)  # the buffered delta was not lost
    assert len(end.buffer["deltas"]) == len(ref.buffer["deltas"]) == 2
    for a, b in zip(end.buffer["deltas"], ref.buffer["deltas"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert [e["train_loss"] for e in resumed.history] == [e["train_loss"] for e in whole.history]

    # a resume whose buffer could not take the buffered deltas is refused, the run untouched
    before = (run / "checkpoint.npz").read_bytes()
    with pytest.raises(CheckpointError, match=r"holds 2 buffered deltas .* buffer_size > 2"):
        train(letter_stores[0], cfg.with_overrides(["rounds=5", "buffer_size=2"]), run, client=client, resume=True)
    assert (run / "checkpoint.npz").read_bytes() == before


def test_simulated_clients_push_compressed_deltas(letter_stores, client, tmp_path):
    # The job of a compressed run refuses float32 deltas (C54), so a run that finishes proves
    # every client pushed in the job's codec; int8 loses little against float32 here.
    cfg = TrainConfig.from_dict({**BASE, "clients": 8, "fraction_fit": 0.5, "rounds": 3})
    plain = train(letter_stores[0], cfg, tmp_path / "plain", client=client)
    packed = train(letter_stores[0], cfg.with_overrides(["compression=int8"]), tmp_path / "int8", client=client)
    assert [e["responded"] for e in packed.history] == [4, 4, 4]
    assert abs(packed.history[-1]["val_accuracy"] - plain.history[-1]["val_accuracy"]) < 0.05


def test_a_task_folds_its_clients_deltas_into_one_weighted_mean(letter_stores, client, tmp_path):
    # Folded: each task pushes its clients' sample-weighted mean delta once. Per client: a
    # trimmed mean trimming nothing is the unweighted mean of every client's own delta, the
    # weighted one for clients of equal size (iid). Full batch: no shuffle order differs.
    cfg = TrainConfig.from_dict(
        {**BASE, "batch_size": 0, "local_epochs": 2, "clients": 16, "partition": "iid", "fraction_fit": 0.5}
    )
    cfg = cfg.with_overrides(["rounds=3"])
    folded = train(letter_stores[0], cfg, tmp_path / "folded", client=client)
    each = train(
        letter_stores[0],
        cfg.with_overrides(["aggregator=trimmed_mean", "trim_fraction=0"]),
        tmp_path / "each",
        client=client,
    )
    sizes = open_partition(tmp_path / "folded" / "partition").sizes()
    assert sizes.min() == sizes.max()  # equal clients: weighted and unweighted means agree
    for a, b in zip(folded.history, each.history, strict=True):
        assert (a["sampled"], a["responded"], a["applied"], a["samples"]) == (
            b["sampled"],
            b["responded"],
            b["applied"],
            b["samples"],
        )
        assert a["responded"] == 8 and a["samples"] == 8 * int(sizes[0])
    assert abs(folded.history[-1]["val_accuracy"] - each.history[-1]["val_accuracy"]) < 1e-4
    assert abs(folded.history[-1]["val_loss"] - each.history[-1]["val_loss"]) < 1e-4
    # the server combined one delta per task (2 workers: 2 tasks), not one per client
    deltas = [r[4] for r in json.loads((tmp_path / "folded" / "history.json").read_text())["rounds"]]
    per_client = [r[4] for r in json.loads((tmp_path / "each" / "history.json").read_text())["rounds"]]
    assert deltas == [2, 2, 2] and per_client == [8, 8, 8]


def test_folded_minibatch_clients_train_and_count_as_clients(letter_stores, client, tmp_path):
    cfg = TrainConfig.from_dict(
        {
            **BASE,
            "lr": 1e-2,
            "clients": 40,
            "partition": "dirichlet",
            "partition_alpha": 0.5,
            "fraction_fit": 0.5,
            "rounds": 3,
        }
    )
    res = train(letter_stores[0], cfg, tmp_path / "run", client=client)
    assert [(e["sampled"], e["responded"], e["applied"]) for e in res.history] == [(20, 20, True)] * 3
    sizes = open_partition(tmp_path / "run" / "partition").sizes()
    assert all(e["samples"] > 0 for e in res.history) and res.history[-1]["samples"] <= int(sizes.sum())
    assert res.history[-1]["val_accuracy"] > 0.1


def test_a_worker_keeps_the_decoded_chunks_of_a_runs_store(tmp_path, monkeypatch):
    # Simulated clients read scattered rows of the same store every round: a worker process keeps
    # the chunks it decoded for the run (same arrays as a read from the store), not another run's.
    import pipeline.fedclient as fc
    from pipeline.errors import StoreError
    from pipeline.store import read_rows_at, store_identity
    from pipeline.synth import synth

    store = synth(tmp_path / "s.zarr", rows=3_000, features=6, classes=3, chunk_rows=500, force=True)
    rows = np.random.default_rng(0).permutation(3_000)[:700]
    want = read_rows_at(store, rows)
    got = fc.read_client_rows(store, rows, "job-a")
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want, strict=True))
    assert sorted(fc._chunks[("job-a", store_identity(store.path))]) == list(range(6))
    # served from memory: a chunk overwritten after the first read is not read again by the run
    chunk = tmp_path / "s.zarr" / "X" / "c" / "0" / "0"
    chunk.write_bytes(bytes(chunk.stat().st_size))
    again = fc.read_client_rows(store, rows[::-1], "job-a")
    assert np.array_equal(again[0], want[0][::-1]) and np.array_equal(again[1], want[1][::-1])
    # another run drops them and reads the store (which now fails its checksum, naming the chunk)
    with pytest.raises(StoreError, match="chunk 0 of array 'X'"):
        fc.read_client_rows(store, rows, "job-b")
    assert ("job-a", store_identity(store.path)) not in fc._chunks
    # a store larger than the worker's budget is read from the store every time
    monkeypatch.setattr(fc, "CHUNK_CACHE_MAX_BYTES", 1024)
    other = synth(tmp_path / "t.zarr", rows=1_000, features=6, classes=3, force=True)
    assert np.array_equal(
        fc.read_client_rows(other, rows[rows < 1_000], "job-c")[0], read_rows_at(other, rows[rows < 1_000])[0]
    )
    assert ("job-c", store_identity(other.path)) not in fc._chunks

"""The cost of privacy: rounds per second and accuracy after R rounds, side by side, under
:mod:`bench.protocol`.

    python -m bench.privacy            # 500 clients, 50 per round, 30 rounds, 5 passes
    python -m bench.privacy --quick    # tiny smoke run (1 pass)

A synthetic 10-class store (``pipeline.synth``, 64 features) is split IID among ``--clients``
simulated clients (``pipeline.partition``). Each round ``--per-round`` of them are sampled;
each starts from the global weights, trains ``--local-epochs`` passes over its own rows
(``pipeline.loop``'s trainer, SGD lr 0.1, batch 10, MLP 64-64-10) and pushes its delta to a
real parameter-server job (:class:`pipeline.ps.job.Job`, driven in this process: the same
clipping, noise, accounting and secure-aggregation code a cluster runs, without the network).
With secure aggregation every sampled client makes its X25519 key pair, gets the roster through
the job's key exchange and masks its quantized delta for it (``pipeline.secagg``), as the worker
does. The server is FedAvg (server SGD lr 1 on the equal-weight mean of the clipped deltas).

Rows: no privacy; clipping alone (central DP's clip, no noise: what clipping costs); central DP
at epsilon about 1, 3 and 8 (delta 1e-5) after R rounds, the
noise multiplier chosen by ``pipeline.privacy.noise_for_epsilon`` for the schedule (sampling
rate ``per_round / clients``); secure aggregation alone; secure aggregation with DP at epsilon
about 3. Reported: the noise multiplier, epsilon spent, test accuracy after the last round and
rounds per second (wall time of the whole round: local training of the sampled clients, one
after the other, key exchange, masking, the server's work).

Passes: every row trains its R rounds once per pass, ``--passes`` (default 5: a full run takes
about 3-5 minutes on 2 cores, most of it in the two secure-aggregation rows) interleaved passes,
the order rotated by one row per pass; rounds per second is the median over the passes and each
row is compared with "no privacy" by its per-pass ratio (median, range, every pass). The client
sampling and shuffling come from a fixed seed and the job's DP noise from a seeded generator
(``privacy["seed"]``, which the job accepts for tests and benchmarks; a real run draws it from
OS entropy), so every pass trains the same model: the accuracy and epsilon columns are the first
pass's, and the table says whether every pass gave the same accuracy. Per pass the machine's
conditions are recorded (load, steal, other processes' CPU, GEMM peaks). Raw figures:
``bench/results/privacy-*.json`` (quick runs: ``bench/out/results/privacy-quick-*.json``); the
accuracy-against-epsilon figure goes to ``bench/out/privacy.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import md_table, mnist_like, tmpdir, write_out

TITLE = "The cost of privacy: DP, secure aggregation, both"
DELTA = 1e-5
CLIP = 0.5
NOISE_SEED = 2  # the DP noise generator's seed: every pass draws the same noise
SAMPLING_SEED = 1  # client sampling and local shuffling


def _configs(rounds: int, q: float) -> list[tuple[str, dict, float | None]]:
    """(label, the job's privacy settings, target epsilon) per row."""
    from pipeline.privacy import noise_for_epsilon

    rows: list[tuple[str, dict, float | None]] = [
        ("no privacy", {}, None),
        ("clipping only (no noise)", {"dp": "central", "noise_multiplier": 0.0}, None),
    ]
    for eps in (8.0, 3.0, 1.0):
        z = noise_for_epsilon(eps, rounds, q, DELTA)
        rows.append((f"central DP, epsilon {eps:g}", {"dp": "central", "noise_multiplier": z}, eps))
    rows.append(("secure aggregation", {"secure_aggregation": True}, None))
    z = noise_for_epsilon(3.0, rounds, q, DELTA)
    rows.append(
        (
            "secure aggregation + DP, epsilon 3",
            {"dp": "central", "noise_multiplier": z, "secure_aggregation": True},
            3.0,
        )
    )
    return rows


async def _client(job: Any, name: str, delta: np.ndarray, secure: bool) -> None:
    """One sampled client's push: plain, or through the key exchange and masking."""
    from pipeline.privacy import clip_update
    from pipeline.secagg import mask, new_keypair, quantize, round_info, scale_for

    version = job.version
    if not secure:
        await job.push(name, version, delta, samples=len(delta), batches=1, loss=0.0)
        return
    clip_update(delta, CLIP)
    while True:
        private, public = new_keypair()
        r = await job.exchange_keys(name, version, public)
        roster, attempt = r["roster"], r["attempt"]
        q = quantize(delta, scale_for(len(roster), CLIP))
        masked = mask(q, name, private, roster, round_info(job.job, version, attempt, sorted(roster)))
        reply = await job.push(name, version, masked.view(np.float32), samples=1, batches=1, loss=0.0, attempt=attempt)
        if not reply.get("redo"):
            return


def _train_row(
    settings: dict, data: list, Xte: np.ndarray, yte: np.ndarray, start: np.ndarray, tr: Any, args: Any
) -> dict[str, Any]:
    """Train one row's R rounds from ``start``: its test accuracy after the last round, rounds
    per second over the rounds, epsilon spent and the rounds the job applied."""
    from pipeline.loop import load_local_state, run_batches
    from pipeline.ps.job import Job

    privacy = {
        "clip_norm": CLIP,
        "delta": DELTA,
        "sampling_rate": args.per_round / args.clients,
        "seed": NOISE_SEED,
        **settings,
    }
    secure = bool(settings.get("secure_aggregation"))
    rng = np.random.default_rng(SAMPLING_SEED)
    batch = 10

    async def run() -> tuple[Any, float]:
        job = Job.create(
            "bench-privacy",
            start.copy(),
            start.size,
            mode="sync",
            aggregate="mean",
            optimizer={"name": "sgd", "lr": 1.0},
            privacy=privacy if (settings.get("dp") or secure) else None,
        )
        t0 = time.perf_counter()
        for _ in range(args.rounds):
            sampled = sorted(rng.choice(len(data), args.per_round, replace=False).tolist())
            names = [f"c{k}" for k in sampled]
            job.expect(names, [None] * len(names))
            deltas = {}
            for k, name in zip(sampled, names, strict=True):
                X, y = data[k]
                tr.set_params(job.params)
                load_local_state(tr, None)
                for _ in range(args.local_epochs):
                    order = rng.permutation(len(X))
                    run_batches(
                        tr, ((X[order[a : a + batch]], y[order[a : a + batch]]) for a in range(0, len(X), batch))
                    )
                deltas[name] = job.params - tr.get_params()
                job.join(name)
            await asyncio.gather(*(_client(job, n, d, secure) for n, d in deltas.items()))
            for name in names:
                job.leave(name)
        return job, time.perf_counter() - t0

    job, seconds = asyncio.run(run())
    tr.set_params(job.params)
    acc = float(np.mean(tr.forward(Xte).argmax(axis=1) == yte))
    return {
        "test acc": acc,
        "rounds/s": args.rounds / seconds,
        "seconds": seconds,
        "epsilon": job.epsilon(),
        "rounds": job.version,
    }


def run(args: Any, passes: int = 5) -> tuple[str, dict[str, Any]]:
    """Every row once per pass, ``passes`` interleaved passes; the table text and the raw figures."""
    from pipeline.config import TrainConfig
    from pipeline.loop import make_trainer
    from pipeline.partition import make_partition
    from pipeline.store import read_rows_at
    from pipeline.train import task_config

    features, n_classes = 64, 10
    m = protocol.meta()
    q = args.per_round / args.clients
    configs = _configs(args.rounds, q)
    with tmpdir("bench-privacy-") as tmp:
        train, test = mnist_like(tmp, args.rows, args.rows // 4, features, n_classes)
        part = make_partition(train, args.clients, "iid", seed=0, out=tmp / "partition")
        mean, std = train.mean.astype(np.float32), train.std.astype(np.float32)
        data = []
        for k in range(args.clients):
            X, y = read_rows_at(train, part.rows(k))
            data.append((((X.astype(np.float32) - mean) / std).astype(np.float32), y.astype(np.int32)))
        Xte, yte = test.read_rows(0, test.n_rows)
        Xte = ((Xte.astype(np.float32) - mean) / std).astype(np.float32)
        spec = {"n_in": features, "hidden": [64], "n_out": n_classes, "activation": "relu"}
        tr = make_trainer(spec, task_config(TrainConfig(optimizer="sgd", lr=0.1, batch_size=10)))
        start = tr.get_params()
        # warm-up (kernel compilation, first key agreement): not timed
        _train_row(
            {"secure_aggregation": True}, data, Xte, yte, start, tr, argparse.Namespace(**{**vars(args), "rounds": 1})
        )
        trainers = {
            label: (lambda settings=settings: _train_row(settings, data, Xte, yte, start, tr, args))
            for label, settings, _ in configs
        }
        recs = protocol.run_passes(trainers, passes, cores=2, log=lambda s: print(s, file=sys.stderr, flush=True))
    base = [p["results"]["no privacy"]["rounds/s"] for p in recs]
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    deterministic = True
    for label, settings, target in configs:
        figs = [p["results"][label] for p in recs]
        accs = [f["test acc"] for f in figs]
        deterministic &= len(set(accs)) == 1
        summary[label] = protocol.ratio_summary([f["rounds/s"] for f in figs], base)
        rows.append(
            {
                "setting": label,
                "noise multiplier": settings.get("noise_multiplier", 0.0),
                "epsilon": figs[0]["epsilon"] if settings.get("noise_multiplier") else None,
                "target": target,
                "rounds": figs[0]["rounds"],
                "test acc": accs[0],
                "test acc per pass": accs,
                "rounds/s": float(np.median([f["rounds/s"] for f in figs])),
                "rounds/s per pass": [f["rounds/s"] for f in figs],
            }
        )
    payload = {
        "benchmark": "privacy",
        "meta": m,
        "quick": args.quick,
        "args": {**vars(args), "passes": passes},
        "settings": {"clip_norm": CLIP, "delta": DELTA, "noise_seed": NOISE_SEED, "sampling_seed": SAMPLING_SEED},
        "passes": recs,
        "rows": rows,
        "rounds/s vs no privacy": summary,
        "accuracy identical in every pass": deterministic,
    }
    path = protocol.save_json("privacy-quick" if args.quick else "privacy", payload, args.quick)
    if passes == 1:
        acc_note = "test accuracy and epsilon from the one pass"
    elif deterministic:
        acc_note = f"test accuracy identical in all {passes} passes (fixed seeds, seeded DP noise)"
    else:
        acc_note = f"test accuracy NOT identical across the {passes} passes: the column gives the first pass's"
    shown = []
    for r in rows:
        s = summary[r["setting"]]
        ratio = "reference" if r["setting"] == "no privacy" else protocol.fmt_ratio(s)
        shown.append(
            {
                **{k: v for k, v in r.items() if not k.endswith("per pass")},
                "target": r["target"] if r["target"] is not None else "",
                "rounds/s vs no privacy": ratio,
            }
        )
        if not deterministic:
            shown[-1]["test acc range"] = f"{min(r['test acc per pass']):.4f}-{max(r['test acc per pass']):.4f}"
    lines = [
        *protocol.table_head(TITLE, m),
        f"Synthetic {features} features, {n_classes} classes, {args.rows:,} training rows split IID among "
        f"{args.clients} clients; {args.per_round} sampled per round (q = {q:g}), {args.rounds} rounds of "
        f"{args.local_epochs} local epochs; clip {CLIP}, delta {DELTA:g}; the job in this process (no network). "
        f"Rounds/s: median over {passes} interleaved pass(es), the order rotated per pass, and each row's "
        f"per-pass ratio to no privacy (median (min-max; every pass)); {acc_note}.",
        "",
        md_table(
            shown,
            {"noise multiplier": ".3f", "epsilon": ".3f", "target": "g", "test acc": ".4f", "rounds/s": ".2f"},
        ),
        *protocol.table_tail(recs, path),
    ]
    return "\n".join(lines), payload


def figure(rows: list[dict], stem: str) -> Any:
    """Test accuracy against epsilon (log scale): DP rows as a curve, no privacy and secure
    aggregation alone as horizontal lines, secure aggregation with DP as a marker."""
    from bench.figures import _pyplot, _save

    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.8))
    dp = sorted(
        (r for r in rows if r["epsilon"] is not None and "secure" not in r["setting"]), key=lambda r: r["epsilon"]
    )
    ax.plot([r["epsilon"] for r in dp], [r["test acc"] for r in dp], "o-", color="C0", label="central DP")
    lines = {"no privacy": ("--", "k"), "clipping only (no noise)": (":", "C7"), "secure aggregation": ("-.", "C2")}
    for r in rows:
        if r["epsilon"] is None:
            ls, colour = lines.get(r["setting"], (":", "C4"))
            ax.axhline(r["test acc"], ls=ls, color=colour, lw=1.2, label=f"{r['setting']} (no epsilon)")
        elif "secure" in r["setting"]:
            ax.plot([r["epsilon"]], [r["test acc"]], "s", color="C3", label=r["setting"])
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([r["epsilon"] for r in dp]))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("epsilon spent (delta 1e-5)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, stem)


def main(argv: Sequence[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.privacy", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke run, 1 pass unless --passes is given)")
    ap.add_argument("--passes", type=int, default=None, help="interleaved passes (default 5; --quick: 1)")
    ap.add_argument("--clients", type=int, default=500)
    ap.add_argument("--per-round", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local-epochs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=20_000)
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.per_round, args.rounds, args.rows = 40, 8, 3, 2_000
    passes = args.passes if args.passes is not None else (1 if args.quick else 5)
    text, payload = run(args, passes)
    print(text)
    stem = "privacy" + ("-quick" if args.quick else "")
    write_out(stem, text)
    figure(payload["rows"], stem)
    return text


if __name__ == "__main__":
    main()

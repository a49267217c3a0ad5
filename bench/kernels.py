"""Train-step throughput of the kernel backends against PyTorch at best practice and scikit-learn.

    python -m bench.kernels            # MLP 784-512-256-10, batch 256, Adam, 5 passes
    python -m bench.kernels --quick    # tiny smoke run

Measures this machine's fp32 GEMM peak, validates the ``cpu`` step against the ``numpy``
reference step, then times each trainer's epoch on the same synthetic float32 array in memory
(no reads, no shuffling: every trainer steps through the rows in order), under the protocol of
:mod:`bench.protocol`: ``--passes`` (5) passes, the order rotated per pass, each trainer's best of
``--repeat`` (3) epochs within a pass; per-pass ratios against PyTorch with median and range; the
machine's state (load, steal, other processes, both GEMM peaks) recorded and flagged per pass;
raw figures in ``bench/results/kernels-*.json``.

Trainers: ``cpu`` and ``numpy`` (:class:`kernels.mlp.MLPTrainer`; BLAS at the process's default
threads, both cores here), **pytorch best practice** (``torch.set_num_threads(2)``, the same
initial weights, ``Adam`` fused or foreach as measured faster here (``bench.torch_peers.pick_adam``),
``zero_grad(set_to_none=True)``, ``OMP_WAIT_POLICY=PASSIVE``: the step of
``bench.throughput``'s target row without its shuffling) and scikit-learn's ``MLPClassifier``
(``partial_fit`` over the same rows). This table times steps alone; ``bench.throughput`` times
whole training runs.

FLOPs per sample count the GEMM work a step does: 2 per weight for the forward product, 2 for dW
and 2 for dX, except the first layer whose dX nobody needs (every trainer here skips it):
2 * (3 * n_weights - n_weights_layer0) = 2.41 MFLOP for 784-512-256-10. Biases, activations, the
loss and the optimizer are not counted. "% of GEMM-implied limit" compares against
peak / (that count) samples/s, the peak measured in the same pass; the header also gives the
cruder 6 * n_weights figure.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bench import protocol
from bench.common import write_out
from kernels.mlp import MLPSpec, MLPTrainer, init_params


def _trainer_epoch(tr: MLPTrainer, X: np.ndarray, y: np.ndarray, batch: int) -> Callable[[], None]:
    def epoch() -> None:
        for i in range(0, len(X), batch):
            tr.step(X[i : i + batch], y[i : i + batch])

    return epoch


def validate(spec: MLPSpec, X: np.ndarray, y: np.ndarray, batch: int) -> None:
    """The cpu step must match the numpy reference step before anything is timed."""
    p0 = init_params(spec, seed=1)
    a = MLPTrainer(spec, backend="cpu", max_batch=batch, params=p0)
    b = MLPTrainer(spec, backend="numpy", max_batch=batch, params=p0)
    for i in range(3):
        xb, yb = X[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        la, lb = a.step(xb, yb), b.step(xb, yb)
        if not np.isclose(la, lb, rtol=1e-4):
            raise AssertionError(f"cpu loss {la} != numpy loss {lb}")
    np.testing.assert_allclose(a.get_params(), b.get_params(), rtol=1e-3, atol=1e-5)


def torch_epoch(spec: MLPSpec, X: np.ndarray, y: np.ndarray, batch: int) -> tuple[Callable[[], None], str]:
    """PyTorch at best practice over ``X`` in order: 2 threads, the kernels' initial weights
    (seed 1), the faster of fused and foreach Adam here, gradients set to None. Returns the epoch
    and the Adam kind chosen."""
    import torch

    from bench.torch_peers import adam, build_model, pick_adam

    sizes = list(spec.sizes)
    kind = pick_adam(sizes, batch=batch, threads=2)["kind"]
    torch.set_num_threads(2)
    model = build_model(sizes, seed=1)
    opt = adam(model.parameters(), 1e-3, kind)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))

    def epoch() -> None:
        for i in range(0, len(X), batch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(tx[i : i + batch]), ty[i : i + batch])
            loss.backward()
            opt.step()

    return epoch, kind


def sklearn_epoch(spec: MLPSpec, X: np.ndarray, y: np.ndarray, batch: int) -> Callable[[], None]:
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=spec.hidden,
        activation="relu",
        solver="adam",
        batch_size=batch,
        learning_rate_init=1e-3,
        alpha=0.0,
        shuffle=False,
        random_state=0,
    )
    classes = np.arange(spec.n_out)

    def epoch() -> None:  # partial_fit = one pass over the data in minibatches of `batch`
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.partial_fit(X, y, classes=classes)

    return epoch


TORCH = "pytorch best practice"


def run(quick: bool = False, repeat: int = 3, passes: int = 5) -> tuple[str, dict[str, Any]]:
    """Run the whole benchmark; returns the markdown table and the raw figures (also saved)."""
    if quick:
        spec, batch, n_batches, peak_n = MLPSpec(64, (32, 16), 10), 32, 4, 256
        repeat, passes = 1, 1
    else:
        spec, batch, n_batches, peak_n = MLPSpec(784, (512, 256), 10), 256, 40, 2048
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch * n_batches, spec.n_in), dtype=np.float32)
    y = rng.integers(0, spec.n_out, size=len(X)).astype(np.int64)
    w_sizes = [v.size for v in spec.layout() if v.name.startswith("W")]
    flops = 2 * (3 * sum(w_sizes) - w_sizes[0])
    validate(spec, X, y, batch)

    epochs: dict[str, Callable[[], None]] = {}
    for backend in ("cpu", "numpy"):
        tr = MLPTrainer(spec, backend=backend, max_batch=batch, params=init_params(spec, 1))
        epochs[backend] = _trainer_epoch(tr, X, y, batch)
    adam_kind = None
    try:
        epochs[TORCH], adam_kind = torch_epoch(spec, X, y, batch)
    except ImportError:
        pass
    epochs["sklearn-mlp"] = sklearn_epoch(spec, X, y, batch)
    for epoch in epochs.values():
        epoch()  # warm-up: compilation, caches, buffer allocation

    def timed(epoch: Callable[[], None]) -> Callable[[], dict[str, Any]]:
        def one() -> dict[str, Any]:
            best = float("inf")
            for _ in range(repeat):
                t0 = time.perf_counter()
                epoch()
                best = min(best, time.perf_counter() - t0)
            return {"samples/s": len(X) / best}

        return one

    records = protocol.run_passes({k: timed(e) for k, e in epochs.items()}, passes=passes, peak_n=peak_n)
    names = list(epochs)
    rate = {k: [r["results"][k]["samples/s"] for r in records] for k in names}
    peaks = [r["conditions"]["gemm_numpy_gflops"] for r in records]  # GFLOP/s, each pass its own
    limit = [p * 1e9 / flops for p in peaks]  # samples/s the pass's GEMM peak allows
    ratios = {k: protocol.ratio_summary(rate[k], rate[TORCH]) for k in names if TORCH in rate}
    payload: dict[str, Any] = {
        "benchmark": "kernels",
        "meta": protocol.meta(),
        "quick": quick,
        "sizes": list(spec.sizes),
        "batch": batch,
        "samples_per_epoch": len(X),
        "repeat": repeat,
        "flops_per_sample": flops,
        "adam": adam_kind,
        "passes": records,
        "ratios_vs_torch": ratios,
    }
    path = protocol.save_json("kernels", payload, quick=quick)
    payload["meta"]["json"] = str(path)
    arch = "-".join(map(str, spec.sizes))
    lines = [
        f"MLP {arch}, batch {batch}, Adam, fp32, {len(X)} samples per timed epoch (in memory, in order), "
        f"best of {repeat} epochs per trainer in each of {passes} interleaved passes, order rotated; "
        f"{flops / 1e6:.3f} GEMM MFLOP/sample ({6 * sum(w_sizes) / 1e6:.3f} as 6 x weights); NumPy GEMM peak "
        f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s, the limit of each pass from its own peak.",
        "",
        *protocol.provenance_lines(payload["meta"]),
        f"PyTorch Adam: {adam_kind or 'n/a'} (the faster here).",
        "",
        "Conditions per pass:",
        "",
        protocol.conditions_table(records),
        "",
        "| trainer | samples/s (median) | samples/s per pass | % of GEMM-implied limit (median) "
        "| vs PyTorch best practice (per pass) |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for k in names:
        share = float(np.median([a / b for a, b in zip(rate[k], limit, strict=True)]))
        vs = protocol.fmt_ratio(ratios[k]) if k in ratios else "n/a"
        per = " / ".join(f"{x / 1e3:.1f}k" for x in rate[k])
        lines.append(f"| {k} | {float(np.median(rate[k])):,.0f} | {per} | {100 * share:.0f}% | {vs} |")
    return "\n".join(lines), payload


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; prints and returns the table."""
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one pass (smoke run)")
    ap.add_argument("--repeat", type=int, default=3, help="timed epochs per trainer in each pass (best kept)")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes, the order rotated")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench.throughput: before torch loads
    table, _ = run(quick=args.quick, repeat=args.repeat, passes=args.passes)
    print(table)
    write_out("kernels" + ("-quick" if args.quick else ""), table)
    return table


if __name__ == "__main__":
    main()

"""Train-step throughput of the kernel backends against PyTorch CPU and scikit-learn, in one run.

    python -m bench.kernels            # MLP 784-512-256-10, batch 256, Adam
    python -m bench.kernels --quick    # tiny smoke run

Measures this machine's fp32 GEMM peak first (NumPy matmul of large square matrices), validates
the ``cpu`` step against the ``numpy`` reference step, then times each trainer on the same
synthetic data, round-robin so background load hits every trainer alike.

FLOPs per sample count the GEMM work a step does: 2 per weight for the forward product, 2 for dW
and 2 for dX, except the first layer whose dX nobody needs (every trainer here skips it):
2 * (3 * n_weights - n_weights_layer0) = 2.41 MFLOP for 784-512-256-10. Biases, activations, the
loss and the optimizer are not counted. "% of GEMM-implied limit" compares against
peak / (that count) samples/s; the header also gives the cruder 6 * n_weights figure.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.protocol import gemm_peak_numpy
from kernels.mlp import MLPSpec, MLPTrainer, init_params, views


@dataclass
class Row:
    name: str
    samples_per_s: float


def _best_rates(epochs: dict[str, Callable[[], None]], n_samples: int, repeat: int) -> dict:
    """Samples/s of each epoch function, best of ``repeat``, timed round-robin.

    Interleaving the trainers spreads any background load on the machine evenly over them.
    """
    for epoch in epochs.values():
        epoch()  # warm-up: compilation, caches, buffer allocation
    best = dict.fromkeys(epochs, np.inf)
    for _ in range(repeat):
        for name, epoch in epochs.items():
            t0 = time.perf_counter()
            epoch()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n_samples / t for name, t in best.items()}


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


def torch_epoch(spec: MLPSpec, X: np.ndarray, y: np.ndarray, batch: int) -> Callable[[], None]:
    import torch

    torch.set_num_threads(2)
    layers: list = []
    s = spec.sizes
    pv = views(spec, init_params(spec, seed=1))
    for i in range(spec.n_layers):
        lin = torch.nn.Linear(s[i], s[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(pv[f"W{i}"].T.copy()))
            lin.bias.zero_()
        layers.append(lin)
        if i < spec.n_layers - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    tx, ty = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))

    def epoch() -> None:
        for i in range(0, len(X), batch):
            opt.zero_grad(set_to_none=False)
            loss = loss_fn(model(tx[i : i + batch]), ty[i : i + batch])
            loss.backward()
            opt.step()

    return epoch


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


def run(quick: bool = False, repeat: int = 5) -> tuple[str, dict[str, float]]:
    """Run the whole benchmark; returns the markdown table and the measured numbers."""
    if quick:
        spec, batch, n_batches, peak_n = MLPSpec(64, (32, 16), 10), 32, 4, 256
        repeat = 1
    else:
        spec, batch, n_batches, peak_n = MLPSpec(784, (512, 256), 10), 256, 40, 2048
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch * n_batches, spec.n_in), dtype=np.float32)
    y = rng.integers(0, spec.n_out, size=len(X)).astype(np.int64)
    load = os.getloadavg()[0]
    peak = gemm_peak_numpy(peak_n)
    w_sizes = [v.size for v in spec.layout() if v.name.startswith("W")]
    flops = 2 * (3 * sum(w_sizes) - w_sizes[0])
    limit = peak * 1e9 / flops
    validate(spec, X, y, batch)

    epochs: dict[str, Callable[[], None]] = {}
    for backend in ("cpu", "numpy"):
        tr = MLPTrainer(spec, backend=backend, max_batch=batch, params=init_params(spec, 1))
        epochs[backend] = _trainer_epoch(tr, X, y, batch)
    try:
        epochs["pytorch-cpu"] = torch_epoch(spec, X, y, batch)
    except ImportError:
        pass
    epochs["sklearn-mlp"] = sklearn_epoch(spec, X, y, batch)
    rows = [Row(k, v) for k, v in _best_rates(epochs, len(X), repeat).items()]

    torch_sps = next((r.samples_per_s for r in rows if r.name == "pytorch-cpu"), None)
    arch = "-".join(map(str, spec.sizes))
    lines = [
        f"MLP {arch}, batch {batch}, Adam, fp32, {len(X)} samples per timed epoch, best of "
        f"{repeat}; GEMM peak {peak:.1f} GFLOP/s; {flops / 1e6:.3f} GEMM MFLOP/sample "
        f"({6 * sum(w_sizes) / 1e6:.3f} as 6 x weights); "
        f"limit {limit:,.0f} samples/s; load average before the run {load:.2f}",
        "",
        "| trainer | samples/s | GFLOP/s | % of GEMM-implied limit | vs PyTorch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    numbers = {"peak_gflops": peak, "limit": limit}
    for r in rows:
        ratio = f"{r.samples_per_s / torch_sps:.2f}x" if torch_sps else "n/a"
        lines.append(
            f"| {r.name} | {r.samples_per_s:,.0f} | {r.samples_per_s * flops / 1e9:.1f} | "
            f"{100 * r.samples_per_s / limit:.0f}% | {ratio} |"
        )
        numbers[r.name] = r.samples_per_s
    return "\n".join(lines), numbers


def main(argv: Sequence[str] | None = None) -> str:
    """Command-line entry point; prints and returns the table."""
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke run)")
    ap.add_argument("--repeat", type=int, default=5, help="timed epochs per trainer (best kept)")
    args = ap.parse_args(argv)
    table, _ = run(quick=args.quick, repeat=args.repeat)
    print(table)
    return table


if __name__ == "__main__":
    main()

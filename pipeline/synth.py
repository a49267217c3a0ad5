"""Synthetic, learnable datasets of any size, generated block by block.

A fixed random *teacher* network (``features -> hidden (tanh) -> outputs``, weights drawn from
``seed``) labels Gaussian inputs. Rows are generated in blocks of ``BLOCK_ROWS`` rows, block ``i``
from its own generator seeded by ``(seed, i)``: the data depend on the seed only, not on the chunk
size, and memory holds one block plus one store chunk whatever the number of rows.

* classification: ``argmax(teacher logits + noise * N(0, s) + bias)`` where ``s`` is the logits'
  standard deviation and the per-class ``bias`` is calibrated on a 20,000-row sample so the classes
  come out roughly balanced;
* regression (``classes`` None or 0): the teacher's single output, standardized on the sample,
  plus ``noise * N(0, 1)``.

``dtype="uint8"`` quantizes inputs to 0..255 (``round(32 x + 128)``, clipped) and the teacher sees
the dequantized values: a compact image-like store.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from pipeline.progress import Progress
from pipeline.store import RunningStats, Store, create_store, default_chunk_rows, empty_local_dir

BLOCK_ROWS = 4096
_SAMPLE_ROWS = 20_000


class _Teacher:
    def __init__(self, features: int, hidden: int, outputs: int, seed: int, noise: float, uint8: bool) -> None:
        rng = np.random.default_rng([seed, 0x7EAC4E2])
        self.w1 = (rng.standard_normal((features, hidden)) * (2.0 / np.sqrt(features))).astype(np.float32)
        self.b1 = (rng.standard_normal(hidden) * 0.5).astype(np.float32)
        self.w2 = (rng.standard_normal((hidden, outputs)) / np.sqrt(hidden)).astype(np.float32)
        self.bias = np.zeros(outputs, np.float32)
        self.scale = 1.0
        self.shift = 0.0
        self.noise = noise
        self.uint8 = uint8
        self.features = features

    def inputs(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(stored X, X as the teacher sees it)."""
        x = rng.standard_normal((n, self.features), dtype=np.float32)
        if not self.uint8:
            return x, x
        q = np.clip(np.rint(x * 32 + 128), 0, 255).astype(np.uint8)
        return q, (q.astype(np.float32) - 128) / 32

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1 + self.b1) @ self.w2


def synth(
    dest: str | os.PathLike,
    *,
    rows: int,
    features: int,
    classes: int | None = None,
    hidden: int = 64,
    noise: float = 0.1,
    seed: int = 0,
    chunk_rows: int | None = None,
    codec: str | None = None,
    dtype: str = "float32",
    force: bool = False,
    progress: bool = False,
) -> Store:
    """Write a synthetic store of ``rows`` x ``features`` at ``dest``; see the module docstring.
    An empty directory at ``dest`` holds nothing to lose: it is filled without ``force``."""
    force = force or empty_local_dir(dest)
    if rows <= 0 or features <= 0 or hidden <= 0:
        raise StoreError("--rows, --features and hidden must be positive")
    if classes is not None and classes == 1 or (classes or 0) < 0:
        raise StoreError(f"--classes {classes}: need at least 2 classes (or --regression)")
    if dtype not in ("float32", "uint8"):
        raise StoreError(f"--dtype {dtype!r}: choose float32 or uint8")
    if noise < 0:
        raise StoreError("--noise must be >= 0")
    regression = not classes
    n_out = 1 if regression else int(classes)
    teacher = _Teacher(features, hidden, n_out, seed, noise, dtype == "uint8")
    # calibrate on a sample (generated block by block): logit scale, per-class bias (balance),
    # regression standardization
    srng = np.random.default_rng([seed, 0x5A3])
    sample = max(2000, min(_SAMPLE_ROWS, 2**24 // (4 * features)))  # <= ~16 MB of inputs
    z = np.concatenate(
        [teacher.logits(teacher.inputs(srng, min(BLOCK_ROWS, sample - a))[1]) for a in range(0, sample, BLOCK_ROWS)]
    )
    if regression:
        teacher.shift, teacher.scale = float(z.mean()), float(z.std() or 1.0)
    else:
        teacher.scale = float(z.std() or 1.0)
        zn = z + noise * teacher.scale * srng.standard_normal(z.shape, dtype=np.float32)
        for _ in range(200):
            freq = np.bincount(np.argmax(zn + teacher.bias, axis=1), minlength=n_out) / len(zn)
            teacher.bias -= (0.5 * teacher.scale * (np.log(freq + 1e-3) - np.log(1.0 / n_out))).astype(np.float32)
    attrs: dict[str, Any] = {
        "task": "regression" if regression else "classification",
        "classes": None if regression else [str(i) for i in range(n_out)],
        "feature_names": [f"x{i}" for i in range(features)],
        "encodings": [],
        "source": {
            "format": "synthetic",
            "generator": "pipeline.synth teacher MLP",
            "rows": rows,
            "features": features,
            "classes": n_out if not regression else 0,
            "hidden": hidden,
            "noise": noise,
            "seed": seed,
            "dtype": dtype,
        },
    }
    xstats = RunningStats(features)
    ystats = RunningStats(1)
    counts = np.zeros(n_out, np.int64)
    prog = Progress(f"synth {os.fspath(dest)}", total=rows, enabled=progress)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(features * (1 if dtype == "uint8" else 4), rows)
    with create_store(
        dest,
        features,
        x_dtype=np.uint8 if dtype == "uint8" else np.float32,
        y_dtype=np.float32 if regression else np.int32,
        chunk_rows=chunk_rows,
        codec=codec,
        force=force,
        attrs=attrs,
    ) as w:
        for b, start in enumerate(range(0, rows, BLOCK_ROWS)):
            n = min(BLOCK_ROWS, rows - start)
            rng = np.random.default_rng([seed, 1, b])
            x, xt = teacher.inputs(rng, n)
            z = teacher.logits(xt)
            eps = rng.standard_normal(z.shape, dtype=np.float32)
            if regression:
                y = ((z[:, 0] - teacher.shift) / teacher.scale + noise * eps[:, 0]).astype(np.float32)
                ystats.update(y[:, None])
            else:
                y = np.argmax(z + noise * teacher.scale * eps + teacher.bias, axis=1).astype(np.int32)
                counts += np.bincount(y, minlength=n_out)
            xstats.update(x)
            w.append(x, y)
            prog.update(n)
        prog.done()
        w.attrs["mean"] = xstats.mean.tolist()
        w.attrs["std"] = xstats.std.tolist()
        if regression:
            w.attrs["target"] = {
                "name": "y",
                "kind": "numeric",
                "mean": ystats.mean.tolist(),
                "std": ystats.std.tolist(),
            }
        else:
            w.attrs["target"] = {
                "name": "y",
                "kind": "numeric",
                "class_values": list(range(n_out)),
                "class_counts": counts.tolist(),
            }
    return w.commit_result

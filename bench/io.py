"""I/O benchmark: ingest throughput and loader throughput against a plain Zarr read, per codec.

    python -m bench.io            # full: a ~300 MB CSV, ~470 MB stores (a few minutes)
    python -m bench.io --quick    # seconds; what the smoke test runs

Everything is measured in one run on the same machine, so compare the ratios:

* ingest MB/s: source file bytes / wall time of ``pipeline.ingest.ingest`` (two streaming passes),
  for the same table written as CSV and as Parquet;
* per codec (none / lz4 / zstd), one synthetic store (784 float32 features, the MNIST shape):
  ``zarr read``: every row chunk read in order with ``X[a:b]`` (the floor any loader pays);
  ``loader``: one shuffled epoch of :class:`pipeline.loader.ChunkLoader` (batch 256, shuffle buffer,
  float32 conversion and normalization included), rows/s and MB/s of uncompressed X;
  ``loader wait``: the share of the loader's wall time the consumer was blocked on reads.
* full mode also sweeps the chunk size of the default codec (4/16/64 MB) with the plain read.

The stores are read right after being written, so they are in the page cache: this measures
decode + copy + loader work, not the disk (which a cluster's object store would dominate).
Validation first: the loader must return every row exactly once before it is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_sources(tmp: Path, rows: int) -> tuple[Path, Path]:
    """The same table as CSV and Parquet: 20 float columns, one 5-category string, a label."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    csv_path, pq_path = tmp / "table.csv", tmp / "table.parquet"
    block = 100_000
    writer_pq = None
    with open(csv_path, "wb") as fcsv:
        for a in range(0, rows, block):
            n = min(block, rows - a)
            cols = {f"f{j}": np.round(rng.standard_normal(n), 5) for j in range(20)}
            cols["cat"] = rng.choice(np.array(["alpha", "beta", "gamma", "delta", "eps"]), n)
            cols["label"] = rng.integers(0, 10, n)
            t = pa.table(cols)
            pcsv.write_csv(t, fcsv, write_options=pcsv.WriteOptions(include_header=a == 0))
            if writer_pq is None:
                writer_pq = pq.ParquetWriter(pq_path, t.schema)
            writer_pq.write_table(t)
    writer_pq.close()
    return csv_path, pq_path


def bench_ingest(tmp: Path, rows: int) -> list[dict]:
    from pipeline.ingest import ingest

    out = []
    for src in write_sources(tmp, rows):
        size = src.stat().st_size
        t = time.perf_counter()
        st = ingest(src, tmp / f"{src.suffix[1:]}.zarr", force=True)
        dt = time.perf_counter() - t
        assert st.n_rows == rows and st.n_features == 25
        out.append(
            {
                "what": f"ingest {src.suffix[1:]}",
                "MB": size / 1e6,
                "s": dt,
                "MB/s": size / 1e6 / dt,
                "rows/s": rows / dt,
            }
        )
    return out


def plain_read(store) -> float:
    t = time.perf_counter()
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        np.asarray(store.X[sl])
        np.asarray(store.y[sl])
    return time.perf_counter() - t


def loader_epoch(store, epoch: int) -> tuple[float, float, int]:
    from pipeline.loader import ChunkLoader

    with ChunkLoader(store, batch_size=256, seed=0, buffer_chunks=4, prefetch=2) as L:
        t = time.perf_counter()
        n = 0
        for X, _ in L.epoch(epoch):
            n += len(X)
        return time.perf_counter() - t, L.read_seconds, n


def bench_codecs(tmp: Path, rows: int, features: int, chunk_rows: int | None) -> list[dict]:
    from pipeline.loader import ChunkLoader
    from pipeline.synth import synth

    out = []
    for codec in ("none", "lz4", "zstd"):
        path = tmp / f"synth-{codec}.zarr"
        st = synth(path, rows=rows, features=features, classes=10, codec=codec, chunk_rows=chunk_rows, force=True)
        mb = st.X.nbytes / 1e6
        # validate: one shuffled epoch covers each row exactly once (first column is unique enough)
        with ChunkLoader(st, batch_size=256, normalize=False) as L:
            seen = np.concatenate([X[:, 0] for X, _ in L.epoch(0)])
        ref = np.concatenate([st.read_chunk(i)[0][:, 0] for i in range(st.n_chunks)])
        assert len(seen) == rows and np.array_equal(np.sort(seen), np.sort(ref)), "loader lost or duplicated rows"
        plain_read(st)  # warm the page cache
        t_plain = min(plain_read(st) for _ in range(2))
        t_load, wait, n = min(loader_epoch(st, e) for e in range(2))
        assert n == rows
        out.append(
            {
                "codec": codec,
                "disk MB": _dir_bytes(path) / 1e6,
                "X MB": mb,
                "chunk MB": st.chunk_rows * features * 4 / 1e6,
                "zarr MB/s": mb / t_plain,
                "zarr rows/s": rows / t_plain,
                "loader MB/s": mb / t_load,
                "loader rows/s": rows / t_load,
                "wait": wait / t_load,
            }
        )
    return out


def bench_chunk_sizes(tmp: Path, rows: int, features: int) -> list[dict]:
    from pipeline.synth import synth

    out = []
    for chunk_mb in (4, 16, 64):
        chunk_rows = chunk_mb * 2**20 // (4 * features)
        st = synth(
            tmp / f"chunk{chunk_mb}.zarr",
            rows=rows,
            features=features,
            classes=10,
            codec="lz4",
            chunk_rows=chunk_rows,
            force=True,
        )
        plain_read(st)
        t = min(plain_read(st) for _ in range(2))
        out.append({"chunk MB": chunk_mb, "zarr MB/s": st.X.nbytes / 1e6 / t})
    return out


def table(rows: list[dict], fmt: dict[str, str]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        lines.append(
            "| " + " | ".join(format(r[k], fmt.get(k, "")) if not isinstance(r[k], str) else r[k] for k in head) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.io", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the smoke test")
    ap.add_argument("--out", default="bench/out/io.md", help="also write the tables here ('' = no file)")
    args = ap.parse_args(argv)
    if args.quick:
        csv_rows, rows, features, chunk_rows = 5_000, 6_000, 64, 1000
    else:
        csv_rows, rows, features, chunk_rows = 1_500_000, 150_000, 784, None
    with tempfile.TemporaryDirectory(prefix="bench-io-") as d:
        tmp = Path(d)
        ing = bench_ingest(tmp, csv_rows)
        cod = bench_codecs(tmp, rows, features, chunk_rows)
        chk = [] if args.quick else bench_chunk_sizes(tmp, rows, features)
    f = {
        "MB": ".1f",
        "s": ".2f",
        "MB/s": ".0f",
        "rows/s": ",.0f",
        "disk MB": ".1f",
        "X MB": ".1f",
        "chunk MB": ".1f",
        "zarr MB/s": ".0f",
        "zarr rows/s": ",.0f",
        "loader MB/s": ".0f",
        "loader rows/s": ",.0f",
        "wait": ".0%",
    }
    best = max(cod, key=lambda r: r["loader MB/s"])
    parts = [
        f"## bench.io ({'quick' if args.quick else 'full'}; {os.cpu_count()} cores, python {sys.version.split()[0]})",
        "",
        "### ingest (25-column table: 20 floats, 1 string, 1 label)",
        "",
        table(ing, f),
        "",
        f"### read, per codec ({rows:,} rows x {features} float32)",
        "",
        table(cod, f),
        "",
        f"fastest loader: {best['codec']}",
    ]
    if chk:
        parts += ["", "### plain read vs chunk size (lz4)", "", table(chk, {"zarr MB/s": ".0f"})]
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()

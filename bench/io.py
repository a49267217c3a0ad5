"""I/O benchmark: ingest throughput and loader throughput against a plain Zarr read, per codec,
under the measurement protocol of :mod:`bench.protocol`.

    python -m bench.io              # full: a ~270 MB CSV, ~470 MB stores, 5 passes (about 3 minutes)
    python -m bench.io --quick      # seconds (1 pass); what the smoke test runs
    python -m bench.io --passes 3

Everything is measured in one run on the same machine, so compare the ratios:

* ingest MB/s: source file bytes / wall time of ``pipeline.ingest.ingest`` (two streaming passes),
  for the same table written as CSV and as Parquet;
* per codec (none / lz4 / zstd), one synthetic store (784 float32 features, the MNIST shape):
  ``zarr read``: every row chunk read in order with ``X[a:b]`` (the floor any loader pays);
  ``loader``: one shuffled epoch of :class:`pipeline.loader.ChunkLoader` (batch 256, shuffle buffer,
  float32 conversion and normalization included), rows/s and MB/s of uncompressed X;
  ``loader wait``: the share of the loader's wall time the consumer was blocked on reads.
* full mode also sweeps the chunk size of the default codec (4/16/64 MB) with the plain read.

The source files and the stores are written once, before the passes and outside the timing; then
come untimed warm-ups (a small ingest of each format, one plain read of each store, the
validation epoch). Each of ``--passes`` interleaved passes (default 5: a full run takes about
3 minutes on 2 cores, most of it writing the sources and stores) runs every ingest, plain read and
loader epoch once, the order rotated by one per pass, and records the machine's conditions
(``protocol.measure_pass``). The tables give medians over the passes; the comparisons (ingest
MB/s Parquet / CSV, and per codec loader rows/s / plain-read rows/s) are per-pass ratios with
their median and range. Every run's raw figures go to ``bench/results/io-*.json`` (quick runs to
``bench/out/results/io-quick-*.json``).

The stores are read right after being written, so they are in the page cache: this measures
decode + copy + loader work, not the disk (which a cluster's object store would dominate).
Validation first: the loader must return every row exactly once before it is timed, and every
timed epoch must return every row.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import protocol
from bench.common import OUT, md_table

CODECS = ("none", "lz4", "zstd")
# (CSV/Parquet rows, store rows, features, chunk rows: None = the store's default)
FULL_SIZES = (1_500_000, 150_000, 784, None)
QUICK_SIZES = (5_000, 6_000, 64, 1000)
CHUNK_MB = (4, 16, 64)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_sources(tmp: Path, rows: int) -> tuple[Path, Path]:
    """The same table as CSV and Parquet: 20 float columns, one 5-category string, a label."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    tmp.mkdir(parents=True, exist_ok=True)
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


def ingest_once(src: Path, dest: Path, rows: int) -> dict[str, float]:
    """One timed ``pipeline.ingest.ingest`` of ``src`` into ``dest`` (overwritten), checked."""
    from pipeline.ingest import ingest

    size = src.stat().st_size
    t = time.perf_counter()
    st = ingest(src, dest, force=True)
    dt = time.perf_counter() - t
    if st.n_rows != rows or st.n_features != 25:
        raise AssertionError(f"ingest of {src.name}: {st.n_rows} rows x {st.n_features} features")
    return {"MB": size / 1e6, "s": dt, "MB/s": size / 1e6 / dt, "rows/s": rows / dt}


def plain_read(store: Any) -> float:
    """Seconds to read every row chunk of ``X`` and ``y`` in order."""
    t = time.perf_counter()
    for i in range(store.n_chunks):
        sl = store.chunk_slice(i)
        np.asarray(store.X[sl])
        np.asarray(store.y[sl])
    return time.perf_counter() - t


def loader_epoch(store: Any, epoch: int) -> tuple[float, float, int]:
    """Wall seconds, read-blocked seconds and rows of one shuffled :class:`ChunkLoader` epoch."""
    from pipeline.loader import ChunkLoader

    with ChunkLoader(store, batch_size=256, seed=0, buffer_chunks=4, prefetch=2) as L:
        t = time.perf_counter()
        n = 0
        for X, _ in L.epoch(epoch):
            n += len(X)
        return time.perf_counter() - t, L.read_seconds, n


def validate_loader(store: Any) -> None:
    """One shuffled epoch covers each row exactly once (the first column is unique enough)."""
    from pipeline.loader import ChunkLoader

    with ChunkLoader(store, batch_size=256, normalize=False) as L:
        seen = np.concatenate([X[:, 0] for X, _ in L.epoch(0)])
    ref = np.concatenate([store.read_chunk(i)[0][:, 0] for i in range(store.n_chunks)])
    if len(seen) != store.n_rows or not np.array_equal(np.sort(seen), np.sort(ref)):
        raise AssertionError("loader lost or duplicated rows")


def make_stores(tmp: Path, rows: int, features: int, chunk_rows: int | None, sweep: bool) -> dict[str, Any]:
    """The synthetic stores (untimed): one per codec and, with ``sweep``, one per lz4 chunk size."""
    from pipeline.synth import synth

    stores = {}
    for codec in CODECS:
        stores[codec] = synth(
            tmp / f"synth-{codec}.zarr",
            rows=rows,
            features=features,
            classes=10,
            codec=codec,
            chunk_rows=chunk_rows,
            force=True,
        )
    for mb in CHUNK_MB if sweep else ():
        stores[f"lz4 {mb} MB"] = synth(
            tmp / f"chunk{mb}.zarr",
            rows=rows,
            features=features,
            classes=10,
            codec="lz4",
            chunk_rows=mb * 2**20 // (4 * features),
            force=True,
        )
    return stores


def trainers(tmp: Path, sources: tuple[Path, Path], csv_rows: int, stores: dict[str, Any]) -> dict[str, Callable]:
    """The timed parts, one call each per pass: ingest per format, plain read and loader epoch per
    codec, plain read per chunk size. Each loader epoch is a new shuffle (epoch 1, 2, ...)."""
    fns: dict[str, Callable[[], dict[str, Any]]] = {}
    for src in sources:
        fmt = src.suffix[1:]
        fns[f"ingest {fmt}"] = lambda src=src, fmt=fmt: ingest_once(src, tmp / f"{fmt}.zarr", csv_rows)

    def read(st: Any) -> dict[str, float]:
        t = plain_read(st)
        return {"s": t, "MB/s": st.X.nbytes / 1e6 / t, "rows/s": st.n_rows / t}

    def load(st: Any, epochs: Iterator[int]) -> dict[str, float]:
        t, wait, n = loader_epoch(st, next(epochs))
        if n != st.n_rows:
            raise AssertionError(f"loader epoch returned {n} of {st.n_rows} rows")
        return {"s": t, "MB/s": st.X.nbytes / 1e6 / t, "rows/s": n / t, "wait": wait / t}

    for name, st in stores.items():
        fns[f"zarr read {name}"] = lambda st=st: read(st)
        if name in CODECS:
            epochs = itertools.count(1)  # the validation epoch was 0
            fns[f"loader {name}"] = lambda st=st, e=epochs: load(st, e)
    return fns


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _median(passes: list[dict[str, Any]], name: str, key: str) -> float:
    return float(np.median([p["results"][name][key] for p in passes]))


def _per_pass(passes: list[dict[str, Any]], name: str, key: str) -> list[float]:
    return [p["results"][name][key] for p in passes]


def run(quick: bool = False, passes: int = 5) -> tuple[str, dict[str, Any]]:
    """Write the sources and stores, run the interleaved passes, save the raw figures; returns
    the tables' text and the saved payload."""
    csv_rows, rows, features, chunk_rows = QUICK_SIZES if quick else FULL_SIZES
    passes = 1 if quick else passes
    sweep = not quick
    m = protocol.meta()
    with tempfile.TemporaryDirectory(prefix="bench-io-") as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        sources = write_sources(tmp, csv_rows)
        stores = make_stores(tmp, rows, features, chunk_rows, sweep)
        setup_s = time.perf_counter() - t0
        # untimed warm-ups: each format's ingest once on a small table, each store read once
        for src in write_sources(tmp / "warm", 1_000):
            ingest_once(src, tmp / "warm" / f"{src.suffix[1:]}.zarr", 1_000)
        for name, st in stores.items():
            if name in CODECS:
                validate_loader(st)
            plain_read(st)
        store_facts = {
            name: {
                "disk MB": _dir_bytes(st.path) / 1e6,
                "X MB": st.X.nbytes / 1e6,
                "chunk MB": st.chunk_rows * features * 4 / 1e6,
                "chunk_rows": st.chunk_rows,
            }
            for name, st in stores.items()
        }
        recs = protocol.run_passes(trainers(tmp, sources, csv_rows, stores), passes, cores=2, log=_log)

    ingest_rows = [
        {
            "what": f"ingest {fmt}",
            "MB": recs[0]["results"][f"ingest {fmt}"]["MB"],
            **{k: _median(recs, f"ingest {fmt}", k) for k in ("s", "MB/s", "rows/s")},
        }
        for fmt in ("csv", "parquet")
    ]
    codec_rows = []
    for c in CODECS:
        f = store_facts[c]
        codec_rows.append(
            {
                "codec": c,
                "disk MB": f["disk MB"],
                "X MB": f["X MB"],
                "chunk MB": f["chunk MB"],
                "zarr MB/s": _median(recs, f"zarr read {c}", "MB/s"),
                "zarr rows/s": _median(recs, f"zarr read {c}", "rows/s"),
                "loader MB/s": _median(recs, f"loader {c}", "MB/s"),
                "loader rows/s": _median(recs, f"loader {c}", "rows/s"),
                "wait": _median(recs, f"loader {c}", "wait"),
            }
        )
    chunk_rows_out = [
        {"chunk MB": mb, "zarr MB/s": _median(recs, f"zarr read lz4 {mb} MB", "MB/s")}
        for mb in (CHUNK_MB if sweep else ())
    ]
    summary = {
        "ingest MB/s parquet / csv": protocol.ratio_summary(
            _per_pass(recs, "ingest parquet", "MB/s"), _per_pass(recs, "ingest csv", "MB/s")
        ),
        **{
            f"loader / zarr read rows/s {c}": protocol.ratio_summary(
                _per_pass(recs, f"loader {c}", "rows/s"), _per_pass(recs, f"zarr read {c}", "rows/s")
            )
            for c in CODECS
        },
    }
    payload = {
        "benchmark": "io",
        "meta": m,
        "quick": quick,
        "settings": {
            "csv_rows": csv_rows,
            "rows": rows,
            "features": features,
            "chunk_rows": chunk_rows,
            "passes": passes,
            "setup_s": setup_s,
        },
        "stores": store_facts,
        "passes": recs,
        "rows": [
            *({"table": "ingest", **r} for r in ingest_rows),
            *({"table": "codec", **r} for r in codec_rows),
            *({"table": "chunk size", **r} for r in chunk_rows_out),
        ],
        "summary": summary,
    }
    path = protocol.save_json("io-quick" if quick else "io", payload, quick)

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
    best = max(codec_rows, key=lambda r: r["loader MB/s"])
    parts = [
        *protocol.table_head("Ingest and loader I/O", m),
        f"{'Quick' if quick else 'Full'} sizes; medians over {passes} interleaved pass(es), the order rotated by one "
        "per pass; the source files and stores are written before the passes, outside the timing, and read from "
        "the page cache.",
        "",
        "### ingest (25-column table: 20 floats, 1 string, 1 label)",
        "",
        md_table(ingest_rows, f),
        "",
        f"### read, per codec ({rows:,} rows x {features} float32)",
        "",
        md_table(codec_rows, f),
        "",
        f"fastest loader: {best['codec']} (median loader MB/s)",
    ]
    if chunk_rows_out:
        parts += ["", "### plain read vs chunk size (lz4)", "", md_table(chunk_rows_out, {"zarr MB/s": ".0f"})]
    parts += [
        "",
        "### per-pass ratios",
        "",
        "| comparison | median (range; per pass) |",
        "| --- | --- |",
        f"| ingest MB/s, Parquet / CSV | {protocol.fmt_ratio(summary['ingest MB/s parquet / csv'])} |",
    ]
    for c in CODECS:
        parts.append(
            f"| loader rows/s / plain Zarr read rows/s, {c} "
            f"| {protocol.fmt_ratio(summary[f'loader / zarr read rows/s {c}'])} |"
        )
    parts += protocol.table_tail(recs, path)
    return "\n".join(parts), payload


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(prog="python -m bench.io", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (seconds), 1 pass, for the smoke test")
    ap.add_argument("--passes", type=int, default=5, help="interleaved passes, the order rotated (default 5)")
    ap.add_argument(
        "--out",
        default=None,
        help="also write the tables here (default bench/out/io.md, quick runs bench/out/io-quick.md; '' = no file)",
    )
    args = ap.parse_args(argv)
    text, _ = run(args.quick, args.passes)
    print(text)
    out = args.out if args.out is not None else str(OUT / ("io-quick.md" if args.quick else "io.md"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()

"""Data-parallel training on a local Dask cluster, through the `pipeline` Python API.

The UCI Letter Recognition data (data/letter: 20,000 rows, 16 features, 26 letters) is
ingested into two Zarr stores (the conventional 16,000 / 4,000 split). A LocalCluster of two
single-threaded worker processes trains the default network (256-128 ReLU, Adam) in sync mode:
each worker streams its share of the store's chunks, takes `local_steps` minibatch steps and
pushes its progress to the parameter server inside the Dask scheduler, which combines the two
shares every round. The trained model is then evaluated out of core on the test store by the
workers, and loaded back from its run directory without a cluster.

    python docs/examples/cluster.py [--out DIR]

Writes only under DIR (default: the environment variable PIPELINE_EXAMPLES_OUT, else a new
temporary directory): the two stores and the run directory (model, history, checkpoint).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from pipeline import load_model
from pipeline.config import TrainConfig
from pipeline.connect import cluster_client
from pipeline.inference import evaluate_store
from pipeline.ingest import ingest
from pipeline.train import train

DATA = Path(__file__).resolve().parents[2] / "data" / "letter" / "letter-recognition.data"


def output_dir() -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("PIPELINE_EXAMPLES_OUT"), help="directory for outputs")
    out = parser.parse_args().out or tempfile.mkdtemp(prefix="pipeline-example-")
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)


def main() -> None:
    out = output_dir()
    # the letter is the first column; rows 0-15999 train, the rest test (same encodings)
    tr = ingest(DATA, out / "letter-train.zarr", target=0, rows="0:16000")
    te = ingest(DATA, out / "letter-test.zarr", target=0, rows="16000:", like=tr.path)
    print(f"stores: {tr.n_rows} training rows, {te.n_rows} test rows, {len(tr.classes)} classes")

    cfg = TrainConfig(epochs=12, patience=0, mode="sync", seed=0)
    with cluster_client(workers=2, threads_per_worker=1, dashboard_address=None) as client:
        result = train(tr.path, cfg, out / "run", client=client)
        for h in result.history:  # `epoch` counts from 0 in the history, from 1 in the log
            print(
                f"epoch {h['epoch'] + 1}: train loss {h['train_loss']:.3f}, "
                f"val accuracy {h.get('val_accuracy', float('nan')):.3f}, rounds {h['rounds']}"
            )
        metrics = evaluate_store(result.model, te.path, client)
    print(f"test accuracy on the cluster: {metrics['accuracy']:.3f}")

    model = load_model(out / "run")  # no cluster needed from here on
    pred = model.predict(te.X[:2000])
    print(
        f"the saved model in this process: accuracy {np.mean(pred == np.asarray(te.classes)[te.y[:2000]]):.3f} "
        f"on the first 2,000 test rows; run directory {out / 'run'}"
    )


if __name__ == "__main__":
    main()

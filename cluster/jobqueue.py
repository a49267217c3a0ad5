"""Train on an HPC batch system (Slurm or PBS) through dask-jobqueue.

NOT EXERCISED IN THIS REPOSITORY'S TESTS: there is no Slurm or PBS here. Written against
dask-jobqueue's documented API (``SLURMCluster`` / ``PBSCluster`` with ``cores``, ``memory``,
``processes``, ``walltime``, ``job_extra_directives``, ``job_script_prologue``,
``worker_extra_args``, ``scheduler_options``); adapt queue, account and resources to your site.

    pip install dask-jobqueue            # in the same environment as the project
    python cluster/jobqueue.py slurm STORE --out runs/hpc --jobs 4 -- --set epochs=20

dask-jobqueue runs the scheduler in *this* process (on the login node) and submits one batch
job per group of workers. ``scheduler_options={"preload": ["pipeline.ps"]}`` goes to
``distributed.Scheduler(preload=...)``: the same parameter server as
``dask scheduler --preload pipeline.ps``. Training then runs through ``pipeline.train``; the
store must be on a file system every compute node mounts (or an fsspec URL), which the driver
checks before training (``check_workers_can_open``).
"""

from __future__ import annotations

import argparse
import sys

# One worker process per core, one thread each: the kernels use single-threaded BLAS per
# worker (the nanny sets OMP/MKL/OPENBLAS_NUM_THREADS=1, see cluster/pipeline.yaml).
CORES_PER_JOB = 8
MEMORY_PER_JOB = "32GiB"
COMMON = {
    "cores": CORES_PER_JOB,
    "processes": CORES_PER_JOB,  # -> dask worker --nworkers 8 --nthreads 1
    "memory": MEMORY_PER_JOB,  # split evenly between the processes (--memory-limit)
    "walltime": "02:00:00",
    "local_directory": "$TMPDIR",  # node-local scratch for spilling
    "job_script_prologue": [
        # make the project importable on the compute nodes (adapt: module load / conda activate)
        "source /path/to/project/.venv/bin/activate",
    ],
    "scheduler_options": {"preload": ["pipeline.ps"], "dashboard_address": ":8787"},
}


def make_cluster(kind: str):
    if kind == "slurm":
        from dask_jobqueue import SLURMCluster

        return SLURMCluster(
            queue="compute",  # partition (#SBATCH -p)
            account="myproject",  # (#SBATCH -A)
            job_extra_directives=["--exclusive"],
            **COMMON,
        )
    if kind == "pbs":
        from dask_jobqueue import PBSCluster

        return PBSCluster(
            queue="workq",
            account="myproject",
            resource_spec=f"select=1:ncpus={CORES_PER_JOB}:mem={MEMORY_PER_JOB.replace('GiB', 'GB')}",
            **COMMON,
        )
    raise SystemExit(f"unknown batch system {kind!r}: use slurm or pbs")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The options, and the ``--set KEY=VALUE`` settings given after ``--``. The settings are
    split off before parsing: argparse gives a trailing positional list nothing once options
    have come between it and the positionals before it, and refuses what follows ``--``."""
    ours, settings = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="after --: --set KEY=VALUE ... as for pipeline train"
    )
    p.add_argument("kind", choices=["slurm", "pbs"])
    p.add_argument("store", help="path or URL every compute node can read")
    p.add_argument("--out", default="runs/hpc")
    p.add_argument("--jobs", type=int, default=2, help="batch jobs (each CORES_PER_JOB workers)")
    p.add_argument("--print-script", action="store_true", help="show the job script and exit")
    args = p.parse_args(ours)
    q = argparse.ArgumentParser(prog=f"{p.prog} ... --", description="training settings, as for pipeline train")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings")
    return args, q.parse_args(settings).settings


def main(argv: list[str] | None = None) -> int:
    args, sets = parse(sys.argv[1:] if argv is None else list(argv))

    from distributed import Client

    from pipeline.config import TrainConfig
    from pipeline.errors import ConfigError
    from pipeline.train import train

    try:
        cfg = TrainConfig().with_overrides(sets)  # a bad setting is refused before any job is submitted
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        cluster = make_cluster(args.kind)
    except ModuleNotFoundError as exc:
        if exc.name != "dask_jobqueue":
            raise
        raise SystemExit("error: dask-jobqueue is not installed: pip install dask-jobqueue") from None
    if args.print_script:
        print(cluster.job_script())
        cluster.close()
        return 0
    with cluster, Client(cluster) as client:
        cluster.scale(jobs=args.jobs)
        client.wait_for_workers(args.jobs * CORES_PER_JOB, timeout=1800)  # queue wait
        print(f"dashboard: {client.dashboard_link} (training page: /pipeline)", file=sys.stderr)
        result = train(args.store, cfg, args.out, client=client, log=lambda m: print(m, file=sys.stderr))
    print(result.best)  # the saved model's epoch, as the last line of `pipeline train`
    return 0


if __name__ == "__main__":
    sys.exit(main())

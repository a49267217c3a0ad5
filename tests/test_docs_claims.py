"""What the user documentation states that can be checked mechanically: the config keys and values
it names, the defaults it states, the command options it uses, the cluster scripts' help and the
batch script's command line, the commands and service names of the container and Kubernetes
files, and the files and history keys of a run directory (one small run in this process).

The documents: README.md, cluster/README.md, docs/architecture.md and docs/examples/README.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "cluster/README.md", "docs/architecture.md", "docs/examples/README.md")
CLUSTER = ROOT / "cluster"


def _text(name: str) -> str:
    return (ROOT / name).read_text()


def _flat(text: str) -> str:
    """The text with every run of white space one space, so that a phrase matches across lines."""
    return " ".join(text.split())


def _code_lines(text: str) -> list[str]:
    """The lines of the fenced code blocks, continuation lines (ending in a backslash) joined."""
    lines: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        lines += block.replace("\\\n", " ").splitlines()
    return lines


def _value_matches(default: object, value: object) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


# -- config keys --------------------------------------------------------------------------------


def _named_settings() -> list[tuple[str, str, str]]:
    """(document, key, raw value) of every `--set KEY=VALUE` and estimator `options={KEY: ...}`,
    and of every backquoted `key = value` whose key is a config key or looks like one (a
    snake_case word; a plain word such as `w = ...` is a formula)."""
    keys = set(TrainConfig.keys())
    found = []
    for doc in DOCS:
        text = _text(doc)
        found += [(doc, k, v) for k, v in re.findall(r"--set ([A-Za-z_][\w]*)=([^\s`]+)", text) if k != "key"]
        found += [(doc, k, v) for k, v in re.findall(r"(?<!_)options=\{\"(\w+)\": ([^}]+)\}", text)]
        for k, v in re.findall(r"`([a-z][a-z0-9_]*) = ([^`]+)`", text):
            if k in keys or ("_" in k and not k.startswith("w_")):
                found.append((doc, k, v))
    return found


def test_every_setting_the_docs_name_is_a_config_key_with_a_value_of_its_type():
    defaults = TrainConfig().to_dict()
    settings = _named_settings()
    assert len(settings) > 30  # the README's --set examples and `key = value` mentions
    bad = []
    for doc, key, raw in settings:
        if key not in defaults:
            bad.append(f"{doc}: {key} is not a config key")
            continue
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            continue  # prose such as `ps_shards = k`
        if not _value_matches(defaults[key], value):
            bad.append(f"{doc}: {key} = {raw} is not of the key's type ({type(defaults[key]).__name__})")
    assert not bad, bad


# (document, phrase it contains, config key, the default the phrase states)
STATED_DEFAULTS = [
    ("README.md", "trains the default model (MLP 256-128, Adam, sync mode", "hidden", [256, 128]),
    ("README.md", "trains the default model (MLP 256-128, Adam, sync mode", "optimizer", "adam"),
    ("README.md", "trains the default model (MLP 256-128, Adam, sync mode", "mode", "sync"),
    ("README.md", "Early stopping waits for 1.5M training samples (`min_samples`)", "min_samples", 1_500_000),
    ("README.md", "train for up to `epochs` (100) passes", "epochs", 100),
    ("README.md", "fewer than `cluster_min_rows` rows (100,000 by default)", "cluster_min_rows", 100_000),
    ("README.md", "by default one BLAS thread", "blas_threads", 1),
    ("README.md", "`row_cache_mb` MiB (1,024 by default", "row_cache_mb", 1024),
    ("README.md", "`ps_shards = 0` (the default)", "ps_shards", 0),
    ("README.md", "with `combine_pushes = true`", "combine_pushes", False),
    ("README.md", "`overlap_steps` local steps later (default 1;", "overlap_steps", 1),
    ("README.md", "so it stays off by default", "overlap", False),
    ("README.md", "RMSprop's decay `rho` (0.99", "rho", 0.99),
    ("README.md", 'with `"sum"` (the default)', "aggregate", "sum"),
    ("README.md", "It is off by default (0)", "min_share_gflop", 0.0),
    ("README.md", "`ema = 0.999` by default", "ema", 0.999),
    ("README.md", "the `topk_fraction` largest entries, default 10%", "topk_fraction", 0.1),
    ("README.md", "top-k at 10% (the default)", "topk_fraction", 0.1),
    ("README.md", "With `error_feedback = true` (the default)", "error_feedback", True),
    ("README.md", "float32 unless `compress_replies = true`", "compress_replies", False),
    ("README.md", "`--set ps_shared_memory=false` turns it off", "ps_shared_memory", True),
    ("README.md", "sets the mmap threshold to glibc's own ceiling, 32 MiB", "mmap_threshold_mb", 32),
    ("README.md", "`no_worker_timeout`, 300 s by default", "no_worker_timeout", 300.0),
    ("cluster/README.md", "it waits `no_worker_timeout` (300 s)", "no_worker_timeout", 300.0),
]


@pytest.mark.parametrize(("doc", "phrase", "key", "stated"), STATED_DEFAULTS, ids=lambda v: str(v)[:40])
def test_a_stated_default_is_the_config_default(doc: str, phrase: str, key: str, stated: object):
    assert _flat(phrase) in _flat(_text(doc)), f"{doc} no longer says {phrase!r}: update this table"
    assert TrainConfig().to_dict()[key] == stated


def test_every_default_share_of_top_k_the_readme_states_is_the_config_default():
    text = _flat(_text("README.md"))
    stated = re.findall(r"top-k at the default (\d+)%|top-k at (\d+)% \(the default\)", text)
    stated += [(s, "") for s in re.findall(r"`topk_fraction` largest entries, default (\d+)%", text)]
    assert len(stated) >= 2
    assert {int(a or b) for a, b in stated} == {round(100 * TrainConfig().topk_fraction)}, stated


def test_the_other_stated_defaults():
    from pipeline import MLPClassifier
    from pipeline.cli import cli
    from pipeline.connect import PROFILE_INTERVAL
    from pipeline.loop import VAL_CACHE_MB

    readme, cluster = _flat(_text("README.md")), _flat(_text("cluster/README.md"))
    assert "(under `cluster_min_rows`, 10,000 rows by default)" in readme
    assert MLPClassifier().cluster_min_rows == 10_000
    assert "(up to 512 MB a process, `VAL_CACHE_MB` in `pipeline/loop.py`" in readme
    assert VAL_CACHE_MB == 512
    assert "`--connect-timeout` (10 s)" in cluster
    (timeout,) = [p for p in cli.commands["train"].params if p.name == "connect_timeout"]
    assert timeout.default == 10.0
    assert "sets `distributed.worker.profile.interval` to 100 ms" in cluster
    assert "interval: 100ms" in (CLUSTER / "pipeline.yaml").read_text() and PROFILE_INTERVAL == "100ms"


# -- command options ----------------------------------------------------------------------------


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*getattr(p, "opts", ()), *getattr(p, "secondary_opts", ()))}


def test_every_pipeline_command_in_the_docs_has_the_options_it_is_shown_with():
    from pipeline.cli import cli

    checked, bad = 0, []
    for doc in DOCS:
        text = _text(doc)
        lines = _code_lines(text) + re.findall(r"`(pipeline [a-z]+ [^`]*)`", text)
        for line in lines:
            line = line.split("#")[0].strip()
            if not line.startswith("pipeline "):
                continue
            words = shlex.split(line.split("<<")[0].split("&")[0])
            command = cli.commands.get(words[1])
            if command is None:
                bad.append(f"{doc}: no command {words[1]!r} in {line!r}")
                continue
            unknown = {w.split("=")[0] for w in words if w.startswith("--")} - _options(command)
            bad += [f"{doc}: {line!r}: pipeline {words[1]} has no {o}" for o in sorted(unknown)]
            checked += 1
    assert checked >= 15
    assert not bad, bad


def test_every_option_the_docs_name_belongs_to_a_command_they_describe():
    """An option named in the prose is one of the `pipeline` commands', `dask scheduler`'s or
    `dask worker`'s, or cluster/start-local.sh's (the development section's tools aside)."""
    from distributed.cli.dask_scheduler import main as dask_scheduler
    from distributed.cli.dask_worker import main as dask_worker

    from pipeline.cli import cli

    known = set().union(*(_options(c) for c in cli.commands.values()), _options(dask_scheduler))
    known |= _options(dask_worker) | set(re.findall(r"^\s+(?:-\w\|)?(--[a-z-]+)\)", _start_local(), re.M))
    for doc in DOCS:
        text = _text(doc)
        if "## Development" in text:
            text = text[: text.index("## Development")]
        unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - known
        assert not unknown, f"{doc} names options no command has: {sorted(unknown)}"


# -- cluster scripts ----------------------------------------------------------------------------


def _start_local() -> str:
    return (CLUSTER / "start-local.sh").read_text()


@pytest.mark.parametrize("script", ["start-local.sh", "stop-local.sh"])
def test_a_cluster_script_help_is_its_header_and_names_every_option(script: str):
    path = CLUSTER / script
    proc = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header = []
    for line in path.read_text().splitlines()[1:]:
        if not line.startswith("#"):
            break
        header.append(re.sub(r"^# ?", "", line))
    assert proc.stdout.splitlines() == header  # the comment, and nothing of the code below it
    parsed = set(re.findall(r"^\s+(?:-\w\|)?(--[a-z-]+)\)", path.read_text(), re.M)) - {"--help"}
    assert parsed and all(o in proc.stdout for o in parsed), (parsed, proc.stdout)


def test_the_cluster_readme_uses_the_start_script_options_that_exist():
    section = _text("cluster/README.md").split("## 6. On this machine")[1].split("## 7.")[0]
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", section.split("PID files")[0]))
    parsed = set(re.findall(r"^\s+(?:-\w\|)?(--[a-z-]+)\)", _start_local(), re.M))
    assert used - {"--scheduler", "--out"} <= parsed, used - parsed


# -- container and Kubernetes -------------------------------------------------------------------


def test_every_preload_in_the_cluster_files_is_the_parameter_server_module():
    import pipeline.ps

    assert callable(pipeline.ps.dask_setup)
    texts = {p.name: p.read_text() for p in [*CLUSTER.glob("*"), *CLUSTER.glob("kubernetes/*")] if p.is_file()}
    texts |= {doc: _text(doc) for doc in DOCS}
    named = []
    for name, text in texts.items():
        named += [(name, m) for m in re.findall(r"--preload[\s,\"'\]\n-]*([\w.]+)", text)]
        named += [(name, m) for m in re.findall(r"preload\"?:\s*\[\"?([\w.]+)", text)]
    assert len(named) >= 8
    assert {m for _, m in named} == {"pipeline.ps"}, named


def test_the_image_has_the_commands_the_helm_chart_runs(tmp_path: Path):
    """The Dask Helm chart runs `dask-scheduler` and `worker.image.dask_worker`; distributed no
    longer installs those, so the image adds them. Its RUN step, made to write into a temporary
    directory, gives commands that start `dask scheduler` and `dask worker`."""
    values = (CLUSTER / "kubernetes" / "helm-values.yaml").read_text()
    (worker_command,) = re.findall(r"^\s+dask_worker: \"([\w-]+)\"", values, re.M)
    dockerfile = (CLUSTER / "Dockerfile").read_text().replace("\\\n", " ")
    steps = [s for s in re.findall(r"^RUN (.*)$", dockerfile, re.M) if "/usr/local/bin/dask-" in s]
    assert steps, "cluster/Dockerfile does not add dask-scheduler and dask-worker"
    for step in steps:
        subprocess.run(["sh", "-c", step.replace("/usr/local/bin", str(tmp_path))], check=True, timeout=60)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command, usage in (("dask-scheduler", "dask scheduler"), (worker_command, "dask worker")):
        proc = subprocess.run([str(tmp_path / command), "--help"], capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0 and f"Usage: {usage}" in proc.stdout, (command, proc.stdout, proc.stderr)


def test_the_port_forward_commands_name_the_scheduler_services():
    """The chart names its scheduler service RELEASE-dask-scheduler (its fullname: the release
    and the chart's name, unless the release contains it); the operator names a DaskCluster's
    NAME-scheduler."""
    helm = (CLUSTER / "kubernetes" / "helm-values.yaml").read_text()
    (release,) = re.findall(r"helm install (\S+) dask/dask", helm)
    fullname = release if "dask" in release else f"{release}-dask"
    assert re.findall(r"kubectl port-forward svc/(\S+)", helm) == [f"{fullname}-scheduler"]
    operator = (CLUSTER / "kubernetes" / "daskcluster.yaml").read_text()
    (name,) = re.findall(r"^metadata:\n  name: (\S+)", operator, re.M)
    assert re.findall(r"kubectl port-forward svc/(\S+)", operator) == [f"{name}-scheduler"]


# -- cluster/jobqueue.py ------------------------------------------------------------------------


def _jobqueue():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cluster_jobqueue", CLUSTER / "jobqueue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_jobqueue_command_line_it_documents_parses():
    jobqueue = _jobqueue()
    (line,) = re.findall(r"python cluster/jobqueue\.py (.*)", jobqueue.__doc__)
    args, settings = jobqueue.parse(shlex.split(line))
    assert (args.kind, args.store, args.out, args.jobs) == ("slurm", "STORE", "runs/hpc", 4)
    assert settings == ["epochs=20"]
    assert TrainConfig().with_overrides(settings).epochs == 20


def test_jobqueue_refuses_a_bad_setting_in_one_line_before_it_submits_anything():
    with pytest.raises(SystemExit) as info:
        _jobqueue().main(["slurm", "/shared/train.zarr", "--jobs", "1", "--", "--set", "epoch=20"])
    assert str(info.value).startswith("error: unknown config key 'epoch'")


# -- a run directory ----------------------------------------------------------------------------


def test_a_run_directory_holds_the_files_and_history_keys_the_docs_name(tmp_path: Path):
    """cluster/README.md: the run directory receives config.toml, checkpoint.npz, model.npz and
    history.json (a run in this process writes the same); README.md: `--plots` adds curves.png,
    rounds.png and throughput.png, history.json counts `pushes` and `summed`, and its `epoch`
    fields and `best_epoch` count from 0."""
    from pipeline.synth import synth
    from pipeline.train import train

    cluster = _flat(_text("cluster/README.md"))
    assert "receives `config.toml`, `checkpoint.npz`, `model.npz` and `history.json`" in cluster
    readme = _flat(_text("README.md"))
    assert "(`curves.png`, `rounds.png`, `throughput.png`; needs matplotlib)" in readme
    store = synth(tmp_path / "s.zarr", rows=2000, features=8, classes=3)
    result = train(store.path, TrainConfig(hidden=[8], epochs=2, patience=0), tmp_path / "run")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {
        "config.toml",
        "checkpoint.npz",
        "model.npz",
        "history.json",
    }
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert {"installed_by", "best_epoch", "epochs", "pushes", "summed"} <= set(history)
    assert [e["epoch"] for e in history["epochs"]] == [0, 1] and history["best_epoch"] == result.best_epoch
    pytest.importorskip("matplotlib")
    from click.testing import CliRunner

    from pipeline.cli import cli

    runner = CliRunner()
    out = tmp_path / "plotted"  # two rounds at least: one round draws no per-round curve
    r = runner.invoke(cli, ["train", store.path, "--out", str(out), "--plots", "-q", "--set", "epochs=2"])
    assert r.exit_code == 0, r.output
    assert {"curves.png", "rounds.png", "throughput.png"} <= {p.name for p in out.iterdir()}

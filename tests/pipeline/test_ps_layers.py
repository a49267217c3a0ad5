"""The parameter server's modules import in a fixed order, and the dashboard never imports them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, child_env

PACKAGE = ROOT / "pipeline" / "ps"
# each module may import only the modules before it (the package's __init__ imports them all)
ORDER = ["wire", "shm", "job", "extension", "install", "client", "shard"]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def _run(code: str) -> None:
    """Run ``code`` in a fresh interpreter that imports this checkout's ``pipeline``."""
    env = child_env(PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_the_package_holds_the_modules_in_the_documented_order() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py")) == sorted([*ORDER, "__init__"])
    for i, name in enumerate(ORDER):
        ours = {m for m in _imports(PACKAGE / f"{name}.py") if m.startswith("pipeline.ps")}
        allowed = {f"pipeline.ps.{m}" for m in ORDER[:i]}
        later = {m for m in ours if not any(m == a or m.startswith(a + ".") for a in allowed)}
        assert not later, f"pipeline/ps/{name}.py imports {sorted(later)}: only {ORDER[:i]} come before it"


@pytest.mark.parametrize("module", ["pipeline.ps", *(f"pipeline.ps.{m}" for m in ORDER)])
def test_each_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    code = f"import {module}, pipeline.ps; assert callable(pipeline.ps.dask_setup)"
    _run(code)


@pytest.mark.parametrize("module", ["dashboard", "jobview"])
def test_the_dashboard_knows_nothing_of_the_parameter_server(module: str) -> None:
    imported = _imports(ROOT / "pipeline" / f"{module}.py")
    assert not {m for m in imported if m == "pipeline.ps" or m.startswith("pipeline.ps.")}
    code = (
        f"import sys, pipeline.{module}\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[:2] == ['pipeline', 'ps'])\n"
        "assert not leaked, leaked\n"
    )
    _run(code)


def test_the_collector_reads_the_snapshots_of_the_source_it_was_given() -> None:
    """The seam the preload wires: the dashboard sees jobs only through a JobSource, held weakly."""
    import gc

    import numpy as np

    from pipeline import dashboard
    from pipeline.jobview import JobSnapshot
    from pipeline.ps.job import Job

    class Owner:  # stands for the scheduler the source belongs to
        pass

    class Source:
        def __init__(self, job: Job) -> None:
            self.job = job

        def job_names(self) -> list[str]:
            return [self.job.job]

        def snapshot(self, job: str | None = None) -> JobSnapshot | None:
            return self.job.view(history=True)

        def running(self) -> list[JobSnapshot]:
            return [self.job.view()]

        def finished_jobs(self) -> list[JobSnapshot]:
            return []

    owner = Owner()
    source = Source(Job.create("seam-job", np.zeros(3, np.float32), 3, mode="async"))
    source.job.version = 7
    dashboard.watch(owner, source)
    assert dashboard.source_of(owner) is source

    def rounds() -> dict[str, float]:
        fams = {f.name: f for f in dashboard.TrainingCollector().collect()}
        return {s.labels["job"]: s.value for s in fams["pipeline_rounds"].samples}

    assert rounds()["seam-job"] == 7
    del source
    gc.collect()
    assert dashboard.source_of(owner) is None and "seam-job" not in rounds()

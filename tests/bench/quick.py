"""Running a benchmark's ``--quick`` mode as a user would, for the tests of its JSON and table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def quick_json(module: str, *args: str, timeout: float = 360) -> tuple[str, dict[str, Any]]:
    """``python -m bench.<module> --quick ARGS`` from the repository: its table (stdout) and the
    raw figures of the JSON its table names."""
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", "--quick", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r"Raw figures: `([^`]+)`", proc.stdout)
    assert found, proc.stdout
    path = Path(found.group(1))
    return proc.stdout, json.loads((path if path.is_absolute() else ROOT / path).read_text())

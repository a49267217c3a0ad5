"""What the files this program writes are made with, and how its temporaries are named and cleaned."""

from __future__ import annotations

import os
from pathlib import Path


def new_file_mode() -> int:
    """The mode a file created now gets, ``0o666`` less the process's umask: what a temporary
    file (``mkstemp`` makes it 0600) is set to before it is renamed into place, so a model,
    checkpoint or plot is readable by whom the user's other files are."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS): read it by setting it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def writer_tag() -> str:
    """This process, as its temporary files are named: ``PID@HOST``."""
    import socket

    return f"{os.getpid()}@{socket.gethostname()}"


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of ``path`` that writers killed mid-write (SIGKILL, the OOM killer,
    a job's time limit) left beside it: those named after a process of this host that no longer
    runs (the temporaries :func:`writer_tag` names: checkpoints, models, plots). A checkpoint is
    rewritten every ``checkpoint_seconds``, so a kill lands in a write sooner or later, and each
    temporary is as large as the file it replaces."""
    import glob
    import socket

    host = socket.gethostname()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*@*.tmp"):
        tag = tmp.name[len(path.name) + 2 : -len(".tmp")].rsplit(".", 1)[0]  # PID@HOST.RANDOM
        pid, _, where = tag.partition("@")
        if where != host or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:  # alive, another user's
            continue

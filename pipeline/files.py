"""What the files this program writes are made with."""

from __future__ import annotations

import os


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

"""A progress line on stderr: done / total, rate and ETA; silent unless enabled.

Commands enable it only when stderr is a terminal and ``--quiet`` is not given, so logs and CI
output stay clean.
"""

from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan / inf
        return "--"
    seconds = int(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class Progress:
    """``Progress("ingest pass 1", total=n)``; ``update(k)`` adds k units; ``done()`` ends the line.

    ``unit`` names what is counted (rows, samples, tasks); ``suffix`` is extra text set by the
    caller (for example the last loss).
    """

    def __init__(self, label: str, total: int | None = None, enabled: bool = True, unit: str = "rows") -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.enabled = enabled and sys.stderr is not None
        self.done_rows = 0
        self.suffix = ""
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, rows: int, suffix: str | None = None) -> None:
        self.done_rows += rows
        if suffix is not None:
            self.suffix = suffix
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.5:
            self._last = now
            self._print(end="\r")

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = self.done_rows / elapsed
        if self.total:
            frac = min(1.0, self.done_rows / self.total)
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            left = (self.total - self.done_rows) / rate if rate > 0 else float("inf")
            head = f"[{bar}] {100 * frac:5.1f}% {self.done_rows:,}/{self.total:,} {self.unit}"
            tail = f" ({rate:,.0f} {self.unit}/s, ETA {_eta(left)})"
        else:
            head, tail = f"{self.done_rows:,} {self.unit}", f" ({rate:,.0f} {self.unit}/s)"
        return f"{self.label}: {head}{tail}{'  ' + self.suffix if self.suffix else ''}"

    def _print(self, end: str) -> None:
        print(self.line().ljust(100), end=end, file=sys.stderr, flush=True)

    def set(self, done: int, suffix: str | None = None) -> None:
        """Set the absolute count (for counters read from elsewhere)."""
        self.update(done - self.done_rows, suffix)

    def done(self) -> None:
        if self.enabled:
            self._print(end="\n")

    def clear(self) -> None:
        """Erase the line (the caller prints its own summary)."""
        if self.enabled:
            print("\r" + " " * 100 + "\r", end="", file=sys.stderr, flush=True)

"""A tiny progress line on stderr (rows done, rate); silent unless enabled."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress("ingest pass 1", total=n)``; ``update(k)`` adds k rows; ``done()`` ends the line."""

    def __init__(self, label: str, total: int | None = None, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled and sys.stderr is not None
        self.done_rows = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, rows: int) -> None:
        self.done_rows += rows
        now = time.perf_counter()
        if self.enabled and now - self._last > 0.5:
            self._last = now
            self._print(end="\r")

    def _print(self, end: str) -> None:
        rate = self.done_rows / max(time.perf_counter() - self.t0, 1e-9)
        pct = f" {100 * self.done_rows / self.total:5.1f}%" if self.total else ""
        print(f"{self.label}:{pct} {self.done_rows:,} rows ({rate:,.0f} rows/s)", end=end, file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            self._print(end="\n")

"""A one-line progress bar on stderr, with no dependency."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr: ``[var] epoch 3/60 |#####-----| 12/29 loss 2.1034``."""

    def __init__(self, total: int, prefix: str, enabled: bool = True, width: int = 20, stream=None):
        self.total, self.prefix, self.enabled, self.width = max(total, 1), prefix, enabled, width
        self.stream = sys.stderr if stream is None else stream
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, text: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.1 and done < self.total):
            return
        self.last = now
        fill = int(self.width * done / self.total)
        bar = "#" * fill + "-" * (self.width - fill)
        self.stream.write(f"\r{self.prefix} |{bar}| {done}/{self.total} {text}\033[K")
        self.stream.flush()

    def close(self, text: str) -> float:
        dt = time.perf_counter() - self.t0
        line = f"{self.prefix} {text} ({dt:.1f}s)"
        self.stream.write(("\r" + line + "\033[K\n") if self.enabled else line + "\n")
        self.stream.flush()
        return dt

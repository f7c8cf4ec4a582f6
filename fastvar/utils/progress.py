"""A one-line progress bar on stderr, with no dependency, drawn only on a terminal."""
from __future__ import annotations

import sys
import time


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (a log file or a pipe gets no carriage returns)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):     # no isatty, or a closed stream
        return False


class Progress:
    """A one-line progress bar on stderr: ``[var] epoch 3/60 |#####-----| 12/29 loss 2.1034``.

    The bar is redrawn in place (carriage returns) only when the stream is a terminal; in a log (a file, a pipe,
    CI) nothing but the final :meth:`close` line is written. ``delay``: seconds before the bar first appears, so
    that quick runs stay silent and long ones (a single batch included) show it.
    """

    def __init__(self, total: int, prefix: str, enabled: bool = True, width: int = 20, stream=None,
                 delay: float = 0.0):
        self.total, self.prefix, self.width, self.delay = max(total, 1), prefix, width, delay
        self.stream = sys.stderr if stream is None else stream
        self.enabled = bool(enabled) and is_terminal(self.stream)
        self.shown = False
        self.t0 = self.last = time.perf_counter()

    def update(self, done: int, text: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.t0 < self.delay or (now - self.last < 0.1 and done < self.total):
            return
        self.last, self.shown = now, True
        fill = int(self.width * min(done, self.total) / self.total)
        bar = "#" * fill + "-" * (self.width - fill)
        self.stream.write(f"\r{self.prefix} |{bar}| {done}/{self.total} {text}\033[K")
        self.stream.flush()

    def close(self, text: str) -> float:
        """Replace the bar (if drawn) by one final line; returns the seconds since the start."""
        dt = time.perf_counter() - self.t0
        line = f"{self.prefix} {text} ({dt:.1f}s)"
        self.stream.write(("\r" + line + "\033[K\n") if self.shown else line + "\n")
        self.stream.flush()
        return dt

"""Batch progress on stderr: a bar redrawn in place on a terminal, plain periodic lines otherwise."""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import TextIO

WINDOW_S = 30.0  # rates (lines/s, tokens/s) and the ETA come from the last half minute, not the whole run
SAMPLE_S = 0.5  # one rate sample per half second at most: the window stays ~60 samples at any line rate


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Renders done / failed / total, tokens/s and ETA; mode 'auto' picks 'bar' on a TTY, else 'plain'."""

    def __init__(self, mode: str = "auto", interval_s: float = 10.0, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        if mode not in ("bar", "plain", "none"):
            raise ValueError(f"progress mode must be auto, bar, plain or none; got {mode!r}")
        self.mode = mode
        self.interval = 0.2 if mode == "bar" else interval_s
        self.samples: deque[tuple[float, int, int]] = deque()
        self._next = 0.0
        self._width = 0

    def update(self, done: int, failed: int, total: int, tokens: int, *, force: bool = False) -> None:
        """Record the counts; render if the interval has passed (or `force`)."""
        now = time.monotonic()
        if len(self.samples) > 1 and now - self.samples[-2][0] < SAMPLE_S:
            self.samples[-1] = (now, done + failed, tokens)  # refresh the newest sample instead of adding one
        else:
            self.samples.append((now, done + failed, tokens))
        while len(self.samples) > 2 and now - self.samples[0][0] > WINDOW_S:
            self.samples.popleft()
        if self.mode == "none" or (now < self._next and not force):
            return
        self._next = now + self.interval
        self._render(self.line(done, failed, total), final=force)

    def line(self, done: int, failed: int, total: int) -> str:
        """The status text: counts, rates and ETA."""
        t0, n0, k0 = self.samples[0]
        t1, n1, k1 = self.samples[-1]
        dt = t1 - t0
        lps = (n1 - n0) / dt if dt > 0 else 0.0
        tps = (k1 - k0) / dt if dt > 0 else 0.0
        left = max(0, total - done - failed)
        eta = _hms(left / lps) if lps > 0 else ("0:00:00" if left == 0 else "--:--:--")
        frac = (done + failed) / total if total else 1.0
        text = (f"{done + failed}/{total} ({frac:6.1%}) done={done} failed={failed} "
                f"{lps:.1f} lines/s {tps:.0f} tok/s ETA {eta}")
        if self.mode == "bar":
            filled = int(frac * 24)
            text = f"[{'#' * filled}{'.' * (24 - filled)}] " + text
        return text

    def message(self, text: str) -> None:
        """A one-off line (start, resume, cancel), kept clear of the bar."""
        if self.mode == "none":
            return
        if self.mode == "bar" and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def _render(self, text: str, final: bool) -> None:
        if self.mode == "bar":
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
            self._width = 0 if final else len(text)
        else:
            self.stream.write(time.strftime("%H:%M:%S ") + text + "\n")
        self.stream.flush()

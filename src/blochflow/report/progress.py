"""The refinement's log: every message as a plain line in DIR/refine.log, and on a terminal one
status line with a progress bar for the Adam and LM iterations (other messages print above it).
When stdout is not a terminal (a batch job, a pipe) the messages go there as plain lines. Iteration
messages get the phase's mean time per iteration and the time its remaining iterations would take
(for LM an upper bound: it stops when converged)."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from ..refine.run import format_duration

_ITERATION = re.compile(r"^(adam|lm)\s+(\d+)/(\d+)\s+(.*)$")
_TIMING = re.compile(r"  (\[[^\]]* left\])$")
BAR = 20  # characters of the bar


def progress_line(text: str, width: int) -> str | None:
    """The status line for an iteration message ('lm  12/30  wR2(work) 0.0880 ...'), cut to ``width``;
    None for any other message."""
    m = _ITERATION.match(text)
    if m is None:
        return None
    phase, k, n, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    fill = min(BAR, round(BAR * k / max(n, 1)))
    timing = _TIMING.search(rest)  # the timing goes next to the bar, where a narrow terminal keeps it
    if timing is not None:
        rest = f"{timing.group(1)}  {rest[:timing.start()]}"
    return f"{phase:4s} [{'#' * fill}{'.' * (BAR - fill)}] {k}/{n}  {rest}"[:max(width - 1, 10)]


class IterationClock:
    """Times the iterations of a phase from their messages: the phase starts at the message before
    its first iteration (a resumed run's first iteration may be k > 1)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.phase, self.start, self.first = None, 0.0, 0
        self.last = clock()

    def suffix(self, text: str) -> str:
        """'  [1.2 s/it, <= 22 s left]' for an iteration message ('' for others); call for every message."""
        now, m = self.clock(), _ITERATION.match(text)
        if m is None:
            self.last = now
            return ""
        phase, k, n = m.group(1), int(m.group(2)), int(m.group(3))
        if phase != self.phase or k < self.first:
            self.phase, self.start, self.first = phase, self.last, k
        self.last = now
        per = (now - self.start) / (k - self.first + 1)
        bound = "<= " if phase == "lm" else ""
        return f"  [{format_duration(per)}/it, {bound}{format_duration(per * max(n - k, 0))} left]"


class ProgressLog:
    """Callable log(text) for :func:`blochflow.refine.run.refine` and the command line."""

    def __init__(self, path: str | Path | None, stream=None, append: bool = False, clock=time.monotonic):
        self.stream = sys.stdout if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.path, self.append, self.file = path, append, None
        self.status = ""
        self.timer = IterationClock(clock)

    def __call__(self, text: str) -> None:
        text = text + self.timer.suffix(text)
        if self.file is None and self.path is not None:  # opened at the first message: a run refused
            # before it starts leaves no folder behind
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a" if self.append else "w", encoding="utf-8", buffering=1)  # resume appends
        if self.file is not None:
            self.file.write(text + "\n")
        line = progress_line(text, shutil.get_terminal_size().columns) if self.tty else None
        if line is not None:
            self.stream.write("\r" + line.ljust(len(self.status)))
            self.stream.flush()
            self.status = line
            return
        self._end_status()
        print(text, file=self.stream, flush=True)

    def _end_status(self) -> None:
        if self.status:
            self.stream.write("\n")
            self.status = ""

    def close(self) -> None:
        self._end_status()
        if self.file is not None:
            self.file.close()
            self.file = None

"""Progress output, in one place: every stage's progress bar is :func:`bar`, and every note and warning of every
stage is :func:`note`, on stderr (stdout holds only what a command is asked to print: its tables, a value).

On a terminal (stderr is a tty) :func:`bar` is a plain tqdm bar, redrawn in place. Anywhere else (a cluster
job's log file, ``> train.log 2>&1``, a Kaggle notebook's saved output) a redrawn bar is a stream of
carriage-return frames that notes cut into; there the bar is a :class:`LineBar`: its state as one whole line
every ``LINE_INTERVAL_S`` seconds and once at the end, and nothing else.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

# How often a bar in a log file writes a line (it also writes one when it ends).
LINE_INTERVAL_S = 30.0


class _Discard:
    """Where tqdm's own frame writes go for a :class:`LineBar` (frames, cursor moves, clearing)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class LineBar(tqdm):
    """A tqdm bar for a file or a pipe: whole lines ending in a newline, never a ``\\r`` frame."""

    def __init__(self, *args: Any, file: TextIO | None = None, **kwargs: Any):
        self._out = file if file is not None else sys.stderr
        self._next_line_at = math.inf  # tqdm's constructor draws once: not a line
        self._line_n: float | None = None  # the count the last line showed
        super().__init__(*args, file=_Discard(), **kwargs)
        self._next_line_at = getattr(self, "start_t", 0.0) + LINE_INTERVAL_S

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        """tqdm's redraw: a line when the interval has passed (``msg``, a clearing, is never shown)."""
        if msg is None and self._time() >= self._next_line_at:
            self._write_line()
        return True

    def close(self) -> None:
        """The end: one last line, unless the last one already showed this state."""
        if not self.disable and self._line_n != self.n:
            self._ema_dt = lambda: None  # the whole run's rate, as tqdm's final frame shows it
            self._write_line()
        self._next_line_at = math.inf  # tqdm's own closing redraw: not another line
        super().close()

    def _write_line(self) -> None:
        if self._out is sys.stderr:
            sys.stdout.flush()  # when both streams go to one file, what was printed before stays before
        self._out.write(f"{self}\n")
        self._out.flush()
        self._line_n = self.n
        self._next_line_at = self._time() + LINE_INTERVAL_S


def bar(iterable: Iterable | None = None, total: float | None = None, desc: str | None = None,
        disable: bool = False, **options: Any) -> tqdm:
    """A progress bar over ``iterable`` (or updated by hand up to ``total``): a live tqdm bar on a terminal,
    a :class:`LineBar` in a file or pipe. ``options`` are tqdm's (``initial``, ``leave``, ``mininterval``, ...)."""
    stream = options.pop("file", None) or sys.stderr
    try:
        live = stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        live = False
    kind = tqdm if live else LineBar
    return kind(iterable, total=total, desc=desc, disable=disable, file=stream, **options)


def note(message: str, file: TextIO | None = None) -> None:
    """Print a note or warning (``message`` says which: ``note: ...``, ``warning: ...``) as a line of its own, to
    stderr (or ``file``): above a live bar while one is running (tqdm clears and redraws it), else a plain line.
    Whatever was printed to stdout before it is flushed first, so a log of both streams keeps their order."""
    stream = file if file is not None else sys.stderr
    if stream is sys.stderr:
        sys.stdout.flush()
    if any(not isinstance(active, LineBar) for active in list(tqdm._instances)):
        tqdm.write(message, file=stream)
    else:
        print(message, file=stream, flush=True)

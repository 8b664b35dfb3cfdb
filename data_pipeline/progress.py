"""Progress for long loops: a tqdm bar on a terminal, periodic plain log lines everywhere else.

A tqdm bar redraws itself with carriage returns; in a log file (CI, Slurm, a pipe) each redraw is
kept, so a 620-step run left 684 ``\\r`` updates in the demo's log, one unreadable line. When stderr is
not a terminal, :func:`progress` returns a :class:`PlainProgress` instead, with the same
``update`` / ``set_postfix`` / ``close`` interface, which writes one line every ``every_pct`` percent
or ``every_s`` seconds, whichever comes first::

    train: 120/620 step (19%), 2.10 step/s, elapsed 57s, eta 3m58s, loss=0.5300

Lines go to the ``diffdis.progress`` logger at INFO (the CLI's handler adds time and rank), or straight
to stderr when the program configured no logging. ``DIFFDIS_PROGRESS=bar|log|off`` overrides the
choice (default ``auto``). Lives in ``data_pipeline`` so that the pipeline can use it without
importing the trainer; the trainer imports it from here.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

log = logging.getLogger("diffdis.progress")
PROGRESS_ENV = "DIFFDIS_PROGRESS"
EVERY_PCT = 10.0
EVERY_S = 60.0


def format_seconds(seconds: float) -> str:
    """``3m58s``, ``1h02m``, ``57s``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` (and context manager), printed as periodic lines.

    A line is written when the count crosses the next multiple of ``every_pct`` percent of ``total``,
    when ``every_s`` seconds passed since the last line, and once at :meth:`close` (unless the last
    line already showed the final count). Rates count only this run's progress (``initial`` excluded),
    so a resumed run's ETA is not flattered by the steps it skipped."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, *,
                 every_pct: float = EVERY_PCT, every_s: float = EVERY_S, emit: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.every_pct, self.every_s = every_pct, every_s
        self.emit = emit or _emit
        self.clock = clock
        self.started = self.last_time = clock()
        self.last_n = initial
        self.postfix = ""
        self.closed = False
        self._next_pct = self._pct_after(initial)

    def _pct_after(self, n: int) -> float:
        """The next percentage threshold strictly above ``n``."""
        if not self.total or self.every_pct <= 0:
            return float("inf")
        done = 100.0 * n / self.total
        return (int(done // self.every_pct) + 1) * self.every_pct

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        crossed = self.total is not None and 100.0 * self.n / self.total >= self._next_pct
        if crossed or now - self.last_time >= self.every_s:
            self._write(now)
            if not crossed and self.total and self._next_pct - 100.0 * self.n / self.total < self.every_pct / 2:
                # a timed line just before a percentage threshold stands for it (it prints the same
                # rounded percentage): no second line a moment later
                self._next_pct += self.every_pct

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:  # noqa: ARG002
        values = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str, refresh: bool = True) -> None:  # noqa: ARG002
        self.desc = desc

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.started
        done = self.n - self.initial
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.0f}%)"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.2f} {self.unit}/s" if rate >= 1 else f"{1 / rate:.2f} s/{self.unit}")
        parts.append(f"elapsed {format_seconds(elapsed)}")
        if self.total is not None and done > 0 and self.n < self.total:
            parts.append(f"eta {format_seconds((self.total - self.n) * elapsed / done)}")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _write(self, now: float) -> None:
        self.emit(self.line(now))
        self.last_time, self.last_n = now, self.n
        self._next_pct = self._pct_after(self.n)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.n != self.last_n:
            self._write(self.clock())

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Silent:
    """``disable=True``: the interface, doing nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_description(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _emit(text: str) -> None:
    if logging.getLogger().hasHandlers() or log.hasHandlers():
        log.info(text)
    else:  # nothing configured logging: INFO records would be dropped
        print(text, file=sys.stderr, flush=True)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress(total: int | None, desc: str, *, unit: str = "it", initial: int = 0, disable: bool = False,
             stream: TextIO | None = None, every_pct: float = EVERY_PCT, every_s: float = EVERY_S, **tqdm_options: Any):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else a :class:`PlainProgress`;
    ``tqdm_options`` (``smoothing``, ...) go to tqdm only."""
    mode = os.environ.get(PROGRESS_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "bar", "log", "off"):
        raise ValueError(f"{PROGRESS_ENV}={mode!r}: expected auto, bar, log or off")
    if disable or mode == "off":
        return _Silent()
    stream = sys.stderr if stream is None else stream
    if mode == "bar" or (mode == "auto" and _is_terminal(stream)):
        from tqdm import tqdm  # noqa: PLC0415

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True, **tqdm_options)
    return PlainProgress(total, desc, unit, initial, every_pct=every_pct, every_s=every_s)

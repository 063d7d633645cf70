"""Progress of the commands that take more than a few seconds (``check``, ``bench``, ``build``,
``examples/finetune.py``).

On a terminal: a tqdm bar (what is running now, how many of how many, elapsed and remaining
time) that is erased when the command ends. Elsewhere (a CI log, a pipe): one plain line per
item as it starts, ``<what> [i/n] <elapsed>s <item>``, and a closing ``<what>: n/n done in Xs``,
so a log shows what ran and how long, with no carriage returns.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Progress over ``total`` items of work.

    Args:
        total: how many items (may be raised later with :meth:`set_total`).
        desc: what the command is doing, e.g. ``"check"``.
        stream: where to write (default ``sys.stderr``, so the command's own output on stdout
            stays clean).
        tty: a bar (True) or plain lines (False); default: whether ``stream`` is a terminal.
        log: where :meth:`write` prints (default ``sys.stdout``).

    Call :meth:`start` with a label when an item begins, :meth:`advance` when it is done, and
    :meth:`close` at the end (or use it as a context manager).
    """

    def __init__(self, total: int, desc: str, *, stream=None, tty: bool | None = None, unit: str = "it",
                 log=None):
        self.stream = stream if stream is not None else sys.stderr
        self.log = log if log is not None else sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.total, self.done, self.desc = total, 0, desc
        self.started = time.perf_counter()
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, file=self.stream, leave=False, unit=unit,
                             dynamic_ncols=True, bar_format="{desc} {bar} {n_fmt}/{total_fmt} "
                             "[{elapsed}<{remaining}]{postfix}")

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def start(self, label: str) -> None:
        """Item ``done + 1`` (``label``) begins."""
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        else:
            elapsed = time.perf_counter() - self.started
            print(f"{self.desc} [{self.done + 1}/{self.total}] {elapsed:.0f}s {label}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a line of the command's own output without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message, file=self.log)
        else:
            print(message, file=self.log, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.tty is False and self.total:
            elapsed = time.perf_counter() - self.started
            print(f"{self.desc}: {self.done}/{self.total} done in {elapsed:.0f}s", file=self.stream, flush=True)
            self.tty = None  # closed: say it once

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Silent(Progress):
    """A :class:`Progress` that writes nothing (library calls, tests)."""

    def __init__(self, total: int = 0, desc: str = "", **_):
        self.total, self.done, self.desc, self.tty, self._bar = total, 0, desc, None, None
        self.log = sys.stdout
        self.started = time.perf_counter()

    def start(self, label: str) -> None:
        pass


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False

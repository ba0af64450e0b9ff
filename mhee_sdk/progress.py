"""Progress bars for every long step: tqdm on a terminal or in a notebook, periodic plain lines in logs.

A tqdm bar redraws itself with carriage returns, which floods a log file or CI output; when stderr is
not a terminal (and not a Jupyter kernel, where tqdm draws a widget) the same calls print one line at
every 10% of the work, or every 30 s when that comes first. :func:`silenced` switches all of them off
(the CLI's ``--quiet``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any

LINE_EVERY_FRACTION = 0.1
LINE_EVERY_SECONDS = 30.0

_silenced = 0


@contextmanager
def silenced() -> Iterator[None]:
    """No progress output at all inside the block, whatever each call asked for."""
    global _silenced
    _silenced += 1
    try:
        yield
    finally:
        _silenced -= 1


def _interactive() -> bool:
    stream = sys.stderr
    if type(stream).__module__.startswith("ipykernel"):  # a notebook: tqdm.auto draws a widget there
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    unit: str = "it",
    initial: int = 0,
) -> Any:
    """A tqdm-like bar (iterate it, or ``update(n)``; ``set_postfix``; a context manager).

    tqdm (``leave=False``) on a terminal or in a notebook; :class:`LineProgress` elsewhere; a disabled
    tqdm when `enabled` is False or progress is :func:`silenced`.
    """
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    from tqdm.auto import tqdm

    if not enabled or _silenced:
        return tqdm(iterable, total=total, desc=desc, disable=True)
    if _interactive():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


class LineProgress:
    """Plain-line progress on stderr: one line per 10% of `total` (or per 30 s), and one when done."""

    def __init__(
        self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        initial: int = 0,
    ) -> None:  # fmt: skip
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n = initial
        self.postfix = ""
        self.started = self.last_time = time.monotonic()
        self.last_step = self._step()
        self.closed = False

    def _step(self) -> int:
        if not self.total:
            return 0
        return int(self.n / self.total / LINE_EVERY_FRACTION + 1e-9)

    def _line(self) -> str:
        elapsed = time.monotonic() - self.started
        done = (
            f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            if self.total
            else (f"{self.n} {self.unit}")
        )
        postfix = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {done}, {elapsed:.0f} s{postfix}"

    def _emit(self) -> None:
        print(self._line(), file=sys.stderr, flush=True)
        self.last_time = time.monotonic()
        self.last_step = self._step()

    def update(self, n: int = 1) -> None:
        """Count `n` more done; print a line when a 10% step is crossed or 30 s have passed."""
        self.n += n
        if self.total and self.n >= self.total:
            return  # the closing line reports completion
        if self._step() > self.last_step or time.monotonic() - self.last_time >= LINE_EVERY_SECONDS:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next line (``loss=0.61``)."""
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Print the final line once."""
        if not self.closed:
            self.closed = True
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

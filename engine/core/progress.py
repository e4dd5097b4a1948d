"""Progress lines for long states (issue 7): rows or countries done, rate, elapsed.

Written to stderr, which every rule redirects to its job log (``logs/jobs/...``), so
`tail -f` on a job log shows a long state moving. Progress lines go to logs only, never
under ``data/``: the monotonic clock used here cannot reach an output's bytes.

    p = Progress("1B.S1", total=len(countries), unit="countries")
    for ...:
        ...
        p.advance(1)            # throttled: at most one line per `every_s` seconds
    p.finish()                  # always one final line with the total and the mean rate

Line format (stable; the CLI parses it):
    [progress] 1B.S1 countries 120/249 (48.2%) 35.1/s elapsed 3.4s
    [progress] 1B.S1 countries 249/249 (100.0%) 40.3/s elapsed 6.2s done
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

PREFIX = "[progress]"


class Progress:
    def __init__(self, state: str, total: int | None = None, unit: str = "rows",
                 every_s: float = 2.0, stream: TextIO | None = None):
        self.state = state
        self.total = None if total is None else int(total)
        self.unit = unit
        self.every_s = float(every_s)
        self.stream = stream
        self.done = 0
        self._t0 = time.monotonic()
        self._last = self._t0

    def _line(self, final: bool) -> str:
        el = time.monotonic() - self._t0
        rate = self.done / el if el > 0 else 0.0
        if self.total:
            pos = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%)"
        else:
            pos = f"{self.done}"
        return (f"{PREFIX} {self.state} {self.unit} {pos} {rate:,.1f}/s elapsed {el:.1f}s"
                + (" done" if final else ""))

    def _emit(self, final: bool) -> None:
        print(self._line(final), file=self.stream or sys.stderr, flush=True)

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(False)

    def finish(self, done: int | None = None) -> None:
        if done is not None:
            self.done = int(done)
        self._emit(True)


def report(state: str, done: int, unit: str = "rows", elapsed_s: float | None = None,
           stream: TextIO | None = None) -> None:
    """One final line for a state that has no inner loop worth ticking (rate over `elapsed_s`)."""
    p = Progress(state, total=done, unit=unit, stream=stream)
    if elapsed_s is not None:
        p._t0 = time.monotonic() - float(elapsed_s)
    p.done = int(done)
    p._emit(True)

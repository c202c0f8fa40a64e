"""Progress of long work: a bar on a terminal; elsewhere (a Ray job's log, a file) one log line
per interval, so that a log says how far a stage is without a line per item."""

from __future__ import annotations

import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("pipeline.progress")


class Progress:
    """Counts done items out of `total`: a tqdm bar when stderr is a terminal, else an INFO line
    `<desc>: done/total (rate, eta)` at most every `interval` seconds and once at the end. With
    `desc` None it shows nothing."""

    def __init__(self, total: int, desc: str | None, unit: str = "it", interval: float = 30.0, leave: bool = True):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.done, self.t0 = 0, time.monotonic()
        self.last, self.logged = self.t0, None  # when and at what count the last line was written
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave) if desc and sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.desc and time.monotonic() - self.last >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last, self.logged = time.monotonic(), self.done
        elapsed = self.last - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f", about {(self.total - self.done) / rate:.0f} s left" if 0 < rate and self.done < self.total else ""
        log.info("%s: %d/%d %s (%.2f %s/s%s)", self.desc, self.done, self.total, self.unit, rate, self.unit, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.desc and self.logged != self.done and (self.logged is not None or self.done < self.total):
            self._line()  # the final count, unless the work was done too soon to have logged at all

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

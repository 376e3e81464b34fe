"""Progress reporting: a tqdm bar on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger("scdd_ray")


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", every_s: float = 15.0, initial: int = 0):
        """`initial`: units done before this process (a resumed run); they count towards the total but not
        towards the rate, so a resumed run's eta is not taken from work it never timed."""
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = self.initial = initial
        self.t0 = self._last = time.monotonic()
        self._bar = None
        if sys.stderr.isatty():
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s or self.n >= self.total:
            self._last = now
            rate = (self.n - self.initial) / max(now - self.t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            log.info("%s: %d/%d %s (%.1f %s/s, eta %.0fs) %s", self.desc, self.n, self.total, self.unit, rate,
                     self.unit, eta, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Peak resident-memory growth of a block of CPU code, for the speed benchmarks.

``ru_maxrss`` is useless after a model load or a big import (their peak hides the step's), so a thread
samples the resident set size (psutil) every 0.2 ms while the block runs. Run the measured process with
``MALLOC_MMAP_THRESHOLD_=65536`` (``ENV``) so freed tensors leave the resident set at once instead of
staying in glibc's heap and masking the next allocation.
"""
from __future__ import annotations

import os
import threading
import time

ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.extra_bytes``: peak RSS during the block minus RSS before it."""

    def __enter__(self) -> "PeakRSS":
        import psutil

        self._proc, self._done = psutil.Process(), threading.Event()
        self.before = self._peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(2e-4)

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.extra_bytes = self._peak - self.before

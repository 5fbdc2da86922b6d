"""Peak memory of a stretch of a run, for the memory account of ``fastmask debias`` and bench/bench_scale.py.

tracemalloc sees only Python's allocator, not torch's, so it cannot account for tensors. What is measured instead:

* CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's peak of live tensor bytes), reset at the start
  of each stretch; the baseline is ``memory_allocated`` then.
* CPU: the process's resident set. Linux keeps its high-water mark (VmHWM in /proc/self/status) and resets it when
  "5" is written to /proc/self/clear_refs, which makes the peak exact and free to watch. Where that is refused, a
  thread samples the current RSS (/proc/self/statm) every ``interval`` seconds, which can miss spikes shorter than
  that. Either way the extra memory of a stretch is ``peak − RSS at its start``: memory freed but kept by the
  allocator before the stretch and reused inside it is not counted again, and loader worker processes are not
  counted at all (each is a process of its own).

The high-water mark is per process: do not nest two :class:`PeakMemory` watches.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

import torch

__all__ = ["PeakMemory", "Lap", "rss_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """The process's current resident set size in bytes (/proc/self/statm, second field)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)\s+kB", f.read()).group(1)) * 1024


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Lap:
    """One measured stretch: ``baseline_bytes`` at its start, ``peak_bytes`` during it, and ``extra_bytes`` =
    peak − baseline (never negative); ``source`` says what was read ("cuda", "vmhwm" or "statm")."""

    baseline_bytes: int
    peak_bytes: int
    source: str

    @property
    def extra_bytes(self) -> int:
        return max(0, self.peak_bytes - self.baseline_bytes)

    def to_dict(self, parameter_bytes: int | None = None) -> dict[str, float | int | str]:
        d: dict[str, float | int | str] = {"baseline_bytes": self.baseline_bytes, "peak_bytes": self.peak_bytes,
                                           "extra_bytes": self.extra_bytes, "source": self.source}
        if parameter_bytes:
            d["extra_over_parameter_bytes"] = self.extra_bytes / parameter_bytes
        return d


class PeakMemory:
    """Watch the peak memory on ``device`` over consecutive stretches: :meth:`start` opens one, :meth:`lap` closes
    it (returning a :class:`Lap`) and opens the next. Also a context manager: ``with PeakMemory() as m: ...`` then
    ``m.result``.

    Args:
        device: ``cuda`` devices use the caching allocator's statistics; anything else the process RSS.
        interval: sampling period of the fallback RSS thread, in seconds.
    """

    def __init__(self, device: torch.device | str | None = None, interval: float = 0.001) -> None:
        self.device = torch.device(device or "cpu")
        self.interval = interval
        self.result: Lap | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0
        self._source = "cuda" if self.device.type == "cuda" else "vmhwm"
        self._baseline = 0

    def start(self) -> None:
        if self._source == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
            return
        self._baseline = rss_bytes()
        if self._source == "vmhwm" and not _reset_hwm():
            self._source = "statm"
        if self._source == "statm":
            self._sampled = self._baseline
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._sample, daemon=True, name="fastmask-rss")
                self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, rss_bytes())
            time.sleep(self.interval)

    def _peak(self) -> int:
        if self._source == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self._source == "vmhwm":
            return _hwm_bytes()
        return max(self._sampled, rss_bytes())

    def lap(self) -> Lap:
        """The stretch since the last :meth:`start` / :meth:`lap`; the next one starts now."""
        result = Lap(self._baseline, max(self._peak(), self._baseline), self._source)
        self.start()
        return result

    def stop(self) -> Lap:
        """The stretch since the last :meth:`start` / :meth:`lap`; stops watching."""
        result = Lap(self._baseline, max(self._peak(), self._baseline), self._source)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.result = result
        return result

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

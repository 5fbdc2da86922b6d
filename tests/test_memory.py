"""fastmask.memory.PeakMemory against allocations of known size (the oracle: numel × element size)."""

from __future__ import annotations

import time

import pytest
import torch

from fastmask.util import memory

MB = 2**20


def touch(n_bytes: int, hold: float = 0.0) -> None:
    t = torch.ones(n_bytes // 4, dtype=torch.float32)  # ones: every page written, hence resident
    time.sleep(hold)
    del t


@pytest.mark.parametrize("source", ["vmhwm", "statm"])
def test_peak_of_a_freed_tensor(source: str, monkeypatch) -> None:
    if source == "statm":
        monkeypatch.setattr(memory, "_reset_hwm", lambda: False)
    with memory.PeakMemory(interval=0.001) as m:
        touch(160 * MB, hold=0.05)  # held 50 sampling periods, so the fallback sampler sees it too
    lap = m.result
    assert lap.source == source
    assert 0.97 * 160 * MB <= lap.extra_bytes <= 160 * MB + 40 * MB
    assert lap.to_dict(parameter_bytes=80 * MB)["extra_over_parameter_bytes"] == lap.extra_bytes / (80 * MB)


def test_laps_measure_each_stretch_on_its_own() -> None:
    m = memory.PeakMemory()
    m.start()
    touch(200 * MB)
    big = m.lap()
    touch(40 * MB)
    small = m.stop()
    assert big.extra_bytes >= 0.97 * 200 * MB
    # the second stretch does not inherit the first one's peak (the allocator may reuse some freed pages: <= 40 MB)
    assert small.extra_bytes <= 40 * MB + 20 * MB

"""Named ranges that show up both in Nsight (NVTX) and in torch.profiler traces, with the same name.

``with phase("fastmask.importance"):`` opens an NVTX range (a ~1.5 µs no-op without a GPU) and a
``torch.profiler.record_function`` range, so a CPU trace shows the same structure Nsight shows on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nvtx
import torch

DOMAIN = "fastmask"


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """An NVTX range and a profiler record_function range, both called ``name``."""
    with nvtx.annotate(name, domain=DOMAIN), torch.profiler.record_function(name):
        yield

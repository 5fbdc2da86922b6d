"""Named ranges that show up both in Nsight (NVTX) and in torch.profiler traces, with the same name.

``with phase("fastmask.importance"):`` opens an NVTX range (a ~1.5 µs no-op without a GPU) and a
``torch.profiler.record_function`` range, so a CPU trace shows the same structure Nsight shows on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import nvtx
import torch

DOMAIN = "fastmask"
T = TypeVar("T")


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """An NVTX range and a profiler record_function range, both called ``name``. Under torch.compile neither: nvtx
    is a Cython call Dynamo cannot trace (a graph break), and Dynamo ignores record_function anyway."""
    if torch.compiler.is_compiling():
        yield
        return
    with nvtx.annotate(name, domain=DOMAIN), torch.profiler.record_function(name):
        yield


#: Every phase range a debias run opens (docs/algorithm.md §5's order); each op's range is the op table's
#: ``Op.profile_range`` (:mod:`fastmask.ops.table`).
PHASES = ("fastmask.data", "fastmask.importance", "fastmask.mask", "fastmask.step1", "fastmask.head_reinit",
          "fastmask.step2", "fastmask.evaluate")


def ranged(iterable: Iterable[T], name: str = "fastmask.data") -> Iterator[T]:
    """The items of ``iterable``, each fetch (reading, decoding, batching; a DataLoader's wait for its workers) inside
    a ``phase(name)`` range, so the trace shows loading apart from compute."""
    it = iter(iterable)
    while True:
        with phase(name):
            try:
                item = next(it)
            except StopIteration:
                return
        yield item


@contextlib.contextmanager
def trace(directory: str | os.PathLike | None, name: str = "trace.json") -> Iterator[Path | None]:
    """Profile the block with torch.profiler (CPU activities, plus CUDA when available) and write a Chrome trace
    (chrome://tracing, Perfetto) to ``directory/name`` on exit; yields that path. ``None`` profiles nothing."""
    if directory is None:
        yield None
        return
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=False) as prof:
        yield path
    prof.export_chrome_trace(str(path))

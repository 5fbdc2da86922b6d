"""fastmask.parallel.percentile.percentile: 2 processes over gloo (CPU) against numpy on the gathered data."""

from __future__ import annotations

import math
import os
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from percentile_cases import DTYPES, METHODS, assert_same, has_mixed_zeros, make_values, numpy_percentile, split
from test_distributed import free_port

from fastmask.parallel import percentile as parallel

WORLD = 2
CASES = [  # (dtype, kind, sizes on rank 0, sizes on rank 1)
    (torch.float32, "lognormal", [5000, 3, 0, 1200], [777, 40000]),
    (torch.float64, "mixed", [1, 2, 3], [4096, 0]),
    (torch.float16, "few", [10000], [3, 3, 3]),
    (torch.bfloat16, "special", [300, 20], [0]),  # rank 1 holds only an empty tensor
    (torch.float32, "equal", [100], [100]),
]
QS = (0.0, 12.5, 50.0, 99.0, 100.0, 100 / 3)


def shard(case: int, rank: int) -> list[torch.Tensor]:
    dtype, kind, *sizes = CASES[case]
    rng = np.random.default_rng(1000 * case + rank)
    return split(make_values(rng, sum(sizes[rank]), dtype, kind), sizes[rank]) or [torch.empty(0, dtype=dtype)]


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        for case in range(len(CASES)):
            gathered = [t for r in range(WORLD) for t in shard(case, r)]  # the data every rank holds, together
            for q in QS:
                for method in METHODS:
                    got = parallel.percentile(shard(case, rank), q, method)
                    assert_same(got, numpy_percentile(gathered, q, method), not has_mixed_zeros(gathered))
        # NaN on rank 1 only: both ranks raise, neither hangs in a collective
        local = [torch.ones(10), torch.full((4, 2), math.nan) if rank == 1 else torch.ones(3)]
        expected = r"NaN on rank\(s\) \[1\]" + (r".*tensors\[1\] \(shape \[4, 2\]" if rank else "")
        with pytest.raises(ValueError, match=expected):
            parallel.percentile(local, 50.0)
        # different dtypes on the ranks
        with pytest.raises(TypeError, match="different dtypes"):
            parallel.percentile([torch.ones(3, dtype=torch.float64 if rank else torch.float32)], 50.0)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_matches_numpy_on_gathered_data():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), kind=st.sampled_from(("normal", "few", "special", "mixed")),
       sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=20).filter(lambda s: sum(s) > 0),
       seed=st.integers(0, 2**32 - 1), q=st.floats(0.0, 100.0), method=st.sampled_from(METHODS))
def test_without_process_group_is_the_local_percentile(dtype, kind, sizes, seed, q, method):
    tensors = split(make_values(np.random.default_rng(seed), sum(sizes), dtype, kind), sizes)
    assert_same(parallel.percentile(tensors, q, method), numpy_percentile(tensors, q, method),
                not has_mixed_zeros(tensors))

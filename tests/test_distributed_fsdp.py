"""SWiFT and BMFT on an FSDP2-sharded model (torch.distributed.fsdp.fully_shard), 2 processes over gloo (CPU),
against the single-process run on the same data order (tests/test_distributed.py's model, batches and configs).

Every parameter is a DTensor sharded by rows: each rank computes the importances of its own shards, builds their
masks with globally all-reduced min / max (and the distributed percentile for BMFT), and the masked optimizers
step the local shards. The head's 1-row weight and 1-element bias are wholly on rank 0 (empty shards on rank 1). The
ranks' mask shards, concatenated, and the gathered final weights must equal the one-process run's.
"""

from __future__ import annotations

from dataclasses import fields, replace
from datetime import timedelta
from pathlib import Path

import pytest
import test_distributed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import assert_same_run, make_batches, make_model, rank_batches

from fastmask.methods.bmft import bmft
from fastmask.methods.configs import StepConfig
from fastmask.methods.swift import swift
from fastmask.parallel import fsdp

WORLD = 2
METHODS = ("swift", "bmft")
N_BATCHES = 2  # of 16 samples, 8 per rank


def configs() -> dict[str, object]:
    """test_distributed's configurations with one epoch per step (gloo collectives make FSDP slow on 2 cores)."""
    out = {}
    for method, config in test_distributed.configs().items():
        steps = {f.name: replace(getattr(config, f.name), epochs=1) for f in fields(config)
                 if isinstance(getattr(config, f.name), StepConfig)}
        out[method] = replace(config, **steps)
    return out


def run(method: str, batches: list) -> dict:
    """The single-process run (test_distributed.run) with these configurations."""
    model = make_model()
    result = (swift if method == "swift" else bmft)(model, batches, batches, config=configs()[method])
    return {"masks": {k: v.clone() for k, v in result.masks.items()},
            "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "history": result.history, "checks": result.checks}


def _fsdp_run(method: str, batches: list) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert fsdp.is_sharded(model)
    result = (swift if method == "swift" else bmft)(model, batches, batches, config=configs()[method])
    return {"masks": {k: v.clone() for k, v in result.masks.items()},
            "weights": {k: p.full_tensor().detach().clone() for k, p in model.named_parameters()},
            "history": result.history, "checks": result.checks}


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on the CI's two cores
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        mine = rank_batches(make_batches(N_BATCHES), rank)
        results = {m: _fsdp_run(m, mine) for m in METHODS}
        model = make_model()
        with pytest.raises(ValueError, match="not sharded: fully_shard the model's root"):
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model[0], mesh=init_device_mesh("cpu", (WORLD,)))  # the other layers stay plain tensors
            swift(model, mine, mine, config=configs()["swift"])
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp_two_processes_equal_single_process(tmp_path: Path) -> None:
    single = {m: run(m, make_batches(N_BATCHES)) for m in METHODS}
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'store'}", str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert ranks[1]["swift"]["masks"]["6.weight"].shape == (0, 8)  # the head is on rank 0 only
    assert ranks[0]["swift"]["masks"]["0.weight"].shape == (2, 3, 3, 3)  # half of the first conv's 4 filters
    for method in METHODS:
        ref = single[method]
        if method == "bmft":
            hard = ref["masks"]
            assert 0 < sum(int(m.sum()) for m in hard.values()) < sum(m.numel() for m in hard.values())
        for k, m in ref["masks"].items():
            got = torch.cat([r[method]["masks"][k] for r in ranks])
            if m.dtype == torch.bool:
                assert torch.equal(got, m), f"{method}: hard mask {k} differs"
            else:
                torch.testing.assert_close(got, m, rtol=1e-4, atol=1e-6,
                                           msg=lambda s, k=k, method=method: f"{method} mask {k}: {s}")
        moved = sum(float((ref["weights"][k] - w).abs().sum()) for k, w in make_model().state_dict().items())
        assert moved > 1e-3, "the run must change the weights for the comparison to mean anything"
        for r, got in enumerate(ranks):
            got, at = got[method], f"{method} rank {r}"
            assert_same_run(got, ref, at)

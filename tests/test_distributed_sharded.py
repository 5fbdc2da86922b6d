"""Masks of sharded importances (fastmask.parallel.fsdp.sharded_soft_mask; fastmask.masking.masks with sharded=True): 2
processes over gloo (CPU), each holding uneven pieces of every tensor, against fastmask.masking.masks on the full
tensors.

The pieces cover FSDP's row shards and flat 1-D shards, a tensor whose max == min (Norm's guard), a tensor constant
on one rank's piece only (the bounds must be global), a NaN in one rank's piece, and tensors whose piece on rank 1
is empty (FSDP gives an empty shard when a dimension is smaller than the world size)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port

from fastmask.masking import masks
from fastmask.parallel import fsdp

WORLD = 2
RATE = 60.0
# name: (full shape, elements of the flattened tensor on rank 0 (rank 1 has the rest), shard by rows?)
LAYOUT = {
    "conv.weight": ((37, 5), 29 * 5, True),
    "flat": ((1000,), 3, False),
    "const_b": ((6, 4), 4, True),  # I_b constant: Norm(I_b) is the raw I_b
    "const_both": ((7,), 2, False),  # both constant
    "piece_const": ((40,), 20, False),  # constant on rank 0's piece only
    "rank1_empty": ((9,), 9, False),
    "nan": ((50,), 30, False),  # a NaN in rank 1's piece of I_l
    "head.weight": ((1, 8), 8, True),
    "head.bias": ((1,), 1, False),
}
FEATURE = [n for n in LAYOUT if not n.startswith("head.")]


def full_importances() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    imp_b, imp_l = {}, {}
    for name, (shape, _, _) in LAYOUT.items():
        # squared gradients: non-negative, a few orders of magnitude apart, some exact zeros
        imp_b[name] = (torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 1, shape, generator=g)).square()
        imp_l[name] = (torch.randn(shape, generator=g) * 10 ** torch.randint(-3, 1, shape, generator=g)).square()
        imp_b[name].view(-1)[::11] = 0.0
    imp_b["const_b"].fill_(0.25)
    imp_b["const_both"].fill_(3.0)
    imp_l["const_both"].fill_(0.5)
    imp_b["piece_const"][:20] = 1.0
    imp_b["piece_const"][25] = 4.0  # the max is on rank 1
    imp_l["nan"][40] = math.nan
    return imp_b, imp_l


def piece(t: torch.Tensor, name: str, rank: int) -> torch.Tensor:
    shape, split, by_rows = LAYOUT[name]
    flat = t.reshape(-1)
    part = flat[:split] if rank == 0 else flat[split:]
    if by_rows:  # FSDP's dim-0 shard: whole rows, the trailing dims kept
        return part.reshape(-1, *shape[1:]).clone()
    return part.clone()


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    try:
        imp_b, imp_l = full_importances()
        names = list(LAYOUT)
        mine_b = [piece(imp_b[n], n, rank) for n in names]
        mine_l = [piece(imp_l[n], n, rank) for n in names]
        calls = []
        real = dist.all_reduce

        def counting(t, *args, **kwargs):
            calls.append(str(kwargs.get("op", args[0] if args else None)))
            return real(t, *args, **kwargs)

        dist.all_reduce = counting
        try:
            ratio = fsdp.sharded_soft_mask(mine_b, mine_l, apply_tanh=False)
        finally:
            dist.all_reduce = real
        soft = fsdp.sharded_soft_mask(mine_b, mine_l)
        # the dict-level API of fastmask.masking.masks, keyed by parameter name, on the same pieces
        pieces_b, pieces_l = dict(zip(names, mine_b, strict=True)), dict(zip(names, mine_l, strict=True))
        by_name = masks.importance_ratio(pieces_b, pieces_l, sharded=True)
        assert all(torch.equal(by_name[n].nan_to_num(), r.nan_to_num()) for n, r in zip(names, ratio, strict=True))
        kept = [n for n in names if n != "nan"]
        b_kept, l_kept = {n: pieces_b[n] for n in kept}, {n: pieces_l[n] for n in kept}
        features = [n for n in kept if n in FEATURE]
        hard = masks.bmft_mask(b_kept, l_kept, features, RATE, sharded=True)
        inclusive = masks.bmft_mask(b_kept, l_kept, features, RATE, inclusive=True, sharded=True)
        # the NaN in rank 1's piece makes that whole tensor's ratio NaN on both ranks (its bounds are NaN)
        with pytest.raises(ValueError, match=r"NaN on rank\(s\) \[0, 1\]"):
            masks.bmft_mask(pieces_b, pieces_l, FEATURE, RATE, sharded=True)
        sums = fsdp.shard_sums([m.float() for m in hard.values()])  # SWiFT's head re-init means
        torch.save({"ratio": ratio, "soft": soft, "hard": hard, "inclusive": inclusive, "calls": calls,
                    "kept": kept, "sums": sums}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _joined(parts: list[dict], key: str, i: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([p[key][i].reshape(-1) for p in parts]).reshape(shape)


def test_sharded_masks_equal_the_full_tensors_masks(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    imp_b, imp_l = full_importances()
    assert piece(imp_b["rank1_empty"], "rank1_empty", 1).numel() == 0
    assert piece(imp_b["head.weight"], "head.weight", 1).shape == (0, 8)
    ratio = masks.importance_ratio(imp_b, imp_l)  # the single-process masks (fused kernels) are the oracle
    soft = masks.swift_mask(imp_b, imp_l)
    for i, (name, (shape, _, _)) in enumerate(LAYOUT.items()):
        got = _joined(parts, "ratio", i, shape)
        assert torch.equal(got.isnan(), ratio[name].isnan()), name
        assert torch.equal(got.nan_to_num(), ratio[name].nan_to_num()), f"ratio of {name} is not bit-identical"
        torch.testing.assert_close(_joined(parts, "soft", i, shape), soft[name], rtol=5e-7, atol=0.0,
                                   equal_nan=True, msg=lambda s, name=name: f"soft mask of {name}: {s}")
    assert ratio["nan"].isnan().all()  # torch's min / max carry the NaN into the whole tensor, and so must the shards
    assert torch.equal(ratio["const_both"], torch.full((7,), 3.0 / (0.5 + 1e-10)))  # guard: raw I_b / raw I_l

    kept = parts[0]["kept"]
    full_b, full_l = {n: imp_b[n] for n in kept}, {n: imp_l[n] for n in kept}
    features = [n for n in kept if n in FEATURE]
    for key, inclusive in (("hard", False), ("inclusive", True)):
        expected = masks.bmft_mask(full_b, full_l, features, rate=RATE, inclusive=inclusive)
        selected = sum(int(m.sum()) for m in expected.values())
        assert 0 < selected < sum(m.numel() for m in expected.values())
        for name in kept:
            got = torch.cat([p[key][name].reshape(-1) for p in parts]).reshape(LAYOUT[name][0])
            assert got.dtype == torch.bool and torch.equal(got, expected[name]), f"{key} mask of {name} differs"
        if key == "hard":
            counts = [int(m.sum()) for m in expected.values()], [m.numel() for m in expected.values()]
            assert all(p["sums"] == counts for p in parts)  # over both ranks' shards, equal on both
    for p in parts:  # one MIN and one MAX all-reduce for every tensor's bounds together
        assert p["calls"] == [str(dist.ReduceOp.MIN), str(dist.ReduceOp.MAX)]


def test_without_process_group_is_the_single_process_mask() -> None:
    imp_b, imp_l = full_importances()
    names = list(LAYOUT)
    got = fsdp.sharded_soft_mask([imp_b[n] for n in names], [imp_l[n] for n in names], apply_tanh=False)
    expected = masks.importance_ratio(imp_b, imp_l)
    for name, r in zip(names, got, strict=True):
        assert torch.equal(r.nan_to_num(), expected[name].nan_to_num()) and torch.equal(r.isnan(),
                                                                                         expected[name].isnan())
    lo, hi = fsdp.global_min_max([torch.tensor([2.0, -1.0]), torch.empty(0), torch.tensor([math.nan, 1.0])])
    assert lo[0] == -1.0 and hi[0] == 2.0
    assert lo[1] == math.inf and hi[1] == -math.inf
    assert lo[2].isnan() and hi[2].isnan()


def test_bad_input_names_the_tensor() -> None:
    with pytest.raises(ValueError, match="tensor 1 has I_b shard shape"):
        fsdp.sharded_soft_mask([torch.ones(2), torch.ones(3)], [torch.ones(2), torch.ones(4)])
    with pytest.raises(ValueError, match="2 I_b tensors but 1 I_l"):
        fsdp.sharded_soft_mask([torch.ones(2), torch.ones(3)], [torch.ones(2)])

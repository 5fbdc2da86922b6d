"""The decoded-split cache: a cached loader yields the streamed loader's batches (same samples, same tensors, the
same augmentation draws) and counts the same damage; it decodes once; it refuses a loader it does not fit."""

from __future__ import annotations

import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_loader import SIZE, rewrite_member
from test_shards import make_images

from fastmask.data import transforms
from fastmask.data.cache import DecodedCache
from fastmask.data.loader import make_loader
from fastmask.data.shards import ShardIndex, write_shards
from fastmask.data.stats import ShardReadError
from fastmask.data.transforms import ImageTransform


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    """24 images in 4 shards of 6."""
    root = tmp_path / "images"
    write_shards(make_images(root, n=24), root, tmp_path / "shards", attr_cols=["sex", "site"], maxcount=6)
    return tmp_path / "shards"


def cache_of(out: Path, keys=None, *, strict: bool = False) -> DecodedCache:
    index = ShardIndex.load(out)
    return DecodedCache(index, list(keys or index.samples), transform=ImageTransform(SIZE, train=True), attr="sex",
                        attr_map=None, strict=strict)


def epochs(loader, n: int = 2) -> list[tuple]:
    """Every batch of ``n`` epochs, and each epoch's stats (PIL's messages name an object's address: masked)."""
    out = []
    for _ in range(n):
        out += [tuple(b) for b in loader]
        out.append(("stats", re.sub(r"at 0x[0-9a-f]+", "at 0x", json.dumps(loader.stats.to_dict()))))
    return out


def assert_same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert len(x) == len(y)
        for u, v in zip(x, y, strict=True):
            if isinstance(u, torch.Tensor):
                assert u.dtype == v.dtype and torch.equal(u, v)
            else:
                assert u == v


# Balanced-set style counts (keys repeated, some left out), training with augmentation and a shuffle buffer,
# multi-pass epochs, two simulated workers, one rank of three, an evaluation pass.
CASES = {
    "eval": dict(train=False),
    "importance": dict(train=False, shuffle=True),
    "train": dict(train=True),
    "train-repeats": dict(train=True, keys={f"{i:08d}": i % 3 for i in range(24)}),
    "train-epoch-length": dict(train=True, epoch_length=7),
    "train-workers": dict(train=True, workers=2),
    "eval-workers": dict(train=False, workers=2),
    "train-rank1-of-3": dict(train=True, rank=1, world_size=3),
}


@pytest.mark.parametrize("case", CASES)
def test_cached_batches_equal_streamed(shards, case):
    """Same seed: the same keys in the same batches and, augmentation included, the same tensors bit for bit."""
    kw = dict(batch_size=5, image_size=SIZE, attr="sex", seed=3, return_keys=True, **CASES[case])
    streamed = epochs(make_loader(shards, **kw))
    cached = epochs(make_loader(shards, cache=cache_of(shards), **kw))
    assert_same(cached, streamed)


def test_augmentation_on_cached_images_is_drawn_per_epoch(shards):
    """The cache holds the unaugmented images; the flips are drawn anew each epoch (not frozen by the cache)."""
    cache = cache_of(shards)
    loader = make_loader(shards, batch_size=24, image_size=SIZE, attr="sex", train=True, shuffle=False,
                         cache=cache, return_keys=True)
    seen = []
    for _ in range(3):
        x, _, _, keys = next(iter(loader))
        seen.append(dict(zip(keys, x, strict=True)))
    plain = {k: transforms.normalize_batch([cache.images[cache.entries[k]]])[0] for k in cache.keys}
    flipped = [sum(not torch.equal(epoch[k], plain[k]) for k in epoch) for epoch in seen]
    # Each image is left unchanged with probability 1/8: about 21 of 24 augmented per epoch, and different ones.
    assert all(15 <= n <= 24 for n in flipped), flipped
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


def test_decoded_once(shards, monkeypatch):
    calls = Counter()
    real = transforms.decode_image

    def counting(src, *args, **kwargs):
        calls["decode"] += 1
        return real(src, *args, **kwargs)

    monkeypatch.setattr(transforms, "decode_image", counting)
    loader = make_loader(shards, batch_size=5, image_size=SIZE, attr="sex", train=True, cache=cache_of(shards))
    for _ in range(3):
        for _ in loader:
            pass
    assert calls["decode"] == 24


def test_damage_counted_as_when_streamed(shards):
    """A member that does not decode and a truncated shard: every cached epoch has the streamed epoch's counts and
    records (reason, shard, key, detail, samples), also for a loader that reads keys several times."""
    rewrite_member(shards / "shard-000001.tar", "00000007.jpg", b"\x00garbage" * 50)
    shard = shards / "shard-000002.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    shard.write_bytes(shard.read_bytes()[:members[5].offset_data + 10])  # inside key 14's second member
    for kw in (dict(train=False), dict(train=True, keys={f"{i:08d}": 1 + i % 2 for i in range(24)})):
        args = dict(batch_size=5, image_size=SIZE, attr="sex", seed=1, return_keys=True, **kw)
        streamed = epochs(make_loader(shards, **args), 2)
        cached = epochs(make_loader(shards, cache=cache_of(shards), **args), 2)
        assert_same(cached, streamed)
        stats = json.loads(cached[-1][1])
        assert stats["skipped"] > 0 and set(stats["by_reason"]) == {"decode", "shard"}
    with pytest.raises(ShardReadError, match="shard shard-000001.tar key 00000007: decode"):
        next(iter(make_loader(shards, batch_size=5, image_size=SIZE, attr="sex", train=False, strict=True,
                              cache=cache_of(shards, strict=True))))


def test_cache_refuses_a_loader_it_does_not_fit(shards):
    half = cache_of(shards, [f"{i:08d}" for i in range(12)])
    with pytest.raises(ValueError, match="key.* not in it"):
        make_loader(shards, batch_size=5, image_size=SIZE, attr="sex", train=False, cache=half)
    with pytest.raises(ValueError, match="decoded with {'image_size': 8, 'center_crop': None, 'crop': None}; "
                                         "the loader decodes with {'image_size': 9"):
        make_loader(shards, batch_size=5, image_size=SIZE + 1, attr="sex", train=False, cache=cache_of(shards))
    with pytest.raises(ValueError, match="attribute 'sex'"):
        make_loader(shards, batch_size=5, image_size=SIZE, attr="site", train=False, cache=cache_of(shards))
    assert half.nbytes == 12 * SIZE * SIZE * 3


def test_a_cropped_transform_is_cached_at_its_output_size(shards):
    """A centre crop of the resized image (``--crop``): the cache holds crop x crop images, budgets them so, and
    replays the streamed batches bit for bit."""
    crop = SIZE - 3
    transform = ImageTransform(SIZE, train=True, crop=crop)
    index = ShardIndex.load(shards)
    cache = DecodedCache(index, list(index.samples), transform=transform, attr="sex", attr_map=None, strict=False)
    assert cache.nbytes == len(index.samples) * crop * crop * 3
    kw = dict(batch_size=5, image_size=SIZE, attr="sex", seed=3, return_keys=True, train=True, transform=transform)
    streamed = epochs(make_loader(shards, **kw))
    cached = epochs(make_loader(shards, cache=cache, **kw))
    assert_same(cached, streamed)
    assert cache.images.shape[1:] == (crop, crop, 3)

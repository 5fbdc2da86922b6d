"""Decode once: a split's images decoded and resized once into a compact uint8 array, replayed every epoch.

A debiasing run reads its external set 20 times and more (the importance pass, every epoch of both steps, the
validation part after every epoch) and its evaluation set after every epoch; decoding the same images again for
each pass was most of the time of a run on small images. :class:`DecodedCache` holds a split as uint8
[N, H, W, 3] images with their labels and attribute groups, filled by one streaming pass over its shards with the
test transform (decode, centre crop, resize: the deterministic part); a loader given the cache
(``make_loader(..., cache=)``) then applies only the per-epoch random augmentation and the normalisation to the
cached images.

A cached pass is the streamed pass replayed (:class:`CachedPassStream`): the same plan, shard order, per-worker
split, shuffle buffer and augmentation draws (the workers' chunks interleaved in this process as a DataLoader
interleaves them), so the same seed gives the same batches, bit for bit, with or without the cache. Damage is
replayed too: what the filling pass could not read (a sample that does not decode, a shard that ends early, keys
missing from their shard) is recorded per key and per shard, and every cached pass counts it exactly as a streamed
pass that met it again would (:class:`fastmask.data.stats.LoaderStats`): a cached split's counts are those of the
pass that filled the cache.

The cache's size is known before it is filled (N x H x W x 3 bytes, :mod:`fastmask.data.budget`); the caller decides
against a memory budget whether a split is cached (``fastmask debias --cache-mib``) and streams it otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from fastmask.data.budget import cache_bytes
from fastmask.data.pass_stream import PassStream, Plan, ShardRead
from fastmask.data.shards import ShardIndex
from fastmask.data.stats import SkipRecord
from fastmask.data.transforms import ImageTransform, augment

__all__ = ["DecodedCache", "CachedPassStream"]


class DecodedCache:
    """The samples ``keys`` of ``index`` decoded once (at the first :meth:`fill`) as uint8 [N, H, W, 3].

    Args:
        index: the shard index the samples are in.
        keys: the distinct keys to hold (a loader over the cache may read any of them, any number of times).
        transform: the loaders' transform; its deterministic part (every field but the augmentation and the
            normalisation: decode, crops, resize) makes the cached images, and a loader must share that part.
        attr, attr_map: how the attribute becomes the group ``a`` (as the loader's).
        strict: raise at the first damaged sample or shard, as a strict loader would.

    Attributes:
        images: uint8 [N, H, W, 3] (N: the readable samples), None before :meth:`fill`.
        labels, groups: float32 [N] and int64 [N].
        entries: key -> its row of ``images``, or the :class:`SkipRecord` of the damage that made it unreadable.
        shards: shard name -> what the filling pass read from it (:class:`~fastmask.data.pass_stream.ShardRead`).
    """

    def __init__(self, index: ShardIndex, keys: Sequence[str], *, transform: ImageTransform, attr: str,
                 attr_map: Mapping[Any, int] | None, strict: bool = False) -> None:
        self.index = index
        wanted = set(keys)
        unknown = [k for k in wanted if k not in index.samples]
        if unknown:
            raise KeyError(f"{len(unknown)} key(s) to cache are not in the shard index under {index.root}: "
                           f"{sorted(unknown)[:5]}")
        self.keys = [k for k in index.samples if k in wanted]  # index (tar) order
        self.transform = replace(transform, train=False)
        self.attr, self.attr_map = attr, attr_map
        self.strict = strict
        self.images: np.ndarray | None = None
        self.labels = np.zeros(0, dtype=np.float32)
        self.groups = np.zeros(0, dtype=np.int64)
        self.entries: dict[str, int | SkipRecord] = {}
        self.shards: dict[str, ShardRead] = {}

    @property
    def nbytes(self) -> int:
        """The bytes the filled images take (planned before :meth:`fill`: every key readable)."""
        return cache_bytes(len(self.keys), self.transform.output_size)

    @property
    def filled(self) -> bool:
        return self.images is not None

    def stream(self, plan: Plan, *, transform: ImageTransform, batch_size: int, shuffle_buffer: int,
               seed: tuple[int, ...]) -> CachedPassStream:
        """One pass of ``plan`` over the cached images with ``transform``'s augmentation and normalisation."""
        return CachedPassStream(plan, self, transform=transform, batch_size=batch_size,
                                shuffle_buffer=shuffle_buffer, seed=seed)

    def check(self, index: ShardIndex, transform: ImageTransform, attr: str, attr_map: Mapping[Any, int] | None,
              keys: Sequence[str]) -> None:
        """Raise ValueError unless a loader over ``keys`` of ``index`` with ``transform`` may read this cache."""
        if index.root.resolve() != self.index.root.resolve():
            raise ValueError(f"cache: it holds samples of {self.index.root}, not of {index.root}")
        if _decoding(transform) != _decoding(self.transform):
            raise ValueError(f"cache: it holds images decoded with {_decoding(self.transform)}; the loader decodes "
                             f"with {_decoding(transform)}")
        if (attr, dict(attr_map or {})) != (self.attr, dict(self.attr_map or {})):
            raise ValueError(f"cache: it holds the groups of attribute {self.attr!r} ({self.attr_map}); the loader "
                             f"reads {attr!r} ({attr_map})")
        held = set(self.keys)
        missing = [k for k in keys if k not in held]
        if missing:
            raise ValueError(f"cache: {len(missing)} key(s) of the loader are not in it, e.g. {missing[:3]}")

    def fill(self) -> None:
        """Read and decode every key once, in shard order, recording what could not be read (no-op once filled)."""
        if self.filled:
            return
        by_shard: dict[str, dict[str, int]] = {}
        for key in self.keys:
            by_shard.setdefault(self.index.samples[key]["shard"], {})[key] = 1
        reader = PassStream([], {s.name: str(self.index.root / s.name) for s in self.index.shards},
                            transform=self.transform, attr=self.attr,
                            attr_map=self.attr_map, batch_size=1, shuffle_buffer=0, seed=(0,), strict=self.strict)
        size = self.transform.output_size
        images = np.empty((len(self.keys), size, size, 3), dtype=np.uint8)
        labels = np.empty(len(self.keys), dtype=np.float32)
        groups = np.empty(len(self.keys), dtype=np.int64)
        n = 0
        for shard, wanted in by_shard.items():
            read = ShardRead()
            for key, sample in reader.read_members(shard, wanted, read):
                events: list[SkipRecord] = []
                out = reader.decode(shard, key, sample, None, events)
                if out is None:
                    self.entries[key] = events[-1]
                    continue
                images[n], labels[n], groups[n] = out
                self.entries[key] = n
                n += 1
            reader.shard_damage(shard, wanted, read, [])  # raises here under strict, as a streamed pass would
            self.shards[shard] = read
        # Unreadable samples leave their rows unused; the copy keeps only the readable ones.
        self.images = images if n == len(self.keys) else images[:n].copy()
        self.labels, self.groups = labels[:n], groups[:n]


#: The fields of an ImageTransform applied to the cached images every epoch rather than cached.
_PER_EPOCH = {"train", "hflip", "vflip", "transpose", "mean", "std"}


def _decoding(transform: ImageTransform) -> dict[str, Any]:
    """The fields of ``transform`` that make the cached image (all but the per-epoch augmentation and the
    normalisation, which are applied to the cached images)."""
    return {f.name: getattr(transform, f.name) for f in fields(transform) if f.name not in _PER_EPOCH}



class CachedPassStream(PassStream):
    """A :class:`~fastmask.data.pass_stream.PassStream` whose shards are read from a filled :class:`DecodedCache`:
    the same plan, order, shuffle and augmentation draws, the same damage counted, no decoding. Iterate it with
    :meth:`interleaved` to get the chunks in the order a DataLoader with that many workers would deliver them."""

    def __init__(self, plan: Plan, cache: DecodedCache, *, transform: ImageTransform, batch_size: int,
                 shuffle_buffer: int, seed: tuple[int, ...]) -> None:
        super().__init__(plan, {}, transform=transform, attr=cache.attr, attr_map=cache.attr_map,
                         batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed, strict=cache.strict)
        self.cache = cache

    def _read_shard(self, name: str, wanted: dict[str, int], events: list[SkipRecord]) -> Iterator[tuple]:
        read = self.cache.shards[name]
        for key in read.keys:
            for _ in range(wanted.get(key, 0)):
                yield name, key, None
        self.shard_damage(name, wanted, read, events)

    def decode(self, name: str, key: str, sample: Any, rng: Any, events: list[SkipRecord]) -> tuple | None:
        entry = self.cache.entries[key]
        if isinstance(entry, SkipRecord):
            self._skip(events, replace(entry))  # a copy: the loader's stats add to their own records
            return None
        img = self.cache.images[entry]
        t = self.transform
        if t.train:
            img = augment(img, rng, t.hflip, t.vflip, t.transpose)
        return img, float(self.cache.labels[entry]), int(self.cache.groups[entry])

    def interleaved(self, workers: int) -> Iterator[tuple]:
        """The chunks of ``workers`` (at least 1) simulated workers, round robin over those not yet exhausted, as
        ``torch.utils.data.DataLoader`` delivers an IterableDataset's chunks."""
        n = max(1, workers)
        active = [self.chunks(w, n) for w in range(n)]
        while active:
            for it in list(active):
                chunk = next(it, None)
                if chunk is None:
                    active.remove(it)
                else:
                    yield chunk

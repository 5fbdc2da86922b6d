"""The streaming loader over fastmask shards.

Every batch is the project's contract ``(x, y, a)``: x float32 [B, 3, H, W] normalised by the transform's mean and std
(ImageNet's by default), y float32 [B] in {0, 1}, a int64 [B] (the chosen attribute); ``(x, y, a, keys)`` with
``return_keys=True``.

How an epoch is planned (all from the shard index, identically on every rank, without communication):

1. The *occurrences*: every key of the index in write order, repeated ``keys[key]`` times (the group-balanced set
   applied by key: a key drawn k times with replacement is yielded k times; keys with count 0 or absent are
   dropped). N occurrences in all.
2. Shard order: the index order, or, when shuffling, a permutation drawn from (seed, epoch, pass).
3. Per-rank split by occurrence: rank r takes positions r, r + W, r + 2W, ... of the occurrence list in that shard
   order, up to M = ceil(N / W) positions, wrapping past the end (so every rank has exactly M samples; like
   ``DistributedSampler``, at most W - 1 samples are repeated). The ranks' samples are disjoint apart from that
   padding, whatever the number of shards; each rank reads the tar bytes of every shard it has samples in but
   decodes only its own.
4. Per-worker split inside a rank (DataLoader worker processes): whole shards round-robin when the rank has at
   least as many shards as workers (each shard is read once); otherwise occurrences round-robin (each worker reads
   the shards and decodes every n-th sample), so fewer shards than workers never leaves a worker without samples
   (webdataset's "No samples found").
5. Batches per epoch, the same on every rank: ``epoch_length`` if given; else with ``drop_last`` (the default when
   training) floor(M / B) (at least 1); else ceil(M / B) with a short last batch. When a rank's stream runs short --
   ``epoch_length`` asks for more than M samples, or corrupted samples were skipped under torchrun -- it starts
   another pass over its share (new shard order and shuffle; this is the resampling) until the count is met, so no
   rank ever waits for a collective that another rank will not join. A single-process evaluation pass (no
   ``epoch_length``, no ``drop_last``, one rank) is one pass: exactly the readable samples, once each.

Shuffling is a seeded shard-order permutation plus a per-worker buffer of ``shuffle_buffer`` samples; augmentation
draws come from a generator seeded by (seed, epoch, pass, rank, worker). The same seed, epoch, rank, world size and
worker count therefore give the same batches, byte for byte. Each iteration over the loader uses
``loader.epoch`` and then advances it; ``set_epoch(e)`` pins the epoch of the next iteration (as with
``DistributedSampler``). Workers are started per pass (not persistent).

Damage: a member that does not decode, metadata that does not parse, an incomplete sample, a shard that cannot be
opened or ends early, or keys of the index missing from their shard are skipped and counted in ``loader.stats``
(with reason, shard and key) and summarised in the log (logger ``fastmask.data``) at the end of each epoch; with
``strict=True`` the first one raises :class:`ShardReadError` naming the shard and key.

Decoding once: given a :class:`~fastmask.data.cache.DecodedCache` (``cache=``), the passes read the images from it
instead of the shards; the plan, the order, the augmentation draws and the damage counted are the same, so are the
batches (:mod:`fastmask.data.cache`).

One module over 400 lines because it is one thing: the plan of an epoch, the passes that fill it and the
re-batching that cuts their chunks are the loader's single contract (the worker side is in
:mod:`fastmask.data.pass_stream`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import pandas as pd
import torch

from fastmask.data.batch import attr_code
from fastmask.data.cache import DecodedCache
from fastmask.data.pass_stream import PassStream, Plan, identity
from fastmask.data.shards import ShardIndex
from fastmask.data.stats import LoaderStats, ShardReadError, SkipRecord
from fastmask.data.transforms import ImageTransform

log = logging.getLogger("fastmask.data")


class _Rebatcher:
    """Cuts a stream of chunks into batches of exactly ``batch_size`` (chunks of that size pass through uncopied)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.parts: list[tuple] = []
        self.pending = 0

    def push(self, part: tuple) -> None:
        self.parts.append(part)
        self.pending += len(part[3])

    def pop(self, n: int | None = None) -> tuple:
        n = self.batch_size if n is None else n
        if len(self.parts[0][3]) == n:
            self.pending -= n
            return self.parts.pop(0)
        taken: list[tuple] = []
        need = n
        while need:
            part = self.parts[0]
            k = len(part[3])
            if k <= need:
                taken.append(self.parts.pop(0))
                need -= k
            else:
                taken.append(tuple(t[:need] for t in part))
                self.parts[0] = tuple(t[need:] for t in part)
                need = 0
        self.pending -= n
        return (
            torch.cat([t[0] for t in taken]),
            torch.cat([t[1] for t in taken]),
            torch.cat([t[2] for t in taken]),
            [k for t in taken for k in t[3]],
        )


class ShardLoader:
    """Iterable over batches ``(x, y, a)`` (or ``(x, y, a, keys)``) streamed from shards; see the module docstring
    for how epochs, ranks and workers are planned. Build it with :func:`make_loader`.

    Attributes:
        index: the :class:`ShardIndex` read.
        stats: :class:`LoaderStats` of the current (or last) epoch.
        epoch: the epoch the next iteration will use.
        rank, world_size, workers: the split in use.
    """

    def __init__(
        self,
        index: ShardIndex,
        counts: dict[str, int],
        *,
        batch_size: int,
        transform: ImageTransform,
        attr: str,
        attr_map: Mapping[Any, int] | None,
        workers: int,
        seed: int,
        shuffle: bool,
        shard_shuffle: bool,
        shuffle_buffer: int,
        epoch_length: int | None,
        drop_last: bool,
        rank: int,
        world_size: int,
        strict: bool,
        return_keys: bool,
        cache: DecodedCache | None = None,
    ) -> None:
        self.index = index
        self.cache = cache
        self.batch_size = batch_size
        self.transform = transform
        self.attr = attr
        self.attr_map = attr_map
        self.workers = workers
        self.seed = seed
        self.shuffle = shuffle
        self.shard_shuffle = shard_shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.rank = rank
        self.world_size = world_size
        self.strict = strict
        self.return_keys = return_keys
        self.epoch = 0
        # (shard, [(key, count)]) for the shards holding at least one selected occurrence, in index order.
        by_shard: dict[str, list[tuple[str, int]]] = {}
        for key, rec in index.samples.items():
            if counts.get(key, 0) > 0:
                by_shard.setdefault(rec["shard"], []).append((key, counts[key]))
        shard_order = [s.name for s in index.shards]
        self._shards = [(name, by_shard[name]) for name in shard_order if name in by_shard]
        self._urls = {s.name: str(index.root / s.name) for s in index.shards}
        n = sum(counts.get(k, 0) for k in index.samples)
        self.samples_total = n
        self.samples_per_rank = n if world_size == 1 else -(-n // world_size)
        m = self.samples_per_rank
        if epoch_length is not None:
            self.batches_per_epoch, self._take, self._partial = epoch_length, epoch_length * batch_size, False
        elif drop_last:
            b = max(1, m // batch_size)
            self.batches_per_epoch, self._take, self._partial = b, b * batch_size, False
        else:
            self.batches_per_epoch, self._take, self._partial = -(-m // batch_size), m, True
        # One pass is enough only for a single-process evaluation pass; elsewhere passes repeat until the count.
        self._cycle = not (self._partial and world_size == 1)
        self.stats = LoaderStats(rank=rank, world_size=world_size, planned=self._take)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (shard order, shuffle and augmentation draws depend on it)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def plan(self, epoch: int, pass_: int = 0) -> Plan:
        """This rank's share of one pass: (shard, key -> occurrences) in read order (see the module docstring)."""
        order = list(range(len(self._shards)))
        if self.shuffle and self.shard_shuffle:
            np.random.default_rng([self.seed, epoch, pass_]).shuffle(order)
        shards = [self._shards[i] for i in order]
        if self.world_size == 1:
            return [(name, dict(keys)) for name, keys in shards]
        occurrences = [(name, key) for name, keys in shards for key, c in keys for _ in range(c)]
        n, w = len(occurrences), self.world_size
        share: dict[str, dict[str, int]] = {}
        for p in range(self.rank, w * (-(-n // w)), w):
            name, key = occurrences[p % n]
            bucket = share.setdefault(name, {})
            bucket[key] = bucket.get(key, 0) + 1
        return list(share.items())

    def _pass(self, epoch: int, pass_: int) -> Iterator[tuple]:
        plan = self.plan(epoch, pass_)
        nworkers = min(self.workers, sum(c for _, keys in plan for c in keys.values()))
        seed = (self.seed, epoch, pass_, self.rank)
        if self.cache is not None:
            # No decoding left to spread over processes: the workers' shares are replayed here, in their order.
            self.cache.fill()
            if nworkers:
                # A streamed pass's DataLoader draws its base seed from torch's global RNG; the same draw here keeps
                # the run's random stream (dropout, head re-initialisation) the same with and without the cache.
                torch.empty((), dtype=torch.int64).random_()
            yield from self.cache.stream(plan, transform=self.transform, batch_size=self.batch_size,
                                         shuffle_buffer=self.shuffle_buffer, seed=seed).interleaved(nworkers)
            return
        dataset = PassStream(
            plan,
            self._urls,
            transform=self.transform,
            attr=self.attr,
            attr_map=self.attr_map,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            seed=seed,
            strict=self.strict,
        )
        if nworkers == 0:
            yield from dataset
            return
        # A plain DataLoader (webdataset's WebLoader wraps one in a generator, which hides the worker shutdown).
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=nworkers, collate_fn=identity)
        it = iter(loader)
        try:
            yield from it
        finally:
            # Stop the workers now, also when a worker raised: the exception's traceback keeps the iterator (and
            # the worker processes) alive until it is collected, and interpreter exit then waits 5 s per worker.
            it._shutdown_workers()

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch
        self.epoch += 1
        stats = LoaderStats(epoch=epoch, rank=self.rank, world_size=self.world_size, planned=self._take)
        for d in self.index.damage:
            stats.add(SkipRecord(d["reason"], d["shard"], d["key"], d["detail"], samples=0))
        self.stats = stats
        batches = _Rebatcher(self.batch_size)
        taken = 0  # samples accepted into batches (yielded or pending)
        pass_ = 0
        while taken < self._take:
            delivered = 0
            chunks = self._pass(epoch, pass_)
            try:
                for x, y, a, keys, events in chunks:
                    for record in events:
                        stats.add(record)
                    if not keys:
                        continue
                    delivered += len(keys)
                    part = (x, y, a, keys)
                    room = self._take - taken
                    if len(keys) > room:
                        part = tuple(t[:room] for t in part)
                    batches.push(part)
                    taken += len(part[3])
                    while batches.pending >= self.batch_size:
                        yield self._emit(batches.pop(), stats)
                    if taken >= self._take:
                        break
            finally:
                chunks.close()  # stops this pass's workers now (also when the caller stops early)
            stats.passes += 1
            if taken >= self._take or not self._cycle:
                break
            if delivered == 0:
                raise ShardReadError(
                    f"rank {self.rank}: a whole pass over its {len(self._shards)} shard(s) under {self.index.root} "
                    f"gave no readable sample; {stats.summary()}"
                )
            pass_ += 1
        if batches.pending:
            yield self._emit(batches.pop(batches.pending), stats)
        (log.warning if stats.records else log.info)("%s", stats.summary())

    def _emit(self, batch: tuple, stats: LoaderStats) -> tuple:
        stats.samples += len(batch[3])
        stats.batches += 1
        return batch if self.return_keys else batch[:3]


def _resolve_index(urls_or_dir: str | os.PathLike | Iterable[str | os.PathLike] | ShardIndex) -> ShardIndex:
    if isinstance(urls_or_dir, ShardIndex):
        return urls_or_dir
    if isinstance(urls_or_dir, (str, os.PathLike)):
        path = Path(urls_or_dir)
        if path.is_dir():
            try:
                return ShardIndex.load(path)
            except FileNotFoundError:
                tars = sorted(path.glob("*.tar"))
                if not tars:
                    raise FileNotFoundError(f"{path}: no shard index and no .tar shards") from None
                return ShardIndex.scan(tars)
        if path.suffix == ".json":
            return ShardIndex.load(path)
        return ShardIndex.scan(list(braceexpand.braceexpand(str(urls_or_dir))))
    return ShardIndex.scan(list(urls_or_dir))


def _resolve_counts(index: ShardIndex, keys: Mapping[str, int] | Iterable[str] | None) -> dict[str, int]:
    if keys is None:
        return {k: 1 for k in index.samples}
    if isinstance(keys, str):
        raise TypeError("keys must be a mapping key -> count or an iterable of keys, not a single string")
    if isinstance(keys, pd.Series) and not pd.api.types.is_integer_dtype(keys.dtype):
        # A Series of keys (e.g. group_balance(index.table(), ...)["source_index"]), not key -> count.
        keys = keys.tolist()
    if hasattr(keys, "items"):
        counts: dict[str, int] = {}
        for k, c in keys.items():
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0:
                raise ValueError(f"keys[{k!r}]: count {c!r} is not a non-negative integer")
            counts[str(k)] = int(c)
    else:
        counts = dict(Counter(str(k) for k in keys))
    unknown = [k for k, c in counts.items() if c > 0 and k not in index.samples]
    if unknown:
        raise KeyError(
            f"{len(unknown)} key(s) of `keys` are not in the shard index under {index.root}: {unknown[:5]}"
        )
    return counts


def _default_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if world_size is None:
            world_size = dist.get_world_size() if initialised else 1
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return rank, world_size


def _resolve_attr(attr: str | None, names: list[str]) -> str:
    if attr is None:
        if len(names) != 1:
            raise ValueError(f"attr: the shards have attributes {names}; choose one")
        return names[0]
    if attr not in names:
        raise ValueError(f"attr {attr!r} is not an attribute of the shards (they have {names})")
    return attr


def make_loader(
    urls_or_dir: str | os.PathLike | Iterable[str | os.PathLike] | ShardIndex,
    *,
    batch_size: int,
    train: bool,
    image_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool | None = None,
    shard_shuffle: bool = True,
    shuffle_buffer: int = 1000,
    epoch_length: int | None = None,
    drop_last: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    keys: Mapping[str, int] | Iterable[str] | None = None,
    attr: str | None = None,
    attr_map: Mapping[Any, int] | None = None,
    center_crop: int | None = None,
    transform: ImageTransform | None = None,
    strict: bool = False,
    return_keys: bool = False,
    cache: DecodedCache | None = None,
) -> ShardLoader:
    """A streaming loader of ``(x, y, a)`` batches over shards written by :func:`write_shards`.

    Args:
        urls_or_dir: a shard directory (with its ``*-index.json``), an index file, a :class:`ShardIndex`, or local
            tar paths (a list or a brace pattern such as ``"out/shard-{000000..000003}.tar"``; they are scanned).
        batch_size: samples per batch.
        train: training mode: random flips / transpose (docs/algorithm.md §1) and, by default, shuffling and
            ``drop_last``.
        image_size: output height and width.
        workers: DataLoader worker processes; 0 reads in this process.
        seed: base seed of shard order, shuffle buffer and augmentation (use the same on every rank).
        shuffle: shuffle shards and samples (default: ``train``); the importance pass uses test transforms
            with shuffling (``train=False, shuffle=True``).
        shard_shuffle: permute the shard order each epoch when shuffling.
        shuffle_buffer: per-worker sample shuffle buffer when shuffling.
        epoch_length: batches per epoch on every rank (fixed; passes repeat to fill it).
        drop_last: full batches only, floor(M / B) of them (default: ``train``).
        rank, world_size: this process's place in the job (default: from ``torch.distributed`` if initialised).
        keys: the samples to stream and how often: key -> count (a mapping, or an integer Series such as
            ``value_counts()``; count k yields the key k times, 0 drops it), or an iterable of keys with repeats (a
            list, or a Series of keys such as the ``source_index`` column of
            ``fastmask.balance.group_balance(index.table(), attr)``); default every key once.
        attr: the attribute that becomes ``a`` (default: the only one).
        attr_map: value -> int group, for attributes that are not integers.
        center_crop: centre crop of the original image before resizing.
        transform: a custom :class:`ImageTransform` (overrides ``train`` augmentation, ``image_size`` and
            ``center_crop``).
        strict: raise :class:`ShardReadError` on the first damaged sample or shard instead of skipping it.
        return_keys: yield ``(x, y, a, keys)``.
        cache: read the images from this :class:`~fastmask.data.cache.DecodedCache` (filled at the first pass;
            it must hold every selected key, resized as ``transform``) instead of decoding them every pass; the
            batches and the counts are those of the streamed loader (:mod:`fastmask.data.cache`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if epoch_length is not None and epoch_length < 1:
        raise ValueError(f"epoch_length must be >= 1 or None, got {epoch_length}")
    rank, world_size = _default_rank(rank, world_size)
    index = _resolve_index(urls_or_dir)
    attr = _resolve_attr(attr, index.attr_cols)
    counts = _resolve_counts(index, keys)
    for key, rec in index.samples.items():
        if counts.get(key, 0) > 0:
            attr_code(rec["attrs"].get(attr), attr, attr_map, f"key {key} (row {rec['row']}, shard {rec['shard']})")
    if sum(counts.get(k, 0) for k in index.samples) == 0:
        raise ValueError(f"no samples selected from the shards under {index.root} (keys selects none)")
    transform = transform or ImageTransform(image_size, train=train, center_crop=center_crop)
    if cache is not None:
        cache.check(index, transform, attr, attr_map, [k for k, c in counts.items() if c > 0])
    return ShardLoader(
        index,
        counts,
        batch_size=batch_size,
        transform=transform,
        attr=attr,
        attr_map=attr_map,
        workers=workers,
        seed=seed,
        shuffle=train if shuffle is None else shuffle,
        shard_shuffle=shard_shuffle,
        shuffle_buffer=shuffle_buffer,
        epoch_length=epoch_length,
        drop_last=train if drop_last is None else drop_last,
        rank=rank,
        world_size=world_size,
        strict=strict,
        return_keys=return_keys,
        cache=cache,
    )



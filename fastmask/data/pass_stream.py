"""The worker side of the streaming loader: one pass over one rank's share of the shards (its plan), read, decoded
and batched by :class:`PassStream`, split among the DataLoader workers by :func:`worker_share`. The main process
(:mod:`fastmask.data.loader`) plans the passes, runs the workers and re-batches their chunks."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from fastmask.data.batch import attr_code
from fastmask.data.shards import IMAGE_EXTENSIONS
from fastmask.data.stats import ShardReadError, SkipRecord
from fastmask.data.tar import iter_tar_members
from fastmask.data.transforms import ImageTransform

log = logging.getLogger("fastmask.data")

Plan = list[tuple[str, dict[str, int]]]  # (shard name, key -> occurrences) in read order


@dataclass
class ShardRead:
    """What reading one shard delivered: the complete keys in tar order and, when damage stopped it, the error."""

    keys: list[str] = field(default_factory=list)
    error: str | None = None


def worker_share(plan: Plan, wid: int, nworkers: int) -> Plan:
    if nworkers == 1:
        return plan
    if len(plan) >= nworkers:
        return plan[wid::nworkers]
    share: dict[str, dict[str, int]] = {}
    occurrences = ((name, key) for name, keys in plan for key, c in keys.items() for _ in range(c))
    for i, (name, key) in enumerate(occurrences):
        if i % nworkers == wid:
            bucket = share.setdefault(name, {})
            bucket[key] = bucket.get(key, 0) + 1
    return list(share.items())


def identity(x: Any) -> Any:
    return x


class PassStream(torch.utils.data.IterableDataset):
    """Reads, decodes and batches one pass of one rank's share; each worker takes its part of the plan.

    Yields chunks ``(x, y, a, keys, events)`` of up to ``batch_size`` samples (the last one of a worker may be
    short or empty); ``events`` carries the skip records met since the previous chunk, so the counts reach the main
    process from worker processes too.
    """

    def __init__(
        self,
        plan: Plan,
        urls: Mapping[str, str],
        *,
        transform: ImageTransform,
        attr: str,
        attr_map: Mapping[Any, int] | None,
        batch_size: int,
        shuffle_buffer: int,
        seed: tuple[int, ...],
        strict: bool,
    ) -> None:
        super().__init__()
        self.plan = plan
        self.urls = dict(urls)
        self.transform = transform
        self.attr = attr
        self.attr_map = attr_map
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.strict = strict

    def _skip(self, events: list[SkipRecord], record: SkipRecord) -> None:
        if self.strict:
            key = f" key {record.key}" if record.key else ""
            raise ShardReadError(f"shard {record.shard}{key}: {record.reason}: {record.detail}")
        events.append(record)

    def _read_shard(self, name: str, wanted: dict[str, int], events: list[SkipRecord]) -> Iterator[tuple]:
        """Yield (shard, key, sample) once per wanted occurrence, in tar order; record what could not be read."""
        read = ShardRead()
        for key, sample in self.read_members(name, wanted, read):
            for _ in range(wanted[key]):
                yield name, key, sample
        self.shard_damage(name, wanted, read, events)

    def read_members(self, name: str, wanted: Mapping[str, int], read: ShardRead) -> Iterator[tuple[str, dict]]:
        """Yield (key, members) for every complete wanted key of shard ``name`` in tar order, noting in ``read`` each
        key yielded and the error that stopped the shard, if one did.

        Members of one key are consecutive in a shard (webdataset's grouping rule); a key is complete when the
        next key starts. Damage stops the shard.
        """
        error: Exception | None = None
        key, sample = None, {}
        done: set[str] = set()
        try:
            stream = gopen(self.urls[name], "rb", bufsize=1 << 20)
        except Exception as err:  # gopen raises what the opener raises (OSError, ValueError for bad URLs, ...)
            stream, error = None, err
        if stream is not None:
            members = iter_tar_members(stream, want=lambda m: base_plus_ext(m)[0] in wanted)
            with stream:
                while True:
                    try:
                        member, data = next(members)
                    except StopIteration:
                        break
                    except (OSError, ValueError) as err:  # TarFormatError is a ValueError
                        error = err
                        break
                    base, ext = base_plus_ext(member)
                    if base != key:
                        if key is not None and key not in done:
                            done.add(key)
                            read.keys.append(key)
                            yield key, sample
                        key, sample = base, {}
                    sample[ext.lower()] = data
        # After damage, the last key counts only if it has both of its members (image and JSON).
        complete = error is None or ("json" in sample and any(e in sample for e in IMAGE_EXTENSIONS))
        if key is not None and complete and key not in done:
            read.keys.append(key)
            yield key, sample
        if error is not None:
            read.error = f"{type(error).__name__}: {error}"

    def shard_damage(self, name: str, wanted: Mapping[str, int], read: ShardRead, events: list[SkipRecord]) -> None:
        """Record the wanted keys of shard ``name`` that ``read`` did not deliver: lost to the shard's damage or
        absent from it; the first of them named, every lost occurrence counted."""
        seen = set(read.keys)
        lost = [k for k in wanted if k not in seen]
        if read.error is not None:
            detail = read.error + (f"; {len(lost)} keys not read" if lost else "")
            self._skip(events, SkipRecord("shard", name, lost[0] if lost else None, detail, self._count(wanted, lost)))
        elif lost:
            detail = f"{len(lost)} keys of the index are not in the shard"
            self._skip(events, SkipRecord("missing", name, lost[0], detail, self._count(wanted, lost)))

    @staticmethod
    def _count(wanted: dict[str, int], keys: list[str]) -> int:
        return sum(wanted[k] for k in keys)

    def decode(self, name: str, key: str, sample: dict, rng: np.random.Generator | None,
               events: list[SkipRecord]) -> tuple | None:
        """One sample's (image uint8 HWC after the transform, label, group), or None with its damage recorded."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None or "json" not in sample:
            have = sorted(k for k in sample if not k.startswith("__"))
            self._skip(events, SkipRecord("incomplete", name, key, f"members {have}"))
            return None
        try:
            meta = json.loads(sample["json"])
            label = meta["label"]
            if label not in (0, 1) or isinstance(label, bool | str):
                raise ValueError(f"label {label!r} is not 0 or 1")
            a = attr_code(meta["attrs"][self.attr], self.attr, self.attr_map, f"key {key}")
        except (ValueError, KeyError, TypeError) as err:
            self._skip(events, SkipRecord("metadata", name, key, f"{type(err).__name__}: {err}"))
            return None
        try:
            img = self.transform.image(sample[ext], rng)
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) on bad bytes
            # The member's name, so that a --strict failure points into the tar file.
            self._skip(events, SkipRecord("decode", name, key, f"member {key}.{ext}: {type(err).__name__}: {err}"))
            return None
        return img, float(label), a

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        yield from self.chunks(*((0, 1) if info is None else (info.id, info.num_workers)))

    def chunks(self, wid: int, nworkers: int) -> Iterator[tuple]:
        """The chunks of worker ``wid`` of ``nworkers`` (what that DataLoader worker yields)."""
        share = worker_share(self.plan, wid, nworkers)
        rng = np.random.default_rng([*self.seed, wid])
        events: list[SkipRecord] = []
        stream: Iterator[tuple] = (item for name, wanted in share for item in self._read_shard(name, wanted, events))
        if self.shuffle_buffer > 1:
            shuffle_seed = int(rng.integers(2**62))
            stream = wds.filters.shuffle(self.shuffle_buffer, self.shuffle_buffer, seed=shuffle_seed)(stream)
        imgs: list[np.ndarray] = []
        ys: list[float] = []
        As: list[int] = []
        keys: list[str] = []
        for name, key, sample in stream:
            out = self.decode(name, key, sample, rng, events)
            if out is None:
                continue
            imgs.append(out[0])
            ys.append(out[1])
            As.append(out[2])
            keys.append(key)
            if len(imgs) == self.batch_size:
                yield self._chunk(imgs, ys, As, keys, events)
                imgs, ys, As, keys = [], [], [], []
        if imgs or events:
            yield self._chunk(imgs, ys, As, keys, events)

    def _chunk(self, imgs, ys, As, keys, events: list[SkipRecord]) -> tuple:
        # `events` is shared with the shard readers still running: hand over a copy and empty it in place.
        handed = events[:]
        events.clear()
        if not imgs:
            return None, None, None, [], handed
        x = self.transform.batch(imgs, shared=torch.utils.data.get_worker_info() is not None)
        return x, torch.tensor(ys, dtype=torch.float32), torch.tensor(As, dtype=torch.int64), keys, handed

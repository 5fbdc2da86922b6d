"""What a loader delivered and what it skipped: :class:`LoaderStats` (``loader.stats``), one :class:`SkipRecord` per
kind of damage at one place, :class:`ShardReadError` (``strict=True``) and :class:`DataLossError` (a pass that lost
more than the allowed share of its samples, :meth:`LoaderStats.check_loss`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: The default largest share of a pass's sample reads that may be lost to damage (``--max-skip-fraction``).
MAX_SKIP_FRACTION = 0.01


class ShardReadError(RuntimeError):
    """A damaged shard or sample under ``strict=True``; the message names the shard and the key."""


class DataLossError(ShardReadError):
    """A pass that skipped more than the allowed share of its sample reads (:meth:`LoaderStats.check_loss`); the
    message names the split, the counts and the first damage."""


@dataclass
class SkipRecord:
    """One kind of damage at one place.

    Args:
        reason: ``decode`` (image bytes do not decode), ``metadata`` (JSON unreadable or without the label /
            attribute), ``incomplete`` (image or JSON member missing), ``shard`` (shard cannot be opened or ends
            early), ``missing`` (keys of the index not in their shard).
        shard: shard file name.
        key: the sample key (for ``shard`` / ``missing``: the first key not read), or None.
        detail: the underlying error.
        samples: planned sample occurrences lost.
    """

    reason: str
    shard: str
    key: str | None
    detail: str
    samples: int = 1


@dataclass
class LoaderStats:
    """What one epoch of a :class:`ShardLoader` delivered and what it skipped (``loader.stats``)."""

    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    planned: int = 0
    samples: int = 0
    batches: int = 0
    passes: int = 0
    records: list[SkipRecord] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Planned sample occurrences that were not delivered because of damage."""
        return sum(r.samples for r in self.records)

    def check_loss(self, limit: float, split: str, hint: str = "", *,
                   totals: tuple[int, int] | None = None) -> None:
        """Raise :class:`DataLossError` when more than ``limit`` (a fraction in [0, 1]) of the sample reads of
        ``split`` (its name in the message; ``hint`` ends it) were skipped: metrics computed on what is left would
        stand for a data set that was not there. ``totals``: (skipped, delivered) summed over the ranks that share
        the split, so that every rank reaches the same verdict (one rank stopping alone would leave the others
        waiting in a collective)."""
        if not 0 <= limit <= 1:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {limit}")
        skipped, samples = totals if totals is not None else (self.skipped, self.samples)
        attempted = skipped + samples
        if not attempted or skipped / attempted <= limit:
            return
        first = ""
        if self.records:
            r = self.records[0]
            first = f"; first: {r.shard} key {r.key}" if r.key else f"; first: {r.shard}"
            first += f": {r.reason}: {r.detail}"
        raise DataLossError(f"{split}: {skipped} of {attempted} sample reads skipped as damaged "
                            f"({skipped / attempted:.1%}, more than the allowed {limit:.1%}){first}{hint}")

    def by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for r in self.records:
            out[r.reason] += r.samples
        return dict(out)

    def add(self, record: SkipRecord) -> None:
        # The same damage met again (a duplicated key, a later pass) adds to one record.
        for r in self.records:
            if (r.reason, r.shard, r.key) == (record.reason, record.shard, record.key):
                r.samples += record.samples
                return
        self.records.append(record)

    def summary(self, limit: int = 5) -> str:
        head = (
            f"epoch {self.epoch} rank {self.rank}/{self.world_size}: {self.samples} samples in {self.batches} "
            f"batches ({self.passes} pass{'es' if self.passes != 1 else ''}, {self.planned} planned)"
        )
        if not self.records:
            return head + "; nothing skipped"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.by_reason().items()))
        where = "; ".join(
            f"{r.shard} key {r.key}: {r.reason}: {r.detail}" if r.key else f"{r.shard}: {r.reason}: {r.detail}"
            for r in self.records[:limit]
        )
        more = f"; ... {len(self.records) - limit} more" if len(self.records) > limit else ""
        return f"{head}; skipped {self.skipped} ({reasons}): {where}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "planned": self.planned,
            "samples": self.samples,
            "batches": self.batches,
            "passes": self.passes,
            "skipped": self.skipped,
            "by_reason": self.by_reason(),
            "records": [vars(r).copy() for r in self.records],
        }

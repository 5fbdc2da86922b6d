"""The memory budget of the decoded caches (:mod:`fastmask.data.cache`): its default and what a cached set takes.
Without torch, so that the command line's ``--help`` can state the default without importing it."""

from __future__ import annotations

__all__ = ["CACHE_MIB", "cache_bytes"]

#: The default memory budget of the decoded caches of one run, in MiB (``--cache-mib``; 0 turns caching off).
CACHE_MIB = 2048


def cache_bytes(samples: int, image_size: int) -> int:
    """The bytes of ``samples`` decoded images of ``image_size`` squared pixels, uint8 RGB."""
    return samples * image_size * image_size * 3

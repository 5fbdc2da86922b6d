"""Images per second: the streaming shard loader against a map-style loader reading one JPEG file per image.

Cases ``workers0`` and ``workers2`` (DataLoader worker processes). Providers, on the same JPEGs:

- ``fastmask``: ``fastmask.data.make_loader`` streaming the images from WebDataset shards written by
  ``write_shards`` (one sequential tar read per shard).
- ``peer``: ``torch.utils.data.DataLoader`` over ``ImageTableDataset`` (one file open + read per image),
  ``shuffle=True, drop_last=True``.

Both run the same training transform (decode, resize, random flips / transpose, ImageNet normalisation), batch 64,
one epoch per repetition; worker start-up is part of an epoch for both. The files are written once and read once
before timing, so both read from the page cache. Providers are interleaved epoch by epoch. Reported: images per
second and ms per batch of the fastest epoch (on a shared machine the least disturbed one, as timeit does), the
median epoch, the CPU time of all processes per batch (median), and the fastmask / peer speed ratio for the fastest
(``vs_peer``, images per second) and for the median epochs (``vs_peer_median``). The main process runs one torch
thread (``--threads``): both providers decode on the CPU.

    python bench/bench_loader.py [--quick] [--json PATH] [--images N] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import pandas as pd
import torch
from PIL import Image

from fastmask.data.image_table import ImageTableDataset
from fastmask.data.loader import make_loader
from fastmask.data.shards import write_shards

BATCH = 64
IMAGE_SIZE = 128


def make_images(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """n 128x128 JPEGs (smooth colour fields plus noise, quality 90, ~6-8 KB each) and their metadata table."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) / IMAGE_SIZE
    rows = []
    for i in range(n):
        c = rng.uniform(0, 255, size=(3, 3))
        img = c[:, 0] * xx[..., None] + c[:, 1] * yy[..., None] + c[:, 2] * (1 - xx[..., None])
        img = np.clip(img / 2 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        name = f"img_{i:05d}.jpg"
        Image.fromarray(img).save(root / name, quality=90)
        rows.append({"filepath": name, "target": int(rng.integers(2)), "group": int(rng.integers(2))})
    return pd.DataFrame(rows)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined at the end of an epoch)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def epoch(loader) -> tuple[float, float, int, int]:
    """Wall seconds, CPU seconds (all processes), images and batches of one pass over the loader."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    images = batches = 0
    for batch in loader:
        x = batch[0]
        images += x.shape[0]
        batches += 1
    return time.perf_counter() - t0, cpu_seconds() - c0, images, batches


def bench(args: argparse.Namespace) -> list[dict]:
    n = args.images = args.images or (640 if args.quick else 2000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        table = make_images(tmp / "images", n)
        index = write_shards(table, tmp / "images", tmp / "shards", attr_cols=["group"], maxcount=500)
        megabytes = sum(p.stat().st_size for p in (tmp / "images").iterdir()) / 1e6
        print(f"{n} JPEGs {IMAGE_SIZE}x{IMAGE_SIZE}, {megabytes:.1f} MB; {len(index.shards)} shards; batch {BATCH}")
        for workers in (0, 2):
            loaders = {
                "fastmask": make_loader(
                    tmp / "shards", batch_size=BATCH, train=True, image_size=IMAGE_SIZE, workers=workers, seed=0
                ),
                "peer": torch.utils.data.DataLoader(
                    ImageTableDataset(table, tmp / "images", image_size=IMAGE_SIZE, attr="group", train=True),
                    batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
                ),
            }
            # The warm-up epoch warms the page cache and the code paths; epochs interleaved, so drift hits both alike.
            epochs = harness.interleave({p: lambda ld=ld: epoch(ld) for p, ld in loaders.items()}, args.reps,
                                        measure=lambda fn: fn())
            for provider, runs in epochs.items():
                # The fastest epoch is the one least disturbed by other processes on a shared machine (as timeit).
                seconds = min(r[0] for r in runs)
                _, _, images, batches = runs[-1]
                rows.append({
                    "case": f"workers{workers}", "provider": provider, "ms": 1e3 * seconds / batches,
                    "ms_per_image": 1e3 * seconds / images, "images_per_s": images / seconds, "epoch_s": seconds,
                    "epoch_s_median": statistics.median(r[0] for r in runs),
                    "cpu_ms_per_batch": 1e3 * statistics.median(r[1] for r in runs) / batches, "images": images,
                    "batches": batches, "workers": workers,
                })
    harness.add_ratios(rows, "epoch_s_median", suffix="_median")
    return rows


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, help="number of JPEGs (default 2000, 640 with --quick)")


def notes(rows: list[dict], args: argparse.Namespace) -> dict:
    return {"images": args.images, "batch": BATCH, "image_size": IMAGE_SIZE}


COLUMNS: list[harness.Column] = [
    ("images/s", "images_per_s", ".0f"), ("epoch s", "epoch_s", ".3f"), ("median s", "epoch_s_median", ".3f"),
    ("cpu ms/batch", "cpu_ms_per_batch", ".1f"), ("vs peer (median)", "vs_peer_median", ".2fx"),
]

if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(10, 5), options=options, columns=COLUMNS, notes=notes, threads=1,
                          ratio_key="ms_per_image"))

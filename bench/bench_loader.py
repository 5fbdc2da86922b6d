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
and for the median epochs.

    python bench/bench_loader.py [--quick] [--json PATH] [--images N] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repetitions (CI)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON")
    ap.add_argument("--images", type=int, help="number of JPEGs (default 2000, 640 with --quick)")
    ap.add_argument("--reps", type=int, help="timed epochs per provider and case (default 10, 5 with --quick)")
    args = ap.parse_args(argv)
    n = args.images or (640 if args.quick else 2000)
    reps = args.reps or (5 if args.quick else 10)
    torch.set_num_threads(1)  # both providers decode on the CPU; keep the main process from oversubscribing

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        table = make_images(tmp / "images", n)
        index = write_shards(table, tmp / "images", tmp / "shards", attr_cols=["group"], maxcount=500)
        megabytes = sum(p.stat().st_size for p in (tmp / "images").iterdir()) / 1e6
        print(
            f"{n} JPEGs {IMAGE_SIZE}x{IMAGE_SIZE}, {megabytes:.1f} MB; {len(index.shards)} shards; batch {BATCH}; "
            f"{reps} timed epochs each; torch {torch.__version__}"
        )

        rows = []
        for workers in (0, 2):
            case = f"workers{workers}"
            loaders = {
                "fastmask": make_loader(
                    tmp / "shards", batch_size=BATCH, train=True, image_size=IMAGE_SIZE, workers=workers, seed=0
                ),
                "peer": torch.utils.data.DataLoader(
                    ImageTableDataset(table, tmp / "images", image_size=IMAGE_SIZE, attr="group", train=True),
                    batch_size=BATCH,
                    shuffle=True,
                    drop_last=True,
                    num_workers=workers,
                ),
            }
            for loader in loaders.values():
                epoch(loader)  # warm the page cache and the code paths
            times: dict[str, list[float]] = {p: [] for p in loaders}
            cpus: dict[str, list[float]] = {p: [] for p in loaders}
            counts: dict[str, tuple[int, int]] = {}
            for _ in range(reps):
                for provider, loader in loaders.items():  # interleaved, so drift hits both alike
                    seconds, cpu, images, batches = epoch(loader)
                    times[provider].append(seconds)
                    cpus[provider].append(cpu)
                    counts[provider] = (images, batches)
            for provider in loaders:
                # The fastest epoch is the one least disturbed by other processes on a shared machine (as timeit).
                seconds = min(times[provider])
                images, batches = counts[provider]
                rows.append(
                    {
                        "case": case,
                        "provider": provider,
                        "ms": 1e3 * seconds / batches,
                        "images_per_s": images / seconds,
                        "epoch_s": seconds,
                        "epoch_s_median": statistics.median(times[provider]),
                        "cpu_ms_per_batch": 1e3 * statistics.median(cpus[provider]) / batches,
                        "images": images,
                        "batches": batches,
                        "workers": workers,
                    }
                )

    peer = {r["case"]: r for r in rows if r["provider"] == "peer"}
    for r in rows:
        r["vs_peer"] = r["images_per_s"] / peer[r["case"]]["images_per_s"]
        r["vs_peer_median"] = peer[r["case"]]["epoch_s_median"] / r["epoch_s_median"]
    print(
        f"{'case':<10} {'provider':<9} {'images/s':>9} {'ms/batch':>9} {'epoch s':>8} {'median s':>9} "
        f"{'cpu ms/batch':>12} {'vs peer':>8} {'(median)':>8}"
    )
    for r in rows:
        print(
            f"{r['case']:<10} {r['provider']:<9} {r['images_per_s']:>9.0f} {r['ms']:>9.2f} {r['epoch_s']:>8.3f} "
            f"{r['epoch_s_median']:>9.3f} {r['cpu_ms_per_batch']:>12.1f} {r['vs_peer']:>7.2f}x "
            f"{r['vs_peer_median']:>7.2f}x"
        )
    if args.json:
        meta = {"images": n, "batch": BATCH, "image_size": IMAGE_SIZE, "reps": reps}
        args.json.write_text(json.dumps({"rows": rows, **meta}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

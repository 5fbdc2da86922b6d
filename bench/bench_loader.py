"""Images per second: fastmask's streaming shard loader against webdataset's own pipeline and a one-file-per-image
loader, on the same JPEGs.

Cases ``workers0`` and ``workers2`` (DataLoader worker processes). Providers:

- ``fastmask``: ``fastmask.data.loader.make_loader`` over the WebDataset shards written by ``write_shards`` (its own
  tar reader, :mod:`fastmask.data.tar`).
- ``peer``: webdataset's pipeline over the same shards, as its documentation builds one: ``WebDataset(urls,
  shardshuffle=...)`` + ``shuffle(1000)`` + ``decode`` (the same image transform as a handler) + ``to_tuple`` +
  ``map`` (label and attribute from the JSON) + ``batched(64)`` (stacked and normalised by the same transform) +
  ``WebLoader(batch_size=None, num_workers=...)``.
- ``reference``: the papers' loader, ``torch.utils.data.DataLoader`` over ``ImageTableDataset`` (one file open +
  read per image), ``shuffle=True, drop_last=True``.
- ``roofline``: the work no loader can avoid: the shards' bytes read from the page cache (parsed by
  :mod:`fastmask.data.tar`, ~30 us per sample), every image decoded, augmented and normalised, in ``workers`` forked
  processes (this process with 0); no pipeline, no shuffle, no batches handed over.

All run the same training transform (decode, resize, random flips / transpose, ImageNet normalisation of the whole
batch), batch 64, one epoch per repetition, and yield the same tensors ``(x, y, a, keys)``: before timing, one
evaluation epoch of each is checked to give every key once with equal pixels, labels and groups, and one training
epoch to give distinct keys whose images are flips / transposes of the evaluation ones. Worker start-up is part of
an epoch for all. The files are written once and read once before timing, so all read from the page cache.
Providers are interleaved epoch by epoch. Reported: images per second and ms per batch of the fastest epoch (on a
shared machine the least disturbed one, as timeit does), the median epoch, the CPU time of all processes per batch
(median), and the speed ratios (images per second) for the fastest (``vs_peer``) and the median
(``vs_peer_median``) epochs and in CPU time per image (``vs_peer_cpu``). The main process runs one torch thread
(``--threads``): all decode on the CPU.

Issue 15's bar: keep fastmask's hand-written tar reader only if the loader is at least 1.2x faster end to end than
webdataset's pipeline. Measured on 6 December 2026 on 2 cores shared with other jobs (load average 4-7; five runs of
the default 128 px cases): fastmask / peer 1.11-1.28x (0 workers) and 0.92-1.17x (2 workers) for the fastest epoch,
1.08-1.29x in CPU time per image; with ``--image-size 32`` (one run) 1.58x / 1.43x. In one process fastmask runs at
its roofline (0.89-1.19x): the gap is webdataset's own cost per sample, 40-125 us of CPU per image at 32 and 128
px, so its share shrinks as decoding grows. Without decoding (a one-off measurement, 2,000 samples): fastmask's
reader and grouping take 30 us of CPU per sample, webdataset's (Python's tarfile, ``group_by_keys``) 82 us, 110 us
with its ``decode`` and ``to_tuple`` stages. The bar is not met at 128 px (never with 2 workers): the reader is to
become webdataset's. Small images, where the reader counts most, are the sets that issue 15's decode-once cache
keeps in memory. The loader's own features (per-rank splits planned from the index, key counts, skip accounting,
passes that fill an epoch) stay fastmask's either way.

    python bench/bench_loader.py [--quick] [--json PATH] [--images N] [--image-size S] [--reps R] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext

from fastmask.data.batch import attr_code
from fastmask.data.image_table import ImageTableDataset
from fastmask.data.loader import make_loader
from fastmask.data.shards import IMAGE_EXTENSIONS, ShardIndex, write_shards
from fastmask.data.tar import iter_tar_members
from fastmask.data.transforms import ImageTransform

BATCH = 64
IMAGE_SIZE = 128  # default; --image-size
KEEP_BAR = 1.2  # issue 15: keep the hand-written reader only if it is this much faster than webdataset's
SHUFFLE_BUFFER = 1000  # fastmask's default; the peer's shuffle buffer and initial fill are set to it too


def make_images(root: Path, n: int, size: int, seed: int = 0) -> pd.DataFrame:
    """n size x size JPEGs (smooth colour fields plus noise, quality 90; ~6-8 KB each at 128 px) and their
    metadata table."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rows = []
    for i in range(n):
        c = rng.uniform(0, 255, size=(3, 3))
        img = c[:, 0] * xx[..., None] + c[:, 1] * yy[..., None] + c[:, 2] * (1 - xx[..., None])
        img = np.clip(img / 2 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        name = f"img_{i:05d}.jpg"
        Image.fromarray(img).save(root / name, quality=90)
        rows.append({"filepath": name, "target": int(rng.integers(2)), "group": int(rng.integers(2))})
    return pd.DataFrame(rows)


class _Augmented:
    """webdataset decode handler for the image members: the transform's decode, resize and (training) flips, with a
    generator per process (DataLoader workers are forked per epoch)."""

    def __init__(self, transform: ImageTransform, seed: int) -> None:
        self.transform, self.seed, self.rng = transform, seed, None

    def __call__(self, data: bytes) -> np.ndarray:
        if self.rng is None:
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, 0 if info is None else info.id + 1])
        return self.transform.image(data, self.rng)


def _label_attr(sample: tuple) -> tuple:
    key, img, meta = sample
    return key, img, float(meta["label"]), attr_code(meta["attrs"]["group"], "group", None, f"key {key}")


def _collate(transform: ImageTransform):
    def collate(samples: list[tuple]) -> tuple:
        keys, imgs, ys, groups = zip(*samples, strict=True)
        # In a worker the batch goes to shared memory, as fastmask's chunks and default_collate's batches do.
        x = transform.batch(imgs, shared=torch.utils.data.get_worker_info() is not None)
        return x, torch.tensor(ys, dtype=torch.float32), torch.tensor(groups, dtype=torch.int64), list(keys)
    return collate


def peer_loader(urls: list[str], *, train: bool, workers: int, size: int, seed: int = 0) -> wds.WebLoader:
    """webdataset's own pipeline yielding fastmask's batches ``(x, y, a, keys)`` (full batches when training)."""
    transform = ImageTransform(size, train=train)
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls) if train else False, seed=seed)
        .shuffle(SHUFFLE_BUFFER if train else 0, initial=SHUFFLE_BUFFER, seed=seed)
        .decode(wds.handle_extension(" ".join(IMAGE_EXTENSIONS), _Augmented(transform, seed)))
        .to_tuple("__key__", ";".join(IMAGE_EXTENSIONS), "json")
        .map(_label_attr)
        .batched(BATCH, collation_fn=_collate(transform), partial=not train)
    )
    return wds.WebLoader(dataset, batch_size=None, num_workers=workers)


def loaders(tmp: Path, table: pd.DataFrame, index: ShardIndex, *, train: bool, workers: int, size: int) -> dict:
    return {
        "fastmask": make_loader(tmp / "shards", batch_size=BATCH, train=train, image_size=size,
                                workers=workers, seed=0, return_keys=True),
        "peer": peer_loader(index.urls, train=train, workers=workers, size=size),
        "reference": torch.utils.data.DataLoader(
            ImageTableDataset(table, tmp / "images", image_size=size, attr="group", train=train,
                              return_keys=True),
            batch_size=BATCH, shuffle=train, drop_last=train, num_workers=workers,
        ),
    }


def check_same_batches(tmp: Path, table: pd.DataFrame, index: ShardIndex, size: int, quick: bool) -> None:
    """Every provider gives the same samples: in evaluation every key once with equal x, y, a (with 0 and 2 workers;
    0 only when ``quick``); in training distinct keys, each image a flip / transpose of its evaluation image, and the
    same y, a."""
    want = None
    for workers in (0,) if quick else (0, 2):
        for name, loader in loaders(tmp, table, index, train=False, workers=workers, size=size).items():
            got = {k: (x, float(y), int(a))
                   for xb, yb, ab, keys in loader for k, x, y, a in zip(keys, xb, yb, ab, strict=True)}
            want = want or got
            assert got.keys() == want.keys() == set(index.samples), f"{name}, {workers} workers: other keys"
            for k, (x, y, a) in got.items():
                assert torch.equal(x, want[k][0]) and (y, a) == want[k][1:], f"{name}, {workers} workers: key {k}"
    for name, loader in loaders(tmp, table, index, train=True, workers=0, size=size).items():
        keys = []
        for xb, yb, ab, ks in loader:
            for k, x, y, a in zip(ks, xb, yb, ab, strict=True):
                e = want[k][0]
                variants = [v for f in (e, e.flip(1)) for g in (f, f.flip(2)) for v in (g, g.transpose(1, 2))]
                assert any(torch.equal(x, v) for v in variants), f"{name}: key {k} is not a flip of its image"
                assert (float(y), int(a)) == want[k][1:], f"{name}: key {k}"
                keys.append(k)
        assert len(keys) == len(set(keys)) >= len(want) - 2 * BATCH, f"{name}: {len(keys)} keys in a training epoch"


def _roofline_worker(urls: list[str], size: int, seed: int) -> None:
    transform = ImageTransform(size, train=True)
    rng = np.random.default_rng(seed)
    images = []
    for url in urls:
        with open(url, "rb", buffering=1 << 20) as f:
            for member, data in iter_tar_members(f):
                if base_plus_ext(member)[1] in IMAGE_EXTENSIONS:
                    images.append(transform.image(data, rng))
                else:
                    json.loads(data)
                if len(images) == BATCH:
                    transform.batch(images)
                    images = []
    if images:
        transform.batch(images)


def roofline(urls: list[str], workers: int, size: int) -> None:
    """One pass of the unavoidable work over every shard, split among ``workers`` forked processes."""
    if workers == 0:
        _roofline_worker(urls, size, 0)
        return
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_roofline_worker, args=(urls[w::workers], size, w)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0, f"roofline worker exited with {p.exitcode}"


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
    n = args.images = args.images or (384 if args.quick else 2000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        size = args.image_size
        table = make_images(tmp / "images", n, size)
        maxcount = -(-n // 4)  # four shards: two per worker
        index = write_shards(table, tmp / "images", tmp / "shards", attr_cols=["group"], maxcount=maxcount)
        megabytes = sum(p.stat().st_size for p in (tmp / "images").iterdir()) / 1e6
        print(f"{n} JPEGs {size}x{size}, {megabytes:.1f} MB; {len(index.shards)} shards; batch {BATCH}")
        check_same_batches(tmp, table, index, size, args.quick)
        print("checked: equal keys, pixels, labels and groups in evaluation; flips / transposes of them in training")
        for workers in (0, 2):
            providers = {p: lambda ld=ld: epoch(ld)
                         for p, ld in loaders(tmp, table, index, train=True, workers=workers, size=size).items()}

            def bound(workers: int = workers) -> tuple[float, float, int, int]:
                c0, t0 = cpu_seconds(), time.perf_counter()
                roofline(index.urls, workers, size)
                return time.perf_counter() - t0, cpu_seconds() - c0, n, -(-n // BATCH)

            providers["roofline"] = bound
            # The warm-up epoch warms the page cache and the code paths; epochs interleaved, so drift hits all alike.
            epochs = harness.interleave(providers, args.reps, measure=lambda fn: fn())
            for provider, runs in epochs.items():
                # The fastest epoch is the one least disturbed by other processes on a shared machine (as timeit).
                seconds = min(r[0] for r in runs)
                _, _, images, batches = runs[-1]
                rows.append({
                    "case": f"workers{workers}", "provider": provider, "ms": 1e3 * seconds / batches,
                    "ms_per_image": 1e3 * seconds / images, "images_per_s": images / seconds, "epoch_s": seconds,
                    "epoch_s_median": statistics.median(r[0] for r in runs),
                    "ms_per_image_median": 1e3 * statistics.median(r[0] for r in runs) / images,
                    "cpu_ms_per_batch": 1e3 * statistics.median(r[1] for r in runs) / batches,
                    "cpu_ms_per_image": 1e3 * statistics.median(r[1] for r in runs) / images, "images": images,
                    "batches": batches, "workers": workers,
                })
    harness.add_ratios(rows, "ms_per_image_median", suffix="_median")
    harness.add_ratios(rows, "cpu_ms_per_image", suffix="_cpu")
    return rows


def options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--images", type=int, help="number of JPEGs (default 2000, 384 with --quick)")
    ap.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=f"JPEG and output size (default {IMAGE_SIZE})")


def notes(rows: list[dict], args: argparse.Namespace) -> dict:
    """fastmask over webdataset's pipeline per case (fastest and median epochs) against issue 15's 1.2x bar, and the
    load average of the machine."""
    load = os.getloadavg()
    ratios = {r["case"]: {k: r[k] for k in ("vs_peer", "vs_peer_median", "vs_peer_cpu")}
              for r in rows if r["provider"] == "fastmask"}
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) on "
          f"{os.cpu_count()} cores; fastmask / webdataset's pipeline (images/s), bar {KEEP_BAR}x:")
    for case, r in ratios.items():
        print(f"  {case}: {r['vs_peer']:.2f}x fastest epoch, {r['vs_peer_median']:.2f}x median epoch, "
              f"{r['vs_peer_cpu']:.2f}x CPU time (median)")
    return {"images": args.images, "batch": BATCH, "image_size": args.image_size, "load_average": load,
            "fastmask_vs_webdataset": ratios, "keep_bar": KEEP_BAR}


COLUMNS: list[harness.Column] = [
    ("images/s", "images_per_s", ".0f"), ("epoch s", "epoch_s", ".3f"), ("median s", "epoch_s_median", ".3f"),
    ("cpu ms/batch", "cpu_ms_per_batch", ".1f"), ("vs peer (median)", "vs_peer_median", ".2fx"),
    ("vs ref (median)", "vs_reference_median", ".2fx"), ("vs peer (cpu)", "vs_peer_cpu", ".2fx"),
]

if __name__ == "__main__":
    sys.exit(harness.main(__doc__, bench, reps=(10, 3), options=options, columns=COLUMNS, notes=notes, threads=1,
                          ratio_key="ms_per_image"))

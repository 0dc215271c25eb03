"""Input throughput at real image sizes: the decode-once cache read a batch at a time, against
what a user would otherwise write (torchvision's ImageFolder + DataLoader, one worker per core).

    python scripts/bench_data.py [--n 20000] [--size 224] [--folder DIR] [--device cuda]

Writes ``--n`` JPEGs of 300–500 px (random sides) in an ImageFolder tree (kept in ``--folder``
and reused when given), then prints, side by side:

* the cache's build: images decoded and resized to ``--size`` per second, all cores;
* one training epoch's input, batches of 128 delivered on the device: random-resized-crop
  (scale 0.08–1, ratio 3/4–4/3) + flip + normalise to ``--size``, by ``ltsearch`` from the cache
  (roi_align on a GPU; on the CPU antialiased resizes per image, each normalised as it is cut)
  and by the DataLoader from the JPEGs (PIL per image);
* this process's anonymous memory (RssAnon) after each, and the DataLoader workers' sum.

The cache stores every image at ``--size`` square (a resize, not a crop), so its crops are taken
from the squashed image; the DataLoader crops the original. No model runs: input alone.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

import ltsearch  # noqa: F401  (first: it sets PyTorch's allocator to huge pages before torch loads)
import torch

CLASSES = 100


def anon_mb(pid: int | str = "self") -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _write(args) -> None:
    path, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(300, 501, 2))
    yy, xx = np.mgrid[0:h, 0:w]
    colour = rng.integers(0, 256, 3)
    image = (colour + 60 * np.sin(xx[..., None] / rng.uniform(5, 40) + yy[..., None] / rng.uniform(5, 40))
             + rng.normal(0, 12, (h, w, 3)))  # smooth structure and noise: a photo's JPEG size
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_images(folder: Path, n: int) -> None:
    todo = []
    for i in range(n):
        path = folder / "train" / f"c{i % CLASSES:03d}" / f"{i:06d}.jpg"
        if not path.is_file():
            todo.append((path, i))
    for c in range(CLASSES):
        (folder / "train" / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    if todo:
        start = time.perf_counter()
        with Pool(os.cpu_count()) as pool:
            pool.map(_write, todo, chunksize=64)
        print(f"wrote {len(todo)} JPEGs (300-500 px) in {time.perf_counter() - start:.0f} s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--folder", help="where the JPEGs are (written there if missing); default: a temporary folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from torchvision import datasets, transforms

    from ltsearch.data.cache import open_cached
    from ltsearch.data.device import channel_stats
    from ltsearch.data.sources import list_image_folder
    from ltsearch.data.stream import images_on

    temporary = args.folder is None
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-data-"))
    device = torch.device(args.device)
    cores = os.cpu_count() or 1
    try:
        make_images(folder, args.n)
        _, files = list_image_folder(folder / "train", size=args.size)
        cache = folder / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        mapped = open_cached(files, cache, progress=False)
        build = time.perf_counter() - start
        gib = mapped.nbytes / 2**30

        mean, std = channel_stats(mapped)
        images = images_on(mapped, device, mean, std, hflip=True, size=(args.size, args.size),
                           rrc=((0.08, 1.0), (3 / 4, 4 / 3)))
        gen = torch.Generator(device).manual_seed(0)
        order = torch.randperm(len(images), device=device, generator=gen)

        def cached_epoch():
            for idx, raw in images.steps(order, args.batch):
                x, y = images.batch(idx, gen, raw=raw)
            if device.type == "cuda":
                torch.cuda.synchronize()

        start = time.perf_counter()
        cached_epoch()
        cached = time.perf_counter() - start
        cached_anon = anon_mb()

        tf = transforms.Compose([transforms.RandomResizedCrop(args.size), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())])
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(folder / "train", tf), batch_size=args.batch,
                                             shuffle=True, num_workers=cores, pin_memory=device.type == "cuda",
                                             persistent_workers=False)
        worker_anon = 0.0
        start = time.perf_counter()
        it = iter(loader)
        for k, (x, y) in enumerate(it):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if k == 10:  # the workers' memory once they run
                worker_anon = sum(anon_mb(w.pid) for w in it._workers)
        if device.type == "cuda":
            torch.cuda.synchronize()
        baseline = time.perf_counter() - start

        n = len(images)
        print(f"{n} JPEGs of 300-500 px -> {args.size} px on {device} ({cores} cores); cache {gib:.1f} GiB")
        print(f"cache build (decode + resize, once per node)  {n / build:>9,.0f} images/s  ({build:.0f} s)")
        print(f"{'epoch input, images/s':<46}{'ltsearch cache':>16}{'ImageFolder+DataLoader':>26}")
        print(f"{'random-resized-crop + flip + normalise':<46}{n / cached:>16,.0f}{n / baseline:>26,.0f}")
        print(f"{'RssAnon (MB): this process / loader workers':<46}{cached_anon:>16,.0f}"
              f"{anon_mb():>16,.0f} / {worker_anon:,.0f}")
        print(f"ratio: the cached path is {baseline / cached:.1f}x the DataLoader's throughput")
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

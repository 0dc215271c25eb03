"""Batched on-device augmentation vs per-image PIL transforms (what a DataLoader would do).

    python scripts/bench_data.py [--n 4096] [--device cuda]

Prints images/s of each and the ratio; the trainer uses the batched path.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from PIL import Image
    from torchvision import transforms

    from ltsearch.data.device import DeviceImages
    from ltsearch.data.sources import ImageSet

    rng = np.random.default_rng(0)
    images = ImageSet(rng.integers(0, 255, (args.n, 3, 32, 32), dtype=np.uint8),
                      rng.integers(0, 10, args.n))
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    device = torch.device(args.device)
    dev = DeviceImages(images, device, mean, std, crop_pad=4, hflip=True)
    gen = torch.Generator(device).manual_seed(0)

    def batched():
        for i in range(0, args.n, args.batch):
            dev.batch(torch.arange(i, min(i + args.batch, args.n), device=device), gen)
        if device.type == "cuda":
            torch.cuda.synchronize()

    pil = [Image.fromarray(x.transpose(1, 2, 0)) for x in images.x]
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean.tolist(), std.tolist())])

    def per_image():
        for i in range(0, args.n, args.batch):
            torch.stack([tf(im) for im in pil[i:i + args.batch]]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for name, fn in (("batched on device", batched), ("per-image PIL", per_image)):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        rows.append((name, args.n / (time.perf_counter() - start)))
    for name, rate in rows:
        print(f"{name:<18} {rate:>12,.0f} images/s")
    print(f"ratio: batched is {rows[0][1] / rows[1][1]:.1f}x the per-image path on {device}")


if __name__ == "__main__":
    main()

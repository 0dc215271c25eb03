"""Fine-tuning parts side by side on a pretrained-style ViT: trainable parameters, images/s of a
training epoch and peak memory per part, and a linear probe's epoch on cached features against a
`full` epoch (the frozen-feature cache, ltsearch/features.py).

    python scripts/bench_finetune.py [--arch vit_tiny_patch16_224] [--img 64] [--device cpu]
    python scripts/bench_finetune.py --arch vit_base_patch16_224 --img 224 --device cuda   # a GPU

Random weights, saved to a temporary folder and loaded through `model.weights` (the real path:
nothing is downloaded). Data: digits-LT (imbalance 10), resized on the device to --img. Each part
runs in its own process, so that its peak memory (max RSS on the CPU, max allocated on CUDA) is
its own.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTS = ["full", "linear", {"name": "partial", "blocks": 2}, "bitfit", {"name": "lora", "rank": 8},
         "adaptformer", {"name": "vpt", "length": 10}, {"name": "vpt", "length": 10, "deep": True}]


def _config(args, weights: str, finetune, epochs: int) -> dict:
    options = {"img_size": args.img}
    return {"seed": 0,
            "data": {"source": "digits", "imbalance_factor": 10, "val_per_class": 10,
                     "augment": {"crop_pad": 0, "hflip": False}},
            "model": {"arch": args.arch, "weights": weights, "options": options},
            "train": {"preset": "none", "epochs": epochs, "batch_size": args.batch, "lr": 0.01,
                      "warmup_epochs": 0, "schedule": "cosine", "device": args.device,
                      "threads": args.threads, "compile": False},
            "method": {"name": "logit_adjust", "finetune": finetune}}


def _label(part: dict) -> str:
    """e.g. lora r=8, vpt-deep n=10"""
    name = part["name"] + ("-deep" if part.get("deep") else "")
    knobs = {"rank": "r", "length": "n", "blocks": "last"}
    return " ".join([name] + [f"{knobs[k]}={v}" for k, v in part.items() if k in knobs])


def child(spec: dict) -> None:
    """One part: build, one warm-up epoch, then the measured epoch."""
    import resource

    import torch

    from ltsearch.data import build_data
    from ltsearch.runconfig import config_from_dict
    from ltsearch.trainer import Trainer

    cfg = config_from_dict(spec["config"])
    trainer = Trainer(cfg, build_data(cfg.data))
    chosen = trainer.method.finetune.trainable(trainer.model)
    params = sum(p.numel() for p in (chosen if chosen is not None else trainer.model.parameters()))
    trainer.train_epoch()  # warm-up (and, for a linear probe, the one pass of the body)
    if trainer.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    m = trainer.train_epoch()
    if trainer.cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"params": params, "images_per_s": m["images_per_s"],
                      "epoch_s": m["epoch_time_s"], "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="vit_tiny_patch16_224")
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    import timm
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp())
    weights = folder / "weights.safetensors"
    save_file(timm.create_model(args.arch, num_classes=0, img_size=args.img).state_dict(), str(weights))
    rows = {}
    for part in PARTS:
        label = part if isinstance(part, str) else _label(part)
        spec = {"config": _config(args, str(weights), part, epochs=2)}
        begun = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                             capture_output=True, text=True, check=True)
        rows[label] = json.loads(out.stdout.strip().splitlines()[-1])
        rows[label]["wall_s"] = time.perf_counter() - begun
    full = rows["full"]
    print(f"{args.arch} at {args.img} px, batch {args.batch}, {args.device}, digits-LT "
          f"({full['images_per_s'] * full['epoch_s']:.0f} training images an epoch)")
    print(f"{'part':<16}{'trainable':>12}{'% of full':>11}{'images/s':>11}{'× full':>8}{'peak MB':>9}")
    for label, r in rows.items():
        print(f"{label:<16}{r['params']:>12,}{100 * r['params'] / full['params']:>10.2f}%"
              f"{r['images_per_s']:>11.0f}{r['images_per_s'] / full['images_per_s']:>8.2f}"
              f"{r['peak_mb']:>9.0f}")
    lin = rows["linear"]
    print(f"linear probe epoch on cached features: {lin['epoch_s'] * 1000:.1f} ms against a full "
          f"epoch's {full['epoch_s'] * 1000:.0f} ms: {full['epoch_s'] / lin['epoch_s']:.0f}× faster")


if __name__ == "__main__":
    main()

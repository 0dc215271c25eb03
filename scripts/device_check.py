"""GPU check, run on the device machine (no Ray/Optuna/MLflow there): one prepared script.

1. ``ltsearch train`` CIFAR-10-LT IF=100, ResNet-32, CE, 3 epochs, compiled (issue: epoch times),
   and the same eagerly (``train.compile: false``) for the compile speed-up ratio.
2. CIFAR-10-LT IF=100 with the presets CE, LDAM-DRW, balanced softmax, mixup-DRW and BBN at once
   (the GPU is far from full with ResNet-32 at batch 128), as many epochs as the budget allows.
3. The models step 2 kept (``OUT/<preset>/model``) loaded back on the GPU: their test top-1
   against the one each run reported (the saved model's round trip under CUDA and bf16).
Everything lands in ``--out``; a summary is printed at the end.

    python scripts/device_check.py --archive .devdata/cifar10-jpeg.tar.gz --out $OUT --budget 420
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml


def config(root: str, method: dict, **train) -> dict:
    return {"seed": 0,
            "data": {"source": "cifar10", "root": root, "imbalance_factor": 100, "val_per_class": 0},
            "model": {"arch": "resnet32"},
            "train": dict(train),  # each preset brings its training recipe (BBN: its own)
            "method": method}


def launch(name: str, cfg: dict, out: Path, epochs: int | None = None,
           minutes: float | None = None) -> tuple[subprocess.Popen, Path]:
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "ltsearch.cli", "train", str(path), "--out", str(out / name)]
    if epochs:
        cmd += ["--epochs", str(epochs)]
    if minutes:
        cmd += ["--time-limit", f"{minutes:.2f}"]
    log = open(out / f"{name}.log", "w")
    print("$", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out / name / "metrics.json"


def read(metrics: Path) -> dict:
    return json.loads(metrics.read_text()) if metrics.is_file() else {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=420, help="seconds for step 2")
    ap.add_argument("--max-per-class", type=int, help="smoke test on the CPU: a tiny subset")
    ap.add_argument("--epochs", type=int, help="force the epochs of step 2")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from ltsearch.data.archive import unpacked

    data = unpacked(args.archive, "/tmp/ltsearch-data", "cifar10-jpeg")
    print(f"unpacked in {time.time() - t0:.1f} s", flush=True)
    try:
        import torch
        print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "torch", torch.__version__, flush=True)
    except Exception as e:  # pragma: no cover
        print("torch probe failed:", e)

    def cfg(method, **train):
        c = config(str(data), method, **train)
        if args.max_per_class:
            c["data"]["max_per_class"] = args.max_per_class
        return c

    summary = {}
    # 1. three epochs, compiled then eager
    for name, compile_ in (("ce3_compiled", True), ("ce3_eager", False)):
        p, m = launch(name, cfg({"name": "ce"}, compile=compile_), out, epochs=3)
        p.wait()
        r = read(m)
        times = [h["epoch_time_s"] for h in r.get("history", [])]
        summary[name] = {"status": r.get("status"), "epoch_times_s": times,
                         "images_per_s": [h["images_per_s"] for h in r.get("history", [])]}
        print(name, summary[name], flush=True)
    c, e = summary["ce3_compiled"]["epoch_times_s"], summary["ce3_eager"]["epoch_times_s"]
    if len(c) == 3 and len(e) == 3:
        summary["compile_speedup_steady"] = e[-1] / c[-1]
        print(f"steady-state epoch: eager {e[-1]:.2f} s, compiled {c[-1]:.2f} s, "
              f"ratio {e[-1] / c[-1]:.2f}x", flush=True)

    # 2. five presets concurrently, epochs from the measured epoch time
    epoch_s = c[-1] if c else 5.0
    presets = ["ce", "ldam_drw", "balanced_softmax", "mixup_drw", "bbn"]
    if args.epochs:
        epochs = args.epochs
    else:
        # five jobs share the GPU; BBN runs two forward passes per step.
        epochs = int(min(200, max(5, args.budget / (epoch_s * 6.5 * 1.3))))
    minutes = args.budget / 60 * 1.1  # a guard: stop, evaluate and write what was reached
    print(f"step 2: {', '.join(presets)}: {epochs} epochs each", flush=True)
    jobs = {name: launch(name, cfg({"name": name}), out, epochs=epochs, minutes=minutes)
            for name in presets}
    for p, _ in jobs.values():
        p.wait()
    for name, (_, m) in jobs.items():
        r = read(m)
        hist = r.get("history", [])
        met = r.get("metrics", {})
        summary[name] = {
            "status": r.get("status"), "epochs": r.get("epochs"),
            "s_per_epoch": sum(h["epoch_time_s"] for h in hist) / max(1, len(hist)),
            **{k: met.get(k) for k in ("test/top1", "test/many", "test/medium", "test/few")},
        }
        print(name, summary[name], flush=True)
    # 3. the kept models, loaded back on the device: the test top-1 each run reported
    from ltsearch.data import build_data
    from ltsearch.inference import TrainedModel

    for name in presets:
        folder = out / name / "model"
        if not folder.is_dir():
            continue
        model = TrainedModel(folder)
        test = build_data(model.cfg.data).test
        top1 = float((model.logits(test.x).argmax(1).cpu().numpy() == test.y).mean())
        summary[name]["reloaded_test/top1"] = top1
        print(f"{name}: reloaded on {model.device}: test top1 {top1:.4f} "
              f"(reported {summary[name]['test/top1']})", flush=True)
    summary["wall_s"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""What a compiled trial pays for its compile, trial after trial (issue 10), on the GPU machine.

Runs the trainer alone (no Ray there) on CIFAR-10-LT IF=100, ResNet-32, CE:

1. ``inprocess``: N fresh trials one after another in this process, as a reused search worker
   runs them (each builds its own model and optimiser), with a fresh inductor cache;
2. ``processes``: N fresh processes, one trial each, sharing one inductor cache folder, as new
   workers and resumed searches of one search do (``searches/<name>/compile_cache``);
3. ``eager``: one trial with ``train.compile: false``.

Per trial: its first epoch, its steady s/epoch (the median of the rest) and the compile
estimate, first − steady. Prints a table; writes ``compile.json`` in ``--out``.

    python scripts/compile_check.py --archive .devdata/cifar10-jpeg.tar.gz --out $OUT/compile
    python scripts/compile_check.py --archive ... --out /tmp/cc --max-per-class 200 --epochs 3 \
        --trials 2 --compile-on-cpu  # no GPU: the same caching, with inductor's C++ backend
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def trial_config(root: Path, compile_: bool, epochs: int, max_per_class):
    from ltsearch.runconfig import config_from_dict

    data = {"source": "cifar10", "root": str(root), "imbalance_factor": 100, "val_per_class": 0}
    if max_per_class:
        data["max_per_class"] = max_per_class
    return config_from_dict({"seed": 0, "data": data, "model": {"arch": "resnet32"},
                             "train": {"epochs": epochs, "compile": compile_}, "method": {"name": "ce"}})


def one_trial(cfg, data, on_cpu: bool = False) -> dict:
    """A fresh trainer (model, optimiser, randomness) trained for cfg's epochs."""
    from ltsearch.trainer import Trainer

    began = time.perf_counter()
    trainer = Trainer(cfg, data)
    trainer.compiling = trainer.compiling or (on_cpu and cfg.train.compile)
    build = time.perf_counter() - began
    times: list[float] = []
    trainer.fit(lambda metrics, tr: times.append(metrics["epoch_time_s"]))
    steady = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    return {"build_s": build, "epoch_times_s": times, "first_epoch_s": times[0],
            "steady_s_per_epoch": steady, "compile_estimate_s": times[0] - steady,
            "device": str(trainer.device)}


def child(args) -> None:
    from ltsearch.data import build_data

    cfg = trial_config(Path(args.root), True, args.epochs, args.max_per_class)
    result = one_trial(cfg, build_data(cfg.data), args.compile_on_cpu)
    Path(args.child).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive")
    ap.add_argument("--out")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-per-class", type=int, help="a smaller subset (a CPU smoke test)")
    ap.add_argument("--compile-on-cpu", action="store_true",
                    help="compile on the CPU too (the trainer compiles on CUDA only): the caching "
                         "checked where no GPU is lent; inductor's C++ compile takes ~40 s")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one trial, result to this file
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    from ltsearch.data import build_data

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ltsearch.data.archive import unpacked

    root = unpacked(args.archive, "/tmp/ltsearch-data", "cifar10-jpeg")
    print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
          "" if args.compile_on_cpu else "(compile applies on CUDA only)", "torch", torch.__version__,
          flush=True)
    rows = []

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out / "cache_inprocess")
    cfg = trial_config(root, True, args.epochs, args.max_per_class)
    data = build_data(cfg.data)
    for i in range(args.trials):
        rows.append({"mode": "inprocess", "trial": i + 1, **one_trial(cfg, data, args.compile_on_cpu)})
        print(rows[-1], flush=True)

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(out / "cache_shared"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for i in range(args.trials):
        result = out / f"process{i + 1}.json"
        began = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--child", str(result), "--root", str(root),
                        "--epochs", str(args.epochs)]
                       + (["--max-per-class", str(args.max_per_class)] if args.max_per_class else [])
                       + (["--compile-on-cpu"] if args.compile_on_cpu else []),
                       env=env, check=True)
        rows.append({"mode": "processes", "trial": i + 1, "process_s": time.perf_counter() - began,
                     **json.loads(result.read_text())})
        print(rows[-1], flush=True)

    eager = trial_config(root, False, args.epochs, args.max_per_class)
    rows.append({"mode": "eager", "trial": 1, **one_trial(eager, data)})
    (out / "compile.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{'mode':<10} {'trial':>5} {'build s':>8} {'1st epoch s':>11} {'steady s/epoch':>14} "
          f"{'≈compile s':>10}")
    for r in rows:
        print(f"{r['mode']:<10} {r['trial']:>5} {r['build_s']:>8.2f} {r['first_epoch_s']:>11.2f} "
              f"{r['steady_s_per_epoch']:>14.3f} {r['compile_estimate_s']:>10.2f}")


if __name__ == "__main__":
    main()

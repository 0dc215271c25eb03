"""``ltsearch train | search | export``: one entry point; bad input exits 2 with one message."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

from ltsearch.config import ConfigError, dump_config, load_config
from ltsearch.data import DataError


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def print_progress(metrics: dict, trainer) -> None:
    parts = [f"epoch {metrics['epoch']:>3}/{trainer.total_epochs}", f"{metrics['phase']:<7}",
             f"loss {metrics['train/loss']:.4f}", f"lr {metrics['lr']:.4g}"]
    if "val/top1" in metrics:
        parts += [f"val top1 {metrics['val/top1']:.4f}", f"val bal {metrics['val/balanced_acc']:.4f}"]
    if "test/top1" in metrics:
        parts += [f"test top1 {metrics['test/top1']:.4f}", f"many {metrics['test/many']:.3f}",
                  f"med {metrics['test/medium']:.3f}", f"few {metrics['test/few']:.3f}"]
    parts += [f"{metrics['images_per_s']:.0f} img/s", f"{metrics['epoch_time_s']:.2f} s"]
    print("  ".join(parts), flush=True)


def scale_epochs(train, epochs: int):
    """The same recipe over ``epochs``: milestones scale with it, warm-up is kept (capped)."""
    ratio = epochs / train.epochs
    return dataclasses.replace(
        train, epochs=epochs, warmup_epochs=min(train.warmup_epochs, epochs),
        milestones=sorted({max(1, round(m * ratio)) for m in train.milestones}))


def cmd_train(args) -> int:
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    cfg = load_config(args.config)
    if args.device:
        cfg.train.device = args.device
    if args.epochs:
        cfg.train = scale_epochs(cfg.train, args.epochs)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    data = build_data(cfg.data)
    trainer = Trainer(cfg, data)
    print(f"data: {data.summary()}\nmethod: {cfg.method.name}  model: {cfg.model.arch}  "
          f"device: {trainer.device}  epochs: {trainer.total_epochs}", flush=True)
    if args.resume and (out / "checkpoint.pt").is_file():
        trainer.load(out / "checkpoint.pt")
        print(f"resumed from {out / 'checkpoint.pt'} at epoch {trainer.epoch}")

    def on_epoch(metrics, tr):
        print_progress(metrics, tr)
        if args.checkpoint_every and tr.epoch % args.checkpoint_every == 0:
            tr.save(out / "checkpoint.pt")

    result = trainer.fit(on_epoch, time_limit_s=args.time_limit * 60 if args.time_limit else None)
    summary = {"status": result.status, "epochs": result.epochs, "error": result.error,
               "device": str(trainer.device), "metrics": result.metrics, "history": result.history}
    (out / "metrics.json").write_text(json.dumps(_jsonable(summary), indent=1))
    print(f"wrote {out / 'metrics.json'}")
    if result.status == "diverged":
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    if result.status == "stopped":
        print(f"stopped by the time limit after {result.epochs} of {trainer.total_epochs} epochs")
    return 0


def cmd_search(args) -> int:
    from ltsearch.search.run import main_search

    return main_search(args)


def cmd_export(args) -> int:
    from ltsearch.search.export import main_export

    return main_export(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltsearch", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config")
    t.add_argument("config")
    t.add_argument("--out", help="output folder (default runs/<config name>)")
    t.add_argument("--device", help="override train.device (cpu, cuda, cuda:1)")
    t.add_argument("--epochs", type=int, help="override train.epochs (drops later milestones)")
    t.add_argument("--checkpoint-every", type=int, default=0, help="save checkpoint.pt every N epochs")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--time-limit", type=float, help="minutes; stop after the epoch that passes it "
                   "and evaluate on test (status 'stopped')")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("search", help="run a search described by a search-space file")
    s.add_argument("space")
    s.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    s.add_argument("--name", help="search name (folder under --storage)")
    s.add_argument("--storage", default="searches", help="folder of search results (default searches/)")
    s.add_argument("--num-samples", type=int)
    s.add_argument("--max-concurrent", type=int)
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search")
    s.set_defaults(fn=cmd_search)

    e = sub.add_parser("export", help="export the top configs of a search")
    e.add_argument("search_dir")
    e.add_argument("--top", type=int, default=1)
    e.add_argument("--out", required=True)
    e.set_defaults(fn=cmd_export)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``ltsearch train | predict | search | confirm | export | report``: one entry point; bad input exits 2 with one message."""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from pathlib import Path

from ltsearch.config import ConfigError, writable_folder
from ltsearch.data import DataError

ADDRESS_HELP = ("the Ray cluster to join: HOST:PORT, ray://HOST:PORT, auto (the cluster `ray start` "
                "recorded on this machine) or local (default: RAY_ADDRESS if set, else a fresh "
                "local Ray)")
SEARCH_DIR_HELP = "a search's folder (searches/<name>)"
VERBOSE_HELP = "-v: Ray Tune's result tables too; -v -v: Ray's own log records too"


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


def cmd_train(args) -> int:
    from ltsearch.data import build_data
    from ltsearch.models import check_model, identity
    from ltsearch.runconfig import dump_config, load_config, with_epochs
    from ltsearch.metrics import describe_groups
    from ltsearch.trainer import Trainer, resolve_device

    cfg = load_config(args.config)
    if args.device:
        cfg.train.device = args.device
    if args.epochs is not None:
        if args.epochs < 1:
            raise ConfigError("--epochs", f"must be >= 1, got {args.epochs}")
        cfg = with_epochs(cfg, args.epochs)
    if args.checkpoint_every is None:  # a run that is to be resumed keeps resumable
        args.checkpoint_every = 1 if args.resume else 0
    if args.checkpoint_every < 0:
        raise ConfigError("--checkpoint-every", f"must be >= 0, got {args.checkpoint_every}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise ConfigError("--time-limit", f"must be > 0 minutes, got {args.time_limit}")
    resolve_device(cfg.train.device)
    tracking = None
    if args.register is not None or args.tracking_uri:
        from ltsearch.search.tracking import registry_store

        tracking = registry_store(args.register, args.tracking_uri)
    check_model(cfg.model)  # the weights file is the architecture's, before the data loads
    backbone = identity(cfg.model)
    out = writable_folder(Path(args.out) if args.out else Path("runs") / Path(args.config).stem, "--out")
    checkpoint = out / "checkpoint.pt"
    data = build_data(cfg.data)
    trainer = Trainer(cfg, data)
    resumed = args.resume and checkpoint.is_file()
    if resumed:
        try:
            trainer.load(checkpoint)
        except Exception as e:  # a truncated or foreign file: say which, write nothing
            raise ConfigError("--resume", f"{checkpoint} is not a checkpoint of this config "
                                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    m = cfg.train.metrics
    print(f"data: {data.summary()}\nmethod: {cfg.method.label()}  model: {cfg.model.arch}  "
          f"device: {trainer.device}  epochs: {trainer.total_epochs}\n"
          f"{describe_groups(data.counts, m.many_threshold, m.few_threshold, m.groups)}", flush=True)
    if resumed:
        print(f"resumed from {checkpoint} at epoch {trainer.epoch}")
    elif args.resume:
        print(f"--resume: no checkpoint in {out} yet: training from epoch 1")

    def on_epoch(metrics, tr):
        print_progress(metrics, tr)
        if args.checkpoint_every and tr.epoch % args.checkpoint_every == 0:
            tr.save(checkpoint)

    result = trainer.fit(on_epoch, time_limit_s=args.time_limit * 60 if args.time_limit else None)
    summary = {"status": result.status, "epochs": result.epochs, "error": result.error,
               "device": str(trainer.device), "backbone": backbone, "metrics": result.metrics,
               "history": result.history}
    (out / "metrics.json").write_text(json.dumps(_jsonable(summary), indent=1))
    print(f"wrote {out / 'metrics.json'}")
    if result.status != "diverged":
        from ltsearch.inference import save_model

        save_model(trainer, out / "model", result.metrics, result.status)
        print(f"wrote {out / 'model'} (ltsearch predict {out / 'model'} IMAGES…)")
        if tracking is not None:
            _log_trained(out / "model", tracking, args, cfg, result)
    if result.status == "diverged":
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    if result.status == "stopped":
        print(f"stopped by the time limit after {result.epochs} of {trainer.total_epochs} epochs")
    return 0


def _log_trained(folder: Path, uri: str, args, cfg, result) -> None:
    """The kept model as an MLflow model in a run with the config and test metrics; with
    ``--register``, a new version of that registered model."""
    from ltsearch.runconfig import config_origin
    from ltsearch.search.records import flatten
    from ltsearch.search.tracking import prepare_environment

    prepare_environment()  # (before MLflow is imported: its log level is read then)
    from ltsearch.search.registry import log_model

    logged = log_model(folder, uri, args.experiment, register=args.register,
                       run_name=Path(args.config).stem, params=flatten(cfg.to_dict()),
                       metrics={k: v for k, v in result.metrics.items() if not isinstance(v, list)},
                       origin=config_origin(args.config))
    print(f"logged the model in MLflow ({uri}): run {logged['run_id']}"
          + (f", registered as {args.register} version {logged['version']}" if args.register else ""))


def cmd_predict(args) -> int:
    from ltsearch.predict import main_predict

    return main_predict(args)


def cmd_search(args) -> int:
    from ltsearch.search.command import main_search

    return main_search(args)


def cmd_confirm(args) -> int:
    from ltsearch.search.command import main_confirm

    return main_confirm(args)


def cmd_export(args) -> int:
    from ltsearch.search.export import main_export

    return main_export(args)


def cmd_report(args) -> int:
    from ltsearch.search.report import main_report

    return main_report(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltsearch", description=(
        "Search long-tailed recognition recipes and their hyper-parameters on Ray: Optuna's TPE "
        "proposes, ASHA stops weak trials, MLflow records."),
        epilog="start with: ltsearch search search_spaces/quickstart.yaml")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one config")
    t.add_argument("config", help="a config YAML (`ltsearch export` writes them)")
    t.add_argument("--out", help="output folder (default runs/<config name>)")
    t.add_argument("--device", help="override train.device (cpu, cuda, cuda:1)")
    t.add_argument("--epochs", type=int, help="override train.epochs (milestones and the method's "
                   "absolute epoch knobs scale with it)")
    t.add_argument("--checkpoint-every", type=int, help="save checkpoint.pt every N epochs "
                   "(default: every epoch with --resume, else never)")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--time-limit", type=float, help="minutes; stop after the epoch that passes it "
                   "and evaluate on test (status 'stopped')")
    t.add_argument("--tracking-uri", help="log the kept model as an MLflow model in this store, "
                   "with the config and test metrics (default with --register: sqlite:///mlflow.db)")
    t.add_argument("--register", metavar="NAME", help="register it in MLflow's model registry as a "
                   "new version of NAME (tagged with its search, trial and config hash)")
    t.add_argument("--experiment", default="ltsearch-train", help="the MLflow experiment of the "
                   "run (default ltsearch-train)")
    t.set_defaults(fn=cmd_train)

    pr = sub.add_parser("predict", help="classify images with a model `train` kept (OUT/model)")
    pr.add_argument("model_dir", help="a saved model's folder (OUT/model of `ltsearch train`)")
    pr.add_argument("inputs", nargs="+", help="image files, folders (walked) or split files "
                    "(.txt: path [label] lines; .csv: path,label)")
    pr.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    pr.add_argument("--out", help="write a CSV (path, class_1, p_1, …) instead of printing")
    pr.add_argument("--root", help="what a split file's paths are relative to (default: its folder)")
    pr.add_argument("--device", help="cpu, cuda, cuda:N (default: a GPU where there is one)")
    pr.set_defaults(fn=cmd_predict)

    s = sub.add_parser("search", help="run a search described by a search-space file")
    s.add_argument("space", help="the search file (base config, search settings, space)")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--name", help="search name (folder under --storage)")
    s.add_argument("--storage", default="searches", help="folder of search results (default searches/)")
    s.add_argument("--num-samples", type=int, help="override search.num_samples: how many trials")
    s.add_argument("--max-concurrent", type=int, help="override search.max_concurrent: trials "
                   "at a time")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    s.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    s.add_argument("--no-tracking", action="store_true",
                   help="record only in the search folder (search.tracking: none)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted search")
    s.add_argument("--confirm", metavar="TOP:SEEDS", help="then re-train the TOP best configs with "
                   "SEEDS fresh seeds each (search.confirm)")
    s.set_defaults(fn=cmd_search)

    c = sub.add_parser("confirm", help="re-train a finished search's best configs with fresh seeds")
    c.add_argument("search_dir", help=SEARCH_DIR_HELP)
    c.add_argument("--top", type=int, default=3, help="how many of the best configs (default 3)")
    c.add_argument("--seeds", type=int, default=3, help="fresh seeds per config (default 3)")
    c.add_argument("--address", help=ADDRESS_HELP)
    c.add_argument("--tracking-uri", help="where the search is tracked (default: as it was run)")
    c.add_argument("--no-tracking", action="store_true", help="record only in the search folder")
    c.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    c.add_argument("--register", metavar="NAME", help="keep the runs' models and register the "
                   "confirmed best in MLflow's model registry as a new version of NAME")
    c.set_defaults(fn=cmd_confirm)

    e = sub.add_parser("export", help="export the top configs of a search")
    e.add_argument("search_dir", help=SEARCH_DIR_HELP)
    e.add_argument("--top", type=int, default=1, help="how many configs, best first: confirmed "
                   "ones by their mean over seeds, then trials that ran to the end (default 1)")
    e.add_argument("--pareto", action="store_true", help="the Pareto set over search.objectives "
                   "instead of the top configs")
    e.add_argument("--out", required=True, help="folder for the config YAMLs and trials.csv")
    e.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", help="write a search's report page (SEARCH_DIR/report.html)")
    r.add_argument("search_dir", help=SEARCH_DIR_HELP)
    r.add_argument("--tracking-uri", help="where the search is tracked (default: as it was run)")
    r.add_argument("--no-tracking", action="store_true", help="do not attach the report to the search's run")
    r.add_argument("--out", help="write the page and its figures to this folder instead (the search "
                   "folder is then only read: a read-only one, or one a search is writing)")
    r.set_defaults(fn=cmd_report)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.began = time.monotonic()  # the user's wait: a search's clock counts from here
    try:
        return args.fn(args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM, SIGHUP) before anything was written
        print(f"stopped{f' by {e}' if str(e) else ''}: nothing was written", file=sys.stderr)
        return 130


def console() -> None:
    """The ``ltsearch`` command. By the time ``main`` returns, everything it wrote is closed
    (records, tracking, Ray); frozen, the heap of torch, Ray and MLflow objects is left out of
    the interpreter's last garbage collection, which took 1–3 s after every search."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()

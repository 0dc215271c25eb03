"""One Ray Tune trial: build the trial's config, pin the device Ray gave it, train, report.

The trainer stays pure PyTorch; this module is the only place where it meets Ray. A worker
process may run many trials in turn (``search.reuse_workers``): imports, the data and compiled
graphs are paid once per worker, while each trial builds its own model, optimiser and seeded
randomness, so a reused worker gives the same results as a fresh one.

Each report carries where the trial's time went (``time/setup_s``, ``time/eval_s``,
``time/report_s``, cumulative) and when the function started (``entered_at``), which is how
``scripts/bench_search.py`` accounts for a search's time.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import ray
import torch
from ray import tune

from ltsearch.runconfig import compressed, config_from_dict, run_epochs
from ltsearch.search.records import CONFIRM_OF
from ltsearch.search.rungs import BUDGET, BUDGETS, RUNG, RUNG_VALUE, RUNG_VALUES
from ltsearch.inference import save_model
from ltsearch.search.kept import MODEL_SUBDIR
from ltsearch.trainer import Trainer

CHECKPOINT_FILE = "trainer.pt"
RUNG_FILE = "rung.json"  # beside it: the rung the trainer's state belongs to, and earlier rungs' values
ENDED = "ended"  # in RUNG_FILE: the checkpoint of the trial's last report


def trial_device() -> str:
    """The GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), else CPU."""
    return "cuda:0" if ray.get_gpu_ids() else "cpu"


class CheckpointPolicy:
    """When a trial saves: every ``every`` epochs and at its end, as asked; by default (``every``
    None) once ``interval_s`` of the trial's time has passed since the last save, and not at
    its end (a finished trial is never resumed). ASHA only stops trials, so it needs none."""

    def __init__(self, every: Optional[int], interval_s: float):
        self.every, self.interval_s = every, interval_s
        self.last = time.monotonic()

    def due(self, epoch: int, total: int) -> bool:
        if self.every is not None:
            return epoch % self.every == 0 or epoch == total
        return epoch < total and time.monotonic() - self.last >= self.interval_s

    def saved(self) -> None:
        self.last = time.monotonic()


def holds_state(saved: dict) -> bool:
    """Whether a checkpoint whose rung file reads ``saved`` holds the trainer's state too: not
    one saved at a rung's end (the next rung starts from scratch) or with the trial's model."""
    return not saved.get(ENDED) and len(saved.get(RUNG_VALUES) or []) <= saved.get(RUNG, 0)


def rung_runs(cfg, fractions: list[float]) -> list:
    """The runs of a trial's rungs: its whole recipe compressed to each fraction, the last the
    full run (a confirmation, or a search without ASHA, has only that)."""
    runs = [compressed(cfg, f) for f in fractions]
    for run in runs:
        run.train.device = cfg.train.device
    return runs


def run_trial(config: dict, data=None, space=None, compile_cache: Optional[str] = None,
              ended: frozenset = frozenset()) -> None:
    """Tune function trainable; ``data`` (LongTailData) arrives once through the object store.

    ``ended``: trials the search's records hold as ended. Tune's snapshot of a stopped driver
    can be seconds older than the records, and a trial stopped in between is restored as
    unfinished; it returns at once, reporting nothing, so it stays what the records say.

    Trains the trial's rungs in turn, each a complete run from scratch, and reports every
    evaluated epoch with ``epoch`` counting all the trial's epochs so far (Tune's, Optuna's and
    MLflow's step), and the rung, its budget and the values its earlier rungs ended with (what
    the scheduler decides on)."""
    if tune.get_context().get_trial_id() in ended:
        return
    entered, began = time.time(), time.perf_counter()
    cfg = config_from_dict(space.trial_config(config))
    cfg.train.device = trial_device()
    if compile_cache and cfg.train.device.startswith("cuda") and cfg.train.compile:
        # One inductor cache for the search: a compiled graph is built once, then loaded by
        # every later trial, worker and resume.
        os.makedirs(compile_cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    settings = space.settings
    runs = rung_runs(cfg, [1.0] if CONFIRM_OF in config else settings.asha.fractions())
    budgets = [run_epochs(run) for run in runs]
    rung, values, state = 0, [], None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            saved = json.loads((Path(folder) / RUNG_FILE).read_text())
            if saved.get(ENDED):  # its last report, with its model, was taken: nothing is left
                return
            rung, values = saved[RUNG], saved[RUNG_VALUES]
            if holds_state(saved):
                state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
            else:  # saved at the end of its rung: on to the next, from scratch
                rung += 1
    policy = CheckpointPolicy(settings.checkpoint_every, settings.checkpoint_interval_s)
    keeps = settings.keep_models > 0 if CONFIRM_OF not in config else bool(settings.confirm.register)
    node = ray.get_runtime_context().get_node_id()
    spent = {"time/setup_s": time.perf_counter() - began, "time/eval_s": 0.0, "time/report_s": 0.0}
    metric = settings.metric
    for k in range(rung, len(runs)):
        trainer = Trainer(runs[k], data)
        if state is not None:
            trainer.load_state_dict(state)
            state = None
        before = sum(budgets[:k])

        def report(metrics: dict, tr: Trainer, k=k, before=before) -> None:
            start = time.perf_counter()
            spent["time/eval_s"] += metrics.pop("eval_time_s", 0.0)
            if tr.epoch == tr.total_epochs:
                values.append(metrics.get(metric))
            epoch = before + tr.epoch
            metrics = {**metrics, **spent, "entered_at": entered, "node_id": node,
                       "device": str(tr.device), "method_name": cfg.method.label(),
                       "epoch": epoch, "total_epochs": sum(budgets), "rung_epoch": tr.epoch,
                       RUNG: k, BUDGET: budgets[k], BUDGETS: budgets, RUNG_VALUES: list(values),
                       **({RUNG_VALUE: values[-1]} if tr.epoch == tr.total_epochs else {})}
            due = policy.due(epoch, sum(budgets))
            model = keeps and k == len(runs) - 1 and tr.epoch == tr.total_epochs
            # a rung's end: its values are all a resume needs (the next rung starts from
            # scratch), and the scheduler may pause the trial here (ltsearch.search.scheduler)
            rung_end = k < len(runs) - 1 and tr.epoch == tr.total_epochs
            if due or model or rung_end:
                with tempfile.TemporaryDirectory() as folder:
                    if due and not rung_end:
                        tr.save(Path(folder) / CHECKPOINT_FILE)
                    if model:  # (a search's driver keeps it or not: ltsearch.search.kept)
                        save_model(tr, Path(folder) / MODEL_SUBDIR, metrics)
                    (Path(folder) / RUNG_FILE).write_text(json.dumps(
                        {RUNG: k, RUNG_VALUES: values, **({ENDED: True} if model else {})}))
                    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
                policy.saved()
            else:
                tune.report(metrics)
            spent["time/report_s"] += time.perf_counter() - start

        result = trainer.fit(report)
        if result.status == "diverged":
            raise RuntimeError(result.error)

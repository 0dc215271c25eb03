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

import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import ray
from ray import tune

from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

CHECKPOINT_FILE = "trainer.pt"


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


def run_trial(config: dict, data=None, space=None, compile_cache: Optional[str] = None) -> None:
    """Tune function trainable; ``data`` (LongTailData) arrives once through the object store."""
    entered, began = time.time(), time.perf_counter()
    cfg = config_from_dict(space.trial_config(config))
    cfg.train.device = trial_device()
    if compile_cache and cfg.train.device.startswith("cuda") and cfg.train.compile:
        # One inductor cache for the search: a compiled graph is built once, then loaded by
        # every later trial, worker and resume.
        os.makedirs(compile_cache, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache
    trainer = Trainer(cfg, data)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(Path(folder) / CHECKPOINT_FILE)
    settings = space.settings
    policy = CheckpointPolicy(settings.checkpoint_every, settings.checkpoint_interval_s)
    node = ray.get_runtime_context().get_node_id()
    spent = {"time/setup_s": time.perf_counter() - began, "time/eval_s": 0.0, "time/report_s": 0.0}

    def report(metrics: dict, tr: Trainer) -> None:
        start = time.perf_counter()
        spent["time/eval_s"] += metrics.pop("eval_time_s", 0.0)
        metrics = {**metrics, **spent, "entered_at": entered, "node_id": node,
                   "device": str(tr.device), "method_name": cfg.method.label()}
        if policy.due(tr.epoch, tr.total_epochs):
            with tempfile.TemporaryDirectory() as folder:
                tr.save(Path(folder) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            policy.saved()
        else:
            tune.report(metrics)
        spent["time/report_s"] += time.perf_counter() - start

    result = trainer.fit(report)
    if result.status == "diverged":
        raise RuntimeError(result.error)

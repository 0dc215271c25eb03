"""One Ray Tune trial: build the trial's config, pin the device Ray gave it, train, report.

The trainer stays pure PyTorch; this module is the only place where it meets Ray.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import ray
from ray import tune

from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

CHECKPOINT_FILE = "trainer.pt"


def trial_device() -> str:
    """The GPU Ray assigned (it sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), else CPU."""
    return "cuda:0" if ray.get_gpu_ids() else "cpu"


def run_trial(config: dict, data=None, space=None) -> None:
    """Tune function trainable; ``data`` (LongTailData) arrives once through the object store."""
    cfg = config_from_dict(space.trial_config(config))
    cfg.train.device = trial_device()
    trainer = Trainer(cfg, data)
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load(Path(folder) / CHECKPOINT_FILE)
    every = space.settings.checkpoint_every
    node = ray.get_runtime_context().get_node_id()

    def report(metrics: dict, tr: Trainer) -> None:
        metrics = {**metrics, "node_id": node, "device": str(tr.device),
                   "method_name": cfg.method.label()}
        if tr.epoch % every == 0 or tr.epoch == tr.total_epochs:
            with tempfile.TemporaryDirectory() as folder:
                tr.save(Path(folder) / CHECKPOINT_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        else:
            tune.report(metrics)

    result = trainer.fit(report)
    if result.status == "diverged":
        raise RuntimeError(result.error)

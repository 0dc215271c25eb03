"""Trained models a search keeps (``search.keep_models: k``; confirmation runs when
``ltsearch confirm --register`` asks): a trial that runs to the end saves its model
(:mod:`ltsearch.inference`) with its last report's checkpoint; the driver moves it to
``models/<trial id>`` in the search folder and keeps the k best trials' (confirmation runs'
all), so the best configs need no re-training. ``trials.json`` records each kept model's folder
(``model``), removed with it."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Optional

from ltsearch.search.records import CONFIRM_OF, TrialRecords

log = logging.getLogger(__name__)

MODELS_DIR = "models"
MODEL_SUBDIR = "model"  # a trial's model in the checkpoint of its last report
MODEL_FIELD = "model"  # a record's kept model, relative to the search folder


def keep(records: TrialRecords, trial_id: str, source: Path, k: int, metric: str, mode: str) -> Optional[Path]:
    """Copy the model folder ``source`` of an ended trial into the search folder, then drop the
    search trials' kept models beyond the ``k`` best; the kept folder, or None if dropped."""
    folder = records.path.parent
    target = folder / MODELS_DIR / trial_id
    partial = target.with_name(f".{trial_id}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # (complete or absent: never half a model)
    records.update(trial_id, **{MODEL_FIELD: str(target.relative_to(folder))})
    if not records.trials[trial_id].get(CONFIRM_OF):
        for r in [r for r in records.ranked(metric, mode) if r.get(MODEL_FIELD)][k:]:
            shutil.rmtree(folder / r[MODEL_FIELD], ignore_errors=True)
            records.update(r["trial_id"], **{MODEL_FIELD: None})
    return target if records.trials[trial_id].get(MODEL_FIELD) else None


def kept_model(records: TrialRecords, trial_id: str) -> Optional[Path]:
    rel = records.trials.get(trial_id, {}).get(MODEL_FIELD)
    return records.path.parent / rel if rel else None

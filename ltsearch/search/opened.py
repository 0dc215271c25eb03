"""The open search folder: what a search, a resume or a confirmation holds for its whole run.

The checks open it once (:func:`ltsearch.search.checks.check_search`, which takes the folder's
writer lock) and hand it through every stage, confirmation included: the lock, the records
(trials.json as one :class:`TrialRecords`, kept current by the search's callbacks and read by
every stage, never read afresh), the study, the data and the tracker. One writer per folder is
then a fact of the code: nothing on a search's path opens the folder's files another way.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ltsearch.search.records import TrialRecords

RAY_SUBDIR = "ray"
COMPILE_CACHE = "compile_cache"  # torch inductor's, shared by the search's compiled trials


@dataclass
class Search:
    """A checked search, ready to run: what every stage needs."""
    space: object
    name: str
    folder: Path
    resume: bool
    data: object
    tracker: object  # a search.tracker.Tracker
    groups: str  # which many/medium/few split the metrics use, in words
    tune_trial_ids: set = field(default_factory=set)  # trials Tune recorded, after fit
    began: float = field(default_factory=time.monotonic)  # the command's start, for the clock
    lock: Optional[object] = None  # the folder's writer lock (search.folder.FolderLock), held throughout
    stops: Optional[object] = None  # search.signals.StopSignals: SIGTERM and SIGHUP as Ctrl-C
    records: Optional[TrialRecords] = None  # trials.json, read once (when the checks open it)
    backbone: dict = field(default_factory=dict)  # the base model's arch, weights file and sha256

    def __post_init__(self):
        if self.records is None:
            self.records = TrialRecords(self.folder)

    @property
    def ray_dir(self) -> Path:
        return self.folder / RAY_SUBDIR

    @property
    def study_uri(self) -> str:
        return f"sqlite:///{self.folder / 'optuna.db'}"

    def study(self):
        import optuna

        return optuna.load_study(study_name=self.name, storage=self.study_uri)

    def set_trial_states(self, numbers: list[int], state) -> None:
        """Move Optuna trials to ``state`` through the storage's public API (``tell`` only
        finishes trials; an interrupted trial must stay resumable)."""
        import optuna

        if not numbers:
            return
        storage = optuna.storages.RDBStorage(self.study_uri)
        study_id = storage.get_study_id_from_name(self.name)
        for number in numbers:
            storage.set_trial_state_values(
                storage.get_trial_id_from_study_id_trial_number(study_id, number), state)

    def trainable(self):
        """Tune's trainable for the search's trials and confirmation runs: the data once through
        the object store; trials the records hold as ended are not run again (``run_trial``)."""
        from ray import tune

        from ltsearch.search.trial import run_trial

        resources = self.space.settings.resources
        return tune.with_resources(
            tune.with_parameters(run_trial, data=self.data, space=self.space,
                                 compile_cache=str(self.folder / COMPILE_CACHE),
                                 ended=self.records.ended()),
            {"cpu": resources.cpu, "gpu": resources.gpu})

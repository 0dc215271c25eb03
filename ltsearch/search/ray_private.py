"""Every use of Ray's private attributes, in one place; ``tests/test_ray_private.py`` fails
loudly when a Ray release changes one of them.

- ``OptunaSearch._ot_trials`` (Tune trial id → Optuna trial), ``._ot_study`` and
  ``._completed_trials``: Tune's searcher API has no hook to report intermediate values to
  Optuna or to tell a trial PRUNED.
- ``Tuner._local_tuner._run_config.callbacks``: ``Tuner.restore`` takes no callbacks, and the
  pickled ones hold a closed MLflow client and a stale records path.
- ``Tuner._local_tuner._tune_config.scheduler``: ``Tuner.restore`` takes no scheduler, and the
  one it unpickles is as it was created, before any rung was recorded.
- ``Tuner._local_tuner._tune_config.search_alg``: the searcher ``Tuner.restore`` unpickled, which
  Tune then restores in place from its snapshot (no public API hands it over); a restored
  :class:`ltsearch.search.limiter.SearchLimiter` is told Tune's trials through it.
- ``Trial.storage.trial_fs_path`` and ``Trial.local_path``: where a trial's own result files lie
  and where Tune stages the ones it syncs over them (no public API names either).
- ``ray._private.utils.read_ray_address`` and ``ray._common.utils.get_default_ray_temp_dir``:
  which cluster ``ray.init(address="auto")`` joins is not public, and it must be checked before
  Ray is asked to join it.
"""
from __future__ import annotations

from typing import Optional


def prune_aware_optuna():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from ltsearch.search.rungs import RUNG_VALUES

    class PruneAwareOptunaSearch(OptunaSearch):
        """Optuna sees the value each rung ended with at step = the rung (0-based), and trials
        the scheduler stopped are told as PRUNED with those intermediate values (TPE ranks them
        by the rung they reached, then its value), not COMPLETE with an early value (Ray's
        default). Tune hands the last result of a trial to ``on_trial_complete`` only, so it is
        reported there too."""

        def _report(self, trial_id, result):
            if isinstance(self.metric, list):  # Optuna takes no intermediate values of a
                return                         # multi-objective trial
            steps = self.__dict__.setdefault("_reported_steps", {}).setdefault(trial_id, set())
            for rung, value in enumerate(result.get(RUNG_VALUES) or []):
                if value is None or rung in steps:
                    continue
                if rung in self._study_steps(trial_id):  # told before this searcher's snapshot
                    steps.add(rung)                      # (a resume): Optuna would warn, not keep
                    continue
                try:
                    self._ot_trials[trial_id].report(value, rung)
                except optuna.exceptions.UpdateFinishedTrialError:
                    # A resumed search re-runs a trial the study had already closed (the
                    # driver died between the two snapshots); the study keeps its record.
                    self._completed_trials.add(trial_id)
                    return
                steps.add(rung)

        def _study_steps(self, trial_id) -> set:
            """The steps the study holds intermediate values of for the trial."""
            ot = self._ot_trials.get(trial_id)
            if ot is None:
                return set()
            for t in self._ot_study.get_trials(deepcopy=False):
                if t.number == ot.number:
                    return set(t.intermediate_values)
            return set()

        def on_trial_result(self, trial_id, result):
            if trial_id not in self._completed_trials:
                self._report(trial_id, result)

        def _told(self, trial_id) -> bool:
            """Whether the study already holds the trial's end: a resumed search restores this
            searcher from a snapshot older than the study (a trial pruned just before the
            driver stopped), and Optuna refuses to be told twice."""
            ot = self._ot_trials.get(trial_id)
            if ot is None:
                return False
            state = {t.number: t.state for t in self._ot_study.get_trials(deepcopy=False)}.get(ot.number)
            return state is not None and state.is_finished()

        def on_trial_complete(self, trial_id, result=None, error=False):
            if trial_id not in self._completed_trials and self._told(trial_id):
                self._completed_trials.add(trial_id)
                return
            if trial_id in self._completed_trials or error or not result:
                return super().on_trial_complete(trial_id, result, error)
            self._report(trial_id, result)
            if trial_id in self._completed_trials:
                return
            if result["epoch"] < result.get("total_epochs", result["epoch"]):
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            else:
                super().on_trial_complete(trial_id, result, error)

    return PruneAwareOptunaSearch


def replace_restored_callbacks(tuner, callbacks: list) -> None:
    tuner._local_tuner._run_config.callbacks = callbacks


def replace_restored_scheduler(tuner, scheduler) -> None:
    tuner._local_tuner._tune_config.scheduler = scheduler


def restored_search_alg(tuner):
    return tuner._local_tuner._tune_config.search_alg


def keep_results(trial) -> None:
    """Tune starts a restored trial that has no checkpoint with empty result files in its
    staging folder, which its next sync copies over the trial's own: put its own there first
    (Tune's loggers, which run after the search's callbacks, append to them)."""
    import shutil
    from pathlib import Path

    own, staged = Path(trial.storage.trial_fs_path), Path(trial.local_path)
    if own.resolve() == staged.resolve():
        return
    staged.mkdir(parents=True, exist_ok=True)
    for name in ("result.json", "progress.csv"):
        if (own / name).is_file():
            shutil.copyfile(own / name, staged / name)


def recorded_cluster() -> tuple[Optional[str], str]:
    """The address the latest `ray start` on this machine recorded (None if none, or `ray stop`
    since) and the folder it is recorded in."""
    from ray._common.utils import get_default_ray_temp_dir
    from ray._private.utils import read_ray_address

    return read_ray_address(), get_default_ray_temp_dir()

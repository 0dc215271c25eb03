"""The private Ray Tune attributes ltsearch relies on (ltsearch/search/ray_private.py) still
exist: a Ray release that renames one fails here, not in the middle of a user's search."""
import optuna
from ray import tune

from ltsearch.search.ray_private import (prune_aware_optuna, replace_restored_callbacks,
                                         replace_restored_scheduler, restored_search_alg)
from ltsearch.search.rungs import RUNG_VALUES


def _define(trial):
    trial.suggest_float("x", 0.0, 1.0)


def test_optuna_searcher_internals():
    searcher = prune_aware_optuna()(space=_define, metric="val/top1", mode="max",
                                    sampler=optuna.samplers.RandomSampler(seed=0))
    assert searcher.suggest("t1") is not None
    assert isinstance(searcher._ot_study, optuna.Study)
    assert isinstance(searcher._ot_trials["t1"], optuna.Trial)
    assert isinstance(searcher._completed_trials, set)
    # a trial's rungs: the values of those it ended, reported at step = the rung
    searcher.on_trial_result("t1", {"val/top1": 0.5, "epoch": 1, RUNG_VALUES: []})
    searcher.on_trial_result("t1", {"val/top1": 0.55, "epoch": 2, RUNG_VALUES: [0.55]})
    searcher.on_trial_complete("t1", {"val/top1": 0.6, "epoch": 4, "total_epochs": 6,
                                      RUNG_VALUES: [0.55]})  # stopped in its second rung
    (trial,) = searcher._ot_study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values == {0: 0.55}


def test_tuner_tune_config_scheduler(tmp_path):
    from ray.tune.schedulers import FIFOScheduler

    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path)))
    scheduler = FIFOScheduler()
    replace_restored_scheduler(tuner, scheduler)
    assert tuner._local_tuner._tune_config.scheduler is scheduler


def test_tuner_tune_config_search_alg(tmp_path):
    from ray.tune.search import BasicVariantGenerator

    searcher = BasicVariantGenerator()
    tuner = tune.Tuner(lambda config: None, tune_config=tune.TuneConfig(search_alg=searcher),
                       run_config=tune.RunConfig(storage_path=str(tmp_path)))
    assert restored_search_alg(tuner) is searcher


def test_tuner_run_config_callbacks(tmp_path):
    tuner = tune.Tuner(lambda config: None, run_config=tune.RunConfig(storage_path=str(tmp_path)))
    marker = tune.Callback()
    replace_restored_callbacks(tuner, [marker])
    assert tuner._local_tuner._run_config.callbacks == [marker]


def test_the_cluster_ray_start_recorded(tmp_path, monkeypatch):
    from ltsearch.search.ray_private import recorded_cluster

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert recorded_cluster() == (None, str(tmp_path / "ray"))
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.0.0.7:6379\n")
    assert recorded_cluster() == ("10.0.0.7:6379", str(tmp_path / "ray"))



def test_a_trials_own_result_files_go_to_its_staging_folder(tmp_path):
    """``keep_results`` reads ``Trial.storage.trial_fs_path`` and ``Trial.local_path``."""
    import inspect
    from types import SimpleNamespace

    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from ltsearch.search.ray_private import keep_results

    assert isinstance(inspect.getattr_static(Trial, "local_path"), property)
    assert "storage" in inspect.signature(Trial.__init__).parameters
    assert isinstance(inspect.getattr_static(StorageContext, "trial_fs_path"), property)
    own, staged = tmp_path / "own", tmp_path / "staged"
    own.mkdir()
    (own / "result.json").write_text('{"epoch": 1}\n')
    keep_results(SimpleNamespace(storage=SimpleNamespace(trial_fs_path=str(own)), local_path=str(staged)))
    assert (staged / "result.json").read_text() == '{"epoch": 1}\n' and not (staged / "progress.csv").exists()

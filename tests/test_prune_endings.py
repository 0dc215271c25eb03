"""A driver killed at each step of a prune, then resumed: the pruned trial stays pruned and the
records agree. Real Ray (the session's), Optuna, MLflow (sqlite) and a real driver process."""
import signal

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import Hold, fresh_store, tiny_search
from ltsearch.cli import main
from procs import BIN, _env, _held, _start, _stop, _trials


@pytest.mark.parametrize("point", ["stop", "stop-recorded", "optuna-pruned", "pruned"])
def test_a_driver_killed_anywhere_around_a_prune_resumes_to_what_an_unbroken_search_ends_with(
        point, tmp_path, ray_address, session_hold, capsys):
    """The driver dies (SIGKILL: nothing after it runs) at each step of a prune, by its own hand
    (``die-<point>``, tests/hold/sitecustomize.py), not at a moment a timer happened to hit: the
    scheduler's decision, the rung result recorded, Optuna told, trials.json closed (MLflow's
    run closes on the tracker's thread, between the last two). The pruned trial is in Tune's
    snapshot (held before its first epoch until it is: a trial started after the last snapshot
    is LOST, another ending). Whichever
    point, `--resume` ends as the unbroken search does: the trial PRUNED after its rung epoch
    in all three records, that epoch logged once, and `best_config.yaml` the completed trial's.
    (A trial pruned just before a stop used to be trained to the end on resume.)"""
    data = tiny_search(method={"ce": {}, "logit_adjust": {"loss.tau": {"uniform": [0.5, 1.5]}}})
    data["search"].update(num_samples=2, seed=2)  # logit_adjust completes, then ce is pruned
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    uri = fresh_store(tmp_path)
    die = Hold(tmp_path / "hold")  # the driver's own hook folder; its trials run on the session's Ray
    die.fault(f"die-{point}")
    session_hold.at("1-0")  # trainers: logit_adjust's rung run (it waits, its place at the
    #                         rung unknown), ce's (pruned: logit_adjust in), logit_adjust's full run
    cmd = [str(BIN / "ltsearch"), "search", str(path), "--storage", str(tmp_path / "searches"),
           "--name", "p", "--tracking-uri", uri]
    folder = tmp_path / "searches" / "p"
    driver = _start(cmd + ["--address", ray_address], tmp_path / "first.log", env=die.env(_env()))
    try:
        held = _held(session_hold, "1-0", folder)
        assert _trials(folder)[held]["method"] == "ce"
        session_hold.release("1-0")
        driver.wait(300)
    finally:
        _stop(driver)
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert die.fired(f"die-{point}")

    capsys.readouterr()
    code = main(cmd[1:] + ["--resume"])
    resumed = capsys.readouterr()
    assert code == 0, resumed.out[-3000:] + resumed.err[-3000:]
    records = _trials(folder)
    assert sorted((r["method"], r["status"], r["epochs"] == r["total_epochs"]) for r in records.values()) \
        == [("ce", "PRUNED", False), ("logit_adjust", "COMPLETED", True)], records
    pruned = next(r for r in records.values() if r["status"] == "PRUNED")
    completed = next(r for r in records.values() if r["status"] == "COMPLETED")
    assert pruned["epochs"] == 1 and len(pruned["rung_values"]) == 1
    study = optuna.load_study(study_name="p", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "PRUNED"]
    [told] = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert told.intermediate_values == {0: pytest.approx(pruned["rung_values"][0])}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    runs = client.search_runs([exp])
    assert sorted((r.data.tags["ltsearch.kind"], r.info.status) for r in runs) == \
        [("search", "FINISHED"), ("trial", "FINISHED"), ("trial", "KILLED")]
    [killed] = [r for r in runs if r.info.status == "KILLED"]
    assert killed.data.tags["ltsearch.trial_id"] == pruned["trial_id"]
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, "val/balanced_acc")]
    assert steps == [1]  # its one epoch, logged once
    assert yaml.safe_load((folder / "best_config.yaml").read_text()) == completed["config"]

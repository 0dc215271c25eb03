"""A driver stopped and resumed: SIGKILL, Ctrl-C during the search, during confirmation and in
the middle of a rung; trials held at a named state (``conftest.Hold``), not timed."""
import json
import signal

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import Hold, fresh_store, tiny_search
from procs import (_ctrl_c, _env, _held, _here, _nothing_running, _resume_here, _search_cmd, _start,
                   _stop, _trials)



def test_resume_after_sigkill(tmp_path, ray_local, capsys):
    """SIGKILL to the driver and the Ray it started, while the second of three trials trains
    (held there until Tune's snapshot holds it): the resume finishes exactly the three, the
    killed one among them, and every record agrees."""
    data = tiny_search(method={"ce": {}, "resample": {"sampler.name": {"choice": ["balanced", "sqrt"]}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=3, max_concurrent=1, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "r", uri)
    hold = Hold(tmp_path / "hold")
    hold.at("1-1")  # the second trainer, after its first epoch
    driver = _start(cmd, tmp_path / "first.log", env=hold.env(_env()))
    try:
        killed = _held(hold, "1-1", folder)
    finally:
        _stop(driver, signal.SIGKILL)  # the driver and the Ray it started, mid-search
    before = {k: r for k, r in _trials(folder).items() if r["status"] == "COMPLETED"}
    assert driver.returncode == -signal.SIGKILL and len(before) == 1
    assert _trials(folder)[killed]["status"] == "RUNNING"  # nothing could close it

    resumed = _resume_here(cmd, capsys)
    shown = resumed.stdout + resumed.stderr  # what the user sees: Ray's internals stay in its logs
    for noise in ("Traceback", "Failed to fetch metrics", "Error handling checkpoint"):
        assert noise not in shown, shown[-4000:]
    after = _trials(folder)
    # Tune's snapshot knew both: the killed trial is trained again, the third is new
    assert len(after) == 3 and all(r["status"] == "COMPLETED" for r in after.values()), after
    assert after[killed]["epochs"] == 2
    numbers = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # not timings
    for k, r in before.items():  # finished trials keep their results
        assert numbers(after[k]["metrics"]) == numbers(r["metrics"])
    assert "best trial per method" in resumed.stdout
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3  # agree
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(r["metrics"]["val/balanced_acc"] for r in after.values()))
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    runs = client.search_runs([exp])
    assert sum(r.data.tags.get("ltsearch.kind") == "search" for r in runs) == 1  # parent reused
    assert not [r for r in runs if r.info.status == "RUNNING"]
    trial_runs = {r.data.tags["ltsearch.trial_id"]: r for r in runs
                  if r.data.tags.get("ltsearch.kind") == "trial"}
    assert set(trial_runs) == set(after) and all(r.info.status == "FINISHED" for r in trial_runs.values())
    steps = [m.step for m in client.get_metric_history(trial_runs[killed].info.run_id, "val/balanced_acc")]
    assert sorted(steps) == [1, 2], steps  # its first epoch, trained again, is logged once


def _interrupted_as_the_readme_says(uri: str, study, records: dict) -> None:
    """After a stop: the parent run and each interrupted trial's run KILLED, each interrupted
    trial WAITING in Optuna (told nothing, so a resume can still tell it its result)."""
    client, exp = _nothing_running(uri)
    runs = client.search_runs([exp])
    assert [r.info.status for r in runs if r.data.tags.get("ltsearch.kind") == "search"] == ["KILLED"]
    by_trial = {r.data.tags["ltsearch.trial_id"]: r.info.status for r in runs
                if r.data.tags.get("ltsearch.kind") == "trial"}
    interrupted = [k for k, r in records.items() if r["status"] == "INTERRUPTED"]
    assert interrupted and all(by_trial[k] == "KILLED" for k in interrupted), by_trial
    assert all(by_trial[k] == "FINISHED" for k, r in records.items() if r["status"] == "COMPLETED")
    if study is not None:
        waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
        assert len(waiting) == len(interrupted)
        assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials if t not in waiting)


def test_ctrl_c_then_resume(tmp_path, ray_address, session_hold, capsys):
    """Ctrl-C used to exit 0 with the parent run FINISHED, the running Optuna trials FAIL and
    trials.json RUNNING; after --resume TPE never learned those trials' results. (The driver
    joins the session's Ray: a stop with a local Ray of the driver's own is the group-SIGTERM
    test's, tests/test_folder_endings.py.)"""
    data = tiny_search(method={"ce": {}, "resample": {"sampler.name": {"choice": ["balanced", "sqrt"]}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=3, max_concurrent=1, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "i", uri)
    hold = session_hold
    hold.at("1-1")  # the second trial, after its first epoch
    code, log = _ctrl_c(cmd + ["--address", ray_address], tmp_path / "first.log",
                        lambda: hold.reached("1-1"), "the second trial after its first epoch")
    hold.kill("1-1")
    hold.clear()
    assert code == 130, log[-3000:]
    assert "interrupted — continue with `ltsearch search" in log and "--resume" in log
    records = _trials(folder)
    assert sorted(r["status"] for r in records.values()) == ["COMPLETED", "INTERRUPTED"]
    study = optuna.load_study(study_name="i", storage=f"sqlite:///{folder / 'optuna.db'}")
    _interrupted_as_the_readme_says(uri, study, records)
    client, exp = _nothing_running(uri)

    resumed = _resume_here(cmd, capsys)
    assert resumed.stdout.splitlines()[0] == (  # before Ray: what it resumes, where, how far it got
        f"search i: resuming 3 trials over 2 methods (1 ended), 1 at a time, in {folder.resolve()}; "
        "on the Ray already running")
    after = _trials(folder)
    assert len(after) == 3 and all(r["status"] == "COMPLETED" for r in after.values())
    study = optuna.load_study(study_name="i", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.COMPLETE) == 3
    # every trial's final value reached TPE, the interrupted one's too
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(r["metrics"]["val/balanced_acc"] for r in after.values()))
    runs = [r for r in client.search_runs([exp]) if r.data.tags.get("ltsearch.kind") == "trial"]
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    assert [r.info.status for r in client.search_runs([exp])
            if r.data.tags.get("ltsearch.kind") == "search"] == ["FINISHED"]
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/balanced_acc")]
        assert sorted(steps) == [1, 2], steps  # every epoch once


def test_ctrl_c_during_confirmation_then_confirm_asking_for_fewer(tmp_path, ray_address,
                                                                  session_hold, capsys):
    """Confirmation runs end as cleanly as the search's trials: an interrupted one is closed,
    and a later `ltsearch confirm` finishes it, each epoch recorded once, even one asking for
    fewer seeds than the round it belongs to (with nothing of its own to run, it closed the
    interrupted run as lost). `--resume` reaches the same code (run_confirmation)."""
    data = tiny_search(method={"ce": {}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=1, max_concurrent=1, asha={"enabled": False},
                          confirm={"top": 1, "seeds": 2})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "c", uri)
    hold = session_hold  # the driver joins the session's Ray: not a local Ray's ending
    hold.at("2-1")  # trainers: the trial, then a confirmation run per seed, one at a time
    code, log = _ctrl_c(cmd + ["--address", ray_address], tmp_path / "first.log",
                        lambda: hold.reached("2-1"),
                        "the second seed's confirmation run after its first epoch")
    hold.kill("2-1")
    hold.clear()
    assert code == 130 and "--resume" in log, log[-3000:]
    records = _trials(folder)
    own = [r for r in records.values() if not r.get("confirm_of")]
    assert [r["status"] for r in own] == ["COMPLETED"]
    confirming = {r["seed"]: r["status"] for r in records.values() if r.get("confirm_of")}
    seed = own[0]["config"]["seed"]
    assert confirming == {seed + 1: "COMPLETED", seed + 2: "INTERRUPTED"}
    _interrupted_as_the_readme_says(uri, None, records)
    client, exp = _nothing_running(uri)

    again = _here(["confirm", str(folder), "--top", "1", "--seeds", "1"], capsys)
    after = _trials(folder)
    runs = [r for r in after.values() if r.get("confirm_of")]
    best = next(r for r in after.values() if not r.get("confirm_of"))
    assert sorted(r["seed"] for r in runs) == [best["config"]["seed"] + 1, best["config"]["seed"] + 2]
    assert all(r["status"] == "COMPLETED" and r["confirm_of"] == best["trial_id"] for r in runs)
    assert "± " in again.stdout and "(2)" in again.stdout
    tagged = client.search_runs([exp], "tags.`ltsearch.role` = 'confirmation'")
    assert sorted(r.data.tags["ltsearch.trial_id"] for r in tagged) == sorted(r["trial_id"] for r in runs)
    for run in tagged:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")]
        assert sorted(steps) == [1, 2], steps  # every epoch once


def test_ctrl_c_mid_rung_then_resume_decides_as_an_uninterrupted_search(tmp_path, ray_address,
                                                                        session_hold, capsys):
    """Tune restores a scheduler as it was created, empty: rebuilt from trials.json (and from the
    rung values every report repeats), a resumed search stops and keeps the trials an
    uninterrupted one does. No parameter is sampled, so both searches run the same four trials
    in the same (seed-shuffled) order, one at a time. (Without the rebuilt rungs, the trials
    after the resume met rungs holding the interrupted trial's value alone.)"""
    methods = ("ce", "reweight", "logit_adjust", "balanced_softmax")
    data = tiny_search(method={m: {} for m in methods})
    data["base"]["train"]["epochs"] = 2
    # runs of 1 and 2 epochs; seed 1's order: balanced_softmax, ce, logit_adjust, reweight, the
    # third promoted at its rung (ties the first: τ = 1 makes logit_adjust balanced_softmax)
    # in brackets of 2: a bracket is counted in the order trials started (a resume reorders Tune's
    # list of trials by their last result; trials.json keeps the start order)
    data["search"].update(num_samples=4, max_concurrent=1, checkpoint_every=1, seed=1,
                          asha={"rungs": [0.5, 1.0], "reduction_factor": 2, "bracket": 2})
    uri = fresh_store(tmp_path)
    whole_cmd, whole = _search_cmd(tmp_path, data, "whole", uri)
    hold = session_hold
    _here(whole_cmd[1:], capsys)
    trainers = hold.trainers()  # the trial of each rung run, in the order they ran
    expected = {r["method"]: r for r in _trials(whole).values()}
    assert {r["status"] for r in expected.values()} == {"COMPLETED", "PRUNED"}
    order = sorted(expected.values(), key=lambda r: r["started_at"])
    # the first trial that runs its full rung after two others ended: Ctrl-C in that run
    later = [r for i, r in enumerate(order) if i >= 2 and len(r["rung_values"]) > 0
             and r["epochs"] > r["budgets"][0]]
    assert later, [(r["method"], r["status"], r["rung_values"]) for r in order]
    method = later[0]["method"]

    cmd, folder = _search_cmd(tmp_path, data, "cut", uri)
    # a trainer per rung run, in the order the whole search ran them (a trial that waits runs
    # its full run after later trials' first): hold this one's full run, its second trainer,
    # after its first epoch. The driver joins the session's Ray.
    full_run = [i for i, t in enumerate(trainers) if t == later[0]["trial_id"]][1]
    name = f"{full_run}-1"
    hold.clear()  # the whole search's trainers counted
    hold.at(name)
    code, log = _ctrl_c(cmd + ["--address", ray_address], tmp_path / "first.log",
                        lambda: hold.reached(name), f"{method} in the middle of its full rung")
    hold.kill(name)
    hold.clear()
    assert code == 130, log[-3000:]
    assert [r["method"] for r in _trials(folder).values() if r["status"] == "INTERRUPTED"
            and r["rung"] == 1] == [method]
    _resume_here(cmd, capsys)
    after = {r["method"]: r for r in _trials(folder).values()}
    assert {m: r["status"] for m, r in after.items()} == {m: r["status"] for m, r in expected.items()}
    for m, r in after.items():
        assert r["rung_values"] == pytest.approx(expected[m]["rung_values"]), m
    study = optuna.load_study(study_name="cut", storage=f"sqlite:///{folder / 'optuna.db'}")
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert pruned == sum(r["status"] == "PRUNED" for r in after.values())


def test_an_error_in_the_driver_fails_the_parent_and_resume_finishes(tmp_path, ray_local, capsys,
                                                                     monkeypatch):
    """The endings table's row: a fault in the driver (a bug: here its search callback raises
    once, as the trial reports its first epoch) exits 1 with one line naming it; the running
    trial is INTERRUPTED, WAITING in Optuna, its run KILLED and the parent FAILED; `--resume`
    finishes the search."""
    from ltsearch.search.callbacks import SearchCallback

    data = tiny_search(method={"ce": {}})
    data["search"].update(num_samples=1, max_concurrent=1, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "e", uri)
    on_result, faults = SearchCallback.on_trial_result, [RuntimeError("a fault in the driver")]

    def faulty(self, *args, **kwargs):
        if faults:
            raise faults.pop()
        return on_result(self, *args, **kwargs)

    monkeypatch.setattr(SearchCallback, "on_trial_result", faulty)
    ran = _here(cmd[1:], capsys, code=1)
    log = ran.stdout + ran.stderr
    assert not faults and "Traceback" not in log
    assert "error: the search stopped: RuntimeError: a fault in the driver" in log
    records = _trials(folder)
    assert [(r["status"], r["epochs"]) for r in records.values()] == [("INTERRUPTED", 0)]
    study = optuna.load_study(study_name="e", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.WAITING]
    client, exp = _nothing_running(uri)
    runs = {r.data.tags.get("ltsearch.kind"): r.info.status for r in client.search_runs([exp])}
    assert runs == {"search": "FAILED", "trial": "KILLED"}

    monkeypatch.undo()
    _resume_here(cmd, capsys)
    assert [r["status"] for r in _trials(folder).values()] == ["COMPLETED"]
    runs = {r.data.tags.get("ltsearch.kind"): r.info.status for r in client.search_runs([exp])}
    assert runs == {"search": "FINISHED", "trial": "FINISHED"}


def test_a_trial_that_raises_is_retried_from_its_checkpoint(tmp_path, session_hold, capsys):
    """``max_failures: 1``: the trial crashes after its first epoch and its retry goes on from
    the checkpoint, every epoch logged once, and ends as any trial does. (A trial that raises
    for good, FAILED with its ``error`` tag: tests/test_search.py's diverging trials.)"""
    data = tiny_search(method={"ce": {}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=1, max_concurrent=1, asha={"enabled": False},
                          checkpoint_every=1, max_failures=1)
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "f", uri)
    hold = session_hold  # in this process, on the session's Ray
    hold.fault("fail-0-1")  # the trial's first trainer, before its second epoch
    _here(cmd[1:], capsys)
    assert hold.fired("fail-0-1") and (hold.folder / "trainer-1").exists()  # a second trainer
    [record] = _trials(folder).values()
    assert record["status"] == "COMPLETED" and record["epochs"] == 2
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id],
                               "tags.`ltsearch.kind` = 'trial'")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")]
    assert sorted(steps) == [1, 2]  # the retry continued: epoch 1 not logged again
    rows = [json.loads(line) for line in next((folder / "ray").glob("*/result.json")).read_text().splitlines()]
    assert rows[-1]["epoch"] == 2 and rows[-1]["iterations_since_restore"] == 1  # from epoch 1

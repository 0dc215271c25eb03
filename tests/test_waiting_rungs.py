"""The rungs' waiting in real Ray Tune and Optuna, on crafted rung values (a trainable that
reports them, no training): Tune pauses a trial whose place at its rung is not known yet,
resumes it from its rung-end checkpoint once later trials leave it in for good, and stops a
waiting trial once they rank it out for good, PRUNED in the study with the value its rung ended
with."""
import json
import tempfile
from pathlib import Path

import optuna
from ray import tune

from ltsearch.search.callbacks import SearchCallback
from ltsearch.search.limiter import SearchLimiter, agreeing
from ltsearch.search.records import TrialRecords
from ltsearch.search.ray_private import prune_aware_optuna
from ltsearch.search.rungs import BUDGETS, RUNG, RUNG_VALUE, RUNG_VALUES
from ltsearch.search.scheduler import RungScheduler

# each trial's value at the end of rung 0 and of its full run, in the order the trials start
VALUES = [(0.4, 0.45), (0.5, 0.6), (0.9, 0.95), (0.1, 0.15)]


def _define(trial):  # (module level: Tune pickles the searcher with its space)
    trial.suggest_int("i", 0, len(VALUES) - 1)


def _search(tmp_path, wait: bool, bracket=None, values=VALUES):
    """The crafted trials one at a time, with the search's own records (trials.json): each
    trial, as it starts, notes what trials.json says of the others then (``seen-<i>.json``)."""
    from ltsearch.search.space import parse_search_file
    from ltsearch.search.tracker import Tracker

    kept = tmp_path

    def trainable(config):
        seen = {r["params"]["i"]: r["status"] for r in
                json.loads((kept / "trials.json").read_text()).values() if r["params"]["i"] != config["i"]}
        if not (kept / f"seen-{config['i']}.json").exists():  # (its first start, not a resume)
            (kept / f"seen-{config['i']}.json").write_text(json.dumps(seen))
        start = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                start = json.loads((Path(folder) / "rung.json").read_text())[RUNG] + 1
        mine = values[config["i"]]
        for k in range(start, 2):
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "rung.json").write_text(json.dumps({RUNG: k}))
                tune.report({RUNG: k, RUNG_VALUES: list(mine[:k + 1]), BUDGETS: [1, 1],
                             RUNG_VALUE: mine[k], "rung_epoch": 1, "epoch": k + 1,
                             "total_epochs": 2, "v": mine[k]},
                            checkpoint=tune.Checkpoint.from_directory(folder))

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = prune_aware_optuna()(
        space=_define, metric="v", mode="max",
        storage=optuna.storages.RDBStorage(storage), study_name="w",
        points_to_evaluate=[{"i": i} for i in range(len(VALUES))])
    limiter = SearchLimiter(searcher, 1, len(VALUES))
    records = TrialRecords(tmp_path)
    space = parse_search_file({"base": {"train": {"epochs": 2}}})
    scheduler = RungScheduler(2.0, "max", len(VALUES) if wait else None, 1, bracket, records.trials)
    tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
        metric="v", mode="max", num_samples=len(VALUES), search_alg=limiter, scheduler=scheduler),
        run_config=tune.RunConfig(name="w", storage_path=str(tmp_path / "ray"), verbose=0,
                                  callbacks=[*agreeing(limiter, scheduler),
                                             SearchCallback(records, space, Tracker())]))
    grid = tuner.fit()
    reports = {}
    for result in grid:
        history = result.metrics_dataframe
        reports[result.config["i"]] = list(zip(history["rung"], history["timestamp"]))
    study = optuna.load_study(study_name="w", storage=storage)
    told = {t.params["i"]: (t.state.name, t.intermediate_values) for t in study.trials}
    (tmp_path / "study.json").write_text(json.dumps({t.params["i"]: [
        t.datetime_start.timestamp(), t.datetime_complete.timestamp()] for t in study.trials}))
    return reports, told, {r["params"]["i"]: r for r in records.trials.values()}


def _seen(tmp_path, i: int) -> dict:
    return {int(k): v for k, v in json.loads((tmp_path / f"seen-{i}.json").read_text()).items()}


def test_a_waiting_trial_goes_on_once_in_for_good_and_stops_once_out_for_good(ray_local, tmp_path):
    """Four trials, η 2: the best two of rung 0 go on. Trial 0 (0.4) and trial 1 (0.5) wait,
    three trials still to come; trial 2 (0.9) ends it with at most one to come: in for good,
    and trial 0, two below, out for good; trial 3 (0.1) is out at once, and settles trial 1 in."""
    reports, told, records = _search(tmp_path, wait=True)
    assert {i: state for i, (state, _) in told.items()} == {
        0: "PRUNED", 1: "COMPLETE", 2: "COMPLETE", 3: "PRUNED"}
    assert told[0][1] == {0: 0.4} and told[3][1] == {0: 0.1}
    assert [r for r, _ in reports[0]] == [0] and [r for r, _ in reports[3]] == [0]
    assert [r for r, _ in reports[1]] == [0, 1]  # rung 0 once: resumed at its next rung
    assert reports[1][1][1] >= reports[3][0][1]  # (Tune's timestamps: whole seconds)
    # trials.json said so while they waited (no worker, not RUNNING), and ended as the study did
    assert _seen(tmp_path, 1) == {0: "WAITING"}
    assert _seen(tmp_path, 2) == {0: "WAITING", 1: "WAITING"}
    assert _seen(tmp_path, 3) == {0: "PRUNED", 1: "WAITING", 2: "COMPLETED"}
    assert {i: r["status"] for i, r in records.items()} == {
        0: "PRUNED", 1: "COMPLETED", 2: "COMPLETED", 3: "PRUNED"}
    # a trial that went on kept its first start (the order trials began); the time it held no
    # worker is counted apart: from its rung's end to its next start, or to its stop
    assert [i for i, _ in sorted(records.items(), key=lambda x: x[1]["started_at"])] == [0, 1, 2, 3]
    assert records[0]["waited_s"] > 0 and records[1]["waited_s"] > 0
    assert records[2]["waited_s"] == 0 and records[3]["waited_s"] == 0
    rung_end = {i: reports[i][0][1] for i in (0, 1)}
    assert records[1]["waited_s"] <= reports[1][1][1] - rung_end[1] + 1
    assert records[0]["waited_s"] <= records[0]["ended_at"] - rung_end[0] + 1


def test_decided_at_once_the_first_trial_meets_an_empty_rung_and_runs_to_its_end(ray_local, tmp_path):
    """``wait: false``: on the values so far trial 0 is alone at rung 0 and trains its full run,
    though three of four end the rung better; trial 1 is in, trial 3 out, at once."""
    reports, told, records = _search(tmp_path, wait=False)
    assert {i: state for i, (state, _) in told.items()} == {
        0: "COMPLETE", 1: "COMPLETE", 2: "COMPLETE", 3: "PRUNED"}
    assert _seen(tmp_path, 2) == {0: "COMPLETED", 1: "COMPLETED"}  # none waited
    assert all(r["waited_s"] == 0 for r in records.values())


def test_in_brackets_of_two_the_study_learns_the_first_two_before_the_third_starts(ray_local, tmp_path):
    """Brackets of 2: trial 0 (0.4) waits for trial 1 (0.5), which then goes on at once and
    trial 0 is PRUNED, before trial 2 is asked for (ranked among all four, both would still
    wait: two more may beat them). Trials 2 (0.9) and 3 (0.1) are ranked among all four."""
    reports, told, records = _search(tmp_path, wait=True, bracket=2)
    assert {i: state for i, (state, _) in told.items()} == {
        0: "PRUNED", 1: "COMPLETE", 2: "COMPLETE", 3: "PRUNED"}
    assert _seen(tmp_path, 1) == {0: "WAITING"}
    assert _seen(tmp_path, 2) == {0: "PRUNED", 1: "COMPLETED"}  # (all together: both WAITING)
    assert _seen(tmp_path, 3) == {0: "PRUNED", 1: "COMPLETED", 2: "COMPLETED"}
    times = {int(i): t for i, t in json.loads((tmp_path / "study.json").read_text()).items()}
    assert times[0][1] <= times[2][0] and times[1][1] <= times[2][0]  # told before it was asked
    assert [r for r, _ in reports[1]] == [0, 1] and records[1]["waited_s"] == 0


def test_a_waiting_trial_in_for_good_goes_on_before_a_new_trial_starts(ray_local, tmp_path):
    """Brackets of 2, one at a time: trial 0 (0.5) waits for trial 1 (0.4), which ranks it in
    for good; trial 0's full run comes next, before trial 2 starts (new trials first left it
    waiting until no new trial was left: its full result, and TPE's lesson, came last)."""
    values = [(0.5, 0.55), (0.4, 0.45), (0.9, 0.95), (0.1, 0.15)]
    reports, told, records = _search(tmp_path, wait=True, bracket=2, values=values)
    assert {i: state for i, (state, _) in told.items()} == {
        0: "COMPLETE", 1: "PRUNED", 2: "COMPLETE", 3: "PRUNED"}
    assert _seen(tmp_path, 1) == {0: "WAITING"}
    assert _seen(tmp_path, 2) == {0: "COMPLETED", 1: "PRUNED"}
    assert [r for r, _ in reports[0]] == [0, 1] and records[0]["waited_s"] > 0

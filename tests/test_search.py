"""The search with real Ray (local, session fixture), real Optuna and real MLflow (sqlite)."""
import json

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import fresh_store, tiny_search
from ltsearch.cli import main
from ltsearch.runconfig import config_origin
from ltsearch.search.run import run_search
from ltsearch.search.space import parse_search_file


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    """8 trials over ce / reweight / feature_aug with ASHA; lr 1e30 makes some trials diverge
    (a real fault, not a mock)."""
    tmp = tmp_path_factory.mktemp("search")
    data = tiny_search(
        train={"lr": {"choice": [0.005, 0.01, 0.03, 1.0e+30]}},
        method={"ce": {}, "reweight": {"weights.scheme": {"choice": ["sqrt", "effective"]},
                                       "weights.beta": {"uniform": [0.9, 0.99],
                                                        "when": {"weights.scheme": "effective"}}},
                "feature_aug": {"stage2": {"tau_s": {"uniform": [0.6, 0.8]},
                                           "tau_g": {"uniform": [0.1, 0.3]},
                                           "k": {"int": [1, 3]}, "epochs": 1}}})
    data["search"].update(num_samples=8, max_concurrent=1)  # sequential: ASHA sees a fixed order
    space = parse_search_file(data)
    uri = fresh_store(tmp)
    outcome = run_search(space, name="tiny", storage=tmp / "searches", tracking_uri=uri, verbose=0)
    return outcome, space, tmp


def test_a_ray_the_search_joined_stays_up(search, ray_local):
    """The driver shuts down only a Ray it started itself (before the records close); a caller's
    instance is left as it was."""
    assert ray_local.is_initialized()


def test_resuming_a_finished_search_starts_nothing(search, capsys):
    """Every trial has ended: `--resume` closes the records again and prints the summary, without
    Ray (it restored Tune's experiment and waited on Ray's start for nothing)."""
    outcome, space, tmp = search
    ray_files = {p: p.stat().st_mtime_ns for p in (outcome.folder / "ray").rglob("*") if p.is_file()}
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    again = run_search(space, name="tiny", storage=tmp / "searches", tracking_uri=uri, resume=True)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"search tiny: its 8 trials have all ended, in {outcome.folder}: nothing to resume")
    assert {p: p.stat().st_mtime_ns for p in (outcome.folder / "ray").rglob("*") if p.is_file()} == ray_files
    assert again.leaderboard == outcome.leaderboard and again.ending == "finished"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id])
    assert "RUNNING" not in {r.info.status for r in runs}


def test_a_resumed_search_keeps_the_trial_count_it_started_with(search, tmp_path, capsys):
    """Tune's restored experiment runs the trials it was started with: `--resume --num-samples
    12` said "resuming 12 trials" and ran none; a search started with `--num-samples 2` and
    resumed without it said "resuming 16" (the file's), and `ltsearch confirm` found it
    unfinished for good. The folder's search.yaml holds what ran; a resume keeps it."""
    outcome, space, tmp = search
    data = yaml.safe_load((outcome.folder / "search.yaml").read_text())
    data["search"]["num_samples"] = 20  # the file edited since, or a search started with an override
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # `when` names a parameter before it
    argv = ["search", str(path), "--resume", "--storage", str(tmp / "searches"), "--name", "tiny",
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}"]
    assert main(argv + ["--num-samples", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --num-samples: 12, but the search in ")
    assert "runs 8 trials" in err
    assert main(argv) == 0  # the file's 20 gives way to the 8 it was started with
    assert capsys.readouterr().out.startswith("search tiny: its 8 trials have all ended")


def test_records_and_leaderboard(search):
    outcome, space, _ = search
    trials = outcome.records.trials
    assert len(trials) == 8
    statuses = {r["status"] for r in trials.values()}
    assert statuses <= {"COMPLETED", "PRUNED", "FAILED"} and "COMPLETED" in statuses
    for r in trials.values():
        assert r["config"]["method"]["name"] == r["method"]
        if r["status"] == "FAILED":  # diverged in its first epoch: it reported nothing
            assert r["epochs"] == 0 and r["budgets"] is None
            continue
        # rung 0 trains the whole recipe over a third of its 3 epochs (feature_aug's stage 2
        # too, at least an epoch), rung 1 the full run
        assert r["budgets"] == ([2, 4] if r["method"] == "feature_aug" else [1, 3])
        assert r["total_epochs"] == sum(r["budgets"])
        if r["status"] == "COMPLETED":
            assert r["epochs"] == r["total_epochs"] and len(r["rung_values"]) == 2
            assert r["rung_values"][-1] == r["metrics"]["val/balanced_acc"]
            assert "test/top1" in r["metrics"]
    assert "method" in outcome.leaderboard and (outcome.folder / "leaderboard.txt").is_file()
    first = sorted(trials.values(), key=lambda r: r["started_at"])[:3]  # cover_methods: each
    assert sorted(r["method"] for r in first) == ["ce", "feature_aug", "reweight"]  # method first
    assert outcome.best_config is not None and outcome.best_config.is_file()


def test_asha_stops_trials_and_optuna_lists_them_pruned(search):
    outcome, space, _ = search
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(study.trials) == 8
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "ASHA stopped no trial"
    records = outcome.records.trials
    for t in pruned:  # stopped before its last rung: told with the values of the rungs it ended
        mine = [r for r in records.values() if r["params"] == t.params and r["status"] == "PRUNED"]
        assert mine and all(r["epochs"] < r["total_epochs"] for r in mine)
        assert any(t.intermediate_values == dict(enumerate(r["rung_values"])) for r in mine)
        assert all(0 < len(r["rung_values"]) < len(r["budgets"]) for r in mine)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.intermediate_values[max(t.intermediate_values)] == t.value
                            for t in complete)
    for t in complete:  # every rung's value, the last its full run's
        mine = [r for r in records.values() if r["params"] == t.params and r["status"] == "COMPLETED"]
        assert any(t.intermediate_values == dict(enumerate(r["rung_values"])) for r in mine)
    assert sum(r["status"] == "PRUNED" for r in records.values()) == len(pruned)
    assert sum(r["status"] == "FAILED" for r in records.values()) == states.count(
        optuna.trial.TrialState.FAIL)


def test_a_trial_out_among_the_first_ends_of_its_rung_waits_and_ends_among_the_best(search):
    """A trial ranked out when it ended rung 0, among the trials that had ended it by then,
    waits paused (Tune resumes it in a new worker) instead of stopping, and reaches its end if
    it ranks among the best ⌈n/η⌉ of all the trials that ended the rung; the others stop then,
    PRUNED in the records and in Optuna."""
    import math

    outcome, space, _ = search
    records = outcome.records.trials
    eta = space.settings.asha.reduction_factor

    def reports(trial_id):
        folder = next((outcome.folder / "ray").glob(f"*{trial_id}*"))
        return [json.loads(line) for line in (folder / "result.json").read_text().splitlines()]

    ended = {k: r for k, r in records.items() if r.get("rung_values")}
    order = sorted(ended, key=lambda k: reports(k)[0]["timestamp"])  # as they ended rung 0
    value = {k: ended[k]["rung_values"][0] for k in order}
    cut = sorted(value.values(), reverse=True)[math.ceil(len(order) / eta) - 1]
    waited = []
    for i, k in enumerate(order):
        among = [value[j] for j in order[:i + 1]]
        out_then = sum(v > value[k] for v in among) >= math.ceil(len(among) / eta)
        if value[k] >= cut:  # among the best of all (ties go on together): it reached its end
            assert records[k]["status"] == "COMPLETED", (k, value, order)
            if out_then:
                waited.append(k)
        else:
            assert records[k]["status"] == "PRUNED"
            assert records[k]["epochs"] < records[k]["total_epochs"]
    # decided at once, a trial that was out then had stopped for good: here one waited
    assert waited, f"no trial waited (order {order}, values {value}): the test shows nothing"
    for k in waited:  # one at a time: its full run came after the next trial's first rung
        full = [r for r in reports(k) if r["rung"] == 1]
        assert full and all(full[0]["timestamp"] > reports(j)[0]["timestamp"]
                            for j in order[order.index(k) + 1:order.index(k) + 2])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    states = {json.dumps(t.params, sort_keys=True): t.state for t in study.trials}
    for k in waited:
        assert states[json.dumps(records[k]["params"], sort_keys=True)] == optuna.trial.TrialState.COMPLETE


def _child_runs(outcome, where: str = ""):
    """The client and the trial runs under the search's parent run (``where``: more filter)."""
    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_run(outcome.parent_run_id).info.experiment_id
    return client, client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'" + where)


def test_failed_trial_is_marked_and_search_completes(search):
    outcome, _, _ = search
    failed = [r for r in outcome.records.trials.values() if r["status"] == "FAILED"]
    assert failed, "no trial diverged (lr 1e30 was never drawn)"
    assert all(r["config"]["train"]["lr"] == 1e30 for r in failed)
    assert all("non-finite training loss" in (r["error"] or "") for r in failed)
    client, runs = _child_runs(outcome, " and attributes.status = 'FAILED'")
    assert sorted(r.data.tags["ltsearch.trial_id"] for r in runs) == sorted(r["trial_id"] for r in failed)
    assert all("non-finite training loss" in r.data.tags["error"] for r in runs)
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"


def test_mlflow_parent_and_child_runs(search):
    outcome, _, _ = search
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    exp = parent.info.experiment_id
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search.yaml", "leaderboard.txt", "best_config.yaml", "trials.csv"} <= parent_artifacts
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 8
    assert not client.search_runs([exp], "attributes.status = 'RUNNING'")
    by_trial = {c.data.tags["ltsearch.trial_id"]: c for c in children}
    for trial_id, record in outcome.records.trials.items():
        run = by_trial[trial_id]
        expected = {"COMPLETED": "FINISHED", "PRUNED": "KILLED", "FAILED": "FAILED"}[record["status"]]
        assert run.info.status == expected
        assert run.data.params["method.name"] == record["method"] == run.data.tags["method"]
        # a trial its rungs paused was tagged so (MLflow has no paused status), until it went on
        assert run.data.tags.get("ltsearch.waiting") == ("false" if record["waited_s"] else None)
        assert float(run.data.params["train.lr"]) == record["config"]["train"]["lr"]
        if record["method"] == "reweight":
            scheme = record["config"]["method"]["weights"]["scheme"]
            assert run.data.params["method.weights.scheme"] == scheme
            beta = float(run.data.params["method.weights.beta"])
            assert (beta != 0.9999) == (scheme == "effective")  # sampled only for effective
        if record["status"] != "FAILED":
            history = client.get_metric_history(run.info.run_id, "val/balanced_acc")
            assert sorted(m.step for m in history) == list(range(1, record["epochs"] + 1))
            rungs = client.get_metric_history(run.info.run_id, "rung/value")  # at each rung's end
            ends = [sum(record["budgets"][:k + 1]) for k in range(len(record["rung_values"]))]
            assert [(m.step, m.value) for m in sorted(rungs, key=lambda m: m.step)] == list(
                zip(ends, record["rung_values"]))
        if record["status"] == "COMPLETED":
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.yaml", "per_class_accuracy.csv", "per_class_accuracy.svg",
                    "confusion_matrix.svg"} <= names


def test_export_and_train_reproduce_the_best_trial(search, tmp_path):
    outcome, space, _ = search
    out = tmp_path / "export"
    assert main(["export", str(outcome.folder), "--top", "2", "--out", str(out)]) == 0
    configs = sorted(out.glob("top*.yaml"))
    assert configs and configs[0].name.startswith("top1_")
    assert (out / "trials.csv").read_text().count("\n") == 9
    best = outcome.records.ranked("val/balanced_acc", "max")[0]
    assert config_origin(configs[0]) == {"ltsearch.search_dir": str(outcome.folder.resolve()),
                                         "ltsearch.trial_id": best["trial_id"]}  # (its header)
    assert config_origin(outcome.folder / "best_config.yaml")["ltsearch.trial_id"] == best["trial_id"]
    assert main(["train", str(configs[0]), "--out", str(tmp_path / "repro"), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "repro" / "metrics.json").read_text())["metrics"]
    assert metrics["val/balanced_acc"] == pytest.approx(best["metrics"]["val/balanced_acc"], abs=1e-9)


def test_feature_aug_trials_and_runs(search):
    outcome, _, _ = search
    client, runs = _child_runs(outcome, " and tags.method = 'feature_aug'")
    assert runs
    for r in runs:
        assert float(r.data.params["method.stage2.tau_g"]) < float(r.data.params["method.stage2.tau_s"])
        assert "method.stage2.k" in r.data.params
        if r.info.status == "FINISHED":
            assert "stage1/test/top1" in r.data.metrics and "test/top1" in r.data.metrics


def test_bbn_trials_with_different_schedules(ray_local, tmp_path):
    data = tiny_search(method={
        "bbn": {"arch.schedule": {"choice": ["parabolic_decay", "cosine_decay", "beta", "equal"]},
                "arch.beta_a": {"uniform": [0.2, 1.0], "when": {"arch.schedule": "beta"}}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=4, asha={"enabled": False})
    outcome = run_search(parse_search_file(data), name="bbn", storage=tmp_path / "s",
                         tracking_uri=fresh_store(tmp_path), verbose=0)
    client, runs = _child_runs(outcome)
    assert len(runs) == 4 and all(r.data.tags["method"] == "bbn" for r in runs)
    assert all(r.info.status == "FINISHED" for r in runs)
    schedules = {r.data.params["method.arch.schedule"] for r in runs}
    assert len(schedules) >= 2
    for r in runs:
        sampled = float(r.data.params["method.arch.beta_a"]) != 0.2  # the default unless sampled
        assert sampled == (r.data.params["method.arch.schedule"] == "beta")
        history = client.get_metric_history(r.info.run_id, "alpha")
        assert len(history) == 2
        if r.data.params["method.arch.schedule"] == "parabolic_decay":
            assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([0.75, 0.0])


def test_search_over_parts_names_composed_trials(ray_local, tmp_path):
    data = tiny_search(method={"custom": {
        "loss.name": {"choice": ["ldam", "balanced_softmax"]},
        "weights.start": {"choice": ["never", 0.5]},
        "stage2.name": {"choice": ["none", "lws"]},
        "stage2.epochs": {"choice": [1], "when": {"stage2.name": "lws"}}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=3, asha={"enabled": False})
    outcome = run_search(parse_search_file(data), name="parts", storage=tmp_path / "s",
                         tracking_uri=fresh_store(tmp_path), verbose=0)
    client, runs = _child_runs(outcome)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        p = r.data.params
        words = [p["method.loss.name"]]
        if p["method.weights.start"] == "0.5":
            words.append("drw")
        if "method.stage2.name" in p:  # a stage 2 (none: the param "method.stage2" is None)
            words.append(p["method.stage2.name"])
        label = "+".join(words)
        assert r.data.tags["method"] == label  # named by its parts
        record = outcome.records.trials[r.data.tags["ltsearch.trial_id"]]
        assert record["method"] == label and record["epochs"] == (3 if "lws" in label else 2)
        assert label in outcome.leaderboard


def _reports(folder) -> dict:
    """Ray's per-trial reports (result.json), by trial id."""
    out = {}
    for f in (folder / "ray").glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        out[rows[0]["trial_id"]] = rows
    return out


def test_a_reused_worker_gives_the_same_results_as_a_fresh_one(ray_local, tmp_path):
    """Three trials of one config, one at a time: the first in a fresh worker process, the next
    two in the same process after it. Model, optimiser and randomness start afresh each time,
    so every epoch's numbers are equal to the last bit."""
    data = tiny_search(method={"mixup_drw": {}})  # no parameters: every trial the same config
    data["search"].update(num_samples=3, max_concurrent=1, asha={"enabled": False}, tracking="none")
    outcome = run_search(parse_search_file(data), name="reuse", storage=tmp_path, verbose=0)
    reports = _reports(outcome.folder)
    assert len(reports) == 3
    assert len({rows[0]["pid"] for rows in reports.values()}) == 1  # one worker ran all three
    numbers = [[{k: v for k, v in r.items() if ("/" in k and not k.startswith("time/")) or k == "lr"}
                for r in rows] for rows in reports.values()]
    assert len(numbers[0]) == 3 and numbers[0][-1]["test/top1"] > 0.5
    assert numbers[0] == numbers[1] == numbers[2]


def test_a_resumed_scheduler_holds_the_rungs_the_records_hold(search):
    """Tune restores its scheduler as created, empty; the search's is rebuilt from trials.json,
    so a trial after a resume is judged against every rung value recorded before it."""
    from ray.tune.schedulers import TrialScheduler

    from ltsearch.search.run import make_scheduler
    from ltsearch.search.rungs import BUDGETS, RUNG_VALUES

    outcome, space, _ = search
    records = outcome.records.trials
    ended = {k: r["rung_values"] for k, r in records.items() if r.get("rung_values")}
    assert len(ended) >= 3
    restored = make_scheduler(space.settings, records)
    assert restored.rungs.values[0] == {k: v[0] for k, v in ended.items()}
    low = {RUNG_VALUES: [min(v[0] for v in ended.values()) - 0.01], BUDGETS: [1, 3]}
    late = type("T", (), {"trial_id": "late"})()
    assert restored.on_trial_result(None, late, low) == TrialScheduler.STOP
    assert make_scheduler(space.settings, {}).on_trial_result(None, late, low) == TrialScheduler.CONTINUE

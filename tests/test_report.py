"""Confirmation with fresh seeds, the report page in a real browser, multi-objective searches
and the Pareto set: real Ray, Optuna and MLflow, real Chromium (Debian's chromium and
chromium-driver; `.ci/run` installs them and requires this test)."""
import json
import os
import shutil
import statistics
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_port, fresh_store, tiny_search
from ltsearch.cli import main
from ltsearch.config import ConfigError
from ltsearch.search.records import TrialRecords, pareto_front
from ltsearch.search.report import FIGURES, REPORT_PAGE
from ltsearch.search.run import run_search
from ltsearch.search.space import parse_search_file

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def confirmed(ray_local, tmp_path_factory):
    """Five trials over ce / logit_adjust / reweight with ASHA, then the best config again with
    two fresh seeds (search.confirm)."""
    tmp = tmp_path_factory.mktemp("confirmed")
    data = tiny_search(train={"lr": {"loguniform": [0.005, 0.05]}},
                       method={"ce": {}, "logit_adjust": {"loss.tau": {"uniform": [0.5, 1.5]}},
                               "reweight": {}})
    data["search"].update(num_samples=5, confirm={"top": 1, "seeds": 2}, report=True)
    space = parse_search_file(data)
    uri = fresh_store(tmp)
    outcome = run_search(space, name="conf", storage=tmp / "searches", tracking_uri=uri)
    return outcome, space, tmp


def _confirmations(records: TrialRecords) -> list[dict]:
    return [r for r in records.trials.values() if r.get("confirm_of")]


def test_the_best_config_is_retrained_with_fresh_seeds(confirmed):
    outcome, space, _ = confirmed
    records = TrialRecords(outcome.folder)
    best = records.ranked("val/balanced_acc", "max")[0]
    runs = _confirmations(records)
    assert len([r for r in records.trials.values() if not r.get("confirm_of")]) == 5
    assert len(runs) == 2 and {r["confirm_of"] for r in runs} == {best["trial_id"]}
    own = best["config"]["seed"]
    assert sorted(r["seed"] for r in runs) == [own + 1, own + 2]
    for r in runs:  # the same config but the seed, to its full budget, no scheduler
        assert r["status"] == "COMPLETED" and r["epochs"] == r["total_epochs"] == 3
        assert r["config"] == {**best["config"], "seed": r["seed"]}
        assert r["method"] == best["method"]
    losses = [r["metrics"]["train/loss"] for r in runs]
    assert losses[0] != losses[1]  # the seeds change the run

    values = [r["metrics"]["val/balanced_acc"] for r in runs]
    shown = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} (2)"
    line = next(line for line in outcome.leaderboard.splitlines() if best["trial_id"] in line)
    assert line.endswith(shown) and "confirmed mean ± std" in outcome.leaderboard
    assert (outcome.folder / "leaderboard.txt").read_text().strip() == outcome.leaderboard
    assert yaml.safe_load(outcome.best_config.read_text()) == best["config"]

    study = optuna.load_study(study_name="conf", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert len(study.trials) == 5  # confirmation runs are not proposals

    client = MlflowClient(outcome.tracking_uri)
    exp = client.get_run(outcome.parent_run_id).info.experiment_id
    tagged = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}' "
                                       "and tags.`ltsearch.role` = 'confirmation'")
    assert sorted(r.data.tags["ltsearch.trial_id"] for r in tagged) == sorted(r["trial_id"] for r in runs)
    for run in tagged:
        assert run.info.status == "FINISHED"
        assert run.data.tags["ltsearch.confirm_of"] == best["trial_id"]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/balanced_acc")] == [1, 2, 3]


def test_confirm_command_runs_only_what_is_missing(confirmed, capsys):
    outcome, _, _ = confirmed
    before = {r["trial_id"] for r in _confirmations(TrialRecords(outcome.folder))}
    ranked = TrialRecords(outcome.folder).ranked("val/balanced_acc", "max")
    assert main(["confirm", str(outcome.folder), "--top", "2", "--seeds", "2"]) == 0
    records = TrialRecords(outcome.folder)
    runs = _confirmations(records)
    assert before <= {r["trial_id"] for r in runs}
    assert len(runs) == 2 * min(2, len(ranked))
    assert {r["confirm_of"] for r in runs} == {r["trial_id"] for r in ranked[:2]}
    confirmed_means = records.confirmed("val/balanced_acc", "max")
    best = yaml.safe_load((outcome.folder / "best_config.yaml").read_text())
    assert best == records.trials[confirmed_means[0]["trial_id"]]["config"]  # best confirmed mean
    out = capsys.readouterr().out
    assert f"{len(runs)} confirmation runs ({len(runs)} completed)" in out
    assert out.startswith(f"search conf: confirmation runs, 1 at a time, in {outcome.folder}; on the "
                          "Ray already running\nconfirming the 2 best configs with 2 fresh seeds each: ")

    assert main(["confirm", str(outcome.folder), "--top", "2", "--seeds", "2"]) == 0
    assert len(_confirmations(TrialRecords(outcome.folder))) == len(runs)  # nothing new to run
    out = capsys.readouterr().out  # and no Ray (a local one took ~10 s to start for nothing)
    assert out.splitlines()[0] == ("search conf: confirming the 2 best configs with 2 fresh seeds "
                                   f"each: every run has ended, in {outcome.folder}: nothing to run")
    assert f"{len(runs)} confirmation runs ({len(runs)} completed)" in out


@pytest.mark.parametrize("argv, key", [
    (["confirm", "{folder}", "--top", "0"], "--top"),
    (["confirm", "{folder}", "--seeds", "0"], "--seeds"),
    (["confirm", "{missing}"], "search_dir"),
    (["search", "{space}", "--confirm", "3"], "--confirm"),
    (["export", "{folder}", "--pareto", "--out", "{missing}"], "--pareto"),
])
def test_bad_confirm_and_pareto_input_exits_2_naming_it(confirmed, tmp_path, capsys, argv, key):
    outcome, space, _ = confirmed
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(space.source))
    values = {"folder": str(outcome.folder), "missing": str(tmp_path / "nowhere"), "space": str(path)}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key}") and len(err.strip().splitlines()) == 1, err


def test_confirm_flag_reads_top_and_seeds():
    from ltsearch.search.command import parse_confirm

    assert parse_confirm("3:5") == {"top": 3, "seeds": 5} and parse_confirm(None) is None
    for bad in ("3", "3:", "a:b", "1:2:3", "-1:2"):
        with pytest.raises(ConfigError, match="must be TOP:SEEDS"):
            parse_confirm(bad)


def _open_in_chromium(page, tmp_path):
    """The page in headless Chromium: what its images did and what it logged."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(page.as_uri())
        driver.execute_async_script(  # every image decoded (or failed) before we look
            "const done = arguments[0];"
            "Promise.all([...document.images].map(i => i.decode().catch(() => null))).then(done);")
        images = driver.execute_script(
            "return [...document.images].map(i => ({alt: i.alt, complete: i.complete, "
            "width: i.naturalWidth, height: i.naturalHeight}));")
        headings = driver.execute_script("return [...document.querySelectorAll('h2')].map(h => h.textContent);")
        rows = driver.execute_script(
            "return [...document.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.textContent));")
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        return images, headings, rows, errors
    finally:
        driver.quit()


def _browser_or_skip():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("LTSEARCH_BROWSER_TESTS") == "required":
            pytest.fail("Chromium and chromedriver are required here (apt-get install chromium chromium-driver)")
        pytest.skip("no Chromium: apt-get install chromium chromium-driver")


def test_the_report_opens_in_a_real_browser_with_every_figure(confirmed, tmp_path):
    _browser_or_skip()
    outcome, _, _ = confirmed
    page = outcome.folder / REPORT_PAGE
    assert outcome.report == page and page.is_file()
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: opens offline
    images, headings, rows, errors = _open_in_chromium(page, tmp_path)
    assert errors == []
    assert headings == ["Leaderboard", "Head vs tail", "Learning curves", "Per-class accuracy",
                        "Which parameters mattered", "Time spent"]
    assert len(images) == 5 and all(i["complete"] and i["width"] > 300 and i["height"] > 100
                                    for i in images), images
    records = TrialRecords(outcome.folder)
    board = records.leaderboard("val/balanced_acc", "max")
    assert [r[0] for r in rows] == [r["method"] for r in board]
    for row, r in zip(rows, board):
        assert row[2] == r["trial_id"]
        assert float(row[5]) == pytest.approx(r["metrics"]["val/balanced_acc"], abs=5e-4)
    confirmed_cells = [row[-1] for row in rows if "±" in row[-1]]
    assert confirmed_cells and all(c.endswith("(2)") for c in confirmed_cells)

    # The same checks catch a broken figure and a script error (they can fail).
    broken = tmp_path / "broken.html"
    head, tail = html.split("base64,", 1)
    broken.write_text(head + "base64,AAAA" + tail[200:] + "<script>undefinedFunction()</script>")
    images, _, _, errors = _open_in_chromium(broken, tmp_path)
    assert sum(i["width"] == 0 for i in images) == 1 and errors


def test_the_search_attaches_its_page_and_figures_to_its_run(confirmed):
    """Where Chromium is absent too: the page and each figure, as files of the parent run."""
    outcome, _, _ = confirmed
    client = MlflowClient(outcome.tracking_uri)
    assert REPORT_PAGE in [a.path for a in client.list_artifacts(outcome.parent_run_id)]
    figures = sorted(a.path for a in client.list_artifacts(outcome.parent_run_id, FIGURES))
    assert figures == sorted(f"{FIGURES}/{p.name}" for p in (outcome.folder / FIGURES).glob("*.png"))
    assert len(figures) == 5
    local = client.download_artifacts(outcome.parent_run_id, REPORT_PAGE, str(outcome.folder.parent / "dl"))
    assert Path(local).read_bytes() == (outcome.folder / REPORT_PAGE).read_bytes()


def test_pareto_front_against_hand_worked_points():
    points = [[0.9, 0.1], [0.5, 0.5], [0.4, 0.4], [0.1, 0.9], [0.5, 0.5], [0.9, 0.05]]
    assert pareto_front(points) == [0, 1, 3, 4]  # 2 is beaten by 1; 5 by 0; ties both kept
    assert pareto_front(points, maximize=False) == [2, 3, 5]  # minimised: 3 has the least first value, 5 the least second
    assert pareto_front([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]) == [0, 1]


def test_confirmed_means_choose_the_best_config(tmp_path):
    records = TrialRecords(tmp_path)

    def trial(trial_id, value, **extra):
        records.trials[trial_id] = {"trial_id": trial_id, "method": extra.pop("method", "ce"),
                                    "status": extra.pop("status", "COMPLETED"), "config": {"id": trial_id},
                                    "metrics": {"val/balanced_acc": value, "test/top1": value and value - 0.1}, **extra}

    trial("a", 0.90)  # the luckiest single run …
    trial("b", 0.85, method="reweight")
    for seed, v in ((1, 0.70), (2, 0.74), (3, 0.78)):
        trial(f"a{seed}", v, confirm_of="a", seed=seed)
    for seed, v in ((1, 0.80), (2, 0.84)):
        trial(f"b{seed}", v, confirm_of="b", seed=seed)
    trial("b3", None, confirm_of="b", seed=3, status="FAILED")
    got = records.confirmed("val/balanced_acc", "max")
    assert [c["trial_id"] for c in got] == ["b", "a"]  # … loses to the better mean
    assert got[0]["mean"] == pytest.approx(0.82) and got[0]["std"] == pytest.approx(0.0282843, abs=1e-6)
    assert got[0]["n"] == 2 and got[0]["seeds"] == [1, 2]
    assert got[1]["mean"] == pytest.approx(0.74) and got[1]["std"] == pytest.approx(0.04)
    assert records.best_config("val/balanced_acc", "max") == {"id": "b"}
    assert [r["trial_id"] for r in records.ranked("val/balanced_acc", "max")] == ["a", "b"]
    assert [r["trial_id"] for r in records.leaderboard("val/balanced_acc", "max")] == ["b", "a"]


def test_a_multi_objective_search_and_its_pareto_set(ray_local, tmp_path):
    data = tiny_search(train={"lr": {"loguniform": [0.005, 0.05]}},
                       method={"ce": {}, "logit_adjust": {"loss.tau": {"uniform": [0.5, 1.5]}},
                               "balanced_softmax": {}})
    data["search"].update(num_samples=6, objectives=["val/balanced_acc", "val/few"], tracking="none",
                          asha={"rungs": [0.5, 1.0], "reduction_factor": 2}, report=True)
    space = parse_search_file(data)
    assert space.settings.metric == "val/balanced_acc"  # ASHA and the leaderboard use the first
    outcome = run_search(space, name="mo", storage=tmp_path / "searches")
    study = optuna.load_study(study_name="mo", storage=f"sqlite:///{outcome.folder / 'optuna.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MAXIMIZE"]
    records = TrialRecords(outcome.folder)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete
    finished = {(r["metrics"]["val/balanced_acc"], r["metrics"]["val/few"])
                for r in records.trials.values() if r["status"] == "COMPLETED"}
    assert {tuple(t.values) for t in complete} == finished

    exported = tmp_path / "exported"
    assert main(["export", str(outcome.folder), "--pareto", "--out", str(exported)]) == 0
    done = [r for r in records.trials.values() if r["status"] == "COMPLETED"]
    front = {r["trial_id"] for r in done if not any(  # dominance by hand
        o["metrics"]["val/balanced_acc"] >= r["metrics"]["val/balanced_acc"]
        and o["metrics"]["val/few"] >= r["metrics"]["val/few"]
        and (o["metrics"]["val/balanced_acc"], o["metrics"]["val/few"])
        != (r["metrics"]["val/balanced_acc"], r["metrics"]["val/few"]) for o in done)}
    files = sorted(exported.glob("pareto*.yaml"))
    assert {f.stem.rsplit("_", 1)[1] for f in files} == front
    for f in files:
        assert yaml.safe_load(f.read_text()) == records.trials[f.stem.rsplit("_", 1)[1]]["config"]
    page = (outcome.folder / REPORT_PAGE).read_text()
    assert "<h2>The objectives</h2>" in page and "<h2>Head vs tail</h2>" not in page


def test_objectives_are_checked_before_anything_runs():
    for objectives, key, words in (
            (["val/balanced_acc"], "search.objectives", "two or more"),
            (["val/balanced_acc", "test/few"], "search.objectives.1", "'test/few' is not a metric"),
            (["val/few", "val/few"], "search.objectives", "twice")):
        with pytest.raises(ConfigError) as e:
            parse_search_file({"search": {"objectives": objectives}})
        assert e.value.key == key and words in e.value.message


def test_report_command_writes_the_page_and_attaches_it(confirmed, capsys, digits_data):
    outcome, _, _ = confirmed
    page = outcome.folder / REPORT_PAGE
    page.unlink()
    shutil.rmtree(outcome.folder / FIGURES)
    assert main(["report", str(outcome.folder)]) == 0
    out = capsys.readouterr().out
    assert str(page) in out and "attached to the search's run" in out
    assert page.is_file() and len(list((outcome.folder / FIGURES).glob("*.png"))) == 5
    info = json.loads((outcome.folder / "search.json").read_text())
    assert info["counts"] == digits_data.counts and info["tracking"] == "mlflow"  # the search's data


def test_the_page_is_written_when_the_tracking_server_is_down(confirmed, capsys):
    """The page needs only the folder: a tracking server that does not answer costs the
    attachment, not the page (it used to exit 2 with nothing written)."""
    outcome, _, _ = confirmed
    page = outcome.folder / REPORT_PAGE
    page.unlink()
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["report", str(outcome.folder), "--tracking-uri", dead]) == 2
    out, err = capsys.readouterr()
    assert page.is_file() and str(page) in out
    assert err.count("\n") == 1 and err.startswith("error: --tracking-uri: no MLflow server answers")
    assert "the page is written, not attached" in err and "--no-tracking" in err


def test_an_upload_that_fails_is_one_line_and_the_page_stays(confirmed, capsys):
    """The store answers but cannot keep the files (its artifact folder replaced by a file, as
    a full or read-only disk would fail it): one line saying so and how to try again, exit 1,
    the page written. MLflow's error used to end the command with a traceback."""
    outcome, _, tmp = confirmed
    page = outcome.folder / REPORT_PAGE
    page.unlink()
    store = tmp / "mlartifacts"
    store.rename(tmp / "mlartifacts.kept")
    store.write_text("not a folder")
    try:
        assert main(["report", str(outcome.folder)]) == 1
    finally:
        store.unlink()
        (tmp / "mlartifacts.kept").rename(store)
    out, err = capsys.readouterr()
    assert page.is_file() and str(page) in out and "attached" not in out
    assert err.count("\n") == 1 and err.startswith(
        f"error: the page is written; attaching it to the search's run in sqlite:///{tmp}")
    assert "NotADirectoryError" in err and f"`ltsearch report {outcome.folder}` again" in err


def test_time_spent_and_reports_from_a_folder_as_it_lies(tmp_path):
    """Per-epoch reports from Ray's result.json (a resumed trial's repeated epoch: the later
    line wins; lists only in the last report) and the slot-time account the report draws."""
    from ltsearch.search.results import SearchResults, read_reports

    data = tiny_search(method={"ce": {}})
    data["search"]["max_concurrent"] = 2
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(data))
    records = TrialRecords(tmp_path)
    records.update("a", method="ce", status="COMPLETED", config={}, metrics={}, started_at=100.0, ended_at=110.0)
    records.update("b", method="ce", status="PRUNED", config={}, metrics={}, started_at=101.0, ended_at=106.0,
                   waited_s=1.0)  # paused by its rungs for a second: no slot's time
    lines = {"a": [{"epoch": 1, "epoch_time_s": 3.0}, {"epoch": 2, "epoch_time_s": 9.9},  # re-run:
                   {"epoch": 2, "epoch_time_s": 3.0},                                      # this wins
                   {"epoch": 3, "epoch_time_s": 2.0, "time/setup_s": 0.5, "time/eval_s": 1.0,
                    "time/report_s": 0.25, "val/per_class": [1.0, 0.5]}],
             "b": [{"epoch": 1, "epoch_time_s": 2.5, "time/setup_s": 0.5, "time/eval_s": 0.5,
                    "time/report_s": 0.0, "val/per_class": [0.0, 1.0]}]}
    for trial_id, rows in lines.items():
        folder = tmp_path / "ray" / f"run_trial_{trial_id}_1"
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, **r}) + "\n" for r in rows))
    reports = read_reports(tmp_path)
    assert [r["epoch_time_s"] for r in reports["a"]] == [3.0, 3.0, 2.0]
    assert "val/per_class" in reports["a"][-1] and reports["b"][-1]["val/per_class"] == [0.0, 1.0]

    spent = SearchResults.load(tmp_path).time_spent()
    assert spent["span_s"] == 10.0 and spent["slot_s"] == 20.0  # 100 → 110, 2 slots
    parts = spent["parts"]
    assert parts["training"] == 10.5 and parts["evaluation"] == 1.5
    assert parts["data + trainer build"] == 1.0 and parts["checkpoints + reports"] == 0.25
    assert parts["worker start + scheduling"] == pytest.approx((10 - 9.75) + (4 - 3.5))
    assert parts["idle slots"] == pytest.approx(20 - 14)  # the trials' own 14 s of the 20
    assert spent["efficiency"] == pytest.approx(10.5 / 20)
    assert spent["median_fixed_s"] == pytest.approx(statistics.median([10 - 8.0, 4 - 2.5]))


def test_the_reports_imports_start_once_a_slot_stays_free_until_the_end():
    """16 trials on 2 slots: while two or more are left to end, both slots may yet be busy;
    once one is left, a slot stays free, and the report's imports (seconds of CPU) run there."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from ltsearch.search.callbacks import ReportPreload

    trials = ([SimpleNamespace(status=Trial.TERMINATED) for _ in range(13)]
              + [SimpleNamespace(status=Trial.RUNNING) for _ in range(3)])
    preload = ReportPreload(total=16, slots=2)
    preload.on_trial_complete(0, trials, trials[13])  # 14 ended: 2 left
    assert not preload.started
    trials[13].status = Trial.TERMINATED
    preload.on_trial_error(0, trials, trials[14])  # 15 ended: 1 left, a slot is free for good
    assert preload.started

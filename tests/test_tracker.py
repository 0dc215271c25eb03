"""The tracker interface: the driver's calls reach a tracker in order, off Tune's event loop,
without losing one; tracking can be turned off."""
import io
import json
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import tiny_search
from ltsearch.search.tracker import BackgroundTracker, Tracker


class ListTracker(Tracker):
    """Keeps every call, as a list: the simplest tracker besides none."""

    def __init__(self, fail_on=None):
        self.calls, self.threads, self.fail_on = [], set(), fail_on

    def _keep(self, *call):
        self.threads.add(threading.current_thread().name)
        if call[0] == self.fail_on:
            raise ConnectionError(f"{call[0]} lost")
        self.calls.append(call)

    def start_trial(self, trial_id, label, config, tags=None):
        self._keep("start_trial", trial_id)

    def log(self, trial_id, step, metrics):
        self._keep("log", trial_id, step)

    def end_trial(self, trial_id, status, config, result, error=None):
        self._keep("end_trial", trial_id, status, error)

    def end_search(self, ending, artifacts):
        self._keep("end_search", ending)


def test_background_tracker_runs_every_call_in_order_on_its_own_thread():
    inner = ListTracker()
    tracker = BackgroundTracker(inner)
    tracker.start_trial("a", "ce", {})
    for step in range(1, 51):
        tracker.log("a", step, {"val/top1": step / 50})
    tracker.end_trial("a", "FAILED", {}, {}, "boom")
    tracker.end_search("failed", [])
    assert inner.calls == [("start_trial", "a"), *[("log", "a", s) for s in range(1, 51)],
                           ("end_trial", "a", "FAILED", "boom"), ("end_search", "failed")]
    assert inner.threads == {"tracker", threading.current_thread().name}  # end_search: the caller's


def test_a_failed_tracking_call_reaches_the_caller_and_the_search_is_still_closed():
    inner = ListTracker(fail_on="log")
    tracker = BackgroundTracker(inner)
    tracker.start_trial("a", "ce", {})
    tracker.log("a", 1, {})
    with pytest.raises(ConnectionError, match="log lost"):
        tracker.drain()
    with pytest.raises(ConnectionError, match="log lost"):  # as a direct call would have
        tracker.log("a", 2, {})
    tracker.end_search("failed", [])
    assert inner.calls == [("start_trial", "a"), ("end_search", "failed")]


def test_a_search_with_tracking_off_records_only_its_folder_and_talks_quietly(tmp_path):
    """Tracking off; the output a person reads: a line per trial event, a progress line after
    each trial's end, the leaderboard saying which shot split it uses — no Tune tables."""
    data = tiny_search(method={"ce": {}, "balanced_softmax": {}})
    data["search"].update(num_samples=2, asha={"enabled": False})
    data["base"]["train"].update(epochs=2, metrics={"groups": "thirds"})
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    out = subprocess.run([str(Path(sys.executable).parent / "ltsearch"), "search", str(path),
                          "--no-tracking"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    trials = json.loads((tmp_path / "searches" / "s" / "trials.json").read_text())
    assert sorted(r["status"] for r in trials.values()) == ["COMPLETED", "COMPLETED"]
    assert all(r["metrics"]["val/balanced_acc"] is not None for r in trials.values())
    assert (tmp_path / "searches" / "s" / "best_config.yaml").is_file()
    assert not list(tmp_path.glob("mlflow*")) and "tracking: off" in out.stdout
    stored = yaml.safe_load((tmp_path / "searches" / "s" / "search.yaml").read_text())
    assert stored["search"]["tracking"] == "none"  # what ran (--no-tracking), not the file
    assert "MLflow" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    folder = (tmp_path / "searches" / "s").resolve()  # said once the checks passed, before Ray
    assert lines[0] == f"search s: 2 trials over 2 methods, 1 at a time, in {folder}; starting a local Ray"
    for trial_id in trials:
        assert sum(line.startswith(f"started  {trial_id}") for line in lines) == 1
        assert sum(line.startswith(f"finished {trial_id}  after 2 of 2 epochs  val/balanced_acc")
                   for line in lines) == 1
    assert any("2/2 trials" in line and "best" in line for line in lines)
    assert "many/medium/few: thirds of the classes by training count (4/3/3 classes)" in lines
    assert len(lines) < 25 and "╭" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_an_artifact_store_that_cannot_be_written_leaves_no_run_open(tmp_path, caplog):
    """The store's runs are written but its artifacts cannot be (a file where the artifact
    folder should be: a full or read-only disk looks the same to MLflow). Trials' artifacts
    were already guarded; the search's were not, and the failed upload left the search's run
    and its unfinished trials RUNNING."""
    from mlflow.tracking import MlflowClient

    from ltsearch.search.tracking import MLflowTracker

    (tmp_path / "mlartifacts").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker.checked(uri, "ltsearch", ["0", "1"], [10, 1])
    folder = tmp_path / "search"
    folder.mkdir()
    (folder / "leaderboard.txt").write_text("ce 0.5\n")
    tracker.start_search(folder, "s", {"search.seed": 0})
    for trial_id in ("done", "cut"):
        tracker.start_trial(trial_id, "ce", {"lr": 0.1})
        tracker.log(trial_id, 1, {"val/top1": 0.5})
    tracker.end_trial("done", "COMPLETED", {"lr": 0.1}, {"val/per_class": [0.5, 0.5]})
    with caplog.at_level("WARNING"):
        tracker.end_search("finished", [folder / "leaderboard.txt"])
    client = MlflowClient(uri)
    runs = {r.data.tags.get("ltsearch.trial_id", "search"): r.info.status
            for r in client.search_runs([tracker.exp_id])}
    assert runs == {"search": "FINISHED", "done": "FINISHED", "cut": "KILLED"}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("the search's files were not attached to its MLflow run")
               and str(folder) in m for m in warned), warned


def test_the_progress_lines_best_is_a_full_runs_and_before_any_the_best_first_rung(tmp_path):
    """A trial stopped at its first rung and one at its full run's end are not compared: the
    best is the best full run's; before any has ended, the best first-rung value so far, a
    waiting trial's included (it said a pruned 0.560 while a waiting trial held 0.650)."""
    from ltsearch.search.callbacks import ProgressCallback
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.space import parse_search_file

    space = parse_search_file(tiny_search(method={"ce": {}}))
    records = TrialRecords(tmp_path)
    progress = ProgressCallback(records, space, out=io.StringIO(), began=0.0, clock=lambda: 0.0)
    assert progress._bar().endswith("0/6 trials · 0:00")
    records.update("p", method="ce", status="PRUNED", rung_values=[0.56], metrics={"val/balanced_acc": 0.56})
    records.update("w", method="ce", status="WAITING", rung_values=[0.65], metrics={"val/balanced_acc": 0.65})
    records.update("r", method="ce", status="RUNNING", rung_values=[], metrics={"val/balanced_acc": 0.9})
    assert progress._bar().endswith("1/6 trials · 0:00 · best first rung 0.650 (ce w)")
    records.update("c", method="ce", status="COMPLETED", rung_values=[0.5, 0.6],
                   metrics={"val/balanced_acc": 0.6})
    assert progress._bar().endswith("2/6 trials · 0:00 · best 0.600 (ce c)")


def test_the_progress_line_counts_from_the_command_start_and_estimates_from_the_trials(tmp_path):
    """The clock is the user's wait, from the command's start (Ray's start included); what is
    left, from how fast trials have ended since this driver's first trial started. It counted
    from Tune's set-up and left out the first trial to end, and jumped: at 2 of 16 trials it
    said 2:57 left, at 3 of 16 1:38."""
    from ltsearch.search.callbacks import ProgressCallback
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.space import parse_search_file

    space = parse_search_file(tiny_search(method={"ce": {}}))  # 6 trials
    records = TrialRecords(tmp_path)
    now = [0.0]

    def start(progress, trial_id):
        records.update(trial_id, method="ce", config={}, status="RUNNING", epochs=0, metrics={})
        progress.on_trial_start(0, [], SimpleNamespace(trial_id=trial_id, config={"method": "ce"}))

    def end(progress, trial_id, value):
        records.update(trial_id, status="COMPLETED", epochs=3, metrics={"val/balanced_acc": value})
        progress.on_trial_complete(0, [], SimpleNamespace(trial_id=trial_id, last_result={
            "epoch": 3, "total_epochs": 3, "val/balanced_acc": value}))
        return progress.out.getvalue().splitlines()[-1]

    progress = ProgressCallback(records, space, out=io.StringIO(), began=-10.0, clock=lambda: now[0])
    now[0] = 5.0  # Ray and Tune took 15 s: the first trials start
    start(progress, "a")
    start(progress, "b")
    now[0] = 25.0
    assert end(progress, "a", 0.5) == "[###.................] 1/6 trials · 0:35 · ~1:40 left · best 0.500 (ce a)"
    now[0] = 35.0
    assert end(progress, "b", 0.75) == "[######..............] 2/6 trials · 0:45 · ~1:00 left · best 0.750 (ce b)"

    # resumed by another driver: the trials that ended before it do not speed up its estimate
    now[0] = 100.0
    resumed = ProgressCallback(records, space, out=io.StringIO(), began=90.0, clock=lambda: now[0])
    now[0] = 104.0
    start(resumed, "c")
    now[0] = 114.0
    assert end(resumed, "c", 0.25) == "[##########..........] 3/6 trials · 0:24 · ~0:30 left · best 0.750 (ce b)"
    now[0] = 120.0
    assert end(resumed, "d", 0.25).endswith("6 trials · 0:30 · ~0:16 left · best 0.750 (ce b)")

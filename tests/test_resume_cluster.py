"""Processes the test owns: a driver killed with SIGKILL and resumed; a multi-node Ray cluster
(head + worker started with ``ray start``) with an ``mlflow server``, all on 127.0.0.1."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import Hold, free_port, fresh_store, tiny_search

BIN = Path(sys.executable).parent


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1",  # conftest set the rest
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # `mlflow server` without its five
                # job-runner processes (each imports MLflow: seconds of CPU on 2 cores)


def _start(cmd, log: Path, cwd=None, env=None):
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env or _env(),
                            cwd=cwd, start_new_session=True)


def _stop(proc, sig=signal.SIGTERM, timeout=20):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _mlflow_up(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def _search_cmd(tmp_path: Path, data: dict, name: str, uri: str) -> tuple[list[str], Path]:
    """The search file written, the `ltsearch search` command for it, and its folder."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    cmd = [str(BIN / "ltsearch"), "search", str(path), "--storage", str(tmp_path / "searches"),
           "--name", name, "--tracking-uri", uri]
    return cmd, tmp_path / "searches" / name


def _trials(folder: Path) -> dict:
    try:
        return json.loads((folder / "trials.json").read_text())
    except (OSError, ValueError):
        return {}


def _snapshot(folder: Path) -> dict:
    """Tune's newest snapshot of the experiment: each trial's status by id (what a resume
    restores)."""
    try:
        data = json.loads(sorted((folder / "ray").glob("experiment_state-*.json"))[-1].read_text())
    except (IndexError, OSError, ValueError):
        return {}
    return {t["trial_id"]: t["status"] for t in (json.loads(e[0]) for e in data["trial_data"])}


def _held(hold: Hold, name: str, folder: Path) -> str:
    """The id of the trial ``hold`` keeps waiting at ``name``, once trials.json and Tune's
    snapshot both hold it RUNNING (a resume then continues it, not starts it afresh)."""
    _wait(lambda: hold.reached(name), 300, f"a trainer held at {name}")
    running = lambda: [k for k, r in _trials(folder).items() if r["status"] == "RUNNING"]
    _wait(lambda: len(running()) == 1 and _snapshot(folder).get(running()[0]) == "RUNNING", 60,
          "the held trial RUNNING in trials.json and in Tune's snapshot")
    return running()[0]


def _ctrl_c(cmd, log: Path, until, what: str, env=None) -> tuple[int, str]:
    """Start the search, press Ctrl-C once ``until()`` holds; its exit status and output."""
    driver = _start(cmd, log, env=env)
    try:
        _wait(until, 300, what)
        os.killpg(driver.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
        driver.wait(120)
    finally:
        _stop(driver)
    return driver.returncode, log.read_text()


def _nothing_running(uri: str):
    """The MLflow client and experiment, after checking that no run is RUNNING."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    assert not [r for r in client.search_runs([exp]) if r.info.status == "RUNNING"]
    return client, exp


def _resume(cmd) -> subprocess.CompletedProcess:
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return resumed


def test_resume_after_sigkill(tmp_path):
    """SIGKILL to the driver and the Ray it started, while the third of four trials trains (held
    there until Tune's snapshot holds it): the resume finishes exactly the four, the killed one
    among them, and every record agrees."""
    data = tiny_search(method={"ce": {}, "resample": {"sampler.name": {"choice": ["balanced", "sqrt"]}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=4, max_concurrent=1, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "r", uri)
    hold = Hold(tmp_path / "hold")
    hold.at("2-1")  # the third trainer, after its first epoch
    driver = _start(cmd, tmp_path / "first.log", env=hold.env(_env()))
    try:
        killed = _held(hold, "2-1", folder)
    finally:
        _stop(driver, signal.SIGKILL)  # the driver and the Ray it started, mid-search
    before = {k: r for k, r in _trials(folder).items() if r["status"] == "COMPLETED"}
    assert driver.returncode == -signal.SIGKILL and len(before) == 2
    assert _trials(folder)[killed]["status"] == "RUNNING"  # nothing could close it

    resumed = _resume(cmd)
    shown = resumed.stdout + resumed.stderr  # what the user sees: Ray's internals stay in its logs
    for noise in ("Traceback", "Failed to fetch metrics", "Error handling checkpoint"):
        assert noise not in shown, shown[-4000:]
    after = _trials(folder)
    # Tune's snapshot knew all three: the killed trial is trained again, the fourth is new
    assert len(after) == 4 and all(r["status"] == "COMPLETED" for r in after.values()), after
    assert after[killed]["epochs"] == 2
    numbers = lambda m: {k: v for k, v in m.items() if not k.startswith("time/")}  # not timings
    for k, r in before.items():  # finished trials keep their results
        assert numbers(after[k]["metrics"]) == numbers(r["metrics"])
    assert "best trial per method" in resumed.stdout
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4  # agree
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


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI not installed")
def test_two_node_cluster_loses_its_worker_node_mid_search(tmp_path):
    """Trials run on both nodes; the worker node dies (SIGKILL to its raylet and workers); its
    trial continues from its last checkpoint on the head node, and nothing recorded is lost."""
    ray_port, mlflow_port = free_port(), free_port()
    fresh_store(tmp_path, "srv.db")
    address = f"127.0.0.1:{ray_port}"
    procs = []
    try:
        procs.append(_start([str(BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=false"],
                            tmp_path / "head.log"))
        procs.append(_start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port",
                             str(mlflow_port), "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            tmp_path / "mlflow.log"))
        _wait(lambda: subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=_env(),
                                     capture_output=True).returncode == 0, 120, "the head node")
        procs.append(_start([str(BIN / "ray"), "start", "--block", f"--address={address}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0"],
                            tmp_path / "worker.log"))

        def nodes_up():
            out = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=_env(),
                                 capture_output=True, text=True)
            return out.returncode == 0 and out.stdout.count("node_") >= 2

        _wait(nodes_up, 120, "two Ray nodes")
        _wait(lambda: _mlflow_up(mlflow_port), 120, "the mlflow server")

        data = tiny_search(method={"ce": {}, "reweight": {"weights.scheme": {"choice": ["sqrt", "inverse"]}}})
        data["base"]["train"]["epochs"] = 8
        data["search"].update(num_samples=4, max_concurrent=2, asha={"enabled": False},
                              checkpoint_every=1, max_failures=2)
        uri = f"http://127.0.0.1:{mlflow_port}"
        cmd, folder = _search_cmd(tmp_path, data, "c", uri)
        driver = _start(cmd + ["--address", address], tmp_path / "driver.log")
        procs.append(driver)

        def both_nodes_mid_trial():
            running = {k: r for k, r in _trials(folder).items()
                       if r["status"] == "RUNNING" and (r.get("epochs") or 0) >= 1}
            return len({r["node_id"] for r in running.values()}) == 2 and running

        _wait(both_nodes_mid_trial, 120, "a trial past its first epoch on each node")
        at_kill = {k: r["node_id"] for k, r in both_nodes_mid_trial().items()}
        _stop(procs[2], signal.SIGKILL)  # the worker node: its raylet and the trials on it
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]

        trials = _trials(folder)
        assert len(trials) == 4 and all(r["status"] == "COMPLETED" for r in trials.values())
        moved = [k for k, node in at_kill.items() if trials[k]["node_id"] != node]
        assert len(moved) == 1  # the worker node's trial finished on the head node…
        result = next((folder / "ray").glob(f"*{moved[0]}*/result.json")).read_text().splitlines()
        last = json.loads(result[-1])
        assert last["epoch"] == 8 and last["iterations_since_restore"] < 8  # …from its checkpoint
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ltsearch").experiment_id
        runs = client.search_runs([exp])
        trial_runs = [r for r in runs if r.data.tags.get("ltsearch.kind") == "trial"]
        assert len(trial_runs) == 4 and all(r.info.status == "FINISHED" for r in trial_runs)
        for r in trial_runs:  # every epoch once: nothing lost, nothing logged twice
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
            assert sorted(steps) == list(range(1, 9)), (r.data.tags["ltsearch.trial_id"], steps)
        names = {a.path for a in client.list_artifacts(trial_runs[0].info.run_id)}
        assert "confusion_matrix.svg" in names
    finally:
        for p in reversed(procs):
            _stop(p)


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


def test_ctrl_c_then_resume(tmp_path):
    """Ctrl-C used to exit 0 with the parent run FINISHED, the running Optuna trials FAIL and
    trials.json RUNNING; after --resume TPE never learned those trials' results."""
    data = tiny_search(method={"ce": {}, "resample": {"sampler.name": {"choice": ["balanced", "sqrt"]}}})
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=3, max_concurrent=1, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd, folder = _search_cmd(tmp_path, data, "i", uri)
    hold = Hold(tmp_path / "hold")
    hold.at("1-1")  # the second trial, after its first epoch
    code, log = _ctrl_c(cmd, tmp_path / "first.log", lambda: hold.reached("1-1"),
                        "the second trial after its first epoch", env=hold.env(_env()))
    assert code == 130, log[-3000:]
    assert "interrupted — continue with `ltsearch search" in log and "--resume" in log
    records = _trials(folder)
    assert sorted(r["status"] for r in records.values()) == ["COMPLETED", "INTERRUPTED"]
    study = optuna.load_study(study_name="i", storage=f"sqlite:///{folder / 'optuna.db'}")
    _interrupted_as_the_readme_says(uri, study, records)
    client, exp = _nothing_running(uri)

    resumed = _resume(cmd)
    assert resumed.stdout.splitlines()[0] == (  # before Ray: what it resumes, where, how far it got
        f"search i: resuming 3 trials over 2 methods (1 ended), 1 at a time, in {folder.resolve()}; "
        "starting a local Ray")
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


def test_ctrl_c_during_confirmation_then_confirm_asking_for_fewer(tmp_path):
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
    hold = Hold(tmp_path / "hold")
    hold.at("2-1")  # trainers: the trial, then a confirmation run per seed, one at a time
    code, log = _ctrl_c(cmd, tmp_path / "first.log", lambda: hold.reached("2-1"),
                        "the second seed's confirmation run after its first epoch", env=hold.env(_env()))
    assert code == 130 and "--resume" in log, log[-3000:]
    records = _trials(folder)
    own = [r for r in records.values() if not r.get("confirm_of")]
    assert [r["status"] for r in own] == ["COMPLETED"]
    confirming = {r["seed"]: r["status"] for r in records.values() if r.get("confirm_of")}
    seed = own[0]["config"]["seed"]
    assert confirming == {seed + 1: "COMPLETED", seed + 2: "INTERRUPTED"}
    _interrupted_as_the_readme_says(uri, None, records)
    client, exp = _nothing_running(uri)

    again = subprocess.run([str(BIN / "ltsearch"), "confirm", str(folder), "--top", "1", "--seeds", "1"],
                           env=_env(), capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
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


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("mlflow", path=str(BIN)) is None, reason="mlflow CLI not installed")
def test_tracking_server_lost_mid_search_then_resume(tmp_path):
    """An exception escaping Tune's fit (here: the MLflow server dies mid-search) used to leave
    the parent and child runs, trials.json and the Optuna study RUNNING for good. MLflow retries
    the lost server (here twice, quickly; by default for minutes per call): one line says so,
    not urllib3's line per retry, and the end does not wait on it again per call (it printed
    a warning per failed step, each after its own retries)."""
    port = free_port()
    fresh_store(tmp_path, "srv.db")
    server_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]

    data = tiny_search(method={"ce": {}})
    data["search"].update(num_samples=2, max_concurrent=1, asha={"enabled": False})
    uri = f"http://127.0.0.1:{port}"
    cmd, folder = _search_cmd(tmp_path, data, "t", uri)
    env = dict(_env(), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
               MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    server = _start(server_cmd, tmp_path / "mlflow1.log")
    try:
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server")
        driver = subprocess.Popen(cmd, stdout=open(tmp_path / "first.log", "w"),
                                  stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait(lambda: any(r["status"] == "COMPLETED" for r in _trials(folder).values())
                  and any(r["status"] == "RUNNING" for r in _trials(folder).values()),
                  300, "a finished trial and a running one")
            _stop(server, signal.SIGKILL)  # the tracking server is lost
            driver.wait(300)
        finally:
            _stop(driver)
        log = (tmp_path / "first.log").read_text()
        assert driver.returncode == 1, log[-3000:]
        assert "Retrying" not in log and log.count(f"the MLflow server at {uri} stopped answering") == 1
        assert f"error: the search stopped: TrackingError: no MLflow server answers at {uri} (" in log
        assert "Traceback" not in log
        warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
        assert len(warnings) == 2 and "tracking records not closed" in warnings[1], log[-3000:]
        assert "its tracking records not: once the store answers, `" in log and "--resume" in log
        statuses = [r["status"] for r in _trials(folder).values()]
        assert "RUNNING" not in statuses and "INTERRUPTED" in statuses
        study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.db'}")
        assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.trials]

        server = _start(server_cmd, tmp_path / "mlflow2.log")  # back, on the same store
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server again")
        resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                                 timeout=400)
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        statuses = [r["status"] for r in _trials(folder).values()]
        # a trial started after Tune's last snapshot before the server died is LOST, not resumed
        assert statuses.count("COMPLETED") == 2 and set(statuses) <= {"COMPLETED", "LOST"}
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id])
        assert runs and not [r for r in runs if r.info.status == "RUNNING"]
        assert sum(r.data.tags.get("ltsearch.kind") == "trial" and r.info.status == "FINISHED"
                   for r in runs) == 2
    finally:
        _stop(server)


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("mlflow", path=str(BIN)) is None, reason="mlflow CLI not installed")
def test_a_tracking_server_back_within_mlflows_retries_costs_nothing(tmp_path, monkeypatch, caplog):
    """A server restart while trials report: MLflow's client retries it, the tracker's thread
    waits, nothing is lost. The user reads one line when it stops answering and one when it
    is back, not urllib3's line per retry."""
    from ltsearch.search.tracker import BackgroundTracker
    from ltsearch.search.tracking import MLflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "6")  # 1+2+…+32 s: a restart fits
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                  "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]
    server = _start(server_cmd, tmp_path / "mlflow1.log")
    try:
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server")
        tracker = BackgroundTracker(MLflowTracker.checked(uri, "ltsearch", ["a", "b"], [3, 1]))
        tracker.start_search(tmp_path, "s", {})
        tracker.start_trial("t1", "ce", {"lr": 0.1})
        tracker.log("t1", 1, {"val/top1": 0.5})
        tracker.drain()
        _stop(server, signal.SIGKILL)
        tracker.log("t1", 2, {"val/top1": 0.6})  # retried until the server is back
        tracker.end_trial("t1", "COMPLETED", {"lr": 0.1}, {"val/top1": 0.6})
        server = _start(server_cmd, tmp_path / "mlflow2.log")
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server again")  # meanwhile, retries
        tracker.end_search("finished", [])
    finally:
        _stop(server)
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert said == [f"the MLflow server at {uri} stopped answering; MLflow retries for a few "
                    "minutes while the search goes on", f"the MLflow server at {uri} answers again"]
    server = _start(server_cmd, tmp_path / "mlflow3.log")
    try:
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server")
        client = MlflowClient(uri)
        run = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id],
                                 "tags.`ltsearch.trial_id` = 't1'")[0]
        assert run.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(run.info.run_id, "val/top1")] == [0.5, 0.6]
    finally:
        _stop(server)


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("mlflow", path=str(BIN)) is None, reason="mlflow CLI not installed")
def test_a_store_lost_as_a_trial_ends_fails_the_call_once(tmp_path, monkeypatch, caplog):
    """The trial's files go up first: with the server gone, that upload failed with a warning
    of its own (MLflow's whole error, one very long line), then closing the run failed again.
    Now the call fails once, as any call to a lost store, and the catch-up of `--resume` ends
    the trial again, files included."""
    from mlflow.exceptions import MlflowException

    from ltsearch.search.tracking import MLflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    fresh_store(tmp_path, "srv.db")
    server = _start([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
                     "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                    tmp_path / "mlflow.log")
    try:
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server")
        tracker = MLflowTracker.checked(f"http://127.0.0.1:{port}", "ltsearch", ["a", "b"], [3, 1])
        tracker.start_search(tmp_path, "s", {})
        tracker.start_trial("t1", "ce", {"lr": 0.1})
    finally:
        _stop(server, signal.SIGKILL)
    result = {"val/top1": 0.5, "test/per_class": [0.5, 0.5], "val/per_class": [0.5, 0.5]}
    with pytest.raises(MlflowException):
        tracker.end_trial("t1", "COMPLETED", {"lr": 0.1}, result)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_ctrl_c_mid_rung_then_resume_decides_as_an_uninterrupted_search(tmp_path):
    """Tune restores a scheduler as it was created, empty: rebuilt from trials.json (and from the
    rung values every report repeats), a resumed search stops and keeps the trials an
    uninterrupted one does. No parameter is sampled, so both searches run the same six trials
    in the same (seed-shuffled) order, one at a time. (Without the rebuilt rungs, the trials
    after the resume met rungs holding the interrupted trial's value alone.)"""
    methods = ("ce", "reweight", "resample", "logit_adjust", "balanced_softmax", "two_stage")
    data = tiny_search(method={m: {} for m in methods})
    data["base"]["train"]["epochs"] = 4
    data["search"].update(num_samples=6, max_concurrent=1, checkpoint_every=1,
                          asha={"rungs": [0.25, 1.0], "reduction_factor": 3})  # runs of 1 and 4 epochs
    uri = fresh_store(tmp_path)
    whole_cmd, whole = _search_cmd(tmp_path, data, "whole", uri)
    done = subprocess.run(whole_cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = {r["method"]: r for r in _trials(whole).values()}
    assert {r["status"] for r in expected.values()} == {"COMPLETED", "PRUNED"}
    order = sorted(expected.values(), key=lambda r: r["started_at"])
    # the first trial that runs its full rung after two others ended: Ctrl-C in that run
    later = [r for i, r in enumerate(order) if i >= 2 and len(r["rung_values"]) > 0
             and r["epochs"] > r["budgets"][0]]
    assert later, [(r["method"], r["status"], r["rung_values"]) for r in order]
    method, place = later[0]["method"], order.index(later[0])

    cmd, folder = _search_cmd(tmp_path, data, "cut", uri)
    # a trainer per rung run: the earlier trials', then this one's rung 0; hold its full run
    # (the next trainer) after its first epoch
    name = f"{sum(len(r['rung_values']) for r in order[:place]) + 1}-1"
    hold = Hold(tmp_path / "hold")
    hold.at(name)
    code, log = _ctrl_c(cmd, tmp_path / "first.log", lambda: hold.reached(name),
                        f"{method} in the middle of its full rung", env=hold.env(_env()))
    assert code == 130, log[-3000:]
    assert [r["method"] for r in _trials(folder).values() if r["status"] == "INTERRUPTED"
            and r["rung"] == 1] == [method]
    _resume(cmd)
    after = {r["method"]: r for r in _trials(folder).values()}
    assert {m: r["status"] for m, r in after.items()} == {m: r["status"] for m, r in expected.items()}
    for m, r in after.items():
        assert r["rung_values"] == pytest.approx(expected[m]["rung_values"]), m
    study = optuna.load_study(study_name="cut", storage=f"sqlite:///{folder / 'optuna.db'}")
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials)
    assert pruned == sum(r["status"] == "PRUNED" for r in after.values())

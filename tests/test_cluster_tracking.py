"""A multi-node Ray cluster (head + worker started with ``ray start``) losing a node, and an
``mlflow server`` lost and back, all on 127.0.0.1."""
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import Hold, free_port, fresh_store, tiny_search, write_list_dataset
from procs import (BIN, _env, _mlflow_server_cmd, _mlflow_up, _resume_here, _search_cmd, _start, _stop,
                   _trials, _wait)


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def _descends(pid: int, root: int) -> bool:
    """Whether process ``pid`` descends from process ``root``."""
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid == root:
            return True
    return False


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="ray CLI not installed")
def test_two_node_cluster_loses_its_worker_node_mid_search(tmp_path):
    """A search on a list-file dataset decoded into a cache on each node's own disk
    (``data.cache_dir: $NODE_DISK/…``, a variable each node sets): trials run on both nodes
    (each held after its first epoch until both are), and every node — the driver's, the
    head's, the worker's — decodes the same bytes into its own cache. The worker node dies
    (SIGKILL to its raylet and workers); its trial continues from its last checkpoint on the
    head node, and nothing recorded is lost. (The tracker lives in the driver: a sqlite store
    here, the tracking server's own endings below.)"""
    ray_port = free_port()
    address = f"127.0.0.1:{ray_port}"
    hold = Hold(tmp_path / "hold")  # the nodes' workers inherit it from `ray start`
    disks = {node: tmp_path / f"{node}-disk" for node in ("driver", "head", "worker")}
    procs = []
    try:
        procs.append(_start([str(BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                             "--include-dashboard=false"],
                            tmp_path / "head.log", env=hold.env(dict(_env(), NODE_DISK=str(disks["head"])))))
        _wait(lambda: _listens(ray_port), 120, "the head node")
        procs.append(_start([str(BIN / "ray"), "start", "--block", f"--address={address}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0"],
                            tmp_path / "worker.log", env=hold.env(dict(_env(), NODE_DISK=str(disks["worker"])))))
        # the driver need not wait for the worker node: the head's trial is held until the
        # second trial runs, which only the worker node can hold

        data = tiny_search(method={"ce": {}, "reweight": {"weights.scheme": {"choice": ["sqrt", "inverse"]}}})
        data["base"]["data"] = {**write_list_dataset(tmp_path / "images"), "cache_dir": "$NODE_DISK/cache",
                                "augment": {"crop_pad": 2, "hflip": True}}
        data["base"]["train"]["epochs"] = 2
        data["search"].update(num_samples=2, max_concurrent=2, asha={"enabled": False},
                              checkpoint_every=1, max_failures=2)
        uri = fresh_store(tmp_path)
        cmd, folder = _search_cmd(tmp_path, data, "c", uri)
        hold.at("0-1")
        hold.at("1-1")  # both trainers, after their first epoch (and its checkpoint)
        driver = _start(cmd + ["--address", address], tmp_path / "driver.log",
                        env=dict(_env(), NODE_DISK=str(disks["driver"])))
        procs.append(driver)

        def both_nodes_mid_trial():
            running = {k: r for k, r in _trials(folder).items()
                       if r["status"] == "RUNNING" and (r.get("epochs") or 0) >= 1}
            return len({r["node_id"] for r in running.values()}) == 2 and running

        _wait(lambda: hold.reached("0-1") and hold.reached("1-1"), 300, "a trainer held on each node")
        _wait(both_nodes_mid_trial, 120, "a trial past its first epoch on each node")
        at_kill = {k: r["node_id"] for k, r in both_nodes_mid_trial().items()}
        # the worker node: its raylet and the trainer on it (Ray's workers have a session of
        # their own: a held one would outlive its raylet)
        [trainer] = [p for p in map(hold.pid, ("0-1", "1-1")) if _descends(p, procs[1].pid)]
        _stop(procs[1], signal.SIGKILL)
        os.kill(trainer, signal.SIGKILL)
        hold.release("0-1")
        hold.release("1-1")
        assert driver.wait(timeout=400) == 0, (tmp_path / "driver.log").read_text()[-3000:]

        trials = _trials(folder)
        assert len(trials) == 2 and all(r["status"] == "COMPLETED" for r in trials.values())
        caches = {node: {p.parent.name: p.with_name("images.u8").read_bytes()
                         for p in (disk / "cache").glob("*/meta.json")} for node, disk in disks.items()}
        assert len(caches["driver"]) == 2  # the train and test splits' files, decoded there once…
        assert caches["head"] == caches["driver"]  # …and on each node; the worker node died before
        assert caches["worker"] and all(caches["driver"][k] == v for k, v in caches["worker"].items())
        # its trial evaluated on test (a set is read, and its cache built, where first used)
        moved = [k for k, node in at_kill.items() if trials[k]["node_id"] != node]
        assert len(moved) == 1  # the worker node's trial finished on the head node…
        result = next((folder / "ray").glob(f"*{moved[0]}*/result.json")).read_text().splitlines()
        last = json.loads(result[-1])
        assert last["epoch"] == 2 and last["iterations_since_restore"] == 1  # …from its checkpoint
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ltsearch").experiment_id
        runs = client.search_runs([exp])
        trial_runs = [r for r in runs if r.data.tags.get("ltsearch.kind") == "trial"]
        assert len(trial_runs) == 2 and all(r.info.status == "FINISHED" for r in trial_runs)
        for r in trial_runs:  # every epoch once: nothing lost, nothing logged twice
            steps = [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")]
            assert sorted(steps) == [1, 2], (r.data.tags["ltsearch.trial_id"], steps)
        names = {a.path for a in client.list_artifacts(trial_runs[0].info.run_id)}
        assert "confusion_matrix.svg" in names
    finally:
        for p in reversed(procs):  # (`ray start --block` drains for 30 s on SIGTERM)
            _stop(p, signal.SIGKILL)


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("mlflow", path=str(BIN)) is None, reason="mlflow CLI not installed")
@pytest.mark.filterwarnings("error:The reported value is ignored:UserWarning")  # (told twice on resume)
def test_tracking_server_lost_mid_search_then_resume(tmp_path, ray_address, session_hold, monkeypatch,
                                                     capsys):
    """An exception escaping Tune's fit (here: the MLflow server dies mid-search) used to leave
    the parent and child runs, trials.json and the Optuna study RUNNING for good. MLflow retries
    the lost server (here twice, quickly; by default for minutes per call): one line says so,
    not urllib3's line per retry, and the end does not wait on it again per call (it printed
    a warning per failed step, each after its own retries)."""
    port = free_port()
    server_cmd = _mlflow_server_cmd(tmp_path, port)

    data = tiny_search(method={"ce": {}})
    data["search"].update(num_samples=2, max_concurrent=1, asha={"enabled": False})
    uri = f"http://127.0.0.1:{port}"
    cmd, folder = _search_cmd(tmp_path, data, "t", uri)
    for key, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "0"), ("BACKOFF_JITTER", "0"),
                       ("TIMEOUT", "5")):  # for the driver it starts and the resume run here
        monkeypatch.setenv(f"MLFLOW_HTTP_REQUEST_{key}", value)
    server = _start(server_cmd, tmp_path / "mlflow1.log")
    session_hold.at("1-1")  # the second trial waits after its first epoch (a reused worker's
    try:                    # trial can start and end between two looks at trials.json)
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server")
        driver = subprocess.Popen(cmd + ["--address", ray_address], stdout=open(tmp_path / "first.log", "w"),
                                  stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        try:
            _wait(lambda: any(r["status"] == "COMPLETED" for r in _trials(folder).values())
                  and session_hold.reached("1-1"), 300, "a finished trial and a running one")
            _stop(server, signal.SIGKILL)  # the tracking server is lost
            session_hold.release("1-1")  # its next report meets the lost server
            driver.wait(300)
        finally:
            _stop(driver)
        log = (tmp_path / "first.log").read_text()
        assert driver.returncode == 1, log[-3000:]
        # one line when a retried call first fails (none where the first call to fail is one
        # MLflow does not retry: the ending's own line then says it), never urllib3's per retry
        said = log.count(f"the MLflow server at {uri} stopped answering")
        assert "Retrying" not in log and said <= 1, log[-3000:]
        assert f"error: the search stopped: TrackingError: no MLflow server answers at {uri} (" in log
        assert "Traceback" not in log
        warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
        assert len(warnings) == 1 + said and "tracking records not closed" in warnings[-1], log[-3000:]
        assert "its tracking records not: once the store answers, `" in log and "--resume" in log
        statuses = [r["status"] for r in _trials(folder).values()]
        assert "RUNNING" not in statuses and "INTERRUPTED" in statuses
        study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.db'}")
        assert optuna.trial.TrialState.RUNNING not in [t.state for t in study.trials]

        server = _start(server_cmd, tmp_path / "mlflow2.log")  # back, on the same store
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server again")
        _resume_here(cmd, capsys)
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

    # retries 1, 2, 4, … s apart (MLflow allows 10): over 8 min in all, which no
    # restart's speed runs out
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "10")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_cmd = _mlflow_server_cmd(tmp_path, port)
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
    client = MlflowClient(f"sqlite:///{tmp_path / 'srv.db'}")  # what the server stored
    run = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id],
                             "tags.`ltsearch.trial_id` = 't1'")[0]
    assert run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/top1")] == [0.5, 0.6]


@pytest.mark.cluster
@pytest.mark.skipif(shutil.which("mlflow", path=str(BIN)) is None, reason="mlflow CLI not installed")
def test_a_store_lost_as_a_trial_ends_fails_the_call_once(tmp_path, monkeypatch, caplog):
    """The trial's files go up first: with the server gone, that upload failed with a warning
    of its own (MLflow's whole error, one very long line), then closing the run failed again.
    Now the call fails once, as any call to a lost store, and the catch-up of `--resume` ends
    the trial again, files included, once the server is back."""
    from mlflow.exceptions import MlflowException

    from ltsearch.search.tracking import MLflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    server_cmd = _mlflow_server_cmd(tmp_path, port)
    server = _start(server_cmd, tmp_path / "mlflow.log")
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

    server = _start(server_cmd, tmp_path / "mlflow2.log")  # back: `--resume` catches up
    try:
        _wait(lambda: _mlflow_up(port), 120, "the mlflow server again")
        tracker.catch_up("t1", "ce", {"lr": 0.1}, "COMPLETED",
                         [{"epoch": 1, "metrics": {"val/top1": 0.5}, "result": result}])
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id],
                                 "tags.`ltsearch.trial_id` = 't1'")[0]
        assert run.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(run.info.run_id, "val/top1")] == [0.5]
        assert "per_class_accuracy.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    finally:
        _stop(server)

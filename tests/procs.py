"""Processes the endings tests own (drivers, `ray start` nodes, `mlflow server`), on 127.0.0.1:
start, stop, wait on a condition, and read what a search folder holds."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient

from conftest import Hold, fresh_store

BIN = Path(sys.executable).parent


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1",  # conftest set the rest
                MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")  # `mlflow server` without its five


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
    _wait(lambda: len(running()) == 1 and _snapshot(folder).get(running()[0]) == "RUNNING", 180,
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


class Ran:
    """What a command run in this process gave: its exit status and output."""

    def __init__(self, returncode: int, captured):
        self.returncode, self.stdout, self.stderr = returncode, captured.out, captured.err


def _here(argv: list[str], capsys, code: int = 0) -> Ran:
    """An ``ltsearch`` command run in this process, on the session's Ray (``ray_local``): no
    interpreter, imports or Ray of its own to start, for the runs a test does not stop. It must
    exit with ``code``."""
    from ltsearch.cli import main

    capsys.readouterr()
    ran = Ran(main(argv), capsys.readouterr())
    assert ran.returncode == code, ran.stdout[-3000:] + ran.stderr[-3000:]
    return ran


def _resume_here(cmd: list[str], capsys) -> Ran:
    return _here(cmd[1:] + ["--resume"], capsys)


def _resume(cmd) -> subprocess.CompletedProcess:
    resumed = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return resumed


def _mlflow_server_cmd(tmp_path: Path, port: int) -> list[str]:
    """An `mlflow server` on 127.0.0.1:``port`` over ``tmp_path/srv.db`` (a migrated copy made
    here unless the test made it already), artifacts in ``tmp_path/artifacts``."""
    if not (tmp_path / "srv.db").exists():
        fresh_store(tmp_path, "srv.db")
    return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'srv.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"]

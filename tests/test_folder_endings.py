"""Endings of a search folder that used to lose or falsify results: two writers at once, SIGTERM,
a trial stopped just before the driver, damaged files, a read-only folder, a search file edited
before `--resume`, `confirm --top` past the trials. Real Ray, Optuna, MLflow (sqlite) and real
processes; the damaged files are damaged for real (truncated, overwritten)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import Hold, fresh_store, proc_stat, tiny_search
from ltsearch.cli import main
from procs import _wait

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PYTHONUNBUFFERED="1")


def _search_file(tmp: Path, **update) -> Path:
    data = tiny_search(method={"ce": {}, "logit_adjust": {"loss.tau": {"uniform": [0.5, 1.5]}}})
    # seed 2: logit_adjust, ce, logit_adjust, ce, each ce pruned at its rung
    data["search"].update({"num_samples": 4, "max_concurrent": 1, "seed": 2, **update})
    path = tmp / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local):
    """A finished 4-trial search (one at a time, rungs at a third and the end: some trials
    pruned), tracked in sqlite; tests work on copies of its folder."""
    tmp = tmp_path_factory.mktemp("finished")
    path = _search_file(tmp)
    uri = fresh_store(tmp)
    # in this process, on the session's Ray: no interpreter or Ray of its own to start
    assert main(["search", str(path), "--storage", str(tmp / "searches"), "--name", "f",
                 "--tracking-uri", uri]) == 0
    return tmp / "searches" / "f", path, uri


def _copy(folder: Path, tmp: Path, name: str = "f") -> Path:
    dest = tmp / "searches" / name
    shutil.copytree(folder, dest)
    return dest


def _trials(folder: Path) -> dict:
    return json.loads((folder / "trials.json").read_text())


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------------------------------------
# damaged files

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00 not what it should be \xff\xfe")


DAMAGES = [("trials.json", _truncate, ("report", "export", "confirm", "resume")),
           ("search.json", _truncate, ("report", "confirm", "resume")),
           ("search.yaml", _garbage, ("report", "export", "confirm", "resume")),
           ("optuna.db", _garbage, ("confirm", "resume")),
           ("ray/experiment_state-*.json", _truncate, ("confirm", "resume"))]  # Tune's, cut short


@pytest.mark.parametrize("name,damage,commands", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_file_is_one_line_naming_it_for_every_command(finished, tmp_path, capsys, name,
                                                                 damage, commands):
    """A truncated trials.json used to be a 35–40-line JSONDecodeError traceback and exit 1."""
    folder, path, uri = finished
    copy = _copy(folder, tmp_path)
    damaged = next(copy.glob(name))
    damage(damaged)
    argv = {"report": ["report", str(copy), "--no-tracking"],
            "export": ["export", str(copy), "--out", str(tmp_path / "out")],
            "confirm": ["confirm", str(copy), "--top", "1", "--seeds", "1", "--no-tracking"],
            "resume": ["search", str(path), "--resume", "--name", "f", "--storage",
                       str(tmp_path / "searches"), "--no-tracking"]}
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != "lock"}
    for command in commands:
        assert main(argv[command]) == 2, command
        line = _one_line(capsys)
        assert str(damaged) in line, (command, line)
    after = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file() and p.name != "lock"}
    assert after == before  # nothing rewritten, the damaged file included


def test_a_damaged_checkpoint_of_a_trial_to_resume_is_named(finished, tmp_path, capsys):
    folder, path, _ = finished
    copy = _copy(folder, tmp_path)
    trials = _trials(copy)
    trial_id = next(iter(trials))
    trials[trial_id]["status"] = "INTERRUPTED"
    (copy / "trials.json").write_text(json.dumps(trials))
    trial_dir = next((copy / "ray").glob(f"*_{trial_id}_*"))
    checkpoint = trial_dir / "checkpoint_000099"
    checkpoint.mkdir()
    (checkpoint / "rung.json").write_text(json.dumps({"rung": 0, "rung_values": []}))
    (checkpoint / "trainer.pt").write_bytes(b"PK\x03\x04 cut short")
    assert main(["search", str(path), "--resume", "--name", "f", "--storage", str(tmp_path / "searches"),
                 "--no-tracking"]) == 2
    line = _one_line(capsys)
    assert str(checkpoint / "trainer.pt") in line and "damaged" in line


def test_a_torn_last_line_of_rays_results_does_not_stop_the_report(finished, tmp_path, capsys):
    """A driver killed mid-write leaves half a line in a trial's result.json."""
    folder, _, _ = finished
    copy = _copy(folder, tmp_path)
    result = next((copy / "ray").glob("*/result.json"))
    result.write_text(result.read_text() + '{"trial_id": "x", "epo')
    assert main(["report", str(copy), "--no-tracking"]) == 0
    assert (copy / "report.html").is_file()


# ---------------------------------------------------------------------------------------------
# a read-only folder, a search file edited before --resume, --top past the trials

@pytest.fixture
def read_only_mount(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_report_on_a_read_only_folder_says_so_and_writes_elsewhere_with_out(finished, tmp_path,
                                                                           read_only_mount, capsys):
    folder, _, _ = finished
    copy = _copy(folder, read_only_mount)
    assert subprocess.run(["mount", "-o", "remount,ro", str(read_only_mount)]).returncode == 0
    for extra in ([], ["--no-tracking"]):
        assert main(["report", str(copy), *extra]) == 2
        line = _one_line(capsys)
        assert str(copy) in line and "read-only" in line and "--out" in line
    out = tmp_path / "pages"
    assert main(["report", str(copy), "--no-tracking", "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Search f" in page and (out / "report").is_dir()


def test_a_search_file_edited_before_resume_is_refused_naming_the_keys(finished, tmp_path, capsys):
    """The resumed trials used to sample the old range while search.yaml was overwritten with
    the new file."""
    folder, path, _ = finished
    copy = _copy(folder, tmp_path)
    stored = (copy / "search.yaml").read_bytes()
    data = yaml.safe_load(path.read_text())
    data["space"]["method"]["logit_adjust"]["loss.tau"] = {"uniform": [0.5, 3.0]}
    data["base"]["train"]["lr"] = 0.05
    edited = tmp_path / "s.yaml"
    edited.write_text(yaml.safe_dump(data))
    argv = ["search", str(edited), "--resume", "--name", "f", "--storage", str(tmp_path / "searches"),
            "--no-tracking"]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "space.method.logit_adjust.loss.tau.uniform ([0.5, 1.5] → [0.5, 3.0])" in line, line
    assert "base.train.lr (0.02 → 0.05)" in line and str(copy / "search.yaml") in line
    assert (copy / "search.yaml").read_bytes() == stored
    # the file it ran with is accepted (a finished search: nothing to resume)
    edited.write_text(path.read_text())
    assert main(argv) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_confirm_top_past_the_trials_counts_what_exists(finished, tmp_path, capsys):
    """`--top 999` of 4 trials used to print "confirming the 999 best configs", a progress
    line of `4/999` and store top: 999."""
    folder, _, _ = finished
    copy = _copy(folder, tmp_path)
    completed = [r for r in _trials(copy).values() if r["status"] == "COMPLETED"]
    assert 1 <= len(completed) < 4
    assert main(["confirm", str(copy), "--top", "999", "--seeds", "1", "--no-tracking"]) == 0
    out = capsys.readouterr().out
    n = len(completed)
    assert f"--top 999: the search has {n} trial{'s' * (n != 1)} that ran to the end" in out
    # (not as a count; a trial id may hold the digits)
    assert not re.search(r"(?<![0-9a-f])999(?![0-9a-f])", out.split("--top 999", 1)[1])
    assert f"{n}/{n} confirmation runs" in out
    runs = [r for r in _trials(copy).values() if r.get("confirm_of")]
    assert len(runs) == n and {r["confirm_of"] for r in runs} == {r["trial_id"] for r in completed}
    assert yaml.safe_load((copy / "search.yaml").read_text())["search"]["confirm"]["top"] == n


# ---------------------------------------------------------------------------------------------
# one writer per folder

HOLD = ("import sys, time\nfrom ltsearch.search.folder import FolderLock\n"
        "FolderLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)\n")


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_one_frees_it(finished, tmp_path, capsys):
    folder, path, uri = finished
    copy = _copy(folder, tmp_path)
    holder = _holder(copy)
    try:
        for argv in (["report", str(copy), "--no-tracking"],
                     ["confirm", str(copy), "--top", "1", "--seeds", "1", "--no-tracking"],
                     ["search", str(path), "--resume", "--name", "f", "--storage", str(tmp_path / "searches"),
                      "--tracking-uri", uri],
                     ["search", str(path), "--name", "f", "--storage", str(tmp_path / "searches")]):
            assert main(argv) == 2, argv
            line = _one_line(capsys)
            assert f"{copy} is in use by another ltsearch (pid {holder.pid} on {socket.gethostname()}" in line
        # reading needs no lock: export, and a report written elsewhere
        assert main(["export", str(copy), "--out", str(tmp_path / "x")]) == 0
        assert main(["report", str(copy), "--no-tracking", "--out", str(tmp_path / "page")]) == 0
    finally:
        holder.kill()  # SIGKILL: the OS drops its lock
        holder.wait()
    assert main(["report", str(copy), "--no-tracking"]) == 0


RACE = ("import sys\nfrom ltsearch.config import ConfigError\nfrom ltsearch.search.folder import FolderLock\n"
        "sys.stdin.readline()\n"
        "try:\n    FolderLock(sys.argv[1]).acquire()\nexcept ConfigError:\n    print('refused', flush=True)\n"
        "else:\n    print('holds', flush=True)\n    sys.stdin.readline()\n")


def test_two_processes_racing_for_a_fresh_folder_one_holds_it(tmp_path):
    """Twenty races between two processes let go at once, for a folder that does not exist yet."""
    for i in range(20):
        folder = tmp_path / f"race{i}"
        procs = [subprocess.Popen([sys.executable, "-c", RACE, str(folder)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
        time.sleep(0.3 if i else 2.0)  # imports done
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        said = sorted(p.stdout.readline().strip() for p in procs)
        for p in procs:
            p.stdin.close()
            p.wait(30)
        assert said == ["holds", "refused"], (i, said)


def test_two_confirms_at_once_run_each_run_once(finished, tmp_path, ray_address):
    """Both used to run all the runs: 8 runs for 4 asked, progress `8/4`, one LOST in
    trials.json where MLflow had 8 FINISHED."""
    folder, _, uri = finished
    copy = _copy(folder, tmp_path)
    cmd = [str(BIN / "ltsearch"), "confirm", str(copy), "--top", "1", "--seeds", "2", "--tracking-uri", uri,
           "--address", ray_address]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert f"{copy} is in use by another ltsearch" in refused and len(refused.strip().splitlines()) == 1
    runs = [r for r in _trials(copy).values() if r.get("confirm_of")]
    assert len(runs) == 2 and all(r["status"] == "COMPLETED" for r in runs)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    parent = client.search_runs([exp], f"tags.`ltsearch.search_dir` = '{copy}'")
    assert len(parent) == 1
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}' "
                                         "and tags.`ltsearch.role` = 'confirmation'")
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}


# ---------------------------------------------------------------------------------------------
# a stopped trial stays stopped; SIGTERM is a clean stop

def _rewind_snapshot(folder: Path, trial_ids: list[str], status: str = "RUNNING",
                     unreported: bool = False) -> None:
    """What a driver killed right after those trials ended leaves: Tune's newest experiment
    snapshot (taken every 2 s) still holds them unfinished while the records hold them ended
    (``unreported``: taken before their first result)."""
    state_path = max((folder / "ray").glob("experiment_state-*.json"))
    state = json.loads(state_path.read_text())
    for pair in state["trial_data"]:
        trial = json.loads(pair[0])
        if trial["trial_id"] in trial_ids:
            trial["status"] = status
            pair[0] = json.dumps(trial)
            if unreported:
                meta = json.loads(pair[1])
                meta.update(last_result={}, metric_analysis={}, metric_n_steps={})
                pair[1] = json.dumps(meta)
    state_path.write_text(json.dumps(state))


@pytest.mark.parametrize("unreported", [False, True])
def test_a_trial_stopped_just_before_the_driver_stays_stopped_on_resume(finished, tmp_path, capsys,
                                                                       unreported, status="RUNNING"):
    """It used to be trained to the end on --resume: COMPLETED in trials.json and MLflow, still
    PRUNED in Optuna, and it became best_config.yaml. (``unreported``: Tune's snapshot was
    taken before the trial's first result.)"""
    folder, path, uri = finished
    copy = _copy(folder, tmp_path)
    before = _trials(copy)
    ended = {s: [k for k, r in before.items() if r["status"] == s] for s in ("PRUNED", "COMPLETED")}
    assert ended["PRUNED"] and ended["COMPLETED"]
    rewound = ended["PRUNED"] + ended["COMPLETED"][:1]
    _rewind_snapshot(copy, rewound, status, unreported)
    results = {p: p.read_text() for p in (copy / "ray").glob("*/result.json")}
    best = yaml.safe_load((copy / "best_config.yaml").read_text())  # (its header names the folder)
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{copy / 'optuna.db'}")
    states = {t.number: t.state for t in study.trials}
    # a finished search resumes only to confirm (else Ray need not start): Tune restores the
    # search's experiment first
    capsys.readouterr()
    code = main(["search", str(path), "--resume", "--name", "f", "--storage", str(tmp_path / "searches"),
                 "--tracking-uri", uri, "--confirm", "1:1"])
    resumed = capsys.readouterr()
    assert code == 0, resumed.out[-3000:] + resumed.err[-3000:]
    assert "completed. Last result" not in resumed.out + resumed.err  # (Tune's, per skipped trial)
    after = _trials(copy)
    for k in rewound:
        assert {f: after[k][f] for f in ("status", "epochs", "metrics")} == \
               {f: before[k][f] for f in ("status", "epochs", "metrics")}, k
        assert f"started  {k[-8:]}" not in resumed.out
    assert {p: p.read_text() for p in (copy / "ray").glob("*/result.json")} == results
    assert yaml.safe_load((copy / "best_config.yaml").read_text()) == best
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{copy / 'optuna.db'}")
    assert {t.number: t.state for t in study.trials} == states
    confirmations = [r for r in after.values() if r.get("confirm_of")]
    assert len(confirmations) == 1 and confirmations[0]["status"] == "COMPLETED"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    parent = client.search_runs([exp], f"tags.`ltsearch.search_dir` = '{copy}'")[0].info.run_id
    runs = {r.data.tags["ltsearch.trial_id"]: r.info.status for r in
            client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")}
    want = {"COMPLETED": "FINISHED", "PRUNED": "KILLED"}
    assert {k: runs[k] for k in rewound} == {k: want[after[k]["status"]] for k in rewound}


def _stale_searcher_state(folder: Path, live: str, counter: int) -> None:
    """Tune's searcher snapshot as it was while trial ``live`` ran, beside a newer experiment
    snapshot: what a full disk leaves when one of Tune's files was written and the other not."""
    import cloudpickle

    path = max((folder / "ray").glob("search_gen_state-*.json"))
    state = cloudpickle.loads(path.read_bytes())
    limiter = next(v for k, v in state.items() if k.startswith("name:"))
    limiter.update(live_trials={live}, num_unfinished_live_trials=1)
    state["counter"] = counter
    path.write_bytes(cloudpickle.dumps(state))


def test_a_resume_from_tune_snapshots_out_of_step_finishes(finished, tmp_path, ray_address):
    """A resume from snapshot files a full disk left out of step (the searcher's older than the
    experiment's: it still counts an ended trial as running) used to wait for ever, deaf to
    Ctrl-C: the concurrency limit full of a trial Tune never runs again, no trial running.
    Given Tune's trials, the limiter forgets it, and starts no trial past the four asked for
    (its count of trials is as old). A driver of its own, killed if it hangs."""
    folder, path, uri = finished
    copy = _copy(folder, tmp_path)
    before = _trials(copy)
    order = sorted(before, key=lambda k: before[k]["started_at"])
    _rewind_snapshot(copy, order[-1:])  # the last trial unfinished in the experiment's snapshot
    _stale_searcher_state(copy, live=order[-2], counter=len(order) - 1)  # the one before, running
    cmd = [str(BIN / "ltsearch"), "search", str(path), "--resume", "--name", "f", "--storage",
           str(tmp_path / "searches"), "--tracking-uri", uri, "--confirm", "1:1", "--address", ray_address]
    try:  # ~20 s when it works (killed at 150 s once, with a benchmark running beside the suite)
        resumed = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    except subprocess.TimeoutExpired:
        raise AssertionError("the resume waited for ever (killed after 300 s)") from None
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = _trials(copy)
    own = {k: r for k, r in after.items() if not r.get("confirm_of")}
    assert {k: r["status"] for k, r in own.items()} == {k: r["status"] for k, r in before.items()}
    assert [r["status"] for r in after.values() if r.get("confirm_of")] == ["COMPLETED"]
    study = optuna.load_study(study_name="f", storage=f"sqlite:///{copy / 'optuna.db'}")
    assert len(study.trials) == len(before)  # no trial beyond the four asked for


def _group(pgid: int) -> list[int]:
    """The live processes of a process group (zombies are dead)."""
    pids = [int(d.name) for d in Path("/proc").glob("[0-9]*")]
    return [pid for pid in pids if (f := proc_stat(pid)) and int(f[2]) == pgid and f[0] != "Z"]


def test_sigterm_is_a_clean_stop_and_resume_finishes(tmp_path, ray_local):
    """SIGTERM to the driver's whole process group, its own local Ray included (what `timeout`,
    a closed terminal's SIGHUP and `ray job stop` do; Slurm signals every process of the job).
    Sent to the driver alone it used to exit 134 from Ray's fatal-signal handler with stack
    dumps, runs left RUNNING and no summary; sent to the group it stopped the local Ray too,
    and the driver waited a minute for its GCS, then exited 1 with every record RUNNING."""
    path = _search_file(tmp_path, num_samples=2, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    cmd = [str(BIN / "ltsearch"), "search", str(path), "--storage", str(tmp_path / "searches"),
           "--name", "t", "--tracking-uri", uri]
    folder = tmp_path / "searches" / "t"
    log = tmp_path / "driver.log"
    hold = Hold(tmp_path / "hold")  # the driver's own Ray's workers inherit it
    hold.at("0-1")  # the first trial after its first epoch: it cannot end before the signal
    driver = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                              env=hold.env(ENV), start_new_session=True)
    try:
        end = time.time() + 300
        while time.time() < end:
            trials = _trials(folder) if (folder / "trials.json").is_file() else {}
            if hold.reached("0-1") and any(r["status"] == "RUNNING" and r.get("epochs")
                                           for r in trials.values()):
                break
            time.sleep(0.3)
        else:
            raise AssertionError("no trial reported an epoch")
        os.killpg(driver.pid, signal.SIGTERM)  # the driver and its Ray's processes, as `timeout` does
        driver.wait(50)  # the GCS wait alone was 60 s
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    out = log.read_text()
    assert driver.returncode == 143, out[-3000:]
    _wait(lambda: not _group(driver.pid), 10, "the driver's Ray to be shut down")
    assert "stopped by SIGTERM — continue with `ltsearch search" in out and "--resume" in out
    assert "Traceback" not in out and "Fatal" not in out and "*** SIG" not in out
    trials = _trials(folder)
    assert "RUNNING" not in {r["status"] for r in trials.values()}
    interrupted = [k for k, r in trials.items() if r["status"] == "INTERRUPTED"]
    assert interrupted
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ltsearch").experiment_id
    runs = client.search_runs([exp])
    assert "RUNNING" not in {r.info.status for r in runs}
    by_trial = {r.data.tags.get("ltsearch.trial_id"): r.info.status for r in runs}
    assert all(by_trial[k] == "KILLED" for k in interrupted)
    parent = [r for r in runs if r.data.tags.get("ltsearch.kind") == "search"]
    assert [r.info.status for r in parent] == ["KILLED"]
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert optuna.trial.TrialState.WAITING in {t.state for t in study.trials}
    assert optuna.trial.TrialState.RUNNING not in {t.state for t in study.trials}

    assert main(cmd[1:] + ["--resume"]) == 0  # in this process, on the session's Ray
    trials = _trials(folder)
    assert len(trials) == 2 and {r["status"] for r in trials.values()} == {"COMPLETED"}
    study = optuna.load_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert {r.info.status for r in client.search_runs([exp])} == {"FINISHED"}


def test_a_full_disk_ends_like_a_driver_error(tmp_path, ray_address, capsys):
    """A search folder on a 12 MB tmpfs that fills up mid-search used to print ~250 lines of
    tracebacks, then "everything recorded is closed" while MLflow runs stayed RUNNING. Once
    space is freed, `--resume` finishes in agreement, or, where the full disk cut one of Tune's
    snapshot files short, refuses it by name (which one depends on the moment)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        path = _search_file(tmp_path, num_samples=3, asha={"enabled": False})
        uri = fresh_store(tmp_path)  # the store is on another disk
        cmd = [str(BIN / "ltsearch"), "search", str(path), "--storage", str(disk), "--name", "d",
               "--tracking-uri", uri, "--address", ray_address]
        folder = disk / "d"
        driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        end = time.time() + 300
        while time.time() < end and driver.poll() is None:
            trials = _trials(folder) if (folder / "trials.json").is_file() else {}
            if any(r["status"] == "RUNNING" and r.get("epochs") for r in trials.values()):
                break
            time.sleep(0.2)
        filler = disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        out = driver.communicate(timeout=300)[0]
        assert driver.returncode == 1, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(folder) in errors[0], out[-3000:]  # (which file: the moment's)
        assert ("No space left on device" in errors[0]
                or "database or disk is full (the Optuna study)" in errors[0]), out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert "not written: " in out and "closes every record" in out and "--resume" in out, out[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("ltsearch").experiment_id
        assert "RUNNING" not in {r.info.status for r in client.search_runs([exp])}

        filler.unlink()  # space freed: the resume finishes in agreement, or refuses a file
        capsys.readouterr()  # the full disk cut short by name (restore it from a copy)
        code = main(cmd[1:] + ["--resume"])
        said = capsys.readouterr()
        if code == 2:
            err = said.err.strip().splitlines()
            assert len(err) == 1 and str(folder) in err[0] and "damaged" in err[0], said.err
        else:
            assert code == 0, said.out[-3000:] + said.err[-3000:]
            trials = _trials(folder)
            assert len(trials) >= 3 and {r["status"] for r in trials.values()} <= {"COMPLETED", "LOST"}
            study = optuna.load_study(study_name="d", storage=f"sqlite:///{folder / 'optuna.db'}")
            assert {t.state.name for t in study.trials} <= {"COMPLETE", "FAIL"}
            assert {r.info.status for r in client.search_runs([exp])} == {"FINISHED"}
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_the_studys_database_on_a_full_disk_is_named(tmp_path):
    """The Optuna study's sqlite on a full disk says "database or disk is full" through
    sqlalchemy, Optuna and Tune: the search's error line names the study's file, as an OSError
    does. Here the database is held at its size (sqlite's max_page_count) rather than its disk
    filled; any other error of the same chain is left as it is."""
    import sqlite3

    import sqlalchemy
    from ray.tune.error import TuneError

    from ltsearch.search.run import _own_cause

    db = tmp_path / "optuna.db"
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    study = optuna.create_study(storage=storage, study_name="s")
    with sqlite3.connect(db) as conn:
        pages = conn.execute("pragma page_count").fetchone()[0]
    sqlalchemy.event.listen(storage.engine, "connect",
                            lambda conn, _: conn.execute(f"pragma max_page_count={pages}"))
    storage.engine.dispose()  # every connection from now on holds the file at its size

    def wrapped(fail):
        try:
            try:
                fail()
            except Exception as e:
                raise TuneError("Traceback (most recent call last): …") from e
        except TuneError as e:
            return _own_cause(e, db)

    def fill():
        for i in range(10_000):
            study.ask().suggest_float("x", 0.0, 1.0)

    cause = wrapped(fill)
    assert isinstance(cause, OSError) and cause.filename == str(db), repr(cause)
    assert "database or disk is full (the Optuna study)" in cause.strerror
    other = wrapped(lambda: optuna.load_study(study_name="missing", storage=storage))
    assert type(other).__name__ == "KeyError"


def test_a_disk_error_without_a_file_names_the_search_folder(tmp_path, capsys):
    """A write to a file already open on a full disk raises an OSError that names no file
    (seen once in the full-disk test above, depending on the moment): the error line names
    the search's folder, where Ray's snapshots and the records are written."""
    import errno
    from types import SimpleNamespace

    from ltsearch.search.command import print_stopped
    from ltsearch.search.finish import SearchOutcome, SearchStopped

    outcome = SearchOutcome(tmp_path / "d", SimpleNamespace(trials={}), None, "", "", "",
                            ending="failed")
    for cause, named in ((OSError(errno.ENOSPC, "No space left on device"), tmp_path / "d"),
                         (OSError(errno.ENOSPC, "No space left on device", "/x/trials.json"),
                          "/x/trials.json")):
        assert print_stopped(SearchStopped(outcome, cause), "d", None, "again") == 1
        [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert "No space left on device" in error and str(named) in error, error


def test_sighup_and_sigterm_reach_whatever_handles_ctrl_c_and_wait_while_records_close():
    """Tune's SIGINT handler is what stops a search cleanly: SIGTERM and SIGHUP are handed to it;
    with Python's own handler they raise KeyboardInterrupt; while the records close, any stop
    only waits."""
    from ltsearch.search.signals import StopSignals

    seen = []
    term_before = signal.getsignal(signal.SIGTERM)
    saved = signal.signal(signal.SIGINT, lambda sig, frame: seen.append(sig))  # as Tune's
    try:
        with StopSignals() as stops:
            os.kill(os.getpid(), signal.SIGHUP)
            assert seen == [signal.SIGINT] and stops.exit_status() == 129
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
            assert stops.exit_status() == 129  # the first stop names the ending
            with stops.closing_records():
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == term_before
    finally:
        signal.signal(signal.SIGINT, saved)


def _signals(pid: int, field: str) -> set[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field))
    mask = int(line.split()[1], 16)
    return {s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if mask >> (s - 1) & 1}


def test_processes_started_while_children_are_spared_hold_a_stop_pending_and_the_driver_does_not():
    """What keeps a search's local Ray up under a stop meant for the job: its processes are
    started with SIGTERM and SIGHUP blocked (a stop stays pending, never delivered, until
    `ray.shutdown` kills them); the driver's own mask is as it was."""
    from ltsearch.search.signals import spared_children

    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    with spared_children():
        spared = subprocess.Popen(sleep)
    plain = subprocess.Popen(sleep)
    try:
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        assert _signals(spared.pid, "SigBlk:") == {signal.SIGTERM, signal.SIGHUP}
        assert _signals(plain.pid, "SigBlk:") == set()
        for proc in (spared, plain):
            proc.send_signal(signal.SIGTERM)
        assert plain.wait(10) == -signal.SIGTERM
        assert _signals(spared.pid, "ShdPnd:") == {signal.SIGTERM} and spared.poll() is None
    finally:
        for proc in (spared, plain):
            proc.kill()
            proc.wait()

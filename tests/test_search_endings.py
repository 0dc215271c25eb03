"""`ltsearch search` endings that must not leave a search stuck: bad input refused before Ray
starts or any run is created, an unreachable tracking server, concurrent first opens of one
MLflow store."""
import copy
from pathlib import Path
import socket
import subprocess
import sys
import time

import pytest
import yaml

from conftest import free_port, tiny_search
from ltsearch.cli import main
from ltsearch.config import ConfigError
from ltsearch.search.space import parse_search_file


def test_values_that_combine_into_an_invalid_trial_are_refused_up_front():
    """`train.epochs` and an absolute `weights.start` both searched: each end is valid alone,
    start 5 of 3 epochs is not. It used to surface as failing trials mid-search."""
    data = tiny_search(train={"epochs": {"choice": [6, 3]}},
                       method={"two_stage": {"weights.start": {"int": [2, 5]}}})
    with pytest.raises(ConfigError) as e:
        parse_search_file(copy.deepcopy(data))
    assert e.value.key == "space.method.two_stage.weights.start"
    assert "value 5 with space.train.epochs = 3" in str(e.value) and "below train.epochs" in str(e.value)
    data["space"]["method"]["two_stage"]["weights.start"] = {"uniform": [0.5, 0.9]}  # fractions fit
    assert parse_search_file(data).methods["two_stage"]


def test_a_choice_against_a_range_is_checked_whatever_the_space_size():
    """τs as a choice against a τg range was caught only after Ray and MLflow had started;
    large spaces were checked at only 256 corner combinations."""
    many = {f"stage2.{k}": {"choice": list(range(1, 9))} for k in ("k", "aug_per_tail")}
    data = tiny_search(method={"feature_aug": {**many,
                                               "stage2.epochs": {"choice": list(range(1, 9))},
                                               "stage2.tau_s": {"choice": [0.5, 0.8]},
                                               "stage2.tau_g": {"uniform": [0.1, 0.6]}}})
    with pytest.raises(ConfigError) as e:
        parse_search_file(data)
    assert e.value.key.startswith("space.method.feature_aug.stage2.tau_")
    assert "tau_s" in str(e.value)


@pytest.mark.parametrize("params,key,text", [
    ({"stage2.k": {"int": [1, 6]}}, "space.method.feature_aug.stage2.k",
     "value 6: needs 6 head classes; the tail split leaves 5 (tail_fraction=0.5"),
    ({"stage2.tail_count": {"int": [20, 200]}}, "space.method.feature_aug.stage2.tail_count",
     "value 200: tail_count=200 leaves 0 head classes on this data (10 classes of 128 down to 14"),
    ({"stage2.tail_count": 5}, "space.method.feature_aug", "value 5: tail_count=5 leaves no tail class"),
])
def test_a_tail_split_the_data_cannot_give_is_refused_before_ray(tmp_path, capsys, params, key, text):
    """feature_aug's tail split against the data's class counts (digits-LT IF=10: 10 classes,
    128 down to 14 images) failed every such trial inside Ray; now the search exits 2 first."""
    data = tiny_search(method={"ce": {}, "feature_aug": params})
    data["search"]["tracking"] = "none"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and text in err[0] and str(path) in err[0], err
    assert not (tmp_path / "s" / "s").exists()  # no search folder, no Ray


def test_a_metric_no_trial_reports_is_refused(tmp_path, capsys):
    data = tiny_search(method={"ce": {}})
    data["search"]["metric"] = "val/balanced_accuracy"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "search.metric" in err[0] and "val/balanced_acc" in err[0]
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("how", ["auto, nothing recorded", "auto, a stale record", "RAY_ADDRESS"])
def test_a_cluster_named_by_auto_or_ray_address_must_answer_before_ray(tmp_path, capsys, monkeypatch, how):
    """`--address auto` with no `ray start` on this machine used to leave a search folder and a
    FAILED MLflow run behind and exit 1 with Ray's message (a stale record: Ray retried it for
    ever); RAY_ADDRESS (`ray job submit` sets it) was ignored and a local Ray started instead."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_search(method={"ce": {}})))
    port = free_port()
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))  # where `ray start` records its cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["search", str(path), "--storage", str(tmp_path / "s"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        expected = f"error: RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:{port} ("
    else:
        args += ["--address", "auto"]
        expected = ("error: --address: auto: no cluster was started with `ray start` on this "
                    "machine (none recorded in ")
        if how == "auto, a stale record":
            (tmp_path / "tmp" / "ray").mkdir(parents=True)
            (tmp_path / "tmp" / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
            expected = (f"error: --address: no Ray cluster answers at 127.0.0.1:{port} "
                        f"(auto: the cluster `ray start` recorded in {tmp_path / 'tmp' / 'ray'}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "s").exists() and not (tmp_path / "mlflow.db").exists()


def test_which_cluster_a_search_joins(tmp_path, monkeypatch):
    """Left out, `--address` is RAY_ADDRESS when set (as ray.init reads it), else a fresh local
    Ray; `auto` is RAY_ADDRESS, else the cluster `ray start` recorded; `local` is always fresh."""
    from ltsearch.search.checks import resolve_address

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        here = f"127.0.0.1:{listening.getsockname()[1]}"
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        assert resolve_address(None) is None and resolve_address("local") is None
        assert resolve_address(here) == here and resolve_address(f"ray://{here}") == f"ray://{here}"
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(here + "\n")
        assert resolve_address("auto") == here
        assert resolve_address(None) is None  # a recorded cluster is joined only when asked
        monkeypatch.setenv("RAY_ADDRESS", here)
        assert resolve_address(None) == here and resolve_address("auto") == here
        assert resolve_address("local") is None
        monkeypatch.setenv("RAY_ADDRESS", "auto")  # what `ray job submit` gives its entrypoint
        assert resolve_address(None) == here


def test_unreachable_tracking_server_fails_fast(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_search(method={"ce": {}})))
    start = time.monotonic()
    code = main(["search", str(path), "--storage", str(tmp_path / "s"),
                 "--tracking-uri", f"http://127.0.0.1:{free_port()}"])
    # one try: MLflow's default retries would take minutes (2 + 4 + … + 128 s)
    assert code == 2 and time.monotonic() - start < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --tracking-uri: no MLflow server answers")
    assert not (tmp_path / "s").exists()  # before Ray, before any folder


OPEN_STORE = """
import sys
from ltsearch.search.tracking import experiment_id
print(experiment_id(sys.argv[1], "ltsearch"))
"""


def test_two_searches_creating_one_fresh_store_at_once(tmp_path):
    """Two first opens of a fresh mlflow.db at the same moment crashed one in three pairs and
    could corrupt the store for good ("table _alembic_tmp_tags already exists"). Without the
    lock one pair failed here 3 times in 3 (and every pair of two before that)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert outs[0][0].strip() == outs[1][0].strip()  # one experiment, found by both
    again = subprocess.run([sys.executable, "-c", OPEN_STORE, uri], capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == outs[0][0].strip()


def _waiting_for_flock(path: Path) -> bool:
    """Whether some process waits in flock() for ``path`` (``/proc/locks`` lists waiters with
    ``->``)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_the_first_open_of_a_store_waits_for_the_stores_lock(tmp_path):
    """The lock itself, without a race's luck: while it is held, a first open waits in flock
    and creates nothing; released, it creates the store and the experiment."""
    import threading

    from ltsearch.search.tracking import _store_lock, experiment_id

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    found = []
    with _store_lock(uri):
        opener = threading.Thread(target=lambda: found.append(experiment_id(uri, "ltsearch")))
        opener.start()
        lock = Path(str(db) + ".lock")
        end = time.monotonic() + 60
        while not _waiting_for_flock(lock) and opener.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        assert _waiting_for_flock(lock) and not db.exists()
    opener.join(60)
    assert found and db.exists()


def test_reading_a_finished_search_needs_neither_ray_nor_mlflow():
    code = ("import sys, ltsearch.search.export, ltsearch.search.records; "
            "print(sorted(m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    # nor torch, for the records and the store (every process opening an MLflow store imports them)
    code = ("import sys, ltsearch.search.records, ltsearch.search.tracking; "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]


def test_storage_that_cannot_be_written(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_search(method={"ce": {}})))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for storage, text in ((blocker, "is a file"), ("/proc/ltsearch-searches", "cannot write")):
        assert main(["search", str(path), "--storage", str(storage),
                     "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --storage") and text in err[0]
    assert not (tmp_path / "m.db").exists()  # no MLflow store touched


def test_a_finished_search_closes_trials_ray_never_recorded_as_lost(tmp_path):
    """A trial started moments before the driver stopped (a lost tracking server, Ctrl-C) and
    after Tune's last snapshot is INTERRUPTED in the records, but the resumed Tune never knew
    it: once the search finishes it used to stay INTERRUPTED, as if --resume could continue it."""
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.finish import finish_search
    from ltsearch.search.opened import Search
    from ltsearch.search.tracker import Tracker

    space = parse_search_file(tiny_search(method={"ce": {}}))
    folder = tmp_path / "s"
    folder.mkdir()
    records = TrialRecords(folder)
    for trial_id, status in (("known", "COMPLETED"), ("unknown", "INTERRUPTED"), ("running", "RUNNING")):
        records.update(trial_id, method="ce", config={}, status=status, epochs=0, metrics={})
    search = Search(space, "s", folder, True, None, Tracker(), "", tune_trial_ids={"known"})
    finish_search(search, "finished")
    after = {k: r["status"] for k, r in TrialRecords(folder).trials.items()}
    assert after == {"known": "COMPLETED", "unknown": "LOST", "running": "LOST"}


def _cli(args, env_extra, cwd):
    import os
    from pathlib import Path

    env = dict(os.environ, **env_extra)  # conftest set the rest
    return subprocess.run([str(Path(sys.executable).parent / "ltsearch"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_ray_failing_to_start_is_reported_as_itself_and_the_records_are_closed(tmp_path):
    """Ray cannot start (its temp dir lies under a file): the user reads Ray's error, not a
    KeyError from closing an Optuna study that was never created, and nothing stays RUNNING."""
    from mlflow import MlflowClient

    (tmp_path / "a_file").write_text("")
    path = tmp_path / "s.yaml"
    search = tiny_search(method={"ce": {}})
    search["search"]["asha"]["bracket"] = 4  # (6 trials: ranked in brackets, and the line says so)
    path.write_text(yaml.safe_dump(search))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = _cli(["search", str(path), "--tracking-uri", uri],
               {"RAY_TMPDIR": str(tmp_path / "a_file" / "ray")}, tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert err == [err[0], f"  everything recorded is closed; fix the cause, then "  # not --resume:
                           f"`ltsearch search {path}`"], out.stderr           # nothing to resume
    assert err[0].startswith("error: the search stopped: NotADirectoryError:"), out.stderr
    lines = out.stdout.strip().splitlines()
    assert "KeyError" not in out.stdout and lines[0].endswith("; starting a local Ray")
    assert lines[0].startswith("search s: 6 trials over 1 method, rungs at 0.33 / 1 of each run "
                               "(η 2, ranked in brackets of 4), 1 at a time, in "), lines[0]
    assert lines[1:3] == ["", "search s: no trial ran"], out.stdout
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_a_ray_address_nothing_answers_at_is_refused_before_ray(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_search(method={"ce": {}})))
    port = free_port()
    assert main(["search", str(path), "--storage", str(tmp_path / "s"),
                 "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --address: no Ray cluster answers at "
                                               f"127.0.0.1:{port}"), err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_a_trial_this_machine_cannot_hold_is_refused_before_ray(tmp_path, capsys, kind):
    """A local Ray has this machine's CPUs and GPUs and nothing else will join it: a trial
    asking for more used to leave every trial PENDING, silently, for ever."""
    import os

    import torch

    have = torch.cuda.device_count() if kind == "gpu" else os.cpu_count()
    data = tiny_search(method={"ce": {}})
    data["search"]["resources"] = {"cpu": 1, kind: have + 1}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--storage", str(tmp_path / "s"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith(f"error: search.resources.{kind}: ")
    asked = f"{have + 1} {kind.upper()}" + ("s" if have else "")
    assert f"asks for {asked} per trial; this machine has {have}" in err
    assert out == "" and not (tmp_path / "s").exists() and not (tmp_path / "m.db").exists()


def test_which_trials_a_rays_nodes_can_hold(ray_local):
    """Against a real Ray's nodes (the session's: 2 CPUs, no GPU): what a joined cluster is
    checked with once Ray is up (it warns there: an autoscaling cluster may add the node)."""
    from ltsearch.search.checks import nodes_for
    from ltsearch.search.settings import Resources

    assert nodes_for(Resources(cpu=1, gpu=0)) == 1 and nodes_for(Resources(cpu=2, gpu=0)) == 1
    assert nodes_for(Resources(cpu=1, gpu=0.5)) == 0 and nodes_for(Resources(cpu=3, gpu=0)) == 0

"""`ltsearch train` on bad input: one message naming the key or file, exit status 2, nothing
half-written (issue: every ending is clean)."""
import pickle

import pytest
import torch
import yaml

from ltsearch.cli import main
from ltsearch.config import ConfigError

CFG = {"data": {"source": "digits", "augment": {"crop_pad": 0, "hflip": False}},
       "train": {"preset": "none", "epochs": 1, "batch_size": 64, "lr": 0.02, "warmup_epochs": 0,
                 "schedule": "cosine", "device": "cpu"}}


def _write(tmp_path, cfg=CFG, text=None):
    path = tmp_path / "c.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(cfg))
    return path


def _fails(capsys, argv, key):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {key}"), err
    return err[0]


def test_config_error_survives_pickling():
    """A trial's ConfigError crossed Ray as `TypeError: ConfigError.__init__() missing 1
    required positional argument`; the real message was lost."""
    e = pickle.loads(pickle.dumps(ConfigError("method.weights.start", "must be below 4")))
    assert isinstance(e, ConfigError) and e.key == "method.weights.start"
    assert str(e) == "method.weights.start: must be below 4"


@pytest.mark.parametrize("device,text", [("banana", "not a device"),
                                         ("cuda", "CUDA is not available"),
                                         ("mps", "not supported")])
def test_unavailable_device(tmp_path, capsys, device, text):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "o"
    msg = _fails(capsys, ["train", str(_write(tmp_path)), "--out", str(out), "--device", device],
                 "train.device")
    assert text in msg and not out.exists()


def test_out_is_a_file_or_unwritable(tmp_path, capsys):
    path = _write(tmp_path)
    target = tmp_path / "file"
    target.write_text("x")
    assert "is a file" in _fails(capsys, ["train", str(path), "--out", str(target)], "--out")
    assert "cannot write" in _fails(capsys, ["train", str(path), "--out", "/proc/ltsearch-out"],
                                    "--out")


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_epochs_below_one(tmp_path, capsys, epochs):
    out = tmp_path / "o"
    _fails(capsys, ["train", str(_write(tmp_path)), "--out", str(out), "--epochs", epochs],
           "--epochs")
    assert not out.exists()


def test_corrupt_checkpoint(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    msg = _fails(capsys, ["train", str(_write(tmp_path)), "--out", str(out), "--resume"], "--resume")
    assert "checkpoint.pt" in msg
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]  # nothing written


def test_resume_without_a_checkpoint_says_it_starts_afresh(tmp_path, capsys):
    """`--resume` on a first launch (a job script that always passes it) trains from epoch 1,
    and says so: it used to start afresh in silence, as if it had resumed. It checkpoints every
    epoch unless told otherwise: without `--checkpoint-every` nothing was ever saved to resume."""
    out = tmp_path / "o"
    assert main(["train", str(_write(tmp_path)), "--out", str(out), "--resume"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"--resume: no checkpoint in {out} yet: training from epoch 1" in lines
    assert (out / "metrics.json").is_file() and (out / "checkpoint.pt").is_file()
    assert main(["train", str(_write(tmp_path)), "--out", str(out), "--resume"]) == 0
    assert f"resumed from {out / 'checkpoint.pt'} at epoch 1" in capsys.readouterr().out


def test_non_finite_values_and_duplicate_keys(tmp_path, capsys):
    text = yaml.safe_dump(CFG).replace("lr: 0.02", "lr: .inf")
    msg = _fails(capsys, ["train", str(_write(tmp_path, text=text))], "train.lr")
    assert "finite" in msg
    text = yaml.safe_dump(CFG).replace("lr: 0.02", "lr: 0.02\n  lr: 0.5")
    path = _write(tmp_path, text=text)
    msg = _fails(capsys, ["train", str(path)], str(path))
    assert "duplicate key 'lr'" in msg


def test_data_error_writes_nothing(tmp_path, capsys):
    cfg = {**CFG, "data": {"source": "imagefolder", "root": str(tmp_path / "none")}}
    out = tmp_path / "o"
    assert main(["train", str(_write(tmp_path, cfg)), "--out", str(out)]) == 2
    assert "data folder not found" in capsys.readouterr().err and not out.exists()


def test_divergence_exits_1_naming_the_epoch_and_keeps_the_metrics(tmp_path, capsys):
    cfg = {**CFG, "train": {**CFG["train"], "lr": 1e30}}
    out = tmp_path / "o"
    assert main(["train", str(_write(tmp_path, cfg)), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: non-finite training loss") and "epoch 1" in err[0]
    import json
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["epochs"] == 1


def test_checkpoint_every_n_epochs_holds_the_last_multiple(tmp_path, capsys, monkeypatch):
    cfg = {**CFG, "train": {**CFG["train"], "epochs": 3}}
    out = tmp_path / "o"
    seen = []
    real_save = torch.save

    def save(obj, path, *a, **k):  # the epoch each checkpoint holds, as it is written
        seen.append(obj["epoch"])
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", str(_write(tmp_path, cfg)), "--out", str(out), "--checkpoint-every", "2"]) == 0
    monkeypatch.undo()
    assert seen == [2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert main(["train", str(_write(tmp_path, cfg)), "--out", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none" / "checkpoint.pt").exists()  # not asked: none written


def test_time_limit_stops_after_the_epoch_that_passes_it_and_tests(tmp_path, capsys):
    cfg = {**CFG, "train": {**CFG["train"], "epochs": 50}}
    out = tmp_path / "o"
    assert main(["train", str(_write(tmp_path, cfg)), "--out", str(out), "--time-limit", "0.0001"]) == 0
    said = capsys.readouterr().out
    assert "stopped by the time limit after 1 of 50 epochs" in said
    import json
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "stopped" and metrics["epochs"] == 1
    assert "test/top1" in metrics["metrics"]  # evaluated on test where it stopped


@pytest.mark.parametrize("every,due", [(None, [False, True, False, True, False]),
                                       (2, [False, True, False, True, True])])
def test_trial_checkpoints_by_time_or_by_epochs(monkeypatch, every, due):
    """By default a trial saves once 60 s of its time passed since its last save, never at its
    end (a finished trial is not resumed); ``checkpoint_every: N`` every N epochs and at the end.
    Epochs 1–5 of 5 at 30, 61, 90, 125 and 130 s, a save at each due one."""
    from ltsearch.search import trial

    now = [0.0]
    monkeypatch.setattr(trial.time, "monotonic", lambda: now[0])
    policy = trial.CheckpointPolicy(every, 60.0)
    said = []
    for epoch, t in zip(range(1, 6), (30, 61, 90, 125, 130)):
        now[0] = t
        said.append(policy.due(epoch, 5))
        if said[-1]:
            policy.saved()
    assert said == due

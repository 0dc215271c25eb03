import re

import pytest
import yaml

from ltsearch.cli import main
from ltsearch.config import ConfigError
from ltsearch.runconfig import config_from_dict, dump_config


@pytest.mark.parametrize("cfg,key,text", [
    ({"trian": {}}, "trian", "unknown key"),
    ({"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
    ({"train": {"lr": -1}}, "train.lr", "must be > 0"),
    ({"train": {"epochs": 1.5}}, "train.epochs", "must be an integer"),
    ({"data": {"source": "mnist"}}, "data.source", "must be one of"),
    ({"data": {"imbalance_factor": 0.5}}, "data.imbalance_factor", ">= 1"),
    ({"method": {"name": "mixup"}}, "method.name", "unknown method 'mixup'"),
    ({"method": {"name": "reweight", "weights": {"beta": 1.0}}}, "method.weights.beta", "must be < 1"),
    ({"method": {"name": "reweight", "weights": {"beta": -0.1}}}, "method.weights.beta", "must be >= 0"),
    ({"method": {"name": "ce", "beta": 0.9}}, "method.beta", "unknown key"),
    ({"method": {"name": "ce", "loss": {"name": "ce", "gamma": 2}}}, "method.loss.gamma",
     "not a parameter of loss 'ce'"),
    ({"method": {"loss": "hinge"}}, "method.loss.name", "unknown loss 'hinge'"),
    ({"method": {"name": "two_stage", "weights": {"start": 300}}}, "method.weights.start",
     "below train.epochs"),
    ({"method": {"name": "two_stage", "weights": {"start": 1.5}}}, "method.weights.start",
     "fraction of the run"),
    ({"method": {"name": "bbn", "mixup": {"alpha": 1.0}}}, "method.mixup", "single-branch"),
    ({"method": {"name": "bbn", "stage2": "crt"}}, "method.stage2", "needs the plain classifier"),
    ({"method": {"name": "ldam_drw", "stage2": "tau_norm"}}, "method.stage2", "normed classifier"),
    ({"method": {"name": "custom", "stage2": {"name": "crt", "loss": {"name": "las", "x": 1}}}},
     "method.stage2.loss.x", "not a parameter of loss 'las'"),
    ({"method": {"name": "custom", "sampler": {"then": "balanced"}}}, "method.sampler.start",
     "switch"),
    ({"method": {"name": "weight_balancing", "train": {"lr": -1}}}, "method.train.lr", "> 0"),
    ({"train": {"metrics": {"few_threshold": 500}}}, "train.metrics.few_threshold", "many_threshold"),
    ({"train": {"milestones": [100, "x"]}}, "train.milestones[1]", "integer"),
])
def test_config_errors_name_the_key(cfg, key, text):
    with pytest.raises(ConfigError) as e:
        config_from_dict(cfg)
    assert e.value.key == key and text in str(e.value)


def test_presets_and_round_trip():
    cfg = config_from_dict({"train": {"preset": "bbn_cifar", "lr": 0.05}})
    assert cfg.train.milestones == [120, 160] and cfg.train.nesterov and cfg.train.lr == 0.05
    assert config_from_dict({}).train.milestones == [160, 180]
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


@pytest.mark.parametrize("method", [
    {"name": "mislas"}, {"name": "weight_balancing", "train": {"weight_decay": 0.001}},
    {"name": "custom", "loss": {"name": "focal", "gamma": 2.0}, "weights": {"start": 0.5},
     "sampler": {"then": "progressive", "start": 120}, "mixup": {"kind": "cutmix"},
     "stage2": {"name": "lws"}, "posthoc": {"logit_adjust": 0.5}},
    {"name": "bbn", "arch": {"schedule": "separated", "switch_epoch": 100}},
])
def test_every_recipe_round_trips(method):
    cfg = config_from_dict({"method": method})
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_method_presets_carry_their_training_recipe():
    """BBN's published number uses its own schedule (Nesterov, ×0.01 at 120 and 160), not
    LDAM's: the preset fills the train keys a config leaves out (fidelity fix 1)."""
    bbn = config_from_dict({"method": {"name": "bbn"}}).train
    assert bbn.preset == "bbn_cifar" and bbn.nesterov and bbn.milestones == [120, 160]
    ce = config_from_dict({"method": {"name": "ce"}}).train
    assert ce.preset == "cifar_lt" and not ce.nesterov and ce.milestones == [160, 180]
    # explicit train keys still win, and method.train overrides even those
    given = config_from_dict({"train": {"nesterov": False, "weight_decay": 1e-3},
                              "method": {"name": "bbn"}}).train
    assert not given.nesterov and given.milestones == [120, 160] and given.weight_decay == 1e-3
    wb = config_from_dict({"train": {"weight_decay": 1e-3},
                           "method": {"name": "weight_balancing", "train": {"weight_decay": 0.01}}})
    assert wb.train.weight_decay == 0.01
    assert config_from_dict({"method": {"name": "weight_balancing"}}).train.weight_decay == 5e-3
    # a preset's milestones are relative to its length
    short = config_from_dict({"train": {"epochs": 20}, "method": {"name": "bbn"}}).train
    assert short.milestones == [12, 16] and short.warmup_epochs == 5


def test_lr_schedule():
    t = config_from_dict({}).train
    assert [t.lr_at(e) for e in range(5)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert t.lr_at(159) == pytest.approx(0.1)
    assert t.lr_at(160) == pytest.approx(1e-3) and t.lr_at(199) == pytest.approx(1e-5)
    c = config_from_dict({"train": {"schedule": "cosine", "warmup_epochs": 0, "epochs": 10}}).train
    assert c.lr_at(0) == pytest.approx(0.1) and c.lr_at(5) == pytest.approx(0.05)


def test_cli_exit_2_with_one_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 0.1\n  epocs: 3\n")
    assert main(["train", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: train.epocs: unknown key")
    path.write_text("train: [unclosed\n")
    assert main(["train", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_cli_missing_data_folder(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": "imagefolder", "root": str(tmp_path / "x")}}))
    assert main(["train", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "data folder not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "predict", "search", "confirm", "export", "report"])
def test_every_argument_of_every_command_says_what_it_is(command, capsys):
    """`ltsearch COMMAND --help` describes each argument: an entry is its names, then its help
    on the same line (two spaces or more after them) or indented on the next lines."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    lines = capsys.readouterr().out.split("positional arguments:")[1].splitlines()
    silent = [line.strip() for i, line in enumerate(lines)
              if re.match(r"  \S", line) and not re.search(r"\S {2,}\S", line.strip())
              and not (i + 1 < len(lines) and re.match(r" {6,}\S", lines[i + 1]))]
    assert silent == [], silent

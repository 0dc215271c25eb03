import pytest
import yaml

from ltsearch.cli import main
from ltsearch.config import ConfigError, config_from_dict, dump_config


@pytest.mark.parametrize("cfg,key,text", [
    ({"trian": {}}, "trian", "unknown key"),
    ({"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
    ({"train": {"lr": "fast"}}, "train.lr", "must be a number"),
    ({"train": {"lr": -1}}, "train.lr", "must be > 0"),
    ({"train": {"epochs": 1.5}}, "train.epochs", "must be an integer"),
    ({"data": {"source": "mnist"}}, "data.source", "must be one of"),
    ({"data": {"imbalance_factor": 0.5}}, "data.imbalance_factor", ">= 1"),
    ({"method": {"name": "mixup"}}, "method.name", "unknown method 'mixup'"),
    ({"method": {"name": "reweight", "beta": 1.0}}, "method.beta", "must be < 1"),
    ({"method": {"name": "reweight", "beta": -0.1}}, "method.beta", "must be >= 0"),
    ({"method": {"name": "ce", "beta": 0.9}}, "method.beta", "not a parameter of method 'ce'"),
    ({"method": {"name": "two_stage", "defer_epoch": 300}}, "method.defer_epoch", "below train.epochs"),
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

"""Search-space files: conditional parameters and validation before Ray starts (no Ray here)."""
import copy

import optuna
import pytest
import yaml

from conftest import ROOT
from ltsearch.cli import main
from ltsearch.config import ConfigError, config_from_dict
from ltsearch.search.space import load_search_file, parse_search_file

QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def test_conditional_parameters_appear_only_for_their_method():
    space = load_search_file(QUICKSTART)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(300):
        trial = study.ask()
        space.define(trial)
        params = trial.params
        study.tell(trial, 0.0)
        method = params["method"]
        seen.add(method)
        own = {k.split(".", 1)[1] for k in params if k.startswith(method + ".")}
        others = [k for k in params if k not in ("method", "train.lr", "train.weight_decay")
                  and not k.startswith(method + ".")]
        assert not others, (method, others)
        if method == "reweight":
            assert ("beta" in own) == (params["reweight.weighting"] == "effective")
            assert ("gamma" in own) == (params["reweight.loss"] == "focal")
        if method == "two_stage":
            v = params["two_stage.variant"]
            assert ("defer_epoch" in own) == (v in ("drw", "drs"))
            assert ("beta" in own) == (v == "drw")
            assert ("crt_epochs" in own) == ("crt_lr" in own) == (v == "crt")
        if method == "bbn":
            assert ("beta_a" in own) == (params["bbn.schedule"] == "beta")
            assert ("switch_epoch" in own) == (params["bbn.schedule"] == "separated")
        if method == "feature_aug":
            assert params["feature_aug.tau_g"] < params["feature_aug.tau_s"]
        cfg = config_from_dict(space.trial_config(params))  # every trial is a valid config
        assert cfg.method.name == method
    assert seen == {"ce", "reweight", "resample", "two_stage", "bbn", "feature_aug"}


def test_max_epochs_counts_second_phases():
    space = load_search_file(QUICKSTART)
    assert space.max_epochs() == 4 + 2  # cRT / feature_aug stage 2 add up to 2 epochs


def _file(**space):
    return {"base": {"train": {"epochs": 4, "preset": "none", "warmup_epochs": 0}},
            "search": {"num_samples": 2}, "space": space}


@pytest.mark.parametrize("data,key,text", [
    (_file(method={"mixup": {}}), "space.method.mixup", "unknown method 'mixup'"),
    (_file(train={"lr": {"uniform": [0.1, 0.01]}}), "space.train.lr.uniform", "empty range"),
    (_file(train={"lr": {"loguniform": [0, 0.1]}}), "space.train.lr.loguniform", "low > 0"),
    (_file(method={"ce": {"beta": {"uniform": [0.9, 0.99]}}}), "space.method.ce.beta",
     "not a parameter of method 'ce'"),
    (_file(method={"reweight": {"beta": {"uniform": [0.9, 1.0]}}}), "space.method.reweight.beta",
     "value 1.0: must be < 1.0"),
    (_file(method={"reweight": {"beta": {"choice": [-0.5, 0.9]}}}), "space.method.reweight.beta",
     "must be >= 0"),
    (_file(method={"two_stage": {"defer_epoch": {"int": [1, 9]}}}), "space.method.two_stage.defer_epoch",
     "below train.epochs"),
    (_file(method={"feature_aug": {"tau_s": {"uniform": [0.5, 0.9]}, "tau_g": {"uniform": [0.1, 0.6]}}}),
     "space.method.feature_aug.tau_g", "tau_s"),
    (_file(method={"reweight": {"gamma": {"uniform": [1, 2], "when": {"loss": "focal"}}}}),
     "space.method.reweight.gamma.when.loss", "listed before"),
    (_file(train={"lr": {"uniformm": [0.1, 0.2]}}), "space.train.lr.uniformm", "distribution"),
    ({**_file(), "serach": {}}, "serach", "unknown key"),
    ({**_file(), "search": {"num_samples": 0}}, "search.num_samples", ">= 1"),
    ({**_file(), "base": {"train": {"lrr": 1}}}, "base.train.lrr", "unknown key"),
])
def test_bad_search_files_name_the_path(data, key, text):
    with pytest.raises(ConfigError) as e:
        parse_search_file(copy.deepcopy(data))
    assert e.value.key == key and text in str(e.value)


def test_cli_rejects_bad_file_before_ray(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_file(method={"reweight": {"beta": {"uniform": [0.5, 1.5]}}})))
    assert main(["search", str(path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space.method.reweight.beta" in err[0] and str(path) in err[0]
    assert not (tmp_path / "s").exists()  # nothing started, nothing written


def test_shipped_search_files_are_valid():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        space = load_search_file(path)
        assert space.methods, path

"""Search-space files: conditional parameters and validation before Ray starts (no Ray here)."""
import copy

import optuna
import pytest
import yaml

from conftest import ROOT
from ltsearch.cli import main
from ltsearch.config import ConfigError
from ltsearch.runconfig import config_from_dict
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
        others = [k for k in params if k not in ("method", "train.lr")
                  and not k.startswith(method + ".")]
        assert not others, (method, others)
        if method == "reweight":
            assert ("weights.beta" in own) == (params["reweight.weights.scheme"] == "effective")
            assert ("loss.gamma" in own) == (params["reweight.loss.name"] == "focal")
        if method == "two_stage":
            drs = params["two_stage.weights.start"] == "never"
            assert ("sampler.then" in own) == ("sampler.start" in own) == drs
        if method == "bbn":
            assert ("arch.beta_a" in own) == (params["bbn.arch.schedule"] == "beta")
            assert ("arch.switch_epoch" in own) == (params["bbn.arch.schedule"] == "separated")
        if method == "feature_aug":
            assert params["feature_aug.stage2.tau_g"] < params["feature_aug.stage2.tau_s"]
        if method == "custom":
            assert ("stage2.epochs" in own) == (params["custom.stage2.name"] in ("crt", "lws"))
        cfg = config_from_dict(space.trial_config(params))  # every trial is a valid config
        assert cfg.method.name == method
    assert seen == set(space.methods) and len(seen) == 13


def test_trial_config_nests_part_parameters():
    space = load_search_file(QUICKSTART)
    cfg = space.trial_config({"method": "custom", "custom.loss.name": "ldam",
                              "custom.weights.start": 0.5, "custom.mixup.alpha": 1.0,
                              "custom.mixup.until": "never", "custom.stage2.name": "crt",
                              "custom.stage2.epochs": 2, "train.lr": 0.01})
    m = cfg["method"]  # every part expanded, the same config in trials.json and MLflow
    assert m["name"] == "custom" and m["loss"] == {"name": "ldam", "max_m": 0.5, "s": 30.0}
    assert m["weights"]["start"] == 0.5 and m["weights"]["scheme"] == "effective"
    assert m["mixup"] == {"alpha": 1.0, "kind": "mixup", "until": "never"}
    assert m["stage2"]["name"] == "crt" and m["stage2"]["epochs"] == 2 and m["posthoc"] is None
    assert cfg["train"]["threads"] == 1
    run = config_from_dict(cfg)
    assert run.method.label() == "ldam+drw+mixup+crt" and run.train.lr == 0.01
    wb = config_from_dict(space.trial_config({"method": "weight_balancing",
                                              "weight_balancing.stage2.thresh": 0.1,
                                              "weight_balancing.train.weight_decay": 0.002,
                                              "train.lr": 0.01}))
    assert wb.train.weight_decay == 0.002  # a preset's own training keys win


def _file(**space):
    return {"base": {"train": {"epochs": 4, "preset": "none", "warmup_epochs": 0}},
            "search": {"num_samples": 2}, "space": space}


@pytest.mark.parametrize("data,key,text", [
    (_file(method={"mixup": {}}), "space.method.mixup", "unknown method 'mixup'"),
    (_file(train={"lr": {"uniform": [0.1, 0.01]}}), "space.train.lr.uniform", "empty range"),
    (_file(train={"lr": {"loguniform": [0, 0.1]}}), "space.train.lr.loguniform", "low > 0"),
    (_file(method={"ce": {"beta": {"uniform": [0.9, 0.99]}}}), "space.method.ce.beta",
     "not a part parameter of method 'ce'"),
    (_file(method={"ce": {"loss.beta": {"uniform": [0.9, 0.99]}}}), "space.method.ce.loss.beta",
     "not a parameter of loss 'ce'"),
    (_file(method={"reweight": {"weights.beta": {"uniform": [0.9, 1.0]}}}),
     "space.method.reweight.weights.beta", "value 1.0: must be < 1.0"),
    # beside a searched train knob, the parameter at fault is named, not the knob (it was:
    # "space.train.lr: value 0.005: not a parameter of loss 'ldam'")
    (_file(train={"lr": {"loguniform": [0.005, 0.05]}},
           method={"ldam_drw": {"loss.max_mm": {"uniform": [0.3, 0.6]}}}),
     "space.method.ldam_drw.loss.max_mm", "not a parameter of loss 'ldam'"),
    (_file(train={"lr": {"loguniform": [0.005, 0.05]}},
           method={"reweight": {"weights.beta": {"choice": [1.0, 0.9]}}}),
     "space.method.reweight.weights.beta", "value 1.0: must be < 1.0"),
    (_file(train={"epochs": {"choice": [6, 3]}}, method={"two_stage": {"weights.start": {"choice": [5, 2]}}}),
     "space.method.two_stage.weights.start", "value 5 with space.train.epochs = 3: must be below"),
    (_file(method={"reweight": {"weights": {"beta": {"choice": [-0.5, 0.9]}}}}),
     "space.method.reweight.weights.beta", "must be >= 0"),
    (_file(method={"two_stage": {"weights.start": {"int": [1, 9]}}}),
     "space.method.two_stage.weights.start", "below train.epochs"),
    (_file(method={"two_stage": {"weights.start": {"uniform": [0.5, 1.5]}}}),
     "space.method.two_stage.weights.start", "fraction of the run"),
    (_file(method={"feature_aug": {"stage2.tau_s": {"uniform": [0.5, 0.9]},
                                   "stage2.tau_g": {"uniform": [0.1, 0.6]}}}),
     "space.method.feature_aug.stage2.tau_g", "tau_s"),
    (_file(method={"reweight": {"loss.gamma": {"uniform": [1, 2], "when": {"loss.name": "focal"}}}}),
     "space.method.reweight.loss.gamma.when.loss.name", "listed before"),
    (_file(method={"reweight": {"loss.name": {"choice": ["ce", "focal"]},
                                "loss.gamma": {"uniform": [1, 2], "when": {"loss.name": "focl"}}}}),
     "space.method.reweight.loss.gamma.when.loss.name", "'focl' is not one of"),
    (_file(method={"bbn": {"mixup.alpha": {"uniform": [0.2, 1.0]}}}), "space.method.bbn.mixup.alpha",
     "single-branch"),
    (_file(method={"bbn": {"stage2.name": {"choice": ["none", "crt"]}}}),
     "space.method.bbn.stage2.name", "needs the plain classifier"),
    (_file(train={"lr": {"uniformm": [0.1, 0.2]}}), "space.train.lr.uniformm", "distribution"),
    (_file(data={"imbalance_factor": {"choice": [10, 100]}}), "space.data.imbalance_factor",
     "every trial trains on the same data"),
    (_file(train={"metrics": {"choice": [{"groups": "thresholds"}, {"groups": "thirds"}]}}),
     "space.train.metrics", "every trial is selected by the same metrics"),
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
    path.write_text(yaml.safe_dump(_file(method={"reweight": {"weights.beta": {"uniform": [0.5, 1.5]}}})))
    assert main(["search", str(path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "space.method.reweight.weights.beta" in err[0] and str(path) in err[0]
    assert not (tmp_path / "s").exists()  # nothing started, nothing written


def test_shipped_search_files_are_valid():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        space = load_search_file(path)
        assert space.methods, path


@pytest.mark.parametrize("name", ["cifar10_lt.yaml", "cifar100_lt.yaml"])
def test_cifar_files_cover_every_preset_and_run_bbn_on_its_own_schedule(name):
    """Fidelity fix 1: the shipped CIFAR files ran BBN under LDAM's schedule (lr 0.1 until 160,
    no Nesterov); BBN's published number uses its own (Nesterov, ×0.01 at 120 and 160)."""
    from ltsearch.recipes import PRESETS
    from ltsearch.recipes.presets import PRETRAINED

    space = load_search_file(ROOT / "search_spaces" / name)
    assert set(space.methods) == set(PRESETS) - set(PRETRAINED)  # (from scratch: no weights)
    bbn = config_from_dict(space.trial_config({"method": "bbn", "train.lr": 0.1,
                                               "bbn.arch.schedule": "parabolic_decay"})).train
    assert bbn.nesterov and bbn.milestones == [120, 160] and bbn.epochs == 200
    ce = config_from_dict(space.trial_config({"method": "ce", "train.lr": 0.1,
                                              "ce.train.weight_decay": 2e-4})).train
    assert not ce.nesterov and ce.milestones == [160, 180]
    wb = config_from_dict(space.trial_config({"method": "weight_balancing", "train.lr": 0.1,
                                              "weight_balancing.train.weight_decay": 0.005,
                                              "weight_balancing.stage2.thresh": 0.1})).train
    assert wb.weight_decay == 0.005


def test_searched_augmentation_reaches_the_trial_config():
    """The augmentation is the one data key a search may vary: the trainer applies it per trial."""
    space = parse_search_file(_file(data={"augment": {"choice": [{"crop_pad": 0, "hflip": False},
                                                                 {"crop_pad": 2, "hflip": True}]}}))
    from ltsearch.data import build_data
    from ltsearch.runconfig import config_from_dict
    from ltsearch.trainer import Trainer

    for given in ({"crop_pad": 2, "hflip": True}, {"crop_pad": 0, "hflip": False}):
        cfg = space.trial_config({"method": "ce", "data.augment": given})
        assert {k: cfg["data"]["augment"][k] for k in given} == given  # (the rest: defaults)
        assert not cfg["data"]["augment"]["random_resized_crop"]
        cfg["train"]["device"] = "cpu"
        run = config_from_dict(cfg)
        trainer = Trainer(run, build_data(run.data))
        assert (trainer.train_set.crop_pad, trainer.train_set.hflip) == (given["crop_pad"], given["hflip"])
        assert (trainer.val_set.crop_pad, trainer.val_set.hflip) == (0, False)  # never on evaluation


def test_a_preset_searched_at_its_defaults_is_checked_against_the_counts_too():
    """With nothing searched under it, feature_aug still needs k=3 head classes: on two
    classes its default split (the rarer half) leaves one."""
    space = parse_search_file(_file(method={"ce": {}, "feature_aug": {}}))
    space.check_counts([100] * 4 + [10] * 4)  # 4 tail, 4 head classes: fits
    with pytest.raises(ConfigError) as e:
        space.check_counts([100, 10])
    assert e.value.key == "space.method.feature_aug"
    assert "at its first values: needs 3 head classes; the tail split leaves 1" in str(e.value)

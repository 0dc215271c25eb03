"""Successive halving over complete runs: the rungs' runs, the rule, against old ASHA on crafted
curves, and the order the first trials start in."""
from types import SimpleNamespace

import pytest

from conftest import make_config
from ltsearch.config import ConfigError, resolve_epoch
from ltsearch.runconfig import compressed, run_epochs
from ltsearch.search.rungs import BUDGETS, GO, RUNG_VALUES, STOP, WAIT, Rungs


def test_a_compressed_run_has_every_phase_of_its_recipe():
    """A rung's run is the whole recipe shortened alike: stage 1, its warm-up and milestones,
    the second stage; DRW keeps its place at 80 %, inside the run however short."""
    cfg = make_config({"name": "two_stage", "stage2": {"name": "crt", "epochs": 8}},
                      train={"epochs": 16, "warmup_epochs": 4, "schedule": "step",
                             "milestones": [8, 12]})
    short = compressed(cfg, 0.125)
    assert short.train.epochs == 2 and short.train.warmup_epochs == round(4 * 0.125) == 0
    assert short.train.milestones == [1, 2]
    assert short.method.stage2.params.epochs == 1 and run_epochs(short) == 3
    assert short.method.weights.start == 0.8 and resolve_epoch(0.8, 2) == 1  # not 2: past the end
    half = compressed(cfg, 0.5)
    assert (half.train.epochs, half.train.warmup_epochs, half.method.stage2.params.epochs) == (8, 2, 4)
    assert resolve_epoch(half.method.weights.start, 8) == 6
    assert compressed(cfg, 1.0) is cfg
    mixup = make_config({"name": "mixup_drw", "mixup": {"until": 0.9}}, train={"epochs": 2})
    assert resolve_epoch(mixup.method.mixup.until, 2) == 1  # its last epoch is without mixup


def test_a_compressed_run_trains_its_deferred_part(digits_data):
    """Two epochs of DRW at 0.8: the weights are off in epoch 0 and on in epoch 1 (round(1.6)
    would have put them past the end, and the rung would have trained plain CE)."""
    from ltsearch.trainer import Trainer

    t = Trainer(compressed(make_config({"name": "two_stage"}, train={"epochs": 16}), 0.125), digits_data)
    seen = []
    for _ in range(2):
        t.train_epoch()
        seen.append(t.method.epoch_weights is not None)
    assert seen == [False, True]


def _reports(values: list[float], budgets: list[int]):
    """The reports of a trial whose rungs end with ``values``: one per epoch, each carrying the
    values of the rungs ended so far."""
    out, ended = [], []
    for k, b in enumerate(budgets):
        for e in range(b):
            if e == b - 1 and k < len(values):
                ended = ended + [values[k]]
            out.append({RUNG_VALUES: ended, BUDGETS: budgets})
    return out


def test_a_rung_keeps_its_best_third():
    rungs = Rungs(3.0)
    for i, v in enumerate([0.1, 0.5, 0.9, 0.3, 0.7, 0.6]):
        rungs.record(f"t{i}", [v])
    assert [t for t in (f"t{i}" for i in range(6)) if rungs.kept(t, 2)] == ["t2", "t4"]  # ⌈6/3⌉
    rungs.record("tie", [0.7])
    assert rungs.kept("tie", 2) and rungs.kept("t4", 2)  # ties go on together
    rungs.record("nan", [float("nan")])
    assert not rungs.kept("nan", 2)
    low = Rungs(3.0, mode="min")
    for i, v in enumerate([0.1, 0.5, 0.9]):
        low.record(f"t{i}", [v])
    assert low.kept("t0", 2) and not low.kept("t2", 2)


def test_a_trial_promoted_on_an_empty_rung_is_stopped_once_outranked():
    """The first trial meets an empty rung and goes on; when later trials end that rung better,
    its next report stops it: meeting empty rungs is no advantage."""
    rungs = Rungs(2.0)
    assert rungs.decide("first", [0.4], 2)  # alone at rung 0
    assert rungs.decide("first", [0.4], 2)  # a report of its full run, still alone
    assert rungs.decide("second", [0.8], 2)
    assert not rungs.decide("first", [0.4], 2)  # ⌈2/2⌉ = 1 goes on: the second
    assert rungs.decide("second", [0.8, 0.9], 2)  # ended its last rung


def test_a_trial_ranked_out_before_its_rung_is_settled_waits_and_goes_on_once_it_ranks_in():
    """Halving decided at once stops a trial on a rung's first values for good; ⌈n/η⌉ grows
    with n, so a trial out among the first few can be in among all. It waits instead, goes on
    when later trials end the rung worse, and stops only once the rung is settled."""
    settled = {0: False}
    rungs = Rungs(2.0)
    assert rungs.verdict("a", [0.9], 2, True, settled.get) == GO  # alone: in
    assert rungs.verdict("b", [0.5], 2, True, settled.get) == WAIT  # ⌈2/2⌉ = 1: out, for now
    assert rungs.waited("b", 2, settled.get) is None
    assert rungs.verdict("c", [0.3], 2, True, settled.get) == WAIT  # ⌈3/2⌉ = 2: a and b
    assert rungs.waited("b", 2, settled.get) == GO  # b ranks in: it goes on
    assert rungs.waited("c", 2, settled.get) is None
    settled[0] = True  # every trial has ended rung 0
    assert rungs.verdict("d", [0.1], 2, True, settled.get) == STOP  # out, and it is final
    assert rungs.waited("c", 2, settled.get) == STOP
    assert rungs.verdict("b", [0.5, 0.8], 2, False, settled.get) == GO  # its full run's end
    # decided at once (every rung settled), b would have stopped when it ended rung 0
    at_once = Rungs(2.0)
    assert at_once.verdict("a", [0.9], 2, True, lambda k: True) == GO
    assert at_once.verdict("b", [0.5], 2, True, lambda k: True) == STOP
    # later in a run an outranked trial stops: it went on while its rung was nearly empty
    late = Rungs(2.0)
    assert late.verdict("a", [0.5], 2, True, lambda k: False) == GO
    assert late.verdict("b", [0.9], 2, True, lambda k: False) == GO
    assert late.verdict("a", [0.5], 2, False, lambda k: False) == STOP
    assert late.verdict("a", [0.5], 2, True, lambda k: False) == WAIT  # (a resumed run's first)


def test_crafted_curves_old_asha_prunes_the_late_recipe_the_rungs_keep_it():
    """A recipe that is worst until 80 % of its run and best at its end (DRW: its compressed run
    ends with its deferred part too), against recipes that are best early and flat. Ray Tune's
    ASHA on epochs (grace 2, η 2) stops the late one at its first rung; the rungs keep it and it
    reaches its end."""
    from ray.tune.schedulers import ASHAScheduler

    from ltsearch.search.scheduler import RungScheduler

    epochs = 16
    late = [0.2] * 12 + [0.95] * 4
    flat = [[0.64 - 0.01 * i] * epochs for i in range(5)]
    curves = {"late": late, **{f"flat{i}": c for i, c in enumerate(flat)}}
    ends_short = {"late": 0.9, **{f"flat{i}": 0.64 - 0.01 * i for i in range(5)}}  # 2-epoch runs

    asha = ASHAScheduler(time_attr="epoch", metric="v", mode="max", max_t=epochs, grace_period=2,
                         reduction_factor=2)
    trials = {n: SimpleNamespace(trial_id=n) for n in curves}
    for t in trials.values():
        asha.on_trial_add(None, t)
    old = {}
    for name in ["flat0", "flat1", "flat2", "flat3", "flat4", "late"]:  # the late one last
        # Tune's ASHA says STOP at max_t too: a trial reached its end if only its last report did
        old[name] = all(asha.on_trial_result(None, trials[name], {"epoch": e + 1, "v": v}) != "STOP"
                        for e, v in enumerate(curves[name][:-1]))
    assert not old["late"] and any(old.values())

    new_scheduler = RungScheduler(2.0, "max")
    new = {}
    for name in ["flat0", "flat1", "flat2", "flat3", "flat4", "late"]:
        reports = _reports([ends_short[name], curves[name][-1]], [2, epochs])
        new[name] = all(new_scheduler.on_trial_result(None, trials[name], r) != "STOP" for r in reports)
    assert new == {"flat0": True, "flat1": False, "flat2": False, "flat3": False, "flat4": False,
                   "late": True}  # the late one, and the one alone at its rung when it ran


def test_the_first_trials_cover_the_methods_in_an_order_shuffled_by_the_seed():
    from ltsearch.search.run import _first_points, cover_order
    from ltsearch.search.space import parse_search_file

    methods = ["ce", "reweight", "resample", "two_stage", "bbn", "ldam_drw", "logit_adjust"]
    orders = {seed: cover_order(methods, seed) for seed in range(4)}
    assert all(sorted(o) == sorted(methods) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) > 1  # differs between seeds
    assert cover_order(methods, 2) == orders[2]  # the same for a seed
    space = parse_search_file({"search": {"num_samples": 8, "seed": 3},
                               "space": {"method": {m: {} for m in methods}}})
    assert [p["method"] for p in _first_points(space)] == orders[3]


def test_rung_settings_are_checked():
    from ltsearch.search.space import parse_search_file

    def settings(asha):
        return parse_search_file({"search": {"asha": asha}}).settings.asha

    assert settings({"rungs": [0.25, 1.0]}).fractions() == [0.25, 1.0]  # as given
    assert settings({"enabled": False}).fractions() == [1.0]
    for bad in ([0.5], [0.5, 0.25, 1.0], [0.0, 1.0], [0.5, 1.5]):
        with pytest.raises(ConfigError, match=r"^search\.asha\.rungs: must rise from above 0 to 1\.0"):
            settings({"rungs": bad})
    with pytest.raises(ConfigError, match=r"^search\.asha\.grace_period: ASHA no longer stops a run "
                                          r"after some of its epochs.*give asha\.rungs"):
        settings({"grace_period": 2})


def test_the_default_rungs_train_an_eighth_of_the_run_and_at_least_four_epochs():
    """The default first rung is 1/8 of the run (CIFAR-10-LT's 30-epoch benchmark: ρ 0.70 by the
    mean, top 3 kept in 96 % of seeds at 49 % of the compute) but never under 4 epochs (2 epochs of
    a 16-epoch digits run end its two-stage recipes far below their end): of the shortest run a searched
    train.epochs allows, as every trial is judged on the same rungs. Given rungs are kept."""
    from ltsearch.runconfig import compressed, config_from_dict
    from ltsearch.search.space import parse_search_file

    def rungs(epochs, space=None, asha=None):
        space = {"train": space} if space else {}
        return parse_search_file({"base": {"train": {"epochs": epochs}}, "search": {"asha": asha or {}},
                                  "space": space}).settings.asha.fractions()

    assert rungs(200) == [0.125, 1.0]                    # 25 epochs
    assert rungs(16) == [0.25, 1.0]                      # 4, not 2
    assert rungs(30) == pytest.approx([4 / 30, 1.0])
    assert compressed(config_from_dict({"train": {"epochs": 30}}), rungs(30)[0]).train.epochs == 4
    assert rungs(4) == [1.0] and rungs(3) == [1.0]       # too short to halve: each trial runs once
    assert rungs(200, {"epochs": {"choice": [200, 16]}}) == [0.25, 1.0]
    assert rungs(200, {"epochs": {"int": [10, 100]}}) == [0.4, 1.0]
    assert rungs(16, asha={"rungs": [0.125, 1.0]}) == [0.125, 1.0]


def test_a_knob_valid_in_the_full_run_but_not_in_a_rung_is_refused_before_ray():
    """DRW from (absolute) epoch 15 of 16 is epoch 4 of the 4-epoch rung: the trial would fail
    in its first rung; the search file is refused, naming the parameter and the rung."""
    from ltsearch.search.space import parse_search_file

    data = {"base": {"train": {"epochs": 16, "preset": "none", "warmup_epochs": 0}},
            "search": {"asha": {"rungs": [0.25, 1.0]}},
            "space": {"method": {"two_stage": {"weights.start": {"choice": [0.8, 15]}}}}}
    with pytest.raises(ConfigError, match=r"^space\.method\.two_stage\.weights\.start: value 15: "
                                          r".*in the rung at 0\.25 of the run"):
        parse_search_file(data)
    data["space"]["method"]["two_stage"]["weights.start"] = {"choice": [0.8, 0.95]}
    parse_search_file(data)  # fractions stay inside every rung

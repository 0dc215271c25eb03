"""Successive halving over complete runs: the rungs' runs, the rule, against old ASHA on crafted
curves, and the order the first trials start in."""
from types import SimpleNamespace

import pytest

from conftest import make_config
from ltsearch.config import ConfigError, resolve_epoch
from ltsearch.runconfig import compressed, run_epochs
from ltsearch.search.rungs import BUDGETS, GO, RUNG_VALUES, STOP, WAIT, Rungs, ranked_among


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


def test_a_trial_goes_on_or_stops_once_its_rung_ranks_it_for_good_and_waits_until_then():
    """⌈m/η⌉ of the m trials that end a rung go on. Four will end rung 0 (η 2: two go on); a
    trial's place is known once the trials still to end the rung cannot change it."""
    most = {0: 4}
    rungs = Rungs(2.0)
    assert rungs.verdict("a", [0.5], 2, True, most.get) == WAIT  # alone: three more may beat it
    assert rungs.verdict("b", [0.4], 2, True, most.get) == WAIT  # one better, two to come
    assert rungs.verdict("c", [0.9], 2, True, most.get) == GO  # at most one more can beat it
    assert rungs.standing("b", 2, most.get) == STOP  # two better: out whatever the last one does
    assert rungs.standing("a", 2, most.get) is None  # one better, one to come
    assert rungs.verdict("d", [0.1], 2, True, most.get) == STOP  # three better
    assert rungs.standing("a", 2, most.get) == GO  # the rung is settled: a is second of four
    assert rungs.verdict("a", [0.5, 0.8], 2, False, most.get) == GO  # its full run's end
    # a trial that ends without reaching the rung (failed, stopped) lowers m, and ⌈m/η⌉ with it
    fewer, most = Rungs(2.0), {0: 3}
    assert fewer.verdict("a", [0.5], 2, True, most.get) == WAIT  # ⌈3/2⌉ = 2, two may beat it
    assert fewer.verdict("b", [0.4], 2, True, most.get) == WAIT
    assert fewer.standing("a", 2, most.get) == GO
    most[0] = 2  # the third trial failed before its rung's end: ⌈2/2⌉ = 1
    assert fewer.standing("b", 2, most.get) == STOP
    # decided at once (wait: false): on the values so far, b would have stopped on a's value
    at_once = Rungs(2.0)
    so_far = lambda k: len(at_once.values[k])  # noqa: E731
    assert at_once.verdict("a", [0.9], 2, True, so_far) == GO
    assert at_once.verdict("b", [0.5], 2, True, so_far) == STOP
    # later in a run, a trial that went on on the values so far stops once they outrank it
    late = Rungs(2.0)
    so_far = lambda k: len(late.values[k])  # noqa: E731
    assert late.verdict("a", [0.5], 2, True, so_far) == GO
    assert late.verdict("b", [0.9], 2, True, so_far) == GO
    assert late.verdict("a", [0.5], 2, False, so_far) == STOP
    assert late.verdict("a", [0.5], 2, True, lambda k: 3) == WAIT  # (a resumed run's first report)


@pytest.mark.parametrize("bracket", [None, 3])
@pytest.mark.parametrize("seed", range(20))
def test_the_trials_that_reach_their_end_do_not_depend_on_the_order_rungs_end_in(seed, bracket):
    """Eight trials, rungs [r0, r1, full], η 2, their rungs ending in a random interleaving (as
    workers finish them): the trials that go on from each rung are those synchronous successive
    halving keeps (the best ⌈m/η⌉ of the m that ended it; in brackets of 3 by start order, of
    the m in the trial's bracket and those before it), none that went on is stopped later, and
    every trial's decision comes from the rule (none waits at the end)."""
    import math
    import random

    rng = random.Random(seed)
    n, eta = 8, 2.0
    order = [f"t{i}" for i in range(n)]  # the order they started in
    values = {t: [rng.random() for _ in range(3)] for t in order}
    rungs = Rungs(eta)
    ended = {t: 0 for t in values}  # how many rungs each trial has ended
    fate: dict[str, str] = {}  # trial → "end" or "stop"
    waiting, running = set(), set(values)

    def field(t):  # (most, peers): the trials up to t's bracket's end, but those stopped before k
        peers = order[:ranked_among(order, t, bracket, n)]
        return (lambda k: sum(ended[s] > k or fate.get(s) != "stop" for s in peers),
                None if bracket is None else set(peers))

    def went_on(t):  # a trial's next rung starts: its run goes on, and no report stops it
        running.add(t)
        assert rungs.verdict(t, values[t][:ended[t]], 3, False, *field(t)) == GO

    while running:
        t = rng.choice(sorted(running))
        ended[t] += 1
        running.discard(t)
        verdict = rungs.verdict(t, values[t][:ended[t]], 3, True, *field(t))
        if ended[t] == 3:
            fate[t] = "end"
        elif verdict == GO:
            went_on(t)
        elif verdict == STOP:
            fate[t] = "stop"
        else:
            waiting.add(t)
        for w in sorted(waiting):
            turn = rungs.standing(w, 3, *field(w))
            if turn is not None:
                waiting.discard(w)
                if turn == GO:
                    went_on(w)
                else:
                    fate[w] = "stop"
    assert not waiting
    kept = list(order)
    for k in range(2):  # synchronous halving: each rung keeps the best ⌈m/η⌉ of the m there
        def goes_on(t):
            there = [s for s in order[:ranked_among(order, t, bracket, n)] if s in kept]
            return sum(values[s][k] > values[t][k] for s in there) < math.ceil(len(there) / eta)
        kept = [t for t in kept if goes_on(t)]
    assert sorted(t for t, f in fate.items() if f == "end") == sorted(kept)


def test_in_brackets_a_trial_is_decided_once_its_bracket_ends_the_rung_and_ranked_among_all_before():
    """Eight trials, η 2, brackets of 4: the first four are decided once they have ended rung 0,
    before any later trial starts (ranked among all eight, none of them would be known: four
    more may beat each); a trial of the second bracket is ranked among all eight, so it goes on
    only by beating the first bracket's values as well."""
    order = [f"t{i}" for i in range(8)]
    values = [0.5, 0.7, 0.3, 0.6, 0.45, 0.65, 0.1, 0.2]

    def field(t, bracket):
        peers = order[:ranked_among(order, t, bracket, 8)]
        return (lambda k: len(peers)), (None if bracket is None else set(peers))

    together, bracketed = Rungs(2.0), Rungs(2.0)
    for t, v in zip(order[:4], values):
        assert together.verdict(t, [v], 2, True, *field(t, None)) == WAIT
        bracketed.verdict(t, [v], 2, True, *field(t, 4))
    assert [bracketed.standing(t, 2, *field(t, 4)) for t in order[:4]] == [STOP, GO, STOP, GO]
    assert [together.standing(t, 2, *field(t, None)) for t in order[:4]] == [None] * 4
    # t4 (0.45) would be second of its own bracket, but the eight's cut is ⌈8/2⌉ = 4 and three
    # of the first bracket ended above it: out once t5 (0.65) does too
    assert bracketed.verdict("t4", [0.45], 2, True, *field("t4", 4)) == WAIT
    assert bracketed.verdict("t5", [0.65], 2, True, *field("t5", 4)) == GO  # 1 better, 2 to come
    assert bracketed.standing("t4", 2, *field("t4", 4)) == STOP
    assert bracketed.verdict("t6", [0.1], 2, True, *field("t6", 4)) == STOP
    assert ranked_among(order, "t5", None, 8) == 8 and ranked_among(order, "t5", 3, 8) == 6
    assert ranked_among(order, "t7", 3, 8) == 8 and ranked_among(order, "t0", 3, 8) == 3


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
    # brackets of 12 by default: a search of at most 12 trials ranks them all together
    assert settings({}).bracket == 12
    assert settings({}).bracket_of(12) is None and settings({}).bracket_of(40) == 12
    assert settings({"bracket": 5}).bracket_of(6) == 5 and settings({"bracket": None}).bracket_of(40) is None
    assert settings({"wait": False}).bracket_of(40) is None  # decided at once: no bracket to settle
    with pytest.raises(ConfigError, match=r"^search\.asha\.bracket: .*>= 2"):
        settings({"bracket": 1})


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


def test_a_waiting_trial_is_not_said_to_be_ranked_out():
    """The search's line for a trial that waits says where it is, not that it is out (it may
    be in so far: its place is not known yet); a pruned trial's says why it stopped."""
    from ltsearch.search.callbacks import rungs_said

    settings = SimpleNamespace(asha=SimpleNamespace(reduction_factor=3.0))
    result = {BUDGETS: [4, 30], RUNG_VALUES: [0.65], "rung": 0}
    assert rungs_said(result, settings) == \
        "in rung 1 of 2 (4-epoch run 0.650; not among the best 1/3 of rung 1)"
    assert rungs_said(result, settings, ranked_out=False) == "in rung 1 of 2 (4-epoch run 0.650)"


def test_a_schedulers_brackets_count_in_the_records_start_order_and_a_lost_trial_as_ended():
    """The scheduler's brackets follow trials.json's order (the order trials first started),
    not Tune's list, which a resume reorders by last result; a trial the records hold LOST
    (Tune never recorded it) keeps its place there and ended without its rungs. Brackets of 2,
    four trials, η 2: a (0.5) and b (0.7) are the first bracket, b goes on and a stops; c
    (0.6) is ranked among all four but the lost one, which ended without the rung: ⌈3/2⌉ = 2
    of the three go on, and c is second of them."""
    from ltsearch.search.rungs import RUNG_VALUE
    from ltsearch.search.scheduler import RungScheduler

    records = {t: {"status": s} for t, s in [("a", "WAITING"), ("b", "RUNNING"), ("lost", "LOST"),
                                             ("c", "RUNNING")]}

    def trial(i, status="RUNNING"):
        return SimpleNamespace(trial_id=i, config={}, status=status, is_saving=False,
                               is_finished=lambda: status in ("TERMINATED", "ERROR"))

    tune = SimpleNamespace(get_trials=lambda: [trial("c"), trial("b"), trial("a", "PAUSED")],
                           stop_trial=lambda t: stopped.append(t.trial_id))
    stopped: list[str] = []
    scheduler = RungScheduler(2.0, "max", 4, 1, bracket=2, records=records)

    def report(i, v):
        return scheduler.on_trial_result(tune, trial(i), {RUNG_VALUES: [v], BUDGETS: [1, 2],
                                                          RUNG_VALUE: v})

    assert report("a", 0.5) == scheduler.PAUSE  # b is still to end the first bracket's rung
    assert report("b", 0.7) == scheduler.CONTINUE and stopped == ["a"]
    assert scheduler.field(tune, "c")[0](0) == 4 - 1  # (the lost trial ended without it)
    assert report("c", 0.6) == scheduler.CONTINUE  # b, c of a, b, c: in for good
    together = RungScheduler(2.0, "max", 4, 1, bracket=None, records=records)
    assert together.field(tune, "c")[0](0) == 4 and together.field(tune, "c")[1] is None

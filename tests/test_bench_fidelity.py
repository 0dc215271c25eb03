"""The benchmark behind the README's scheduler tables (``scripts/bench_fidelity.py``): its
replays on crafted runs give what successive halving's arithmetic says, and its reference (a
decision by another seed's full training) counts what it claims."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_fidelity as bench  # noqa: E402
from ltsearch.search.run import cover_order  # noqa: E402


def _run(values: list[float]) -> dict:
    return {"curve": list(values), "seconds": [1.0] * len(values), "deferred": None}


def _runs(ends: dict[str, float], full: int = 8, short: int = 2) -> dict:
    """One seed per recipe: a full run of ``full`` epochs rising to its end, and a run
    compressed to ``short / full`` that ends ranked as the full run does."""
    return {n: [{"full": _run([end * (e + 1) / full for e in range(full)]),
                 "fractions": [short / full],
                 "short": [_run([end * 0.9 * (e + 1) / short for e in range(short)])]}]
            for n, end in ends.items()}


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_rungs_replayed_keep_the_best_third_whatever_the_trials_at_a_time(slots):
    """12 recipes at η 3: all twelve run their 2-epoch rung, the best ⌈12/3⌉ = 4 their full
    8 epochs, the compute (12·2 + 4·8) / (12·8), however many run at a time."""
    ends = {f"r{i}": 0.5 + i / 100 for i in range(12)}
    runs = _runs(ends)
    order = cover_order(list(runs), 0)
    out = bench.replay_rungs(runs, 0, order, slots, 3.0, [0.25, 1.0])
    assert {n for n, e in out["ended"].items() if e} == {"r8", "r9", "r10", "r11"}
    assert out["trained"] == {n: 2 + 8 * (n in {"r8", "r9", "r10", "r11"}) for n in runs}
    verdict = bench.judge(runs, 1, [out], [{n: runs[n][0]["short"][0]["curve"][-1] for n in runs}],
                          first_run={n: 2 for n in runs}, alls=[bench.replay_all(runs, 0, order, slots)])
    assert verdict["share"] == pytest.approx((12 * 2 + 4 * 8) / (12 * 8))
    assert verdict["top1"] == 1 and verdict["top3"] == 1 and verdict["rho"] == pytest.approx(1.0)
    assert verdict["cut"] == []


def test_rungs_replayed_in_brackets_rank_a_trial_among_its_bracket_and_those_before():
    """12 recipes at η 3 in brackets of 6, started worst first: the first bracket keeps its
    best ⌈6/3⌉ = 2 (r4, r5), a trial of the second is ranked among all twelve (r8…r11 the best
    ⌈12/3⌉ = 4); started best first, the first bracket keeps r11 and r10 and no trial of the
    second ranks among the twelve's best four."""
    ends = {f"r{i}": 0.5 + i / 100 for i in range(12)}
    runs = _runs(ends)
    rising = bench.replay_rungs(runs, 0, list(runs), 2, 3.0, [0.25, 1.0], bracket=6)
    assert {n for n, e in rising["ended"].items() if e} == {"r4", "r5", "r8", "r9", "r10", "r11"}
    assert sum(rising["trained"].values()) == 12 * 2 + 6 * 8
    falling = bench.replay_rungs(runs, 0, list(runs)[::-1], 2, 3.0, [0.25, 1.0], bracket=6)
    assert {n for n, e in falling["ended"].items() if e} == {"r10", "r11"}
    together = bench.replay_rungs(runs, 0, list(runs), 2, 3.0, [0.25, 1.0], bracket=12)
    assert {n for n, e in together["ended"].items() if e} == {"r8", "r9", "r10", "r11"}
    # 1-s epochs, 2 at a time: the first bracket's rung runs end at 2, 4, 6 s, and r4, r5 go
    # on at once (8 epochs); all together, r8 is in for good only at 10 s (3 still to come)
    assert rising["first_end"] == 6 + 8 and together["first_end"] == 10 + 8


def test_old_asha_replayed_cuts_the_late_recipe_the_rungs_keep():
    """The issue's late recipe: worst at every epoch until its re-balancing at 80 %, best at
    the end; its compressed run has the re-balancing too, and ends best."""
    ends = {f"r{i}": 0.5 + i / 100 for i in range(7)}
    runs = _runs(ends)
    runs["late"] = [{"full": {**_run([0.1] * 6 + [0.8, 0.9]), "deferred": 6},
                     "fractions": [0.25], "short": [_run([0.1, 0.85])]}]
    old = bench.replay_asha(runs, 0, list(runs), 1, grace=2, rf=2)
    new = bench.replay_rungs(runs, 0, list(runs), 1, 3.0, [0.25, 1.0])
    assert not old["ended"]["late"] and old["trained"]["late"] == 2
    assert new["ended"]["late"]
    cut = bench.judge(runs, 1, [old], [{n: runs[n][0]["full"]["curve"][1] for n in runs}])["cut"]
    assert cut == ["seed 0: late after 2 epochs (before its deferred part, due at epoch 7)"]


def test_another_seeds_full_training_deciding_counts_the_top_3_it_keeps():
    """Seed 1 ranks the recipes as seed 0 does but for seed 0's two best, which it ranks last.
    Each seed decides for the other: the ⌈12/3⌉ = 4 full runs it would keep, against the
    other's top 3."""
    names = [f"r{i}" for i in range(12)]
    first = {n: i for i, n in enumerate(names)}
    second = {**first, "r11": -2, "r10": -1}
    runs = {n: [{"full": _run([first[n]])}, {"full": _run([second[n]])}] for n in names}
    own, by_mean = bench.another_seed_deciding(runs, 2, 3.0)
    # seed 1 keeps r9, r8, r7, r6: seed 0's top 3 (r11, r10, r9) hold r9 only → 1/3;
    # seed 0 keeps r11…r8: seed 1's top 3 (r9, r8, r7) hold r9, r8 → 2/3
    assert own == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert by_mean == pytest.approx((1 / 3 + 2 / 3) / 2)  # with two seeds, the other one's own
    assert bench.another_seed_deciding(runs, 1, 3.0) is None

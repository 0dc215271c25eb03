"""Do a search's early decisions agree with full training? Old ASHA against the rungs of complete
runs, replayed on what full training says.

    python scripts/bench_fidelity.py BASE.yaml --seeds K [--recipe 'NAME={method mapping}' …]
           [--rungs 0.125,1.0] [--rf 3] [--no-wait] [--slots 2] [--bracket B]
           [--measure 0.125,0.25,1.0]
           [--save runs.json | --load runs.json]

BASE.yaml is an ``ltsearch train`` config (or a search file: its ``base``). Every preset (the
fine-tuning ones only with ``model.weights``) and each ``--recipe`` is trained to the end with
seeds 0…K-1, without Ray, recording its validation value at every epoch; and trained again
compressed to each fraction of ``--measure`` (default ``--rungs``). ``--save`` writes the runs as
they are measured and trains none it already holds (an interrupted measurement, or more seeds,
goes on from it); ``--load`` replays saved runs with any ``--rungs`` among those measured.

For each seed, both schedulers are replayed on those runs as a search would meet them: ``--slots``
trials at a time in the order the search starts them (old: the file's order; new: shuffled by
the search seed), each epoch taking the time it took. Old ASHA is Ray Tune's ``ASHAScheduler``
(truncated runs: ``--asha-grace`` epochs, ``--asha-rf``); the new one is the search's rule
(:class:`ltsearch.search.rungs.Rungs`, with its waiting unless ``--no-wait``, in brackets of
``--bracket`` trials by start order if given). Printed side by
side: Spearman ρ between each decision value and the final value, how often the full-training
top-1 and top-3 reach their end, whether the recipe that ends best was cut (before its deferred
phase?), and the epochs trained as a share of training every recipe to its end — judged against
each seed's own final values, and against their mean over the K seeds (one run's noise averaged
out; with K ≥ 2 the script also prints how well one seed's full training ranks another's, and
how often the full runs another seed's full training would keep hold the top 3: a reference for
what a perfect-as-full-training decision value reaches on noisy ends).

The runs behind the README's tables are in ``scripts/fidelity/measured/`` (``--load`` replays them).

A benchmark, not a test: numbers mean something only on the data and machine that printed them.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import yaml


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return float(rho) if math.isfinite(rho) else 0.0


# --------------------------------------------------------------------------------------------
# Training (no Ray)

def train(cfg, data, metric: str) -> dict:
    """One run to its end: the metric at every epoch, each epoch's seconds, where its deferred
    phase begins (the first epoch a second stage or DRW/DRS trains in)."""
    from ltsearch.trainer import Trainer

    trainer = Trainer(cfg, data)
    curve, seconds = [], []
    trainer.fit(lambda m, tr: (curve.append(m[metric]), seconds.append(m["epoch_time_s"])))
    return {"curve": curve, "seconds": seconds, "deferred": deferred_epoch(cfg)}


def deferred_epoch(cfg) -> int | None:
    """The first 0-based epoch of the recipe's deferred part: a second stage, deferred
    re-weighting or re-sampling; None if it defers nothing."""
    from ltsearch.config import resolve_epoch

    m, total = cfg.method, cfg.train.epochs
    starts = []
    if m.stage2 is not None:
        starts.append(total)
    if m.weights is not None and m.weights.start not in ("always", "never"):
        starts.append(resolve_epoch(m.weights.start, total))
    if m.sampler.then is not None and m.sampler.start not in ("always", "never"):
        starts.append(resolve_epoch(m.sampler.start, total))
    starts = [s for s in starts if s]
    return min(starts) if starts else None


def measure(base: dict, recipes: dict[str, dict], seeds: int, fractions: list[float],
            metric: str, reuse: dict | None = None, save: str | None = None,
            done: dict | None = None) -> dict:
    """Each recipe and seed: its full run and one run compressed to each fraction below 1
    (``fractions`` may hold more than one scheduler uses: the replays pick theirs). ``done``:
    runs measured before (an interrupted ``--save``, or one with fewer seeds), not trained again."""
    from ltsearch.data import build_data
    from ltsearch.runconfig import compressed, config_from_dict

    data = build_data(config_from_dict(base).data)
    print(f"data: {data.summary()}", file=sys.stderr)
    short = [f for f in fractions if f < 1.0]
    runs: dict = {}
    for seed in range(seeds):  # a seed of every recipe at a time: a cut-off save holds whole seeds
        for name, method in recipes.items():
            if done and len(done.get(name, [])) > seed and done[name][seed]["fractions"] == short:
                runs.setdefault(name, []).append(done[name][seed])
                continue
            cfg = config_from_dict({**base, "seed": seed, "method": method})
            began = time.perf_counter()
            entry = {"full": reuse[name][seed]["full"] if reuse else train(cfg, data, metric),
                     "fractions": short}
            entry["short"] = [train(compressed(cfg, f), data, metric) for f in short]
            runs.setdefault(name, []).append(entry)
            full = entry["full"]["curve"]
            ends = " ".join(f"{f:g}: {r['curve'][-1]:.3f}" for f, r in zip(short, entry["short"]))
            print(f"  {name:<18} seed {seed}: {len(full)} epochs, end {full[-1]:.3f}; compressed "
                  f"{ends} ({time.perf_counter() - began:.0f} s)", file=sys.stderr)
            if save:  # as it goes: an interrupted measurement keeps what it trained
                Path(save).write_text(json.dumps({**(done or {}), **runs}))
    return runs


def rung_runs(entry: dict, fractions: list[float]) -> list[dict]:
    """The runs a scheduler with rungs ``fractions`` trains: the measured compressed ones, then
    the full run. An older save (``rungs``: its compressed runs and the full) reads as well."""
    if "short" not in entry:
        entry = {**entry, "fractions": [], "short": entry["rungs"][:-1]}
    out = []
    for f in fractions[:-1]:
        match = [r for g, r in zip(entry["fractions"], entry["short"]) if abs(g - f) < 1e-9]
        if not match:
            sys.exit(f"no run compressed to {f:g} was measured (measured: "
                     f"{', '.join(map(format, entry['fractions'], ['g'] * len(entry['fractions'])))})")
        out.append(match[0])
    return out + [entry["full"]]


# --------------------------------------------------------------------------------------------
# Replays

def replay(order: list[str], steps: dict[str, list[tuple[float, dict]]], decide, slots: int,
           waited=None) -> dict:
    """A search's timeline: ``slots`` trials at a time, started in ``order``; each trial is a list
    of (seconds, report); ``decide(name, i)`` says GO, STOP or WAIT about its i-th report (WAIT:
    paused, its slot to the next trial; it resumes at its next rung, or at this one's start if
    this report began it). ``waited(name)`` says a waiting trial's turn: GO, STOP or None (wait
    on); waiting trials that rank in go before new ones, as the search's scheduler picks them.
    Returns the epochs each trial trained, whether it reached its end, and the time it all took."""
    from ltsearch.search.rungs import GO, STOP, WAIT

    waiting = list(order)
    running: list = []  # (time its next epoch ends, name, index of that epoch)
    held: dict[str, int] = {}  # a waiting trial → the index of the epoch it resumes at
    clock, trained, ended = 0.0, {n: 0 for n in order}, {}
    first_end = None  # when the first trial reached its end: the first full result

    def push(now, name, i):
        heapq.heappush(running, (now + steps[name][i][0], name, i))

    def turns():
        for name in list(held):
            turn = waited(name)
            if turn == STOP:
                del held[name]
                ended[name] = False
            elif turn == GO and len(running) < slots:
                push(clock, name, held.pop(name))

    def start():
        while len(running) < slots and waiting:
            push(clock, waiting.pop(0), 0)
        turns()

    start()
    while running:
        clock, name, i = heapq.heappop(running)
        trained[name] += 1
        verdict = decide(name, i)  # Tune's ASHA says STOP at max_t: the end
        if i + 1 == len(steps[name]):
            ended[name] = True
            first_end = clock if first_end is None else first_end
        elif verdict == STOP:
            ended[name] = False
        elif verdict == WAIT:
            held[name] = i + 1 if steps[name][i][1].get("ends_rung") else i
        else:
            push(clock, name, i + 1)
        turns()  # (a value that settles a rung decides the waiting trials)
        start()
    for name in held:  # (none: the last rung value settles every rung)
        ended[name] = False
    return {"trained": trained, "ended": ended, "clock": clock, "first_end": first_end}


def replay_asha(runs: dict, seed: int, order: list[str], slots: int, grace: int, rf: float) -> dict:
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(len(runs[n][seed]["full"]["curve"]) for n in order)
    asha = ASHAScheduler(time_attr="epoch", metric="value", mode="max", max_t=max_t,
                         grace_period=grace, reduction_factor=rf)
    trials = {n: SimpleNamespace(trial_id=n) for n in order}
    for t in trials.values():
        asha.on_trial_add(None, t)
    steps = {n: [(s, {"epoch": e + 1, "value": v}) for e, (s, v) in
                 enumerate(zip(runs[n][seed]["full"]["seconds"], runs[n][seed]["full"]["curve"]))]
             for n in order}
    return replay(order, steps, lambda n, i: "stop" if asha.on_trial_result(
        None, trials[n], steps[n][i][1]) == "STOP" else "go", slots)


def replay_all(runs: dict, seed: int, order: list[str], slots: int) -> dict:
    """Every recipe trained to its end, ``slots`` at a time: what the compute and the time of a
    scheduler are compared with."""
    steps = {n: [(s, {}) for s in runs[n][seed]["full"]["seconds"]] for n in order}
    return replay(order, steps, lambda n, i: "go", slots)


def replay_rungs(runs: dict, seed: int, order: list[str], slots: int, rf: float,
                 fractions: list[float], wait: bool = True, bracket: int | None = None) -> dict:
    """The search's rungs (:class:`ltsearch.search.rungs.Rungs`, as its scheduler uses them) on
    one seed's runs; ``wait``: a trial waits until its rung ranks it in or out for good (else
    decided at once on the values so far, as the search did before 2026-12-03); ``bracket``:
    ranked among the trials up to the end of its bracket in start order (None: all)."""
    from ltsearch.search.rungs import BUDGETS, RUNG_VALUES, Rungs, ranked_among

    rungs = Rungs(rf, "max")
    steps = {}
    for n in order:
        runs_of = rung_runs(runs[n][seed], fractions)
        budgets = [len(r["curve"]) for r in runs_of]
        steps[n], values = [], []
        for r in runs_of:
            for e, s in enumerate(r["seconds"]):
                if e + 1 == len(r["curve"]):
                    values = values + [r["curve"][-1]]
                steps[n].append((s, {RUNG_VALUES: values, BUDGETS: budgets, "first": e == 0,
                                     "ends_rung": e + 1 == len(r["curve"])}))
    total = len(fractions)
    out = {n: False for n in order}  # ended for good before its last rung

    def field(n):  # (most, peers), as the search's scheduler gives them
        if not wait:  # decided at once: on the values so far
            return (lambda k: len(rungs.values[k])), None
        peers = order[:ranked_among(order, n, bracket, len(order))]
        # the trials that have ended rung k or may still: all but those ended before
        return (lambda k: sum(rungs.ended(m, k) or not out[m] for m in peers),
                None if bracket is None else set(peers))

    def decide(n, i):
        report = steps[n][i][1]
        verdict = rungs.verdict(n, report[RUNG_VALUES], total, report["ends_rung"] or report["first"],
                                *field(n))
        out[n] = out[n] or (verdict == "stop" and i + 1 < len(steps[n]))
        return verdict

    def waited(n):
        turn = rungs.standing(n, total, *field(n))
        out[n] = out[n] or turn == "stop"
        return turn

    return replay(order, steps, decide, slots, waited)


# --------------------------------------------------------------------------------------------
# What they decided, against full training

def judge(runs: dict, seeds: int, outcomes: list[dict], first_values: list[dict],
          truth: str = "seed", first_run: dict | None = None, alls: list[dict] = ()) -> dict:
    """What a scheduler decided against full training: each seed's own final values
    (``truth="seed"``), or their mean over the seeds (``"mean"``: what training every recipe
    K times says, with the noise of one run averaged out). ``first_run``: the epochs of each
    recipe's first rung run, which runs its deferred part too (the rungs); None: a truncated
    run (old ASHA) runs it only past the epoch it starts at. ``alls``: each seed's
    :func:`replay_all`, the time the scheduler's is compared with."""
    names = list(runs)
    mean_final = {n: statistics.mean(r["full"]["curve"][-1] for r in runs[n][:seeds]) for n in names}
    rho, top1, top3, share, cut = [], [], [], [], []
    wall = [o["clock"] / a["clock"] for o, a in zip(outcomes, alls)]
    first_end = [o["first_end"] / a["clock"] for o, a in zip(outcomes, alls)]
    for seed, (outcome, first) in enumerate(zip(outcomes, first_values)):
        final = (mean_final if truth == "mean" else
                 {n: runs[n][seed]["full"]["curve"][-1] for n in names})
        rho.append(spearman([first[n] for n in names], [final[n] for n in names]))
        ranked = sorted(names, key=lambda n: -final[n])
        top1.append(outcome["ended"][ranked[0]])
        top3.append(sum(outcome["ended"][n] for n in ranked[:3]) / 3)
        share.append(sum(outcome["trained"].values())
                     / sum(len(runs[n][seed]["full"]["curve"]) for n in names))
        best = ranked[0]
        deferred = runs[best][seed]["full"]["deferred"]
        if not outcome["ended"][best]:
            trained = outcome["trained"][best]
            ran = trained >= first_run[best] if first_run else trained > (deferred or 0)
            cut.append(f"seed {seed}: {best} after {trained} epochs" + (
                "" if not deferred else " (after a run with its deferred part)" if ran else
                f" (before its deferred part, due at epoch {deferred + 1})"))
    return {"rho": statistics.mean(rho), "top1": statistics.mean(top1), "top3": statistics.mean(top3),
            "share": statistics.mean(share), "cut": cut,
            "wall": statistics.mean(wall) if wall else None,
            "first_end": statistics.mean(first_end) if first_end else None}


def another_seed_deciding(runs: dict, seeds: int, rf: float) -> tuple[float, float] | None:
    """A reference for the top-3 share: the full runs kept (⌈N/η⌉, as the rungs keep) chosen by
    another seed's full training, a decision value as good as training to the end. How often
    they hold a seed's own top 3, and the top 3 by the mean of the other seeds (the deciding
    seed left out); None with one seed."""
    if seeds < 2:
        return None
    names = list(runs)
    final = lambda n, s: runs[n][s]["full"]["curve"][-1]  # noqa: E731
    keep = math.ceil(len(names) / rf)
    own, mean = [], []
    for t in range(seeds):  # the deciding seed
        kept = set(sorted(names, key=lambda n: -final(n, t))[:keep])
        others = [s for s in range(seeds) if s != t]
        by_mean = sorted(names, key=lambda n: -statistics.mean(final(n, s) for s in others))
        mean.append(len(kept & set(by_mean[:3])) / 3)
        own.extend(len(kept & set(sorted(names, key=lambda n: -final(n, s))[:3])) / 3
                   for s in others)
    return statistics.mean(own), statistics.mean(mean)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="an ltsearch train config, or a search file (its base)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per recipe (each also a "
                                                         "search seed of the replays)")
    p.add_argument("--recipe", action="append", default=[],
                   help="NAME=MAPPING: a composed recipe besides the presets, e.g. "
                        "'ldam+crt={name: custom, loss: ldam, stage2: {name: crt}}'")
    p.add_argument("--presets", default="", help="comma-separated presets (default: all)")
    p.add_argument("--rungs", help="the new scheduler's rungs (fractions; default: the search's, "
                                   "for BASE's epochs)")
    p.add_argument("--measure", help="fractions to train compressed runs at (default: --rungs); "
                                     "a later --load replays any rungs among them")
    p.add_argument("--rf", type=float, default=3.0, help="the new scheduler's reduction factor")
    p.add_argument("--asha-grace", type=int, default=2, help="old ASHA's grace period (epochs)")
    p.add_argument("--asha-rf", type=float, default=2.0, help="old ASHA's reduction factor")
    p.add_argument("--no-wait", action="store_true", help="the new scheduler decides at once "
                   "(search.asha.wait: false)")
    p.add_argument("--slots", type=int, default=2, help="trials at a time in the replays")
    p.add_argument("--bracket", type=int, help="the new scheduler ranks a trial among those up to "
                   "the end of its bracket of this many, in start order (search.asha.bracket; "
                   "default: all, as a search of at most 12 trials does)")
    p.add_argument("--metric", default="val/balanced_acc", help="the search's metric")
    p.add_argument("--save", help="write the measured runs to this JSON file, as they are "
                                  "measured (runs it holds already are not trained again)")
    p.add_argument("--load", help="replay runs measured before (no training)")
    p.add_argument("--reuse", help="take the full runs from this earlier --save (train only "
                                   "the rungs' shorter runs)")
    args = p.parse_args(argv)

    from ltsearch.recipes import PRESETS
    from ltsearch.recipes.presets import PRETRAINED
    from ltsearch.search.run import cover_order

    data = yaml.safe_load(Path(args.base).read_text()) or {}
    base = data.get("base", data) if isinstance(data.get("search"), dict) or "space" in data else data
    base.pop("method", None)
    from ltsearch.runconfig import config_from_dict
    from ltsearch.search.rungs import AshaSettings

    epochs = config_from_dict(base).train.epochs
    if args.rungs:
        fractions = [float(f) for f in args.rungs.split(",")]
    else:  # what a search over this base would run
        asha = AshaSettings()
        asha.settle(epochs)
        fractions = asha.fractions()
    measured = [float(f) for f in args.measure.split(",")] if args.measure else fractions
    # a rung is its compressed run's length: 0.125 and 4/30 of 30 epochs are both 4 epochs
    same = lambda f, g: max(1, round(epochs * f)) == max(1, round(epochs * g))  # noqa: E731

    def as_saved(fs: list[float], saved: list[float]) -> list[float]:  # (1.0: the full run)
        return [next((g for g in saved if same(f, g)), f) if f < 1.0 else f for f in fs]
    # the fine-tuning presets mean what their paper means only on a pretrained backbone
    pretrained = bool((base.get("model") or {}).get("weights"))
    names = args.presets.split(",") if args.presets else [
        n for n in PRESETS if n != "custom" and (pretrained or n not in PRETRAINED)]
    recipes = {n: {"name": n} for n in names}
    for item in args.recipe:
        name, _, mapping = item.partition("=")
        recipes[name] = yaml.safe_load(mapping)
    if args.load:
        runs = json.loads(Path(args.load).read_text())
        if args.presets:  # replay a subset of what was measured
            runs = {n: runs[n] for n in names if n in runs}
    else:
        reuse = json.loads(Path(args.reuse).read_text()) if args.reuse else None
        done = (json.loads(Path(args.save).read_text())
                if args.save and Path(args.save).is_file() else None)
        if done:  # the same rungs under another name are not trained again
            measured = as_saved(measured, next(iter(done.values()))[0]["fractions"])
        runs = measure(base, recipes, args.seeds, measured, args.metric, reuse, args.save, done)
    if args.save:
        Path(args.save).write_text(json.dumps(runs))
    names = list(runs)
    seeds = min(len(v) for v in runs.values())
    fractions = as_saved(fractions, runs[names[0]][0]["fractions"])

    old = [replay_asha(runs, s, names, args.slots, args.asha_grace, args.asha_rf) for s in range(seeds)]
    new = [replay_rungs(runs, s, cover_order(names, s), args.slots, args.rf, fractions,
                        not args.no_wait, args.bracket) for s in range(seeds)]
    old_first = [{n: runs[n][s]["full"]["curve"][args.asha_grace - 1] for n in names} for s in range(seeds)]
    new_first = [{n: rung_runs(runs[n][s], fractions)[0]["curve"][-1] for n in names} for s in range(seeds)]
    first_run = {n: len(rung_runs(runs[n][0], fractions)[0]["curve"]) for n in names}
    alls = [replay_all(runs, s, names, args.slots) for s in range(seeds)]
    a = judge(runs, seeds, old, old_first, alls=alls)
    b = judge(runs, seeds, new, new_first, first_run=first_run, alls=alls)
    am, bm = (judge(runs, seeds, old, old_first, "mean"),
              judge(runs, seeds, new, new_first, "mean", first_run))

    budgets = [len(r["curve"]) for r in rung_runs(runs[names[0]][0], fractions)]
    print(f"\n{len(names)} recipes × {seeds} seeds, {args.slots} at a time; old: ASHA on epochs "
          f"(grace {args.asha_grace}, η {args.asha_rf:g}, file order); new: rungs "
          f"{','.join(f'{f:.3g}' for f in fractions)} of complete runs (η {args.rf:g}; {names[0]}: {budgets} epochs), "
          f"cover order shuffled by seed" + (f", brackets of {args.bracket}" if args.bracket else ""))
    print(f"\n{'recipe':<18} {'end (mean)':>10} {f'@epoch {args.asha_grace}':>9} {'1st rung':>8} "
          f"{'old: reached end':>17} {'new: reached end':>17}")
    for n in sorted(names, key=lambda n: -statistics.mean(r["full"]["curve"][-1] for r in runs[n][:seeds])):
        mean = lambda f: statistics.mean(f(r) for r in runs[n][:seeds])  # noqa: E731
        print(f"{n:<18} {mean(lambda r: r['full']['curve'][-1]):>10.3f} "
              f"{mean(lambda r: r['full']['curve'][args.asha_grace - 1]):>9.3f} "
              f"{mean(lambda r: rung_runs(r, fractions)[0]['curve'][-1]):>8.3f} "
              f"{sum(o['ended'][n] for o in old):>12} of {seeds} {sum(o['ended'][n] for o in new):>12} of {seeds}")
    print(f"\n{'':<44}{'old ASHA':>10} {'new rungs':>10}")
    rows = [("Spearman ρ, first decision value vs final", "rho", "{:.2f}"),
            ("full-training top-1 reaches its end", "top1", "{:.0%}"),
            ("full-training top-3 reach their end", "top3", "{:.0%}"),
            ("compute, share of training all to the end", "share", "{:.0%}"),
            (f"time, share of training all to the end ({args.slots} at a time)", "wall", "{:.0%}"),
            ("the first full run ends, at a share of that", "first_end", "{:.0%}")]
    for label, key, fmt in rows:
        print(f"{label:<44}{fmt.format(a[key]):>10} {fmt.format(b[key]):>10}")
    if seeds > 1:
        print(f"against the mean of the {seeds} seeds' final values:")
        for label, key, fmt in rows[:3]:
            print(f"  {label:<42}{fmt.format(am[key]):>10} {fmt.format(bm[key]):>10}")
    rhos = [spearman([runs[n][s]["full"]["curve"][e - 1] for n in names],
                     [runs[n][s]["full"]["curve"][-1] for n in names])
            for e in (2, 4, 8) if e < len(runs[names[0]][0]["full"]["curve"]) for s in range(seeds)]
    if rhos:
        print("(old: ρ of truncated runs at epochs 2 / 4 / 8: " + " / ".join(
            f"{statistics.mean(rhos[i * seeds:(i + 1) * seeds]):.2f}" for i in range(len(rhos) // seeds)) + ")")
    if seeds > 1:  # the ceiling: how well one seed's full training ranks the recipes for another
        pairs = [(s, t) for s in range(seeds) for t in range(s + 1, seeds)]
        ceiling = statistics.mean(spearman([runs[n][s]["full"]["curve"][-1] for n in names],
                                           [runs[n][t]["full"]["curve"][-1] for n in names])
                                  for s, t in pairs)
        own, by_mean = another_seed_deciding(runs, seeds, args.rf)
        print(f"(full training against itself: ρ between two seeds' final values {ceiling:.2f}; "
              f"the {math.ceil(len(names) / args.rf)} full runs another seed's full training would "
              f"keep hold the top 3 in {own:.0%} (own seed) / {by_mean:.0%} (mean of the others): "
              f"what a decision value as good as another full run reaches)")
    for label, verdict in (("old", a), ("new", b), ("old, by the mean", am), ("new, by the mean", bm)):
        print(f"the best recipe at the end cut early ({label}): " + ("; ".join(verdict["cut"]) or "never"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

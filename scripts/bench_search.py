"""Where a search's time goes, for the old settings and the new, side by side.

    python scripts/bench_search.py search_spaces/quickstart.yaml [--only old|new] [--keep DIR]

Runs ``ltsearch search FILE`` as a user would (a fresh folder and a fresh MLflow store each)
once with the old path (a fresh worker process per trial, a checkpoint every epoch, the driver
waiting on every MLflow call) and once with the new defaults, then prints: wall time, search
efficiency (Σ epoch training time ÷ (first trial start → last trial end × concurrent slots)),
the median fixed cost per trial (everything but its epochs) and its parts, and whether both
produced the same trials and ranking. Then the new path's longest trial is trained again with
``ltsearch train`` (no Ray), alone and as many at once as the search has slots: how fast the
cores run concurrent epochs by themselves, against the search's; and the wall time the search's
epochs alone take over its slots, below which no change outside the epochs can go.
A benchmark, not a test: numbers mean something only on the machine that printed them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

OLD = {"reuse_workers": False, "checkpoint_every": 1, "background_tracking": False}
NEW: dict = {}  # the defaults


def run(space: Path, settings: dict, folder: Path) -> dict:
    """One search in ``folder``; its wall time and the analysis of what it left."""
    data = yaml.safe_load(space.read_text())
    data.setdefault("search", {}).update(settings)
    path = folder / space.name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               MLFLOW_DISABLE_TELEMETRY="true")
    exe = Path(sys.executable).parent / "ltsearch"
    start, clock = time.perf_counter(), time.time()  # trials.json holds wall-clock times
    out = subprocess.run([str(exe), "search", str(path)], cwd=folder, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"the search failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return {"wall": wall, "began": clock, "slots": data["search"].get("max_concurrent", 2),
            **analyse(folder / "searches" / path.stem)}


def analyse(search_dir: Path) -> dict:
    """Per trial, from trials.json (the driver's view) and Ray's result.json (the trial's)."""
    from ltsearch.search.results import read_reports

    records = json.loads((search_dir / "trials.json").read_text())
    rows = read_reports(search_dir)
    trials = []
    for trial_id, r in records.items():
        reports = rows.get(trial_id, [])
        last = reports[-1] if reports else {}
        train = sum(x.get("epoch_time_s", 0.0) for x in reports)
        duration = r["ended_at"] - r["started_at"]
        parts = {"worker start": last.get("entered_at", r["started_at"]) - r["started_at"],
                 "data + trainer build": last.get("time/setup_s", 0.0),
                 "evaluation": last.get("time/eval_s", 0.0),
                 "checkpoint + report": last.get("time/report_s", 0.0),
                 "tracking (driver)": r.get("driver_s", 0.0)}
        parts["other"] = duration - train - sum(parts.values())
        numbers = [{k: v for k, v in x.items() if not isinstance(v, list)  # only a trial's last
                    and (("/" in k and not k.startswith("time/")) or k == "lr")}  # report has lists
                   for x in reports]
        trials.append({"id": trial_id, "train": train, "epochs": len(reports), "reports": reports,
                       "duration": duration, "fixed": duration - train,
                       "parts": parts, "start": r["started_at"], "end": r["ended_at"],
                       "pid": last.get("pid"), "status": r["status"], "method": r["method"],
                       "config": r["config"], "metrics": r["metrics"], "numbers": numbers})
    return {"trials": trials}


def summary(result: dict) -> dict:
    trials = result["trials"]
    train = sum(t["train"] for t in trials)
    first, last = min(t["start"] for t in trials), max(t["end"] for t in trials)
    span = last - first
    out = {"wall time (s)": result["wall"],
           "  command start → first trial (s)": first - result["began"],
           "  last trial end → exit (s)": result["began"] + result["wall"] - last,
           "trials": len(trials),
           "worker processes": len({t["pid"] for t in trials}),
           "epochs trained": sum(t["epochs"] for t in trials),
           "Σ epoch training (s)": train, "first start → last end (s)": span,
           "search efficiency (%)": 100 * train / (span * result["slots"]),
           "slot time between trials (s/trial)":
               (span * result["slots"] - sum(t["duration"] for t in trials)) / len(trials),
           "median fixed cost per trial (s)": statistics.median(t["fixed"] for t in trials)}
    for part in trials[0]["parts"]:
        out[f"  {part}"] = statistics.median(t["parts"][part] for t in trials)
    return out


def epoch_speeds(result: dict, folder: Path) -> dict:
    """Median s/epoch of the new path's longest trial: in the search, then its config trained by
    ``ltsearch train`` (no Ray, driver or tracking) alone, and as many copies at once as the
    search has slots: what the cores give concurrent trials by themselves."""
    trial = max(result["trials"], key=lambda t: t["epochs"])
    path = folder / "trial.yaml"
    path.write_text(yaml.safe_dump(trial["config"], sort_keys=False))
    exe = Path(sys.executable).parent / "ltsearch"

    def train(copies: int) -> float:
        logs = [folder / f"{copies}-{i}.log" for i in range(copies)]
        procs = [subprocess.Popen([str(exe), "train", str(path), "--out", str(folder / f"{copies}-{i}")],
                                  stdout=open(log, "w"), stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
        for p, log in zip(procs, logs):
            if p.wait() != 0:
                sys.exit(f"ltsearch train failed:\n{log.read_text()[-3000:]}")
        return statistics.median(h["epoch_time_s"] for i in range(copies) for h in json.loads(
            (folder / f"{copies}-{i}" / "metrics.json").read_text())["history"])

    in_search = statistics.median(x["epoch_time_s"] for x in trial["reports"])
    alone, together = train(1), train(result["slots"])
    return {"trial": f"{trial['method']} {trial['id']}", "in_search": in_search, "alone": alone,
            "together": together}


def compare(old: dict, new: dict) -> str:
    """Same trials (configs), same per-epoch numbers wherever both ran an epoch, and which
    trials ASHA decided differently (its decisions follow the order results arrive in)."""
    by_config = lambda r: {json.dumps(t["config"], sort_keys=True): t for t in r["trials"]}
    a, b = by_config(old), by_config(new)
    if sorted(a) != sorted(b):
        return "different trials (configs): TPE saw different histories"
    same_numbers = all(x == y for k in a for x, y in zip(a[k]["numbers"], b[k]["numbers"]))
    moved = [f"{a[k]['method']} {a[k]['status'].lower()}→{b[k]['status'].lower()}"
             for k in a if a[k]["status"] != b[k]["status"]]
    return (f"same trials (configs): yes; identical numbers at every epoch both ran: "
            f"{'yes' if same_numbers else 'no'}; ASHA decided differently: "
            f"{', '.join(moved) if moved else 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("space", type=Path)
    ap.add_argument("--only", choices=["old", "new"])
    ap.add_argument("--keep", type=Path, help="keep the search folders here (else deleted)")
    args = ap.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, settings in (("old", OLD), ("new", NEW)):
        if args.only and args.only != name:
            continue
        with (contextlib.nullcontext(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=args.keep))
              if args.keep else tempfile.TemporaryDirectory(prefix=f"bench-{name}-")) as folder:
            print(f"running the {name} path in {folder} …", file=sys.stderr, flush=True)
            results[name] = run(args.space.resolve(), settings, Path(folder))
            if name == "new":
                print("training its longest trial's config without Ray …", file=sys.stderr, flush=True)
                speeds = epoch_speeds(results[name], Path(folder))
    sums = {k: summary(v) for k, v in results.items()}
    names = list(sums)
    print(f"{args.space} on {os.cpu_count()} CPU(s)")
    print(f"{'':34}" + "".join(f"{n:>10}" for n in names) + ("    new/old" if len(names) == 2 else ""))
    for key in sums[names[0]]:
        vals = [sums[n][key] for n in names]
        line = f"{key:34}" + "".join(f"{v:>10.2f}" if isinstance(v, float) else f"{v:>10}" for v in vals)
        if len(vals) == 2 and isinstance(vals[0], float) and vals[0] and "%" not in key:
            line += f"{vals[1] / vals[0]:>11.2f}"
        print(line)
    if len(names) == 2:
        print(compare(results["old"], results["new"]))
    if "new" in results:
        slots = results["new"]["slots"]
        print(f"s/epoch of {speeds['trial']}: {speeds['in_search']:.2f} in the search, "
              f"{speeds['alone']:.2f} trained alone without Ray, {speeds['together']:.2f} with "
              f"{slots} at once without Ray (×{speeds['together'] / speeds['alone']:.2f})")
        print(f"the new path's Σ epoch training over {slots} slots: "
              f"{sum(t['train'] for t in results['new']['trials']) / slots:.1f} s, its wall time "
              "if starting, ending and the gaps between trials cost nothing")


if __name__ == "__main__":
    main()

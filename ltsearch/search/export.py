"""``ltsearch export``: the top-K configs of a search (confirmed configs first, by their mean
over fresh seeds, then trials that ran to the end), or its Pareto set over ``search.objectives``,
and a CSV of all trials, read from the search folder alone (no Ray, no MLflow needed)."""
from __future__ import annotations

from pathlib import Path

from ltsearch.config import ConfigError
from ltsearch.search.records import TRIALS_FILE, TrialRecords, origin_of, write_config


def export_search(search_dir: Path, top: int, out: Path, pareto: bool = False) -> list[Path]:
    from ltsearch.search.space import load_search_file

    search_dir = Path(search_dir)
    if not (search_dir / TRIALS_FILE).is_file():
        raise ConfigError("search_dir", f"{search_dir} holds no {TRIALS_FILE}: not a search folder")
    settings = load_search_file(search_dir / "search.yaml").settings
    records = TrialRecords(search_dir)
    if pareto:
        if not settings.objectives:
            raise ConfigError("--pareto", f"the search in {search_dir} has one objective "
                                          f"({settings.metric}); search.objectives names two or more")
        chosen = [("pareto", r) for r in records.pareto(settings.objectives, settings.mode)]
    else:
        chosen = [("top", r) for r in records.selection(settings.metric, settings.mode)[:top]]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, (kind, r) in enumerate(chosen, start=1):
        path = out / f"{kind}{rank}_{r['method']}_{r['trial_id']}.yaml"
        write_config(r["config"], path, origin_of(search_dir, r))
        written.append(path)
    records.write_csv(out / "trials.csv")
    return written


def main_export(args) -> int:
    if args.top < 1:
        raise ConfigError("--top", f"must be >= 1, got {args.top}")
    written = export_search(Path(args.search_dir), args.top, Path(args.out), args.pareto)
    for p in written:
        print(p)
    print(Path(args.out) / "trials.csv")
    if not written:
        print("no trial ran to the end: no config exported")
    return 0

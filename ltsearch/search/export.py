"""``ltsearch export``: the top-K configs of a search (trials that ran to the end) and a CSV of
all trials, read from the search folder alone (no Ray, no MLflow needed)."""
from __future__ import annotations

from pathlib import Path

import yaml

from ltsearch.config import ConfigError
from ltsearch.search.records import TRIALS_FILE, TrialRecords, write_config


def export_search(search_dir: Path, top: int, out: Path) -> list[Path]:
    search_dir = Path(search_dir)
    if not (search_dir / TRIALS_FILE).is_file():
        raise ConfigError("search_dir", f"{search_dir} holds no {TRIALS_FILE}: not a search folder")
    settings = (yaml.safe_load((search_dir / "search.yaml").read_text()) or {}).get("search") or {}
    metric, mode = settings.get("metric", "val/balanced_acc"), settings.get("mode", "max")
    records = TrialRecords(search_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, r in enumerate(records.ranked(metric, mode)[:top], start=1):
        path = out / f"top{rank}_{r['method']}_{r['trial_id']}.yaml"
        write_config(r["config"], path)
        written.append(path)
    records.write_csv(out / "trials.csv")
    return written


def main_export(args) -> int:
    if args.top < 1:
        raise ConfigError("--top", f"must be >= 1, got {args.top}")
    written = export_search(Path(args.search_dir), args.top, Path(args.out))
    for p in written:
        print(p)
    print(Path(args.out) / "trials.csv")
    if not written:
        print("no trial ran to the end: no config exported")
    return 0

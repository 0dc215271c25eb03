"""``ltsearch search`` and ``ltsearch confirm`` as commands: their arguments, the summary a
person reads at the end, and the line saying how to continue a stopped one (its exit status).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

from ltsearch.config import ConfigError
from ltsearch.search.checks import FIXED_ON_RESUME, stored_settings
from ltsearch.search.finish import SearchOutcome, SearchStopped
from ltsearch.search.opened import RAY_SUBDIR
from ltsearch.search.records import CONFIRM_OF
from ltsearch.search.signals import NAMES
from ltsearch.search.tracker import TrackingError


def parse_confirm(value: Optional[str]) -> Optional[dict]:
    """``--confirm K:S`` → ``{"top": K, "seeds": S}``."""
    if value is None:
        return None
    parts = value.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError("--confirm", f"must be TOP:SEEDS, e.g. 3:5, got {value!r}")
    return {"top": int(parts[0]), "seeds": int(parts[1])}


def print_stopped(stop: SearchStopped, name: str, space, again: str) -> int:
    """The summary and one line on how to continue; the exit status."""
    print_summary(stop.outcome, name, space)
    if stop.outcome.ending == "interrupted":
        sig = stop.outcome.signal
        said = f"stopped by {NAMES[sig]}" if sig in NAMES and sig != signal.SIGINT else "interrupted"
        print(f"{said} — continue with `{again}`", file=sys.stderr)
        return 128 + int(sig or signal.SIGINT)
    cause = stop.cause
    unclosed = stop.outcome.unclosed
    if unclosed:
        then = (f"not written: {'; '.join(unclosed)}; once the disk has room again, `{again}` "
                "closes every record")
    elif isinstance(cause, TrackingError):
        then = (f"its folder and Optuna study are closed, its tracking records not: once the store "
                f"answers, `{again}` brings them up to date")
    else:
        then = f"everything recorded is closed; fix the cause, then `{again}`"
    if isinstance(cause, OSError) and cause.strerror:
        said = f"{type(cause).__name__}: {cause.strerror}" + (  # a write to an open file names none
            f": {cause.filename}" if cause.filename else f" (the search's folder: {stop.outcome.folder})")
    else:
        said = _one_line(cause)
    print(f"error: the search stopped: {said}\n  {then}", file=sys.stderr)
    return 1


def main_search(args) -> int:
    """``ltsearch search FILE``."""
    from ltsearch.search.run import run_search, search_name
    from ltsearch.search.space import load_search_file

    name = args.name or search_name(args.space)
    overrides = {"num_samples": args.num_samples, "max_concurrent": args.max_concurrent,
                 "tracking": "none" if args.no_tracking else None, "confirm": parse_confirm(args.confirm)}
    stored = stored_settings(Path(args.storage) / name) if args.resume else None
    for key in (*FIXED_ON_RESUME, "tracking"):  # as the search ran, unless the command line says
        if overrides[key] is None and stored is not None:
            overrides[key] = getattr(stored, key)
    space = load_search_file(args.space, overrides)
    try:
        outcome = run_search(space, name=name, storage=args.storage, address=args.address,
                             tracking_uri=args.tracking_uri, resume=args.resume,
                             verbose=args.verbose, began=args.began)
    except ConfigError as e:
        if e.key.split(".")[0] in ("base", "search", "space"):  # the file against its data
            raise ConfigError(e.key, f"{e.message} (in {args.space})") from None
        raise
    except SearchStopped as stop:  # stopped before Tune saved anything: run it again, afresh
        resumable = (stop.outcome.folder / RAY_SUBDIR / "tuner.pkl").is_file()
        return print_stopped(stop, name, space, f"ltsearch search {args.space}"
                      + (" --resume" if resumable else "")
                      + (f" --name {args.name}" if args.name else "")
                      + (f" --storage {args.storage}" if args.storage != "searches" else ""))
    print_summary(outcome, name, space)
    return 0


def print_summary(outcome: SearchOutcome, name: str, space) -> None:
    counts: dict[str, int] = {}
    confirmations: dict[str, int] = {}
    for r in outcome.records.trials.values():
        kept = confirmations if r.get(CONFIRM_OF) else counts
        kept[r["status"]] = kept.get(r["status"], 0) + 1

    def said(c: dict) -> str:
        return ", ".join(f"{v} {k.lower()}" for k, v in sorted(c.items()))

    if not counts:
        print(f"\nsearch {name}: no trial ran\n{outcome.tracking}")
        sys.stdout.flush()
        return
    more = f"; {sum(confirmations.values())} confirmation runs ({said(confirmations)})" if confirmations else ""
    print(f"\nsearch {name}: {sum(counts.values())} trials ({said(counts)}){more}")
    print(f"best trial per method (by {space.settings.metric}):\n{outcome.leaderboard}")
    if outcome.best_config:
        print(f"\nbest config: {outcome.best_config}\n  train it: ltsearch train {outcome.best_config}")
    objectives = space.settings.objectives
    if objectives:
        front = outcome.records.pareto(objectives, space.settings.mode)
        print(f"Pareto set over {', '.join(objectives)}: {len(front)} trials "
              f"({', '.join(r['method'] + ' ' + r['trial_id'] for r in front)})\n"
              f"  export it: ltsearch export {outcome.folder} --pareto --out DIR")
    if outcome.report:
        print(f"report: {outcome.report}")
    print(outcome.tracking)
    sys.stdout.flush()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def main_confirm(args) -> int:
    """``ltsearch confirm SEARCH_DIR --top K --seeds S``."""
    from ltsearch.search.records import TrialRecords
    from ltsearch.search.results import read_info
    from ltsearch.search.run import run_search
    from ltsearch.search.space import load_search_file

    folder = Path(args.search_dir).resolve()
    if not (folder / RAY_SUBDIR / "tuner.pkl").is_file() or not (folder / "search.yaml").is_file():
        raise ConfigError("search_dir", f"{folder} is not a search folder (no search.yaml and ray/)")
    for flag, value in (("--top", args.top), ("--seeds", args.seeds)):
        if value < 1:
            raise ConfigError(flag, f"must be >= 1, got {value}")
    info = read_info(folder)
    stored = load_search_file(folder / "search.yaml").settings
    ended = len(TrialRecords(folder).ranked(stored.metric, stored.mode))
    if not ended:
        raise ConfigError("search_dir", f"no trial of the search in {folder} ran to the end: "
                                        "there is nothing to confirm")
    if args.top > ended:  # count what exists
        print(f"--top {args.top}: the search has {ended} trial{'s' * (ended != 1)} that ran to "
              f"the end; confirming {'it' if ended == 1 else 'those'}", flush=True)
        args.top = ended
    tracking_uri = args.tracking_uri or info.get("tracking_uri") or None
    if args.register is not None:
        from ltsearch.search.tracking import registry_store

        registry_store(args.register, tracking_uri)
    overrides = {"confirm": {"top": args.top, "seeds": args.seeds, "register": args.register},
                 "tracking": "none" if args.no_tracking else info.get("tracking")}
    space = load_search_file(folder / "search.yaml", overrides)
    try:
        outcome = run_search(space, name=folder.name, storage=folder.parent, address=args.address,
                             tracking_uri=tracking_uri, verbose=args.verbose, confirm_only=True,
                             began=args.began)
    except SearchStopped as stop:
        return print_stopped(stop, folder.name, space,
                      f"ltsearch confirm {args.search_dir} --top {args.top} --seeds {args.seeds}"
                      + (f" --register {args.register}" if args.register else ""))
    print_summary(outcome, folder.name, space)
    if args.register is not None:
        from ltsearch.search.tracking import default_tracking_uri, prepare_environment

        prepare_environment()
        from ltsearch.search.registry import register_confirmed

        uri = tracking_uri or default_tracking_uri()
        done = register_confirmed(outcome.records, space.settings, uri, info.get("experiment") or "ltsearch",
                                  args.register)
        print(f"registered the confirmed best as {args.register} version {done['version']} in {uri}")
    sys.stdout.flush()
    return 0

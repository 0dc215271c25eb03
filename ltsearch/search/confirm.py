"""Confirmation with fresh seeds: after a search (``search.confirm``, ``--confirm K:S``) or for a
finished one (``ltsearch confirm SEARCH_DIR``), the K best configs are re-trained to their full
budget with S new seeds, as trials of the same Ray cluster and the same tracking record (tagged
as confirmation runs). A winner chosen on one seed and a small validation split may be luck;
the leaderboard then shows mean ± std over the seeds and ``best_config.yaml`` is the best mean.

Each round is a Tune experiment of its own (``confirm-N/``) without a scheduler; an interrupted
round is restored first, then whatever is still missing runs, so asking again for more seeds or
more configs runs only what is new.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from ray.tune.search import Searcher

from ltsearch.config import ConfigError
from ltsearch.search.limiter import SearchLimiter, agreeing
from ltsearch.search.opened import Search
from ltsearch.search.records import CONFIRM_OF, LIVE, ONGOING, SEED
from ltsearch.search.results import CONFIRM_PREFIX


class Points(Searcher):
    """Hands out the given Tune configs, each once, in order (Tune's own variant generator
    reads dotted keys as nested paths)."""

    def __init__(self, points: list[dict], metric: str, mode: str):
        super().__init__(metric=metric, mode=mode)
        self.points = list(points)
        self.given = 0

    def suggest(self, trial_id: str):
        if self.given >= len(self.points):
            return Searcher.FINISHED
        self.given += 1
        return dict(self.points[self.given - 1])

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_bytes(pickle.dumps((self.points, self.given)))

    def restore(self, checkpoint_path: str) -> None:
        self.points, self.given = pickle.loads(Path(checkpoint_path).read_bytes())


def confirmation_points(search: Search) -> list[dict]:
    """The Tune configs of the confirmation runs still to do: each of the K best trials that ran
    to the end with S fresh seeds (its own seed + 1 … + S), less those already run to the end."""
    settings = search.space.settings
    records = search.records
    done = {(r[CONFIRM_OF], r[SEED]) for r in records.trials.values()
            if r.get(CONFIRM_OF) and r["status"] == "COMPLETED"}
    points = []
    for r in records.ranked(settings.metric, settings.mode)[:settings.confirm.top]:
        if r.get("params") is None:
            raise ConfigError("search_dir", f"trial {r['trial_id']} has no recorded parameters "
                                            "(a search from an older ltsearch): it cannot be confirmed")
        own = r["config"].get(SEED, 0)
        points += [{**r["params"], CONFIRM_OF: r["trial_id"], SEED: own + i}
                   for i in range(1, settings.confirm.seeds + 1) if (r["trial_id"], own + i) not in done]
    return points


def open_runs(search: Search) -> list[dict]:
    """Confirmation runs an interrupted round left unfinished: resumed before anything new."""
    return [r for r in search.records.trials.values()
            if r.get(CONFIRM_OF) and r["status"] in ONGOING]


def confirmation_left(search: Search) -> bool:
    """Whether confirmation has runs to finish or to start (else Ray need not start)."""
    return bool(open_runs(search) or confirmation_points(search))


def run_confirmation(search: Search, verbose: int) -> str:
    """Run what confirmation is missing; "finished" or "interrupted"."""
    from ray import tune

    from ltsearch.search.callbacks import ProgressCallback, SearchCallback, quiet_trial_progress
    from ltsearch.search.ray_private import replace_restored_callbacks, restored_search_alg

    space, settings = search.space, search.space.settings
    ended = len(search.records.ranked(settings.metric, settings.mode))
    if settings.confirm.top > ended:  # a search's own --confirm K:S asked for more than ended
        print(f"confirming: {ended} of the {settings.confirm.top} trials asked for ran to the end",
              flush=True)
        settings.confirm.top = ended

    def callbacks():
        return [SearchCallback(search.records, space, search.tracker, search.backbone),
                ProgressCallback(search.records, space, confirming=True, began=search.began),
                *([quiet_trial_progress()] if verbose < 1 else [])]

    def ending(grid, asked: int) -> str:
        search.tune_trial_ids |= {r.metrics.get("trial_id") for r in grid if r.metrics}
        unfinished = [k for k, r in search.records.trials.items()
                      if r["status"] in LIVE and k in search.tune_trial_ids]
        return "interrupted" if unfinished or len(grid) < asked else "finished"

    rounds = sorted((p for p in search.folder.glob(f"{CONFIRM_PREFIX}*") if p.is_dir()),
                    key=lambda p: int(p.name.removeprefix(CONFIRM_PREFIX)))
    if open_runs(search) and rounds and (rounds[-1] / "tuner.pkl").is_file():
        tuner = tune.Tuner.restore(str(rounds[-1]), trainable=search.trainable(), resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        replace_restored_callbacks(tuner, callbacks() + agreeing(restored_search_alg(tuner)))
        if ending(tuner.fit(), 0) != "finished":
            return "interrupted"
    points = confirmation_points(search)
    if not points:
        return "finished"
    print(f"confirming {settings.confirm.said()}: {len(points)} run{'s' if len(points) > 1 else ''} "
          "to do", flush=True)
    searcher = Points(points, settings.metric, settings.mode)
    tuner = tune.Tuner(
        search.trainable(),
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=len(points),
            search_alg=SearchLimiter(searcher, settings.max_concurrent, len(points)),
            reuse_actors=settings.reuse_workers),
        run_config=tune.RunConfig(
            name=f"{CONFIRM_PREFIX}{len(rounds) + 1}", storage_path=str(search.folder),
            callbacks=callbacks(), verbose=2 if verbose >= 1 else 0,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
    return ending(tuner.fit(), len(points))

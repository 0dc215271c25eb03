"""A search file's ``search:`` settings: what a search runs and how, apart from its space
(``ltsearch.search.space``), which the folder's checks read on their own."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from ltsearch.config import ConfigError, spec
from ltsearch.metrics import SCALARS
from ltsearch.search.rungs import AshaSettings


@dataclass
class Resources:
    cpu: float = spec(1.0, gt=0.0)
    gpu: float = spec(0.0, ge=0.0, doc="fractional GPUs share one device, e.g. 0.25")


@dataclass
class ConfirmSettings:
    top: int = spec(0, ge=0, doc="after the search, re-train the K best configs to their full "
                                 "budget with fresh seeds (0: no confirmation)")
    seeds: int = spec(3, ge=1, doc="fresh seeds per confirmed config")
    register: Optional[str] = spec(None, doc="keep the runs' models and register the best "
                                             "confirmed one in MLflow under this name "
                                             "(`ltsearch confirm --register NAME`)")

    def said(self) -> str:
        """What confirmation re-trains, in words."""
        top, seeds = self.top, self.seeds
        return (f"{'the best config' if top == 1 else f'the {top} best configs'} with {seeds} fresh "
                f"seed{'s' if seeds > 1 else ''}{' each' if top > 1 else ''}")


@dataclass
class SearchSettings:
    metric: str = spec("val/balanced_acc", doc="a reported metric, e.g. val/top1")
    mode: Literal["max", "min"] = "max"
    num_samples: int = spec(12, ge=1)
    max_concurrent: int = spec(2, ge=1)
    resources: Resources = field(default_factory=Resources)
    asha: AshaSettings = field(default_factory=AshaSettings)
    seed: int = spec(0, doc="Optuna TPE sampler seed")
    max_failures: int = spec(0, ge=0, doc="retries of a failing trial")
    checkpoint_every: Optional[int] = spec(None, ge=1, doc="epochs between trial checkpoints "
                                                           "(default: by time, below)")
    checkpoint_interval_s: float = spec(60.0, gt=0, doc="without checkpoint_every: seconds of a "
                                                        "trial's time between its checkpoints")
    reuse_workers: bool = spec(True, doc="a worker process runs many trials in turn (imports, "
                                         "data and compiled graphs paid once)")
    background_tracking: bool = spec(True, doc="tracking calls on a thread of their own (false: "
                                               "the driver waits for each; for comparison)")
    experiment: Optional[str] = spec(None, doc="MLflow experiment (default: ltsearch)")
    tracking: Literal["mlflow", "none"] = spec("mlflow", doc="where runs are recorded besides "
                                                           "the search folder (none: nowhere)")
    cover_methods: bool = spec(True, doc="the first trials try each method once, then TPE")
    keep_models: int = spec(0, ge=0, doc="keep the models of the k best trials that run to the "
                                         "end, in models/<trial> (0: trials save no weights)")
    confirm: ConfirmSettings = field(default_factory=ConfirmSettings)
    report: bool = spec(True, doc="write report.html when the search ends (`ltsearch report` "
                                  "writes it at any time)")
    objectives: Optional[list[str]] = spec(None, doc="two or more metrics for a multi-objective "
                                                     "search (each with search.mode); ASHA stops "
                                                     "on the first, export --pareto writes the "
                                                     "Pareto set")

    def check(self):
        known = [f"val/{m}" for m in SCALARS] + ["train/loss"]
        if self.metric not in known:  # Tune would fail mid-search on a metric never reported
            raise ConfigError("metric", f"{self.metric!r} is not a metric trials report for "
                                        f"selection (one of: {', '.join(known)})")
        if self.objectives is not None:
            if not isinstance(self.objectives, list) or len(self.objectives) < 2:
                raise ConfigError("objectives", "must list two or more metrics (one metric: "
                                                "search.metric)")
            for i, name in enumerate(self.objectives):
                if name not in known:
                    raise ConfigError(f"objectives.{i}", f"{name!r} is not a metric trials report "
                                                         f"for selection (one of: {', '.join(known)})")
            if len(set(self.objectives)) < len(self.objectives):
                raise ConfigError("objectives", f"lists a metric twice: {self.objectives}")
            self.metric = self.objectives[0]  # what ASHA, the leaderboard and best_config use

    @property
    def directions(self) -> list[str]:
        """Optuna's direction per objective: each follows search.mode."""
        return ["minimize" if self.mode == "min" else "maximize"] * len(self.objectives or [self.metric])

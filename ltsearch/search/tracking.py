"""MLflow tracking, owned by the search driver.

One parent run per search, one child run per trial. The driver creates and ends every run (a
run opened inside a trial would stay RUNNING when the scheduler stops the trial): finished
trials end FINISHED, trials the scheduler stopped end KILLED, trials that raised end FAILED.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml
from ray.tune import Callback

from ltsearch.config import ConfigError
from ltsearch.recipes import reported_metrics
from ltsearch.search.records import error_text, finished_status, flatten

log = logging.getLogger(__name__)

TAG_SEARCH = "ltsearch.search_dir"
TAG_TRIAL = "ltsearch.trial_id"
TAG_PARENT = "mlflow.parentRunId"
TRAINER_METRICS = ("lr", "images_per_s", "epoch_time_s")  # the recipe's parts declare theirs


def prepare_environment() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if os.environ.pop("MLFLOW_EXPERIMENT_ID", None) is not None:
        log.warning("ignoring MLFLOW_EXPERIMENT_ID from the environment: ltsearch selects the "
                    "experiment by name (search.experiment)")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be reached: MLflow's client
    would retry an absent server for minutes and then print a traceback."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status == 200:
                    return
                reason = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        raise ConfigError("--tracking-uri", f"no MLflow server answers at {uri} ({reason}); "
                                            "start it or pass another --tracking-uri")
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ConfigError("--tracking-uri", f"{uri}: the folder {folder} does not exist")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _store_lock(uri: str):
    """Processes opening one sqlite store take turns: two first opens of a fresh ``mlflow.db``
    would both run MLflow's schema migrations and can corrupt it for good."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def experiment_id(uri: str, name: str) -> str:
    """The experiment called ``name`` (created, or restored if deleted); the first touch of the
    store, so it runs under the store's lock."""
    from mlflow.exceptions import MlflowException

    with _store_lock(uri):
        client = _client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp.experiment_id)
            return exp.experiment_id
        artifact_location = None
        if uri.startswith("sqlite:///"):
            artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another search on a server created it a moment ago
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def start_parent_run(uri: str, exp_id: str, search_dir: Path, name: str, params: dict) -> str:
    """The search's parent run; a resumed search finds and reopens its own."""
    client = _client(uri)
    found = client.search_runs([exp_id], f"tags.`{TAG_SEARCH}` = '{search_dir}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=name, tags={TAG_SEARCH: str(search_dir),
                                                          "ltsearch.kind": "search"})
    _log_params(client, run.info.run_id, params)
    return run.info.run_id


def end_parent_run(uri: str, run_id: str, artifacts: list[Path], status: str = "FINISHED") -> None:
    client = _client(uri)
    for path in artifacts:
        if path.is_file():
            client.log_artifact(run_id, str(path))
    # Nothing may stay RUNNING: trials that never reported an end (a killed driver) are KILLED.
    for child in client.search_runs([client.get_run(run_id).info.experiment_id],
                                    f"tags.`{TAG_PARENT}` = '{run_id}'", max_results=10000):
        if child.info.status == "RUNNING":
            client.set_terminated(child.info.run_id, "KILLED")
    client.set_terminated(run_id, status)


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


class MLflowTracker(Callback):
    """Tune callback on the driver: child runs with params, per-epoch metrics and artifacts."""

    def __init__(self, uri: str, exp_id: str, parent_run_id: str, space, classes: list[str],
                 counts: list[int]):
        self.uri = uri
        self.exp_id = exp_id
        self.parent = parent_run_id
        self.space = space
        self.classes = classes
        self.counts = counts
        self.runs: dict[str, str] = {}  # trial id → run id (also found again by tag on resume)
        self.logged: dict[str, int] = {}  # trial id → last epoch logged
        self.part_metrics = reported_metrics()

    def __getstate__(self):  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "runs": {}, "logged": {}}

    def _run_for(self, trial) -> str:
        if trial.trial_id in self.runs:
            return self.runs[trial.trial_id]
        client = _client(self.uri)
        found = client.search_runs(
            [self.exp_id], f"tags.`{TAG_TRIAL}` = '{trial.trial_id}' and tags.`{TAG_PARENT}` = '{self.parent}'",
            max_results=1)
        if found:  # a resumed search: the run reopens, and epochs it holds are not logged twice
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self.logged[trial.trial_id] = max(
                (m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)
        else:
            cfg = self.space.trial_config(trial.config)
            method = self.space.label(cfg)
            run = client.create_run(self.exp_id, run_name=f"{method}-{trial.trial_id}", tags={
                TAG_PARENT: self.parent, TAG_TRIAL: trial.trial_id, "method": method,
                "ltsearch.kind": "trial"})
            run_id = run.info.run_id
            _log_params(client, run_id, flatten(cfg))
        self.runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        run_id = self._run_for(trial)
        step = int(result.get("epoch", 0))
        if step <= self.logged.get(trial.trial_id, 0):  # re-run from an earlier checkpoint
            return
        self.logged[trial.trial_id] = step
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   and ("/" in k or k in TRAINER_METRICS or k in self.part_metrics)]
        _client(self.uri).log_batch(run_id, metrics=metrics)

    def _finish(self, trial, status: str, error: Optional[str] = None) -> None:
        run_id = self._run_for(trial)
        client = _client(self.uri)
        result = trial.last_result or {}
        try:
            with tempfile.TemporaryDirectory() as folder:
                write_trial_artifacts(Path(folder), self.space.trial_config(trial.config), result,
                                      self.classes, self.counts)
                client.log_artifacts(run_id, folder)
        except Exception as e:  # artifacts must not leave the run open
            log.warning("artifacts of trial %s not written: %s", trial.trial_id, e)
        if error:
            client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = finished_status(trial.last_result)
        self._finish(trial, "FINISHED" if status == "COMPLETED" else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finish(trial, "FAILED", error_text(trial))


def write_trial_artifacts(folder: Path, config: dict, result: dict, classes: list[str],
                          counts: list[int]) -> None:
    """Trial config YAML, per-class accuracy (CSV and a bar chart against the training count)
    and the confusion matrix picture, from the last report (test when it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    split = "test" if "test/per_class" in result else "val"
    per_class = result.get(f"{split}/per_class")
    confusion = result.get(f"{split}/confusion")
    if per_class is None:
        return
    with open(folder / "per_class_accuracy.csv", "w") as fh:
        fh.write("class,train_count,val_accuracy,test_accuracy\n")
        val = result.get("val/per_class", [None] * len(classes))
        test = result.get("test/per_class", [None] * len(classes))
        for c, name in enumerate(classes):
            fh.write(f"{name},{counts[c]},{_fmt(val[c])},{_fmt(test[c])}\n")

    fig, ax = plt.subplots(figsize=(max(6, len(classes) * 0.35), 4))
    ax.bar(range(len(classes)), [0 if v is None or v != v else v for v in per_class], color="tab:blue")
    ax.set_ylabel(f"{split} accuracy")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(range(len(classes)), counts, color="tab:red", marker=".")
    ax2.set_ylabel("training images", color="tab:red")
    ax2.set_yscale("log")
    ax.set_xticks(range(len(classes)))
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_title(f"per-class {split} accuracy vs training count")
    fig.tight_layout()
    fig.savefig(folder / "per_class_accuracy.png", dpi=100)
    plt.close(fig)

    if confusion is not None:
        fig, ax = plt.subplots(figsize=(6, 5))
        im = ax.imshow(confusion, cmap="Blues")
        fig.colorbar(im, ax=ax)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(classes) <= 20:
            ax.set_xticks(range(len(classes)))
            ax.set_xticklabels(classes, rotation=90, fontsize=7)
            ax.set_yticks(range(len(classes)))
            ax.set_yticklabels(classes, fontsize=7)
        ax.set_title(f"{split} confusion matrix")
        fig.tight_layout()
        fig.savefig(folder / "confusion_matrix.png", dpi=100)
        plt.close(fig)


def _fmt(v) -> str:
    return "" if v is None or v != v else f"{v:.4f}"

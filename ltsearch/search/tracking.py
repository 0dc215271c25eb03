"""MLflow, the search's one :class:`~ltsearch.search.tracker.Tracker` today.

One parent run per search, one child run per trial: completed trials end FINISHED, trials the
scheduler stopped or an interrupt cut short end KILLED, trials that raised end FAILED. The
store is checked before Ray starts; a fresh sqlite store is created under a lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from ltsearch.config import ConfigError
from ltsearch.search.records import TAG_SEARCH, TAG_TRIAL, flatten
from ltsearch.search.tracker import Tracker, TrackingError

log = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"
TAG_WAITING = "ltsearch.waiting"  # "true" while the rungs pause a trial, "false" once it waited


def prepare_environment() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a line per run
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # not its schema migrations
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # (bars of 3 small files)
    if os.environ.pop("MLFLOW_EXPERIMENT_ID", None) is not None:
        log.warning("ignoring MLFLOW_EXPERIMENT_ID from the environment: ltsearch selects the "
                    "experiment by name (search.experiment)")


def unreachable(uri: str, timeout: float = 5.0) -> Optional[str]:
    """Why the tracking store at ``uri`` cannot be reached, in words, or None when it answers
    (a server's health check, a sqlite file's folder)."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status == 200:
                    return None
                reason = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        return f"no MLflow server answers at {uri} ({reason})"
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            return f"{uri}: the folder {folder} does not exist"
    return None


def check_reachable(uri: str) -> None:
    """Fail fast, before Ray starts, when the tracking store cannot be reached: MLflow's client
    would retry an absent server for minutes and then print a traceback."""
    why = unreachable(uri)
    if why is not None:
        server = uri.startswith(("http://", "https://"))
        raise ConfigError("--tracking-uri", why + ("; start it or pass another --tracking-uri"
                                                   if server else ""))


def registry_store(name: Optional[str], uri: Optional[str]) -> str:
    """The store a kept model is logged (and, with ``name``, registered) in: ``uri`` or the
    default, checked before anything trains."""
    if name is not None and not name.strip():
        raise ConfigError("--register", "needs a model name")
    uri = uri or default_tracking_uri()
    check_reachable(uri)
    return uri


class RetryNotice(logging.Filter):
    """MLflow's HTTP client retries a server that stopped answering for minutes, and urllib3
    logs each retry as a long warning. The user gets one line per outage instead: the first
    retry says it, the rest are dropped, and a call that succeeds after it ends the outage."""

    LOGGER = "urllib3.connectionpool"

    def __init__(self):
        super().__init__()
        self.uri = ""
        self.said = False

    def watch(self, uri: str) -> None:
        """Speak for the store at ``uri`` from now on (the filter is added once)."""
        self.uri, self.said = uri, False
        logging.getLogger(self.LOGGER).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Retrying"):
            return True
        if not self.said:
            self.said = True
            log.warning("the MLflow server at %s stopped answering; MLflow retries for a few "
                        "minutes while the search goes on", self.uri)
        return False

    def answered(self) -> None:
        if self.said:
            self.said = False
            log.warning("the MLflow server at %s answers again", self.uri)


RETRIES = RetryNotice()  # one for the process: the logger is global


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


def _log_params(client, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def _artifact_errors() -> tuple:
    """What a failed upload raises: MLflow's own error (a server's answer), or the OS's (a
    local artifact folder; requests' connection errors are OSErrors too)."""
    from mlflow.exceptions import MlflowException

    return MlflowException, OSError


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


RUN_STATUS = {"COMPLETED": "FINISHED", "PRUNED": "KILLED", "INTERRUPTED": "KILLED",
              "FAILED": "FAILED", "finished": "FINISHED", "interrupted": "KILLED",
              "failed": "FAILED"}


class MLflowTracker(Tracker):
    """One parent run per search, one child run per trial, created and ended by the driver (a
    run opened inside a trial would stay RUNNING when the scheduler stops the trial)."""

    def __init__(self, uri: str, experiment: str, classes: list[str], counts: list[int]):
        self.uri = uri
        self.experiment = experiment
        self.classes = classes
        self.counts = counts
        self.exp_id = ""
        self.parent = ""
        self.runs: dict[str, str] = {}  # trial id → run id (found again by tag on resume)
        self.logged: dict[str, int] = {}  # trial id → last epoch the run holds
        self._client = None

    @property
    def client(self):
        """One client for the search: each new one opens the store again (seconds of CPU)."""
        if self._client is None:
            self._client = _client(self.uri)
        return self._client

    @classmethod
    def checked(cls, uri: Optional[str], experiment: str, classes, counts) -> "MLflowTracker":
        prepare_environment()
        uri = uri or default_tracking_uri()
        check_reachable(uri)
        RETRIES.watch(uri)
        return cls(uri, experiment, classes, counts)

    @property
    def search_id(self) -> str:
        return self.parent

    def start_search(self, folder: Path, name: str, params: dict) -> None:
        self.exp_id = experiment_id(self.uri, self.experiment)
        client = self.client
        found = client.search_runs([self.exp_id], f"tags.`{TAG_SEARCH}` = '{folder}'", max_results=1)
        if found:  # a resumed search reopens its own parent run
            self.parent = found[0].info.run_id
            client.update_run(self.parent, status="RUNNING")
        else:
            run = client.create_run(self.exp_id, run_name=name, tags={
                TAG_SEARCH: str(folder), "ltsearch.kind": "search"})
            self.parent = run.info.run_id
            _log_params(client, self.parent, params)

    def _find(self, trial_id: str) -> list:
        return self.client.search_runs(
            [self.exp_id], f"tags.`{TAG_TRIAL}` = '{trial_id}' and tags.`{TAG_PARENT}` = '{self.parent}'",
            max_results=1)

    def catch_up(self, trial_id: str, label: str, config: dict, status: str, reports: list[dict],
                 error: Optional[str] = None, tags: Optional[dict] = None) -> None:
        found = self._find(trial_id)
        if found and found[0].info.status == RUN_STATUS[status]:  # already agrees
            return
        super().catch_up(trial_id, label, config, status, reports, error, tags)

    def start_trial(self, trial_id: str, label: str, config: dict, tags: Optional[dict] = None) -> None:
        client = self.client
        found = self._find(trial_id)
        if found:  # a resumed search: the run reopens, and epochs it holds are not logged twice
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            self.logged[trial_id] = max(
                (m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)
        else:
            run = client.create_run(self.exp_id, run_name=f"{label}-{trial_id}", tags={
                TAG_PARENT: self.parent, TAG_TRIAL: trial_id, "method": label,
                "ltsearch.kind": "trial", **(tags or {})})
            run_id = run.info.run_id
            _log_params(client, run_id, flatten(config))
        self.runs[trial_id] = run_id

    def log(self, trial_id: str, step: int, metrics: dict) -> None:
        from mlflow.entities import Metric

        if step <= self.logged.get(trial_id, 0):  # re-run from an earlier checkpoint
            return
        self.logged[trial_id] = step
        now = int(time.time() * 1000)
        self.client.log_batch(self.runs[trial_id], metrics=[
            Metric(k, float(v), now, step) for k, v in metrics.items()])

    def wait_trial(self, trial_id: str, waiting: bool) -> None:
        # MLflow has no paused status: the run stays RUNNING, its tag says it holds no worker
        self.client.set_tag(self.runs[trial_id], TAG_WAITING, str(waiting).lower())

    def end_trial(self, trial_id: str, status: str, config: dict, result: dict,
                  error: Optional[str] = None) -> None:
        run_id = self.runs[trial_id]
        client = self.client
        try:
            with tempfile.TemporaryDirectory() as folder:
                write_trial_artifacts(Path(folder), config, result, self.classes, self.counts)
                client.log_artifacts(run_id, folder)
        except Exception as e:  # artifacts must not leave the run open
            if self.unreachable():  # the store went away: this call fails as a whole, and
                raise               # --resume's catch-up ends the trial again, files included
            log.warning("artifacts of trial %s not written: %s", trial_id, _one_line(e))
        if error:
            client.set_tag(run_id, "error", error[:5000])
        client.set_terminated(run_id, RUN_STATUS[status])

    def end_search(self, ending: str, artifacts: list[Path]) -> None:
        client = self.client
        try:
            self._attach(artifacts)
        except Exception as e:  # a copy of the folder's files: they must not keep runs open
            log.warning("the search's files were not attached to its MLflow run (%s); they are in "
                        "%s", _one_line(e), artifacts[0].parent if artifacts else "its folder")
        # Nothing may stay RUNNING: trials that never reported an end (a killed driver) are KILLED.
        for child in client.search_runs([self.exp_id], f"tags.`{TAG_PARENT}` = '{self.parent}'",
                                        max_results=10000):
            if child.info.status == "RUNNING":
                client.set_terminated(child.info.run_id, "KILLED")
        client.set_terminated(self.parent, RUN_STATUS[ending])

    def _attach(self, paths: list[Path]) -> None:
        for path in paths:
            if path.is_file():
                self.client.log_artifact(self.parent, str(path))
            elif path.is_dir():  # a folder keeps its name (the report's figures: report/)
                self.client.log_artifacts(self.parent, str(path), path.name)

    def attach(self, folder: Path, paths: list[Path]) -> None:
        self.exp_id = experiment_id(self.uri, self.experiment)
        found = self.client.search_runs([self.exp_id], f"tags.`{TAG_SEARCH}` = '{folder}'", max_results=1)
        if not found:
            raise ConfigError("--tracking-uri", f"no search run for {folder} in {self.uri} "
                                                f"(experiment {self.experiment!r})")
        self.parent = found[0].info.run_id
        try:
            self._attach(paths)
        except _artifact_errors() as e:
            raise TrackingError(_one_line(e)) from e

    def unreachable(self) -> Optional[str]:
        return unreachable(self.uri)

    def answered(self) -> None:
        RETRIES.answered()

    def describe(self) -> str:
        return f"MLflow: {self.uri} (parent run {self.parent})"


def write_trial_artifacts(folder: Path, config: dict, result: dict, classes: list[str],
                          counts: list[int]) -> None:
    """Trial config YAML, per-class accuracy (CSV and a bar chart against the training count)
    and the confusion matrix picture, from the last report (test when it has one)."""
    from ltsearch.search.trial_figures import confusion_svg, per_class_svg

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
    (folder / "per_class_accuracy.svg").write_text(per_class_svg(classes, per_class, counts, split))
    if confusion is not None:
        (folder / "confusion_matrix.svg").write_text(confusion_svg(classes, confusion, split))


def _fmt(v) -> str:
    return "" if v is None or v != v else f"{v:.4f}"

"""Tests' pause for real trials, loaded in every process the tests start (``PYTHONPATH``; Ray's
workers inherit it), active only where ``LTSEARCH_TEST_HOLD`` names a folder. A test stops a
driver at a state it names instead of guessing a window in seconds.

Each trainer a process builds takes the next ordinal of the folder (``trainer-0``, ``trainer-1``,
… created exclusively, so numbers are unique across processes; each holds its Tune trial's
id). Before epoch ``E`` (0-based, so after ``E`` epochs were trained and reported) a trainer
waits while ``hold-<ordinal>-<E>`` or ``hold-seed<seed>-<E>`` exists, and says so with
``held-…`` (same suffix; it holds the process's pid). Delete the hold file to let it go on; nothing waits where the folder has none.

A fault the tests cannot cause otherwise, once (the file is removed as it fires): before epoch
``E`` a trainer raises where ``fail-<ordinal>-<E>`` exists (a trial that crashes and is
retried).

A driver's death at a named point of a prune, once: where ``die-<point>`` exists, the search's
driver SIGKILLs itself (nothing after it runs, as when the machine goes) at ``stop`` (the
scheduler has decided to stop a trial), ``stop-recorded`` (trials.json holds the rung result it
was stopped on), ``optuna-pruned`` (the study holds it PRUNED) or ``pruned`` (trials.json holds
it PRUNED)."""
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time

FOLDER = os.environ.get("LTSEARCH_TEST_HOLD")


def _patch(module):
    Trainer = module.Trainer
    init, train_epoch = Trainer.__init__, Trainer.train_epoch

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        i = 0
        while True:
            try:
                fd = os.open(os.path.join(FOLDER, f"trainer-{i}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                i += 1
        with os.fdopen(fd, "w") as f:
            f.write(_trial_id())
        self._test_ordinal = i

    def held(self):
        for name in (f"{self._test_ordinal}-{self.epoch}", f"seed{self.cfg.seed}-{self.epoch}"):
            hold = os.path.join(FOLDER, f"hold-{name}")
            if os.path.exists(hold):
                with open(os.path.join(FOLDER, f"held-{name}"), "w") as f:
                    f.write(str(os.getpid()))
                while os.path.exists(hold):
                    time.sleep(0.05)

    def _train_epoch(self):
        held(self)
        _fire(f"fail-{self._test_ordinal}-{self.epoch}", "a trial's crash")
        return train_epoch(self)

    Trainer.__init__, Trainer.train_epoch = __init__, _train_epoch


def _trial_id() -> str:
    """The Tune trial the trainer runs in ('' outside one; Ray Tune is not imported for it)."""
    tune = sys.modules.get("ray.tune")
    try:
        return (tune.get_context().get_trial_id() or "") if tune else ""
    except Exception:
        return ""


def _take(name) -> bool:
    """Whether the one-shot file ``name`` was there (it is removed)."""
    try:
        os.remove(os.path.join(FOLDER, name))
    except FileNotFoundError:
        return False
    return True


def _fire(name, what):
    if _take(name):
        raise RuntimeError(f"{what}, caused by the tests ({name})")


STOPPING = set()  # the trials the scheduler stopped, in this driver


def _die(point):
    if _take(f"die-{point}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _patch_scheduler(module):
    cls = module.RungScheduler
    decide = cls.on_trial_result

    def on_trial_result(self, tune_controller, trial, result):
        decision = decide(self, tune_controller, trial, result)
        if decision == self.STOP:
            STOPPING.add(trial.trial_id)
            _die("stop")
        return decision

    cls.on_trial_result = on_trial_result


def _patch_callbacks(module):
    cls = module.SearchCallback
    on_result, end = cls.on_trial_result, cls._end

    def on_trial_result(self, iteration, trials, trial, result, **info):
        on_result(self, iteration, trials, trial, result, **info)
        if trial.trial_id in STOPPING:
            _die("stop-recorded")

    def _end(self, trial, status, error=None):
        end(self, trial, status, error)
        if status == "PRUNED":
            _die("pruned")

    cls.on_trial_result, cls._end = on_trial_result, _end


def _patch_optuna(module):
    # Study, not the searcher: Tune pickles the searcher's class by value with its state, and a
    # resume without this hook could not load a method of it defined here
    cls = module.Study
    tell = cls.tell

    def patched(self, *args, **kwargs):
        told = tell(self, *args, **kwargs)
        if getattr(kwargs.get("state"), "name", None) == "PRUNED":
            _die("optuna-pruned")
        return told

    cls.tell = patched


PATCHES = {"ltsearch.trainer": _patch, "ltsearch.search.scheduler": _patch_scheduler,
           "ltsearch.search.callbacks": _patch_callbacks, "optuna.study.study": _patch_optuna}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def run(module):
            exec_module(module)
            PATCHES[name](module)

        loader.exec_module = run
        return spec


if FOLDER:
    sys.meta_path.insert(0, _Finder())

"""Models a search keeps (``search.keep_models: k``): exactly the k best trials' that ran to the
end, each loadable and scoring what its trial reported; trials save none unless asked; ``ltsearch
confirm --register`` registers the confirmed best in MLflow's registry. Real Ray, Optuna, MLflow."""
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import fresh_store, tiny_search
from ltsearch.cli import main
from ltsearch.data import build_data
from ltsearch.inference import TrainedModel
from ltsearch.runconfig import config_from_dict
from ltsearch.search.records import TrialRecords
from ltsearch.search.run import run_search
from ltsearch.search.space import parse_search_file

METRIC = "val/balanced_acc"


@pytest.fixture(scope="module")
def kept(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kept")
    data = tiny_search(train={"lr": {"loguniform": [0.005, 0.05]}},
                       method={"ce": {}, "logit_adjust": {}})
    data["search"].update(num_samples=4, keep_models=2, asha={"enabled": False})
    outcome = run_search(parse_search_file(data), name="kept", storage=tmp / "searches",
                         tracking_uri=fresh_store(tmp))
    return outcome, tmp


def test_the_k_best_trials_models_are_kept_and_score_what_they_reported(kept):
    outcome, _ = kept
    records = TrialRecords(outcome.folder)
    ranked = records.ranked(METRIC, "max")
    assert len(ranked) == 4
    models = outcome.folder / "models"
    assert sorted(p.name for p in models.iterdir()) == sorted(r["trial_id"] for r in ranked[:2])
    assert [r.get("model") for r in ranked] == [f"models/{ranked[0]['trial_id']}",
                                               f"models/{ranked[1]['trial_id']}", None, None]
    for r in ranked[:2]:
        model = TrainedModel(outcome.folder / r["model"], "cpu")
        test = build_data(config_from_dict(r["config"]).data).test
        top1 = float((model.logits(test.x).argmax(1).numpy() == test.y).mean())
        assert top1 == pytest.approx(r["metrics"]["test/top1"], abs=1e-9)
    assert not list(outcome.folder.glob("models/.*"))  # no partial copy left


def test_confirm_register_registers_the_confirmed_best(kept, tmp_path):
    outcome, tmp = kept
    uri = fresh_store(tmp_path)
    assert main(["confirm", str(outcome.folder), "--top", "1", "--seeds", "2", "--register", "kept-best",
                 "--tracking-uri", uri]) == 0
    records = TrialRecords(outcome.folder)
    best = records.confirmed(METRIC, "max")[0]
    runs = sorted((r for r in records.trials.values() if r.get("confirm_of") == best["trial_id"]),
                  key=lambda r: -r["metrics"][METRIC])
    assert len(runs) == 2 and all(r.get("model") for r in runs)  # confirmation runs keep theirs
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version("kept-best", "1")
    assert version.tags["ltsearch.trial_id"] == best["trial_id"]
    assert version.tags["ltsearch.confirmation_trial"] == runs[0]["trial_id"]
    assert version.tags["ltsearch.seed"] == str(runs[0]["seed"])
    assert client.get_run(version.run_id).data.metrics[f"confirmed/{METRIC}/mean"] == pytest.approx(best["mean"])

    mlflow.set_tracking_uri(uri)
    loaded = mlflow.pyfunc.load_model("models:/kept-best/1")
    model = TrainedModel(outcome.folder / runs[0]["model"], "cpu")
    image = build_data(config_from_dict(runs[0]["config"]).data).test.x[0, 0]
    Image.fromarray(image).save(tmp_path / "a.png")
    got = loaded.predict(pd.DataFrame({"path": [str(tmp_path / "a.png")]})).to_numpy()
    assert np.array_equal(got, model.probabilities(image[None, None]))


def test_trials_save_no_models_unless_asked(ray_local, tmp_path):
    data = tiny_search(method={"ce": {}})
    data["search"].update(num_samples=1, asha={"enabled": False}, tracking="none")
    outcome = run_search(parse_search_file(data), name="light", storage=tmp_path / "searches")
    assert not (outcome.folder / "models").exists()
    assert not list(outcome.folder.rglob("model.safetensors"))
    shutil.rmtree(outcome.folder)

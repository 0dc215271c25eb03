"""The kept model in MLflow, against a real sqlite store: ``ltsearch train --register`` logs a
pyfunc model with the run's params and metrics and registers a new version, tagged with the
search, trial and config hash its exported config names; ``models:/NAME/1`` predicts what
``ltsearch predict`` does; ``mlflow models serve`` serves it."""
import base64
import csv
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import DIGITS, free_port, fresh_store
from ltsearch.cli import main
from ltsearch.data import build_data
from ltsearch.inference import TrainedModel
from ltsearch.runconfig import config_from_dict, dump_config

NAME = "digits-lt"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A digits-LT model trained and registered twice (versions 1 and 2) from a config
    headed as ``ltsearch export`` writes one, and three of its test images as PNG files."""
    folder = tmp_path_factory.mktemp("registry")
    uri = fresh_store(folder)
    cfg = config_from_dict({**DIGITS, "method": {"name": "balanced_softmax"}})
    config = folder / "top1_balanced_softmax_abc12.yaml"
    config.write_text(f"# ltsearch.search_dir: {folder / 'searches' / 'demo'}\n"
                      f"# ltsearch.trial_id: abc12\n{dump_config(cfg)}")
    for version in (1, 2):
        assert main(["train", str(config), "--out", str(folder / f"run{version}"), "--register", NAME,
                     "--tracking-uri", uri]) == 0
    model = TrainedModel(folder / "run1" / "model", "cpu")
    files = []
    for i, image in enumerate(build_data(cfg.data).test.x[:3]):
        files.append(folder / f"{i}.png")
        Image.fromarray(image[0]).save(files[-1])
    return {"folder": folder, "uri": uri, "model": model, "files": files, "config": config}


def test_train_registers_versions_tagged_with_their_search_trial_and_config(registered):
    client = mlflow.MlflowClient(registered["uri"])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    assert versions == [1, 2]
    v1 = client.get_model_version(NAME, "1")
    folder = registered["folder"]
    digest = hashlib.sha256((folder / "run1" / "model" / "config.yaml").read_bytes()).hexdigest()
    assert v1.tags["ltsearch.config_sha256"] == digest
    assert v1.tags["ltsearch.trial_id"] == "abc12"
    assert v1.tags["ltsearch.search_dir"] == str(folder / "searches" / "demo")
    run = client.get_run(v1.run_id)
    metrics = json.loads((folder / "run1" / "metrics.json").read_text())["metrics"]
    assert run.data.metrics["test/top1"] == pytest.approx(metrics["test/top1"])
    assert run.data.params["method.loss.name"] == "balanced_softmax"
    assert run.data.params["train.epochs"] == "2"


def test_the_registered_model_predicts_what_ltsearch_predict_does(registered, tmp_path):
    mlflow.set_tracking_uri(registered["uri"])
    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    files = registered["files"]
    model = registered["model"]
    want = model.probabilities(np.stack([model.read(f) for f in files]))
    by_path = loaded.predict(pd.DataFrame({"path": [str(f) for f in files]}))
    assert list(by_path.columns) == model.classes
    assert np.array_equal(by_path.to_numpy(), want)
    by_bytes = loaded.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    assert np.array_equal(by_bytes.to_numpy(), want)
    pixels = [np.asarray(Image.open(f))[:, :, None].tolist() for f in files]
    assert np.array_equal(loaded.predict(pd.DataFrame({"pixels": pixels})).to_numpy(), want)

    out = tmp_path / "p.csv"
    assert main(["predict", str(registered["folder"] / "run1" / "model"), *map(str, files),
                 "--top-k", "10", "--out", str(out)]) == 0
    for row, p in zip(csv.DictReader(out.read_text().splitlines()), want):
        got = {row[f"class_{k}"]: float(row[f"p_{k}"]) for k in range(1, 11)}
        assert [got[c] for c in model.classes] == pytest.approx(p, abs=1e-6)


def test_a_bad_tracking_store_is_refused_before_training(registered, tmp_path, capsys):
    assert main(["train", str(registered["config"]), "--out", str(tmp_path / "run"), "--register", NAME,
                 "--tracking-uri", f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_mlflow_models_serve_serves_it(registered):
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/2",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None:
                    pytest.fail(f"mlflow models serve exited: {server.stderr.read()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail("mlflow models serve did not answer in 120 s")
                time.sleep(0.5)
        files = registered["files"]
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())["predictions"]
        model = TrainedModel(registered["folder"] / "run2" / "model", "cpu")
        want = model.probabilities(np.stack([model.read(f) for f in files]))
        got = np.array([[row[c] for c in model.classes] for row in answer])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    finally:
        server.terminate()
        server.wait(30)

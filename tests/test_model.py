"""The trained model kept: saved by ``ltsearch train`` (safetensors, config, class names,
preprocessing, the recipe's inference-time adjustments), loaded back without its pretrained
weights file, giving the trainer's own evaluation logits to the bit; ``ltsearch predict`` on
files, folders and split files, a corrupt file reported and skipped."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import DIGITS, make_config, write_list_dataset
from test_pretrained_heads import clip  # noqa: F401  (the tiny OpenCLIP tower, saved)
from ltsearch.cli import main
from ltsearch.data import build_data
from ltsearch.inference import TrainedModel, save_model
from ltsearch.runconfig import config_from_dict, dump_config
from ltsearch.trainer import Trainer

RECIPES = {
    "plain": {"name": "ce"},
    "bbn": {"name": "custom", "arch": {"name": "bilateral"}},
    "tau_norm": {"name": "custom", "stage2": {"name": "tau_norm", "tau": 0.7}},
    "posthoc": {"name": "custom", "posthoc": {"logit_adjust": 0.8}},
    "lws": {"name": "custom", "stage2": {"name": "lws", "epochs": 1, "lr": 0.5}},
}


def _trained(cfg, data=None):
    trainer = Trainer(cfg, data or build_data(cfg.data), "cpu")
    result = trainer.fit()
    assert result.status == "finished"
    return trainer, result


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_a_saved_model_gives_the_trainers_own_test_logits(recipe, digits_data, tmp_path):
    trainer, result = _trained(make_config(RECIPES[recipe], train={"tta": "flip"} if recipe == "plain" else {}),
                               digits_data)
    folder = save_model(trainer, tmp_path / "model", result.metrics)
    want = trainer.logits(trainer.test_set)
    model = TrainedModel(folder, "cpu")
    got = model.logits(digits_data.test.x)
    assert torch.equal(got, want)
    assert (got.argmax(1) == trainer.predict(trainer.test_set)).all()
    meta = json.loads((folder / "model.json").read_text())
    assert meta["classes"] == [str(c) for c in range(10)] and meta["counts"] == digits_data.counts
    assert meta["metrics"]["test/top1"] == result.metrics["test/top1"]
    p = meta["preprocess"]
    assert p["stored"] == [1, 8, 8] and p["input_size"] == [8, 8]
    assert p["mean"] == pytest.approx(trainer.test_set.mean.flatten().tolist())
    weights = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(weights[f"model.{k}"], v) for k, v in trainer.model.state_dict().items())
    inference = meta["inference"]
    if recipe == "bbn":
        assert inference["bbn_alpha"] == 0.5
    if recipe == "tau_norm":
        assert inference["tau_norm"] == {"tau": 0.7}
    if recipe == "posthoc":
        counts = np.asarray(digits_data.counts, dtype=float)
        assert inference["logit_adjust"]["tau"] == 0.8
        assert inference["logit_adjust"]["class_priors"] == pytest.approx(counts / counts.sum(), rel=1e-6)
    if recipe == "lws":  # the learnt scales, not ones
        scales = trainer.method.stage2.scales.detach()
        assert inference["logit_scales"] == pytest.approx(scales.tolist())
        assert torch.equal(weights["recipe.stage2.scales"], scales) and not torch.all(scales == 1)
    if recipe == "plain":
        assert inference["tta"] == "flip"


def test_a_pretrained_backbone_loads_without_its_weights_file(clip, tmp_path):
    """LIFT on a tiny OpenCLIP tower from a local file (AdaptFormer, a cosine head initialised
    from the class names' text, logit-adjusted loss, five-crop test views): the saved model
    loads after the backbone file is gone, with no text tower, and gives the same logits."""
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes((clip["folder"] / "clip.safetensors").read_bytes())
    cfg = config_from_dict({**DIGITS, "model": {**clip["section"], "weights": str(weights)},
                            "method": {"name": "lift"}, "train": {**DIGITS["train"], "epochs": 1}})
    trainer, result = _trained(cfg)
    folder = save_model(trainer, tmp_path / "model", result.metrics)
    weights.unlink()
    model = TrainedModel(folder, "cpu")
    assert torch.equal(model.logits(trainer.data.test.x), trainer.logits(trainer.test_set))
    meta = json.loads((folder / "model.json").read_text())
    size = list(trainer.test_set.size)
    assert meta["preprocess"]["input_size"] == size and meta["preprocess"]["channels"] == 3
    assert meta["inference"]["tta"] == "five_crop" and meta["backbone"]["weights_sha256"]


def _write(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def test_train_keeps_the_model_and_predict_reads_files_folders_and_split_files(tmp_path, capsys):
    data = write_list_dataset(tmp_path / "images")
    cfg = config_from_dict({**DIGITS, "data": data, "method": {"name": "ce"}})
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(cfg))
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 0
    folder = tmp_path / "run" / "model"
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.yaml", "model.json"}
    model = TrainedModel(folder, "cpu")
    test = [line.split()[0] for line in (tmp_path / "images" / "test.txt").read_text().splitlines()]
    files = [tmp_path / "images" / rel for rel in test]
    expected = model.probabilities(np.stack([model.read(f) for f in files]))
    capsys.readouterr()

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(folder), str(tmp_path / "images" / "test.txt"), "--top-k", "2",
                 "--out", str(out), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert [r["path"] for r in rows] == [str(f) for f in files]  # the split file's order
    classes = model.classes
    for row, p in zip(rows, expected):
        best = np.argsort(-p, kind="stable")[:2]
        assert [row["class_1"], row["class_2"]] == [classes[i] for i in best]
        assert float(row["p_1"]) == pytest.approx(p[best[0]], abs=1e-6)
        assert float(row["p_1"]) >= float(row["p_2"])

    # a folder (walked, sorted) with one corrupt file: reported by path, the rest predicted, exit 1
    shots = tmp_path / "shots"
    for i, f in enumerate(files[:3]):
        (shots / "sub").mkdir(parents=True, exist_ok=True)
        (shots / ("sub" if i else "") / f"{i}{f.suffix}").write_bytes(f.read_bytes())
    (shots / "broken.jpg").write_bytes(b"not an image at all")
    capsys.readouterr()
    assert main(["predict", str(folder), str(shots), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert str(shots / "broken.jpg") in captured.err and captured.err.count("cannot read") == 1
    printed = [line for line in captured.out.splitlines() if line.startswith(str(shots))]
    assert [line.split()[0] for line in printed] == sorted(str(p) for p in [
        shots / f"0{files[0].suffix}", shots / "sub" / f"1{files[1].suffix}", shots / "sub" / f"2{files[2].suffix}"])
    first = expected[0].argmax()
    assert printed[0].split()[1] == classes[first]


def test_predict_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    assert main(["predict", str(tmp_path / "notamodel"), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "notamodel is not a saved model" in err and "model.safetensors" in err
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("model.safetensors", "config.yaml", "model.json"):
        (folder / name).write_text("{}")
    assert main(["predict", str(folder), str(tmp_path)]) == 2
    assert "is not a model this ltsearch can read" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nowhere"), str(tmp_path)]) == 2

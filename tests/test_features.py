"""Frozen features computed once: the same training as without the cache, the body run once per
phase (a linear probe's: once per process), and no cache where augmentation changes the input."""
import copy

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import DIGITS
from ltsearch import features as frozen
from ltsearch.data import build_data
from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

OPTIONS = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "vit.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", num_classes=0, **OPTIONS).state_dict(), str(path))
    return str(path)


def _config(weights, method, **train):
    d = copy.deepcopy(DIGITS)
    d["model"] = {"arch": "vit_tiny_patch16_224", "weights": weights, "options": OPTIONS}
    d["train"].update(epochs=3, lr=0.1, **train)
    d["method"] = method
    return config_from_dict(d)


def _run(cfg):
    """(the trained classifier, the test metrics, the images the body saw)"""
    frozen._KEPT.clear()
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    seen = []
    trainer.model.body.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    result = trainer.fit()
    return trainer, result.metrics, sum(seen)


@pytest.mark.parametrize("method", [
    {"name": "linear_probe"},
    {"name": "ce", "finetune": "full", "stage2": {"name": "crt", "epochs": 2, "bn": "frozen"}}])
def test_the_cache_trains_exactly_as_the_body_would(weights, method):
    cached, metrics, seen = _run(_config(weights, method))
    plain, metrics_plain, seen_plain = _run(_config(weights, method, feature_cache=False))
    assert torch.equal(cached.model.classifier.weight, plain.model.classifier.weight)
    assert metrics["test/balanced_acc"] == metrics_plain["test/balanced_acc"]
    data = cached.data
    once = len(data.train) + len(data.val) + len(data.test)  # every image through the body once
    steps, val, test = len(data.train) // 32 * 32, len(data.val), len(data.test)  # per epoch
    if method["name"] == "linear_probe":  # the body never trains: one pass, then the head alone
        assert seen == once and seen_plain == 3 * (steps + val) + test
    else:  # stage 1 trains the body (and tests it at its end); stage 2 reads it once
        stage1 = 3 * (steps + val) + test
        assert seen == stage1 + once and seen_plain == stage1 + 2 * (steps + val) + test


def test_a_workers_next_linear_probe_on_the_same_backbone_computes_nothing(weights):
    cfg = _config(weights, {"name": "linear_probe"})
    frozen._KEPT.clear()
    Trainer(cfg, build_data(cfg.data), "cpu").fit()
    again = Trainer(_config(weights, {"name": "linear_probe", "loss": {"tau": 0.5}}),
                    build_data(cfg.data), "cpu")
    seen = []
    again.model.body.register_forward_hook(lambda m, args, out: seen.append(1))
    again.fit()
    assert seen == []  # the same pretrained body and data: the kept features


def test_augmentation_turns_the_cache_off(weights):
    cfg = _config(weights, {"name": "linear_probe"})
    cfg.data.augment.hflip = True  # the body's input changes every epoch
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    trainer.train_epoch()
    assert trainer._features is None
    cfg.data.augment.hflip = False
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    trainer.train_epoch()
    assert set(trainer._features) == {"train", "val@0", "test@0"}  # (one view each: no tta)


@pytest.mark.parametrize("tta", ["flip", "five_crop"])
def test_tta_averages_the_logits_of_each_view(weights, tta):
    """flip: the image and its mirror; five_crop: LIFT's, resized to the input size + 24 and
    cropped by torchvision's FiveCrop. The same predictions on stored features as on images."""
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    for cache in (True, False):
        cfg = _config(weights, {"name": "linear_probe"}, tta=tta, feature_cache=cache)
        frozen._KEPT.clear()
        trainer = Trainer(cfg, build_data(cfg.data), "cpu")
        trainer.train_epoch()
        model, test = trainer.model, trainer.test_set
        model.eval()
        raw = test.x.float().div(255).expand(-1, 3, -1, -1)  # digits: grey 8×8
        norm = lambda x: (x - 0.5) / 0.5  # noqa: E731  (timm's ViT: mean = std = 0.5)
        with torch.no_grad():
            if tta == "flip":
                x = norm(F.interpolate(raw, size=(16, 16), mode="bicubic", align_corners=False))
                views = [x, x.flip(3)]
            else:
                big = F.interpolate(raw, size=(40, 40), mode="bicubic", align_corners=False)
                views = [norm(c) for c in TF.five_crop(big, [16, 16])]
            z = sum(model(v) for v in views)
            plain = model(views[0] if tta == "flip" else norm(
                F.interpolate(raw, size=(16, 16), mode="bicubic", align_corners=False)))
        got = trainer.predict(test)
        assert torch.equal(got, z.argmax(1)), (tta, cache)
        assert not torch.equal(got, plain.argmax(1))  # the views change some answers


def test_a_random_bodys_features_are_its_seeds_own():
    """Without weights the body is the seed's random one: another seed's trial computes anew."""
    d = copy.deepcopy(DIGITS)
    d["method"] = {"name": "ce", "finetune": "linear"}
    frozen._KEPT.clear()
    calls = []
    for seed in (0, 0, 1):
        cfg = config_from_dict({**d, "seed": seed})
        trainer = Trainer(cfg, build_data(cfg.data), "cpu")
        seen = []
        trainer.model.body.register_forward_hook(lambda m, args, out: seen.append(1))
        trainer.train_epoch()
        calls.append(len(seen))
    assert calls[0] > 0 and calls[1] == 0 and calls[2] == calls[0]  # the same seed reuses; another not

"""An OpenCLIP image tower from a local file, and the classifier heads LIFT starts from (cosine;
text, class-mean and random initialisation). Real OpenCLIP: a tiny CLIP from a model-config JSON,
its random weights saved with safetensors and loaded back through ``model.weights``."""
import json

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import DIGITS
from ltsearch.config import ConfigError, ModelConfig
from ltsearch.models import build_body, check_model, describe
from ltsearch.runconfig import config_from_dict

CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 4,
                                        "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("tiny-clip")
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "clip.safetensors"))
    section = {"arch": "open_clip:tiny-clip", "weights": str(folder / "clip.safetensors"),
               "options": {"model_config": str(config)}}
    return {"model": model, "section": section, "folder": folder}


def _cfg(clip, **method):
    return config_from_dict({**DIGITS, "model": clip["section"], "method": {"name": "ce", **method}})


def _trainer(cfg):
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    return Trainer(cfg, build_data(cfg.data), "cpu")


def test_an_open_clip_tower_loads_from_a_local_file_and_gives_its_features_before_the_projection(clip):
    section = ModelConfig(**clip["section"])
    check_model(section)
    body, dim = build_body(section, 3)
    body.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # LIFT reads the tower before its projection to the joint space
        assert torch.allclose(body(x) @ clip["model"].visual.proj, clip["model"].encode_image(x), atol=1e-6)
    assert dim == 32
    assert describe(section) == {"conv_map": False, "blocks": 2, "qkv": True, "groups": 3,
                                 "sequential": False, "text": True}


def test_bad_open_clip_input_is_one_message(clip, tmp_path):
    with pytest.raises(ConfigError, match=r"model.arch: OpenCLIP knows no model 'ViT-B-1' \(close: ViT-B-16"):
        config_from_dict({**DIGITS, "model": {"arch": "open_clip:ViT-B-1"}})
    other = {"w": torch.zeros(3)}
    save_file(other, str(tmp_path / "other.safetensors"))
    wrong = ModelConfig(**{**clip["section"], "weights": str(tmp_path / "other.safetensors")})
    with pytest.raises(ConfigError, match=r"model.weights: .*other.safetensors does not fit tiny-clip: it "
                                          r"lacks 50 tensors \(positional_embedding, text_projection, "
                                          r"logit_scale, visual.class_embedding, … 46 more\); it holds extra "
                                          r"1 tensors \(w\)$"):
        check_model(wrong)
    with pytest.raises(ConfigError, match="model.options.model_config: no such file"):
        config_from_dict({**DIGITS, "model": {**clip["section"], "options": {"model_config": str(tmp_path / "x.json")}}})


def test_a_text_initialised_cosine_head_holds_the_class_names_text_features(clip):
    cfg = _cfg(clip, arch={"name": "plain", "classifier": {"name": "cosine", "scale": 25.0, "init": "text"}})
    trainer = _trainer(cfg)
    head = trainer.model.classifier
    model = clip["model"]
    tokens = open_clip.get_tokenizer("tiny-clip")([f"a photo of a {c}." for c in trainer.data.classes])
    with torch.no_grad():  # LIFT's init_head_text_feat, written out
        text = F.normalize(model.encode_text(tokens), dim=-1)
        want = F.normalize(text @ model.visual.proj.T, dim=-1)
    assert torch.allclose(head.weight, want, atol=1e-6)
    f = torch.randn(4, 32)
    assert torch.allclose(head(f), 25.0 * F.normalize(f, dim=1) @ want.T, atol=1e-5)  # s·cos


def test_a_class_mean_head_starts_from_each_classs_mean_feature(clip):
    cfg = _cfg(clip, arch={"name": "plain", "classifier": {"name": "linear", "init": "class_mean"}},
               finetune="adaptformer")
    trainer = _trainer(cfg)
    before = trainer.model.classifier.weight.detach().clone()
    trainer._enter_phase(0, resumed=False)  # training starts: the head is initialised
    model, images = trainer.model, trainer.train_set
    model.eval()
    with torch.no_grad():
        x, y = images.batch(torch.arange(len(images)), augment=False)
        f = model.embed(x)
        want = torch.stack([F.normalize(f[y == c].mean(0), dim=0) for c in range(10)])
    assert torch.allclose(model.classifier.weight, want, atol=1e-5) and not torch.equal(before, want)
    assert torch.equal(model.classifier.bias, torch.zeros(10))
    trainer._enter_phase(0, resumed=True)  # a resumed run keeps what its checkpoint holds
    assert torch.allclose(model.classifier.weight, want, atol=1e-5)


def test_heads_and_parts_that_cannot_work_are_refused(clip):
    with pytest.raises(ConfigError, match="method.arch.classifier.init: text encodes the class names"):
        config_from_dict({**DIGITS, "method": {"name": "ce", "arch": {"classifier": {"init": "text"}}}})
    with pytest.raises(ConfigError, match="method.stage2: stage2 'tau_norm' acts on the classifier's row "
                                          "norms; the cosine classifier divides them out"):
        _cfg(clip, arch={"classifier": "cosine"}, stage2="tau_norm")


@pytest.mark.parametrize("finetune", ["adaptformer", {"name": "vpt", "deep": True}, "bitfit", "lora",
                                      {"name": "partial", "blocks": 1}])
def test_vit_parts_act_on_an_open_clip_tower(clip, finetune):
    trainer = _trainer(_cfg(clip, finetune=finetune, train={"epochs": 1}))
    model = trainer.model
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        out = model.embed(x)
        ref = clip["model"].visual  # the reference: the tower alone, no part
        proj, ref.proj = ref.proj, None
        try:
            base = ref(x)
        finally:
            ref.proj = proj
    assert out.shape == base.shape
    same = torch.allclose(out, base, atol=1e-6)
    assert same == (finetune != {"name": "vpt", "deep": True})  # adapters start at zero; prompts act
    trainable = {id(p) for p in trainer.method.finetune.trainable(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train_epoch()
    frozen = [n for n, p in model.named_parameters() if id(p) not in trainable]
    assert frozen and all(torch.equal(before[n], dict(model.named_parameters())[n]) for n in frozen)

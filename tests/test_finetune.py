"""Pretrained timm backbones from local files and the fine-tuning parts. Real timm: tiny models
are built, their random weights saved with safetensors (or torch.save) to a temporary folder and
loaded back through ``model.weights``; nothing is downloaded."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import DIGITS
from ltsearch.config import ConfigError, ModelConfig
from ltsearch.models import ImageClassifier, build_body, check_model, identity, layer_groups
from ltsearch.models.weights import sha256
from ltsearch.recipes.finetune.adaptformer import default_bottleneck
from ltsearch.runconfig import config_from_dict

VIT = "vit_tiny_patch16_224"
VIT_OPTIONS = {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}
RESNET_OPTIONS = {"layers": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny ViT and a tiny timm ResNet with random weights, saved as a user's files are."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vit = timm.create_model(VIT, num_classes=0, **VIT_OPTIONS).eval()
    save_file(vit.state_dict(), str(folder / "vit.safetensors"))
    resnet = timm.create_model("resnet18", num_classes=0, **RESNET_OPTIONS).eval()
    torch.save({"state_dict": resnet.state_dict()}, folder / "resnet.pth")  # a training checkpoint
    cache = folder / "models--me--vit" / "snapshots" / "abc123"  # a Hugging Face cache entry
    cache.mkdir(parents=True)
    (cache / "model.safetensors").write_bytes((folder / "vit.safetensors").read_bytes())
    (folder / "models--me--vit" / "refs").mkdir()
    (folder / "models--me--vit" / "refs" / "main").write_text("abc123")
    return {"folder": folder, "vit": vit, "resnet": resnet}


def _vit_cfg(saved, **method):
    return config_from_dict({**DIGITS, "model": {"arch": VIT, "weights": str(saved["folder"] / "vit.safetensors"),
                                                 "options": VIT_OPTIONS},
                             "method": {"name": "ce", **method}})


@pytest.mark.parametrize("name,weights,options", [
    ("vit", "vit.safetensors", VIT_OPTIONS), ("vit", "models--me--vit", VIT_OPTIONS),
    ("resnet", "resnet.pth", RESNET_OPTIONS)])
def test_weights_from_a_local_file_give_the_in_memory_models_outputs(saved, name, weights, options):
    arch = VIT if name == "vit" else "timm:resnet18"
    model = ModelConfig(arch=arch, weights=str(saved["folder"] / weights), options=options)
    check_model(model)
    body, dim = build_body(model, 3)
    body.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(body.pool(body(x)), saved[name](x))
    assert dim == saved[name].num_features
    said = identity(model)
    assert said["weights_sha256"] == sha256(saved["folder"] / ("vit.safetensors" if name == "vit" else weights))
    assert said["weights"].endswith(".safetensors" if name == "vit" else ".pth")


def test_preprocessing_comes_from_the_models_config_and_images_are_resized_on_the_device(saved):
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    cfg = _vit_cfg(saved)
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    x, _ = trainer.val_set.batch(torch.arange(4), augment=False)
    assert x.shape == (4, 3, 16, 16)  # digits' grey 8×8 → the model's 3 × 16 × 16
    raw = trainer.val_set.x[:4].float().div(255).expand(-1, 3, -1, -1)
    want = (F.interpolate(raw, size=(16, 16), mode="bicubic", align_corners=False) - 0.5) / 0.5
    assert torch.allclose(x, want, atol=1e-6)  # timm's ViT config: bicubic, mean = std = 0.5


def test_bad_model_input_is_one_message_naming_the_key(saved, tmp_path):
    folder = saved["folder"]
    with pytest.raises(ConfigError, match=r"model.arch: timm knows no model 'vit_tiny_patch16_22' "
                                          r"\(close: vit_tiny_patch16_224"):
        config_from_dict({**DIGITS, "model": {"arch": "vit_tiny_patch16_22"}})
    with pytest.raises(ConfigError, match=r"model.weights: no such file or folder: .*nothing.safetensors"):
        check_model(ModelConfig(arch=VIT, weights=str(tmp_path / "nothing.safetensors")))
    with pytest.raises(ConfigError, match="model.weights: resnet32 is trained from scratch here"):
        config_from_dict({**DIGITS, "model": {"arch": "resnet32", "weights": str(folder / "vit.safetensors")}})
    with pytest.raises(ConfigError, match="model.options: vit_tiny_patch16_224: .*depht"):
        config_from_dict({**DIGITS, "model": {"arch": VIT, "options": {"depht": 2}}})
    # the ResNet's file for the ViT: timm alone would load nothing of it and say nothing
    wrong = ModelConfig(arch=VIT, weights=str(folder / "resnet.pth"), options=VIT_OPTIONS)
    with pytest.raises(ConfigError, match=r"model.weights: .*resnet.pth does not fit vit_tiny_patch16_224: "
                                          r"it lacks 30 of vit_tiny_patch16_224's 30 tensors \(cls_token"):
        check_model(wrong)
    deeper = ModelConfig(arch=VIT, weights=str(folder / "vit.safetensors"), options={**VIT_OPTIONS, "depth": 1})
    with pytest.raises(ConfigError, match=r"it holds 12 that vit_tiny_patch16_224 has not \(blocks.1.attn"):
        check_model(deeper)
    wider = ModelConfig(arch=VIT, weights=str(folder / "vit.safetensors"), options={**VIT_OPTIONS, "embed_dim": 48})
    with pytest.raises(ConfigError, match="does not fit vit_tiny_patch16_224: .*size mismatch"):
        check_model(wider)


@pytest.mark.parametrize("method,key,said", [
    ({"name": "bbn"}, "method.arch", "splits the last residual block"),
    ({"stage2": {"name": "feature_aug"}}, "method.stage2", "gives tokens"),
    ({"finetune": {"name": "partial", "blocks": 3}}, "method.finetune.blocks", "has 2 blocks after its stem; 3 would"),
])
def test_combinations_that_cannot_work_on_a_vit_are_refused(saved, method, key, said):
    with pytest.raises(ConfigError, match=f"{key}: .*{said}"):
        _vit_cfg(saved, **method)


def test_transformer_parts_are_refused_on_a_cnn_and_parts_on_two_branches():
    with pytest.raises(ConfigError, match="method.finetune: finetune 'lora' acts on a ViT's transformer blocks"):
        config_from_dict({**DIGITS, "method": {"name": "ce", "finetune": "lora"}})
    with pytest.raises(ConfigError, match="method.finetune: finetune 'linear' needs the plain network; "
                                          "arch 'bilateral' has two branches"):
        config_from_dict({**DIGITS, "method": {"name": "bbn", "finetune": "linear"}})
    assert config_from_dict({**DIGITS, "method": {"name": "bbn", "finetune": "full"}}).method.label() == "bbn"


def _built(saved, finetune, classes=10):
    cfg = _vit_cfg(saved, finetune=finetune)
    from ltsearch.recipes import Recipe
    from ltsearch.recipes.protocol import MethodContext

    class Ctx(MethodContext):
        pass

    ctx = Ctx([50] * classes, None, None, torch.device("cpu"))
    recipe = Recipe(cfg.method, ctx, cfg.train)
    model = recipe.build_model(lambda: build_body(cfg.model, 3))
    return recipe, model


def _count(params):
    return sum(p.numel() for p in params)


def test_trainable_parameters_equal_each_parts_formula(saved):
    d, L, C, head = 32, 2, 10, 32 * 10 + 10
    vit = saved["vit"]
    norms = tuple(f"{n}." for n, m in vit.named_modules() if isinstance(m, torch.nn.LayerNorm))
    expected = {
        "full": None,
        "linear": head,
        "lora": L * 2 * 8 * (d + d) + head,  # r (d_in + d_out) per projection, q and v
        "adaptformer": L * (2 * d + (d * 2 + 2) + (2 * d + d) + 1) + head,  # LN, down, up, s
        "vpt": 10 * d + head,
        "bitfit": sum(p.numel() for n, p in vit.named_parameters()  # biases, and LayerNorms' scales
                      if n.endswith("bias") or n.startswith(norms)) + head,
        "partial": _count(vit.blocks[1].parameters()) + _count(vit.norm.parameters()) + head,
    }
    assert default_bottleneck(C, L) == 2  # LIFT's 2^max(0, ⌊log2(C / 2L)⌋)
    for name, want in expected.items():
        recipe, model = _built(saved, name)
        got = recipe.finetune.trainable(model)
        assert (got is None) == (want is None) and (got is None or _count(got) == want), name
    recipe, model = _built(saved, {"name": "vpt", "deep": True})
    assert _count(recipe.finetune.trainable(model)) == L * 10 * d + head


@pytest.mark.parametrize("finetune", ["linear", "bitfit", "lora", "adaptformer", "vpt",
                                      {"name": "partial", "blocks": 1}])
def test_a_step_leaves_the_frozen_weights_bit_identical(saved, finetune):
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    cfg = _vit_cfg(saved, finetune=finetune)
    cfg.train.epochs, cfg.train.warmup_epochs, cfg.train.lr = 1, 0, 0.5
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    trainable = {id(p) for p in trainer.method.finetune.trainable(trainer.model)}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_epoch()
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = {n for n, p in after.items() if id(p) not in trainable}
    assert frozen and not moved & frozen
    assert "classifier.weight" in moved and len(moved) > 2 - (finetune == "linear")


@pytest.mark.parametrize("finetune", ["lora", "adaptformer"])
def test_zero_initialised_parts_leave_the_first_forward_unchanged(saved, finetune):
    _, model = _built(saved, finetune)
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.embed(x), saved["vit"](x))


def test_lora_merged_equals_unmerged_and_follows_eq_3(saved):
    recipe, model = _built(saved, {"name": "lora", "rank": 4, "alpha": 8.0})
    torch.manual_seed(1)
    for block in model.body.net.blocks:  # a trained update, not the zero start
        torch.nn.init.normal_(recipe.finetune.update_of(block.attn.qkv, "weight")[1].b)
    x = torch.randn(2, 17, 32)
    qkv = model.body.net.blocks[0].attn.qkv
    w0, update = recipe.finetune.update_of(qkv, "weight")
    a, b = update.a, update.b
    d = 32
    with torch.no_grad():
        hooked = qkv(x)  # the layer as the model runs it
        merged = F.linear(x, w0 + update.delta(), qkv.bias)  # the update folded into W0
        # Eq. 3 written out: h = W0 x + (alpha / r) B A x, for q and v, k untouched
        base = F.linear(x, w0, qkv.bias)
        q = base[..., :d] + (8.0 / 4) * (x @ a[0].T @ b[0].T)
        v = base[..., 2 * d:] + (8.0 / 4) * (x @ a[1].T @ b[1].T)
        assert torch.allclose(hooked, merged, atol=1e-5)
        assert torch.allclose(hooked, torch.cat([q, base[..., d:2 * d], v], -1), atol=1e-5)


def test_adaptformer_and_vpt_against_lifts_formulas(saved):
    """LIFT's peft_vit.py forward, written out over timm's block: x = x' + MLP(LN2(x')) +
    s·up(ReLU(down(LN(x')))) after attention; VPT: prompts appended after the sequence, dropped
    before the final norm, the class token pooled."""
    _, model = _built(saved, {"name": "adaptformer", "bottleneck": 3})
    torch.manual_seed(2)
    for block in model.body.net.blocks:
        for t in (block.adaptformer.up.weight, block.adaptformer.scale):
            torch.nn.init.normal_(t)
    net = model.body.net
    img = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.eval()
        x = net.norm_pre(net._pos_embed(net.patch_embed(img)))
        for blk in net.blocks:
            x = x + blk.attn(blk.norm1(x))
            af = blk.adaptformer
            adapter = af.up(torch.relu(af.down(F.layer_norm(x, (32,), af.ln.weight, af.ln.bias)))) * af.scale
            x = x + blk.mlp.fc2(blk.mlp.act(blk.mlp.fc1(blk.norm2(x)))) + adapter
        assert torch.allclose(model.embed(img), net.norm(x)[:, 0], atol=1e-5)

    _, model = _built(saved, {"name": "vpt", "length": 3, "deep": True})
    net, prompts = model.body.net, model.body.prompts
    with torch.no_grad():
        model.eval()
        x = net.norm_pre(net._pos_embed(net.patch_embed(img)))
        n = x.shape[1]
        for i, blk in enumerate(net.blocks):  # (the block's own math: its call runs the hooks)
            x = torch.cat([x[:, :n], prompts[i].expand(2, -1, -1)], 1)
            x = x + blk.attn(blk.norm1(x))
            x = x + blk.mlp(blk.norm2(x))
        assert torch.allclose(model.embed(img), net.norm(x[:, :n])[:, 0], atol=1e-5)
        assert model.features(img).shape[1] == n  # no prompt reaches the pooling (a token average)
    bound = math.sqrt(6.0 / (3 * 4 * 4 + 32))  # VPT's init: uniform within ±√(6 / (3 p² + d))
    assert prompts.abs().max() <= bound and prompts.abs().max() > 0.8 * bound


def test_backbone_lr_factor_and_layer_decay_set_each_groups_lr(saved):
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    cfg = _vit_cfg(saved, train={"backbone_lr_factor": 0.5, "layer_decay": 0.8})
    cfg.train.warmup_epochs, cfg.train.lr = 0, 0.1
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    trainer.train_epoch()
    lr_of = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    groups = layer_groups(trainer.model.body)
    assert len(groups) == 3  # stem, block 0, block 1 with the final norm
    for k, group in enumerate(groups):
        for p in group:  # MAE: d^(G − k), times the backbone's factor
            assert lr_of[id(p)] == pytest.approx(0.1 * 0.5 * 0.8 ** (3 - k))
    assert all(lr_of[id(p)] == pytest.approx(0.1) for p in trainer.model.classifier.parameters())


def test_a_cnn_body_has_its_residual_blocks_as_layer_groups():
    body, _ = build_body("resnet32", 3)
    groups = layer_groups(body)
    assert len(groups) == 1 + 3 * 5  # the stem, then ResNet-32's 15 blocks
    assert sum(map(len, groups)) == len(list(body.parameters()))
    model = ImageClassifier(body, 64, 10)
    assert model.embed(torch.randn(2, 3, 8, 8)).shape == (2, 64)


def test_a_digits_lt_search_over_fine_tuning_parts_with_a_saved_backbone(saved, ray_local, tmp_path):
    from conftest import fresh_store, tiny_search
    from ltsearch.search.run import run_search
    from ltsearch.search.space import parse_search_file

    data = tiny_search(method={"custom": {"finetune.name": {"choice": ["linear", "adaptformer", "lora"]},
                                          "loss.name": {"choice": ["ce", "logit_adjust"]}}})
    data["base"]["model"] = {"arch": VIT, "weights": str(saved["folder"] / "vit.safetensors"),
                             "options": VIT_OPTIONS}
    data["base"]["train"]["epochs"] = 2
    data["search"].update(num_samples=3, asha={"enabled": False})
    uri = fresh_store(tmp_path)
    outcome = run_search(parse_search_file(data), name="ft", storage=tmp_path / "s",
                         tracking_uri=uri, verbose=0)
    trials = outcome.records.trials.values()
    assert len(trials) == 3 and {r["status"] for r in trials} == {"COMPLETED"}
    sha = sha256(saved["folder"] / "vit.safetensors")  # which weights every trial started from
    assert all(r["backbone"] == {"arch": VIT, "weights": data["base"]["model"]["weights"],
                                 "weights_sha256": sha} for r in trials)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ltsearch").experiment_id])
    assert {r.data.tags.get("ltsearch.weights_sha256") for r in runs
            if r.data.tags.get("ltsearch.kind") == "trial"} == {sha}
    assert [r.data.params["backbone.weights_sha256"] for r in runs
            if r.data.tags.get("ltsearch.kind") == "search"] == [sha]
    for r in trials:  # named by its parts: the fine-tuning part's name unless full
        method = r["config"]["method"]
        assert method["finetune"]["name"] == r["params"]["custom.finetune.name"]
        assert r["config"]["model"]["weights"] == data["base"]["model"]["weights"]
        words = [w for w in (method["loss"]["name"], method["finetune"]["name"]) if w != "ce"]
        assert r["method"] == "+".join(words), r


def test_a_search_with_weights_that_do_not_fit_exits_2_before_ray(saved, tmp_path, capsys):
    import yaml

    from conftest import tiny_search
    from ltsearch.cli import main

    data = tiny_search(method={"linear_probe": {}})
    data["base"]["model"] = {"arch": VIT, "weights": str(saved["folder"] / "resnet.pth"),
                             "options": VIT_OPTIONS}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["search", str(path), "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "base.model.weights" in err[0] and "does not fit vit_tiny_patch16_224" in err[0]
    assert not list((tmp_path / "s").glob("*/ray"))  # Ray never started


@pytest.mark.parametrize("method", [
    {"name": "mixup_drw", "finetune": "adaptformer", "posthoc": {"logit_adjust": 1.0}},
    {"name": "custom", "finetune": "lora", "sampler": {"name": "balanced"},
     "stage2": {"name": "lws", "epochs": 1}},
    {"name": "custom", "finetune": "bitfit", "loss": "ldam", "arch": {"classifier": "normed"},
     "weights": {"start": 0.5}, "stage2": {"name": "crt", "epochs": 1}},
    {"name": "custom", "finetune": "vpt", "loss": "balanced_softmax", "stage2": {"name": "tau_norm"}},
])
def test_every_existing_part_still_composes_on_a_pretrained_vit(saved, method):
    from ltsearch.data import build_data
    from ltsearch.trainer import Trainer

    cfg = config_from_dict({**DIGITS, "model": {"arch": VIT, "weights": str(saved["folder"] / "vit.safetensors"),
                                                "options": VIT_OPTIONS}, "method": method})
    trainer = Trainer(cfg, build_data(cfg.data), "cpu")
    result = trainer.fit()
    assert result.status == "finished" and trainer.total_epochs == 2 + cfg.method.extra_epochs(cfg.train)
    assert math.isfinite(result.metrics["train/loss"]) and "test/balanced_acc" in result.metrics

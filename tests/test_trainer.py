"""Real training on digits-LT (CPU)."""
import json

import numpy as np
import pytest
import torch
import yaml

from conftest import make_config
from ltsearch.cli import main
from ltsearch.metrics import classification_metrics, describe_groups, shot_groups
from ltsearch.models import ImageClassifier, build_body
from ltsearch.trainer import Trainer

# Each recipe, with what shows its parts acted, against plain cross-entropy at the same seed
# (CPU runs are deterministic): the first ``same`` epochs' training losses equal ce's (the
# deferred part not yet on: DRW, DRS, a second stage), the rest differ, the run has ``epochs``
# epochs, and its test predictions differ from ce's.
METHODS = [
    ({"name": "reweight", "weights": {"scheme": "effective", "beta": 0.99}}, 0, 2),
    ({"name": "reweight", "weights": {"scheme": "inverse"}, "loss": {"name": "focal", "gamma": 1.0}}, 0, 2),
    ({"name": "resample", "sampler": {"name": "sqrt"}}, 0, 2),
    ({"name": "two_stage", "weights": {"start": 1, "beta": 0.99}}, 1, 2),  # DRW from epoch 1
    ({"name": "two_stage", "weights": None, "sampler": {"then": "balanced", "start": 1}}, 1, 2),
    ({"name": "two_stage", "weights": None, "stage2": {"name": "crt", "epochs": 1, "lr": 0.05}}, 2, 3),
    ({"name": "ldam_drw", "weights": {"start": 1}}, 0, 2),
    ({"name": "logit_adjust"}, 0, 2),
    ({"name": "balanced_softmax", "mixup": {"alpha": 0.4}}, 0, 2),
    ({"name": "mixup_drw", "weights": {"start": 1}}, 0, 2),
    ({"name": "custom", "mixup": {"alpha": 1.0, "kind": "cutmix", "until": 1}}, 0, 2),
    ({"name": "mislas", "stage2": {"epochs": 1}}, 0, 3),
    ({"name": "weight_balancing", "stage2": {"epochs": 1}}, 0, 3),
    ({"name": "custom", "stage2": {"name": "lws", "epochs": 1}}, 2, 3),
    ({"name": "custom", "stage2": {"name": "tau_norm"}, "posthoc": {"logit_adjust": 0.5}}, 2, 2),
]


def _id(method):
    return "-".join(f"{k}={v}" if not isinstance(v, dict) else f"{k}={v.get('name', '')}"
                    for k, v in method.items() if v is not None)


@pytest.fixture(scope="module")
def ce_run(digits_data):
    return Trainer(make_config({"name": "ce"}), digits_data).fit()


@pytest.mark.parametrize("method,same,epochs", [pytest.param(*m, id=_id(m[0])) for m in METHODS])
def test_each_recipe_trains_and_its_parts_act(method, same, epochs, digits_data, ce_run):
    cfg = make_config(method)
    reports = []
    result = Trainer(cfg, digits_data).fit(lambda m, t: reports.append(m))
    assert result.status == "finished" and result.epochs == epochs
    assert [r["epoch"] for r in reports] == list(range(1, epochs + 1))
    assert all(np.isfinite(r["train/loss"]) for r in reports)
    # 10 classes: chance is 0.1 balanced accuracy; each of these reaches 0.66–0.90 (ce 0.78)
    assert result.metrics["val/balanced_acc"] > 0.6
    losses = [r["train/loss"] for r in reports]
    ce = [r["train/loss"] for r in ce_run.history]
    assert losses[:same] == ce[:same]
    assert all(a != b for a, b in zip(losses[same:], ce[same:]))
    assert result.metrics["test/confusion"] != ce_run.metrics["test/confusion"]
    confusion = np.asarray(result.metrics["test/confusion"])  # the metrics, from the matrix
    assert confusion.sum(1).tolist() == np.bincount(digits_data.test.y, minlength=10).tolist()
    assert result.metrics["test/top1"] == pytest.approx(np.trace(confusion) / confusion.sum())
    per_class = np.diag(confusion) / confusion.sum(1)
    assert result.metrics["test/per_class"] == pytest.approx(per_class.tolist())
    assert result.metrics["test/balanced_acc"] == pytest.approx(per_class.mean())


@pytest.mark.parametrize("bn", ["frozen", "update"])
def test_crt_freezes_features_and_resets_classifier(digits_data, bn):
    cfg = make_config({"name": "custom", "stage2": {"name": "crt", "epochs": 1, "bn": bn}})
    t = Trainer(cfg, digits_data)
    t.fit(max_epochs=2)
    body = {k: v.clone() for k, v in t.model.body.state_dict().items()}
    head = t.model.classifier.weight.detach().clone()
    entered = []  # the classifier as stage 2 starts, before its first step
    t.method.stage2.start_epoch = lambda *a: entered.append(t.model.classifier.weight.detach().clone())
    result = t.fit()
    assert result.epochs == 3 and "stage1/test/top1" in result.metrics
    for k, v in t.model.body.state_dict().items():
        if "running" in k or "num_batches" in k:  # BatchNorm statistics follow bn
            assert torch.equal(v, body[k]) == (bn == "frozen"), k
        else:
            assert torch.equal(v, body[k]), k  # weights unchanged
    bound = 1 / head.shape[1] ** 0.5  # nn.Linear's reset draws from ±1/√fan_in
    assert len(entered) == 1 and not torch.allclose(entered[0], head)  # re-initialised…
    assert entered[0].abs().max() <= bound
    assert not torch.equal(t.model.classifier.weight, entered[0])  # …then trained


def test_crt_resumed_inside_its_stage_keeps_the_classifier_it_trained(digits_data):
    cfg = make_config({"name": "custom", "stage2": {"name": "crt", "epochs": 2}})
    t = Trainer(cfg, digits_data)
    t.fit(max_epochs=3)  # one epoch into stage 2
    state = t.state_dict()
    resumed = Trainer(cfg, digits_data)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.model.classifier.weight, state["model"]["classifier.weight"])


def test_tau_norm_and_posthoc_act_at_evaluation_only(digits_data, ce_run):
    """τ-norm trains nothing and drops the bias; post-hoc adjustment subtracts τ·log prior at
    evaluation: the reported predictions are those of the hand-computed logits."""
    cfg = make_config({"name": "custom", "stage2": {"name": "tau_norm", "tau": 0.7},
                       "posthoc": {"logit_adjust": 0.5}})
    t = Trainer(cfg, digits_data)
    result = t.fit()
    assert result.epochs == 2 and [h["train/loss"] for h in result.history] == [
        h["train/loss"] for h in ce_run.history]  # stage 1 is ce; τ-norm adds no epoch
    images = t.test_set
    x, y = images.batch(torch.arange(len(images)), augment=False)
    t.model.eval()
    with torch.no_grad():
        w = t.model.classifier.weight
        z = t.model.embed(x) @ (w / w.norm(dim=1, keepdim=True) ** 0.7).T  # no bias
        counts = torch.tensor(digits_data.counts, dtype=torch.float32)
        z = z - 0.5 * torch.log(counts / counts.sum())
        plain = t.model(x)
    expected = classification_metrics(y, z.argmax(1), digits_data.counts)
    assert result.metrics["test/per_class"] == pytest.approx(expected["per_class"])
    assert result.metrics["test/confusion"] == expected["confusion"]
    unadjusted = classification_metrics(y, plain.argmax(1), digits_data.counts)
    assert unadjusted["confusion"] != expected["confusion"]  # the adjustments changed predictions


def test_mixup_stops_at_until(digits_data):
    cfg = make_config({"name": "custom", "mixup": {"alpha": 1.0, "until": 2}}, train={"epochs": 3})
    mixing = []
    Trainer(cfg, digits_data).fit(lambda m, t: mixing.append(t.method.mixing))
    assert mixing == [True, True, False]


def test_shot_groups_and_metrics():
    counts = [500, 101, 100, 20, 19, 3]
    g = shot_groups(counts, many=100, few=20)
    assert g == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}
    y = torch.tensor([0, 0, 1, 2, 3, 4, 5, 5])
    pred = torch.tensor([0, 1, 1, 2, 0, 4, 5, 0])
    m = classification_metrics(y, pred, counts)
    assert m["top1"] == pytest.approx(5 / 8)
    per_class = [0.5, 1, 1, 0, 1, 0.5]
    assert m["per_class"] == pytest.approx(per_class)
    assert m["balanced_acc"] == pytest.approx(np.mean(per_class))
    assert m["many"] == pytest.approx(0.75) and m["medium"] == pytest.approx(0.5)
    assert m["few"] == pytest.approx(0.75)
    assert m["confusion"][0] == [1, 1, 0, 0, 0, 0] and m["confusion"][5][0] == 1


def test_shot_groups_by_thirds_fit_data_the_thresholds_do_not():
    """Every class above 100 images: the thresholds put all in many; thirds split by count."""
    counts = [900, 150, 400, 120, 2000, 101, 300]  # 7 classes: thirds of 3, 2, 2
    assert shot_groups(counts) == {"many": list(range(7)), "medium": [], "few": []}
    assert shot_groups(counts, groups="thirds") == {"many": [0, 2, 4], "medium": [1, 6], "few": [3, 5]}
    assert shot_groups([5, 5, 5, 5], groups="thirds") == {"many": [0, 1], "medium": [2], "few": [3]}
    y = torch.arange(7)
    m = classification_metrics(y, torch.tensor([0, 1, 0, 3, 4, 0, 6]), counts, groups="thirds")
    assert (m["many"], m["medium"], m["few"]) == (pytest.approx(2 / 3), 1.0, 0.5)
    assert describe_groups(counts) == "many/medium/few: training images > 100 / 20–100 / < 20 (7/0/0 classes)"
    assert describe_groups(counts, groups="thirds") == \
        "many/medium/few: thirds of the classes by training count (3/2/2 classes)"


def _cifar_resnet_params(depth: int, in_channels: int = 3, classes: int = 10) -> int:
    """He et al. 2016 §4.2 counted by hand: stem conv+BN, n = (depth − 2)/6 basic blocks (two 3×3
    convs, two BNs) per stage at 16/32/64 channels, option-A shortcuts (no parameters), a linear
    classifier."""
    n, total, c_in = (depth - 2) // 6, in_channels * 16 * 9 + 2 * 16, 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += c_in * c * 9 + c * c * 9 + 4 * c
            c_in = c
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth, millions", [(8, 0.075), (20, 0.27), (32, 0.46), (44, 0.66),
                                             (56, 0.85), (110, 1.7)])  # the paper's Table 6 (not 8)
def test_cifar_resnets_have_the_papers_sizes(depth, millions):
    model = ImageClassifier(*build_body(f"resnet{depth}", 3), 10)
    blocks = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 3 * (depth - 2) // 6
    n = sum(p.numel() for p in model.parameters())
    assert n == _cifar_resnet_params(depth) and n == pytest.approx(millions * 1e6, rel=0.03)


def test_resnet32_shape_and_size():
    body, dim = build_body("resnet32", 3)
    model = ImageClassifier(body, dim, 10)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.46e6, rel=0.02)
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 64, 8, 8) and model(x).shape == (2, 10)
    body1, _ = build_body("resnet32", 1)
    assert ImageClassifier(body1, 64, 10).features(torch.randn(2, 1, 8, 8)).shape == (2, 64, 2, 2)


def test_torchvision_body_takes_grey_input():
    body, dim = build_body("resnet18", 1)
    assert dim == 512 and body(torch.randn(1, 1, 64, 64)).shape == (1, 512, 2, 2)


def test_cpu_runs_are_deterministic(digits_data):
    cfg = make_config({"name": "resample", "sampler": {"name": "progressive"}})
    a = Trainer(cfg, digits_data).fit()
    b = Trainer(cfg, digits_data).fit()
    timing = ("images_per_s", "epoch_time_s", "eval_time_s")
    assert a.history == [{**h, **{k: a.history[i][k] for k in timing}} for i, h in enumerate(b.history)]
    assert a.metrics["test/per_class"] == b.metrics["test/per_class"]


@pytest.mark.parametrize("method", [{"name": "ce", "mixup": {"alpha": 1.0}},
                                    {"name": "custom", "stage2": {"name": "crt", "epochs": 2}}])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, digits_data, method):
    cfg = make_config(method, train={"epochs": 3})
    full = Trainer(cfg, digits_data).fit()
    first = Trainer(cfg, digits_data)
    first.fit(max_epochs=4 if "stage2" in method else 2)
    first.save(tmp_path / "ckpt.pt")
    second = Trainer(cfg, digits_data)
    second.load(tmp_path / "ckpt.pt")
    resumed = second.fit()
    assert resumed.epochs == full.epochs
    assert resumed.metrics["val/per_class"] == full.metrics["val/per_class"]
    assert resumed.metrics["train/loss"] == pytest.approx(full.metrics["train/loss"], rel=1e-6)
    for a, b in zip(full.history, resumed.history):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)


@pytest.mark.parametrize("method", [{"name": "ce"}, {"name": "bbn"}], ids=_id)
def test_a_worker_compiles_once_not_once_per_trial(monkeypatch, digits_data, method):
    """A reused worker runs trial after trial, each a fresh trainer and model. Dynamo is given
    each graph it builds; a backend that records them counts what inductor would compile
    (the trainer compiles on CUDA only; here it is told to on the CPU): the second trial's
    fresh model compiles nothing, and both trials' numbers equal eager's to the bit."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compiler.reset()
    compile, modes = torch.compile, []  # the production compile_forward, counting under it

    def counting_compile(model, mode=None):
        modes.append(mode)
        return compile(model, backend=counting_backend)

    monkeypatch.setattr(torch, "compile", counting_compile)
    cfg = make_config(method, train={"epochs": 2})
    timing = ("images_per_s", "epoch_time_s", "eval_time_s")

    def numbers(result):
        return [{k: v for k, v in h.items() if k not in timing} for h in result.history]

    eager = numbers(Trainer(cfg, digits_data).fit())
    after = []
    for _ in range(2):
        trainer = Trainer(cfg, digits_data)
        trainer.compiling = True
        assert numbers(trainer.fit()) == eager
        after.append(len(graphs))
    torch.compiler.reset()
    assert after[0] >= 1 and after[1] == after[0]
    assert modes == ["reduce-overhead"] * 2  # CUDA graphs, one compile_forward per trainer


def test_non_finite_loss_stops_with_error_state(digits_data):
    cfg = make_config(train={"lr": 1e30})
    result = Trainer(cfg, digits_data).fit()
    assert result.status == "diverged"
    assert "non-finite training loss" in result.error and "epoch 1" in result.error


def test_cli_train_writes_metrics_and_config(tmp_path, capsys):
    cfg = {"data": {"source": "digits", "augment": {"crop_pad": 0, "hflip": False}},
           "train": {"preset": "none", "epochs": 2, "batch_size": 32, "lr": 0.02,
                     "warmup_epochs": 0, "schedule": "cosine", "device": "cpu"},
           "method": {"name": "reweight", "weights": {"scheme": "sqrt"}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "epoch   1/2" in out and "epoch   2/2" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["epochs"] == 2
    confusion = np.asarray(metrics["metrics"]["test/confusion"])
    assert metrics["metrics"]["test/top1"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert metrics["history"][-1]["test/top1"] == metrics["metrics"]["test/top1"]
    copy = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert copy["method"]["name"] == "reweight" and copy["method"]["loss"] == {"name": "ce"}
    assert copy["method"]["weights"] == {"scheme": "sqrt", "beta": 0.9999, "start": "always",
                                         "normalize": "batch"}
    # the copy is itself a valid config
    assert main(["train", str(tmp_path / "out" / "config.yaml"), "--out", str(tmp_path / "o2"),
                 "--epochs", "1"]) == 0

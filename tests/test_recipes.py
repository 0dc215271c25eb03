"""Recipe parts against their papers' official code, on fixed tensors; the fidelity fixes."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import make_config
from ltsearch.cli import main
from ltsearch.recipes import PRESETS
from ltsearch.recipes.losses.balanced_softmax import BalancedSoftmax
from ltsearch.recipes.losses.ce import CrossEntropy
from ltsearch.recipes.losses.las import LabelAwareSmoothing, LASParams
from ltsearch.recipes.losses.ldam import LDAM, LDAMParams
from ltsearch.recipes.losses.logit_adjust import LogitAdjust, LogitAdjustParams
from ltsearch.recipes.losses.sigmoid import Sigmoid
from ltsearch.recipes.mixup import Mixer, MixupConfig, cutmix_box
from ltsearch.recipes.posthoc import adjust_logits
from ltsearch.recipes.stage2.base import scaled_logits
from ltsearch.recipes.stage2.maxnorm import maxnorm_project, maxnorm_radius
from ltsearch.recipes.stage2.tau_norm import tau_normalised
from ltsearch.recipes.weights import class_weights, objective
from ltsearch.runconfig import config_from_dict
from ltsearch.trainer import Trainer

COUNTS = [500, 200, 80, 30, 10]
CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # IF = 100
torch.manual_seed(0)
LOGITS = torch.randn(6, 5) * 3
Y = torch.tensor([0, 1, 2, 3, 4, 4])


def _counts(counts=COUNTS):
    return torch.tensor(counts, dtype=torch.float32)


# --- losses against the official code ---------------------------------------------------------


def test_ldam_against_official_code():
    """kaidic/LDAM-DRW losses.py: m = 1/n^¼ scaled to max_m; z_y − m_y; CE(s·z)."""
    max_m, s = 0.5, 30.0
    m_list = 1.0 / np.sqrt(np.sqrt(np.asarray(COUNTS, dtype=np.float64)))
    m_list = m_list * (max_m / np.max(m_list))
    index = F.one_hot(Y, 5).bool()
    batch_m = torch.as_tensor(m_list, dtype=torch.float32)[Y].view(-1, 1)
    output = torch.where(index, LOGITS - batch_m, LOGITS)
    official = F.cross_entropy(s * output, Y)
    loss = LDAM(LDAMParams(max_m=max_m, s=s), _counts())
    np.testing.assert_allclose(loss.margins.numpy(), m_list, rtol=1e-6)
    assert loss.margins[-1] == pytest.approx(max_m)  # the rarest class gets the largest margin
    assert float(objective(loss, LOGITS, [(Y, 1.0)])) == pytest.approx(float(official), rel=1e-5)
    # LDAM-DRW's DRW: F.cross_entropy(weight=w), the Σ w_y normalisation
    w = class_weights(COUNTS, "effective", 0.9999)
    official_drw = F.cross_entropy(s * output, Y, weight=w)
    assert float(objective(loss, LOGITS, [(Y, 1.0)], w, "weight_sum")) == pytest.approx(
        float(official_drw), rel=1e-5)


def test_logit_adjusted_and_balanced_softmax():
    """Menon et al. Eq. 10: CE(z + τ log π); Ren et al.: CE(z + log n) — τ = 1 gives the same."""
    pi = _counts() / _counts().sum()
    for tau in (0.5, 1.0, 2.0):
        la = LogitAdjust(LogitAdjustParams(tau=tau), _counts())
        expected = F.cross_entropy(LOGITS + tau * pi.log(), Y, reduction="none")
        torch.testing.assert_close(la.per_sample(LOGITS, Y), expected, rtol=1e-5, atol=1e-6)
    bs = BalancedSoftmax(None, _counts())
    torch.testing.assert_close(bs.per_sample(LOGITS, Y),
                               F.cross_entropy(LOGITS + _counts().log(), Y, reduction="none"))
    torch.testing.assert_close(bs.per_sample(LOGITS, Y),
                               LogitAdjust(LogitAdjustParams(1.0), _counts()).per_sample(LOGITS, Y),
                               rtol=1e-5, atol=1e-5)
    # τ = 0 is plain cross-entropy
    torch.testing.assert_close(LogitAdjust(LogitAdjustParams(0.0), _counts()).per_sample(LOGITS, Y),
                               CrossEntropy(None, _counts()).per_sample(LOGITS, Y))


def test_posthoc_adjustment():
    log_pi = (_counts() / _counts().sum()).log()
    torch.testing.assert_close(adjust_logits(LOGITS, log_pi, 1.0), LOGITS - log_pi)
    # it moves predictions toward rare classes: equal logits → the rarest class wins
    assert int(adjust_logits(torch.zeros(1, 5), log_pi, 1.0).argmax()) == 4


def _official_las(x, target, cls_num_list, smooth_head, smooth_tail, shape, power=None):
    """dvlab-research/MiSLAS methods.py, LabelAwareSmoothing."""
    n_1, n_K = max(cls_num_list), min(cls_num_list)
    n = np.array(cls_num_list)
    if shape == "concave":
        smooth = smooth_tail + (smooth_head - smooth_tail) * np.sin((n - n_K) * np.pi / (2 * (n_1 - n_K)))
    elif shape == "linear":
        smooth = smooth_tail + (smooth_head - smooth_tail) * (n - n_K) / (n_1 - n_K)
    elif shape == "convex":
        smooth = smooth_head + (smooth_head - smooth_tail) * np.sin(1.5 * np.pi + (n - n_K) * np.pi / (2 * (n_1 - n_K)))
    else:
        smooth = smooth_tail + (smooth_head - smooth_tail) * np.power((n - n_K) / (n_1 - n_K), power)
    smooth = torch.from_numpy(smooth).float()
    smoothing = smooth[target]
    confidence = 1.0 - smoothing
    logprobs = F.log_softmax(x, dim=-1)
    nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth_loss = -logprobs.mean(dim=-1)
    return (confidence * nll_loss + smoothing * smooth_loss).mean(), smooth


@pytest.mark.parametrize("shape,power", [("concave", 1.0), ("linear", 1.0), ("convex", 1.0),
                                         ("exp", 2.0)])
def test_label_aware_smoothing_against_official_code(shape, power):
    official, smooth = _official_las(LOGITS, Y, COUNTS, 0.4, 0.1, shape, power)
    las = LabelAwareSmoothing(LASParams(smooth_head=0.4, smooth_tail=0.1, shape=shape, power=power),
                              _counts())
    torch.testing.assert_close(las.smooth, smooth, rtol=1e-5, atol=1e-6)
    assert las.smooth[0] == pytest.approx(0.4) and las.smooth[-1] == pytest.approx(0.1)
    assert float(objective(las, LOGITS, [(Y, 1.0)])) == pytest.approx(float(official), rel=1e-5)


def test_class_balanced_softmax_divides_by_the_batch():
    """Fidelity fix 3: Cui et al.'s code divides Σ w_y·ℓ by the batch size (TF's weighted loss),
    PyTorch's weighted mean by Σ w_y. On CIFAR-10-LT at β = 0.9999 the second is ≈5.8× smaller."""
    w = class_weights(CIFAR10_LT, "effective", 0.9999)
    ce = CrossEntropy(None, _counts(CIFAR10_LT))
    logits, y = torch.randn(8, 10), torch.tensor([0, 0, 0, 1, 2, 5, 8, 9])
    per = F.cross_entropy(logits, y, reduction="none")
    batch = objective(ce, logits, [(y, 1.0)], w, "batch")
    assert float(batch) == pytest.approx(float((w[y] * per).sum() / len(y)), rel=1e-6)
    pytorch = objective(ce, logits, [(y, 1.0)], w, "weight_sum")
    assert float(pytorch) == pytest.approx(float(F.cross_entropy(logits, y, weight=w)), rel=1e-6)
    # over instance-sampled batches E[w_y] = Σ n_c w_c / N: the ratio of the two reductions
    n = torch.tensor(CIFAR10_LT, dtype=torch.float64)
    assert float(1 / ((n * w.double()).sum() / n.sum())) == pytest.approx(5.8, abs=0.1)
    # the reweight preset uses the paper's, DRW presets LDAM's
    assert config_from_dict({"method": "reweight"}).method.weights.normalize == "batch"
    for name in ("two_stage", "ldam_drw", "mixup_drw"):
        assert config_from_dict({"method": name}).method.weights.normalize == "weight_sum"


def test_sigmoid_and_focal_start_at_the_prior_without_bias_decay(digits_data):
    """Fidelity fix 2: the official code starts the bias at −log(C − 1) (p = 1/C) and does not
    decay it; PyTorch's default would start it at random and decay it."""
    for loss in ("sigmoid", "focal"):
        t = Trainer(make_config({"name": "reweight", "loss": {"name": loss}}), digits_data)
        bias = t.model.classifier.bias
        torch.testing.assert_close(bias.detach(), torch.full((10,), -math.log(9)))
        assert float(torch.sigmoid(bias.detach()[0])) == pytest.approx(0.1)
        t._enter_phase(0, resumed=False)
        decayed = [g for g in t.optimizer.param_groups if g["weight_decay"] > 0]
        exempt = [g for g in t.optimizer.param_groups if g["weight_decay"] == 0]
        assert len(exempt) == 1 and exempt[0]["params"] == [bias]
        assert all(p is not bias for g in decayed for p in g["params"])
    softmax = Trainer(make_config({"name": "reweight"}), digits_data)
    softmax._enter_phase(0, resumed=False)
    assert len(softmax.optimizer.param_groups) == 1
    assert Sigmoid(None, _counts()).bias_init(5) == pytest.approx(-math.log(4))


# --- mixup and CutMix ----------------------------------------------------------------------------


def _official_rand_bbox(size, lam, cx, cy):
    """clovaai/CutMix-PyTorch train.py rand_bbox, with the centre given."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    bbx1, bby1 = np.clip(cx - cut_w // 2, 0, W), np.clip(cy - cut_h // 2, 0, H)
    bbx2, bby2 = np.clip(cx + cut_w // 2, 0, W), np.clip(cy + cut_h // 2, 0, H)
    return bbx1, bby1, bbx2, bby2


def test_mixup_targets_and_loss():
    x = torch.randn(6, 1, 4, 4)
    mixer = Mixer(MixupConfig(alpha=1.0))
    mixer.start_epoch(3, np.random.default_rng(0))
    assert mixer.lams.tolist() == pytest.approx(np.random.default_rng(0).beta(1.0, 1.0, 3).tolist())
    mixed, targets = mixer.mix(x, Y, 1, torch.Generator().manual_seed(5))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    lam = mixer.lams[1]
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    (ya, la), (yb, lb) = targets
    assert torch.equal(ya, Y) and torch.equal(yb, Y[perm]) and la + lb == pytest.approx(1.0)
    ce = CrossEntropy(None, _counts())
    expected = lam * F.cross_entropy(LOGITS, Y) + (1 - lam) * F.cross_entropy(LOGITS, Y[perm])
    assert float(objective(ce, LOGITS, targets)) == pytest.approx(float(expected), rel=1e-5)


def test_cutmix_box_and_lambda_against_official_code():
    for lam, cy, cx in ((0.3, 5, 20), (0.7, 0, 31), (0.5, 16, 16), (0.95, 31, 0)):
        y1, y2, x1, x2 = cutmix_box(32, 32, lam, cy, cx)
        bbx1, bby1, bbx2, bby2 = _official_rand_bbox((1, 3, 32, 32), lam, cx, cy)
        assert (x1, y1, x2, y2) == (bbx1, bby1, bbx2, bby2)
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    mixer = Mixer(MixupConfig(alpha=1.0, kind="cutmix"))
    mixer.lams, mixer.centres = np.array([0.5]), np.array([[0.5, 0.5]])
    mixed, ((_, lam), (yb, rest)) = mixer.mix(x, torch.tensor([0, 1]), 0, torch.Generator().manual_seed(1))
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(1))
    assert perm.tolist() == [1, 0] and yb.tolist() == [1, 0]
    y1, y2, x1, x2 = cutmix_box(4, 4, 0.5, 2, 2)
    expected = x.clone()
    expected[:, :, y1:y2, x1:x2] = x[perm][:, :, y1:y2, x1:x2]
    torch.testing.assert_close(mixed, expected)
    box = (y2 - y1) * (x2 - x1) / 16
    assert 0 < box < 1 and lam == pytest.approx(1 - box) and rest == pytest.approx(box)


# --- second stages -------------------------------------------------------------------------------


def test_lws_tau_norm_and_maxnorm_formulas():
    W = torch.tensor([[3.0, 4.0], [0.6, 0.8], [1.0, 0.0]])
    torch.testing.assert_close(tau_normalised(W, 1.0).norm(dim=1), torch.ones(3))
    torch.testing.assert_close(tau_normalised(W, 0.0), W)
    torch.testing.assert_close(tau_normalised(W, 0.5)[0], W[0] / math.sqrt(5.0))
    scales = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(scaled_logits(torch.ones(2, 3), scales), scales.expand(2, 3))
    # MaxNorm: radius between the smallest (1) and largest (5) row norm; rows above it scaled to it
    r = maxnorm_radius(W, 0.25)
    assert float(r) == pytest.approx(1 + 0.25 * 4)
    P = W.clone()
    maxnorm_project(P, r)
    torch.testing.assert_close(P.norm(dim=1), torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(P[0] / P[0].norm(), W[0] / W[0].norm())  # direction kept
    torch.testing.assert_close(P[1:], W[1:])


def test_lws_trains_only_the_scales(digits_data):
    cfg = make_config({"name": "custom", "stage2": {"name": "lws", "epochs": 1, "lr": 0.5}})
    t = Trainer(cfg, digits_data)
    t.fit(max_epochs=2)
    before = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    t.fit()
    for k, v in t.model.named_parameters():
        assert torch.equal(v, before[k]), k  # the whole network, classifier included
    scales = t.method.stage2.scales
    assert not torch.allclose(scales, torch.ones_like(scales))
    x, _ = t.val_set.batch(torch.arange(8), augment=False)
    torch.testing.assert_close(t.method.logits(t.model, x), t.model(x) * scales)


def test_mislas_trains_classifier_and_scales(digits_data):
    t = Trainer(make_config({"name": "mislas", "stage2": {"epochs": 1}}), digits_data)
    t.fit(max_epochs=2)
    head = t.model.classifier.weight.detach().clone()
    body = {k: v.detach().clone() for k, v in t.model.body.named_parameters()}
    t._enter_phase(1, resumed=False)  # what train_epoch does at the phase boundary
    assert torch.equal(t.model.classifier.weight, head)  # stage 1's classifier, not re-initialised
    t.fit()
    assert not torch.equal(t.model.classifier.weight, head)  # then fine-tuned with the scales
    assert not torch.allclose(t.method.stage2.scales.detach(), torch.ones(10))
    assert all(torch.equal(v, body[k]) for k, v in t.model.body.named_parameters())


@pytest.mark.parametrize("every", ["epoch", "step"])
def test_weight_balancing_projects_rows(digits_data, every):
    """MaxNorm as the official ``MaxNorm_via_PGD``: the radius is set once, from the rows' norms
    at the stage start, and kept; rows are projected after each epoch (official) or each step;
    the bias is never touched by the projection."""
    cfg = make_config({"name": "weight_balancing",
                       "stage2": {"epochs": 2, "lr": 0.5, "thresh": 0.3, "every": every}})
    t = Trainer(cfg, digits_data)
    t.fit(max_epochs=2)
    radius = maxnorm_radius(t.model.classifier.weight.detach(), 0.3)
    stage, step_norms, epoch_norms, radii = t.method.stage2, [], [], []
    after_step, end_epoch = stage.after_step, stage.end_epoch

    def on_step():
        after_step()
        step_norms.append(float(t.model.classifier.weight.detach().norm(dim=1).max()))

    def on_epoch():
        bias = t.model.classifier.bias.detach().clone()
        end_epoch()
        assert torch.equal(t.model.classifier.bias, bias)  # the projection leaves the bias free
        epoch_norms.append(float(t.model.classifier.weight.detach().norm(dim=1).max()))
        radii.append(float(stage.radius))

    stage.after_step, stage.end_epoch = on_step, on_epoch
    t.fit()
    r = float(radius)
    assert radii == [pytest.approx(r)] * 2  # from the stage start, not recomputed per epoch
    assert all(n <= r + 1e-5 for n in epoch_norms)
    if every == "step":
        assert all(n <= r + 1e-5 for n in step_norms)
    else:  # between projections the rows grow past the radius (lr 0.5)
        assert any(n > r + 1e-3 for n in step_norms)
    assert t.cfg.train.weight_decay == 5e-3  # the preset's stage-1 weight decay


def test_weight_balancings_stage_has_weight_decay_01_and_a_class_balanced_loss(digits_data):
    t = Trainer(make_config({"name": "weight_balancing", "stage2": {"epochs": 1}}), digits_data)
    t.fit(max_epochs=2)
    t._enter_phase(1, resumed=False)  # what train_epoch does at the phase boundary
    assert {g["weight_decay"] for g in t.optimizer.param_groups} == {0.1}
    assert {id(p) for g in t.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in t.model.classifier.parameters()}
    stage = t.method.stage2
    w = class_weights(digits_data.counts, "effective", 0.9999)
    torch.testing.assert_close(stage.weights, w)
    x, y = t.train_set.batch(torch.arange(32), augment=False)
    from ltsearch.recipes import Batch
    loss = stage.loss(t.model, [Batch(x, y)], 0, 0)
    expected = (w[y] * F.cross_entropy(t.model(x), y, reduction="none")).sum() / len(y)  # Cui et al.
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mislas_preset_smooths_as_its_cifar10_config(digits_data):
    """MiSLAS's CIFAR-10-LT configs: label-aware smoothing 0.3 on the largest class to 0.0 on
    the rarest, concave, against the official LabelAwareSmoothing on the preset's loss."""
    t = Trainer(make_config({"name": "mislas", "stage2": {"epochs": 1}}), digits_data)
    las = t.method.stage2.loss_fn
    counts = torch.tensor(digits_data.counts)
    assert las.smooth[counts.argmax()] == pytest.approx(0.3) and las.smooth[counts.argmin()] == pytest.approx(0.0)
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.arange(12) % 10
    official, smooth = _official_las(logits, y, digits_data.counts, 0.3, 0.0, "concave")
    torch.testing.assert_close(las.smooth, smooth, rtol=1e-5, atol=1e-6)
    assert float(objective(las, logits, [(y, 1.0)])) == pytest.approx(float(official), rel=1e-5)


# --- fidelity fixes ------------------------------------------------------------------------------


def test_bbn_branches_start_independent():
    """Fidelity fix 4: the official code builds the two last blocks separately; a copy would
    start both branches identical."""
    from ltsearch.models import build_body
    from ltsearch.recipes.arch.bilateral import BBNNet

    torch.manual_seed(0)
    net = BBNNet(*[build_body("resnet32", 3)[0] for _ in range(2)], 64, 10)
    pairs = list(zip(net.branch_c.named_parameters(), net.branch_r.named_parameters()))
    convs = [(a, b) for (n, a), (_, b) in pairs if a.dim() == 4]
    assert convs and all(not torch.equal(a, b) for a, b in convs)
    assert all(a.data_ptr() != b.data_ptr() for (_, a), (_, b) in pairs)
    # each branch keeps the network's own initialisation (Kaiming normal: std √(2 / fan_in))
    for a, b in convs:
        fan_in = a[0].numel()
        assert float(b.detach().std()) == pytest.approx(math.sqrt(2 / fan_in), rel=0.15)


def test_cli_epochs_scales_epoch_valued_knobs(tmp_path, capsys):
    """Fidelity fix 5: `--epochs` on a DRW config with an absolute start at 160 of 200 used to
    train plain cross-entropy; absolute epochs now scale with the run and are re-validated."""
    cfg = {"data": {"source": "digits", "augment": {"crop_pad": 0, "hflip": False}},
           "train": {"preset": "none", "epochs": 200, "batch_size": 64, "lr": 0.02,
                     "warmup_epochs": 5, "schedule": "step", "milestones": [160, 180]},
           "method": {"name": "two_stage", "weights": {"start": 160},
                      "sampler": {"then": "balanced", "start": 0.9}, "mixup": {"until": 100}}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--out", str(tmp_path / "o"), "--epochs", "4",
                 "--device", "cpu"]) == 0
    used = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert used["train"]["epochs"] == 4 and used["train"]["milestones"] == [3, 4]
    assert used["method"]["weights"]["start"] == 3  # 160 of 200 → 3 of 4
    assert used["method"]["sampler"]["start"] == 0.9 and used["method"]["mixup"]["until"] == 2
    # a value the scaled run cannot hold is refused, naming the key
    cfg["method"]["weights"]["start"] = 199
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["train", str(path), "--out", str(tmp_path / "x"), "--epochs", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: method.weights.start"), err
    bbn = {**cfg, "method": {"name": "bbn", "arch": {"schedule": "separated", "switch_epoch": 120}}}
    path.write_text(yaml.safe_dump(bbn))
    assert main(["train", str(path), "--out", str(tmp_path / "b"), "--epochs", "5",
                 "--device", "cpu"]) == 0
    used = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert used["method"]["arch"]["switch_epoch"] == 3


def test_presets_work_at_any_length():
    """Fidelity fix 5: a preset's epoch-valued defaults are fractions of the run, so
    `method: {name: two_stage}` is DRW at 80 % whatever train.epochs is."""
    from ltsearch.config import resolve_epoch

    for epochs in (5, 20, 200):
        cfg = config_from_dict({"train": {"epochs": epochs, "warmup_epochs": 0},
                                "method": {"name": "two_stage"}})
        assert resolve_epoch(cfg.method.weights.start, epochs) == round(0.8 * epochs)


def test_normed_classifier_against_official_code():
    """LDAM-DRW's NormedLinear: cosine logits, unit-norm class vectors at initialisation."""
    from ltsearch.models import NormedLinear

    torch.manual_seed(0)
    layer = NormedLinear(8, 5)
    torch.testing.assert_close(layer.weight.norm(dim=1), torch.ones(5))
    x = torch.randn(3, 8)
    official_weight = layer.weight.detach().T  # (in, out), columns normalised in forward
    expected = F.normalize(x, dim=1).mm(F.normalize(official_weight, dim=0))
    torch.testing.assert_close(layer(x), expected)
    assert config_from_dict({"method": "ldam_drw"}).method.arch.params.classifier == "normed"


def test_every_preset_expands_and_names_itself():
    for name in PRESETS:  # (lift's head starts from text: a CLIP backbone, here on the meta device)
        model = {"arch": "open_clip:ViT-B-16"} if name == "lift" else {}
        cfg = config_from_dict({"method": {"name": name}, "model": model})
        assert cfg.method.label() == (name if name != "custom" else "ce")
    composed = config_from_dict({"method": {"name": "custom", "loss": "ldam",
                                            "weights": {"start": 0.8}, "stage2": "crt"}})
    assert composed.method.label() == "ldam+drw+crt"

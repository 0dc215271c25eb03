"""BBN (Zhou et al., CVPR 2020): adaptor schedules, shared trunk, samplers, mixed logits."""
import math

import numpy as np
import pytest
import torch

from conftest import make_config
from ltsearch.recipes.arch.bilateral import BBNNet, adaptor
from ltsearch.models import build_body
from ltsearch.trainer import Trainer


@pytest.mark.parametrize("schedule,formula", [
    ("parabolic_decay", lambda T, Tm: 1 - (T / Tm) ** 2),
    ("linear_decay", lambda T, Tm: 1 - T / Tm),
    ("cosine_decay", lambda T, Tm: math.cos(T / Tm * math.pi / 2)),
    ("parabolic_increment", lambda T, Tm: (T / Tm) ** 2),
    ("equal", lambda T, Tm: 0.5),
])
def test_adaptor_schedules(schedule, formula):
    for T in (1, 37, 100, 150, 200):
        assert adaptor(schedule, T, 200) == pytest.approx(formula(T, 200))
    assert adaptor("parabolic_decay", 100, 200) == pytest.approx(0.75)


def test_separated_schedule():
    assert [adaptor("separated", T, 200, switch_epoch=120) for T in (1, 120, 121, 200)] == [1, 1, 0, 0]


def test_beta_schedule_draws_per_step(digits_data):
    t = Trainer(make_config({"name": "bbn", "arch": {"schedule": "beta", "beta_a": 0.5}}), digits_data)
    phase = t.phases[0]
    t.method.start_epoch(phase, 0, 4000, np.random.default_rng(7))
    alphas = t.method.arch.alphas.numpy()
    np.testing.assert_allclose(alphas, np.random.default_rng(7).beta(0.5, 0.5, 4000), rtol=1e-6)
    assert alphas.mean() == pytest.approx(0.5, abs=0.03)  # Beta(a, a) has mean ½
    assert alphas.var() == pytest.approx(1 / (4 * (2 * 0.5 + 1)), rel=0.1)  # var = 1/(4(2a+1))


def _bbn(arch, classes):
    body, dim = build_body(arch, 3)
    return BBNNet(body, build_body(arch, 3)[0], dim, classes), body


def test_trunk_is_shared_and_branches_are_not():
    net, body = _bbn("resnet32", 10)
    stem, stage1, stage2, stage3 = body
    dim = 64
    trunk_ids = {id(p) for p in net.trunk.parameters()}
    expected = {id(p) for m in (stem, stage1, stage2, *stage3[:4]) for p in m.parameters()}
    assert trunk_ids == expected
    c = {id(p) for p in net.branch_c.parameters()}
    r = {id(p) for p in net.branch_r.parameters()}
    assert c and r and not (c & r) and not (c & trunk_ids) and not (r & trunk_ids)
    assert net.branch_c is stage3[4]
    for a, b in zip(net.branch_c.parameters(), net.branch_r.parameters()):
        assert a.shape == b.shape
    # Both branches' gradients flow into the same trunk tensors.
    x = torch.randn(4, 3, 32, 32)
    net(x, x, torch.tensor(0.3)).sum().backward()
    assert all(p.grad is not None for p in net.trunk.parameters())
    assert net.classifier.in_features == 2 * dim


def test_torchvision_body_splits_too():
    net, body = _bbn("resnet18", 5)
    assert net.branch_c is body[-1][-1] and net.classifier.in_features == 1024
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 5)


def test_mixed_logits_formula():
    torch.manual_seed(0)
    net, _ = _bbn("resnet32", 10)
    net.eval()
    dim = 64
    x_c, x_r = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    alpha = 0.3
    with torch.no_grad():
        f_c, f_r = net.branch_features(x_c, x_r)
        W_c, W_r = net.classifier.weight[:, :dim], net.classifier.weight[:, dim:]
        # classifier on [2α·f_c, 2(1−α)·f_r]: the factor 2 is absorbed into W (Eq. 2)
        expected = 2 * alpha * f_c @ W_c.T + 2 * (1 - alpha) * f_r @ W_r.T + net.classifier.bias
        z = net(x_c, x_r, torch.tensor(alpha))
        torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(net.mix(f_c, f_r, alpha), expected, rtol=1e-4, atol=1e-4)
        # inference: α = ½ on the same image through both branches
        f_c, f_r = net.branch_features(x_c, x_c)
        torch.testing.assert_close(net(x_c), f_c @ W_c.T + f_r @ W_r.T + net.classifier.bias,
                                   rtol=1e-4, atol=1e-4)


def test_bbn_samplers_uniform_and_reversed(digits_data):
    t = Trainer(make_config({"name": "bbn"}), digits_data)
    conv, rebal = t.method.samplers(t.phases[0], 0)
    n = 100_000
    idx = rebal(n, torch.Generator().manual_seed(0))
    freq = np.bincount(t.train_set.y[idx].numpy(), minlength=10) / n
    counts = np.asarray(digits_data.counts, float)
    expected = (1 / counts) / (1 / counts).sum()
    assert np.all(np.abs(freq - expected) <= 5 * np.sqrt(expected * (1 - expected) / n))
    assert conv.sampler.name == "instance"
    balanced = Trainer(make_config({"name": "bbn", "arch": {"second_sampler": "balanced"}}), digits_data)
    assert balanced.method.samplers(balanced.phases[0], 0)[1].sampler.name == "balanced"


@pytest.mark.parametrize("schedule", ["parabolic_decay", "beta", "separated"])
def test_bbn_trains_on_digits(schedule, digits_data):
    cfg = make_config({"name": "bbn", "arch": {"schedule": schedule, "switch_epoch": 2,
                                               "beta_a": 1.0}}, train={"epochs": 4})
    result = Trainer(cfg, digits_data).fit()
    assert result.status == "finished"
    assert result.metrics["val/balanced_acc"] > 0.7  # 0.82–0.98 here; chance: 0.1
    alphas = [h["alpha"] for h in result.history]
    if schedule == "parabolic_decay":
        assert alphas == pytest.approx([1 - (T / 4) ** 2 for T in (1, 2, 3, 4)])
    if schedule == "separated":
        assert alphas == [1.0, 1.0, 0.0, 0.0]
    if schedule == "beta":  # drawn per step from Beta(1, 1): an epoch's mean is near ½, not fixed
        assert len(set(alphas)) == 4 and all(0.3 < a < 0.7 for a in alphas)


def test_bbn_preset():
    from ltsearch.runconfig import config_from_dict

    t = config_from_dict({"method": {"name": "bbn"}}).train  # the method preset brings it
    assert t.nesterov and t.milestones == [120, 160] and t.gamma == 0.01 and t.weight_decay == 2e-4


def test_bbn_with_any_branch_loss(digits_data):
    # ResNet-20: on the tests' ResNet-8 the reversed sampler and the balanced softmax together
    # over-correct to the tail within two epochs (0.5)
    cfg = make_config({"name": "bbn", "loss": {"name": "balanced_softmax"}},
                      model={"arch": "resnet20"})
    result = Trainer(cfg, digits_data).fit()
    assert result.status == "finished" and result.metrics["val/balanced_acc"] > 0.7  # 0.84 here
    plain = Trainer(make_config({"name": "bbn"}, model={"arch": "resnet20"}), digits_data).fit()
    assert [h["train/loss"] for h in result.history] != [h["train/loss"] for h in plain.history]
    assert result.metrics["test/confusion"] != plain.metrics["test/confusion"]


def test_bbn_loss_is_eq_3_alpha_on_the_conventional_target_one_minus_on_the_reversed(digits_data):
    """Zhou et al. 2020, Eq. 3: L = α·E(ẑ, y_c) + (1 − α)·E(ẑ, y_r), ẑ the mixed logits of the
    two branches' inputs; the step's α comes from the epoch's schedule."""
    import torch.nn.functional as F

    from ltsearch.recipes import Batch

    cfg = make_config({"name": "bbn", "arch": {"schedule": "parabolic_decay"}}, train={"epochs": 4})
    t = Trainer(cfg, digits_data)
    t.method.start_epoch(t.phases[0], 1, 3, np.random.default_rng(0))  # α = 1 − (2/4)² = 0.75
    g = torch.Generator().manual_seed(0)
    conv = Batch(*t.train_set.batch(torch.arange(0, 16), g))
    rebal = Batch(*t.train_set.batch(torch.arange(200, 216), g))
    loss = t.method.loss(t.model, [conv, rebal], t.phases[0], 1, 0)
    z = t.model(conv.x, rebal.x, torch.tensor(0.75))
    expected = 0.75 * F.cross_entropy(z, conv.y) + 0.25 * F.cross_entropy(z, rebal.y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert not torch.equal(conv.y, rebal.y)  # the two targets differ, so the weights matter

"""Samplers' class frequencies against theory; loss weights against their formulas."""
import math

import numpy as np
import pytest
import torch

from ltsearch.data.samplers import ClassIndex, make_sampler
from ltsearch.recipes.losses.focal import Focal, FocalParams
from ltsearch.recipes.losses.sigmoid import Sigmoid
from ltsearch.recipes.sampling import SamplerConfig, scheduled_sampler
from ltsearch.recipes.weights import class_weights, effective_number, objective

COUNTS = [400, 150, 60, 25, 10]


def _index():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]
    return ClassIndex(labels, len(COUNTS)), labels


def _check_frequencies(idx, labels, expected, n):
    freq = np.bincount(labels[idx].numpy(), minlength=len(COUNTS)) / n
    expected = np.asarray(expected, dtype=float)
    # 5 standard deviations of a binomial proportion: fails on a wrong p, not on chance.
    bound = 5 * np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(freq - expected) <= bound), (freq, expected, bound)


@pytest.mark.parametrize("name,theory", [
    ("balanced", lambda n: [1 / len(n)] * len(n)),
    ("sqrt", lambda n: [math.sqrt(c) / sum(map(math.sqrt, n)) for c in n]),
    ("reversed", lambda n: [(max(n) / c) / sum(max(n) / d for d in n) for c in n]),
])
def test_class_sampler_frequencies(name, theory):
    index, labels = _index()
    n = 200_000
    idx = make_sampler(name, index).draw(n, 0, 10, torch.Generator().manual_seed(0))
    _check_frequencies(idx, labels, theory(COUNTS), n)


def test_balanced_sampler_goes_round_the_classes_and_through_each_class_without_repeats():
    """As the official class-aware samplers: every C draws hold each class once, and the draws
    of a class go through all its images, in a shuffled order, before any repeats (drawing the
    image with replacement, 10 draws of a class of 10 images repeat one 65 % of the time)."""
    index, labels = _index()
    n = 2 * sum(COUNTS) + 7
    idx = make_sampler("balanced", index).draw(n, 0, 10, torch.Generator().manual_seed(0))
    classes = labels[idx]
    for r in range(n // len(COUNTS)):
        assert sorted(classes[r * 5:(r + 1) * 5].tolist()) == list(range(5))
    for c, count in enumerate(COUNTS):
        mine = idx[classes == c].tolist()
        assert len(mine) in (n // 5, n // 5 + 1)
        passes = [mine[i:i + count] for i in range(0, len(mine), count)]
        every = sorted(torch.nonzero(labels == c).flatten().tolist())
        assert all(sorted(p) == every for p in passes[:-1])  # each pass: all the class's images
        assert len(set(passes[-1])) == len(passes[-1])
        if len(passes) > 2:  # the tail classes: 25 and 10 images, 259 draws each
            assert passes[0] != passes[1]  # reshuffled for each pass
    again = make_sampler("balanced", index).draw(n, 0, 10, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)  # a function of the generator: resumes draw the same


def test_reversed_is_proportional_to_inverse_count():
    index, _ = _index()
    p = make_sampler("reversed", index).class_probs(0, 1).numpy()
    np.testing.assert_allclose(p * np.asarray(COUNTS), (p * np.asarray(COUNTS))[0], rtol=1e-6)


def test_progressive_moves_from_instance_to_balanced():
    index, labels = _index()
    s = make_sampler("progressive", index)
    inst = np.asarray(COUNTS) / sum(COUNTS)
    np.testing.assert_allclose(s.class_probs(0, 10).numpy(), inst, rtol=1e-6)
    half = 0.5 * inst + 0.5 / len(COUNTS)
    np.testing.assert_allclose(s.class_probs(5, 10).numpy(), half, rtol=1e-6)
    n = 200_000
    _check_frequencies(s.draw(n, 5, 10, torch.Generator().manual_seed(3)), labels, half, n)


def test_instance_sampler_is_a_permutation():
    index, labels = _index()
    idx = make_sampler("instance", index).draw(len(labels), 0, 1, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == list(range(len(labels)))


def test_effective_number_weights_match_formula():
    beta = 0.999
    e = effective_number(torch.tensor(COUNTS), beta)
    for n, en in zip(COUNTS, e.tolist()):
        assert en == pytest.approx((1 - beta ** n) / (1 - beta), rel=1e-9)
    w = class_weights(COUNTS, "effective", beta)
    raw = [(1 - beta) / (1 - beta ** n) for n in COUNTS]
    expected = [r * len(COUNTS) / sum(raw) for r in raw]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-6)
    assert float(w.sum()) == pytest.approx(len(COUNTS))


def test_other_weightings():
    inv = class_weights(COUNTS, "inverse").numpy()
    np.testing.assert_allclose(inv * COUNTS, (inv * COUNTS)[0], rtol=1e-6)
    sq = class_weights(COUNTS, "sqrt").numpy()
    np.testing.assert_allclose(sq * np.sqrt(COUNTS), (sq * np.sqrt(COUNTS))[0], rtol=1e-6)
    # β → 0 makes every effective number 1: no re-weighting.
    np.testing.assert_allclose(class_weights(COUNTS, "effective", 0.0).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="beta"):
        class_weights(COUNTS, "effective", 1.0)


def _focal(gamma):
    return Focal(FocalParams(gamma=gamma), torch.tensor(COUNTS, dtype=torch.float32))


def test_focal_loss_formula():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([0])
    w = torch.tensor([0.5, 1.0, 1.5])
    gamma = 2.0
    p = torch.sigmoid(logits[0])
    target = torch.tensor([1.0, 0.0, 0.0])
    p_t = target * p + (1 - target) * (1 - p)
    expected = (-(1 - p_t) ** gamma * torch.log(p_t)).sum() * w[0]
    assert float(objective(_focal(gamma), logits, [(y, 1.0)], w)) == pytest.approx(float(expected), rel=1e-5)
    # γ = 0 is the sigmoid loss: binary cross-entropy per class, written out, summed
    z = logits[0].tolist()
    bce = [-math.log(1 / (1 + math.exp(-v))) if c == 0 else -math.log(1 - 1 / (1 + math.exp(-v)))
           for c, v in enumerate(z)]
    hand = sum(bce) * float(w[0])
    sigmoid = Sigmoid(None, torch.tensor(COUNTS, dtype=torch.float32))
    assert float(objective(_focal(0.0), logits, [(y, 1.0)], w)) == pytest.approx(hand, rel=1e-6)
    assert float(objective(sigmoid, logits, [(y, 1.0)], w)) == pytest.approx(hand, rel=1e-6)


def test_focal_gradient_is_finite_when_saturated():
    logits = torch.tensor([[60.0, -60.0, -60.0]], requires_grad=True)
    loss = objective(_focal(0.5), logits, [(torch.tensor([0]), 1.0)])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_deferred_progressive_sampler_ramps_from_the_switch():
    """DRS with the progressive sampler: at the switch it starts from instance frequencies and
    reaches class-balanced at the end of the run (it used to ramp over the whole run, 80 %
    balanced already at the switch)."""
    index, _ = _index()
    cfg = SamplerConfig(name="instance", then="progressive", start=0.8)
    before = scheduled_sampler(cfg, index, 159, 200)
    assert before.sampler.name == "instance" and (before.epoch, before.total) == (159, 160)
    at = scheduled_sampler(cfg, index, 160, 200)
    assert at.sampler.name == "progressive" and (at.epoch, at.total) == (0, 40)
    inst = np.asarray(COUNTS) / sum(COUNTS)
    np.testing.assert_allclose(at.sampler.class_probs(at.epoch, at.total).numpy(), inst, rtol=1e-6)
    late = scheduled_sampler(cfg, index, 180, 200)
    half = 0.5 * inst + 0.5 / len(COUNTS)
    np.testing.assert_allclose(late.sampler.class_probs(late.epoch, late.total).numpy(), half,
                               rtol=1e-6)

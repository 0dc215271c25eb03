"""The CPU trainer's SGD against torch.optim.SGD, the optimizer of the papers' official code."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltsearch.optim import SGD


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, generator=g, requires_grad=True),
            torch.randn(3, generator=g, requires_grad=True),
            torch.randn(2, 2, generator=g, requires_grad=True),  # frozen: never gets a gradient
            torch.randn(5, generator=g, requires_grad=True)]


def _groups(ps):
    return [{"params": [ps[0], ps[2]]}, {"params": [ps[1], ps[3]], "weight_decay": 0.0}]


def _steps(opt, ps, n, seed):
    g = torch.Generator().manual_seed(seed)
    for k in range(n):
        for group in opt.param_groups:  # the trainer sets each epoch's lr in place
            group["lr"] = 0.1 / (k + 1)
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() ** 2 for i, p in enumerate(ps) if i != 2)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, False, 5e-4), (0.9, True, 2e-4), (0.0, False, 1e-3)])
def test_sgd_matches_torch_optim_bit_for_bit(momentum, nesterov, wd):
    a, b = _params(), _params()
    ref = torch.optim.SGD(_groups(a), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    ours = SGD(_groups(b), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    _steps(ref, a, 6, seed=1)
    _steps(ours, b, 6, seed=1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[2].grad is None and torch.equal(a[2], _params()[2])  # no gradient: untouched
    assert ours.param_groups[1]["weight_decay"] == 0.0 and ours.param_groups[0]["weight_decay"] == wd


@pytest.mark.parametrize("first", ["torch", "ours"])
def test_each_optimizer_resumes_the_others_state(first):
    """A checkpoint's optimizer state keeps torch.optim's layout: resuming from either gives the
    same parameters as an uninterrupted run."""
    make = {"torch": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
            "ours": lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)}
    second = "ours" if first == "torch" else "torch"
    straight = _params()
    opt = make[first](_groups(straight))
    _steps(opt, straight, 3, seed=2)
    _steps(opt, straight, 3, seed=3)

    resumed = _params()
    before = make[first](_groups(resumed))
    _steps(before, resumed, 3, seed=2)
    state = before.state_dict()
    after = make[second](_groups(resumed))
    after.load_state_dict(state)
    _steps(after, resumed, 3, seed=3)
    for x, y in zip(straight, resumed):
        assert torch.equal(x, y)


def test_a_state_for_other_parameter_groups_is_refused():
    ours = SGD(_groups(_params()), lr=0.1, momentum=0.9)
    other = SGD([{"params": _params()}], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="other parameter groups"):
        ours.load_state_dict(other.state_dict())


def test_cpu_training_does_not_import_torch_dynamo():
    """torch.optim imports torch._dynamo on first use (seconds per process): the CPU trainer,
    evaluation and a checkpoint round trip must not."""
    code = """
import sys, tempfile, torch
sys.path.insert(0, "tests")
from conftest import make_config
from ltsearch.data import build_data
from ltsearch.trainer import Trainer
cfg = make_config(train={"epochs": 1, "threads": 1})
t = Trainer(cfg, build_data(cfg.data), torch.device("cpu"))
t.fit()
with tempfile.TemporaryDirectory() as d:
    t.save(d + "/t.pt"); t.load(d + "/t.pt")
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"

"""SGD for the CPU trainer, without ``torch.optim``.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` the first time it is built or stepped
(its methods are wrapped in ``torch._disable_dynamo``). On a CPU that import costs 1.5–2.5 s
per process, more than a digits-LT trial's whole fixed cost, and a search's fresh workers pay it
together at its start. This class does the same arithmetic as ``torch.optim.SGD`` with
dampening 0 on the path PyTorch takes for CPU tensors (``_single_tensor_sgd``): L2 weight decay
added to the gradient, a momentum buffer started as a copy of the first step's gradient, then
``buf = momentum·buf + grad``, Nesterov's ``grad + momentum·buf`` when asked, ``p -= lr·step``.
Parameters without a gradient are skipped, as there. ``state_dict`` has ``torch.optim``'s
layout, so either optimizer resumes the other's checkpoint.
"""
from __future__ import annotations

import torch


class SGD:
    def __init__(self, groups: list[dict], *, lr: float, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov,
                    "weight_decay": weight_decay,
                    "dampening": 0.0}  # never used here; torch.optim.SGD reads it on resume
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.state: dict[torch.Tensor, dict] = {}

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad)
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                p.add_(grad, alpha=-lr)

    def state_dict(self) -> dict:
        index: dict[torch.Tensor, int] = {}
        groups = []
        for group in self.param_groups:
            ids = [index.setdefault(p, len(index)) for p in group["params"]]
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        saved = state["param_groups"]
        if [len(g["params"]) for g in saved] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("the saved optimizer state has other parameter groups than this one")
        by_index = {i: p for g, s in zip(self.param_groups, saved) for i, p in zip(s["params"], g["params"])}
        for group, s in zip(self.param_groups, saved):
            group.update({k: v for k, v in s.items() if k in ("lr", "momentum", "nesterov", "weight_decay")})
        self.state = {}
        for i, s in state["state"].items():
            p = by_index[int(i)]
            self.state[p] = {k: v.to(p.device, p.dtype) for k, v in s.items() if k == "momentum_buffer"}

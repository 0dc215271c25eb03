"""Weight balancing's second stage (Alshammari et al., "Long-Tailed Recognition via Weight
Balancing", CVPR 2022, §3–4): after a stage 1 with strong weight decay, fine-tune the classifier
alone with a class-balanced loss, strong weight decay and MaxNorm — each class's weight row is
projected back into a norm ball (projected gradient descent). As in the official
``MaxNorm_via_PGD``: the radius is set once at the stage start from the rows' norms,
r = min‖w_c‖ + thresh·(max‖w_c‖ − min‖w_c‖); a row above it is scaled to r; the bias is not
constrained; the projection runs after each epoch (``every: step`` after each step); defaults as
the official demo: 10 epochs, lr 0.01, weight decay 0.1, thresh 0.1, instance sampling, BatchNorm
in train mode. Deviation: the demo's class-balanced loss is binary cross-entropy on softmax
probabilities; here it is Cui et al.'s class-balanced softmax cross-entropy (β = 0.9999)."""
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ltsearch.config import spec
from ltsearch.recipes.protocol import STAGE2
from ltsearch.recipes.stage2.base import ClassifierStage, ClassifierStageParams
from ltsearch.recipes.sampling import SamplerName


def maxnorm_radius(weight: torch.Tensor, thresh: float) -> torch.Tensor:
    norms = weight.norm(dim=1)
    return norms.min() + thresh * (norms.max() - norms.min())


@torch.no_grad()
def maxnorm_project(weight: torch.Tensor, radius: torch.Tensor) -> None:
    """w_c ← w_c · min(1, r / ‖w_c‖), in place."""
    norms = weight.norm(dim=1, keepdim=True)
    weight.mul_(torch.where(norms > radius, radius / norms, torch.ones_like(norms)))


@dataclass
class MaxNormParams(ClassifierStageParams):
    epochs: int = spec(10, ge=1)
    lr: float = spec(0.01, gt=0.0)
    weight_decay: Optional[float] = spec(0.1, ge=0.0, doc="the official demo's 0.1")
    sampler: SamplerName = spec("instance", doc="weight balancing re-weights, it does not re-sample")
    weights: Optional[Literal["inverse", "sqrt", "effective"]] = spec(
        "effective", doc="the class-balanced loss's weights (β = 0.9999)")
    thresh: float = spec(0.1, ge=0.0, le=1.0, doc="radius between the smallest (0) and largest "
                                                  "(1) row norm at the stage start")
    every: Literal["epoch", "step"] = spec("epoch", doc="project after each epoch (official) "
                                                        "or after each step")


@STAGE2.register
class MaxNorm(ClassifierStage):
    name = "maxnorm"
    Params = MaxNormParams
    needs_linear_classifier = True

    def __init__(self, params, recipe):
        super().__init__(params, recipe)
        self.radius: Optional[torch.Tensor] = None
        self.weight = None

    def on_start(self, model, resumed):
        self.weight = model.classifier.weight
        if self.radius is None:
            self.radius = maxnorm_radius(self.weight.detach(), self.params.thresh)

    def after_step(self):
        if self.params.every == "step":
            maxnorm_project(self.weight, self.radius)

    def end_epoch(self):
        if self.params.every == "epoch":
            maxnorm_project(self.weight, self.radius)

    def state_dict(self):
        return {"radius": self.radius}

    def load_state_dict(self, state):
        self.radius = state.get("radius")

"""The second-stage part's shape: phases on frozen features after stage 1, and the hooks the
recipe forwards to it while they run. A stage declares its phases once; the epochs it adds are
derived from them (``extra_epochs``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from ltsearch.config import spec
from ltsearch.data.samplers import Draw, make_sampler
from ltsearch.recipes.protocol import LOSSES, Part, Phase, classifier_phase
from ltsearch.recipes.sampling import SamplerName
from ltsearch.recipes.weights import class_weights, objective


class Stage2(Part):
    needs_linear_classifier = False  # True: acts on weight norms, which a normed one divides out
    needs_conv_map = False  # True: reads the body's features as a convolutional map (CAMs)

    def __init__(self, params, recipe):
        self.params = params
        self.recipe = recipe

    @classmethod
    def phases(cls, params, train) -> list[Phase]:
        return []

    @classmethod
    def extra_epochs(cls, params, train) -> int:
        return sum(p.optim.epochs for p in cls.phases(params, train))

    @classmethod
    def nested_loss(cls, params) -> Optional[dict]:
        """A loss part given inside the stage's parameters (checked with the recipe)."""
        return getattr(params, "loss", None)

    def on_start(self, model, resumed: bool) -> None:
        pass

    def samplers(self, epoch: int, total: int) -> list[Draw]:
        return [Draw(make_sampler("instance", self.recipe.ctx.index), epoch, total)]

    def start_epoch(self, epoch, steps, rng) -> None:
        pass

    def loss(self, model, batches, epoch, step):
        raise NotImplementedError

    def logits(self, model, x):
        return model(x)

    def trainable(self) -> Optional[list]:
        """Parameters this stage trains instead of the classifier's (None: the classifier)."""
        return None

    def end_epoch(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class ClassifierStageParams:
    """What every classifier re-training stage shares."""
    epochs: int = spec(10, ge=1, doc="epochs on frozen features")
    lr: float = spec(0.1, gt=0.0, doc="initial lr (cosine to 0)")
    weight_decay: Optional[float] = spec(None, ge=0.0, doc="default: train.weight_decay")
    sampler: SamplerName = spec("balanced", doc="index sampler of the stage")
    loss: Optional[dict] = spec(None, doc="a loss part, e.g. {name: las}; default: ce")
    weights: Optional[Literal["inverse", "sqrt", "effective"]] = spec(
        None, doc="class weights of the stage's loss (β = 0.9999 for effective)")
    bn: Literal["update", "frozen"] = spec(
        "update", doc="update: BatchNorm statistics follow the stage's batches (the official "
                      "codes keep the network in train mode); frozen: stage 1's")
    scales: bool = spec(False, doc="also learn per-class logit scales (LWS), as MiSLAS does")


class ClassifierStage(Stage2):
    """Re-train the classifier on frozen features with its own sampler, loss and class weights;
    optionally with learnable per-class logit scales z_c·s_c (Kang et al. 2020's LWS), which
    MiSLAS (Zhong et al. 2021) trains together with the classifier."""
    learns_classifier = True

    def __init__(self, params, recipe):
        super().__init__(params, recipe)
        p, ctx = params, recipe.ctx
        loss = LOSSES.parse(p.loss or {"name": "ce"}, "method.stage2.loss")
        self.loss_fn = LOSSES.get(loss.name)(loss.params, ctx.counts_tensor)
        self.weights = (class_weights(ctx.counts, p.weights).to(ctx.device)
                        if p.weights is not None else None)
        self.scales = (torch.nn.Parameter(torch.ones(ctx.num_classes, device=ctx.device))
                       if p.scales or not self.learns_classifier else None)

    @classmethod
    def phases(cls, params, train):
        return [classifier_phase("stage2", params.epochs, params.lr, train, params.weight_decay,
                                 update_bn=params.bn == "update")]

    def trainable(self):
        if self.scales is None:
            return None
        own = list(self.recipe.model.classifier.parameters()) if self.learns_classifier else []
        return own + [self.scales]

    def samplers(self, epoch, total):
        return [Draw(make_sampler(self.params.sampler, self.recipe.ctx.index), epoch, total)]

    def loss(self, model, batches, epoch, step):
        b = batches[0]
        return objective(self.loss_fn, self.logits(model, b.x), [(b.y, 1.0)], self.weights)

    def inference(self):
        return {} if self.scales is None else {"logit_scales": self.scales.detach().cpu().tolist()}

    def logits(self, model, x):
        z = model(x)
        return z if self.scales is None else scaled_logits(z, self.scales)

    def state_dict(self):
        return {} if self.scales is None else {"scales": self.scales.detach().clone()}

    def load_state_dict(self, state):
        if self.scales is not None and "scales" in state:
            with torch.no_grad():
                self.scales.copy_(state["scales"])


def scaled_logits(logits: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """LWS: z_c · s_c, the bias scaled too (the official TauNormClassifier scales W·x + b)."""
    return logits * scales

"""Partial fine-tuning: the last ``blocks`` layer groups of the backbone train, the rest stay
frozen (LIFT's ``partial``, Shi et al. 2024 Fig. 10: the last blocks of the ViT). Layer groups
are the backbone's own depth order (:func:`ltsearch.models.layer_groups`: timm's group matcher —
a ViT's blocks, a ResNet's residual blocks — with the stem first and the final norm in the last)."""
from dataclasses import dataclass

from ltsearch.config import ConfigError, spec
from ltsearch.models import layer_groups
from ltsearch.recipes.finetune.base import FineTune, with_classifier
from ltsearch.recipes.protocol import FINETUNE


@dataclass
class PartialParams:
    blocks: int = spec(1, ge=1, doc="how many of the backbone's last layer groups train")


@FINETUNE.register
class Partial(FineTune):
    name = "partial"
    Params = PartialParams

    @classmethod
    def check(cls, params, backbone, key):
        if params.blocks >= backbone["groups"]:
            raise ConfigError(f"{key}.blocks", f"the backbone has {backbone['groups'] - 1} "
                              f"blocks after its stem; {params.blocks} would train all of it "
                              "(use finetune: full)")

    def trainable(self, model):
        groups = layer_groups(model.body)
        return with_classifier(model, [p for g in groups[-self.params.blocks:] for p in g])

"""Linear probing: the backbone frozen (weights and normalisation statistics, eval mode), only
the classifier trains (LIFT's "classifier-only" baseline, Shi et al. 2024 Table 1)."""
from ltsearch.recipes.finetune.base import FineTune
from ltsearch.recipes.protocol import FINETUNE


@FINETUNE.register
class Linear(FineTune):
    name = "linear"
    frozen_body = True

    def trainable(self, model):
        return list(model.classifier.parameters())

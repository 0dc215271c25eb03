"""cRT: classifier re-training (Kang et al., "Decoupling Representation and Classifier", ICLR
2020, §4): after stage 1, re-initialise the classifier and train it alone with class-balanced
sampling. The official code keeps the network in train mode, so BatchNorm statistics follow the
balanced batches (``bn: update``, the default here); ``bn: frozen`` keeps stage 1's. With
``reset: false``, ``scales: true``, ``loss: {name: las}`` and mixup in stage 1 this is MiSLAS's
second stage."""
from dataclasses import dataclass

from ltsearch.config import spec
from ltsearch.recipes.protocol import STAGE2
from ltsearch.recipes.stage2.base import ClassifierStage, ClassifierStageParams


@dataclass
class CRTParams(ClassifierStageParams):
    reset: bool = spec(True, doc="re-initialise the classifier first (cRT); false fine-tunes it")


@STAGE2.register
class CRT(ClassifierStage):
    name = "crt"
    Params = CRTParams

    def on_start(self, model, resumed):
        if self.params.reset and not resumed:
            model.classifier.reset_parameters()
            self.recipe.init_bias(model, self.loss_fn)

"""LWS: learnable weight scaling (Kang et al., ICLR 2020, §4): after stage 1, keep the classifier
and learn one scale per class, z_c = s_c · (w_c·f + b_c), on frozen features with class-balanced
sampling; the scales start at 1 (the official ``TauNormClassifier`` with ``fc`` frozen)."""
from ltsearch.recipes.protocol import STAGE2
from ltsearch.recipes.stage2.base import ClassifierStage, ClassifierStageParams


@STAGE2.register
class LWS(ClassifierStage):
    name = "lws"
    Params = ClassifierStageParams
    learns_classifier = False  # only the scales train

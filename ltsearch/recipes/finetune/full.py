"""Full fine-tuning: every parameter trains (training from scratch is this too)."""
from ltsearch.recipes.finetune.base import FineTune
from ltsearch.recipes.protocol import FINETUNE


@FINETUNE.register
class Full(FineTune):
    name = "full"
    any_arch = True  # trains everything: no part of the network to find

"""BitFit (Ben Zaken et al., ACL 2022): only the backbone's bias terms train (§3, "we freeze
all the weights and fine-tune only the bias terms"), here with the normalisation layers'
scales too when ``norms`` (LIFT's bias + LN tuning, Shi et al. 2024 Table 6)."""
from dataclasses import dataclass

import torch.nn as nn

from ltsearch.config import spec
from ltsearch.recipes.finetune.base import FineTune, with_classifier
from ltsearch.recipes.protocol import FINETUNE

NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class BitFitParams:
    norms: bool = spec(True, doc="also the normalisation layers' scales (weights)")


@FINETUNE.register
class BitFit(FineTune):
    name = "bitfit"
    Params = BitFitParams

    def trainable(self, model):
        chosen = []
        for module in model.body.modules():
            for pname, p in module.named_parameters(recurse=False):
                if pname == "bias" or (self.params.norms and isinstance(module, NORMS)):
                    chosen.append(p)
        return with_classifier(model, chosen)

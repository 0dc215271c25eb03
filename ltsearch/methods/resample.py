"""Class re-sampling with plain cross-entropy (samplers in :mod:`ltsearch.data.samplers`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ltsearch.methods.base import Method, register


@dataclass
class ResampleParams:
    sampler: Literal["balanced", "sqrt", "progressive", "reversed"] = "balanced"


@register
class Resample(Method):
    name = "resample"
    Params = ResampleParams

    def samplers(self, phase, epoch):
        return [self.sampler(self.params.sampler)]

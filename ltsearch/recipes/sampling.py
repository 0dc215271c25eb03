"""The sampler part and its schedule: one sampler, or a switch to another from a given epoch
(deferred re-sampling, DRS: Cao et al., NeurIPS 2019, §3.2). Samplers live in
:mod:`ltsearch.data.samplers`; a progressive sampler switched on mid-run ramps from the switch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ltsearch.config import EPOCH_AT_DOC, ConfigError, EpochAt, resolve_epoch, spec
from ltsearch.data.samplers import SAMPLERS, ClassIndex, Draw, make_sampler

SamplerName = Literal[tuple(SAMPLERS)]


@dataclass
class SamplerConfig:
    name: SamplerName = spec("instance", doc="the first (or only) sampler")
    then: Optional[SamplerName] = spec(None, doc="the sampler from ``start`` on (DRS)")
    start: EpochAt = spec("never", doc="the switch to ``then``: " + EPOCH_AT_DOC)

    def check(self):
        if self.then is not None and self.start == "never":
            raise ConfigError("start", "give the epoch (or fraction) to switch to sampler.then")
        if self.then is None and self.start != "never":
            raise ConfigError("then", "name the sampler to switch to at sampler.start")


def scheduled_sampler(cfg: SamplerConfig, index: ClassIndex, epoch: int, total: int) -> Draw:
    """The sampler of 0-based ``epoch`` of ``total``, with its own epoch count."""
    switch = resolve_epoch(cfg.start, total) if cfg.then is not None else None
    if switch is None or epoch < switch:
        return Draw(make_sampler(cfg.name, index), epoch, total if switch is None else switch)
    return Draw(make_sampler(cfg.then, index), epoch - switch, total - switch)

"""Feature-space augmentation for long-tailed data (Chu, Bian, Liu, Ling, ECCV 2020).

Stage 1 trains the network with any single-branch recipe. Stage 2 freezes the feature extractor and
fine-tunes the classifier on real features mixed with new tail samples made in feature space:
- class activation map of class c on a feature map f: M_c = Σ_k w_k^c f_k, min–max normalised
  per image (Zhou et al. 2016; Chu et al. §3.2), with w^c the stage-1 classifier row;
- class-specific part f ⊙ 1[M_c ≥ τs], class-generic part f ⊙ 1[M_c ≤ τg] (0 < τg < τs < 1);
- for each tail class its k confusing head classes: the head classes with the highest mean
  softmax confidence of the stage-1 model on that tail class's training images (§3.3);
- a new sample: the tail image's specific part, filled with a confusing head image's generic part
  where the tail mask is off, pooled, and labelled with **the tail image's own class** (§3.4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ltsearch.config import ConfigError, spec
from ltsearch.data.samplers import Draw, Sampler, make_sampler
from ltsearch.recipes.protocol import STAGE2, classifier_phase
from ltsearch.recipes.stage2.base import Stage2


def class_activation_map(fmap: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """M_c(x, y) = Σ_k w_k^c f_k(x, y) for each image's class c, min–max normalised to [0, 1]."""
    cam = torch.einsum("nkhw,nk->nhw", fmap.float(), weight[classes].float())
    flat = cam.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    return (cam - lo) / (hi - lo).clamp_min(1e-12)


def split_masks(cam: torch.Tensor, tau_s: float, tau_g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(specific, generic) masks of shape (N, 1, H, W): 1[M ≥ τs] and 1[M ≤ τg]."""
    return (cam >= tau_s).unsqueeze(1).float(), (cam <= tau_g).unsqueeze(1).float()


def fuse(f_tail, cam_tail, f_head, cam_head, tau_s: float, tau_g: float) -> torch.Tensor:
    """Tail-specific part plus head-generic part where the tail's specific mask is off."""
    spec_t, _ = split_masks(cam_tail, tau_s, tau_g)
    _, gen_h = split_masks(cam_head, tau_s, tau_g)
    return f_tail * spec_t + f_head * gen_h * (1 - spec_t)


def tail_classes(counts: list[int], fraction: Optional[float] = 0.5, share: Optional[float] = None,
                 count: Optional[int] = None) -> list[int]:
    """Tail classes: those under ``count`` images, or holding under ``share`` of all images, or by
    default the rarest ``fraction`` of the classes (ties broken by label). The default works on
    any data: CIFAR-100-LT's classes each hold under 5 % of the images, so a share rule made every
    class a tail class there."""
    if count is not None:
        return [c for c, n in enumerate(counts) if n < count]
    if share is not None:
        total = sum(counts)
        return [c for c, n in enumerate(counts) if n < share * total]
    k = max(1, int(fraction * len(counts) + 0.5))
    return sorted(sorted(range(len(counts)), key=lambda c: (counts[c], c))[:k])


@torch.no_grad()
def confusing_head_classes(probs: torch.Tensor, labels: torch.Tensor, tails: list[int],
                           heads: list[int], k: int) -> torch.Tensor:
    """(len(tails), k) head classes with the highest mean confidence on each tail class's images."""
    heads_t = torch.as_tensor(heads, device=probs.device)
    rows = []
    for t in tails:
        mean_conf = probs[labels == t][:, heads_t].mean(dim=0)
        rows.append(heads_t[torch.topk(mean_conf, k).indices])
    return torch.stack(rows)


class TailSampler(Sampler):
    """Class-balanced over tail classes only."""
    name = "tail"

    def __init__(self, index, tails):
        super().__init__(index)
        self.p = torch.zeros(index.num_classes, device=index.counts.device)
        self.p[tails] = 1.0 / len(tails)

    def class_probs(self, epoch, total_epochs):
        return self.p


@dataclass
class FeatureAugParams:
    tau_s: float = spec(0.6, gt=0.0, lt=1.0, doc="class-specific threshold τs")
    tau_g: float = spec(0.3, gt=0.0, lt=1.0, doc="class-generic threshold τg (< τs)")
    k: int = spec(3, ge=1, doc="confusing head classes per tail class")
    aug_per_tail: int = spec(2, ge=1, doc="fused samples per tail image")
    tail_fraction: float = spec(0.5, gt=0.0, lt=1.0, doc="tail: the rarest fraction of classes")
    tail_share: Optional[float] = spec(None, gt=0.0, lt=1.0,
                                       doc="tail instead: classes under this share of images")
    tail_count: Optional[int] = spec(None, ge=1, doc="tail instead: classes under this many images")
    epochs: int = spec(10, ge=1, doc="stage-2 epochs")
    lr: float = spec(0.01, gt=0.0, doc="stage-2 lr (cosine to 0)")

    def check(self):
        if not self.tau_g < self.tau_s:
            raise ConfigError("tau_g", f"must be below tau_s ({self.tau_s}), got {self.tau_g}")
        if self.tail_share is not None and self.tail_count is not None:
            raise ConfigError("tail_count", "give tail_share or tail_count, not both")

    def check_counts(self, counts: list[int]) -> None:
        """The tail split must leave at least one tail class and ``k`` head classes on the data:
        checked before a search starts (every corner of its space) and when a run builds it."""
        rule, value = next((r, v) for r, v in (("tail_count", self.tail_count),
                                               ("tail_share", self.tail_share),
                                               ("tail_fraction", self.tail_fraction))
                           if v is not None)
        tails = tail_classes(counts, self.tail_fraction, self.tail_share, self.tail_count)
        heads = len(counts) - len(tails)
        on_data = f"on this data ({len(counts)} classes of {max(counts)} down to {min(counts)} images)"
        if not tails:
            raise ConfigError(rule, f"{rule}={value} leaves no tail class {on_data}")
        if heads == 0:
            raise ConfigError(rule, f"{rule}={value} leaves 0 head classes {on_data}; "
                                    f"feature_aug fuses each tail class with k={self.k} head classes")
        if heads < self.k:
            raise ConfigError("k", f"needs {self.k} head classes; the tail split leaves {heads} "
                                   f"({rule}={value}, {on_data})")

    @staticmethod
    def check_ranges(ranges: dict) -> None:
        """In a search space every τg must lie below every τs, so no sampled pair is invalid."""
        defaults = FeatureAugParams()
        s_lo = ranges.get("tau_s", (defaults.tau_s,) * 2)[0]
        g_hi = ranges.get("tau_g", (defaults.tau_g,) * 2)[1]
        if not g_hi < s_lo:
            raise ConfigError("tau_g", f"range reaches {g_hi}, not below the lowest tau_s {s_lo}; "
                                       "τg < τs must hold for every sampled pair")


@STAGE2.register
class FeatureAug(Stage2):
    name = "feature_aug"
    needs_conv_map = True
    Params = FeatureAugParams

    def __init__(self, params, recipe):
        super().__init__(params, recipe)
        ctx = recipe.ctx
        self.ctx = ctx
        self.tails = tail_classes(ctx.counts, params.tail_fraction, params.tail_share,
                                  params.tail_count)
        self.heads = [c for c in range(ctx.num_classes) if c not in self.tails]
        # row of each tail class in ``confusing`` (−1 for head classes)
        self.tail_slot = torch.full((ctx.num_classes,), -1, dtype=torch.long, device=ctx.device)
        self.tail_slot[self.tails] = torch.arange(len(self.tails), device=ctx.device)
        self.confusing: torch.Tensor | None = None
        self.cam_weight: torch.Tensor | None = None
        self.model = None

    @classmethod
    def phases(cls, params, train):
        return [classifier_phase("stage2", params.epochs, params.lr, train)]

    @torch.no_grad()
    def on_start(self, model, resumed):
        self.model = model
        if resumed:
            return
        data = self.ctx.train
        model.eval()
        probs = []
        for i in range(0, len(data), 1024):
            x, _ = data.batch(torch.arange(i, min(i + 1024, len(data)), device=data.y.device),
                              augment=False)
            probs.append(model(x).float().softmax(1))
        self.confusing = confusing_head_classes(torch.cat(probs), data.y, self.tails, self.heads,
                                                self.params.k)
        self.cam_weight = model.classifier.weight.detach().clone()

    def samplers(self, epoch, total):
        return [Draw(make_sampler("instance", self.ctx.index), epoch, total),
                Draw(TailSampler(self.ctx.index, self.tails), epoch, total)]

    def loss(self, model, batches, epoch, step):
        real, tail = batches
        feats, labels = self.augmented_features(real, tail)
        logits = self.model.classifier(feats.mean(dim=(2, 3)))
        return F.cross_entropy(logits.float(), labels)

    @torch.no_grad()
    def fused_samples(self, tail_x, tail_y, gen=None):
        """Feature maps of ``aug_per_tail`` new samples per tail image, and their labels."""
        p = self.params
        a = p.aug_per_tail
        rows = self.tail_slot[tail_y]
        pick = torch.randint(0, p.k, (len(tail_y), a), device=tail_y.device, generator=gen)
        head_y = self.confusing[rows].gather(1, pick).flatten()  # (n·a,)
        head_idx = self.ctx.index.draw_in_classes(head_y, gen)
        head_x, _ = self.ctx.train.batch(head_idx, gen)
        f_t = self.model.features(tail_x).float()
        f_h = self.model.features(head_x).float()
        cam_t = class_activation_map(f_t, self.cam_weight, tail_y)
        cam_h = class_activation_map(f_h, self.cam_weight, head_y)
        rep = lambda t: t.repeat_interleave(a, dim=0)  # noqa: E731
        fused = fuse(rep(f_t), rep(cam_t), f_h, cam_h, p.tau_s, p.tau_g)
        return fused, rep(tail_y)

    def augmented_features(self, real, tail):
        n_tail = max(1, len(tail.y) // 4)
        with torch.no_grad():
            f_real = self.model.features(real.x).float()
        fused, fused_y = self.fused_samples(tail.x[:n_tail], tail.y[:n_tail], self.ctx.generator)
        return torch.cat([f_real, fused]), torch.cat([real.y, fused_y])

    def state_dict(self):
        return {"confusing": self.confusing, "cam_weight": self.cam_weight}

    def load_state_dict(self, state):
        self.confusing = state.get("confusing")
        self.cam_weight = state.get("cam_weight")

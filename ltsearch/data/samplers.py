"""Index generators on the device: one call draws a whole epoch of indices.

Class-level samplers pick a class c with probability p_c, then an image of that class uniformly:
- class-balanced: p_c = 1/C, drawn as the official class-aware samplers do (classifier-balancing's
  ``data/ClassAwareSampler.py``, MiSLAS's ``datasets/sampler.py``): classes in round-robin over
  an order shuffled every C draws, each class's images cycled in an order shuffled each time they
  are used up, so every image of a class appears before any repeats;
- square-root: p_c ∝ n_c^½ (Mahajan et al. 2018);
- reversed: p_c ∝ w_c = n_max / n_c, i.e. ∝ 1/n_c (BBN, Zhou et al. 2020, Eq. 1);
- progressive: p_c(t) = (1 − t/T)·n_c/N + (t/T)·1/C (Kang et al., ICLR 2020), t the epoch.
The instance sampler shuffles the whole set (p_c = n_c / N, without replacement).

Deviations: an epoch draws as many images as the set holds (the official class-aware sampler:
C · n_max), and the cycles start afresh each epoch (randomness comes from (seed, epoch), so a
resumed run draws what an uninterrupted one does). The other class-level samplers draw the image
with replacement, as BBN's reversed sampler does (``random.choice`` in its ``imbalance_cifar.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class ClassIndex:
    """Indices sorted by class with per-class offsets, for O(1) 'an image of class c' draws."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        self.order = torch.argsort(labels, stable=True)
        self.counts = torch.bincount(labels, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.num_classes = num_classes
        self.size = len(labels)

    def draw_in_classes(self, classes: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        u = torch.rand(len(classes), device=classes.device, generator=gen)
        offset = (u * self.counts[classes]).long().clamp_max(self.counts[classes] - 1)
        return self.order[self.starts[classes] + offset]

    def cycle_in_classes(self, classes: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """An image for each class drawn: the k-th draw of class c takes the (k mod n_c)-th
        image of an order of c's images shuffled afresh for each pass over them."""
        device = classes.device
        counts = self.counts
        occurrences = torch.bincount(classes, minlength=self.num_classes)
        by_class = torch.argsort(classes, stable=True)
        rank = torch.empty_like(classes)  # how many earlier draws took the same class
        rank[by_class] = (torch.arange(len(classes), device=device)
                          - (torch.cumsum(occurrences, 0) - occurrences)[classes[by_class]])
        passes = -(-occurrences // counts)  # per class: how many shuffled orders it needs
        length = counts.repeat_interleave(passes)  # one segment per (class, pass)
        start = torch.cumsum(length, 0) - length
        segment = torch.arange(len(length), device=device).repeat_interleave(length)
        keys = torch.argsort(torch.rand(len(segment), device=device, generator=gen))
        shuffled = keys[torch.argsort(segment[keys], stable=True)] - start[segment]
        first_segment = torch.cumsum(passes, 0) - passes
        place = start[first_segment[classes] + rank // counts[classes]] + rank % counts[classes]
        return self.order[self.starts[classes] + shuffled[place]]


class Sampler:
    """Draws ``n`` training indices for 0-based ``epoch`` of ``total_epochs``."""
    name = "base"

    def __init__(self, index: ClassIndex):
        self.index = index

    def class_probs(self, epoch: int, total_epochs: int) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, n: int, epoch: int, total_epochs: int, gen: torch.Generator | None) -> torch.Tensor:
        p = self.class_probs(epoch, total_epochs)
        classes = torch.multinomial(p, n, replacement=True, generator=gen)
        return self.index.draw_in_classes(classes, gen)


class InstanceSampler(Sampler):
    name = "instance"

    def class_probs(self, epoch, total_epochs):
        return self.index.counts.float() / self.index.size

    def draw(self, n, epoch, total_epochs, gen):
        device = self.index.order.device
        reps = -(-n // self.index.size)
        perms = [torch.randperm(self.index.size, device=device, generator=gen) for _ in range(reps)]
        return torch.cat(perms)[:n]


class BalancedSampler(Sampler):
    name = "balanced"

    def class_probs(self, epoch, total_epochs):
        return torch.full((self.index.num_classes,), 1.0 / self.index.num_classes,
                          device=self.index.counts.device)

    def draw(self, n, epoch, total_epochs, gen):
        C = self.index.num_classes
        device = self.index.order.device
        rounds = [torch.randperm(C, device=device, generator=gen) for _ in range(-(-n // C))]
        return self.index.cycle_in_classes(torch.cat(rounds)[:n], gen)


class SqrtSampler(Sampler):
    name = "sqrt"

    def class_probs(self, epoch, total_epochs):
        w = self.index.counts.float().sqrt()
        return w / w.sum()


class ReversedSampler(Sampler):
    name = "reversed"

    def class_probs(self, epoch, total_epochs):
        counts = self.index.counts.float()
        w = counts.max() / counts
        return w / w.sum()


class ProgressiveSampler(Sampler):
    name = "progressive"

    def class_probs(self, epoch, total_epochs):
        t = epoch / total_epochs
        inst = self.index.counts.float() / self.index.size
        return (1 - t) * inst + t / self.index.num_classes


SAMPLERS = {cls.name: cls for cls in
            (InstanceSampler, BalancedSampler, SqrtSampler, ReversedSampler, ProgressiveSampler)}


def make_sampler(name: str, index: ClassIndex) -> Sampler:
    return SAMPLERS[name](index)


@dataclass
class Draw:
    """A sampler bound to its place in a schedule: epoch ``epoch`` of ``total`` (a progressive
    sampler switched on mid-run ramps from its switch, not from the run's start)."""
    sampler: Sampler
    epoch: int
    total: int

    def __call__(self, n: int, gen: torch.Generator | None) -> torch.Tensor:
        return self.sampler.draw(n, self.epoch, self.total, gen)

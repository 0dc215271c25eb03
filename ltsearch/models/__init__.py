"""Backbones exposing the last conv map (for CAMs) and the classifier separately.

A body is ``nn.Sequential(stem…, last_stage)`` whose last element is itself a Sequential of
residual blocks, so BBN can share everything but the last block (:func:`split_last_block`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ltsearch.models.resnet_cifar import DEPTHS, cifar_resnet_body


def torchvision_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet without pretrained weights (none can be downloaded here)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                         net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


CIFAR_RESNETS = {f"resnet{d}": d for d in DEPTHS}  # resnet18/34/50 are torchvision's (ImageNet's)


def build_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    if arch in CIFAR_RESNETS:
        return cifar_resnet_body(CIFAR_RESNETS[arch], in_channels)
    return torchvision_body(arch, in_channels)


def split_last_block(body: nn.Sequential) -> tuple[nn.Sequential, nn.Module]:
    """(trunk, last residual block): the trunk holds the body's modules themselves, not copies."""
    last_stage = body[-1]
    trunk = nn.Sequential(*body[:-1], *last_stage[:-1])
    return trunk, last_stage[-1]


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW's code: z_c = ⟨x/‖x‖, w_c/‖w_c‖⟩, no bias. The official
    ``NormedLinear`` stores W as (in, out) and normalises columns; here rows of (out, in), the same
    map, so class activation maps and per-class norms read ``weight[c]`` as for ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform(−1, 1), each class vector then scaled to norm 1 (the official
        ``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``)."""
        with torch.no_grad():
            nn.init.uniform_(self.weight, -1.0, 1.0)
            self.weight.div_(self.weight.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T


CLASSIFIERS = {"linear": nn.Linear, "normed": NormedLinear}


class ImageClassifier(nn.Module):
    """body → global average pool → classifier (linear, or LDAM's normed one)."""

    def __init__(self, body: nn.Sequential, feat_dim: int, num_classes: int,
                 classifier: str = "linear"):
        super().__init__()
        self.body = body
        self.classifier = CLASSIFIERS[classifier](feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional map (N, C_f, H, W), the input of a class activation map."""
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

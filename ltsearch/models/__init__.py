"""Backbones exposing the last conv map (for CAMs) and the classifier separately.

A body is ``nn.Sequential(stem…, last_stage)`` whose last element is itself a Sequential of
residual blocks, so BBN can share everything but the last block (:func:`split_last_block`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ltsearch.models.resnet_cifar import resnet32_body


def torchvision_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    """A torchvision ResNet without pretrained weights (none can be downloaded here)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                         net.layer1, net.layer2, net.layer3, net.layer4)
    return body, net.fc.in_features


def build_body(arch: str, in_channels: int) -> tuple[nn.Sequential, int]:
    if arch == "resnet32":
        return resnet32_body(in_channels)
    return torchvision_body(arch, in_channels)


def split_last_block(body: nn.Sequential) -> tuple[nn.Sequential, nn.Module]:
    """(trunk, last residual block): the trunk holds the body's modules themselves, not copies."""
    last_stage = body[-1]
    trunk = nn.Sequential(*body[:-1], *last_stage[:-1])
    return trunk, last_stage[-1]


class ImageClassifier(nn.Module):
    """body → global average pool → linear classifier."""

    def __init__(self, body: nn.Sequential, feat_dim: int, num_classes: int):
        super().__init__()
        self.body = body
        self.classifier = nn.Linear(feat_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last convolutional map (N, C_f, H, W), the input of a class activation map."""
        return self.body(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))

"""The CIFAR ResNets (He et al., CVPR 2016, §4.2): depth 6n+2, 3 stages × n basic blocks,
16/32/64 channels, option-A (zero-padding identity) shortcuts. ResNet-32 (n = 5, ≈0.46 M
parameters) is the LDAM-DRW / BBN / MiSLAS backbone; the paper's table also trains 20, 44, 56
and 110, and ResNet-8 (n = 1, ≈0.08 M) is the smallest of the family: quick runs on tiny data."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


DEPTHS = (8, 20, 32, 44, 56, 110)  # the paper's table, and ResNet-8


def cifar_resnet_body(depth: int, in_channels: int = 3) -> tuple[nn.Sequential, int]:
    """ResNet-``depth``'s convolutional body as Sequential(stem, stage1, stage2, stage3) and its
    width (64)."""
    if depth not in DEPTHS:
        raise ValueError(f"a CIFAR ResNet is one of depths {DEPTHS}, not {depth}")
    blocks = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                         nn.ReLU(inplace=True))
    stages, in_planes = [], 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        layers = []
        for i in range(blocks):
            layers.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
            in_planes = planes
        stages.append(nn.Sequential(*layers))
    body = nn.Sequential(stem, *stages)
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
    return body, 64

"""ResNet-32 for CIFAR (He et al., CVPR 2016, §4.2): 3 stages × 5 basic blocks, 16/32/64 channels,
option-A (zero-padding identity) shortcuts, ≈0.46 M parameters — the LDAM-DRW / BBN backbone."""
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


def resnet32_body(in_channels: int = 3, blocks: int = 5) -> tuple[nn.Sequential, int]:
    """The convolutional body as Sequential(stem, stage1, stage2, stage3) and its width (64)."""
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

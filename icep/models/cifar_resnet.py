"""CIFAR ResNets (He et al. 2016, section 4.2): three stages of BasicBlocks, widths 16/32/64, depth 6n+2.

Two shortcuts where a stage changes the shape (``shortcut``):

- ``A``, He et al.'s CIFAR choice and the ICE reference code's (METHOD.md section 7): the input is
  subsampled by 2 and the new channels are zeros. No parameters: ResNet-152 has 2,408,474. The
  model is then the reference's, init included (Kaiming normal, fan-in, on every conv and the
  classifier), and loads its checkpoints, whose classifier is named ``linear``.
- ``B``, a 1x1 conv and a BatchNorm (ResNet-152: 2,411,226 parameters), icep's first model.

Pruning is the same with both: the units are the blocks' ``conv1`` (the shortcut carries the
residual width, which no unit cuts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (20, 32, 44, 56, 110, 152)
SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A: every second pixel, and ``pad`` zero channels on each side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(planes // 4)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    # Checkpoint keys of the reference code's model, renamed to this one's on loading.
    state_dict_aliases = {"linear.": "fc."}

    def __init__(
        self, depth: int = 56, num_classes: int = 10, in_channels: int = 3, shortcut: str = "B"
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (e.g. {DEPTHS}), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        n = (depth - 2) // 6
        self.shortcut = shortcut
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if shortcut == "A" and isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)  # the reference's init
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s, self.shortcut))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)

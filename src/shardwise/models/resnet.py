"""ResNet-18 for 32x32 images (CIFAR-10 / Fashion-MNIST padded to 32x32), in plain torch.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (arXiv:1512.03385), adapted to
CIFAR the way most optimizer papers (and this project's original comparison) use it: the ImageNet
stem (7x7 stride-2 conv + 3x3 max-pool) is replaced by one 3x3 stride-1 conv, so a 32x32 input keeps its
resolution into the first stage. Stages of [2, 2, 2, 2] BasicBlocks with widths 64, 128, 256, 512
(times `width`), strides 1, 2, 2, 2, then global average pooling and one linear layer:

    32x32x3 -> conv3x3(64w) -> 32x32 -> 16x16 -> 8x8 -> 4x4x512w -> avgpool -> fc(num_classes)

A BasicBlock computes y = relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), where the shortcut is the
identity, or a 1x1 strided conv + BN when the shape changes (option B of the paper).

At width=1.0 this is the 11.17M-parameter network of the table (kuangliu/pytorch-cifar layout);
`width` scales every channel count (rounded, at least 1) for CPU-sized tests: width=0.125 has
~0.18M parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNet", "ResNetConfig", "resnet18"]


@dataclass
class ResNetConfig:
    """The ``model`` section of the CIFAR recipe."""

    width: float = 1.0  # channel multiplier: 1.0 = ResNet-18 (11.2M params), 0.125 = 0.18M
    channels_last: bool = False  # NHWC activations: ~1.3x faster convolutions on CPU (oneDNN) and AMP GPUs


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and a residual connection (He et al. 2016, Fig. 2 left)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pool, four stages, global average pool, linear head."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (2, 2, 2, 2),
        num_classes: int = 10,
        width: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"Invalid width multiplier: {width}")
        if num_classes < 1:
            raise ValueError(f"Invalid num_classes: {num_classes}")
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        for i, (planes, n) in enumerate(zip(widths, num_blocks, strict=True)):
            stages.append(self._make_stage(planes, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(widths[-1] * BasicBlock.expansion, num_classes)
        self._init_weights()

    def _make_stage(self, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = []
        for s in [stride] + [1] * (n - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Kaiming-normal (fan_out) convs and unit BN, as torchvision's ResNet; the linear layer keeps
        # torch's default init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet18(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs: BasicBlock x [2, 2, 2, 2]; `width` scales every channel count."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)

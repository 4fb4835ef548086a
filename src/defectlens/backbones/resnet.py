"""ResNet18 and Wide-ResNet50-2 in plain PyTorch, torchvision module layout.

Module names match torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``) so a
torchvision state dict loads with ``strict=True``. No weights are bundled: the user names a
local file. Input normalization: ImageNet mean / std.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.tapping import tap_layers

NUM_CLASSES = 1000
STEM_CHANNELS = 64
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions + residual. (N, C_in, H, W) -> (N, planes, H / s, W / s)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        del width_per_group  # only Bottleneck blocks can be widened
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as torchvision v1.5), 1x1 expand x4 + residual.

    (N, C_in, H, W) -> (N, 4 * planes, H / s, W / s). ``width_per_group`` 128 = wide ResNet.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, width_per_group: int) -> None:
        super().__init__()
        width = planes * width_per_group // 64
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _downsample(in_channels, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity, inplace=True)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """1x1 projection of the shortcut when the shape changes, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """torchvision-layout ResNet. ``forward``: (N, 3, H, W) normalized -> (N, 1000) logits.

    Feature points: ``layer1`` (stride 4) ... ``layer4`` (stride 32); see ``feature_points``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        repeats: tuple[int, int, int, int],
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        self.block = block
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_CHANNELS)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = STEM_CHANNELS
        for name, planes, stride, repeat in zip(LAYER_NAMES, STAGE_PLANES, STAGE_STRIDES, repeats):
            blocks: list[nn.Module] = []
            for repeat_index in range(repeat):
                blocks.append(
                    block(in_channels, planes, stride if repeat_index == 0 else 1, width_per_group)
                )
                in_channels = planes * block.expansion
            self.add_module(name, nn.Sequential(*blocks))
        self.fc = nn.Linear(in_channels, NUM_CLASSES)

    def _stem(self, images: Tensor) -> Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(images)), inplace=True))

    def forward_features(self, images: Tensor, layer_names: Sequence[str]) -> dict[str, Tensor]:
        """Run only as far as the deepest requested layer.

        images: (N, 3, H, W), already normalized. Returns {layer name: (N, C, h, w)}.
        """
        return tap_layers(self._stem(images), ((name, getattr(self, name)) for name in LAYER_NAMES), layer_names)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalized images -> (N, 1000) ImageNet logits."""
        x = self._stem(images)
        for name in LAYER_NAMES:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def feature_points(expansion: int) -> tuple[tuple[str, int, int], ...]:
    """All layers features can be taken from, in forward order: (name, stride, channels)."""
    points = []
    stride = 2 * 2  # conv1 and maxpool
    for name, planes, stage_stride in zip(LAYER_NAMES, STAGE_PLANES, STAGE_STRIDES):
        stride *= stage_stride
        points.append((name, stride, planes * expansion))
    return tuple(points)


def resnet18() -> ResNet:
    """Uninitialised ResNet18 (weights come from a user-named torchvision state dict)."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    """Uninitialised Wide-ResNet50-2 (weights come from a user-named torchvision state dict)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), width_per_group=128)

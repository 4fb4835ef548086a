"""The FPN decoder of the PET-preform study: an encoder inverted stage by stage to input resolution.

Shared by ``fpn_autoencoder`` (3 output channels: a reconstruction), ``fcdd_fpn`` (1 channel: the
FCDD map) and ``supervised_fpn`` (1 channel: defect logits).

    encoder levels f_0 ... f_L  (finest first; strides s_0 < ... < s_L, e.g. 2, 4, 8, 16, 32)
    x = f_L
    for l = L-1 ... 0:   x = ReLU(ConvT_l(x) + f_l)      ConvT_l: kernel 2r, stride r, padding r/2,
                                                         r = s_{l+1} / s_l (the stage it inverts)
    x = ReLU(ConvT_in(x))                                s_0 -> input resolution (no skip there)
    out = Conv3x3(x)                                     (N, out_channels, H, W), no activation

Runs in channels-last memory (faster on CPU). A level whose skip is switched off (``skips``) is not added: ``x = ReLU(ConvT_l(x))``. The
autoencoder can leave out the finest skips so that it cannot copy an anomaly through them.
Sizes that are not multiples of the strides work: each upsampled map is cropped to its skip's
size (the encoder rounds up) and the output to the input size.

With ``make_padding_circular_in_x`` (roll-out bands) every transposed convolution and the output
convolution wrap around in x (`backbones.features`).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from defectlens.backbones.features import make_padding_circular_in_x
from defectlens.backbones.registry import get_backbone_spec
from defectlens.errors import ConfigError
from defectlens.networks.encoder import PretrainedEncoder


def fpn_layers(backbone: str) -> list[str]:
    """The encoder levels of an FPN on ``backbone``: the last layer at each stride, finest first
    (EfficientNet-Lite0: _blocks.0, .2, .4, .10, .15 at strides 2, 4, 8, 16, 32)."""
    spec = get_backbone_spec(backbone)
    last_at_stride = {layer.stride: layer.name for layer in spec.layers}
    return [last_at_stride[stride] for stride in sorted(last_at_stride)]


class FPNDecoder(nn.Module):
    """Decodes encoder levels (finest first) to an (N, out_channels, H, W) map.

    Args:
        channels: channels of each encoder level, finest first.
        strides: input pixels per cell of each level, finest first; each stride a power-of-two
            multiple (x2, x4, ...) of the previous one, the first one >= 2.
        out_channels: channels of the output (3: an image, 1: a map or logits).
        skips: per level (finest first) whether its features are added; the deepest level is the
            start and always used. Default: every level.
        head_channels: channels of the last transposed convolution (the finest level's stride -> 1).
    """

    def __init__(
        self, channels: Sequence[int], strides: Sequence[int], out_channels: int,
        skips: Sequence[bool] | None = None, head_channels: int = 16,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ConfigError(f"FPNDecoder needs one stride per level, got channels {list(channels)}, strides {list(strides)}")
        ratios = [strides[0]] + [b // a for a, b in zip(strides, strides[1:])]
        if any(r < 2 or r & (r - 1) for r in ratios) or any(b % a for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"FPNDecoder strides must grow by powers of two from >= 2, got {list(strides)}")
        self.skips = tuple(bool(s) for s in skips) if skips is not None else (True,) * len(channels)
        if len(self.skips) != len(channels):
            raise ConfigError(f"skips needs one flag per level ({len(channels)}), got {list(self.skips)}")
        # up[l] inverts the stage from level l + 1 to level l; up_input the finest level's stride
        self.up = nn.ModuleList(
            _inverse_stage(channels[l + 1], channels[l], ratios[l + 1]) for l in range(len(channels) - 1)
        )
        self.up_input = _inverse_stage(channels[0], head_channels, ratios[0])
        self.head = nn.Conv2d(head_channels, out_channels, 3, padding=1)
        self.activation = nn.ReLU(inplace=True)
        self.to(memory_format=torch.channels_last)  # oneDNN's transposed convolutions: 1.5-4x faster on CPU

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """Encoder levels (N, C_l, h_l, w_l), finest first, -> (N, out_channels, *size)."""
        features = [level.contiguous(memory_format=torch.channels_last) for level in features]
        x = features[-1]
        for level in range(len(features) - 2, -1, -1):
            skip = features[level]
            x = _crop(self.up[level](x), skip.shape[-2:])
            x = self.activation(x + skip if self.skips[level] else x)
        x = self.activation(_crop(self.up_input(x), size))
        return self.head(x)


def _inverse_stage(in_channels: int, out_channels: int, ratio: int) -> nn.ConvTranspose2d:
    """A transposed convolution upsampling by ``ratio`` (kernel 2r, padding r/2: output r * w)."""
    return nn.ConvTranspose2d(in_channels, out_channels, 2 * ratio, stride=ratio, padding=ratio // 2)


def _crop(x: Tensor, size: Sequence[int]) -> Tensor:
    height, width = int(size[0]), int(size[1])
    if x.shape[-2] < height or x.shape[-1] < width:
        raise ConfigError(f"FPN decoder: an upsampled map {tuple(x.shape[-2:])} is smaller than {height}x{width}")
    return x[..., :height, :width]


def build_encoder_fpn(
    backbone: str, out_channels: int, *, weights: str | None = None, train_encoder: bool = False,
    skip_strides: Sequence[int] | None = None, circular_padding: bool = False, device: str = "cpu",
) -> tuple[PretrainedEncoder, FPNDecoder]:
    """A pretrained encoder at the `fpn_layers` of ``backbone`` and the FPN decoder inverting it.

    Args:
        backbone: a registered backbone name.
        out_channels: decoder output channels.
        weights: the backbone's state-dict file (None: bundled weights).
        train_encoder: the encoder is trained with the decoder (else frozen, eval mode).
        skip_strides: strides of the levels whose features are added (None: all).
        circular_padding: both wrap around in x (roll-out bands).
        device: where both live.
    """
    encoder = PretrainedEncoder(
        backbone, fpn_layers(backbone), weights=weights, trainable=train_encoder, circular_padding=circular_padding,
        device=device,
    )
    strides = encoder.strides
    if skip_strides is not None and not set(skip_strides) <= set(strides):
        raise ConfigError(f"skip_strides {list(skip_strides)} are not strides of {backbone}'s levels {strides}")
    skips = None if skip_strides is None else [stride in set(skip_strides) for stride in strides]
    decoder = FPNDecoder(encoder.channels, strides, out_channels, skips).to(device)
    if circular_padding:
        make_padding_circular_in_x(decoder)
    return encoder, decoder

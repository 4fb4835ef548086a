"""DRAEM's two sub-networks (Zavrtanik et al., ICCV 2021), as in the authors' ``model_unet.py``.

``ReconstructiveSubNetwork``  an encoder-decoder WITHOUT skip connections (so it cannot copy
                              an anomaly through): 5 encoder blocks (widths w, 2w, 4w, 8w, 8w,
                              max-pooling between them), 4 upsampling decoder blocks, a final
                              3x3 convolution. (N, 3, H, W) in [0, 1] -> (N, 3, H, W).
``DiscriminativeSubNetwork``  a U-Net on the input and its reconstruction concatenated: 6
                              encoder blocks (w, 2w, 4w, 8w, 8w, 8w), 5 decoder blocks with skip
                              connections, two output channels (normal / anomalous logits).
                              (N, 6, H, W) -> (N, 2, H, W).

Every block is conv3x3-BN-ReLU twice; upsampling is bilinear x2 (align_corners=True) followed
by conv3x3-BN-ReLU, as in the paper's code. The paper's widths are w = 128 (reconstructive) and
64 (discriminative); both are arguments here (heavy for a CPU). Inputs whose sides are not a
multiple of 2^depth are padded (replicate; wrap-around in x for periodic bands) and the output
cropped back, so any model-input size works.

`make_circular_in_x` turns both networks periodic in x for roll-out bands: every padded
convolution wraps around (`backbones.features.make_padding_circular_in_x`) and the bilinear
upsampling interpolates across the seam (`backbones.features.resize_bilinear_circular_x`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.efficientnet_lite import pad_circular_x
from defectlens.backbones.features import make_padding_circular_in_x, resize_bilinear_circular_x


class _CounterlessBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose state has no ``num_batches_tracked``: loading a state dict without
    torch's ``_metadata`` (one read back from safetensors) counts as version 1, for which
    BatchNorm would add the counter back and a strict load then refuses it."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):  # type: ignore[no-untyped-def]
        metadata = {**local_metadata, "version": local_metadata.get("version") or self._version}
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing_keys, unexpected_keys, error_msgs)


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm2d (momentum 0.1) without its batch counter: the counter is only read when
    momentum is None, and its 0-dim int64 tensor is refused by the model file's digest
    (``artifact.tensors_digest`` views every tensor as bytes)."""
    norm = _CounterlessBatchNorm2d(channels)
    norm.register_buffer("num_batches_tracked", None)
    return norm


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU, size-preserving."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), batch_norm(out_channels), nn.ReLU(inplace=True))


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU-conv3x3-BN-ReLU, size-preserving."""
    return nn.Sequential(*conv_bn_relu(in_channels, out_channels), *conv_bn_relu(out_channels, out_channels))


class Upsample2x(nn.Module):
    """Bilinear x2 upsampling: align_corners=True as DRAEM, or wrapping around in x (periodic)."""

    def __init__(self) -> None:
        super().__init__()
        self.circular_x = False

    def forward(self, x: Tensor) -> Tensor:
        size = (2 * x.shape[-2], 2 * x.shape[-1])
        if self.circular_x:
            return resize_bilinear_circular_x(x, size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """Upsample x2 then conv3x3-BN-ReLU."""
    return nn.Sequential(Upsample2x(), conv_bn_relu(in_channels, out_channels))


def draem_init(module: nn.Module) -> None:
    """DRAEM's ``weights_init``: conv weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), BN bias 0."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, 0.0, 0.02)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.normal_(layer.weight, 1.0, 0.02)
            nn.init.zeros_(layer.bias)


class _PaddedToMultiple(nn.Module):
    """Pads inputs to a multiple of ``2 ** depth`` (replicate, or wrap in x) and crops outputs."""

    depth: int

    def __init__(self) -> None:
        super().__init__()
        self.circular_x = False

    def pad(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        multiple = 2**self.depth
        height, width = x.shape[-2:]
        pad_y, pad_x = -height % multiple, -width % multiple
        if pad_x:
            x = pad_circular_x(x, 0, pad_x) if self.circular_x else F.pad(x, (0, pad_x, 0, 0), mode="replicate")
        if pad_y:
            x = F.pad(x, (0, 0, 0, pad_y), mode="replicate")
        return x, (height, width)


class ReconstructiveSubNetwork(_PaddedToMultiple):
    """Encoder-decoder without skips: (N, in_channels, H, W) -> (N, out_channels, H, W).

    Args:
        base_width: channels of the first block (DRAEM: 128); later blocks use 2x, 4x, 8x, 8x.
        in_channels, out_channels: 3 and 3 for RGB.
    """

    depth = 4

    def __init__(self, base_width: int = 128, in_channels: int = 3, out_channels: int = 3) -> None:
        super().__init__()
        w = int(base_width)
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(
            [conv_block(in_channels, widths[0])] + [conv_block(a, b) for a, b in zip(widths, widths[1:])]
        )
        self.pool = nn.MaxPool2d(2)
        # decoder (model_unet.DecoderReconstructive): up 8w->8w, block 8w->4w; up 4w, block ->2w; up 2w, block ->w; up w, block ->w
        self.decoder = nn.ModuleList()
        for in_w, out_w in ((8 * w, 4 * w), (4 * w, 2 * w), (2 * w, w), (w, w)):
            self.decoder.append(nn.Sequential(
                up_block(in_w, in_w), conv_bn_relu(in_w, in_w), conv_bn_relu(in_w, out_w),
            ))
        self.output = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x, (height, width) = self.pad(x)
        for index, block in enumerate(self.encoder):
            x = block(self.pool(x) if index else x)
        for block in self.decoder:
            x = block(x)
        return self.output(x)[..., :height, :width]


class DiscriminativeSubNetwork(_PaddedToMultiple):
    """U-Net: (N, in_channels, H, W) -> logits (N, out_channels, H, W).

    Args:
        base_width: channels of the first block (DRAEM: 64); later blocks use 2x, 4x, 8x, 8x, 8x.
        in_channels: 6 (image and reconstruction); out_channels: 2 (normal, anomalous).
    """

    depth = 5

    def __init__(self, base_width: int = 64, in_channels: int = 6, out_channels: int = 2) -> None:
        super().__init__()
        w = int(base_width)
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w, 8 * w]
        self.encoder = nn.ModuleList(
            [conv_block(in_channels, widths[0])] + [conv_block(a, b) for a, b in zip(widths, widths[1:])]
        )
        self.pool = nn.MaxPool2d(2)
        # decoder (model_unet.DecoderDiscriminative): up from the deepest block, concatenate the skip, two convs
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for deeper, skip, out_w in ((8 * w, 8 * w, 8 * w), (8 * w, 8 * w, 4 * w), (4 * w, 4 * w, 2 * w), (2 * w, 2 * w, w), (w, w, w)):
            self.ups.append(up_block(deeper, out_w))
            self.blocks.append(conv_block(out_w + skip, out_w))
        self.output = nn.Conv2d(w, out_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x, (height, width) = self.pad(x)
        skips = []
        for index, block in enumerate(self.encoder):
            x = block(self.pool(x) if index else x)
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.ups, self.blocks):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.output(x)[..., :height, :width]


def make_circular_in_x(network: nn.Module) -> None:
    """Make a DRAEM network periodic in x (roll-out bands), in place."""
    make_padding_circular_in_x(network)
    for module in network.modules():
        if isinstance(module, (Upsample2x, _PaddedToMultiple)):
            module.circular_x = True

"""Patch features from a pretrained backbone, as PatchCore / PaDiM consume them.

images (N, 3, H, W) RGB float32 in [0, 1]
  -> backbone normalization -> backbone, run only up to the deepest chosen layer
  -> per layer: 3x3 average pooling (stride 1, padding 1: local neighbourhood aggregation)
  -> bilinear resize to the grid of the finest chosen layer (ceil(H / s), ceil(W / s))
  -> concatenation along channels -> (N, C_total, h, w)

With ``circular_padding=True`` every convolution / pooling pads by wrapping around in x
(width) and with zeros in y, so features of a periodic "roll-out" band are equivariant to
rolls along x (by multiples of each layer's stride).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.efficientnet_lite import Conv2dSame, pad_circular_x
from defectlens.backbones.registry import (
    DEFAULT_BACKBONE,
    BackboneSpec,
    FeatureLayer,
    build_backbone,
    get_backbone_spec,
)
from defectlens.errors import ConfigError


def make_padding_circular_in_x(model: nn.Module) -> None:
    """Make every padded conv / max-pool of ``model`` wrap around in x; y padding is unchanged.

    In place; parameter names do not change. ``Conv2dSame`` has a ``circular_x`` switch.
    Other convolutions and max-pools keep their y padding (zeros, or -inf for max-pool)
    but lose their x padding, which a forward pre-hook adds back by wrapping around.
    Transposed convolutions wrap their input and crop one period of the output
    (`_make_transposed_circular_x`).
    """
    for module in model.modules():
        if isinstance(module, Conv2dSame):
            module.circular_x = True
            continue
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            padding = module.padding
            unsupported = isinstance(padding, str) or (
                module.padding_mode != "zeros"
                if isinstance(module, nn.Conv2d)
                else module.ceil_mode
            )
            if unsupported:
                raise ConfigError(f"circular padding cannot convert {module}")
            pad_y, pad_x = (padding, padding) if isinstance(padding, int) else padding
            if pad_x == 0:
                continue
            module.padding = (pad_y, 0)
            module.register_forward_pre_hook(_circular_x_pad_hook(pad_x))
        elif isinstance(module, nn.ConvTranspose2d):
            _make_transposed_circular_x(module)
        elif isinstance(module, (nn.AvgPool2d, nn.LPPool2d)):
            raise ConfigError(f"circular padding does not support {type(module).__name__}")


def _circular_x_pad_hook(
    pad_x: int,
) -> Callable[[nn.Module, tuple[Tensor, ...]], tuple[Tensor, ...]]:
    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (pad_circular_x(args[0], pad_x, pad_x), *args[1:])

    return hook


def _make_transposed_circular_x(module: nn.ConvTranspose2d) -> None:
    """Make a transposed convolution periodic in x: a period of W input columns gives exactly
    the W * stride output columns of one period, each the sum of every input column's
    (wrapped-around) contribution, i.e. the zero-padded layer applied to the endlessly
    repeated input.

    Needs kernel_eff - 2 * padding + output_padding == stride in x (kernel_eff = dilation *
    (kernel - 1) + 1: the output is W * stride wide); a layer without x padding and output
    padding is left as it is (like a convolution without x padding). The layer then runs
    without x padding on the input wrapped by ceil((kernel_eff - 1 - padding) / stride)
    columns on the left and ceil(padding / stride) on the right, and a forward hook crops the
    period out of the result. ``output_size`` cannot be passed to such a layer.
    """
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        raise ConfigError(f"circular padding cannot convert {module}")
    kernel, stride = module.kernel_size[1], module.stride[1]
    padding, output_padding = module.padding[1], module.output_padding[1]
    kernel_eff = module.dilation[1] * (kernel - 1) + 1
    if padding == 0 and output_padding == 0:
        return
    if kernel_eff - 2 * padding + output_padding != stride:
        raise ConfigError(
            f"circular padding needs kernel - 2 * padding + output_padding == stride in x (the output one "
            f"period wide) for {module}"
        )
    left = -(-(kernel_eff - 1 - padding) // stride)
    right = -(-padding // stride)
    module.padding = (module.padding[0], 0)
    module.output_padding = (module.output_padding[0], 0)

    def wrap(layer: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        if len(args) > 1 and args[1] is not None:
            raise ConfigError("a circular ConvTranspose2d cannot take output_size")
        x, width = args[0], args[0].shape[-1]
        if max(left, right) <= width:
            return (pad_circular_x(x, left, right),)
        periods = -(-max(left, right) // width)  # a kernel wider than the input: repeat it
        return (x.repeat(1, 1, 1, 2 * periods + 1)[..., periods * width - left : (periods + 1) * width + right],)

    def crop(layer: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        width = args[0].shape[-1] - left - right
        start = padding + left * stride
        return output[..., start : start + width * stride]

    module.register_forward_pre_hook(wrap)
    module.register_forward_hook(crop)


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d into the convolution feeding it, in place; returns ``model``.

    Inference only (running statistics). In all our architectures each BatchNorm2d is
    registered right after the Conv2d whose output it normalizes; that pairing is checked
    (channel count) and the BatchNorm becomes ``nn.Identity``. The fold is computed in
    float64: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta.
    """
    previous: tuple[str, nn.Module] | None = None
    folds: list[tuple[nn.Conv2d, str, nn.BatchNorm2d]] = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue  # containers: look at leaves only, in registration order
        if isinstance(module, nn.BatchNorm2d):
            if previous is None or not isinstance(previous[1], nn.Conv2d):
                raise ConfigError(f"cannot fold {name}: it does not follow a convolution")
            conv = previous[1]
            if conv.out_channels != module.num_features:
                raise ConfigError(f"cannot fold {name} into {previous[0]}: channel counts differ")
            folds.append((conv, name, module))
        previous = (name, module)
    with torch.no_grad():
        for conv, bn_name, bn in folds:
            assert bn.running_mean is not None and bn.running_var is not None
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            conv_bias = conv.bias.double() if conv.bias is not None else 0.0
            folded_bias = (conv_bias - bn.running_mean.double()) * scale + bn.bias.double()
            folded_weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
            conv.weight = nn.Parameter(folded_weight.float(), requires_grad=False)
            conv.bias = nn.Parameter(folded_bias.float(), requires_grad=False)
            parent_name, _, child_name = bn_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, nn.Identity())
    return model


def resize_bilinear_circular_x(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) that wraps around in x instead of clamping.

    features: (N, C, h, w) -> (N, C, size[0], size[1]). y is resized as F.interpolate does.
    """
    out_height, out_width = size
    in_width = features.shape[-1]
    if features.shape[-2] != out_height:
        features = F.interpolate(
            features, size=(out_height, in_width), mode="bilinear", align_corners=False
        )
    if in_width == out_width:
        return features
    source_x = (torch.arange(out_width, dtype=torch.float64) + 0.5) * (in_width / out_width) - 0.5
    left = torch.floor(source_x)
    weight_right = (source_x - left).to(features.dtype).to(features.device)
    left_index = left.long().remainder(in_width).to(features.device)
    right_index = (left_index + 1).remainder(in_width)
    return torch.lerp(features[..., left_index], features[..., right_index], weight_right)


class FeatureExtractor(nn.Module):
    """Locally aggregated, multi-layer patch features of a pretrained backbone.

    Args:
        backbone: a name from ``available_backbones()``.
        layers: layer names of that backbone (see ``spec.layer_names``); default: the ends of
            the last stride-8 and the last stride-16 stage. Concatenated in the given order.
        weights: state dict file (``.pth`` / ``.safetensors``); None = bundled weights
            (a ConfigError for backbones that ship none, e.g. the ResNets).
        device: torch device for the backbone and the output.
        circular_padding: wrap around in x (width) for periodic roll-out bands.
        images_per_pass: images per backbone pass inside ``forward`` (speed / memory only;
            the result does not depend on it).
        aggregation: side, in feature cells, of the neighbourhood averaged into each patch
            feature (3: PatchCore's 3x3 local aggregation; 1: none, as the PaDiM paper); odd.

    ``forward(images)``: (N, 3, H, W) float32 RGB in [0, 1] -> (N, feature_dim,
    ceil(H / stride), ceil(W / stride)) float32. Always in eval mode, without gradients.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        weights: str | Path | None = None,
        device: str = "cpu",
        circular_padding: bool = False,
        images_per_pass: int = 4,
        aggregation: int = 3,
    ) -> None:
        super().__init__()
        if images_per_pass < 1:
            raise ConfigError(f"images_per_pass must be >= 1, got {images_per_pass}")
        if int(aggregation) < 1 or int(aggregation) % 2 == 0:
            raise ConfigError(f"feature aggregation must be an odd number of cells >= 1, got {aggregation}")
        self.aggregation = int(aggregation)
        self.images_per_pass = images_per_pass
        self._spec = get_backbone_spec(backbone)
        if layers is None:
            chosen = self._spec.default_layers
        else:
            if isinstance(layers, str) or len(layers) == 0:
                raise ConfigError(f"layers must be a non-empty list of layer names, got {layers!r}")
            if len(set(layers)) != len(layers):
                raise ConfigError(f"layers contains duplicates: {list(layers)}")
            chosen = tuple(self._spec.layer(name) for name in layers)
        self._layers: tuple[FeatureLayer, ...] = tuple(chosen)
        self._layer_names = tuple(layer.name for layer in self._layers)
        self.circular_padding = circular_padding
        # `backbone` holds the weights exactly as loaded (state_dict, classify); features
        # come from `_feature_network`, a copy tuned for inference: BatchNorm folded into
        # the convolutions and channels-last memory (oneDNN's depthwise convolutions run
        # ~1.7x faster). Together ~2x faster than the plain model on 2 cores; the price is
        # a second copy of the weights (19 MB for Lite0, 270 MB for Wide-ResNet50-2).
        self.backbone = build_backbone(self._spec, weights, device)
        self._feature_network = fold_batch_norm(copy.deepcopy(self.backbone)).to(
            memory_format=torch.channels_last
        )
        if circular_padding:
            make_padding_circular_in_x(self.backbone)
            make_padding_circular_in_x(self._feature_network)
        self.register_buffer(
            "_mean", torch.tensor(self._spec.mean, device=device).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(self._spec.std, device=device).view(1, 3, 1, 1), persistent=False
        )
        self.eval()

    # ----------------------------------------------------------------- properties
    @property
    def spec(self) -> BackboneSpec:
        """The registry entry of the backbone."""
        return self._spec

    @property
    def layers(self) -> tuple[FeatureLayer, ...]:
        """The chosen layers (name, stride, channels), in concatenation order."""
        return self._layers

    @property
    def feature_dim(self) -> int:
        """Channels of the output: the sum over the chosen layers."""
        return sum(layer.channels for layer in self._layers)

    @property
    def stride(self) -> int:
        """Input pixels per output cell: the stride of the finest chosen layer (8 by default)."""
        return min(layer.stride for layer in self._layers)

    @property
    def input_normalization(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) per RGB channel applied to images in [0, 1]."""
        return self._spec.mean, self._spec.std

    @property
    def device(self) -> torch.device:
        """Where the backbone lives (and where features are returned)."""
        return self._mean.device

    def feature_grid(self, height: int, width: int) -> tuple[int, int]:
        """Output (h, w) for an input of (height, width) pixels."""
        return math.ceil(height / self.stride), math.ceil(width / self.stride)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """The extractor is frozen: it always stays in eval mode (BatchNorm uses its stats)."""
        return super().train(False)

    # ------------------------------------------------------------------- compute
    def _check_images(self, images: Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")

    def _normalize(self, images: Tensor) -> Tensor:
        """(n, 3, H, W) in [0, 1] -> normalized float32 copy on the device, channels-last."""
        images = images.to(device=self.device, dtype=torch.float32)
        normalized = torch.empty_like(images, memory_format=torch.channels_last)
        torch.sub(images, self._mean, out=normalized)
        return normalized.div_(self._std)

    def _aggregate(self, features: Tensor) -> Tensor:
        """k x k average of each cell's neighbourhood (zero padding counts, as PatchCore); k = 1: as is."""
        side, half = self.aggregation, self.aggregation // 2
        if side == 1:
            return features
        if self.circular_padding:
            return F.avg_pool2d(pad_circular_x(features, half, half), side, stride=1, padding=(half, 0))
        return F.avg_pool2d(features, side, stride=1, padding=half)

    def _resize(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        if features.shape[-2:] == grid:
            return features
        if self.circular_padding:
            return resize_bilinear_circular_x(features, grid)
        return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, feature_dim, ceil(H / stride), ceil(W / stride)).

        The batch runs through the backbone ``images_per_pass`` images at a time (small chunks
        keep the wide intermediate maps in cache); the result is contiguous NCHW float32.
        """
        self._check_images(images)
        grid = self.feature_grid(images.shape[-2], images.shape[-1])
        features = torch.empty(
            (images.shape[0], self.feature_dim, *grid), dtype=torch.float32, device=self.device
        )
        for start in range(0, images.shape[0], self.images_per_pass):
            stop = start + self.images_per_pass
            layer_maps = self._feature_network.forward_features(
                self._normalize(images[start:stop]), self._layer_names
            )
            channel_start = 0
            for layer in self._layers:
                channel_stop = channel_start + layer.channels
                features[start:stop, channel_start:channel_stop] = self._resize(
                    self._aggregate(layer_maps[layer.name]), grid
                )
                channel_start = channel_stop
        return features

    @torch.inference_mode()
    def classify(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> (N, 1000) ImageNet logits of the full network.

        For checking weights. Runs the whole network, whatever layers were chosen.
        """
        self._check_images(images)
        return self.backbone(self._normalize(images))

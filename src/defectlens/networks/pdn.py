"""EfficientAD's patch description networks (Batzner et al., WACV 2024, appendix A, Tables 6-7).

A PDN is a small fully convolutional network whose output cell sees a 33 x 33 input patch:

    small                                     medium
    Conv-1   4x4, 128, pad 3, ReLU            Conv-1   4x4, 256, pad 3, ReLU
    AvgPool  2x2, stride 2, pad 1             AvgPool  2x2, stride 2, pad 1
    Conv-2   4x4, 256, pad 3, ReLU            Conv-2   4x4, 512, pad 3, ReLU
    AvgPool  2x2, stride 2, pad 1             AvgPool  2x2, stride 2, pad 1
    Conv-3   3x3, 256, pad 1, ReLU            Conv-3   1x1, 512, ReLU
    Conv-4   4x4, C_out                       Conv-4   3x3, 512, pad 1, ReLU
                                              Conv-5   4x4, C_out, ReLU
                                              Conv-6   1x1, C_out

(all strides 1 except the pools). An input of H x W gives a (C_out, ceil(H / 4), ceil(W / 4))
map: 64 x 64 at 256 px; output cell (i, j) is centred on input pixel (4i, 4j). The teacher has
C_out = 384; the student 768 (384 to predict the teacher, 384 the autoencoder). The layers
are an ``nn.Sequential`` indexed as in the public reference code, so its teacher state dicts
(``0.weight``, ``3.weight`` ...) load unchanged. Images in [0, 1] are normalized with the
ImageNet mean / std inside `PDN.forward`, as the paper's pipeline does.

Teacher weights: the paper distills the teacher from WideResNet-101 features on ImageNet,
neither of which exists offline. The bundled teachers were distilled from EfficientNet-Lite0
features on a generic offline image set by ``tools/distill_efficientad_teacher.py`` (see its
docstring); their SHA-256 is recorded here (`BUNDLED_TEACHERS`) and checked on every load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from defectlens.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, read_state_dict
from defectlens.errors import ConfigError, ModelFileError
from defectlens.hashing import file_sha256
from defectlens.networks.bundled import BundledWeights
from defectlens.networks.periodic import PeriodicAvgPool2d, PeriodicConv2d, set_circular_x

PDNSize = Literal["small", "medium"]
PDN_SIZES: tuple[str, ...] = ("small", "medium")
TEACHER_CHANNELS = 384
PDN_STRIDE = 4
PDN_RECEPTIVE_FIELD = 33


def _layers(size: str, out_channels: int) -> list[nn.Module]:
    """The paper's layer table for ``size`` ("small" / "medium") as torch modules, in order."""
    relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
    pool = lambda: PeriodicAvgPool2d(2, stride=2, padding=1)  # noqa: E731
    if size == "small":
        return [
            PeriodicConv2d(3, 128, 4, padding=3), relu(), pool(),
            PeriodicConv2d(128, 256, 4, padding=3), relu(), pool(),
            PeriodicConv2d(256, 256, 3, padding=1), relu(),
            PeriodicConv2d(256, out_channels, 4),
        ]
    if size == "medium":
        return [
            PeriodicConv2d(3, 256, 4, padding=3), relu(), pool(),
            PeriodicConv2d(256, 512, 4, padding=3), relu(), pool(),
            PeriodicConv2d(512, 512, 1), relu(),
            PeriodicConv2d(512, 512, 3, padding=1), relu(),
            PeriodicConv2d(512, out_channels, 4), relu(),
            PeriodicConv2d(out_channels, out_channels, 1),
        ]
    raise ConfigError(f"PDN size must be one of {', '.join(PDN_SIZES)}, got {size!r}")


class PDN(nn.Module):
    """Patch description network (small or medium), optionally periodic in x.

    Args:
        size: "small" or "medium" (the paper's Tables 6 and 7).
        out_channels: channels of the last layer (384 teacher, 768 student).
        circular_padding: every padded layer wraps around in x (roll-out bands); see
            `networks.periodic`.

    ``forward(images)``: (N, 3, H, W) RGB in [0, 1] -> (N, out_channels, ceil(H / 4), ceil(W / 4)).
    Runs in channels-last memory format (oneDNN's convolutions are ~2x faster so on a CPU).
    """

    def __init__(self, size: str = "small", out_channels: int = TEACHER_CHANNELS, circular_padding: bool = False) -> None:
        super().__init__()
        self.size = size
        self.out_channels = int(out_channels)
        self.layers = nn.Sequential(*_layers(size, self.out_channels)).to(memory_format=torch.channels_last)
        if circular_padding:
            set_circular_x(self.layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, C_out, ceil(H / 4), ceil(W / 4))."""
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.layers(x)

    def load_layer_weights(self, state: dict[str, Tensor], source: str | Path) -> None:
        """Load an ``nn.Sequential`` state dict (keys ``0.weight`` ...) of this architecture; ConfigError naming
        ``source`` when its keys or shapes do not fit."""
        try:
            self.layers.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
        except RuntimeError as error:
            raise ConfigError(f"{source}: not a {self.size} PDN with {self.out_channels} output channels ({error})") from None
        self.layers.to(memory_format=torch.channels_last)


BUNDLED_TEACHERS: dict[str, BundledWeights] = {
    "small": BundledWeights(
        "efficientad_teacher_small_lite0.safetensors",
        "e67abea5ca9b64a0cef2adb449815e820e6230936986cbf5d5434a446141a0f6",
    ),
}
"""PDN size -> the bundled teacher distilled from EfficientNet-Lite0 (tools/distill_efficientad_teacher.py)."""


def bundled_teacher(size: str) -> BundledWeights:
    """The bundled teacher of a PDN size; ConfigError when none ships for it."""
    if size not in PDN_SIZES:
        raise ConfigError(f"PDN size must be one of {', '.join(PDN_SIZES)}, got {size!r}")
    if size not in BUNDLED_TEACHERS:
        raise ConfigError(f"no teacher ships for the {size} PDN; distill one with tools/distill_efficientad_teacher.py "
                          f"--pdn {size} and pass it as teacher_weights")
    return BUNDLED_TEACHERS[size]


def teacher_weights_sha256(size: str, weights: str | Path | None) -> str:
    """SHA-256 of the teacher file a PDN of ``size`` would load (bundled when ``weights`` is None).

    A bundled file whose hash is not the recorded one raises ModelFileError (a damaged or
    tampered installation); a missing user file raises ConfigError.
    """
    if weights is None:
        teacher = bundled_teacher(size)
        if not teacher.path.is_file():
            raise ModelFileError(f"the bundled EfficientAD teacher {teacher.path} is missing (a broken installation)")
        digest = file_sha256(teacher.path)
        if digest != teacher.sha256:
            raise ModelFileError(f"the bundled EfficientAD teacher {teacher.path} has SHA-256 {digest}, not the recorded "
                                 f"{teacher.sha256}: the file is damaged or was tampered with; reinstall defectlens")
        return digest
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(f"teacher weights file {path} does not exist")
    return file_sha256(path)


def load_teacher(size: str, weights: str | Path | None = None, circular_padding: bool = False,
                 device: str | torch.device = "cpu") -> tuple[PDN, str]:
    """A frozen teacher PDN (384 channels, eval mode) and the SHA-256 of its weights file.

    ``weights``: a state-dict file (safetensors or a torch file) of the PDN's ``nn.Sequential``
    (keys ``0.weight`` ...; the public reference code's teacher files load as they are), or
    None for the bundled teacher (SHA-256 checked, ModelFileError when it differs).
    """
    digest = teacher_weights_sha256(size, weights)
    path = bundled_teacher(size).path if weights is None else Path(weights)
    teacher = PDN(size, TEACHER_CHANNELS, circular_padding)
    teacher.load_layer_weights(read_state_dict(path), path)
    teacher.requires_grad_(False)
    return teacher.to(device).eval(), digest


def teacher_file_metadata(path: str | Path) -> dict[str, str]:
    """How a teacher file was distilled (``tools/distill_efficientad_teacher.py`` writes it as one
    JSON entry "defectlens" of the safetensors metadata); {} for other files."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    try:
        return dict(json.loads(metadata.get("defectlens", "{}")))
    except (TypeError, ValueError):
        return {}


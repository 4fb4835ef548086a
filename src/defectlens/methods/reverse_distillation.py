"""Reverse distillation from a one-class embedding (Deng & Li, "Anomaly Detection via Reverse
Distillation from One-Class Embedding", CVPR 2022).

    teacher  E: a frozen pretrained encoder; features e_k at K levels (strides 4, 8, 16)
    OCBE     z = OCE(MFF(e_1 .. e_K))           trainable: fuse the levels, compress
    student  D: d_K .. d_1 = D(z)               trainable: a decoder mirroring E
    loss     L = 1/K sum_k mean_(h,w) [1 - cos(e_k(h, w), d_k(h, w))]
    map      M = sum_k up(1 - cos(e_k, d_k))    on the finest grid (the detector upsamples to
                                                the input and blurs with sigma 4, as the paper)
    score    max of the map

Trained with Adam, lr 0.005, betas (0.5, 0.999), as the paper. Deviations: the paper's encoder
is WideResNet-50 (ImageNet), available here only from a user's weights file
(``backbone="wide_resnet50_2", weights=PATH``, encoder_layers layer1..layer3); the default is
EfficientNet-Lite0 (strides 4 / 8 / 16: 24 / 40 / 112 channels), with the decoder's widths
mirroring it. The decoder upsamples by nearest neighbour + convolution instead of transposed
convolutions (periodic in x for roll-out bands). The paper trains 200 epochs at batch 16 on a
GPU; the CPU default is 400 steps at batch 8 (measured about 0.55 s a step at 256 px on 2 shared
cores, i.e. about 4 minutes; 180 steps gave 0.958 image AUROC on transistor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defectlens.backbones.features import make_padding_circular_in_x
from defectlens.backbones.registry import get_backbone_spec
from defectlens.errors import ConfigError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.networks.reverse_distillation import OneClassBottleneck, StudentDecoder
from defectlens.postprocess import upsample
from defectlens.training import TrainingConfig

if TYPE_CHECKING:
    from defectlens.samples import Batch

ENCODER_STRIDES = (4, 8, 16)
"""Default encoder levels: the last layer at each of these strides."""


def default_encoder_layers(backbone: str) -> list[str]:
    """Names of the backbone's last layer at strides 4, 8 and 16."""
    spec = get_backbone_spec(backbone)
    return [[layer.name for layer in spec.layers if layer.stride == stride][-1] for stride in ENCODER_STRIDES]


def cosine_distance_maps(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
    """Per level 1 - cos(teacher, student) over channels: [(N, C_k, h_k, w_k)] -> [(N, h_k, w_k)]."""
    return [1.0 - F.cosine_similarity(t, s, dim=1) for t, s in zip(teacher, student)]


class ReverseDistillation(TrainedMethod):
    """Reverse distillation: a frozen encoder, a trainable one-class bottleneck and a student
    decoder that restores the encoder's multi-scale features; anomalies are where it cannot.

    Args:
        encoder_layers: encoder layers shallow -> deep (their strides powers of two apart);
            None: the backbone's last layer at strides 4, 8 and 16 (EfficientNet-Lite0:
            _blocks.2, _blocks.4, _blocks.10). The detector's backbone and weights file are used.
        bottleneck_width: channels of the one-class embedding (at twice the deepest stride).
        embedding_blocks: residual blocks of the one-class embedding (the paper: 1).
        decoder_blocks: residual blocks per decoder level, the first of which upsamples.
        decoder_width_factor: hidden channels of each decoder level in multiples of the
            encoder's channels there (the output is a linear 1x1 convolution to them).
        adam_betas: Adam's (beta1, beta2); the paper: 0.5, 0.999.
    """

    name = "reverse_distillation"
    pretrained_networks = ("encoder",)

    def __init__(
        self, encoder_layers: Sequence[str] | None = None, bottleneck_width: int = 256, embedding_blocks: int = 1,
        decoder_blocks: int = 2, decoder_width_factor: int = 2, adam_betas: Sequence[float] = (0.5, 0.999),
        max_steps: int = 400, learning_rate: float = 0.005, train_batch_size: int = 8, **training: Any,
    ) -> None:
        self.encoder_layers = list(encoder_layers) if encoder_layers else None
        self.bottleneck_width = int(bottleneck_width)
        self.embedding_blocks = int(embedding_blocks)
        self.decoder_blocks = int(decoder_blocks)
        self.decoder_width_factor = int(decoder_width_factor)
        self.adam_betas = tuple(float(beta) for beta in adam_betas)
        if min(self.bottleneck_width, self.embedding_blocks, self.decoder_blocks, self.decoder_width_factor) < 1:
            raise ConfigError("bottleneck_width, embedding_blocks, decoder_blocks and decoder_width_factor must be >= 1, "
                              f"got {bottleneck_width}, {embedding_blocks}, {decoder_blocks}, {decoder_width_factor}")
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, train_batch_size=train_batch_size, **training)

    def training_config(self, **changes: Any) -> TrainingConfig:
        """The shared training options plus Adam's betas."""
        return super().training_config(**{"betas": self.adam_betas, **changes})

    # ------------------------------------------------------------------ networks
    def build_networks(self) -> dict[str, nn.Module]:
        context = self.context
        layers = self.encoder_layers or default_encoder_layers(context.backbone)
        encoder = PretrainedEncoder(context.backbone, layers, context.weights, circular_padding=context.circular_padding,
                                    device=context.device)
        bottleneck = OneClassBottleneck(encoder.channels, encoder.strides, self.bottleneck_width, self.embedding_blocks)
        decoder = StudentDecoder(encoder.channels, self.bottleneck_width, self.decoder_blocks, self.decoder_width_factor)
        if context.circular_padding:
            make_padding_circular_in_x(bottleneck)
            make_padding_circular_in_x(decoder)
        return {"encoder": encoder, "bottleneck": bottleneck.to(self.device), "decoder": decoder.to(self.device)}

    def teacher_and_student(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Encoder features e_k and decoder restorations d_k of images x (N, 3, H, W), shallow -> deep."""
        networks = self.networks
        with torch.no_grad():
            encoded = networks["encoder"](x)
        restored = networks["decoder"](networks["bottleneck"](encoded), [tuple(e.shape[-2:]) for e in encoded])
        return encoded, restored

    # ------------------------------------------------------------------ training and scoring
    def training_step(self, batch: "Batch") -> Tensor:
        """The multi-scale cosine loss: mean over levels of the mean per-location 1 - cos."""
        encoded, restored = self.teacher_and_student(batch.x.to(self.device))
        return torch.stack([distance.mean() for distance in cosine_distance_maps(encoded, restored)]).mean()

    @torch.no_grad()
    def patch_scores(self, x: Tensor) -> Tensor:
        """Sum over levels of the 1 - cos maps, upsampled to the finest level: (N, H / s_1, W / s_1)."""
        encoded, restored = self.teacher_and_student(x.to(self.device))
        distances = cosine_distance_maps(encoded, restored)
        grid = tuple(distances[0].shape[-2:])
        circular = self.context.circular_padding
        return torch.stack([upsample(d, grid, circular) for d in distances]).sum(dim=0).float()


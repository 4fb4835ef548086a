"""CFlow-AD (Gudovskiy, Ishizaka, Kozuka: "CFLOW-AD: Real-Time Unsupervised Anomaly Detection
with Localization via Conditional Normalizing Flows", WACV 2022).

    encoder    a frozen pretrained CNN; K feature maps z_k (N, C_k, h_k, w_k) (the paper: 3
               scales of a WideResNet-50 / EfficientNet; here 3 scales of a registered backbone,
               by default EfficientNet-Lite0's last stride-8, stride-16 and (next to last)
               stride-32 blocks - the paper's choice of blocks for EfficientNets)
    decoders   per scale a conditional normalizing flow g_k (8 coupling blocks, soft clamping
               alpha 1.9; `networks.flows.ConditionalFlow`, FrEIA) modelling the feature vector
               at each position conditioned on a 2-D sinusoidal encoding of the position (P=128)
    training   maximum likelihood on random "fiber" batches: per image batch and scale, the
               N-position batches of a random permutation of all positions, one optimizer step
               each; loss = -logsigmoid(log p(z | c) / C_k) - the per-dimension log-likelihood
               through log-sigmoid, as the authors' code (and anomalib) train; Adam, lr 2e-4
               with warm-up and cosine decay
    map        the paper's: per scale the per-dimension log-likelihood l_k, normalized as
               p_k = exp(l_k - max l_k), upsampled bilinearly (align_corners=True) to the model
               input and summed over scales; anomaly = K - sum_k p_k. The paper takes max l_k
               and the final maximum over the TEST set (transductive); here max l_k is taken
               over the training images after training (stored with the model) and K replaces
               the test-set maximum of the sum (a constant: no ranking changes).
    image score  max of the map (the shared chain's).

CPU default budget: ``max_steps`` fiber steps (each N = 256 positions of one scale) instead of
the paper's 25 x 8 epochs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.backbones.features import resize_bilinear_circular_x
from defectlens.backbones.registry import get_backbone_spec
from defectlens.errors import ConfigError
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.networks.flows import ConditionalFlow, positional_encoding_2d
from defectlens.training import TrainingConfig

if TYPE_CHECKING:
    from defectlens.samples import FitData


class Fibers(NamedTuple):
    """One fiber batch: feature vectors (n, C) of one scale and their position encodings (n, P)."""

    scale: int
    vectors: torch.Tensor
    conditions: torch.Tensor


def default_cflow_layers(backbone: str) -> tuple[str, ...]:
    """The last layer at stride 8, the last at stride 16 and the next-to-last at stride 32
    (CFlow's blocks [-5, -3, -2] of an EfficientNet); fewer scales when the backbone has none."""
    spec = get_backbone_spec(backbone)
    chosen = []
    for stride, position in ((8, -1), (16, -1), (32, -2)):
        at_stride = [layer.name for layer in spec.layers if layer.stride == stride]
        if at_stride:
            chosen.append(at_stride[max(position, -len(at_stride))])
    return tuple(chosen)


class CFlow(TrainedMethod):
    """CFlow-AD: conditional normalizing flows on frozen pretrained features.

    Args:
        encoder_layers: backbone layers whose feature maps are modelled (one flow each); None =
            CFlow's three scales (stride 8, 16, 32) of the detector's backbone.
        coupling_blocks: coupling blocks per flow (paper: 8).
        condition_channels: dimension P of the positional encoding (paper: 128; a multiple of 4).
        clamp_alpha: soft clamping of the coupling log-scales (paper: 1.9).
        fiber_batch_size: N, feature positions per optimizer step (paper: 256).
        warmup_fraction: linear lr warm-up over this fraction of max_steps (paper: 2 of 25 meta-epochs).
    """

    name = "cflow"
    pretrained_networks = ("encoder",)

    def __init__(
        self, encoder_layers: Sequence[str] | None = None, coupling_blocks: int = 8, condition_channels: int = 128,
        clamp_alpha: float = 1.9, fiber_batch_size: int = 256, warmup_fraction: float = 0.05, max_steps: int = 2000,
        learning_rate: float = 2e-4, lr_schedule: str = "cosine", train_batch_size: int = 8, **training: Any,
    ) -> None:
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, lr_schedule=lr_schedule,
                         train_batch_size=train_batch_size, **training)
        self.encoder_layers = list(encoder_layers) if encoder_layers else None
        self.coupling_blocks = int(coupling_blocks)
        self.condition_channels = int(condition_channels)
        self.clamp_alpha = float(clamp_alpha)
        self.fiber_batch_size = int(fiber_batch_size)
        self.warmup_fraction = float(warmup_fraction)
        if self.condition_channels < 4 or self.condition_channels % 4:
            raise ConfigError(f"cflow: condition_channels must be a positive multiple of 4, got {condition_channels}")
        if self.coupling_blocks < 1 or self.fiber_batch_size < 1:
            raise ConfigError(f"cflow: coupling_blocks and fiber_batch_size must be >= 1, got {coupling_blocks}, {fiber_batch_size}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"cflow: warmup_fraction must be in [0, 1), got {warmup_fraction}")
        self.training_config()
        self.log_likelihood_max: torch.Tensor | None = None
        """Per scale, the largest per-dimension log-likelihood over the training images (K,)."""
        self._encodings: dict[tuple[int, int, int], torch.Tensor] = {}

    # ------------------------------------------------------------------ networks
    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.encoder_layers) if self.encoder_layers else default_cflow_layers(self.context.backbone)

    def build_networks(self) -> dict[str, nn.Module]:
        encoder = PretrainedEncoder(self.context.backbone, self.layers, self.context.weights,
                                    circular_padding=self.context.circular_padding, device=self.device)
        flow_seeds = torch.randint(0, 2**31, (len(encoder.channels),)).tolist()  # under the method's seed
        decoders = nn.ModuleList([
            ConditionalFlow(channels, self.condition_channels, self.coupling_blocks, self.clamp_alpha, seed)
            for channels, seed in zip(encoder.channels, flow_seeds)
        ])
        return {"encoder": encoder, "decoders": decoders.to(self.device)}

    def training_config(self, **changes: Any) -> TrainingConfig:
        fraction = getattr(self, "warmup_fraction", 0.0)  # not yet set while the base class validates
        warmup = min(int(fraction * self.max_steps), self.max_steps - 1)
        return super().training_config(**{"lr_warmup_steps": warmup, **changes})

    def trainable_modules(self) -> list[nn.Module]:
        return [self.networks["decoders"]]

    def position_encoding(self, height: int, width: int) -> torch.Tensor:
        """The (P, h, w) encoding of a feature map's positions (cached per size)."""
        key = (self.condition_channels, height, width)
        if key not in self._encodings:
            self._encodings[key] = positional_encoding_2d(
                self.condition_channels, height, width, self.context.circular_padding, self.device)
        return self._encodings[key]

    def fibers(self, feature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature map (N, C, h, w) -> vectors (N h w, C) and their encodings (N h w, P), row-major."""
        n, channels, height, width = feature.shape
        vectors = feature.permute(0, 2, 3, 1).reshape(-1, channels)
        encoding = self.position_encoding(height, width).permute(1, 2, 0).reshape(1, height * width, -1)
        return vectors, encoding.expand(n, -1, -1).reshape(n * height * width, -1)

    # ------------------------------------------------------------------ training
    def fiber_batches(self, x: torch.Tensor) -> Iterator[Fibers]:
        """CFlow's sub-iterations of one image batch: per scale, N-position batches of a random permutation."""
        with torch.no_grad():
            features = self.networks["encoder"](x)
        for scale, feature in enumerate(features):
            vectors, conditions = self.fibers(feature)
            order = torch.randperm(vectors.shape[0], device=vectors.device)
            size = min(self.fiber_batch_size, vectors.shape[0])
            for start in range(0, vectors.shape[0] - size + 1, size):
                rows = order[start : start + size]
                yield Fibers(scale, vectors[rows], conditions[rows])

    def training_batches(self, data: "FitData", batch_size: int | None = None) -> Any:
        images = super().training_batches(data, batch_size)

        def batches(epoch: int) -> Iterator[Fibers]:
            for batch in images(epoch):
                yield from self.fiber_batches(batch.x)

        return batches

    def training_step(self, fibers: Fibers) -> torch.Tensor:
        decoder = self.networks["decoders"][fibers.scale]
        log_likelihood = decoder.log_likelihood(fibers.vectors, fibers.conditions) / decoder.channels
        return -F.logsigmoid(log_likelihood).mean()

    def held_out_loss(self, data: "FitData") -> float:
        losses = [float(self.training_step(fibers)) for batch in data.held_out() for fibers in self.fiber_batches(batch.x)]
        if not losses:
            raise ConfigError("cflow: early stopping needs held-out images (more than one training image)")
        return sum(losses) / len(losses)

    @torch.no_grad()
    def log_likelihoods(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per scale, the per-dimension log-likelihood of each position: (N, h_k, w_k) float64."""
        maps = []
        for decoder, feature in zip(self.networks["decoders"], self.networks["encoder"](x)):
            n, channels, height, width = feature.shape
            vectors, conditions = self.fibers(feature)
            values = decoder.log_likelihood(vectors, conditions) / channels
            maps.append(values.double().reshape(n, height, width))
        return maps

    def after_training(self, data: "FitData") -> None:
        """max_k of the per-dimension log-likelihood over every training position (the map's normalizer)."""
        maxima = None
        for batch in data.epoch(0, stage=None):
            current = torch.stack([values.amax() for values in self.log_likelihoods(batch.x)])
            maxima = current if maxima is None else torch.maximum(maxima, current)
        assert maxima is not None
        self.log_likelihood_max = maxima.cpu()

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.log_likelihood_max is None:
            return {}
        return {"log_likelihood_max": self.log_likelihood_max}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "log_likelihood_max" not in tensors:
            raise ConfigError("cflow: the model file has no log-likelihood normalizer (log_likelihood_max)")
        self.log_likelihood_max = tensors["log_likelihood_max"].double().cpu()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """K - sum_k upsample(exp(l_k - max l_k)) at the model-input size (N, H, W) float32."""
        if self.log_likelihood_max is None:
            raise ConfigError("cflow: not fitted (no log-likelihood normalizer)")
        size = (x.shape[-2], x.shape[-1])
        total = torch.zeros((x.shape[0], *size), dtype=torch.float64, device=x.device)
        maxima = self.log_likelihood_max.to(x.device)
        for scale, values in enumerate(self.log_likelihoods(x)):
            probability = torch.exp(values - maxima[scale]).unsqueeze(1)
            if self.context.circular_padding:
                upsampled = resize_bilinear_circular_x(probability, size)
            else:
                upsampled = F.interpolate(probability, size=size, mode="bilinear", align_corners=True)
            total += upsampled.squeeze(1)
        return (len(maxima) - total).float()

"""FPN-L2 autoencoder (the PET-preform study's reconstruction baseline).

    encoder   pretrained EfficientNet (the detector's backbone), levels at strides 2 ... 32,
              frozen by default (``train_encoder``)
    decoder   the FPN decoder (`networks.fpn`): each stage inverted by a transposed convolution,
              summed with the skip of that level (``skip_strides``), ReLU, down to input size;
              a sigmoid makes the reconstruction an image in [0, 1]
    train     L2 loss ||decoder(encoder(x)) - x||^2 on normal images (the one training loop;
              Adam lr 1e-3 by default, the study's SGD with Nesterov momentum 0.9 is
              ``optimizer="sgd_nesterov"``: it needed lr 0.05 to converge in the CPU budget)
    score     map = squared residual, mean over RGB, (N, H, W); image score = its max (after the
              shared map chain)

Skips: an autoencoder with a skip from every level can learn the identity and reconstruct an
anomaly too. By default only the stride-8 and stride-16 levels are added (the decoder starts
from stride 32): every pixel is rebuilt from features at 1/8 resolution or coarser, so details
an encoder level cannot describe as "normal" are not copied through. This is a design
choice, not tuned on evaluation images; ``skip_strides=None`` is the study's every-level FPN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defectlens.methods.trained import TrainedMethod
from defectlens.networks.feature_cache import FeatureCache
from defectlens.networks.fpn import build_encoder_fpn

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData


class FpnAutoencoder(TrainedMethod):
    """Autoencoder of a pretrained encoder and the FPN decoder, trained with L2; map = residual.

    Args:
        skip_strides: strides of the encoder levels added in the decoder (None: every level;
            the deepest level is always the decoder's start).
        train_encoder: train the pretrained encoder with the decoder (default: frozen).
    """

    name = "fpn_autoencoder"

    def __init__(
        self, skip_strides: Sequence[int] | None = (8, 16), train_encoder: bool = False, max_steps: int = 600,
        optimizer: str = "adam", learning_rate: float = 1e-3, train_batch_size: int = 8, **training: Any,
    ) -> None:
        super().__init__(
            max_steps=max_steps, optimizer=optimizer, learning_rate=learning_rate, train_batch_size=train_batch_size,
            **training,
        )
        self.skip_strides = None if skip_strides is None else [int(stride) for stride in skip_strides]
        self.train_encoder = bool(train_encoder)
        self.pretrained_networks = () if self.train_encoder else ("encoder",)
        self._cache: FeatureCache | None = None

    def build_networks(self) -> dict[str, nn.Module]:
        context = self.context
        encoder, decoder = build_encoder_fpn(
            context.backbone, 3, weights=context.weights, train_encoder=self.train_encoder,
            skip_strides=self.skip_strides, circular_padding=context.circular_padding, device=context.device,
        )
        return {"encoder": encoder, "decoder": decoder}


    def reconstruct(self, features: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Encoder levels -> reconstruction (N, 3, *size) in [0, 1]."""
        return torch.sigmoid(self.networks["decoder"](features, size))

    def before_training(self, data: "FitData") -> None:
        encoder = self.networks["encoder"]
        self._cache = FeatureCache(encoder, FeatureCache.usable(data, self.train_encoder))

    def after_training(self, data: "FitData") -> None:
        if self._cache is not None:
            self._cache.clear()
        self._cache = None

    def training_step(self, batch: "Batch") -> torch.Tensor:
        features = self._cache(batch) if self._cache is not None else self.networks["encoder"](batch.x)
        return F.mse_loss(self.reconstruct(features, tuple(batch.x.shape[-2:])), batch.x)

    @torch.no_grad()
    def patch_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Squared residual (N, H, W), mean over the colour channels."""
        reconstruction = self.reconstruct(self.networks["encoder"](x), tuple(x.shape[-2:]))
        return (reconstruction - x).pow(2).mean(dim=1)

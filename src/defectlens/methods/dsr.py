"""DSR (Zavrtanik, Kristan, Skocaj, ECCV 2022): a dual subspace re-projection network.

    stage 1   the general VQ-VAE (`networks.dsr.GeneralVQVAE`): image -> F_hi (stride 4),
              F_lo (stride 8) -> codes of K_hi, K_lo -> Q_hi, Q_lo -> general decoder -> I_gen.
              The paper pretrains it on ImageNet; offline it is pretrained on a generic image set
              (scikit-image photographs + procedural textures, `tools/pretrain_dsr_vqvae.py`) and
              shipped with the package (SHA-256 checked). ``general_vqvae="train"`` instead trains
              it on the category's own normal images first (``vqvae_steps``).
    stage 2   frozen VQ-VAE. Anomalies are made in the quantized feature space: inside a Perlin
              mask (`data.synthetic.perlin_anomaly`'s mask; half the images get none) each code is
              replaced by one drawn at random among its ``strength * K`` nearest codes, the nearest
              5 % excluded, strength ~ U(0.2, 1) per image - near-in-distribution, but not the
              original. Per image: anomalies in Q_lo and Q_hi (p = 1/2), else in one of them.
              The subspace restriction modules (one per level) map the anomalous codes back to
              the object's normal subspace (re-quantized with the same codebooks), the object-
              specific decoder turns them into I_spc, and the anomaly-detection module (a U-Net on
              I_spc and I_gen of the anomalous codes) predicts the mask at the features' blocks:
                  loss = focal(mask) + |F_hi' - Q_hi|^2 + |F_lo' - Q_lo|^2 + 10 |I_spc - image|^2
    stage 3   stages 1-2 frozen; image-space anomalies (Perlin masks filled with a random colour,
              opacity beta ~ U(0, 0.8), half the images none) train the upsampling module (a U-Net
              on I_spc, I_gen and the coarse mask) to give a full-resolution mask (focal loss).
    score     map = the upsampling module's anomaly probability (N, H, W); image score = the
              maximum of the anomaly-detection module's probability averaged over a 21 x 21
              window (in model-input pixels), as the reference evaluation.

CPU deviations (documented in the README's DSR section): smaller networks (see
`networks.dsr`); the anomaly-detection module works at half the model-input resolution (its
target, the code-block mask, is at 1/4 or 1/8 of it anyway); no ±90 deg rotation of training
images (rotated parts are defects for fixtured parts such as MVTec's transistor); budgets of a
few hundred steps per stage (the paper trains 100 epochs of 8000 images).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from kornia.losses import focal_loss
from torch import Tensor, nn

from defectlens.backbones.features import make_padding_circular_in_x, resize_bilinear_circular_x
from defectlens.data.synthetic import perlin_anomaly
from defectlens.errors import ConfigError, ModelFileError
from defectlens.hashing import file_sha256
from defectlens.methods.base import ProgressCallback
from defectlens.methods.trained import TrainedMethod
from defectlens.networks.bundled import BundledWeights
from defectlens.networks.dsr import DSR_STRIDE, GeneralVQVAE, ObjectDecoder, SubspaceRestriction, UNet, init_normal
from defectlens.training import TrainingSummary, set_trainable

if TYPE_CHECKING:
    from defectlens.samples import Batch, FitData

GENERAL_VQVAE = ("bundled", "train")
MIN_TRAIN_SIDE = 8 * DSR_STRIDE
"""Smallest side (px) of a training input: the subspace restriction modules pool F_lo (1/8) twice
and instance-normalize what is left, which needs more than one position (2 x 2 at 64 px)."""


BUNDLED_VQVAE = BundledWeights(
    "dsr_vqvae_general.safetensors", "cacd8361c07636df9dd3609df719745e960c2dffacb872ef1f1bfec7946824fa")
"""The general VQ-VAE pretrained by tools/pretrain_dsr_vqvae.py (its SHA-256 is checked on load)."""


def vqvae_weights(source: str) -> tuple[Path, str]:
    """The general VQ-VAE file of ``source`` ("bundled" or a path) and its SHA-256; a bundled file
    with another hash raises ModelFileError (a damaged or tampered installation)."""
    path = BUNDLED_VQVAE.path if source == "bundled" else Path(source)
    if not path.is_file():
        where = "the bundled DSR VQ-VAE" if source == "bundled" else "general_vqvae file"
        raise ConfigError(f"{where} {path} does not exist" + (" (a broken installation; rebuild it with "
                                                               "tools/pretrain_dsr_vqvae.py)" if source == "bundled" else ""))
    digest = file_sha256(path)
    if source == "bundled" and digest != BUNDLED_VQVAE.sha256:
        raise ModelFileError(f"the bundled DSR VQ-VAE {path} has SHA-256 {digest}, not the recorded "
                             f"{BUNDLED_VQVAE.sha256}: the file is damaged or was tampered with; reinstall defectlens")
    return path, digest


def load_general_vqvae(source: str, device: torch.device) -> tuple[GeneralVQVAE, str]:
    """The pretrained general VQ-VAE (frozen, eval mode) and the SHA-256 of its file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path, digest = vqvae_weights(source)
    with safe_open(str(path), framework="pt") as handle:
        import json

        metadata = json.loads((handle.metadata() or {}).get("defectlens", "{}"))
    shape = {key: int(metadata[key]) for key in ("hidden", "dim", "num_codes", "residual_layers") if key in metadata}
    model = GeneralVQVAE(**shape)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{path} does not hold a DSR general VQ-VAE ({error})") from None
    set_trainable(model, False)
    return model.to(device).eval(), digest


def replace_codes(z: Tensor, quantized: Tensor, codebook: Tensor, mask: Tensor, strength: Tensor,
                  nearest_excluded: float = 0.05) -> Tensor:
    """DSR's code-space anomalies: inside ``mask`` each code is replaced by a random code among
    the ``strength * K`` nearest to the feature vector, the nearest ``nearest_excluded * K`` left out
    (uniform over those ranks, as the reference code's sampling).

    Args:
        z: features before quantization (N, C, h, w).
        quantized: their codes (N, C, h, w).
        codebook: (K, C).
        mask: (N, 1, h, w) in {0, 1} on the features' grid.
        strength: (N,) in (0, 1]: the fraction of the codebook the replacement is drawn from.

    Returns:
        (N, C, h, w): ``quantized`` outside the mask, the drawn codes inside.
    """
    n, channels, height, width = z.shape
    codes = codebook.shape[0]
    inside = mask.reshape(-1) > 0.5  # only codes inside the mask are replaced (and ranked)
    out = quantized.permute(0, 2, 3, 1).reshape(-1, channels).clone()
    if bool(inside.any()):
        flat = z.permute(0, 2, 3, 1).reshape(-1, channels)[inside]
        distances = flat.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1) - 2.0 * flat @ codebook.t()
        order = distances.argsort(dim=-1)  # (m, K): codes by distance, nearest first
        image = torch.arange(n, device=z.device).repeat_interleave(height * width)[inside]
        count = (strength[image] * codes).long().add(1).clamp(1, codes - 1)  # ranks [skip, count) are drawn
        skip = torch.minimum(torch.full_like(count, int(codes * nearest_excluded)), count - 1)
        rank = skip + (torch.rand(count.shape[0], device=z.device) * (count - skip)).long()
        out[inside] = codebook[order.gather(-1, rank.unsqueeze(-1)).squeeze(-1)]
    return out.view(n, height, width, channels).permute(0, 3, 1, 2).contiguous()


def block_mask(mask: Tensor, cell: int) -> Tensor:
    """A pixel mask (N, 1, H, W) -> the mask of its ``cell`` x ``cell`` blocks on that grid (max pooling)."""
    return F.max_pool2d(mask, cell)


class DSR(TrainedMethod):
    """DSR: general and object-specific subspaces of quantized features, code-space anomalies.

    Args:
        general_vqvae: "bundled" (pretrained on generic offline images, shipped), "train"
            (stage 1 on this category's normal images first) or a path to a safetensors file
            written by tools/pretrain_dsr_vqvae.py.
        vqvae_steps: stage-1 steps with ``general_vqvae="train"``.
        upsampling_steps: stage-3 steps (the upsampling module).
        upsampling_minutes: optional wall-clock budget of stage 3.
        restriction_width: base channels of the subspace restriction modules.
        decoder_hidden: channels of the object-specific decoder.
        detection_width: base channels of the anomaly-detection U-Net.
        upsampling_width: base channels of the upsampling U-Net.
        anomaly_strength_min: lower end of the code-space anomaly strength U(min, 1).
        image_score_window: side (model-input pixels) of the averaging window of the image score.
        train_crop: stages 2 and 3 train on random square crops of this side (aligned to the code
            grid; full width for roll-out bands) of the model inputs, None = whole inputs. The
            networks are convolutional, so crops cost a fraction and cover more images per
            minute; scoring always sees the whole input.
        max_steps: stage-2 steps (object-specific decoder, restriction and anomaly-detection modules).
    """

    name = "dsr"
    option_choices = {**TrainedMethod.option_choices}

    def __init__(
        self, general_vqvae: str = "bundled", vqvae_steps: int = 1500, upsampling_steps: int = 200,
        upsampling_minutes: float | None = None, restriction_width: int = 16, decoder_hidden: int = 32,
        detection_width: int = 8, upsampling_width: int = 8, anomaly_strength_min: float = 0.2,
        image_score_window: int = 21, train_crop: int | None = 64, max_steps: int = 500, learning_rate: float = 5e-4, lr_schedule: str = "step",
        train_batch_size: int = 8, **training: Any,
    ) -> None:
        super().__init__(max_steps=max_steps, learning_rate=learning_rate, lr_schedule=lr_schedule,
                         train_batch_size=train_batch_size, **training)
        if general_vqvae not in GENERAL_VQVAE and not str(general_vqvae).endswith(".safetensors"):
            raise ConfigError(f"general_vqvae must be 'bundled', 'train' or a .safetensors file, got {general_vqvae!r}")
        if not 0.0 < anomaly_strength_min <= 1.0:
            raise ConfigError(f"anomaly_strength_min must be in (0, 1], got {anomaly_strength_min}")
        for name, value in (("vqvae_steps", vqvae_steps), ("upsampling_steps", upsampling_steps),
                            ("restriction_width", restriction_width), ("decoder_hidden", decoder_hidden),
                            ("detection_width", detection_width), ("upsampling_width", upsampling_width),
                            ("image_score_window", image_score_window)):
            if int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        self.general_vqvae = str(general_vqvae)
        self.vqvae_steps, self.upsampling_steps = int(vqvae_steps), int(upsampling_steps)
        self.upsampling_minutes = upsampling_minutes
        self.restriction_width, self.decoder_hidden = int(restriction_width), int(decoder_hidden)
        self.detection_width, self.upsampling_width = int(detection_width), int(upsampling_width)
        self.anomaly_strength_min = float(anomaly_strength_min)
        self.image_score_window = int(image_score_window)
        if train_crop is not None and (int(train_crop) < MIN_TRAIN_SIDE or int(train_crop) % (2 * DSR_STRIDE)):
            raise ConfigError(f"train_crop must be a multiple of {2 * DSR_STRIDE} px and >= {MIN_TRAIN_SIDE} px (or None), "
                              f"got {train_crop}")
        self.train_crop = None if train_crop is None else int(train_crop)
        self.stage_summaries: dict[str, TrainingSummary] = {}
        self.vqvae_sha256 = ""
        self._last: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ networks
    @property
    def pretrained_networks(self) -> tuple[str, ...]:  # type: ignore[override]
        """The general VQ-VAE is rebuilt from its file (not saved) unless it was trained here."""
        return () if self.general_vqvae == "train" else ("vqvae",)

    def build_networks(self) -> dict[str, nn.Module]:
        if self.general_vqvae == "train":
            vqvae = GeneralVQVAE(num_codes=512).to(self.device)
        else:
            vqvae, self.vqvae_sha256 = load_general_vqvae(self.general_vqvae, self.device)
        dim = vqvae.dim
        networks: dict[str, nn.Module] = {
            "vqvae": vqvae,
            "restrict_hi": SubspaceRestriction(dim, self.restriction_width),
            "restrict_lo": SubspaceRestriction(dim, self.restriction_width),
            "object_decoder": ObjectDecoder(dim, self.decoder_hidden),
            "detection": UNet(6, 2, self.detection_width, depth=3),
            "upsampling": UNet(8, 2, self.upsampling_width, depth=3),
        }
        for name, network in networks.items():
            if name in ("object_decoder", "detection"):  # as the reference code; the others keep torch's init
                network.apply(init_normal)
            network.to(self.device)
            if self.context.circular_padding:
                make_padding_circular_in_x(network)
        return networks

    def _check_size(self, x: Tensor) -> None:
        height, width = x.shape[-2:]
        need = 2 * DSR_STRIDE  # the detection U-Net pools 3 times at half resolution
        if height % need or width % need:
            raise ConfigError(f"dsr needs model inputs whose sides are multiples of {need} px, got {height}x{width} "
                              "(choose image_size / tile_size accordingly)")

    # ------------------------------------------------------------------ the forward passes
    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Frozen VQ-VAE: images -> (F_lo, Q_lo, F_hi, Q_hi)."""
        z_lo, q_lo, z_hi, q_hi, _ = self.networks["vqvae"].quantize(x)
        return z_lo, q_lo, z_hi, q_hi

    def _object_view(self, q_lo: Tensor, q_hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Subspace restriction + object decoder: codes -> (F_lo', F_hi', I_spc)."""
        vqvae = self.networks["vqvae"]
        f_lo = self.networks["restrict_lo"](q_lo)
        f_hi = self.networks["restrict_hi"](q_hi)
        r_lo = vqvae.quantizer_lo(f_lo)[0]
        r_hi = vqvae.quantizer_hi(f_hi)[0]
        return f_lo, f_hi, self.networks["object_decoder"](vqvae.join(r_lo, r_hi))

    def _detect(self, specific: Tensor, general: Tensor) -> Tensor:
        """Anomaly-detection module at half resolution: logits (N, 2, H/2, W/2)."""
        return self.networks["detection"](torch.cat([F.avg_pool2d(specific, 2), F.avg_pool2d(general, 2)], dim=1))

    def _upsample(self, probability: Tensor, size: tuple[int, int]) -> Tensor:
        if self.context.circular_padding:
            return resize_bilinear_circular_x(probability, size)
        return F.interpolate(probability, size=size, mode="bilinear", align_corners=False)

    def _refine(self, specific: Tensor, general: Tensor, coarse: Tensor) -> Tensor:
        """Upsampling module: full-resolution logits (N, 2, H, W) from the images and the coarse
        (normal, anomalous) probabilities (N, 2, H/2, W/2)."""
        up = self._upsample(coarse, tuple(specific.shape[-2:]))
        return self.networks["upsampling"](torch.cat([specific, general, up], dim=1))

    @staticmethod
    def _focal(logits: Tensor, mask: Tensor) -> Tensor:
        """Focal loss (gamma 2, no class weights; DRAEM's and DSR's): mean over pixels."""
        return focal_loss(logits, mask[:, 0].long(), alpha=None, gamma=2.0, reduction="none").sum(1).mean()

    # ------------------------------------------------------------------ synthetic anomalies
    def _rng(self) -> np.random.Generator:
        """A numpy generator drawn from torch's (seeded by the training loop: reproducible)."""
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))

    def _perlin_masks(self, x: Tensor, rng: np.random.Generator, colour_fill: bool) -> tuple[Tensor, Tensor]:
        """Per image: with p = 1/2 a Perlin anomaly (DRAEM's generator, a random colour inside the
        mask, opacity beta ~ U(0, 0.8)), else none. Returns (images (N, 3, H, W), masks (N, 1, H, W))."""
        images = x.detach().permute(0, 2, 3, 1).cpu().numpy()
        out, masks = images.copy(), np.zeros(images.shape[:3], dtype=np.float32)
        for k, image in enumerate(images):
            if rng.random() < 0.5:
                continue
            colour = np.broadcast_to(rng.random(3, dtype=np.float32), image.shape)
            anomalous, mask = perlin_anomaly(image, rng, source=np.ascontiguousarray(colour), beta_range=(0.0, 0.8),
                                             scale_exponent_range=(0, 5))
            masks[k] = mask
            if colour_fill:
                out[k] = anomalous
        to_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).to(x.device)  # noqa: E731
        return to_tensor(out).permute(0, 3, 1, 2), to_tensor(masks).unsqueeze(1)

    def code_space_anomalies(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Stage 2's anomalies for images x (N, 3, H, W) and pixel masks (N, 1, H, W).

        Returns (real Q_lo, real Q_hi, anomalous Q_lo, anomalous Q_hi, target mask (N, 1, H, W)
        at the code blocks).
        """
        vqvae = self.networks["vqvae"]
        n = x.shape[0]
        encoded_hi, z_lo = vqvae.encode(x)
        q_lo = vqvae.quantizer_lo.lookup(vqvae.quantizer_lo.indices(z_lo))
        z_hi = vqvae.features_hi(encoded_hi, q_lo)
        q_hi = vqvae.quantizer_hi.lookup(vqvae.quantizer_hi.indices(z_hi))
        low = self.anomaly_strength_min
        strength_lo = torch.rand(n, device=x.device) * (1.0 - low) + low
        strength_hi = torch.rand(n, device=x.device) * (1.0 - low) + low
        cell_lo, cell_hi = x.shape[-1] // z_lo.shape[-1], x.shape[-1] // z_hi.shape[-1]
        mask_lo, mask_hi = block_mask(mask, cell_lo), block_mask(mask, cell_hi)
        use_both = (torch.rand(n, 1, 1, 1, device=x.device) < 0.5).float()
        use_lo = (torch.rand(n, 1, 1, 1, device=x.device) < 0.5).float()
        # both: Q_lo anomalous, Q_hi computed from it, then anomalous too; else only Q_lo (Q_hi of
        # the real Q_lo) or only Q_hi (of the real Q_lo)
        lo_anomalous = torch.maximum(use_both, use_lo)
        out_lo = replace_codes(z_lo, q_lo, vqvae.quantizer_lo.codebook, mask_lo * lo_anomalous, strength_lo)
        z_hi_after = vqvae.features_hi(encoded_hi, out_lo)
        q_hi_after = vqvae.quantizer_hi.lookup(vqvae.quantizer_hi.indices(z_hi_after))
        z_hi_source = use_both * z_hi_after + (1 - use_both) * z_hi
        q_hi_source = use_both * q_hi_after + (1 - use_both) * q_hi  # lo-only images keep the real Q_hi
        hi_anomalous = use_both + (1 - use_both) * (1 - use_lo)
        out_hi = replace_codes(z_hi_source, q_hi_source, vqvae.quantizer_hi.codebook, mask_hi * hi_anomalous, strength_hi)
        size = tuple(x.shape[-2:])
        blocks_lo = F.interpolate(mask_lo, size=size, mode="nearest")
        blocks_hi = F.interpolate(mask_hi, size=size, mode="nearest")
        target = use_both * blocks_lo + (1 - use_both) * (use_lo * blocks_lo + (1 - use_lo) * blocks_hi)
        return q_lo, q_hi, out_lo, out_hi, target

    # ------------------------------------------------------------------ training
    def training_view(self, x: Tensor) -> Tensor:
        """Random ``train_crop`` crops (one per image, offsets multiples of 16 px, seeded by the
        training loop's generator) of x (N, 3, H, W); x itself when it is not larger."""
        self._check_size(x)
        side = self.train_crop
        height, width = x.shape[-2:]
        if min(height, width) < MIN_TRAIN_SIDE:
            raise ConfigError(f"dsr trains on model inputs of at least {MIN_TRAIN_SIDE} x {MIN_TRAIN_SIDE} px, got "
                              f"{height}x{width} (choose a larger image_size / tile_size)")
        if side is None or (side >= height and (side >= width or self.context.circular_padding)):
            return x
        crop_h, crop_w = min(side, height), (width if self.context.circular_padding else min(side, width))
        step = 2 * DSR_STRIDE
        tops = torch.randint(0, (height - crop_h) // step + 1, (x.shape[0],)) * step
        lefts = torch.randint(0, (width - crop_w) // step + 1, (x.shape[0],)) * step
        return torch.stack([image[:, top:top + crop_h, left:left + crop_w]
                            for image, top, left in zip(x, tops.tolist(), lefts.tolist())])

    def training_step(self, batch: "Batch") -> Tensor:
        """Stage 2: code-space anomalies -> restriction, object decoder, anomaly detection."""
        x = self.training_view(batch.x)
        with torch.no_grad():
            _, mask = self._perlin_masks(x, self._rng(), colour_fill=False)
            q_lo_real, q_hi_real, q_lo, q_hi, target = self.code_space_anomalies(x, mask)
            general = self.networks["vqvae"].decode(q_lo, q_hi)
        f_lo, f_hi, specific = self._object_view(q_lo, q_hi)
        logits = self._detect(specific.detach(), general)
        target_half = F.max_pool2d(target, 2)
        return (self._focal(logits, target_half) + F.mse_loss(f_hi, q_hi_real) + F.mse_loss(f_lo, q_lo_real)
                + 10.0 * F.mse_loss(specific, x))

    def upsampling_step(self, batch: "Batch") -> Tensor:
        """Stage 3: image-space anomalies -> the upsampling module (focal loss at full resolution)."""
        x = self.training_view(batch.x)
        with torch.no_grad():
            anomalous, mask = self._perlin_masks(x, self._rng(), colour_fill=True)
            _, q_lo, _, q_hi = self._codes(anomalous)
            general = self.networks["vqvae"].decode(q_lo, q_hi)
            specific = self._object_view(q_lo, q_hi)[2]
            coarse = torch.softmax(self._detect(specific, general), dim=1)
        return self._focal(self._refine(specific, general, coarse), mask)

    def vqvae_step(self, batch: "Batch") -> Tensor:
        """Stage 1 on the category's images (``general_vqvae="train"``): MSE + commitment."""
        x = self.training_view(batch.x)
        vqvae = self.networks["vqvae"]
        self._vqvae_steps_done += 1
        if self._vqvae_steps_done % 100 == 1:  # keep the codebooks on the data (as tools/pretrain_dsr_vqvae.py)
            with torch.no_grad():
                encoded_hi, z_lo = vqvae.encode(x)
                vqvae.quantizer_lo.restart_dead_codes(z_lo)
                q_lo = vqvae.quantizer_lo.lookup(vqvae.quantizer_lo.indices(z_lo))
                vqvae.quantizer_hi.restart_dead_codes(vqvae.features_hi(encoded_hi, q_lo))
        reconstruction, commitment = vqvae(x)
        return F.mse_loss(reconstruction, x) + commitment

    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        """The paper's stages, each through the one training loop, earlier stages frozen."""
        nets = self.networks
        step_changes = {"lr_step_fractions": (0.8,)} if self.lr_schedule == "step" else {}
        self.stage_summaries = {}
        if self.general_vqvae == "train":
            self._vqvae_steps_done = 0
            set_trainable(nets["vqvae"], True)
            self.stage_summaries["vqvae"] = self.train_modules(
                [nets["vqvae"]], self.vqvae_step, data, progress, "training dsr 1/3 (general VQ-VAE)",
                self.training_config(max_steps=self.vqvae_steps, max_minutes=None, lr_schedule="constant",
                                     validation_interval=0, early_stopping_patience=None))
        set_trainable(nets["vqvae"], False)
        nets["vqvae"].eval()
        stage_two = [nets[name] for name in ("restrict_hi", "restrict_lo", "object_decoder", "detection")]
        set_trainable(stage_two, True)
        set_trainable(nets["upsampling"], False)
        validation = (lambda: self.held_out_loss(data)) if self.early_stopping_patience or self.validation_interval else None
        self.stage_summaries["subspaces"] = self.train_modules(
            stage_two, self.training_step, data, progress, "training dsr 2/3 (subspaces, detection)",
            self.training_config(**step_changes), validation=validation)
        set_trainable(stage_two, False)
        set_trainable(nets["upsampling"], True)
        self.stage_summaries["upsampling"] = self.train_modules(
            [nets["upsampling"]], self.upsampling_step, data, progress, "training dsr 3/3 (upsampling)",
            self.training_config(max_steps=self.upsampling_steps, max_minutes=self.upsampling_minutes,
                                 validation_interval=0, early_stopping_patience=None, **step_changes))
        set_trainable(nets["upsampling"], False)
        self.training_summary = self.stage_summaries["subspaces"]

    def fit_summary(self) -> dict[str, Any]:
        summary = super().fit_summary()
        if self.stage_summaries:
            summary["stages"] = {name: {key: value for key, value in stage.to_dict().items()
                                        if key in ("steps", "seconds", "stop_reason", "final_loss", "loss_history")}
                                 for name, stage in self.stage_summaries.items()}
            summary["seconds"] = sum(stage.seconds for stage in self.stage_summaries.values())
        return summary

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def maps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(full-resolution anomaly probability (N, H, W), coarse probability (N, 1, H/2, W/2))."""
        self._check_size(x)
        _, q_lo, _, q_hi = self._codes(x)
        general = self.networks["vqvae"].decode(q_lo, q_hi)
        specific = self._object_view(q_lo, q_hi)[2]
        coarse = torch.softmax(self._detect(specific, general), dim=1)
        fine = torch.softmax(self._refine(specific, general, coarse), dim=1)[:, 1]
        return fine, coarse[:, 1:]

    @torch.no_grad()
    def patch_scores(self, x: Tensor) -> Tensor:
        fine, coarse = self.maps(x)
        self._last = (x, self._image_scores(coarse, x.shape[-1]))
        return fine

    def _image_scores(self, coarse: Tensor, input_width: int) -> Tensor:
        """Max of the coarse probability averaged over the score window (the reference evaluation)."""
        side = max(1, round(self.image_score_window * coarse.shape[-1] / input_width))
        side += 1 - side % 2  # odd
        if self.context.circular_padding:
            from defectlens.backbones.efficientnet_lite import pad_circular_x

            padded = F.pad(pad_circular_x(coarse, side // 2, side // 2), (0, 0, side // 2, side // 2))
            averaged = F.avg_pool2d(padded, side, stride=1)
        else:
            averaged = F.avg_pool2d(coarse, side, stride=1, padding=side // 2, count_include_pad=False)
        return averaged.flatten(1).amax(dim=1)

    def image_scores(self, x: Tensor, patch_scores: Tensor) -> Tensor | None:
        """The reference image score, from the pass that made ``patch_scores`` (kept for it)."""
        if self._last is not None and self._last[0] is x:
            return self._last[1]
        return self._image_scores(self.maps(x)[1], x.shape[-1])

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Tensor]:
        if self.general_vqvae == "train":
            return {}
        return {"vqvae_sha256": torch.tensor(list(bytes.fromhex(self.vqvae_sha256)), dtype=torch.uint8)}

    def load_extra_state(self, tensors: dict[str, Tensor]) -> None:
        if self.general_vqvae == "train":
            return
        _ = self.networks  # builds (and hashes) the general VQ-VAE
        saved = bytes(tensors["vqvae_sha256"].tolist()).hex() if "vqvae_sha256" in tensors else None
        if saved != self.vqvae_sha256:
            raise ModelFileError(f"dsr: this model was trained on the general VQ-VAE with SHA-256 {saved}, but "
                                 f"{self.general_vqvae!r} now has {self.vqvae_sha256}: the stages trained on it do not fit")

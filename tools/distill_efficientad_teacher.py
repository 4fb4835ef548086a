#!/usr/bin/env python
"""Distill EfficientAD's teacher PDN from EfficientNet-Lite0 features on offline images.

The paper (Batzner et al., WACV 2024) trains the teacher PDN to predict WideResNet-101
features of ImageNet images. Neither WideResNet-101 weights nor ImageNet exist offline, so this
script distills from the bundled EfficientNet-Lite0 weights on a generic image set built here:

* images: the photographs bundled with scikit-image (`skimage.data`: astronaut, coffee,
  rocket, coins, text, ...) and scikit-learn (china, flower), plus procedural images drawn
  from the seed (colour Perlin textures, geometric scenes of shapes and lines, warped stripes /
  grids / checkers, fine-grain and brushed surfaces). No image of the shared data sets.
* crops: a random square region (scale 0.35-1.5 of the crop), random flips and 90-degree
  rotations, brightness / contrast / saturation jitter (+-0.2), grayscale with p = 0.1 (the
  paper's distillation uses grayscale with p = 0.1 as well).
* target: Lite0 sees the crop at twice the PDN's resolution (the paper feeds WideResNet 512 px
  for a 256 px PDN); its ``_blocks.4`` (stride 8 -> the PDN's stride 4 grid, 40 channels,
  receptive field 67 px at 2x = 33 px at the PDN's scale: the PDN's own 33 px) and
  ``_blocks.5`` (stride 16, 80 channels, 41 px at the PDN's scale; bilinearly resized to the
  grid) are concatenated (120 channels), standardized per channel (statistics of 256 crops drawn
  before training) and embedded in 384 channels by a fixed random orthonormal matrix
  (scaled by sqrt(384 / 120) so each output channel has about unit variance). 120 < 384: the
  embedding keeps all the information; no PCA could make more than 120 directions. No 3x3
  aggregation (PatchCore's): it would push the receptive field past what the PDN can see.
  The backbone's crop is shifted by 3 px so that its grid cells are centred where the PDN's
  are (PDN cell j at pixel 4j; Lite0's stride-8 cell j at 2x sits at 4j + 3.25).
* loss: mean squared error over every cell and channel (the paper's); Adam, lr 1e-3 with a
  100-step warm-up and cosine decay (the paper's 1e-4 is tuned for 60 000 steps), weight
  decay 1e-5; mixed precision (bfloat16 autocast, float32 weights) - about 2x faster on a CPU.

Deterministic: the same seed, thread count and CPU give the same weights (every random draw is
seeded; `defectlens.training.train` seeds torch). Prints the budget, the running training loss
and the validation loss (MSE on 64 fixed crops; the target has unit variance, so it is the
fraction of the target's variance the PDN does not explain).

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python tools/distill_efficientad_teacher.py \
        --pdn small --steps 1200 --out src/defectlens/networks/weights/efficientad_teacher_small_lite0.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from defectlens.backbones.features import fold_batch_norm
from defectlens.data.synthetic import perlin_noise
from defectlens.networks.encoder import PretrainedEncoder
from defectlens.networks.pdn import PDN, TEACHER_CHANNELS
from defectlens.training import TrainingConfig, seeded, train

TARGET_LAYERS = ("_blocks.4", "_blocks.5")
BACKBONE = "efficientnet_lite0"
BACKBONE_SHIFT = 3  # px: Lite0's stride-8 cell j at 2x resolution is centred at 4j + 3.25, the PDN's at 4j
MARGIN = 4
PHOTOS = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text",
          "checkerboard", "shepp_logan_phantom")


# ------------------------------------------------------------------------------------------ images
def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Any skimage / sklearn sample image -> float32 RGB (H, W, 3) in [0, 1]."""
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    array = array.astype(np.float32)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:  # RGBA logo: composite on white
        alpha = array[..., 3:]
        array = array[..., :3] * alpha + (1.0 - alpha)
    return np.clip(array[..., :3], 0.0, 1.0)


def photographs() -> list[np.ndarray]:
    """The sample photographs bundled with scikit-image and scikit-learn (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [_as_rgb(getattr(skimage.data, name)()) for name in PHOTOS]
    left, right, _ = skimage.data.stereo_motorcycle()
    images += [_as_rgb(left), _as_rgb(right)]
    images += [_as_rgb(image) for image in load_sample_images().images]
    return images


def _palette_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    base = perlin_noise(shape, float(rng.uniform(2.0, 16.0)), rng, octaves=int(rng.integers(1, 6)),
                        angle_deg=float(rng.uniform(0, 180)))
    detail = perlin_noise(shape, float(rng.uniform(20.0, 80.0)), rng, octaves=2)
    colours = rng.random((3, 3)).astype(np.float32)
    t = ((base + 1.0) / 2.0)[..., None]
    low, high = np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1)
    texture = (colours[0] * (1 - low) + colours[1] * low) * (1 - high) + colours[2] * high
    return np.clip(texture * (0.8 + 0.2 * detail[..., None]), 0, 1).astype(np.float32)


def _shapes_scene(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = shape
    image = _palette_texture(shape, rng) * float(rng.uniform(0.3, 1.0))
    image = np.ascontiguousarray(image)
    for _ in range(int(rng.integers(8, 40))):
        colour = tuple(float(c) for c in rng.random(3))
        kind = int(rng.integers(4))
        thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, 8))
        center = (int(rng.integers(width)), int(rng.integers(height)))
        if kind == 0:
            axes = (int(rng.integers(4, width // 4)), int(rng.integers(4, height // 4)))
            cv2.ellipse(image, center, axes, float(rng.uniform(0, 180)), 0, 360, colour, thickness, cv2.LINE_AA)
        elif kind == 1:
            corner = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.rectangle(image, center, corner, colour, thickness, cv2.LINE_AA)
        elif kind == 2:
            points = rng.integers(0, [width, height], size=(int(rng.integers(3, 7)), 2)).astype(np.int32)
            if thickness < 0:
                cv2.fillPoly(image, [points], colour, cv2.LINE_AA)
            else:
                cv2.polylines(image, [points], True, colour, thickness, cv2.LINE_AA)
        else:
            end = (int(rng.integers(width)), int(rng.integers(height)))
            cv2.line(image, center, end, colour, int(rng.integers(1, 6)), cv2.LINE_AA)
    if rng.random() < 0.3:
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 2.0)))
    return np.clip(image, 0, 1).astype(np.float32)


def _periodic_pattern(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    height, width = shape
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    warp = perlin_noise(shape, float(rng.uniform(1.0, 6.0)), rng) * float(rng.uniform(0, 20))
    u = cols * np.cos(angle) + rows * np.sin(angle) + warp
    v = -cols * np.sin(angle) + rows * np.cos(angle) + warp
    period_u, period_v = rng.uniform(4, 48, size=2)
    kind = int(rng.integers(3))
    if kind == 0:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period_u)
    elif kind == 1:
        t = ((np.floor(u / period_u) + np.floor(v / period_v)) % 2).astype(np.float32)
    else:
        t = np.maximum(0.5 + 0.5 * np.cos(2 * np.pi * u / period_u), 0.5 + 0.5 * np.cos(2 * np.pi * v / period_v))
    colours = rng.random((2, 3)).astype(np.float32)
    image = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
    image += rng.normal(0, rng.uniform(0, 0.05), image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32)


def _surface(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, shape).astype(np.float32)
    if rng.random() < 0.5:  # brushed: blur along one direction
        length = int(rng.integers(9, 61))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rotation = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        noise = cv2.filter2D(noise, -1, kernel / max(kernel.sum(), 1e-6))
    else:  # fine grain (paper, felt, cast metal)
        noise = cv2.GaussianBlur(noise, (0, 0), float(rng.uniform(0.5, 3.0)))
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    shading = perlin_noise(shape, float(rng.uniform(1.0, 4.0)), rng)
    grey = 0.5 + float(rng.uniform(0.03, 0.2)) * noise + float(rng.uniform(0, 0.2)) * shading
    tint = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    return np.clip(grey[..., None] * tint, 0, 1).astype(np.float32)


PROCEDURAL = (_palette_texture, _shapes_scene, _periodic_pattern, _surface)


def procedural_images(count: int, seed: int, side: int = 384) -> list[np.ndarray]:
    """``count`` procedural images (side x side RGB), kinds in turn, drawn from the seed."""
    return [PROCEDURAL[k % len(PROCEDURAL)]((side, side), np.random.default_rng([seed, 7, k])) for k in range(count)]


def random_crop(image: np.ndarray, side: int, rng: np.random.Generator) -> np.ndarray:
    """A square crop of ``side`` px: random region (scale 0.35-1.5), flips, 90-degree turn, colour jitter, grey."""
    height, width = image.shape[:2]
    scale = math.exp(rng.uniform(math.log(0.35), math.log(1.5)))
    region = int(min(round(side / scale), height, width))
    top, left = int(rng.integers(0, height - region + 1)), int(rng.integers(0, width - region + 1))
    crop = image[top:top + region, left:left + region]
    interpolation = cv2.INTER_AREA if region > side else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (side, side), interpolation=interpolation)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    crop = np.rot90(crop, int(rng.integers(4)))
    crop = crop.astype(np.float32)
    grey = crop.mean(axis=2, keepdims=True)
    crop = grey + (crop - grey) * float(rng.uniform(0.8, 1.2))  # saturation
    crop = (crop - crop.mean()) * float(rng.uniform(0.8, 1.2)) + crop.mean()  # contrast
    crop = crop * float(rng.uniform(0.8, 1.2))  # brightness
    if rng.random() < 0.1:
        crop = np.repeat(crop.mean(axis=2, keepdims=True), 3, axis=2)
    return np.clip(crop, 0, 1).astype(np.float32)


class CropStream:
    """Seeded batches of crops: PDN inputs (n, 3, R, R) and the backbone's shifted views."""

    def __init__(self, photos: list[np.ndarray], procedural: list[np.ndarray], crop: int, batch_size: int, seed: int):
        self.photos, self.procedural = photos, procedural
        self.crop, self.batch_size, self.seed = crop, batch_size, seed

    def batch(self, *key: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, *key])
        big = self.crop + 2 * MARGIN
        crops = []
        for _ in range(self.batch_size):
            pool = self.photos if rng.random() < 0.5 else self.procedural
            crops.append(random_crop(pool[int(rng.integers(len(pool)))], big, rng))
        stack = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
        pdn_view = stack[:, :, MARGIN:MARGIN + self.crop, MARGIN:MARGIN + self.crop]
        start = MARGIN - BACKBONE_SHIFT
        backbone_view = stack[:, :, start:start + self.crop, start:start + self.crop]
        return pdn_view.contiguous(), backbone_view.contiguous()


# ------------------------------------------------------------------------------------------ target
class DistillationTarget(torch.nn.Module):
    """Lite0 features at 2x resolution -> standardized -> embedded in 384 channels: (n, 384, R/4, R/4)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.encoder = PretrainedEncoder(BACKBONE, TARGET_LAYERS)
        # frozen: BatchNorm folded into the convolutions, channels-last (about 2x faster on a CPU)
        self.encoder.network = fold_batch_norm(self.encoder.network).to(memory_format=torch.channels_last)
        channels = sum(self.encoder.channels)
        generator = torch.Generator().manual_seed(seed)
        basis, _ = torch.linalg.qr(torch.randn(TEACHER_CHANNELS, channels, generator=generator, dtype=torch.float64))
        self.register_buffer("embedding", (basis * math.sqrt(TEACHER_CHANNELS / channels)).float())
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    @torch.no_grad()
    def features(self, backbone_view: torch.Tensor) -> torch.Tensor:
        """(n, 3, R, R) -> (n, 120, R/4, R/4) raw concatenated features."""
        upscaled = F.interpolate(backbone_view, scale_factor=2, mode="bilinear", align_corners=False)
        upscaled = upscaled.contiguous(memory_format=torch.channels_last)
        fine, coarse = self.encoder(upscaled)
        coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([fine, coarse], dim=1)

    @torch.no_grad()
    def fit_statistics(self, views: list[torch.Tensor]) -> None:
        feats = torch.cat([self.features(view).permute(1, 0, 2, 3).flatten(1) for view in views], dim=1).double()
        self.mean.copy_(feats.mean(dim=1).float())
        self.std.copy_(feats.std(dim=1).clamp_min(1e-6).float())

    @torch.no_grad()
    def forward(self, backbone_view: torch.Tensor) -> torch.Tensor:
        z = (self.features(backbone_view) - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return torch.einsum("oc,nchw->nohw", self.embedding, z).contiguous()


# ------------------------------------------------------------------------------------------ main
def state_sha256(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdn", choices=("small", "medium"), default="small")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps (the budget)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="PDN input side in px (a multiple of 4)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--procedural-images", type=int, default=96)
    parser.add_argument("--statistics-crops", type=int, default=256, help="crops for the target's channel statistics")
    parser.add_argument("--validation-crops", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (about 2x slower on a CPU)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage of --out")
    parser.add_argument("--out", type=Path, required=True, help="teacher weights (.safetensors)")
    parser.add_argument("--out-float32", type=Path, help="also write the float32 weights here")
    parser.add_argument("--history", type=Path, help="write the loss history (JSON) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    photos = photographs()
    procedural = procedural_images(args.procedural_images, args.seed)
    stream = CropStream(photos, procedural, args.crop, args.batch_size, args.seed)
    target = DistillationTarget(args.seed)
    target.fit_statistics([stream.batch(1, k)[1] for k in range(max(1, args.statistics_crops // args.batch_size))])
    validation = [stream.batch(2, k) for k in range(max(1, args.validation_crops // args.batch_size))]
    validation_targets = [target(view) for _, view in validation]
    with seeded(args.seed):
        teacher = PDN(args.pdn, TEACHER_CHANNELS)
    print(f"distilling the {args.pdn} PDN ({sum(p.numel() for p in teacher.parameters()):,} parameters) from "
          f"{BACKBONE} {'+'.join(TARGET_LAYERS)} at 2x: {args.steps} steps x {args.batch_size} crops of "
          f"{args.crop} px, {len(photos)} photographs + {len(procedural)} procedural images, seed {args.seed}, "
          f"{args.threads} threads, {'float32' if args.no_bf16 else 'bfloat16 autocast'}", flush=True)

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for k in range(100):
            pdn_view, backbone_view = stream.batch(3, epoch, k)
            yield pdn_view, target(backbone_view)

    def step(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, wanted = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
            output = teacher(images)
        return F.mse_loss(output.float(), wanted)

    @torch.no_grad()
    def validate() -> float:
        return float(np.mean([F.mse_loss(teacher(images), wanted).item()
                              for (images, _), wanted in zip(validation, validation_targets)]))

    def report(stage: str, done: int, total: int) -> None:
        if done % 50 == 0 or done == total:
            print(f"  step {done}/{total} {stage.split('|')[-1].strip()}  ({(time.perf_counter() - started) / 60:.1f} min)",
                  flush=True)

    config = TrainingConfig(max_steps=args.steps, learning_rate=args.learning_rate, weight_decay=1e-5,
                            lr_schedule="cosine", lr_warmup_steps=min(100, args.steps - 1),
                            validation_interval=max(1, args.steps // 10), seed=args.seed)
    summary = train(teacher.parameters(), step, batches, config, validation=validate, modules=[teacher],
                    progress=report, stage="distilling")
    teacher.eval()
    final_validation = validate()
    minutes = (time.perf_counter() - started) / 60
    state = {key: value.contiguous() for key, value in teacher.layers.state_dict().items()}
    metadata = {
        "format": "defectlens efficientad teacher 1", "pdn": args.pdn, "out_channels": str(TEACHER_CHANNELS),
        "backbone": BACKBONE, "target_layers": ",".join(TARGET_LAYERS), "target_scale": "2",
        "steps": str(summary.steps), "batch_size": str(args.batch_size), "crop": str(args.crop),
        "learning_rate": str(args.learning_rate), "seed": str(args.seed), "threads": str(args.threads),
        "bf16": str(not args.no_bf16), "procedural_images": str(args.procedural_images),
        "final_training_loss": f"{summary.final_loss:.6f}", "validation_loss": f"{final_validation:.6f}",
        "torch": torch.__version__, "machine": platform.machine(),
        "float32_state_sha256": state_sha256(state), "dtype": args.dtype,
    }
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    # one metadata entry: safetensors writes several in an arbitrary order, one keeps the bytes reproducible
    header = {"defectlens": json.dumps(metadata, sort_keys=True)}
    save_file({key: value.to(dtype) for key, value in state.items()}, str(args.out), metadata=header)
    if args.out_float32:
        save_file(state, str(args.out_float32), metadata={"defectlens": json.dumps({**metadata, "dtype": "float32"},
                                                                                   sort_keys=True)})
    if args.history:  # the file holds nothing that depends on the clock, so the same run gives the same bytes
        args.history.write_text(json.dumps({"loss": summary.loss_history, "validation": summary.validation_history,
                                            "minutes": round(minutes, 1), "metadata": metadata}, indent=1))
    file_digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"done: {summary.steps} steps in {minutes:.1f} min; final training loss {summary.final_loss:.4f}, "
          f"validation loss {final_validation:.4f} (fraction of the target's variance not explained)")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB, {args.dtype}), SHA-256 {file_digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

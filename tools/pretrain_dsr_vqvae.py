#!/usr/bin/env python
"""Pretrain DSR's general object-appearance VQ-VAE (stage 1) on a generic offline image set.

DSR (Zavrtanik et al., ECCV 2022) pretrains its discrete latent model - two encoders, the
codebooks K_hi and K_lo and the general appearance decoder - on ImageNet and reuses it for every
category. ImageNet is not available offline, so this script trains the same model
(`defectlens.networks.dsr.GeneralVQVAE`) on the generic image set of the EfficientAD teacher
distillation (`tools/distill_efficientad_teacher.py`, reused, not copied): the photographs bundled
with scikit-image and scikit-learn and procedural images (colour Perlin textures, scenes of
shapes and lines, warped stripes / grids / checkers, fine-grain and brushed surfaces), seen as
random crops (scale 0.35-1.5, flips, 90-degree turns, colour jitter, grey with p = 0.1). No
image of the shared data sets (MVTec AD, PIPED) is used.

Training: loss = MSE(reconstruction, crop) + the commitment losses (beta = 0.25) of both
codebooks, codebooks updated by EMA (decay 0.99), as the reference code; Adam, lr 1e-3 with a
200-step warm-up and cosine decay; codes unused for a while (EMA cluster size < 0.03) are moved
onto random feature vectors of the batch every 100 steps (common VQ-VAE practice, not in the
reference, which has ImageNet's variety to keep its 4096 codes alive). Validation: the MSE on 64
fixed crops. Deterministic: the same seed and thread count give the same weights.

    flock /tmp/defectlens-cpu.lock nice -n 5 .venv/bin/python tools/pretrain_dsr_vqvae.py \
        --steps 3000 --out src/defectlens/networks/weights/dsr_vqvae_general.safetensors

then record the printed SHA-256 in `defectlens.methods.dsr.BUNDLED_VQVAE`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_efficientad_teacher import photographs, procedural_images, random_crop  # noqa: E402

from defectlens.networks.dsr import GeneralVQVAE  # noqa: E402
from defectlens.training import TrainingConfig, seeded, train  # noqa: E402


def crops(photos: list[np.ndarray], procedural: list[np.ndarray], side: int, count: int, *key: int) -> torch.Tensor:
    """``count`` seeded crops (count, 3, side, side): photographs and procedural images half each."""
    rng = np.random.default_rng(list(key))
    chosen = []
    for _ in range(count):
        pool = photos if rng.random() < 0.5 else procedural
        chosen.append(random_crop(pool[int(rng.integers(len(pool)))], side, rng))
    return torch.from_numpy(np.stack(chosen)).permute(0, 3, 1, 2).contiguous()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=96, help="crop side in px (a multiple of 8)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--codes", type=int, default=1024)
    parser.add_argument("--procedural-images", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="weights (.safetensors)")
    parser.add_argument("--history", type=Path, help="write the loss history (JSON) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    photos = photographs()
    procedural = procedural_images(args.procedural_images, args.seed)
    validation = [crops(photos, procedural, args.crop, args.batch_size, args.seed, 2, k) for k in range(64 // args.batch_size)]
    with seeded(args.seed):
        model = GeneralVQVAE(args.hidden, args.dim, args.codes)
    print(f"pretraining DSR's general VQ-VAE ({sum(p.numel() for p in model.parameters()):,} parameters, 2 x "
          f"{args.codes} codes of {args.dim}): {args.steps} steps x {args.batch_size} crops of {args.crop} px, "
          f"{len(photos)} photographs + {len(procedural)} procedural images, seed {args.seed}, {args.threads} threads",
          flush=True)
    done = {"steps": 0, "restarted": 0}

    def batches(epoch: int) -> Iterator[torch.Tensor]:
        for k in range(100):
            yield crops(photos, procedural, args.crop, args.batch_size, args.seed, 3, epoch, k)

    def step(batch: torch.Tensor) -> torch.Tensor:
        reconstruction, commitment = model(batch)
        done["steps"] += 1
        if done["steps"] % 100 == 1:  # keep every code in use (the first call places the codebooks on data)
            with torch.no_grad():
                encoded_hi, z_lo = model.encode(batch)
                done["restarted"] += model.quantizer_lo.restart_dead_codes(z_lo)
                q_lo = model.quantizer_lo.lookup(model.quantizer_lo.indices(z_lo))
                done["restarted"] += model.quantizer_hi.restart_dead_codes(model.features_hi(encoded_hi, q_lo))
        return F.mse_loss(reconstruction, batch) + commitment

    @torch.no_grad()
    def validate() -> float:
        return float(np.mean([F.mse_loss(model(images)[0], images).item() for images in validation]))

    def report(stage: str, steps: int, total: int) -> None:
        if steps % 100 == 0 or steps == total:
            print(f"  step {steps}/{total} {stage.split('|')[-1].strip()}  ({(time.perf_counter() - started) / 60:.1f} min)",
                  flush=True)

    config = TrainingConfig(max_steps=args.steps, learning_rate=args.learning_rate, lr_schedule="cosine",
                            lr_warmup_steps=min(200, args.steps - 1), validation_interval=max(1, args.steps // 10),
                            seed=args.seed)
    summary = train(model.parameters(), step, batches, config, validation=validate, modules=[model], progress=report,
                    stage="pretraining")
    model.eval()
    final_validation = validate()
    with torch.no_grad():
        usage = [int(torch.unique(q.indices(z)).numel()) for q, z in (
            (model.quantizer_lo, model.encode(validation[0])[1]),)]
    minutes = (time.perf_counter() - started) / 60
    metadata = {
        "format": "defectlens dsr general vqvae 1", **{k: str(v) for k, v in model.config().items()},
        "steps": str(summary.steps), "batch_size": str(args.batch_size), "crop": str(args.crop),
        "learning_rate": str(args.learning_rate), "seed": str(args.seed), "threads": str(args.threads),
        "procedural_images": str(args.procedural_images), "codes_restarted": str(done["restarted"]),
        "final_training_loss": f"{summary.final_loss:.6f}", "validation_mse": f"{final_validation:.6f}",
        "torch": torch.__version__, "machine": platform.machine(),
    }
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"defectlens": json.dumps(metadata, sort_keys=True)})
    if args.history:
        args.history.write_text(json.dumps({"loss": summary.loss_history, "validation": summary.validation_history,
                                            "minutes": round(minutes, 1), "metadata": metadata}, indent=1))
    digest = hashlib.sha256(args.out.read_bytes()).hexdigest()
    print(f"done: {summary.steps} steps in {minutes:.1f} min; training loss {summary.final_loss:.5f}, validation MSE "
          f"{final_validation:.5f}; {done['restarted']} code restarts; K_lo codes used on 16 validation crops: {usage[0]}")
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**20:.2f} MiB), SHA-256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

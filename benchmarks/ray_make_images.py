"""Make a large inspection batch for the Ray benchmarks: augmented copies of MVTec transistor.

Every copy is one of the category's train/test images through a seeded light augmentation
(`defectlens.data.transforms`, preset "light": small shifts, rotations, brightness), written
as PNG; ``--bad`` extra files are not images (the batch job must report them and go on).
Nothing is committed: the default output folder is in /tmp.

    .venv/bin/python benchmarks/ray_make_images.py --count 5000 --out /tmp/defectlens-ray-images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from defectlens.data.images import read_image
from defectlens.data.transforms import AugmentationPipeline
from defectlens.outputs import encode_png


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/mvtec_ad/transistor", help="MVTec category root")
    parser.add_argument("--count", type=int, default=5000, help="images to write")
    parser.add_argument("--bad", type=int, default=5, help="extra files that are not images")
    parser.add_argument("--out", default="/tmp/defectlens-ray-images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sources = sorted(Path(args.data).glob("t*/*/*.png"))  # train/good and test/<kind>
    if not sources:
        raise SystemExit(f"no images under {args.data}/train or /test")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    augment = AugmentationPipeline.from_config("light")
    decoded = {path: read_image(path) for path in sources}
    for index in range(args.count):
        source = sources[index % len(sources)]
        pixels = augment(decoded[source], np.random.default_rng([args.seed, index]))
        rgb = (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        (out / f"{index:06d}_{source.parent.name}_{source.stem}.png").write_bytes(encode_png(rgb))
    for index in range(args.bad):
        (out / f"{args.count + index:06d}_broken.png").write_bytes(b"\x89PNG this file is broken")
    print(f"{args.count} augmented copies of {len(sources)} images and {args.bad} broken files written to {out}")


if __name__ == "__main__":
    main()

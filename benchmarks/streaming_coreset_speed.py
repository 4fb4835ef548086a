"""Time and peak memory of building a Sequential-PatchCore coreset as a stream.

Default: 400 000 patch features of 152 dimensions (what EfficientNet-Lite0 layers 2+3 give)
streamed in batches of 4096 into a coreset of M = 20 000, for 2 epochs. The patches are
random but structured like real features: a mixture of 64 clusters in a 16-dimensional latent
space, mapped to 152 dimensions through a fixed random linear map, rectified (ReLU) and with
a little noise. Batch i is regenerated from (seed, i), so the benchmark never holds the data
set: its memory is the coreset's (the (M, M) distance matrix dominates, M^2 * 4 bytes).

    .venv/bin/python benchmarks/streaming_coreset_speed.py
    .venv/bin/python benchmarks/streaming_coreset_speed.py --patches 100000 --size 5000 --epochs 3
    .venv/bin/python benchmarks/streaming_coreset_speed.py --device cuda   # where one is there
    .venv/bin/python benchmarks/streaming_coreset_speed.py --data ../shared/data/mvtec_ad/transistor

With ``--data`` (an MVTec category root): real fits instead. Greedy PatchCore (coreset ratio
--coreset-ratio) and Sequential PatchCore with M = the greedy bank's size (--epochs passes) are
fitted with the same Detector settings; the method's own seconds (coreset selection, after the
backbone features; ``FitInfo.method_seconds``), the feature and calibration seconds and the
ratio are printed. ``--save-model`` keeps the greedy model (for benchmarks/knn_search.py).

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of this process.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from defectlens.ops.streaming_coreset import StreamingCoreset


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class StructuredPatches:
    """Batch i of a synthetic, deterministic stream of patch features."""

    def __init__(self, total: int, dim: int, batch: int, seed: int, latent: int = 16, clusters: int = 64):
        self.total, self.dim, self.batch, self.seed = total, dim, batch, seed
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(clusters, latent, generator=g) * 2.0
        self.spread = torch.rand(clusters, 1, generator=g) * 0.8 + 0.2
        self.weights = torch.rand(clusters, generator=g) + 0.1
        self.mapping = torch.randn(latent, dim, generator=g) / latent**0.5

    def __len__(self) -> int:
        return -(-self.total // self.batch)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        n = min(self.batch, self.total - i * self.batch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = self.centres[labels] + self.spread[labels] * torch.randn(n, self.centres.shape[1], generator=g)
        return torch.relu(z @ self.mapping) + 0.02 * torch.randn(n, self.dim, generator=g)


def real_fits(args: argparse.Namespace) -> None:
    """Greedy PatchCore vs Sequential PatchCore on real images, the same coreset size."""
    from defectlens.detector import Detector

    rows = {}
    greedy = Detector(method="patchcore", image_size=args.image_size, coreset_ratio=args.coreset_ratio)
    start = time.perf_counter()
    greedy.fit(args.data)
    rows["patchcore"] = {**vars(greedy.fit_info), "wall_s": time.perf_counter() - start}
    size = int(greedy.method.memory_bank.shape[0])
    if args.save_model:
        greedy.save(args.save_model)
    sequential = Detector(method="sequential_patchcore", image_size=args.image_size, coreset_size=size, epochs=args.epochs)
    start = time.perf_counter()
    sequential.fit(args.data)
    rows["sequential_patchcore"] = {**vars(sequential.fit_info), "wall_s": time.perf_counter() - start}
    keys = ("feature_seconds", "method_seconds", "calibration_seconds", "wall_s")
    result = {name: {key: round(float(row[key]), 2) for key in keys} for name, row in rows.items()}
    result["sequential_patchcore"]["changes_per_epoch"] = list(sequential.method.changes_per_epoch)
    result.update(coreset_size=size, threads=torch.get_num_threads(),
                  method_seconds_ratio=round(rows["sequential_patchcore"]["method_seconds"] / rows["patchcore"]["method_seconds"], 2),
                  peak_rss_mib=round(_peak_rss_mib(), 1))
    print(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=400_000)
    parser.add_argument("--size", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help='"cpu" or "cuda"')
    parser.add_argument("--data", help="an MVTec category root: real greedy vs sequential fits (see above)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--save-model", help="with --data: write the greedy PatchCore model here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data:
        real_fits(args)
        return

    data = StructuredPatches(args.patches, args.dim, args.batch, args.seed)
    start = time.perf_counter()
    coreset = StreamingCoreset(args.size, args.dim, device=args.device)
    epochs = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        changes = sum(coreset.update(data[i]) for i in range(len(data)))
        seconds = time.perf_counter() - t0
        epochs.append({
            "epoch": epoch + 1,
            "seconds": round(seconds, 2),
            "patches_per_s": round(args.patches / seconds),
            "changes": changes,
            "min_pairwise_distance": round(coreset.min_pairwise_distance, 5),
        })
        print(json.dumps(epochs[-1]), flush=True)
        if changes == 0:
            break
    print(json.dumps({
        "patches": args.patches, "size": args.size, "dim": args.dim, "batch": args.batch,
        "device": args.device, "threads": torch.get_num_threads(),
        "total_seconds": round(time.perf_counter() - start, 2),
        "inserted": coreset.num_inserted, "replaced": coreset.num_replaced,
        "state_mib": round(coreset.memory_bytes / 2**20, 1),
        "peak_rss_mib": round(_peak_rss_mib(), 1),
        **({"peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
           if coreset.device.type == "cuda" else {}),
    }))


if __name__ == "__main__":
    main()

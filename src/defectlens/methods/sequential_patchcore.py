"""Sequential PatchCore: PatchCore whose memory bank is a fixed-size coreset built as a stream.

After the Sequential PatchCore study (aluminium surface inspection): greedy PatchCore keeps
every training patch before it subsamples, so its memory grows with images x patches; here
memory is O(M^2 + M*D) whatever the number or size of the training images.

fit (``fit_stream``; the caller supplies the batches of each epoch, later epochs augmented):
    C <- {} (or the coreset of an initial model: fine-tuning)
    for epoch = 1 .. epochs:
        for each batch of patch features p (B, D), in order:          ops.streaming_coreset
            while |C| < M: append p (copies of kept vectors are skipped)
            d_p <- distance of p to its nearest vector of C
            (a, b), d_m <- the closest pair of C (dense M x M distance matrix)
            if d_p > d_m: p replaces a or b
        stop early if the epoch changed nothing
    memory bank <- C, with the training image each vector came from
meld:  the union of several models' banks streamed through a fresh coreset of size M by the
       same rule (no image needed)
score: as PatchCore - nearest-bank distance per patch (mean over k), optional reweighting;
       leave-one-image-out calibration using the image index kept with each vector.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from defectlens.data.transforms import PRESETS
from defectlens.errors import ConfigError
from defectlens.methods.patchcore import PatchCore, flatten_patches
from defectlens.ops.streaming_coreset import StreamingCoreset, meld

EpochBatches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""batches_for_epoch(epoch) -> iterable of (features (b, C, h, w), image index (b,) int64)."""

# The study's augmentation kinds (brightness/contrast, flips, blur, noise, random masking),
# mild; flips suit textures and surfaces, not parts with a fixed orientation.
PRESETS.setdefault(
    "sequential",
    [
        {"name": "brightness_contrast", "brightness": 0.05, "contrast_range": [0.9, 1.1], "p": 0.5},
        {"name": "hflip", "p": 0.5},
        {"name": "vflip", "p": 0.5},
        {"name": "gaussian_blur", "sigma_range": [0.1, 0.8], "p": 0.3},
        {"name": "gaussian_noise", "variance_range": [10.0, 60.0], "p": 0.3},
        {"name": "random_erasing", "area_range": [0.01, 0.05], "fill": "mean", "p": 0.2},
    ],
)

INITIAL_ORIGIN = -1
"""Image index recorded for bank vectors that came from an initial model (not this fit's images)."""


class SequentialPatchCore(PatchCore):
    """PatchCore with a streaming coreset of fixed size M.

    Args:
        coreset_size: M, memory-bank vectors kept (the (M, M) distance matrix takes 4 M^2 bytes
            while fitting: 400 MB for M = 10 000).
        epochs: most passes over the training data; stops earlier when a pass changes nothing.
        num_neighbors, reweight, reweight_neighbors, chunk_size: as PatchCore (scoring).
        stream_chunk_size: patches per distance block while streaming (None: the ops
            module's automatic choice); changes speed and memory, never the result. 256 is
            fastest on CPU for M from 512 to 20 000 (larger blocks pay a (C, C) product per block).
        seed: seeds the scoring side (as PatchCore); the stream order is the caller's.
    """

    name = "sequential_patchcore"

    def __init__(
        self,
        coreset_size: int = 10_000,
        epochs: int = 3,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        chunk_size: int = 2**22,
        stream_chunk_size: int | None = 256,
        seed: int = 0,
    ) -> None:
        if int(coreset_size) < 1:
            raise ConfigError(f"coreset_size must be >= 1, got {coreset_size}")
        if int(epochs) < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        super().__init__(
            num_neighbors=num_neighbors,
            reweight=reweight,
            reweight_neighbors=reweight_neighbors,
            chunk_size=chunk_size,
            seed=seed,
        )
        self.coreset_size = int(coreset_size)
        self.epochs = int(epochs)
        self.stream_chunk_size = stream_chunk_size
        self.changes_per_epoch: list[int] = []
        self._initial_bank: torch.Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {
            "coreset_size": self.coreset_size,
            "epochs": self.epochs,
            "num_neighbors": self.num_neighbors,
            "reweight": self.reweight,
            "reweight_neighbors": self.reweight_neighbors,
            "chunk_size": self.chunk_size,
            "stream_chunk_size": self.stream_chunk_size,
            "seed": self.seed,
        }

    def warm_start(self, memory_bank: torch.Tensor) -> None:
        """Start the next fit from this bank (M0, D) instead of an empty coreset (fine-tuning).

        Its vectors are streamed in first (a bank larger than M is reduced by the same rule)
        and recorded with image index ``INITIAL_ORIGIN``.
        """
        self._initial_bank = memory_bank.detach().float()

    # ------------------------------------------------------------------ fit
    def fit(self, features: torch.Tensor, image_index: torch.Tensor | None = None) -> None:
        """Fit on features (N, C, h, w) held in memory: the same data every epoch."""
        image_index = torch.arange(features.shape[0]) if image_index is None else image_index
        self.fit_stream(lambda epoch: [(features, image_index)])

    def fit_stream(self, batches_for_epoch: EpochBatches, progress: Callable[[str, int, int], None] | None = None) -> None:
        """Build the bank from a stream: ``batches_for_epoch(epoch)`` gives that epoch's batches
        of (features (b, C, h, w), training image index (b,)). Holds one batch at a time."""
        coreset: StreamingCoreset | None = None
        self.changes_per_epoch = []
        for epoch in range(self.epochs):
            changes = 0
            for features, image_index in batches_for_epoch(epoch):
                patches = flatten_patches(features)
                if coreset is None:
                    coreset = self._start_coreset(patches.shape[1], features.device)
                origin = torch.as_tensor(image_index, dtype=torch.int64).repeat_interleave(
                    features.shape[2] * features.shape[3]
                )
                changes += coreset.update(patches, origin)
            self.changes_per_epoch.append(changes)
            if progress:
                progress("coreset epochs", epoch + 1, self.epochs)
            if changes == 0:
                break
        if coreset is None or coreset.count == 0:
            raise ConfigError("sequential PatchCore got no training patches")
        self.set_bank(coreset.coreset().clone(), coreset.coreset_origin().clone())
        self._initial_bank = None

    def _start_coreset(self, dim: int, device: torch.device) -> StreamingCoreset:
        coreset = StreamingCoreset(self.coreset_size, dim, device, torch.float32, self.stream_chunk_size, True)
        if self._initial_bank is not None:
            if self._initial_bank.shape[1] != dim:
                raise ConfigError(
                    f"the initial model's features have {self._initial_bank.shape[1]} dimensions, "
                    f"these have {dim}: use the same backbone and layers"
                )
            initial = self._initial_bank.to(device)
            coreset.update(initial, torch.full((initial.shape[0],), INITIAL_ORIGIN, dtype=torch.int64))
        return coreset

    def fit_summary(self) -> dict[str, Any]:
        """What the last fit did: epochs run and changes (insertions + replacements) per epoch."""
        return {
            "coreset_size": int(self.memory_bank.shape[0]),
            "epochs_run": len(self.changes_per_epoch),
            "changes_per_epoch": list(self.changes_per_epoch),
            "converged": bool(self.changes_per_epoch and self.changes_per_epoch[-1] == 0),
        }


def meld_banks(methods: Sequence[PatchCore], size: int, seed: int = 0, max_epochs: int = 10) -> SequentialPatchCore:
    """Merge the banks of PatchCore-family methods into one Sequential PatchCore of ``size``.

    The union of the banks is streamed (seeded order) through a fresh coreset by the same
    rule until an epoch changes nothing or ``max_epochs``. Image indices stay distinct: those
    of model k are shifted past those of models 0..k-1 (initial-model vectors stay -1).
    Scoring options (k, reweighting, chunk size) are the first model's.
    """
    if not methods:
        raise ConfigError("meld needs at least one model")
    banks, origins, offset = [], [], 0
    for method in methods:
        if not isinstance(method, PatchCore) or method.memory_bank.numel() == 0:
            raise ConfigError(f"only fitted PatchCore-family models can be melded, got {type(method).__name__}")
        index = method.bank_image_index.to(torch.int64)
        banks.append(method.memory_bank)
        origins.append(torch.where(index >= 0, index + offset, index))
        offset += int(index.max().clamp(min=-1)) + 1
    merged = meld(banks, size, seed=seed, max_epochs=max_epochs, origins=origins)
    first = methods[0]
    out = SequentialPatchCore(
        coreset_size=size,
        epochs=max_epochs,
        num_neighbors=first.num_neighbors,
        reweight=first.reweight,
        reweight_neighbors=first.reweight_neighbors,
        chunk_size=first.chunk_size,
        seed=seed,
    )
    out.set_bank(merged.coreset().clone(), merged.coreset_origin().clone())
    return out

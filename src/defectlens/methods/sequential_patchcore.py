"""Sequential PatchCore: PatchCore whose memory bank is a fixed-size coreset built as a stream.

After the Sequential PatchCore study (aluminium surface inspection): greedy PatchCore keeps
every training patch before it subsamples, so its memory grows with images x patches; here
memory is O(M^2 + M*D) whatever the number or size of the training images.

fit (``fit_batches``; ``data.epoch(e)`` gives epoch e's batches, later epochs augmented):
    C <- {} (or the bank of an initial model: fine-tuning, ``warm_start``)
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
score: as PatchCore (`ops.memory_bank`), leave-one-image-out calibration with the image
       index kept with each vector.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from defectlens.errors import ConfigError
from defectlens.methods.base import AnomalyMethod, ProgressCallback
from defectlens.methods.patchcore import MemoryBankMethod
from defectlens.ops.memory_bank import flatten_patches
from defectlens.ops.streaming_coreset import StreamingCoreset, meld

if TYPE_CHECKING:
    from defectlens.samples import FitData

INITIAL_ORIGIN = -1
"""Image index recorded for bank vectors that came from an initial model (not this fit's images)."""


class SequentialPatchCore(MemoryBankMethod):
    """PatchCore with a streaming coreset of fixed size M.

    Args:
        coreset_size: M, memory-bank vectors kept (the (M, M) distance matrix takes 4 M^2 bytes
            while fitting: 400 MB for M = 10 000).
        epochs: most passes over the training data; stops earlier when a pass changes nothing.
        stream_chunk_patches: patches per distance block while streaming (None: the ops
            module's automatic choice); changes speed and memory, never the result. 256 is
            fastest on CPU for M from 512 to 20 000 (larger blocks pay a (C, C) product per block).
        num_neighbors: k, patches' scores are the mean distance to their k nearest bank patches.
        reweight: use the PatchCore paper's image-score reweighting instead of the max of the map.
        reweight_neighbors: b, the bank neighbourhood size of that reweighting.
        search_chunk_distances: most query x bank distances held at once during search.
    """

    name = "sequential_patchcore"
    renamed_options = {"chunk_size": "search_chunk_distances", "stream_chunk_size": "stream_chunk_patches", "seed": None}

    def __init__(
        self, coreset_size: int = 10_000, epochs: int = 3, stream_chunk_patches: int | None = 256, **scoring: Any
    ) -> None:
        if int(coreset_size) < 1:
            raise ConfigError(f"coreset_size must be >= 1, got {coreset_size}")
        if int(epochs) < 1:
            raise ConfigError(f"epochs must be >= 1, got {epochs}")
        super().__init__(**scoring)
        self.coreset_size = int(coreset_size)
        self.epochs = int(epochs)
        self.stream_chunk_patches = stream_chunk_patches
        self.changes_per_epoch: list[int] = []
        self._initial_bank: torch.Tensor | None = None

    def warm_start(self, source: AnomalyMethod) -> None:
        """Start the next fit from the bank of a fitted PatchCore-family method.

        Its vectors are streamed in first (a bank larger than M is reduced by the same rule)
        and recorded with image index ``INITIAL_ORIGIN``.
        """
        if not isinstance(source, MemoryBankMethod) or source.memory_bank.numel() == 0:
            raise ConfigError(f"the initial model ({source.name}) has no memory bank to start from")
        self._initial_bank = source.memory_bank.detach().float()

    def fit_batches(self, data: "FitData", progress: ProgressCallback | None = None) -> None:
        """Build the bank from the stream of epochs; holds one batch at a time."""
        coreset: StreamingCoreset | None = None
        self.changes_per_epoch = []
        for epoch in range(self.epochs):
            changes = 0
            for batch in data.epoch(epoch):
                patches = flatten_patches(batch.x)
                if coreset is None:
                    coreset = self._start_coreset(patches.shape[1], batch.x.device)
                origin = batch.image_index.repeat_interleave(batch.x.shape[2] * batch.x.shape[3])
                changes += coreset.update(patches, origin)
            self.changes_per_epoch.append(changes)
            if progress:
                progress("coreset epochs", epoch + 1, self.epochs)
            if changes == 0:
                break
        if coreset is None or coreset.count == 0:
            raise ConfigError("sequential PatchCore got no training patches")
        self.bank.set_bank(coreset.coreset().clone(), coreset.coreset_origin().clone())
        self._initial_bank = None

    def _start_coreset(self, dim: int, device: torch.device) -> StreamingCoreset:
        coreset = StreamingCoreset(self.coreset_size, dim, device, torch.float32, self.stream_chunk_patches, True)
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


def meld_banks(methods: Sequence[AnomalyMethod], size: int, seed: int = 0, max_epochs: int = 10) -> SequentialPatchCore:
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
        if not isinstance(method, MemoryBankMethod) or method.memory_bank.numel() == 0:
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
        search_chunk_distances=first.search_chunk_distances,
    )
    out.bind(first.context)
    out.bank.set_bank(merged.coreset().clone(), merged.coreset_origin().clone())
    return out

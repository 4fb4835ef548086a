"""Exact nearest-neighbour distances to a memory bank: brute force in chunks of bounded memory,
or a pruned exact index (``ops.exact_search``) where that is faster."""

from __future__ import annotations

import logging
import threading

import torch

from defectlens.ops import exact_search

logger = logging.getLogger(__name__)

# "auto" uses the pruned index from this many bank rows on (below, one matmul is as fast).
PRUNED_MIN_ROWS = 4096
ALGORITHMS = ("auto", "pruned", "brute_force")


class NearestNeighbours:
    """Exact Euclidean k-nearest-neighbour search against a fixed bank.

    Two algorithms give the same answer (``exact_search`` states the float32 guarantee):

    * ``brute_force``: distances ||q||^2 - 2 q.b + ||b||^2 with one matrix product per chunk. A
      chunk holds at most ``chunk_size`` query x bank distances (float32), so peak memory is
      about 4 * chunk_size bytes whatever the number of queries; the buffer is reused.
    * ``pruned``: ``exact_search.PrunedIndex`` - k-means cells and PCA lower bounds discard
      ~99.8 % of the bank before any full distance is computed (~10x faster on a 21 800 x 152
      PatchCore bank). Built on the first query (about a second), kept in memory only.

    ``auto`` (default) picks ``pruned`` for a CPU bank of at least ``PRUNED_MIN_ROWS`` rows and
    more than ``exact_search.FINE_DIMS`` dimensions when numba is installed, else brute force.

    Args:
        bank: (M, D) float32 memory bank.
        chunk_size: largest number of distances held at once (brute force; the pruned index
            prepares chunk_size / (D + 320) queries at a time).
        algorithm: "auto", "pruned" or "brute_force".
    """

    def __init__(self, bank: torch.Tensor, chunk_size: int = 2**22, algorithm: str = "auto") -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.bank = bank.float().contiguous()
        self.bank_sq_norms = (self.bank * self.bank).sum(dim=1)
        self.chunk_size = max(int(chunk_size), self.bank.shape[0])
        self._buffer: torch.Tensor | None = None
        num_rows, dim = self.bank.shape if self.bank.ndim == 2 else (0, 0)
        prunable = (
            exact_search.available()
            and self.bank.device.type == "cpu"
            and num_rows >= 2
            and dim > exact_search.FINE_DIMS
        )
        if algorithm == "pruned" and not prunable:
            raise ValueError(
                "the pruned index needs numba, a CPU bank of >= 2 rows and more than "
                f"{exact_search.FINE_DIMS} dimensions (bank {tuple(self.bank.shape)} on {self.bank.device})"
            )
        self.algorithm = (
            "pruned" if algorithm == "pruned" or (algorithm == "auto" and prunable and num_rows >= PRUNED_MIN_ROWS)
            else "brute_force"
        )
        self._index: exact_search.PrunedIndex | None = None
        self._index_lock = threading.Lock()

    def __getstate__(self) -> dict:
        """Copies and pickles (``copy.deepcopy`` of a fitted detector, worker processes): without
        the lock and the scratch buffer; a built index travels with it (it is plain arrays)."""
        state = self.__dict__.copy()
        state["_index_lock"] = None
        state["_buffer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._index_lock = threading.Lock()

    @property
    def index(self) -> exact_search.PrunedIndex:
        """The pruned index (built on first use; only with ``algorithm == "pruned"``)."""
        if self._index is None:
            with self._index_lock:
                if self._index is None:
                    self._index = exact_search.PrunedIndex(self.bank)
        return self._index

    def _distance_buffer(self, rows: int) -> torch.Tensor:
        needed = rows * self.bank.shape[0]
        if self._buffer is None or self._buffer.numel() < needed:
            self._buffer = torch.empty(needed, dtype=torch.float32, device=self.bank.device)
        return self._buffer[:needed].view(rows, self.bank.shape[0])

    @torch.inference_mode()
    def query(
        self, queries: torch.Tensor, k: int = 1, excluded: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (Q, k) ascending and bank indices (Q, k) of the k nearest bank rows.

        Args:
            queries: (Q, D) float32.
            k: number of neighbours (<= M).
            excluded: optional bool (M,): bank rows that must not be returned.
        """
        queries = queries.float()
        k = min(k, self.bank.shape[0])
        if self.algorithm == "pruned" and queries.device.type == "cpu" and self._pruned_can_answer(queries, k, excluded):
            query_chunk = max(1, self.chunk_size // (self.bank.shape[1] + 320))
            return self.index.query(queries, k, excluded, query_chunk)
        return self._brute_force(queries, k, excluded)

    @staticmethod
    def _pruned_can_answer(queries: torch.Tensor, k: int, excluded: torch.Tensor | None) -> bool:
        """Cases where brute force's answer is defined by its formula, not by a nearest row:
        k of 0, fewer allowed rows than k (it returns excluded rows at +inf) and non-finite
        queries."""
        if k < 1 or queries.shape[0] == 0:
            return False
        if excluded is not None and int((~excluded.bool()).sum()) < k:
            return False
        return bool(torch.isfinite(queries).all())

    def _brute_force(
        self, queries: torch.Tensor, k: int, excluded: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        bank_sq_norms = self.bank_sq_norms
        if excluded is not None:
            bank_sq_norms = bank_sq_norms.masked_fill(excluded, float("inf"))
        num_queries = queries.shape[0]
        distances = torch.empty((num_queries, k), dtype=torch.float32, device=queries.device)
        indices = torch.empty((num_queries, k), dtype=torch.int64, device=queries.device)
        rows_per_chunk = max(1, self.chunk_size // max(self.bank.shape[0], 1))
        for start in range(0, num_queries, rows_per_chunk):
            chunk = queries[start : start + rows_per_chunk]
            squared = self._distance_buffer(chunk.shape[0])
            # squared = ||b||^2 - 2 q.b, then + ||q||^2 after the top-k (saves a full pass).
            torch.addmm(bank_sq_norms.unsqueeze(0), chunk, self.bank.T, beta=1.0, alpha=-2.0, out=squared)
            if k == 1:
                best, best_index = squared.min(dim=1, keepdim=True)
            else:
                best, best_index = torch.topk(squared, k, dim=1, largest=False)
            best = best + (chunk * chunk).sum(dim=1, keepdim=True)
            distances[start : start + chunk.shape[0]] = best.clamp_min_(0.0).sqrt_()
            indices[start : start + chunk.shape[0]] = best_index
        return distances, indices

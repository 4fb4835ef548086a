"""Exact nearest-neighbour distances to a memory bank, in chunks of bounded memory."""

from __future__ import annotations

import torch


class NearestNeighbours:
    """Exact Euclidean k-nearest-neighbour search against a fixed bank.

    Distances are ||q||^2 - 2 q.b + ||b||^2 with one matrix product per chunk. A chunk holds
    at most ``chunk_size`` query x bank distances (float32), so peak memory is about
    4 * chunk_size bytes whatever the number of queries; the buffer is reused across chunks.

    Args:
        bank: (M, D) float32 memory bank.
        chunk_size: largest number of distances held at once.
    """

    def __init__(self, bank: torch.Tensor, chunk_size: int = 2**22) -> None:
        self.bank = bank.float().contiguous()
        self.bank_sq_norms = (self.bank * self.bank).sum(dim=1)
        self.chunk_size = max(int(chunk_size), self.bank.shape[0])
        self._buffer: torch.Tensor | None = None

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
        bank_sq_norms = self.bank_sq_norms
        if excluded is not None:
            bank_sq_norms = bank_sq_norms.masked_fill(excluded, float("inf"))
        queries = queries.float()
        num_queries = queries.shape[0]
        k = min(k, self.bank.shape[0])
        distances = torch.empty((num_queries, k), dtype=torch.float32, device=queries.device)
        indices = torch.empty((num_queries, k), dtype=torch.int64, device=queries.device)
        rows_per_chunk = max(1, self.chunk_size // self.bank.shape[0])
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

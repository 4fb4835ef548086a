"""Exact Euclidean nearest-neighbour search that skips most of the bank, proven, not guessed.

PatchCore scores every test patch by its distance to the nearest memory-bank row. Brute force
costs Q x M x D multiply-adds (1024 x 21 800 x 152 per 256 px transistor image, ~100 ms on two
cores). ``PrunedIndex`` returns the same rows after computing full distances to ~0.2 % of the
bank, by a cascade of lower bounds, each of which only removes rows that provably cannot be
among the k nearest:

1. **Cells** (k-means over the bank, rows assigned to their exact nearest centroid). For a
   query q with nearest centroid c1, every row b of cell c satisfies
   ``|q - b| >= (|q - c|^2 - |q - c1|^2) / (2 |c - c1|)`` (distance to the Voronoi boundary)
   and ``|q - b| >= |q - c| - r_c`` (r_c: the cell radius). A cell whose bound exceeds the
   current k-th best distance is skipped whole.
2. **PCA, 15 + 1 dimensions.** With W the bank's principal axes (orthonormal), z = W^T (x - mu)
   and a_d(x) = (z_1..z_d, |z_{d+1..D}|), ``|a_d(q) - a_d(b)| <= |q - b|`` (Pythagoras plus
   the reverse triangle inequality on the residual). The rows of the visited cells are
   bounded with d = 15 in one vectorised pass (16 multiply-adds per row instead of 152).
3. **PCA, 63 + 1 dimensions** for the rows that survive 2.
4. **Exact distance** ``sum_i (q_i - b_i)^2`` for the rows that survive 3.

The current k-th best distance starts from the answer of the previous query (neighbouring
patches have similar nearest rows) and from the query's own nearest cell, so it is tight early.

Exactness (float32). The result is, for every query, the k rows with the smallest float32
squared distance ``sum_i (q_i - b_i)^2`` (computed directly, always by the same code), ties
broken by the lower bank index, among the rows not ``excluded``. Every bound above is compared
with ``best * (1 + 1e-4) + 1e-4 * (|q - mu|^2 + max_b |b - mu|^2)``: a margin that is more than
twenty times the worst-case float32 round-off of the bound, of the rotation's orthogonality
and of the exact distance, so rounding never prunes a row that is (or ties with) one of the k
nearest. The answer therefore does not depend on the pruning, the order in which queries come,
the batch or the number of threads. Brute force ranks by the expanded formula
|q|^2 - 2 q.b + |b|^2, whose round-off is ~1e-6 of |q|^2 + |b|^2: the two can pick different
rows only when those rows' distances agree to that precision (a tie for every practical
purpose), and the distances agree to float32 round-off.

The index lives in memory only (rebuilt in about a second from the bank: k-means, one D x D
eigendecomposition); nothing is saved in model files. The kernel is compiled with numba (on
first use, cached on disk); without numba ``available()`` is False and callers fall back to
brute force.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

try:  # numba is needed for the pruned kernel only; brute force works without it.
    import numba
    from numba import njit, uint64, int64
except ImportError:  # pragma: no cover - exercised where numba is not installed
    numba = None

# Relative and absolute (x (|q - mu|^2 + max |b - mu|^2)) safety margins of every bound.
SLACK = 1e-4
# Dimensions of the two PCA levels, each + 1 residual norm; level 1 is written out for 16 terms.
COARSE_DIMS = 15
FINE_DIMS = 63
_FINE_WIDTH = FINE_DIMS + 1
# Rows are stored in whole blocks of this many per cell (vector loops without remainders).
_ALIGN = 16
# Queries handled one after another by a thread (each uses the previous one's answer).
_QUERY_BLOCK = 64
_KMEANS_ITERATIONS = 8
# Threads running the kernel (it releases the GIL); callers share one pool.
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def available() -> bool:
    """True when the pruned kernel can run (numba is importable)."""
    return numba is not None


if numba is not None:
    _FASTMATH = {"reassoc", "contract", "nsz"}  # no 'ninf'/'nnan': +inf marks padding rows

    @njit(fastmath=_FASTMATH, boundscheck=False, inline="always", cache=True)
    def _exact_sq(query, bank, pos, dim):  # pragma: no cover - compiled
        """sum_i (query_i - bank[pos]_i)^2 in float32 (bank flat, row-major)."""
        total = np.float32(0.0)
        offset = pos * dim
        for i in range(dim):
            diff = query[i] - bank[offset + i]
            total += diff * diff
        return total

    @njit(boundscheck=False, inline="always", cache=True)
    def _insert(best_sq, best_pos, value, pos, original, k):  # pragma: no cover - compiled
        """Insert (value, pos) into the k best, ascending by (value, original index)."""
        last = best_pos[k - 1]
        rank = original[pos]
        if value > best_sq[k - 1] or (value == best_sq[k - 1] and last >= 0 and rank >= original[last]):
            return
        for h in range(k):
            if best_pos[h] == pos:
                return
        p = k - 1
        while p > 0 and (best_sq[p - 1] > value or (best_sq[p - 1] == value and original[best_pos[p - 1]] > rank)):
            best_sq[p] = best_sq[p - 1]
            best_pos[p] = best_pos[p - 1]
            p -= 1
        best_sq[p] = value
        best_pos[p] = pos

    @njit(fastmath=_FASTMATH, boundscheck=False, inline="always", cache=True)
    def _coarse_bounds(a, z1, stride, norms, t, out, start, count):  # pragma: no cover - compiled
        """Level-1 squared lower bounds of rows start..start+count (16 PCA terms, one pass)."""
        s = start
        m = stride
        for i in range(count):
            out[i] = norms[s + i] + t + np.float32(-2.0) * (
                a[0] * z1[s + i] + a[1] * z1[s + m + i] + a[2] * z1[s + uint64(2) * m + i]
                + a[3] * z1[s + uint64(3) * m + i] + a[4] * z1[s + uint64(4) * m + i]
                + a[5] * z1[s + uint64(5) * m + i] + a[6] * z1[s + uint64(6) * m + i]
                + a[7] * z1[s + uint64(7) * m + i] + a[8] * z1[s + uint64(8) * m + i]
                + a[9] * z1[s + uint64(9) * m + i] + a[10] * z1[s + uint64(10) * m + i]
                + a[11] * z1[s + uint64(11) * m + i] + a[12] * z1[s + uint64(12) * m + i]
                + a[13] * z1[s + uint64(13) * m + i] + a[14] * z1[s + uint64(14) * m + i]
                + a[15] * z1[s + uint64(15) * m + i]
            )

    @njit(nogil=True, fastmath=_FASTMATH, boundscheck=False, cache=True)
    def _search(  # pragma: no cover - compiled
        queries, centred, projected, centroid_sq, inv_gap, radius, bank, original, excluded,
        z1, norms, z2, cell_start, cell_stop, longest_cell, k, slack, slack_abs, hint_pos,
        out_sq, out_pos, counts, first_block, stop_block,
    ):
        """Queries of blocks first_block..stop_block-1 (of _QUERY_BLOCK rows): k best (squared
        distance, sorted position); counts (blocks, 3): rows bounded at level 1, at level 2,
        computed exactly. Releases the GIL: threads run disjoint block ranges.

        queries (Q, D); centred = queries - mean (Q, D); projected = centred @ [axes | centroids^T]
        (Q, D + C): the rotated coordinates, then the dot products with the centroids.
        """
        num_queries = queries.shape[0]
        dim = uint64(queries.shape[1])
        num_cells = centroid_sq.shape[0]
        ndim = queries.shape[1]
        fine_width = uint64(_FINE_WIDTH)
        stride = uint64(norms.shape[0])
        for block in range(first_block, stop_block):
            bounds = np.empty(longest_cell, np.float32)
            fine_bound = np.empty(longest_cell, np.float32)
            candidate = np.empty(longest_cell, np.uint64)
            cell_bound = np.empty(num_cells, np.float32)
            dq = np.empty(num_cells, np.float32)
            a1 = np.empty(COARSE_DIMS + 1, np.float32)
            a2 = np.empty(_FINE_WIDTH, np.float32)
            best_sq = np.empty(k, np.float32)
            best_pos = np.empty(k, np.int64)
            previous = hint_pos.copy()
            level1 = 0
            level2 = 0
            level3 = 0
            for qi in range(block * _QUERY_BLOCK, min(num_queries, (block + 1) * _QUERY_BLOCK)):
                query = queries[qi]
                row = centred[qi]
                t = np.float32(0.0)
                for j in range(ndim):
                    t += row[j] * row[j]
                z = projected[qi]
                tail = np.float32(0.0)  # |z_{d..D}|^2, accumulated from the last coordinate down
                for j in range(ndim - 1, FINE_DIMS - 1, -1):
                    tail += z[j] * z[j]
                a2[FINE_DIMS] = np.sqrt(tail)
                for j in range(FINE_DIMS - 1, COARSE_DIMS - 1, -1):
                    tail += z[j] * z[j]
                    a2[j] = z[j]
                a1[COARSE_DIMS] = np.sqrt(tail)
                for j in range(COARSE_DIMS):
                    a1[j] = z[j]
                    a2[j] = z[j]
                for c in range(num_cells):
                    dq[c] = t + centroid_sq[c] - np.float32(2.0) * z[ndim + c]
                margin = np.float32(slack_abs + slack * t)
                grow = np.float32(1.0 + slack)
                nearest = 0
                nearest_sq = dq[0]
                for c in range(1, num_cells):
                    if dq[c] < nearest_sq:
                        nearest_sq = dq[c]
                        nearest = c
                gaps = inv_gap[nearest]
                for c in range(num_cells):
                    x = dq[c] - margin
                    plane = (x - nearest_sq) * gaps[c]
                    x = x if x > 0 else np.float32(0.0)
                    ball = np.sqrt(x) - radius[c]
                    v = plane if plane > ball else ball
                    v = v if v > 0 else np.float32(0.0)
                    cell_bound[c] = v * v
                cell_bound[nearest] = 0.0
                best_sq[:] = np.inf
                best_pos[:] = -1
                for h in range(k):
                    pos = previous[h]
                    if pos >= 0 and not excluded[pos]:
                        _insert(best_sq, best_pos, _exact_sq(query, bank, uint64(pos), dim), pos, original, k)
                        level3 += 1
                for step in range(num_cells):
                    # the query's nearest cell first, then the others in index order
                    c = nearest if step == 0 else (step - 1 if step - 1 < nearest else step)
                    threshold = best_sq[k - 1] * grow + margin
                    if cell_bound[c] > threshold:
                        continue
                    start = uint64(cell_start[c])
                    count = uint64(cell_stop[c]) - start
                    level1 += int64(count)
                    _coarse_bounds(a1, z1, stride, norms, t, bounds, start, count)
                    # Survivors of level 1, compacted without branches; then their level-2
                    # bounds in a loop of independent iterations (the row loads overlap).
                    survivors = 0
                    for i in range(count):
                        survivors += bounds[i] <= threshold
                    if survivors == 0:
                        continue
                    survivors = 0
                    for i in range(count):
                        candidate[survivors] = i
                        survivors += bounds[i] <= threshold
                    if survivors == 0:
                        continue
                    level2 += survivors
                    for j in range(survivors):
                        pos = start + candidate[j]
                        acc = np.float32(0.0)
                        offset = pos * fine_width
                        for jj in range(fine_width):
                            acc += a2[jj] * z2[offset + jj]
                        fine_bound[j] = t + norms[pos] - np.float32(2.0) * acc
                    for j in range(survivors):
                        if fine_bound[j] <= threshold:
                            pos = start + candidate[j]
                            if excluded[pos]:
                                continue
                            level3 += 1
                            _insert(best_sq, best_pos, _exact_sq(query, bank, pos, dim), int64(pos), original, k)
                            threshold = best_sq[k - 1] * grow + margin
                for h in range(k):
                    out_sq[qi, h] = best_sq[h]
                    out_pos[qi, h] = best_pos[h]
                    previous[h] = best_pos[h]
            counts[block, 0] = level1
            counts[block, 1] = level2
            counts[block, 2] = level3


def _run_blocks(args: tuple[Any, ...], num_blocks: int) -> None:
    """Run ``_search`` over blocks 0..num_blocks-1, split in contiguous ranges over
    ``torch.get_num_threads()`` threads (the calling thread takes the first range)."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), num_blocks))
    bounds = [num_blocks * i // threads for i in range(threads + 1)]
    if threads == 1:
        _search(*args, 0, num_blocks)
        return
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2) - 1, thread_name_prefix="exact-search")
        pool = _POOL
    futures = [pool.submit(_search, *args, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    _search(*args, bounds[0], bounds[1])
    for future in futures:
        future.result()


def _kmeans(points: torch.Tensor, num_cells: int, seed: int) -> torch.Tensor:
    """Lloyd's k-means (float32, seeded random init); returns centroids (C, D)."""
    generator = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(points.shape[0], generator=generator)[:num_cells]].clone()
    sq = (points * points).sum(1)
    for _ in range(_KMEANS_ITERATIONS):
        assign = torch.addmm(sq[:, None], points, centroids.T, alpha=-2.0).add_((centroids * centroids).sum(1)).argmin(1)
        counts = torch.bincount(assign, minlength=num_cells).to(points.dtype)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class PrunedIndex:
    """Exact k-nearest-neighbour index of a bank (M, D) float32 on the CPU (see module doc).

    Args:
        bank: (M, D) float32 rows; D must exceed ``FINE_DIMS``.
        num_cells: k-means cells (default: about M / 100, between 16 and 512).
        seed: seeds the k-means initialisation (the answers never depend on it).

    Memory: a second copy of the bank in cell order plus 16 + 64 floats per row (~1.5 x the
    bank); queries are processed in chunks of ``query_chunk`` rows.
    """

    def __init__(self, bank: torch.Tensor, num_cells: int | None = None, seed: int = 0) -> None:
        if numba is None:
            raise RuntimeError("the pruned nearest-neighbour index needs numba (pip install numba)")
        bank = bank.detach().to("cpu", torch.float32).contiguous()
        num_rows, dim = bank.shape
        if dim <= FINE_DIMS or num_rows < 2:
            raise ValueError(f"pruned search needs D > {FINE_DIMS} and M >= 2, got bank {tuple(bank.shape)}")
        self.num_rows, self.dim = num_rows, dim
        wide = bank.double()
        mean = wide.mean(0)
        centred = wide - mean
        _, axes = torch.linalg.eigh(centred.T @ centred)
        axes = axes.flip(1)  # principal axes, largest variance first
        cells = num_cells if num_cells is not None else min(512, max(16, num_rows // 100))
        cells = max(1, min(int(cells), num_rows))
        centroids = _kmeans(centred.float(), cells, seed).double()
        # Exact (float64) nearest-centroid assignment to the final centroids: the Voronoi bound
        # needs every row in the cell of its nearest centroid.
        assign = torch.cdist(centred, centroids).argmin(1)
        used = torch.bincount(assign, minlength=cells) > 0
        centroids = centroids[used]
        assign = (torch.cumsum(used.long(), 0) - 1)[assign]
        cells = centroids.shape[0]
        radius = torch.zeros(cells, dtype=torch.float64).scatter_reduce_(
            0, assign, (centred - centroids[assign]).norm(dim=1), "amax"
        )
        counts = torch.bincount(assign, minlength=cells)
        padded = (counts + _ALIGN - 1) // _ALIGN * _ALIGN
        stop = torch.cumsum(padded, 0)
        start = stop - padded
        total = int(stop[-1])
        by_cell = torch.sort(assign, stable=True).indices
        rank = torch.arange(num_rows) - (torch.cumsum(counts, 0) - counts)[assign[by_cell]]
        original = torch.full((total,), -1, dtype=torch.int64)
        original[start[assign[by_cell]] + rank] = by_cell
        valid = original >= 0

        rows = torch.zeros(total, dim, dtype=torch.float64)
        rows[valid] = centred[original[valid]]
        rotated = rows @ axes
        coarse = torch.cat([rotated[:, :COARSE_DIMS], rotated[:, COARSE_DIMS:].norm(dim=1, keepdim=True)], 1)
        fine = torch.cat([rotated[:, :FINE_DIMS], rotated[:, FINE_DIMS:].norm(dim=1, keepdim=True)], 1)
        norms = (rows * rows).sum(1)
        norms[~valid] = math.inf  # padding rows: bound +inf, never a candidate
        sorted_bank = torch.zeros(total, dim, dtype=torch.float32)
        sorted_bank[valid] = bank[original[valid]]
        gap = 2.0 * torch.cdist(centroids, centroids)
        inv_gap = torch.where(gap > 0, 1.0 / gap, torch.zeros(()))
        inv_gap.fill_diagonal_(0.0)

        self.num_cells = cells
        self.mean = mean.float()
        self.axes = axes.float().contiguous()
        self.centroids = centroids.float().contiguous()
        self._projection = torch.cat([axes, centroids.T], 1).float().contiguous()  # (D, D + C)
        self._centroid_sq = (centroids * centroids).sum(1).float().numpy()
        self._inv_gap = inv_gap.float().contiguous().numpy()
        self._radius = (radius * (1 + 1e-6)).float().numpy()
        self._bank = sorted_bank.numpy().reshape(-1)
        self._original = original.numpy()
        self._padding = (~valid).numpy()
        self._z1 = coarse.T.float().contiguous().numpy().reshape(-1)
        self._z2 = fine.float().contiguous().numpy().reshape(-1)
        self._norms = norms.float().numpy()
        self._cell_start = start.numpy().astype(np.int64)
        self._cell_stop = stop.numpy().astype(np.int64)
        self._longest_cell = int(padded.max())
        self._slack_abs = SLACK * float(norms[valid].max())
        self.last_counts = np.zeros(3)

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the index arrays."""
        arrays = (self._bank, self._z1, self._z2, self._norms, self._original, self._padding, self._inv_gap)
        return int(sum(a.nbytes for a in arrays))

    def _sorted_excluded(self, excluded: torch.Tensor | None) -> np.ndarray:
        mask = self._padding.copy()
        if excluded is not None:
            flags = excluded.detach().to("cpu", torch.bool).numpy()
            mask |= flags[np.maximum(self._original, 0)] & ~self._padding
        return mask

    def query(
        self, queries: torch.Tensor, k: int = 1, excluded: torch.Tensor | None = None, query_chunk: int = 8192
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Distances (Q, k) float32 ascending and bank indices (Q, k) int64 of the k nearest rows.

        Args:
            queries: (Q, D) float32 (CPU).
            k: 1 <= k <= number of rows not excluded.
            excluded: optional bool (M,): rows never returned.
            query_chunk: queries prepared at once (memory: ~4 * query_chunk * (D + C + 64) bytes).
        """
        queries = queries.detach().to("cpu", torch.float32).contiguous()
        num_queries = queries.shape[0]
        distances = torch.empty((num_queries, k), dtype=torch.float32)
        indices = torch.empty((num_queries, k), dtype=torch.int64)
        if num_queries == 0:
            return distances, indices
        skip = self._sorted_excluded(excluded)
        counts_total = np.zeros(3)
        hint = np.full(k, -1, dtype=np.int64)
        for begin in range(0, num_queries, query_chunk):
            chunk = queries[begin : begin + query_chunk]
            arrays = self._prepare(chunk)
            sq = np.empty((chunk.shape[0], k), np.float32)
            pos = np.empty((chunk.shape[0], k), np.int64)
            counts = np.zeros(((chunk.shape[0] + _QUERY_BLOCK - 1) // _QUERY_BLOCK, 3), np.int64)
            args = (
                chunk.numpy(), *arrays, self._inv_gap, self._radius, self._bank, self._original, skip,
                self._z1, self._norms, self._z2, self._cell_start, self._cell_stop, self._longest_cell,
                k, SLACK, self._slack_abs, hint, sq, pos, counts,
            )
            _run_blocks(args, counts.shape[0])
            counts_total += counts.sum(0)
            rows = torch.from_numpy(pos)
            distances[begin : begin + chunk.shape[0]] = torch.from_numpy(sq).sqrt_()
            indices[begin : begin + chunk.shape[0]] = torch.from_numpy(self._original)[rows.clamp_min(0)]
        self.last_counts = counts_total / num_queries
        return distances, indices

    def _prepare(self, chunk: torch.Tensor) -> tuple[Any, ...]:
        """Per-query inputs of the kernel (float32 numpy): the centred queries (Q, D) and their
        products with [axes | centroids^T] (Q, D + C) - two torch calls whatever the batch."""
        centred = chunk - self.mean
        return centred.numpy(), (centred @ self._projection).numpy(), self._centroid_sq

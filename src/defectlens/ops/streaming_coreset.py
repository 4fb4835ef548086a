"""Fixed-size PatchCore coreset built as a stream (Sequential PatchCore).

The memory bank of PatchCore is normally a k-center greedy coreset of *all* training patch
features, so memory grows with (images x patches). The sequential variant keeps a bank of a
fixed size M and feeds the patches through it one at a time; memory is O(M^2 + M*D) whatever
the number or size of the training images.

The rule, for one patch p (``StreamingCoreset.update`` applies it to each row of a batch in
order, so the result does not depend on how the stream is cut into batches):

1. While the coreset holds fewer than M vectors, p is appended, unless it duplicates a vector
   already kept (distance 0): a copy adds no coverage and would pin d_m at 0.
2. Otherwise let d_p be the distance from p to its nearest coreset vector and d_m the smallest
   pairwise distance in the coreset, reached by the pair (a, b). If d_p > d_m, p replaces one
   member of that pair; otherwise p is dropped.

Which member goes: the one whose *second*-nearest coreset vector (its nearest other than its
partner) is closer. Removing either member costs at most d_m of coverage (the partner stays
within d_m of it, triangle inequality), so the tie is broken by density: the member with the
closer second neighbour sits in the denser neighbourhood, which is still covered by two
vectors after it leaves; the other member keeps covering the sparser side. On equality the
first of the pair (the lower row with the smallest nearest-neighbour distance) goes.

Each replacement removes a pair at distance d_m and brings a vector that is farther than d_m
from every vector that stays, so the sorted list of pairwise distances grows
lexicographically: streaming the same finite data over and over reaches an epoch without
replacement. The caller drives the epochs and reads the number of changes ``update`` returns.

Bookkeeping, all on ``device``:

* ``features`` (M, D) and their squared norms (M,);
* the dense matrix of squared pairwise distances (M, M), +inf on the diagonal and in the
  rows/columns of slots not filled yet;
* per row its nearest neighbour (squared distance and index, first index on ties), so the
  closest pair is one ``argmin`` over M values;
* optionally (``track_origin=True``) an int64 payload per row, ``origin`` (M,): the caller's
  label of where the vector came from (Sequential PatchCore stores the training image index,
  for leave-one-image-out calibration). It moves with its vector and never changes the result.

A replacement in slot r rewrites row and column r of the matrix and the nearest neighbours
in O(M) (rows whose nearest neighbour was the old vector r are re-scanned, O(M) each).
Batches are processed in chunks: one matmul gives the squared distances from the chunk to
the coreset (C, M); patches that cannot enter (d_p <= d_m, the vast majority once the coreset
is good) are skipped in one vectorised comparison, and only the ones that do enter are
visited in Python, in stream order. After each replacement the chunk's distances are updated
from the chunk's own pairwise distances (C, C), so a patch whose nearest coreset vector has
just been removed is re-examined exactly as one-at-a-time processing would.

Distances are computed as |x|^2 + |y|^2 - 2 x.y; squared distances below the rounding floor
of that formula (``_ZERO_TOLERANCE`` x eps x (|x|^2 + |y|^2)) are set to exactly 0, so that
duplicated patches are recognised as duplicates whatever path computed their distance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from defectlens.errors import ConfigError

try:  # the replacement loop runs compiled where numba is installed (CPU); torch otherwise
    from numba import njit
except ImportError:  # pragma: no cover - exercised where numba is not installed
    njit = None

# Squared distances below _ZERO_TOLERANCE * eps(dtype) * (|x|^2 + |y|^2) are rounding noise of
# the matmul formula and are treated as 0 (for float32: points closer than ~0.3 % of their norm).
_ZERO_TOLERANCE = 32.0
# Default chunk: about this many squared distances (C x M) per block (16 MiB in float32, so a
# block and its temporaries stay in a large L3 cache).
_BLOCK_ELEMENTS = 1 << 22


_replace_chunk = None
if njit is not None:

    @njit(nogil=True, cache=True, boundscheck=False)
    def _first_min(values):  # pragma: no cover - compiled
        """(min, first index of the min) of a 1-d array (as torch's min(0) on CPU)."""
        best = values[0]
        where = 0
        for j in range(1, values.shape[0]):
            if values[j] < best:
                best = values[j]
                where = j
        return best, where

    @njit(nogil=True, cache=True, boundscheck=False)
    def _bring_row_up_to_date(matrix, r, row_stamp, replaced_at, clock):  # pragma: no cover - compiled
        """Row r of the lazily symmetric matrix: copy in the entries (r, j) of every slot j
        replaced after the row was last up to date (their value is in row j)."""
        stamp = row_stamp[r]
        for j in range(matrix.shape[0]):
            if replaced_at[j] > stamp:
                matrix[r, j] = matrix[j, r]
        row_stamp[r] = clock

    @njit(nogil=True, cache=True, boundscheck=False)
    def _bring_all_up_to_date(matrix, row_stamp, replaced_at, clock):  # pragma: no cover - compiled
        """Every row up to date: the matrix is symmetric again."""
        oldest = row_stamp.min()
        slots = np.nonzero(replaced_at > oldest)[0]
        for r in range(matrix.shape[0]):
            stamp = row_stamp[r]
            for j in slots:
                if replaced_at[j] > stamp:
                    matrix[r, j] = matrix[j, r]
            row_stamp[r] = clock

    @njit(nogil=True, cache=True, boundscheck=False)
    def _replace_chunk(  # pragma: no cover - compiled
        chunk, chunk_sq, to_bank, d_p, d_p_idx, within, features, sq, matrix, nn_val, nn_idx,
        origin, chunk_origin, closest, row, lost, row_stamp, replaced_at, clock,
    ):
        """The replacement rule for chunk rows 0..C-1 in order, on the full coreset, in place.

        Exactly ``SlowReplacementLoop`` / the torch path of ``_update_chunk`` (same comparisons,
        same first-index tie rules, no arithmetic on distances), except that the matrix is kept
        symmetric lazily: a replacement writes its row only; the column entries are copied from
        the rows when a row is read (``_bring_row_up_to_date``). Returns (replacements, closest
        row, clock). ``origin``/``chunk_origin`` of length 0: no origin tracking; ``row`` (M,)
        and ``lost`` (M,) are scratch.
        """
        n = chunk.shape[0]
        m = matrix.shape[0]
        track = origin.shape[0] > 0
        replaced = 0
        pos = 0
        while pos < n:
            d_m = nn_val[closest]
            i = -1
            for r in range(pos, n):
                if d_p[r] > d_m:
                    i = r
                    break
            if i < 0:
                break
            # victim: the member of the closest pair whose second-nearest vector is closer
            a = closest
            b = nn_idx[a]
            _bring_row_up_to_date(matrix, a, row_stamp, replaced_at, clock)
            _bring_row_up_to_date(matrix, b, row_stamp, replaced_at, clock)
            second_a = np.inf
            second_b = np.inf
            for j in range(m):
                if j != b and matrix[a, j] < second_a:
                    second_a = matrix[a, j]
                if j != a and matrix[b, j] < second_b:
                    second_b = matrix[b, j]
            slot = b if second_b < second_a else a
            for j in range(m):
                row[j] = to_bank[i, j]
            row[slot] = np.inf
            features[slot] = chunk[i]
            sq[slot] = chunk_sq[i]
            clock += 1
            replaced_at[slot] = clock
            row_stamp[slot] = clock
            # one pass: the new row; rows whose nearest vector was `slot` are re-scanned after
            # it, the others take the new vector if it is nearer (on a tie, the lower index -
            # what a full re-scan with first-index ties gives)
            lost_count = 0
            for r in range(m):
                v = row[r]
                matrix[slot, r] = v
                if nn_idx[r] == slot:
                    lost[lost_count] = r
                    lost_count += 1
                elif v <= nn_val[r] and (v < nn_val[r] or slot < nn_idx[r]):
                    nn_val[r] = v
                    nn_idx[r] = slot
            for t in range(lost_count):
                r = lost[t]
                _bring_row_up_to_date(matrix, r, row_stamp, replaced_at, clock)
                nn_val[r], nn_idx[r] = _first_min(matrix[r])
            nn_val[slot], nn_idx[slot] = _first_min(row)
            closest = _first_min(nn_val)[1]
            if track:
                origin[slot] = chunk_origin[i]
            replaced += 1
            pos = i + 1
            # the chunk's later rows: slot now holds chunk row i
            for r in range(pos, n):
                value = within[r, i]
                to_bank[r, slot] = value
                if value < d_p[r]:
                    d_p[r] = value
                    d_p_idx[r] = slot
                elif d_p_idx[r] == slot:
                    d_p[r], d_p_idx[r] = _first_min(to_bank[r])
        return replaced, closest, clock


def squared_distances(
    x: torch.Tensor,
    y: torch.Tensor,
    x_sq: torch.Tensor | None = None,
    y_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Euclidean distances (N, K) between rows of ``x`` (N, D) and ``y`` (K, D).

    ``x_sq`` (N,) and ``y_sq`` (K,) are the rows' squared norms when already known. Values
    under the formula's rounding floor are exactly 0 (identical rows give 0).
    """
    if x_sq is None:
        x_sq = (x * x).sum(1)
    if y_sq is None:
        y_sq = (y * y).sum(1)
    out = x_sq[:, None] + y_sq[None, :]
    out.addmm_(x, y.T, alpha=-2.0)
    if out.numel() == 0:
        return out
    # Zero the values under the rounding floor. One comparison with a scalar bound finds the
    # few candidates; the exact per-pair floor is applied to those only.
    eps = _ZERO_TOLERANCE * torch.finfo(out.dtype).eps
    small = torch.nonzero(out <= eps * float(x_sq.max() + y_sq.max()))
    if small.numel():
        i, j = small.unbind(1)
        values = out[i, j]
        out[i, j] = torch.where(values <= eps * (x_sq[i] + y_sq[j]), 0.0, values)
    return out


class StreamingCoreset:
    """A coreset of at most ``size`` patch features, grown and improved from a stream.

    Args:
        size: M, the number of vectors kept (>= 1; with 1 the first patch stays forever).
        dim: D, the feature dimension.
        device: where the state lives ("cpu" by default).
        dtype: float dtype of features and distances (float32 by default).
        chunk_size: patches per distance block in ``update`` (C); ``None`` picks C so that a
            (C, M) block holds about 4 M values. Changes memory and speed, never the result.
        track_origin: keep an int64 label per vector (``origin``; -1 where none was given).

    Memory: the (M, M) distance matrix dominates, M^2 * itemsize bytes (1.6 GB for M = 20000
    in float32), allocated at construction; see ``memory_bytes``.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        chunk_size: int | None = None,
        track_origin: bool = False,
    ) -> None:
        if int(size) < 1:
            raise ConfigError(f"coreset size must be >= 1, got {size}")
        if int(dim) < 1:
            raise ConfigError(f"feature dimension must be >= 1, got {dim}")
        if not dtype.is_floating_point:
            raise ConfigError(f"coreset dtype must be a float dtype, got {dtype}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.size = int(size)
        self.dim = int(dim)
        self.device = torch.device(device)
        self.dtype = dtype
        self.chunk_size = (
            int(chunk_size) if chunk_size is not None else max(64, _BLOCK_ELEMENTS // self.size)
        )
        m = self.size
        self.features = torch.zeros((m, self.dim), dtype=dtype, device=self.device)
        self.count = 0
        self._sq = torch.zeros(m, dtype=dtype, device=self.device)
        # (M, M) squared distances; see ``_dist``. On the compiled path a replacement writes its
        # row only, and row r is brought up to date when read: entry (r, j) is copied from row j
        # for every slot j replaced after ``_row_stamp[r]`` (``_replaced_at[j]``, in replacements).
        self._matrix = torch.full((m, m), math.inf, dtype=dtype, device=self.device)
        self._row_stamp = np.zeros(m, np.int64)
        self._replaced_at = np.zeros(m, np.int64)
        self._clock = 0
        self._lazy = False  # some rows are not up to date
        self._nn_val = torch.full((m,), math.inf, dtype=dtype, device=self.device)
        self._nn_idx = torch.zeros(m, dtype=torch.int64, device=self.device)
        self._closest = 0  # row of the closest pair (argmin of _nn_val)
        self.origin = torch.full((m,), -1, dtype=torch.int64, device=self.device) if track_origin else None
        self._scratch: tuple[np.ndarray, np.ndarray] | None = None  # (M,) row and index buffers of the kernel
        self.num_seen = 0
        self.num_inserted = 0
        self.num_replaced = 0

    # ------------------------------------------------------------------ read-only views
    @property
    def is_full(self) -> bool:
        """True once the coreset holds ``size`` vectors."""
        return self.count == self.size

    @property
    def _dist(self) -> torch.Tensor:
        """The symmetric (M, M) matrix of squared pairwise distances (+inf on the diagonal and for
        unfilled slots); brings every row up to date first (O(M^2) after replacements)."""
        self._make_symmetric()
        return self._matrix

    def _make_symmetric(self) -> None:
        if self._lazy:
            _bring_all_up_to_date(self._matrix.numpy(), self._row_stamp, self._replaced_at, self._clock)
            self._lazy = False

    @property
    def min_pairwise_distance(self) -> float:
        """d_m: the smallest distance between two coreset vectors (inf with fewer than 2)."""
        if self.count < 2:
            return math.inf
        return math.sqrt(max(float(self._nn_val[self._closest]), 0.0))

    @property
    def closest_pair(self) -> tuple[int, int] | None:
        """Row indices (a, b) of the pair at distance d_m, or None with fewer than 2 vectors."""
        if self.count < 2:
            return None
        return self._closest, int(self._nn_idx[self._closest])

    @property
    def nearest_neighbours(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per filled row: distance (count,) to and index (count,) of its nearest other row."""
        n = self.count
        return self._nn_val[:n].clamp(min=0).sqrt(), self._nn_idx[:n].clone()

    @property
    def memory_bytes(self) -> int:
        """Bytes held by the state (features, norms, distance matrix, nearest neighbours)."""
        tensors = (self.features, self._sq, self._matrix, self._nn_val, self._nn_idx)
        if self.origin is not None:
            tensors += (self.origin,)
        return sum(t.numel() * t.element_size() for t in tensors)

    def coreset(self) -> torch.Tensor:
        """The filled rows of ``features``, (count, D) (a view)."""
        return self.features[: self.count]

    def coreset_origin(self) -> torch.Tensor:
        """The labels (count,) int64 of the filled rows (needs ``track_origin=True``)."""
        if self.origin is None:
            raise ConfigError("this coreset does not track origins (create it with track_origin=True)")
        return self.origin[: self.count]

    def distances_to(self, patches: torch.Tensor) -> torch.Tensor:
        """Distance (B,) from each patch (B, D) to its nearest coreset vector (chunked)."""
        patches = self._check(patches)
        out = torch.empty(patches.shape[0], dtype=self.dtype, device=self.device)
        if self.count == 0:
            return out.fill_(math.inf)
        bank, bank_sq = self.features[: self.count], self._sq[: self.count]
        step = max(1, _BLOCK_ELEMENTS // max(self.count, 1))
        for start in range(0, patches.shape[0], step):
            block = patches[start : start + step]
            out[start : start + step] = squared_distances(block, bank, None, bank_sq).min(1).values
        return out.clamp_(min=0).sqrt_()

    # ------------------------------------------------------------------ streaming
    def update(self, patches: torch.Tensor, origin: torch.Tensor | None = None) -> int:
        """Stream patches (B, D) through the coreset, row by row in order.

        ``origin`` (B,) int64 labels the patches (kept with the vectors that enter; only with
        ``track_origin=True``; default -1).

        Returns:
            The number of changes: insertions while the coreset fills up plus replacements.
            0 over a whole epoch means the coreset has converged on that data.
        """
        patches = self._check(patches)
        total = patches.shape[0]
        labels = self._check_origin(origin, total)
        self.num_seen += total
        changes = 0
        start = 0
        while self.count < self.size and start < total:
            chunk = patches[start : start + self.chunk_size]
            novel = torch.nonzero(self._novel(chunk)).squeeze(1)[: self.size - self.count]
            if novel.numel():
                self._append(chunk[novel], None if labels is None else labels[start : start + self.chunk_size][novel])
                changes += novel.numel()
                self.num_inserted += novel.numel()
            start += int(novel[-1]) + 1 if self.count == self.size else chunk.shape[0]
        if self.size < 2:  # no pair, nothing can ever be replaced
            return changes
        for chunk_start in range(start, total, self.chunk_size):
            chunk_labels = None if labels is None else labels[chunk_start : chunk_start + self.chunk_size]
            replaced = self._update_chunk(patches[chunk_start : chunk_start + self.chunk_size], chunk_labels)
            changes += replaced
            self.num_replaced += replaced
        return changes

    def _check(self, patches: torch.Tensor) -> torch.Tensor:
        if not isinstance(patches, torch.Tensor):
            patches = torch.as_tensor(patches)
        if patches.ndim != 2 or patches.shape[1] != self.dim:
            raise ConfigError(f"patches must have shape (B, {self.dim}), got {tuple(patches.shape)}")
        return patches.to(device=self.device, dtype=self.dtype)

    def _check_origin(self, origin: torch.Tensor | None, total: int) -> torch.Tensor | None:
        if self.origin is None:
            if origin is not None:
                raise ConfigError("origin labels given to a coreset created without track_origin=True")
            return None
        if origin is None:
            return torch.full((total,), -1, dtype=torch.int64, device=self.device)
        origin = torch.as_tensor(origin).to(device=self.device, dtype=torch.int64).reshape(-1)
        if origin.shape[0] != total:
            raise ConfigError(f"origin has {origin.shape[0]} labels for {total} patches")
        return origin

    def _novel(self, chunk: torch.Tensor) -> torch.Tensor:
        """Bool (C,): rows that duplicate neither a coreset vector nor an earlier row."""
        chunk_sq = (chunk * chunk).sum(1)
        within = squared_distances(chunk, chunk, chunk_sq, chunk_sq) == 0
        duplicate = torch.tril(within, diagonal=-1).any(1)
        if self.count:
            bank = squared_distances(chunk, self.features[: self.count], chunk_sq, self._sq[: self.count])
            duplicate |= (bank == 0).any(1)
        return ~duplicate

    def _append(self, new: torch.Tensor, new_origin: torch.Tensor | None = None) -> None:
        """Fill slots count .. count + len(new) - 1 and their rows/columns of the matrix."""
        self._make_symmetric()
        first, last = self.count, self.count + new.shape[0]
        self.features[first:last] = new
        if self.origin is not None and new_origin is not None:
            self.origin[first:last] = new_origin
        self._sq[first:last] = (new * new).sum(1)
        step = self.chunk_size
        for s in range(first, last, step):
            e = min(s + step, last)
            block = squared_distances(self.features[s:e], self.features[:e], self._sq[s:e], self._sq[:e])
            square = block[:, s:e]
            square.copy_(torch.minimum(square, square.T))  # exactly symmetric
            square.fill_diagonal_(math.inf)
            self._matrix[s:e, :e] = block
            self._matrix[:s, s:e] = block[:, :s].T
            # New rows see every filled column; older rows may find a closer vector among the
            # new ones (strictly closer: on a tie the older, lower index stays first).
            self._nn_val[s:e], self._nn_idx[s:e] = block.min(1)
            if s > 0:
                col_val, col_idx = block[:, :s].min(0)
                better = col_val < self._nn_val[:s]
                self._nn_val[:s] = torch.where(better, col_val, self._nn_val[:s])
                self._nn_idx[:s] = torch.where(better, col_idx + s, self._nn_idx[:s])
        self.count = last
        self._closest = int(self._nn_val.argmin())

    def _update_chunk(self, chunk: torch.Tensor, chunk_origin: torch.Tensor | None = None) -> int:
        """Apply the replacement rule to each row of ``chunk`` (C, D) in order (coreset full)."""
        chunk_sq = (chunk * chunk).sum(1)
        to_bank = squared_distances(chunk, self.features, chunk_sq, self._sq)  # (C, M), kept current
        d_p, d_p_idx = to_bank.min(1)
        if _replace_chunk is not None and self.device.type == "cpu":
            if not bool((d_p > self._nn_val[self._closest]).any()):
                return 0  # no patch of the chunk can enter (the common case once the coreset is good)
            within = squared_distances(chunk, chunk, chunk_sq, chunk_sq)
            if self._scratch is None:
                self._scratch = (np.empty(self.size, self._sq.numpy().dtype), np.empty(self.size, np.int64))
            no_origin = np.empty(0, np.int64)
            tracked = self.origin is not None and chunk_origin is not None
            replaced, self._closest, self._clock = _replace_chunk(
                chunk.contiguous().numpy(), chunk_sq.numpy(), to_bank.numpy(), d_p.numpy(), d_p_idx.numpy(),
                within.numpy(), self.features.numpy(), self._sq.numpy(), self._matrix.numpy(),
                self._nn_val.numpy(), self._nn_idx.numpy(),
                self.origin.numpy() if tracked else no_origin,
                chunk_origin.contiguous().numpy() if tracked else no_origin,
                self._closest, *self._scratch, self._row_stamp, self._replaced_at, self._clock,
            )
            self._lazy = self._lazy or replaced > 0
            return int(replaced)
        self._make_symmetric()  # the torch loop below keeps the matrix symmetric eagerly
        within: torch.Tensor | None = None  # (C, C) pairwise distances of the chunk, on demand
        replaced = 0
        pos = 0
        n = chunk.shape[0]
        while pos < n:
            d_m = self._nn_val[self._closest]
            hits = torch.nonzero(d_p[pos:] > d_m)
            if hits.numel() == 0:
                break
            i = pos + int(hits[0, 0])
            if within is None:
                within = squared_distances(chunk, chunk, chunk_sq, chunk_sq)
            slot = self._victim()
            row = to_bank[i].clone()
            row[slot] = math.inf
            self._replace(slot, chunk[i], chunk_sq[i], row)
            if chunk_origin is not None:
                self.origin[slot] = chunk_origin[i]
            replaced += 1
            pos = i + 1
            if pos < n:
                self._refresh_chunk(to_bank, d_p, d_p_idx, within[pos:, i], slot, pos)
        return replaced

    def _victim(self) -> int:
        """The member of the closest pair to replace (see the module docstring)."""
        a = self._closest
        b = int(self._nn_idx[a])
        row_a, row_b = self._dist[a], self._dist[b]
        pair = row_a[b].clone()
        row_a[b] = math.inf
        second_a = row_a.min()
        row_a[b] = pair
        row_b[a] = math.inf
        second_b = row_b.min()
        row_b[a] = pair
        return b if bool(second_b < second_a) else a

    def _replace(self, slot: int, vector: torch.Tensor, vector_sq: torch.Tensor, row: torch.Tensor) -> None:
        """Put ``vector`` in ``slot``; ``row`` (M,) holds its squared distances (inf at slot)."""
        self.features[slot] = vector
        self._sq[slot] = vector_sq
        self._dist[slot] = row
        self._dist[:, slot] = row
        # Rows whose nearest neighbour may change: the new vector is at least as close as their
        # current one, or their current one was the vector just removed. Usually a handful;
        # their rows (already holding the new column) are re-scanned, first index on ties.
        nn_val, nn_idx = self._nn_val, self._nn_idx
        rows = torch.nonzero((row <= nn_val) | (nn_idx == slot)).squeeze(1)
        if rows.numel():
            nn_val[rows], nn_idx[rows] = self._dist[rows].min(1)
        nn_val[slot], nn_idx[slot] = row.min(0)
        self._closest = int(nn_val.argmin())

    @staticmethod
    def _refresh_chunk(
        to_bank: torch.Tensor,
        d_p: torch.Tensor,
        d_p_idx: torch.Tensor,
        new_column: torch.Tensor,
        slot: int,
        pos: int,
    ) -> None:
        """Slot ``slot`` now holds another vector: update the chunk's rows ``pos:``."""
        to_bank[pos:, slot] = new_column
        val, idx = d_p[pos:], d_p_idx[pos:]
        lost = idx == slot
        better = new_column < val
        lost &= ~better
        val.copy_(torch.where(better, new_column, val))
        idx.masked_fill_(better, slot)
        rows = torch.nonzero(lost).squeeze(1)
        if rows.numel():
            val[rows], idx[rows] = to_bank[rows + pos].min(1)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors: ``features`` (M, D) (rows >= count are zero) and ``count`` (int64);
        with ``track_origin`` also ``origin`` (M,)."""
        state = {
            "features": self.features.detach().cpu().clone(),
            "count": torch.tensor(self.count, dtype=torch.int64),
        }
        if self.origin is not None:
            state["origin"] = self.origin.detach().cpu().clone()
        return state

    @classmethod
    def from_state(
        cls,
        state: dict[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
    ) -> StreamingCoreset:
        """Rebuild a coreset from ``state_dict()``; the distance matrix is recomputed."""
        features = state["features"]
        count = int(state["count"])
        if features.ndim != 2 or not 0 <= count <= features.shape[0]:
            raise ConfigError(
                f"coreset state has features {tuple(features.shape)} and count {count}"
            )
        origin = state.get("origin")
        out = cls(
            features.shape[0], features.shape[1], device, dtype or features.dtype, chunk_size, origin is not None
        )
        if count:
            labels = None if origin is None else origin[:count].to(device=out.device, dtype=torch.int64)
            out._append(features[:count].to(device=out.device, dtype=out.dtype), labels)
        return out


def meld(
    coresets: Sequence[StreamingCoreset | torch.Tensor],
    size: int,
    seed: int = 0,
    max_epochs: int = 10,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    origins: Sequence[torch.Tensor | None] | None = None,
) -> StreamingCoreset:
    """Merge coresets built on different data (or machines) into one of ``size`` vectors.

    The union of their vectors is streamed through a fresh ``StreamingCoreset`` in one seeded
    random order, epoch after epoch, until an epoch replaces nothing or ``max_epochs`` is
    reached. No image is needed. Tensors (N, D) are taken as they are.

    ``origins``: optional labels (N_i,) per input (None: the coreset's own ``origin`` if it
    tracks one, else -1); when given, the merged coreset tracks them.

    Returns:
        The merged coreset (on ``device``, default that of the first coreset, else CPU).
    """
    parts: list[torch.Tensor] = []
    labels: list[torch.Tensor | None] = []
    dtype: torch.dtype | None = None
    if origins is not None and len(origins) != len(coresets):
        raise ConfigError(f"meld got {len(origins)} origin tensors for {len(coresets)} coresets")
    for position, item in enumerate(coresets):
        given = None if origins is None else origins[position]
        if isinstance(item, StreamingCoreset):
            parts.append(item.coreset().detach().cpu())
            labels.append(given if given is not None or item.origin is None else item.coreset_origin().cpu())
            device = item.device if device is None else device
            dtype = dtype or item.dtype
        else:
            tensor = torch.as_tensor(item)
            if tensor.ndim != 2:
                raise ConfigError(f"meld takes (N, D) tensors, got shape {tuple(tensor.shape)}")
            parts.append(tensor.detach().cpu())
            labels.append(given)
    if not parts:
        raise ConfigError("meld needs at least one coreset")
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise ConfigError(f"meld got coresets of different feature dimensions {sorted(dims)}")
    if dtype is None:
        dtype = parts[0].dtype if parts[0].dtype.is_floating_point else torch.float32
    union = torch.cat([p.to(dtype) for p in parts])
    if union.shape[0] == 0:
        raise ConfigError("meld got only empty coresets")
    order = torch.randperm(union.shape[0], generator=torch.Generator().manual_seed(seed))
    union = union[order]
    tracked = any(label is not None for label in labels)
    union_origin = None
    if tracked:
        filled = []
        for part, label in zip(parts, labels):
            label = torch.full((part.shape[0],), -1, dtype=torch.int64) if label is None else torch.as_tensor(label)
            if label.numel() != part.shape[0]:
                raise ConfigError(f"meld got {label.numel()} origin labels for {part.shape[0]} vectors")
            filled.append(label.reshape(-1).to(torch.int64).cpu())
        union_origin = torch.cat(filled)[order]
    merged = StreamingCoreset(size, union.shape[1], device or "cpu", dtype, chunk_size, tracked)
    merged.update(union, union_origin)
    for _ in range(max_epochs - 1):
        if merged.update(union, union_origin) == 0:
            break
    return merged

"""How SparseMask chooses what it trains: support budgets, supports (top-scoring or random entries or blocks) and the
learned mask of ``mode="mask"`` (hard top-k of keep-scores with straight-through gradients).

Supports are sorted 1-D tensors of flat indices into the ``(out, in)`` weight (``peft_sparse.sparse``); block
supports are unions of square blocks expanded to their entries, clipped at the weight's edges.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def support_budget(fraction: float, shape: tuple[int, int], block_size: int) -> int:
    """Entries (or blocks) a layer gets for ``fraction``: at least one, at most all."""
    total = math.ceil(shape[0] / block_size) * math.ceil(shape[1] / block_size)
    return min(total, max(1, round(fraction * total)))


def trained_fraction(fraction: float, shape: tuple[int, int], block_size: int) -> float:
    """The fraction of the weight that ``support_budget`` blocks cover at most (edge blocks are smaller)."""
    covered = support_budget(fraction, shape, block_size) * min(block_size, shape[0]) * min(block_size, shape[1])
    return min(1.0, covered / (shape[0] * shape[1]))



def block_support(block_ids: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Sorted flat entry indices covered by blocks ``block_ids`` (flat over the block grid), clipped at edges."""
    out_features, in_features = shape
    blocks_per_row = math.ceil(in_features / block_size)
    block_rows = torch.div(block_ids, blocks_per_row, rounding_mode="floor")
    block_cols = block_ids % blocks_per_row
    offsets = torch.arange(block_size, device=block_ids.device)
    rows = (block_rows[:, None, None] * block_size + offsets[None, :, None]).expand(-1, block_size, block_size)
    cols = (block_cols[:, None, None] * block_size + offsets[None, None, :]).expand(-1, block_size, block_size)
    inside = (rows < out_features) & (cols < in_features)
    return (rows[inside] * in_features + cols[inside]).sort().values


def block_ids(indices: torch.Tensor, shape: tuple[int, int], block_size: int) -> torch.Tensor:
    """Sorted ids (flat over the block grid) of the blocks that hold the flat entry ``indices``."""
    rows = torch.div(indices, shape[1], rounding_mode="floor") // block_size
    cols = (indices % shape[1]) // block_size
    return torch.unique(rows * math.ceil(shape[1] / block_size) + cols)


def block_scores(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of ``scores`` (an ``(out, in)`` matrix) over each block of the grid, flattened row-major."""
    out_features, in_features = scores.shape
    padded = F.pad(scores, (0, -in_features % block_size, 0, -out_features % block_size))
    rows, cols = padded.shape[0] // block_size, padded.shape[1] // block_size
    return padded.view(rows, block_size, cols, block_size).sum((1, 3)).flatten()


def top_support(scores: torch.Tensor, count: int, block_size: int = 1) -> torch.Tensor:
    """Sorted flat indices of the ``count`` highest ``scores`` entries, or of the blocks holding them.

    With ``block_size > 1``, ``count`` is the number of blocks and blocks are ranked by their summed score.
    """
    flat = scores.flatten() if block_size == 1 else block_scores(scores, block_size)
    count = min(count, flat.numel())
    chosen = torch.topk(flat.float(), count, sorted=False).indices
    if block_size == 1:
        return chosen.sort().values
    return block_support(chosen, tuple(scores.shape), block_size)


def random_support(
    shape: tuple[int, int], count: int, generator: torch.Generator, block_size: int = 1
) -> torch.Tensor:
    """Sorted flat indices of ``count`` entries (or blocks) drawn uniformly without replacement."""
    if block_size == 1:
        total = shape[0] * shape[1]
    else:
        total = math.ceil(shape[0] / block_size) * math.ceil(shape[1] / block_size)
    chosen = torch.randperm(total, generator=generator)[: min(count, total)]
    return chosen.sort().values if block_size == 1 else block_support(chosen, shape, block_size)



def hard_keep_mask(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """1 for the entries kept, 0 for the ``num_pruned`` lowest ``scores`` (no gradient)."""
    keep = torch.ones_like(scores)
    if num_pruned > 0:  # index_fill_: the advanced-indexing write is a slow path on the CPU
        keep.index_fill_(0, torch.topk(scores.detach(), num_pruned, largest=False, sorted=False).indices, 0)
    return keep


def mask_delta_values(scores: torch.Tensor, base_values: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Values of the increment that zeroes pruned entries: ``W ⊙ M = W − W ⊙ (1 − M)``, so ΔW = −W·(1−m).

    ``m`` is the hard top-k keep mask of ``scores`` in the forward and the identity of ``scores`` in the
    backward (straight-through estimator), so ``∂L/∂score = ∂L/∂ΔW · W`` at each candidate.
    """
    # Parenthesised: (hard + s) - s is not exactly hard in floating point; hard + (s - s) is.
    keep = hard_keep_mask(scores, num_pruned) + (scores - scores.detach())
    return -base_values.to(scores.dtype) * (1 - keep)

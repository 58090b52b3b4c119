"""Exact merge and unmerge: a merge saves the base entries it overwrites, the unmerge writes them back.

``W + Δ − Δ`` is not ``W`` in floating point, so LoRA's unmerge leaves every merged tensor a little off, and the
error grows with each merge, unmerge or swap. Here a merge first saves the entries it is about to change and the
unmerge puts those exact values back, so any number of merges, unmerges and swaps leaves the base as loaded.

Only what the increment touches is saved: the support of a sparse increment (``SparseIncrement``, SparseMask), the
rows or columns a Learner changes, a bias; a dense increment saves the entries it changes, or the whole tensor when
that is smaller than their indices. ``SparseTunerLayer._add_to_base_parameter`` is the one caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn


@dataclass
class SparseIncrement:
    """An increment of a 2-D ``(out, in)`` parameter: ``values`` at sorted flat ``indices`` (no dense tensor)."""

    indices: torch.Tensor
    values: torch.Tensor

    def dense(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        flat = torch.zeros(shape[0] * shape[1], dtype=dtype, device=self.values.device)
        return flat.index_add_(0, self.indices, self.values.to(dtype)).view(shape)

    def transposed(self, shape: tuple[int, int]) -> "SparseIncrement":
        """The same increment indexed into the ``(in, out)`` transpose (GPT-2's Conv1D storage)."""
        rows = torch.div(self.indices, shape[1], rounding_mode="floor")
        return SparseIncrement((self.indices - rows * shape[1]) * shape[0] + rows, self.values)


Increment = Union[torch.Tensor, SparseIncrement]


@dataclass
class SavedEntries:
    """Entries of a float tensor that a merge overwrote: ``region`` is ``"all"`` (the whole tensor), ``"rows"`` /
    ``"cols"`` (of a 2-D tensor, at ``index``) or ``"flat"`` (single entries at flat ``index``)."""

    region: str
    index: Optional[torch.Tensor]
    values: torch.Tensor

    def restore(self, tensor: torch.Tensor) -> None:
        if self.region == "all":
            tensor.copy_(self.values)
        elif self.region == "rows":
            tensor[self.index] = self.values
        elif self.region == "cols":
            tensor[:, self.index] = self.values
        elif tensor.is_contiguous():
            tensor.view(-1).index_copy_(0, self.index, self.values)
        else:
            tensor[_positions(tensor, self.index)] = self.values

    @property
    def nbytes(self) -> int:
        index = 0 if self.index is None else self.index.numel() * self.index.element_size()
        return index + self.values.numel() * self.values.element_size()


@dataclass
class SavedQuantizedWeight:
    """A quantized weight as it was before a merge (the packed parameter and bitsandbytes' 8-bit state)."""

    weight: nn.Parameter
    state: object = None


class CreatedBias:
    """The merge created the base layer's bias (it had none): the unmerge removes it again."""


Saved = Union[SavedEntries, SavedQuantizedWeight, CreatedBias]


def _positions(tensor: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flat (row-major) indices as one index tensor per dimension, for a tensor that is no contiguous block."""
    if tensor.dim() == 1:
        return (flat,)
    columns = tensor.shape[1]
    return torch.div(flat, columns, rounding_mode="floor"), flat % columns


def add_saving(tensor: torch.Tensor, increment: Increment) -> SavedEntries:
    """Add ``increment`` (in ``tensor``'s layout) to ``tensor`` in place and return the entries it overwrote.

    A ``SparseIncrement`` saves and changes its support only (a gather and a scatter). A dense increment saves
    what it changes: its non-zero rows or columns (Learners), its non-zero entries, or the whole tensor, whichever
    takes the fewest bytes; each changed entry becomes ``w + Δ`` exactly as ``tensor += increment`` computes it.
    """
    if isinstance(increment, SparseIncrement):
        if tensor.is_contiguous():  # 1-D index kernels: the fastest on the CPU (benchmarks/cpu_hot_path.md)
            flat = tensor.view(-1)
            saved = SavedEntries("flat", increment.indices, flat.index_select(0, increment.indices))
            flat.index_add_(0, increment.indices, increment.values.to(tensor.dtype))  # w + Δ, the support unique
            return saved
        positions = _positions(tensor, increment.indices)
        saved = SavedEntries("flat", increment.indices, tensor[positions])
        tensor.index_put_(positions, increment.values.to(tensor.dtype), accumulate=True)
        return saved
    delta = increment.to(tensor.dtype)
    region, index = _changed_region(delta)
    if region == "all":
        saved = SavedEntries("all", None, tensor.clone())
        tensor += delta
    elif region == "rows":
        saved = SavedEntries("rows", index, tensor[index])
        tensor[index] = saved.values + delta[index]
    elif region == "cols":
        saved = SavedEntries("cols", index, tensor[:, index])
        tensor[:, index] = saved.values + delta[:, index]
    else:
        positions = _positions(tensor, index)
        saved = SavedEntries("flat", index, tensor[positions])
        tensor[positions] = saved.values + delta[positions]
    return saved


def same_support(saved: "Saved", increment: Increment) -> bool:
    """Whether ``increment`` is sparse on exactly the entries ``saved`` holds (a swap can then rewrite them)."""
    if not (isinstance(saved, SavedEntries) and saved.region == "flat" and isinstance(increment, SparseIncrement)):
        return False
    index = increment.indices
    return saved.index is index or (saved.index.shape == index.shape and bool(torch.equal(saved.index, index)))


def can_rewrite(tensor: torch.Tensor, saved: "Saved", increment: Increment) -> bool:
    """Whether ``rewrite`` can swap ``increment`` in: contiguous ``tensor``, the same support as ``saved``."""
    return tensor.is_contiguous() and same_support(saved, increment)


def rewrite(tensor: torch.Tensor, saved: SavedEntries, increment: SparseIncrement) -> None:
    """Set the saved entries of contiguous ``tensor`` to their saved (base) values plus ``increment``: an exact swap
    of one merged sparse increment for another on the same support, in one scatter."""
    tensor.view(-1).index_copy_(0, saved.index, saved.values + increment.values.to(tensor.dtype))


def fold_next(tensor: torch.Tensor, saved: Optional[SavedEntries], increment: SparseIncrement) -> SavedEntries:
    """Replace the sparse increment folded into ``tensor`` (whose overwritten entries are ``saved``; None: none) by
    ``increment``: one rewrite where both sit on the same support of a contiguous tensor, else restore and add."""
    if saved is not None and can_rewrite(tensor, saved, increment):
        rewrite(tensor, saved, increment)
        return saved
    if saved is not None:
        saved.restore(tensor)
    return add_saving(tensor, increment)


def _changed_region(delta: torch.Tensor) -> tuple[str, Optional[torch.Tensor]]:
    """The cheapest region to save that covers every non-zero entry of ``delta``."""
    nonzero = delta != 0
    size = delta.element_size()
    count = int(nonzero.sum())
    costs: dict[str, tuple[int, Optional[torch.Tensor]]] = {"all": (delta.numel() * size, None)}
    if count * (8 + size) < delta.numel() * size:
        costs["flat"] = (count * (8 + size), None)
    if delta.dim() == 2:
        rows = torch.nonzero(nonzero.any(1)).flatten()
        cols = torch.nonzero(nonzero.any(0)).flatten()
        costs["rows"] = (rows.numel() * (8 + delta.shape[1] * size), rows)
        costs["cols"] = (cols.numel() * (8 + delta.shape[0] * size), cols)
    region = min(costs, key=lambda r: costs[r][0])
    if region == "flat":
        return region, torch.nonzero(nonzero.reshape(-1)).flatten()
    return region, costs[region][1]

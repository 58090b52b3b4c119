"""The index arrays that describe a sparse support, built once per support and passed to every kernel.

A support is a sorted 1-D tensor of flat indices into an ``(out, in)`` weight; its values are a 1-D tensor in
the same (row-major, i.e. CSR) order. ``SparseLayout`` adds the CSR and CSC arrays and, where the support is
a union of whole ``B × B`` blocks (clipped at the weight's edges), the block pattern that the block kernels
use. Only tensors and ints: no module, no autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

#: Block sizes the block kernels (Triton and the torch block path) take; other sizes use the entry paths.
BLOCK_KERNEL_SIZES = (16, 32, 64, 128)


class BlockPattern(NamedTuple):
    """A block support's layout. Blocks are numbered in BSR order (by block row, then block column).

    The values stay in row-major order: row ``i`` of block ``k`` holds
    ``values[crow[rows[k]*B + i] + (k - row_ptr[rows[k]])*B + j]`` for its columns ``j`` (every block before
    it in that row is whole; only the last block column can be clipped).
    """

    block_size: int
    rows: torch.Tensor  # (blocks,) block row of each block
    cols: torch.Tensor  # (blocks,) block column of each block
    row_ptr: torch.Tensor  # (block rows + 1,) BSR pointers: blocks row_ptr[r]:row_ptr[r+1] are block row r
    col_ptr: torch.Tensor  # (block columns + 1,) BSC pointers into col_order
    col_order: torch.Tensor  # (blocks,) the block numbers ordered by block column (stable)
    crow: torch.Tensor  # (out + 1,) the entries' CSR row pointers


class SparseLayout:
    """Everything the operations need to know about one support, derived once per support.

    ``indices`` (the sorted flat support), the CSR arrays (``crow``, ``col``) and the block pattern are built at
    once; the CSC arrays (``ccol``, ``csc_row``, ``csc_order``), which only the transposed sparse product needs, and
    the block positions (``block_value_index``) are built the first time they are asked for and kept.
    """

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                 blocks: Optional[BlockPattern]) -> None:
        self.shape = shape
        self.indices = indices  # (k,) sorted flat int64 indices
        self.crow = crow  # (out + 1,) CSR row pointers
        self.col = col  # (k,) column of each entry, CSR order
        self.blocks = blocks  # the block pattern, or None (unstructured, or not whole blocks)
        self._csc: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        self._block_index: Optional[torch.Tensor] = None

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def _build_csc(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._csc is None:
            rows = torch.div(self.indices, self.shape[1], rounding_mode="floor")
            order = torch.sort(self.col, stable=True).indices  # rows stay ascending within a column
            self._csc = (_pointers(self.col, self.shape[1]), rows.index_select(0, order), order)
        return self._csc

    @property
    def ccol(self) -> torch.Tensor:
        """(in + 1,) CSC column pointers."""
        return self._build_csc()[0]

    @property
    def csc_row(self) -> torch.Tensor:
        """(k,) row of each entry, CSC order."""
        return self._build_csc()[1]

    @property
    def csc_order(self) -> torch.Tensor:
        """(k,) ``values.index_select(0, csc_order)`` are the values in CSC order."""
        return self._build_csc()[2]

    @property
    def block_value_index(self) -> Optional[torch.Tensor]:
        """``(blocks, B, B)`` positions in the values of each block's entries (-1 outside the weight), in BSR order;
        None without blocks (see ``block_value_index``)."""
        if self._block_index is None and self.blocks is not None:
            self._block_index = block_value_index(self)
        return self._block_index


def _pointers(groups: torch.Tensor, count: int) -> torch.Tensor:
    pointers = torch.zeros(count + 1, dtype=torch.int64, device=groups.device)
    pointers[1:] = torch.bincount(groups, minlength=count).cumsum(0)
    return pointers


def build_layout(indices: torch.Tensor, shape: tuple[int, int], block_size: int = 1) -> SparseLayout:
    """The layout of the sorted flat ``indices`` of an ``(out, in)`` weight; ``block_size > 1`` adds the block
    pattern when the support is a union of whole blocks of that size."""
    out_features, in_features = int(shape[0]), int(shape[1])
    indices = indices.to(torch.int64)
    rows = torch.div(indices, in_features, rounding_mode="floor")
    cols = indices - rows * in_features
    crow = _pointers(rows, out_features)
    blocks = _block_pattern(rows, cols, crow, (out_features, in_features), block_size) if block_size > 1 else None
    return SparseLayout((out_features, in_features), indices, crow, cols, blocks)


def _block_pattern(rows, cols, crow, shape, b: int) -> Optional[BlockPattern]:
    out_features, in_features = shape
    blocks_per_row = math.ceil(in_features / b)
    block_rows_total = math.ceil(out_features / b)
    ids = torch.unique(torch.div(rows, b, rounding_mode="floor") * blocks_per_row + torch.div(cols, b, rounding_mode="floor"))
    block_rows = torch.div(ids, blocks_per_row, rounding_mode="floor")
    block_cols = ids % blocks_per_row
    # Every entry lies in one of these blocks, so the support is these blocks, whole, exactly when the entries
    # number as many as the blocks cover (clipped at the edges).
    heights = (out_features - block_rows * b).clamp(max=b)
    widths = (in_features - block_cols * b).clamp(max=b)
    if int((heights * widths).sum()) != rows.numel():
        return None
    return BlockPattern(
        b,
        block_rows,
        block_cols,
        _pointers(block_rows, block_rows_total),
        _pointers(block_cols, blocks_per_row),
        torch.sort(block_cols, stable=True).indices,
        crow,
    )


def block_value_index(layout: SparseLayout) -> Optional[torch.Tensor]:
    """``(blocks, B, B)`` positions in the values of each block's entries (-1 outside the weight), in BSR
    order; ``values[index.clamp(min=0)]`` masked by ``index >= 0`` gives the blocks. None without blocks."""
    pattern = layout.blocks
    if pattern is None:
        return None
    b = pattern.block_size
    out_features, in_features = layout.shape
    offs = torch.arange(b, device=layout.indices.device)
    rows = pattern.rows[:, None] * b + offs[None, :]  # (blocks, B)
    cols = pattern.cols[:, None] * b + offs[None, :]
    rank = torch.arange(pattern.rows.numel(), device=rows.device) - pattern.row_ptr[pattern.rows]
    starts = pattern.crow[rows.clamp(max=out_features - 1)] + (rank * b)[:, None]
    index = starts[:, :, None] + offs[None, None, :]
    inside = (rows < out_features)[:, :, None] & (cols < in_features)[:, None, :]
    return torch.where(inside, index, torch.full_like(index, -1))


def uses_block_kernels(layout: SparseLayout) -> bool:
    """Whether the block kernels serve this support (whole blocks of a size they take)."""
    return layout.blocks is not None and layout.blocks.block_size in BLOCK_KERNEL_SIZES

"""The shared sparse-delta primitive: a trainable increment on a fixed support of a weight matrix.

Every method that trains or removes a sparse set of weight entries (SparseMask's delta and mask modes, DPS's
sparse storage) goes through this module: the support and its values (``SparseDelta``), the autograd Function
that trains them in memory proportional to the support (``sparse_delta_linear``), and the compact storage
format (``encode_indices`` / ``pack_bits``).

Layout: a support is a sorted 1-D tensor of flat indices into the ``(out_features, in_features)`` weight, and
the values are a 1-D tensor in the same (row-major) order, which is also the order of a CSR matrix. Block
supports (``block_size > 1``) are unions of square blocks expanded to their entries (clipped at the edges), so
every code path below serves both.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_sparse import kernels

# torch warns once per process that CSR tensors are "beta" and invariant checks are off; the CSR tensors built
# here are valid by construction (sorted, in range), so those two messages only add noise.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")

# --------------------------------------------------------------------------------------------- supports


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


# -------------------------------------------------------------------------------------------- compute


def scatter_to_dense(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], base: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``base + ΔW`` (or ``ΔW`` when ``base`` is None) as a new dense ``(out, in)`` tensor."""
    flat = base.reshape(-1) if base is not None else values.new_zeros(shape[0] * shape[1])
    return flat.index_add(0, indices, values.to(flat.dtype)).view(shape)


def sampled_grad(grad_out: torch.Tensor, x: torch.Tensor, delta: "SparseDelta") -> torch.Tensor:
    """SDDMM: ``(grad_outᵀ @ x)`` at the support only, without forming the dense weight gradient.

    ``grad_out`` is ``(tokens, out)`` and ``x`` is ``(tokens, in)``. With the Triton backend (``kernels.backend_for``:
    CUDA tensors by default) this is a Triton kernel, per entry or per block (fp32 result); on the torch path,
    torch's ``sparse.sampled_addmm`` on the support's CSR pattern (fp32: it has no bf16/fp16 kernel on CPU).
    """
    if delta.numel_support == 0:
        return grad_out.new_zeros(0)
    if kernels.backend_for(x) == "triton":
        return kernels.triton_sddmm(grad_out, x, delta)
    # CPU sampled_addmm has fp32/fp64 kernels only: half-precision inputs are upcast (tokens × features).
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    crow, col = delta.csr_pattern()
    # Zeros, not torch.empty: sampled_addmm computes beta * values even for beta=0, and 0 * NaN-garbage = NaN.
    pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), dtype=dtype, device=x.device), delta.shape)
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dtype).T, x.to(dtype), beta=0.0).values()


class _SparseDeltaLinear(torch.autograd.Function):
    """``y = x @ (W + ΔW)ᵀ + b`` (or ``x @ ΔWᵀ`` with no ``W``), with ΔW sparse on a fixed support.

    Saves only ``x`` and the values; the backward recomputes the dense ``W + ΔW`` for the input gradient and
    takes the values' gradient as an SDDMM sampled at the support, so no weight-sized gradient exists. With no
    ``W`` and the Triton backend, both products with ΔW are SpMM kernels on the support (no dense ΔW either).
    """

    @staticmethod
    def forward(ctx, x, values, delta, weight, bias):
        ctx.delta = delta
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, values, weight)
        if weight is None and kernels.backend_for(x) == "triton":
            out = kernels.triton_spmm(x.reshape(-1, x.shape[-1]), values, delta).view(*x.shape[:-1], delta.shape[0])
            return out if bias is None else out + bias.to(out.dtype)
        effective = scatter_to_dense(delta.indices, values, delta.shape, base=weight)
        return F.linear(x, effective.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, weight = ctx.saved_tensors
        delta = ctx.delta
        grad_x = grad_values = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            if weight is None and kernels.backend_for(grad_2d) == "triton":
                grad_x = kernels.triton_spmm_t(grad_2d, values, delta).view(*grad_out.shape[:-1], x.shape[-1])
            else:
                effective = scatter_to_dense(delta.indices, values, delta.shape, base=weight)
                grad_x = (grad_2d @ effective.to(grad_2d.dtype)).view(*grad_out.shape[:-1], x.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_values = sampled_grad(grad_2d, x.reshape(-1, x.shape[-1]), delta).to(values.dtype)
        return grad_x, grad_values, None, None, None


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    delta: "SparseDelta",
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, weight + ΔW, bias)``, or ``x @ ΔWᵀ`` when ``weight`` is None (quantized bases).

    ``values`` may differ from ``delta.values`` (mask mode derives them from scores); the support is
    ``delta``'s. Weight layout is ``(out, in)``.
    """
    return _SparseDeltaLinear.apply(x, values, delta, weight, bias)


# ------------------------------------------------------------------------------------------ the module


class BlockPattern(NamedTuple):
    """A block support's layout, for the block kernels (``SparseDelta.block_pattern()``).

    Blocks are numbered in block-major order (sorted by flat block id, i.e. BSR order). The values stay in
    row-major order: row ``i`` of block ``k`` holds ``values[crow[rows[k]*b + i] + (k - row_ptr[rows[k]])*b + j]``
    for its columns ``j`` (each block before it in that row is whole; only the last block column is clipped).
    """

    block_size: int
    rows: torch.Tensor  # (blocks,) block row of each block
    cols: torch.Tensor  # (blocks,) block column of each block
    row_ptr: torch.Tensor  # (block rows + 1,) BSR pointers: blocks row_ptr[r]:row_ptr[r+1] are block row r
    col_ptr: torch.Tensor  # (block columns + 1,) BSC pointers into col_order
    col_order: torch.Tensor  # (blocks,) the block numbers ordered by block column (stable)
    crow: torch.Tensor  # (out + 1,) the entries' CSR row pointers


class SparseDelta(nn.Module):
    """A support (buffer ``indices``) and trainable ``values`` for one ``(out, in)`` weight.

    ``values`` start at zero, so the increment is zero until trained. The support can be replaced as a whole
    (``set_support``), which is how calibration and checkpoint loading install theirs. ``block_size`` is the
    side of the support's blocks (1: unstructured); it only lets the kernels use the block layout where the
    support is a union of whole blocks (``block_pattern()``), and changes neither the support nor the values.
    """

    def __init__(
        self, shape: tuple[int, int], indices: torch.Tensor, dtype: torch.dtype, device=None, block_size: int = 1
    ) -> None:
        super().__init__()
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"`block_size` must be a positive integer, got {block_size!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.block_size = block_size
        self.register_buffer("indices", torch.empty(0, dtype=torch.int64, device=device), persistent=False)
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self._csr: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._derived: dict[str, tuple] = {}  # name -> (the indices and block size it came from, value)
        self.set_support(indices)

    @property
    def numel_support(self) -> int:
        return self.indices.numel()

    def set_support(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Install a new support (sorted, unique flat indices) with zero values, or the given ones."""
        indices = indices.to(device=self.values.device, dtype=torch.int64)
        total = self.shape[0] * self.shape[1]
        if indices.numel() and (indices.min() < 0 or indices.max() >= total):
            raise ValueError(f"support indices fall outside the {self.shape} weight")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("support indices must be sorted and unique")
        if values is not None and values.shape != indices.shape:
            raise ValueError(f"{values.numel()} values for a support of {indices.numel()} entries")
        self.indices = indices
        requires_grad = self.values.requires_grad
        new_values = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
        if values is not None:
            new_values.copy_(values)
        self.values = nn.Parameter(new_values, requires_grad=requires_grad)
        self._csr = None
        self._derived = {}

    def csr_pattern(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crow_indices, col_indices)`` of the support, derived once per support."""
        if self._csr is None or self._csr[1].device != self.indices.device:
            rows = torch.div(self.indices, self.shape[1], rounding_mode="floor")
            crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.indices.device)
            crow[1:] = torch.bincount(rows, minlength=self.shape[0]).cumsum(0)
            self._csr = (crow, self.indices % self.shape[1])
        return self._csr

    def _cached(self, name: str, derive):
        """``derive()``, kept until the support (or ``block_size``) changes, or the support moves to another device."""
        entry = self._derived.get(name)
        if entry is None or entry[0] is not self.indices or entry[1] != self.block_size:
            entry = self._derived[name] = (self.indices, self.block_size, derive())
        return entry[2]

    def csc_pattern(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ccol_indices, row_indices, order)``: the support in CSC order, ``values[order]`` its values."""

        def derive():
            rows = torch.div(self.indices, self.shape[1], rounding_mode="floor")
            cols = self.indices % self.shape[1]
            order = torch.sort(cols, stable=True).indices  # rows stay ascending within a column
            ccol = torch.zeros(self.shape[1] + 1, dtype=torch.int64, device=self.indices.device)
            ccol[1:] = torch.bincount(cols, minlength=self.shape[1]).cumsum(0)
            return ccol, rows[order], order

        return self._cached("csc", derive)

    def block_pattern(self) -> Optional[BlockPattern]:
        """The block layout of the support, or None when ``block_size`` is 1 or the support is not a union of
        whole ``block_size`` blocks (clipped at the edges). Derived once per support."""
        if self.block_size == 1:
            return None

        def derive():
            b = self.block_size
            blocks_per_row = math.ceil(self.shape[1] / b)
            block_rows_total = math.ceil(self.shape[0] / b)
            rows = torch.div(self.indices, self.shape[1], rounding_mode="floor")
            cols = self.indices % self.shape[1]
            block_of = torch.div(rows, b, rounding_mode="floor") * blocks_per_row
            ids = torch.unique(block_of + torch.div(cols, b, rounding_mode="floor"))
            block_rows = torch.div(ids, blocks_per_row, rounding_mode="floor")
            block_cols = ids % blocks_per_row
            # Every entry lies in one of these blocks, so the support is these blocks, whole, when the entries
            # number as many as the blocks cover (clipped at the edges).
            heights = (self.shape[0] - block_rows * b).clamp(max=b)
            widths = (self.shape[1] - block_cols * b).clamp(max=b)
            if int((heights * widths).sum()) != self.indices.numel():
                return None
            row_ptr = torch.zeros(block_rows_total + 1, dtype=torch.int64, device=ids.device)
            row_ptr[1:] = torch.bincount(block_rows, minlength=block_rows_total).cumsum(0)
            col_ptr = torch.zeros(blocks_per_row + 1, dtype=torch.int64, device=ids.device)
            col_ptr[1:] = torch.bincount(block_cols, minlength=blocks_per_row).cumsum(0)
            col_order = torch.sort(block_cols, stable=True).indices
            return BlockPattern(b, block_rows, block_cols, row_ptr, col_ptr, col_order, self.csr_pattern()[0])

        return self._cached("blocks", derive)

    def block_value_index(self) -> Optional[torch.Tensor]:
        """``(blocks, b, b)`` positions in ``values`` of each block's entries (-1 outside the weight), block-major;
        ``values[index.clamp(min=0)]`` masked by ``index >= 0`` gives the blocks (e.g. for a BSR tensor)."""
        pattern = self.block_pattern()
        if pattern is None:
            return None

        def derive():
            b = pattern.block_size
            offs = torch.arange(b, device=self.indices.device)
            rows = pattern.rows[:, None] * b + offs[None, :]  # (blocks, b)
            cols = pattern.cols[:, None] * b + offs[None, :]
            rank = torch.arange(pattern.rows.numel(), device=rows.device) - pattern.row_ptr[pattern.rows]
            starts = pattern.crow[rows.clamp(max=self.shape[0] - 1)] + (rank * b)[:, None]
            index = starts[:, :, None] + offs[None, None, :]
            inside = (rows < self.shape[0])[:, :, None] & (cols < self.shape[1])[:, None, :]
            return torch.where(inside, index, torch.full_like(index, -1))

        return self._cached("block_index", derive)

    def dense(self, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ΔW as a dense ``(out, in)`` tensor."""
        return scatter_to_dense(self.indices, self.values if values is None else values, self.shape)

    def extra_repr(self) -> str:
        total = self.shape[0] * self.shape[1]
        blocks = f", block_size={self.block_size}" if self.block_size > 1 else ""
        return (
            f"shape={self.shape}, support={self.numel_support} ({self.numel_support / total:.2%}){blocks}, "
            f"backend={kernels.describe_backend(self.values)}"
        )


# ------------------------------------------------------------------------------------------- storage

_ESCAPE = 0xFFFF  # a gap token that advances by 65535 without emitting an entry


def encode_indices(indices: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices -> int16 gap tokens (about 2 bytes per entry, exact).

    Each token is the distance to the previous index (the first from 0); a distance of 65535 or more is
    written as that many escape tokens (0xFFFF, each worth 65535) followed by the remainder.
    """
    indices = indices.to(torch.int64).cpu()
    if indices.numel() == 0:
        return torch.zeros(0, dtype=torch.int16)
    gaps = torch.diff(indices, prepend=indices.new_zeros(1))
    escapes = torch.div(gaps, _ESCAPE, rounding_mode="floor")
    remainders = gaps - escapes * _ESCAPE
    counts = escapes + 1
    tokens = torch.full((int(counts.sum()),), _ESCAPE, dtype=torch.int64)
    tokens[counts.cumsum(0) - 1] = remainders
    return tokens.to(torch.int32).to(torch.int16)  # two's-complement wrap keeps all 16 bits


def decode_indices(tokens: torch.Tensor) -> torch.Tensor:
    """Inverse of ``encode_indices``: int16 gap tokens -> sorted flat int64 indices."""
    unsigned = tokens.to(torch.int64) & 0xFFFF
    positions = unsigned.cumsum(0)
    return positions[unsigned != _ESCAPE]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> uint8, 8 entries a byte (row-major, the first entry in the highest bit)."""
    flat = mask.flatten().to(torch.uint8).cpu()
    flat = F.pad(flat, (0, -flat.numel() % 8))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` entries as a flat boolean tensor."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.to(torch.uint8)[:, None] >> shifts) & 1
    return bits.flatten()[:numel].bool()


# ---------------------------------------------------------------------------------------------- masks


def hard_keep_mask(scores: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """1 for the entries kept, 0 for the ``num_pruned`` lowest ``scores`` (no gradient)."""
    keep = torch.ones_like(scores)
    if num_pruned > 0:
        keep[torch.topk(scores.detach(), num_pruned, largest=False, sorted=False).indices] = 0
    return keep


def mask_delta_values(scores: torch.Tensor, base_values: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Values of the increment that zeroes pruned entries: ``W ⊙ M = W − W ⊙ (1 − M)``, so ΔW = −W·(1−m).

    ``m`` is the hard top-k keep mask of ``scores`` in the forward and the identity of ``scores`` in the
    backward (straight-through estimator), so ``∂L/∂score = ∂L/∂ΔW · W`` at each candidate.
    """
    # Parenthesised: (hard + s) - s is not exactly hard in floating point; hard + (s - s) is.
    keep = hard_keep_mask(scores, num_pruned) + (scores - scores.detach())
    return -base_values.to(scores.dtype) * (1 - keep)

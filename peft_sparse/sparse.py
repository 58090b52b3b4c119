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
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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

    ``grad_out`` is ``(tokens, out)`` and ``x`` is ``(tokens, in)``. On CPU this is torch's
    ``sparse.sampled_addmm`` on the support's CSR pattern (fp32: it has no bf16/fp16 kernel on CPU).
    """
    if delta.numel_support == 0:
        return grad_out.new_zeros(0)
    # CPU sampled_addmm has fp32/fp64 kernels only: half-precision inputs are upcast (tokens × features).
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    crow, col = delta.csr_pattern()
    # Zeros, not torch.empty: sampled_addmm computes beta * values even for beta=0, and 0 * NaN-garbage = NaN.
    pattern = torch.sparse_csr_tensor(crow, col, torch.zeros(col.numel(), dtype=dtype, device=x.device), delta.shape)
    return torch.sparse.sampled_addmm(pattern, grad_out.to(dtype).T, x.to(dtype), beta=0.0).values()


class _SparseDeltaLinear(torch.autograd.Function):
    """``y = x @ (W + ΔW)ᵀ + b`` (or ``x @ ΔWᵀ`` with no ``W``), with ΔW sparse on a fixed support.

    Saves only ``x`` and the values; the backward recomputes the dense ``W + ΔW`` for the input gradient and
    takes the values' gradient as an SDDMM sampled at the support, so no weight-sized gradient exists.
    """

    @staticmethod
    def forward(ctx, x, values, delta, weight, bias):
        effective = scatter_to_dense(delta.indices, values, delta.shape, base=weight)
        ctx.delta = delta
        ctx.has_weight = weight is not None
        ctx.save_for_backward(x, values, weight)
        return F.linear(x, effective.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, weight = ctx.saved_tensors
        delta = ctx.delta
        grad_x = grad_values = None
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
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


class SparseDelta(nn.Module):
    """A support (buffer ``indices``) and trainable ``values`` for one ``(out, in)`` weight.

    ``values`` start at zero, so the increment is zero until trained. The support can be replaced as a whole
    (``set_support``), which is how calibration and checkpoint loading install theirs.
    """

    def __init__(self, shape: tuple[int, int], indices: torch.Tensor, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        self.shape = (int(shape[0]), int(shape[1]))
        self.register_buffer("indices", torch.empty(0, dtype=torch.int64, device=device), persistent=False)
        self.values = nn.Parameter(torch.zeros(0, dtype=dtype, device=device))
        self._csr: Optional[tuple[torch.Tensor, torch.Tensor]] = None
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

    def csr_pattern(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crow_indices, col_indices)`` of the support, derived once per support."""
        if self._csr is None or self._csr[1].device != self.indices.device:
            rows = torch.div(self.indices, self.shape[1], rounding_mode="floor")
            crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.indices.device)
            crow[1:] = torch.bincount(rows, minlength=self.shape[0]).cumsum(0)
            self._csr = (crow, self.indices % self.shape[1])
        return self._csr

    def dense(self, values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ΔW as a dense ``(out, in)`` tensor."""
        return scatter_to_dense(self.indices, self.values if values is None else values, self.shape)

    def extra_repr(self) -> str:
        total = self.shape[0] * self.shape[1]
        return f"shape={self.shape}, support={self.numel_support} ({self.numel_support / total:.2%})"


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

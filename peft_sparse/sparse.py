"""The shared sparse-delta primitive: a trainable increment on a fixed support of a weight matrix.

Every method that trains or removes a sparse set of weight entries (SparseMask's delta and mask modes, DPS's
sparse storage) goes through this module: the support and its values (``SparseDelta``), the autograd Function
that trains them in memory proportional to the support (``sparse_delta_linear``), and the compact storage
format (``encode_indices`` / ``pack_bits``). How SparseMask chooses a support or a mask is SparseMask's own
(``tuners/sparsemask/selection.py``).

Layout: a support is a sorted 1-D tensor of flat indices into the ``(out_features, in_features)`` weight, and
the values are a 1-D tensor in the same (row-major) order, which is also the order of a CSR matrix. Block
supports (``block_size > 1``) are unions of square blocks expanded to their entries (clipped at the edges), so
every code path below serves both. The autograd Function and the kernels live in ``peft_sparse.kernels``.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from peft_sparse import kernels

# -------------------------------------------------------------------------------------------- compute


def scatter_to_dense(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], base: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``base + ΔW`` (or ``ΔW`` when ``base`` is None) as a new dense ``(out, in)`` tensor."""
    flat = base.reshape(-1) if base is not None else values.new_zeros(shape[0] * shape[1])
    return flat.index_add(0, indices, values.to(flat.dtype)).view(shape)


def sparse_delta_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    delta: "SparseDelta",
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``F.linear(x, weight + ΔW, bias)``, or ``x @ ΔWᵀ + bias`` when ``weight`` is None (quantized bases).

    ``values`` may differ from ``delta.values`` (mask mode derives them from scores); the support is
    ``delta``'s. Weight layout is ``(out, in)``. The autograd Function and its kernels are in
    ``peft_sparse.kernels`` (``kernels.function``).
    """
    return kernels.sparse_delta_linear(x, values, delta.layout(), weight, bias)


# ------------------------------------------------------------------------------------------ the module


class SparseDelta(nn.Module):
    """A support (buffer ``indices``) and trainable ``values`` for one ``(out, in)`` weight.

    ``values`` start at zero, so the increment is zero until trained. The support can be replaced as a whole
    (``set_support``), which is how calibration and checkpoint loading install theirs. ``block_size`` is the
    side of the support's blocks (1: unstructured); it lets the kernels use the block layout where the
    support is a union of whole blocks, and changes neither the support nor the values.
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
        self._layout: Optional[tuple[torch.Tensor, int, kernels.SparseLayout]] = None
        #: The compact checkpoint entry (gap tokens) the support was read from, if any: a checkpoint with the same
        #: support is then not decoded again (``storage.read_entries``' ``known_support``).
        self.source_tokens: Optional[torch.Tensor] = None
        self.set_support(indices)

    @property
    def numel_support(self) -> int:
        return self.indices.numel()

    def set_support(self, indices: torch.Tensor, values: Optional[torch.Tensor] = None) -> None:
        """Install a new support (sorted, unique flat indices) with zero values, or the given ones."""
        indices = indices.to(device=self.values.device, dtype=torch.int64)
        total = self.shape[0] * self.shape[1]
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("support indices must be sorted and unique")
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= total):  # sorted: the ends bound it
            raise ValueError(f"support indices fall outside the {self.shape} weight")
        if values is not None and values.shape != indices.shape:
            raise ValueError(f"{values.numel()} values for a support of {indices.numel()} entries")
        self.indices = indices
        requires_grad = self.values.requires_grad
        new_values = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
        if values is not None:
            new_values.copy_(values)
        self.values = nn.Parameter(new_values, requires_grad=requires_grad)
        self._layout = None
        self.source_tokens = None

    def layout(self) -> kernels.SparseLayout:
        """The support's index arrays (CSR, CSC, block pattern), derived once per support, block size and
        device (a move to another device or a new support derives them again)."""
        cached = self._layout
        if cached is None or cached[0] is not self.indices or cached[1] != self.block_size:
            layout = kernels.build_layout(self.indices, self.shape, self.block_size)
            self._layout = cached = (self.indices, self.block_size, layout)
        return cached[2]

    def block_pattern(self) -> Optional[kernels.BlockPattern]:
        """The block layout of the support, or None when ``block_size`` is 1 or the support is not a union of
        whole ``block_size`` blocks (clipped at the edges)."""
        return self.layout().blocks

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
    unsigned = tokens.to(torch.int64).bitwise_and_(0xFFFF)
    positions = unsigned.cumsum(0)
    escapes = unsigned == _ESCAPE
    if not bool(escapes.any()):  # the common case: every position is an entry
        return positions
    return positions[~escapes]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> uint8, 8 entries a byte (row-major, the first entry in the highest bit)."""
    return torch.from_numpy(np.packbits(mask.detach().flatten().bool().cpu().numpy()))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: the first ``numel`` entries as a flat boolean tensor."""
    bits = np.unpackbits(packed.detach().to(torch.uint8).cpu().numpy(), count=numel)
    return torch.from_numpy(bits).bool()

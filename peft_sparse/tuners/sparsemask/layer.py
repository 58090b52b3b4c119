"""SparseMask tuner layer: one ``SparseDelta`` per adapter on a Linear-like base layer."""

from __future__ import annotations

import math
import zlib
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_sparse import sparse
from peft_sparse.modules import dense_weight, is_linear, linear_shape
from peft_sparse.tuners.base import SparseTunerLayer

from .config import SparseMaskConfig


def support_budget(fraction: float, shape: tuple[int, int], block_size: int) -> int:
    """Entries (or blocks) a layer gets for ``fraction``: at least one, at most all."""
    total = math.ceil(shape[0] / block_size) * math.ceil(shape[1] / block_size)
    return min(total, max(1, round(fraction * total)))


class SparseMaskLayer(SparseTunerLayer):
    """``y = x @ (W + ΔW)ᵀ + b`` with ΔW sparse; on quantized bases ``y = base(x) + x @ ΔWᵀ``.

    ``sparsemask_delta[adapter]`` holds the support and its trainable values: the increment itself in
    delta mode, the keep-scores of the candidate entries in mask mode (whose increment is ``−W`` on the
    pruned candidates, see ``sparse.mask_delta_values``).
    """

    adapter_layer_names = ("sparsemask_delta",)
    other_param_names = ("sparsemask_base_values",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparseMaskConfig, **kwargs: Any) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"SparseMask wraps linear layers, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.sparsemask_delta = nn.ModuleDict({})
        self.sparsemask_base_values = BufferDict({}, persistent=False)  # mask mode: W at the candidates
        self.modes: dict[str, str] = {}
        self.block_sizes: dict[str, int] = {}
        self.num_pruned: dict[str, int] = {}
        self.pending: set[str] = set()  # adapters whose support waits for calibration
        self.fisher: Optional[torch.Tensor] = None  # Σ g² of the weight, accumulated while calibrating
        self.out_features, self.in_features = linear_shape(base_layer)
        self.update_layer(adapter_name, config, **kwargs)

    # ---------------------------------------------------------------------------------------- creation
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense ``(out, in)`` tensor (dequantized for quantized layers)."""
        if self.quantization_backend is not None:
            return self.get_base_weight().float()
        return dense_weight(self.get_base_layer())

    def _values_dtype(self) -> torch.dtype:
        base = self.get_base_layer()
        return torch.float32 if self.quantization_backend is not None else base.weight.dtype

    def update_layer(self, adapter_name: str, config: SparseMaskConfig, current_key: str = "", **kwargs) -> None:
        device = self.get_base_layer().weight.device
        with torch.no_grad():
            weight = self.base_weight()
            if config.mode == "delta":
                count = support_budget(config.density, self.shape, config.block_size)
                if config.selection == "magnitude":
                    support = sparse.top_support(weight.abs(), count, config.block_size)
                elif config.selection == "random":
                    # Each layer draws its own support (PEFT's SHiRA reuses one mask for every same-shaped layer).
                    seed = (config.seed * 1_000_003 + zlib.crc32(current_key.encode())) % 2**63
                    generator = torch.Generator().manual_seed(seed)
                    support = sparse.random_support(self.shape, count, generator, config.block_size)
                else:
                    support = torch.zeros(0, dtype=torch.int64)
                    self.pending.add(adapter_name)
                self.sparsemask_delta[adapter_name] = sparse.SparseDelta(
                    self.shape, support, self._values_dtype(), device=device, block_size=config.block_size
                )
            else:
                self._install_mask(adapter_name, weight, config)
        self.modes[adapter_name] = config.mode
        self.block_sizes[adapter_name] = config.block_size
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _install_mask(self, adapter_name: str, weight: torch.Tensor, config: SparseMaskConfig) -> None:
        numel = weight.numel()
        num_pruned = min(numel, max(1, round(config.sparsity * numel)))
        count = numel if config.mask_candidates is None else min(numel, math.ceil(num_pruned * config.mask_candidates))
        candidates = sparse.top_support(-weight.abs(), count)  # the lowest-magnitude entries
        self.install_mask(adapter_name, candidates, num_pruned, weight=weight)

    def install_mask(
        self, adapter_name: str, candidates: torch.Tensor, num_pruned: int, weight: Optional[torch.Tensor] = None
    ) -> None:
        """Score ``candidates`` (initial scores ∝ |W|, so the lowest-magnitude ones are pruned first)."""
        weight = self.base_weight() if weight is None else weight
        device = self.get_base_layer().weight.device
        base_values = weight.detach().reshape(-1)[candidates.to(weight.device)].float()
        scores = base_values.abs() / base_values.abs().mean().clamp_min(1e-12)
        delta = sparse.SparseDelta(self.shape, candidates, torch.float32, device=device)
        delta.set_support(candidates, values=scores)
        self.sparsemask_delta[adapter_name] = delta
        self.sparsemask_base_values[adapter_name] = base_values.to(device)
        self.num_pruned[adapter_name] = num_pruned

    def install_gradient_support(self, adapter_name: str, fisher: torch.Tensor, config: SparseMaskConfig) -> None:
        """Calibration result: the support is the entries (or blocks) with the largest Σ g²."""
        count = support_budget(config.density, self.shape, config.block_size)
        support = sparse.top_support(fisher, count, config.block_size)
        self.sparsemask_delta[adapter_name].set_support(support)
        self.pending.discard(adapter_name)

    # ----------------------------------------------------------------------------------------- compute
    def delta_values(self, adapter_name: str) -> torch.Tensor:
        """The increment's values on the adapter's support (derived from the scores in mask mode)."""
        delta = self.sparsemask_delta[adapter_name]
        if self.modes[adapter_name] == "delta":
            return delta.values
        return sparse.mask_delta_values(
            delta.values, self.sparsemask_base_values[adapter_name], self.num_pruned[adapter_name]
        )

    def pruned_indices(self, adapter_name: str) -> torch.Tensor:
        """Mask mode: flat indices of the entries the mask zeroes."""
        delta = self.sparsemask_delta[adapter_name]
        keep = sparse.hard_keep_mask(delta.values, self.num_pruned[adapter_name])
        return delta.indices[keep == 0]

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.sparsemask_delta and a not in self.pending]
        if not active:
            result = self.base_layer(x, *args, **kwargs)
            return self._probe(result, x) if self.fisher is not None else result
        if self.base_runs_own_forward():
            result = self.base_layer(x, *args, **kwargs)
            for adapter in active:
                delta = self.sparsemask_delta[adapter]
                update = sparse.sparse_delta_linear(x.to(delta.values.dtype), self.delta_values(adapter), delta)
                result = result + update.to(result.dtype)
            return result
        base = self.get_base_layer()
        first, *others = active
        delta = self.sparsemask_delta[first]
        result = sparse.sparse_delta_linear(x, self.delta_values(first), delta, dense_weight(base), base.bias)
        for adapter in others:
            delta = self.sparsemask_delta[adapter]
            result = result + sparse.sparse_delta_linear(x, self.delta_values(adapter), delta).to(result.dtype)
        return result

    def _probe(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        anchor = next(iter(self.sparsemask_delta.values())).values  # requires grad: makes backward reach here
        return _FisherProbe.apply(result, x, anchor, self)

    def _add_to_base(self, adapter_name: str, sign: float) -> None:
        indices = self.sparsemask_delta[adapter_name].indices
        values = sign * self.delta_values(adapter_name).detach()
        if self.quantization_backend is not None:
            weight = self.get_base_weight()  # dequantized by PEFT's backend, re-quantized on set
            merged = sparse.scatter_to_dense(indices, values.float(), self.shape, base=weight.float())
            self.set_base_weight(merged.to(weight.dtype))
            return
        weight = dense_weight(self.get_base_layer())  # a view: Conv1D stores the transpose
        rows = torch.div(indices, self.in_features, rounding_mode="floor")
        weight.index_put_((rows, indices % self.in_features), values.to(weight.dtype), accumulate=True)

    def __repr__(self) -> str:
        return "sparsemask." + super().__repr__()


class _FisherProbe(torch.autograd.Function):
    """Identity in the forward; in the backward adds ``(grad_outᵀ x)²`` to ``layer.fisher``.

    Used only by ``calibrate`` for ``selection="gradient"``: it measures the weight gradient of any base
    layer, quantized ones included, without making the frozen weight require grad.
    """

    @staticmethod
    def forward(ctx, result, x, anchor, layer):
        ctx.layer = layer
        ctx.save_for_backward(x)
        return result.view_as(result)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        if layer.fisher is not None:
            g = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            layer.fisher += g.square()
        return grad_out, None, None, None

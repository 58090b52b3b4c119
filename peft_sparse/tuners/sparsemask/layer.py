"""SparseMask tuner layer: one ``SparseDelta`` per adapter on a Linear-like base layer."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_sparse import sparse, storage
from peft_sparse.modules import dense_weight, is_linear
from peft_sparse.tuners import merging
from peft_sparse.tuners.base import SparseTunerLayer

from . import selection
from .config import SparseMaskConfig


@dataclass
class AdapterSettings:
    """One adapter's SparseMask settings on one layer (kept in ``SparseMaskLayer.sparsemask_settings``)."""

    mode: str  # "delta" or "mask"
    density: float = 0.0  # delta mode: the fraction trained
    block_size: int = 1  # delta mode
    pending: bool = False  # delta mode: the support waits for calibrate()
    num_pruned: int = 0  # mask mode: entries the mask zeroes
    score_dtype: Optional[torch.dtype] = None  # mask mode: the stored scores' dtype (see SparseMaskLayer._apply)
    trainable: bool = True  # built to train (not inference_mode): a loaded mask keeps its candidates


class SparseMaskLayer(SparseTunerLayer):
    """``y = x @ (W + ΔW)ᵀ + b`` with ΔW sparse; on quantized or hooked bases ``y = base(x) + x @ ΔWᵀ``.

    ``sparsemask_delta[adapter]`` holds the support and its trainable values: the increment itself in delta
    mode, the keep-scores of the candidate entries in mask mode (whose increment is ``−W`` on the pruned
    candidates, see ``selection.mask_delta_values``). ``sparsemask_settings[adapter]`` holds the rest of an
    adapter's state; every per-adapter entry is registered with PEFT, so ``delete_adapter`` frees it. The layer owns
    its checkpoint entries (``write_checkpoint`` / ``read_checkpoint``) and its gradient measurement for
    ``selection="gradient"`` (``start_fisher`` / ``finish_fisher``).
    """

    adapter_layer_names = ("sparsemask_delta",)
    other_param_names = ("sparsemask_base_values", "sparsemask_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SparseMaskConfig, **kwargs: Any) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"SparseMask wraps linear layers, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.sparsemask_delta = nn.ModuleDict({})
        self.sparsemask_base_values = BufferDict({}, persistent=False)  # mask mode: W at the candidates
        self.sparsemask_settings: dict[str, AdapterSettings] = {}
        self.fisher: Optional[torch.Tensor] = None  # Σ (∂L/∂W)², accumulated while calibrating
        self._probe_anchor: Optional[torch.Tensor] = None
        self.update_layer(adapter_name, config, **kwargs)

    # ---------------------------------------------------------------------------------------- creation
    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def is_pending(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s support still waits for ``calibrate``."""
        settings = self.sparsemask_settings.get(adapter_name)
        return settings is not None and settings.pending

    def base_weight(self) -> torch.Tensor:
        """The base weight as a dense ``(out, in)`` tensor (dequantized for quantized layers)."""
        if self.is_quantized:
            return self.get_base_weight().float()
        return dense_weight(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: SparseMaskConfig, current_key: str = "", **kwargs) -> None:
        device = self.get_base_layer().weight.device
        with torch.no_grad():
            if config.mode == "delta":
                settings = AdapterSettings("delta", density=config.density, block_size=config.block_size)
                count = selection.support_budget(config.density, self.shape, config.block_size)
                if getattr(config, "_from_checkpoint", False):
                    # PeftModel.load_adapter: read_checkpoint installs the saved support next (a magnitude
                    # selection here was two thirds of loading SmolLM2's adapter, then thrown away)
                    support = torch.zeros(0, dtype=torch.int64)
                    settings.pending = True
                elif config.selection == "magnitude":
                    support = selection.top_support(self.base_weight().abs(), count, config.block_size)
                elif config.selection == "random":
                    # Each layer draws its own support (PEFT's SHiRA reuses one mask for every same-shaped layer).
                    seed = (config.seed * 1_000_003 + zlib.crc32(current_key.encode())) % 2**63
                    generator = torch.Generator().manual_seed(seed)
                    support = selection.random_support(self.shape, count, generator, config.block_size)
                else:
                    support = torch.zeros(0, dtype=torch.int64)
                    settings.pending = True
                self.sparsemask_settings[adapter_name] = settings
                self.sparsemask_delta[adapter_name] = sparse.SparseDelta(
                    self.shape, support, self.adapter_dtype(), device=device, block_size=config.block_size
                )
            else:
                weight = self.base_weight()
                numel = weight.numel()
                num_pruned = min(numel, max(1, round(config.sparsity * numel)))
                if config.mask_candidates is None:
                    count = numel
                else:
                    count = min(numel, math.ceil(num_pruned * config.mask_candidates))
                candidates = selection.top_support(-weight.abs(), count)  # the lowest-magnitude entries
                self.install_mask(adapter_name, candidates, num_pruned, weight=weight)
                self.sparsemask_settings[adapter_name].trainable = not config.inference_mode
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def install_mask(
        self,
        adapter_name: str,
        candidates: torch.Tensor,
        num_pruned: int,
        weight: Optional[torch.Tensor] = None,
        pruned: Optional[torch.Tensor] = None,
    ) -> None:
        """Score ``candidates`` (initial scores ∝ |W|, so the lowest-magnitude ones are pruned first). With
        ``pruned`` (a saved mask, ``num_pruned`` entries among the candidates) those entries score below every other
        candidate instead, each group keeping its |W| order, so the mask starts as saved."""
        weight = self.base_weight() if weight is None else weight
        device = self.get_base_layer().weight.device
        base_values = weight.detach().reshape(-1)[candidates.to(weight.device)].float()
        scores = base_values.abs() / base_values.abs().mean().clamp_min(1e-12)
        if pruned is not None:
            is_pruned = torch.isin(candidates.to(scores.device), pruned.to(scores.device))
            if bool((~is_pruned).any()):
                gap = scores[is_pruned].max() - scores[~is_pruned].min()
                scores[is_pruned] -= gap.clamp_min(0) + 1e-3
        requires_grad = adapter_name in self.active_adapters and not self.disable_adapters
        delta = sparse.SparseDelta(self.shape, candidates, torch.float32, device=device)
        delta.values.requires_grad_(requires_grad)
        delta.set_support(candidates, values=scores)
        self.sparsemask_delta[adapter_name] = delta
        self.sparsemask_settings[adapter_name] = AdapterSettings(
            "mask", num_pruned=num_pruned, score_dtype=delta.values.dtype
        )
        self.sparsemask_base_values[adapter_name] = base_values.to(device)

    def _apply(self, fn, recurse: bool = True):
        # model.to(dtype) / .half() change the stored scores' dtype for good (training and saving both see it);
        # only a cast that happens in the forward alone (FSDP mixed precision) is refused in delta_values.
        result = super()._apply(fn, recurse)
        for adapter, settings in self.sparsemask_settings.items():
            if settings.mode == "mask" and adapter in self.sparsemask_delta:
                settings.score_dtype = self.sparsemask_delta[adapter].values.dtype
        return result

    # ----------------------------------------------------------------------------------------- compute
    def delta_values(self, adapter_name: str) -> torch.Tensor:
        """The increment's values on the adapter's support (derived from the scores in mask mode)."""
        delta = self.sparsemask_delta[adapter_name]
        settings = self.sparsemask_settings[adapter_name]
        if settings.mode == "delta":
            return delta.values
        if settings.score_dtype is not None and delta.values.dtype != settings.score_dtype:
            raise ValueError(
                f"mode='mask' scores of {self.shape} cast from {settings.score_dtype} to "
                f"{delta.values.dtype} in the forward (FSDP's MixedPrecisionPolicy(param_dtype={delta.values.dtype}) "
                "does this): the hard top-k of the cast scores picks another mask than the one training and "
                "save_pretrained read from the stored scores. Use param_dtype=None (or float32) for the FSDP "
                "units that hold mask-mode layers."
            )
        return selection.mask_delta_values(
            delta.values, self.sparsemask_base_values[adapter_name], settings.num_pruned
        )

    def pruned_indices(self, adapter_name: str) -> torch.Tensor:
        """Mask mode: flat indices of the entries the mask zeroes."""
        delta = self.sparsemask_delta[adapter_name]
        keep = selection.hard_keep_mask(delta.values, self.sparsemask_settings[adapter_name].num_pruned)
        return delta.indices[keep == 0]

    def is_ready(self, adapter_name: str) -> bool:
        return adapter_name in self.sparsemask_delta and not self.is_pending(adapter_name)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.ready_adapters()
        source = self.fold_source(x) if active else None
        if source is None:
            result = self.base_plus_increments(x, active, *args, **kwargs)
        else:  # the first adapter's ΔW folded into the base product, the others' increments added
            first, *others = active
            inputs, bias = self.fold_inputs(x)
            delta = self.sparsemask_delta[first]
            result = sparse.sparse_delta_linear(inputs, self.delta_values(first), delta, source, bias).to(x.dtype)
            for adapter in others:
                result = self.add_increment(result, adapter, x)
        if self.fisher is not None:  # calibrating: measure the weight gradient in the backward
            result = _FisherProbe.apply(result, x, self._probe_anchor, self)
        return result

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        delta = self.sparsemask_delta[adapter_name]
        update = sparse.sparse_delta_linear(x.to(delta.values.dtype), self.delta_values(adapter_name), delta)
        return result + update.to(result.dtype)

    # ------------------------------------------------------------------------------------- deltas, merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.sparsemask_delta[adapter_name]
        return sparse.scatter_to_dense(delta.indices, self.delta_values(adapter_name).detach().float(), self.shape)

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        """A delta on the union of the sources' supports (blocks of one common size stay blocks), valued there."""
        union = torch.unique(torch.cat([self.sparsemask_delta[s].indices for s in sources]))
        sizes = {self.sparsemask_settings[s].block_size for s in sources}
        settings = self.sparsemask_settings[adapter_name]
        settings.block_size = sizes.pop() if len(sizes) == 1 else 1
        settings.density = union.numel() / (self.out_features * self.in_features)
        settings.pending = False
        delta = self.sparsemask_delta[adapter_name]
        delta.block_size = settings.block_size
        values = increments["weight"].reshape(-1).to(union.device)[union]
        delta.set_support(union, values=values.to(delta.values.dtype))

    def merge_increments(self, adapter_name: str) -> dict[str, merging.Increment]:
        """The support and its values: a merge scatters into the float weight and saves the support's entries
        only (no weight-sized increment); a mask's values are ``−W`` on its pruned entries."""
        indices = self.sparsemask_delta[adapter_name].indices
        return {"weight": merging.SparseIncrement(indices, self.delta_values(adapter_name).detach())}

    def derives_from_base(self, adapter_name: str) -> bool:
        return self.sparsemask_settings[adapter_name].mode == "mask"

    def refresh_from_base(self, adapter_name: str) -> None:
        """A mask's increment (``−W`` on its pruned entries) and initial scores come from ``W``: install the same mask
        again from the restored weight."""
        settings = self.sparsemask_settings[adapter_name]
        if settings.mode != "mask":
            return
        delta = self.sparsemask_delta[adapter_name]
        with torch.no_grad():
            self.install_mask(adapter_name, delta.indices, settings.num_pruned, pruned=self.pruned_indices(adapter_name))
        self.sparsemask_settings[adapter_name].trainable = settings.trainable

    # ---------------------------------------------------------------------------------------- checkpoints
    def write_checkpoint(self, adapter_name, key, entries, config) -> None:
        """A delta as its support (entries, or block ids) and values in ``save_dtype``; a mask as packed bits or
        the pruned indices, whichever is smaller, and no values."""
        prefix = f"{key}.sparsemask_delta.{adapter_name}"
        values = entries.pop(f"{prefix}.values")
        settings = self.sparsemask_settings[adapter_name]
        if settings.mode == "mask":
            # The mask from the collected scores (under FSDP the gathered ones: the layer's own are shards).
            delta = self.sparsemask_delta[adapter_name]
            keep = selection.hard_keep_mask(values.to(delta.indices.device), settings.num_pruned)
            entries.update(storage.mask_entries(prefix, delta.indices[keep == 0], self.shape))
            return
        indices = self.sparsemask_delta[adapter_name].indices
        if settings.block_size > 1:
            indices = selection.block_ids(indices, self.shape, settings.block_size)
        entries.update(storage.sparse_entries(prefix, indices, values, self.shape, config.save_dtype))

    def read_checkpoint(self, adapter_name, key, state_dict) -> None:
        """Install the saved support (sizes may differ from a freshly built config); PEFT then loads the values
        onto it. A mask (saved without its scores) is rebuilt pruning exactly the saved entries: for inference its
        candidates are those entries alone; an adapter loaded to train (``is_trainable=True``) gets the candidate
        set its config gives, plus the saved entries, with fresh scores that reproduce the saved mask, so that
        training can change it."""
        stored = f"{key}.sparsemask_delta"  # entries are saved without the adapter name
        delta = self.sparsemask_delta[adapter_name]
        known = None if delta.source_tokens is None else (delta.source_tokens, delta.indices)
        saved = storage.read_entries(state_dict, stored, self.shape, known_support=known)
        values_key = f"{key}.sparsemask_delta.{adapter_name}.values"
        settings = self.sparsemask_settings[adapter_name]
        if settings.mode == "mask":
            if "pruned" not in saved:
                raise ValueError("no mask is saved for this mask-mode adapter")
            pruned = saved["pruned"]
            candidates = pruned
            if settings.trainable:
                created = self.sparsemask_delta[adapter_name].indices  # the config's candidates
                candidates = torch.unique(torch.cat([created.to(pruned.device), pruned]))
            self.install_mask(adapter_name, candidates, num_pruned=pruned.numel(), pruned=pruned)
            self.sparsemask_settings[adapter_name].trainable = settings.trainable
            state_dict[values_key] = self.sparsemask_delta[adapter_name].values.detach().clone()
            return
        if "indices" not in saved:
            raise ValueError("no support is saved for this delta-mode adapter")
        indices = saved["indices"]
        if "unchanged" not in saved:  # (a support equal to the installed one stays, its layout cached)
            if settings.block_size > 1:
                indices = selection.block_support(indices, self.shape, settings.block_size)
            delta.set_support(indices)
            delta.source_tokens = saved["support"]
        if indices.numel():  # an empty support was saved before calibrate(): the adapter still waits for it
            settings.pending = False

    # ---------------------------------------------------------------------------------------- calibration
    def start_fisher(self) -> None:
        """Start accumulating Σ (∂L/∂W)² over the calibration batches (the probe measures it in the backward)."""
        device = self.get_base_layer().weight.device
        self.fisher = torch.zeros(self.shape, dtype=torch.float32, device=device)
        # The probe's own anchor makes the backward reach this layer whatever the adapters' trainability.
        self._probe_anchor = torch.zeros((), device=device, requires_grad=True)

    def finish_fisher(self, adapter_name: str) -> None:
        """Calibration result: the support is the entries (or blocks) with the largest Σ (∂L/∂W)²."""
        settings = self.sparsemask_settings[adapter_name]
        count = selection.support_budget(settings.density, self.shape, settings.block_size)
        support = selection.top_support(self.fisher, count, settings.block_size)
        self.sparsemask_delta[adapter_name].set_support(support)
        settings.pending = False

    def stop_fisher(self) -> None:
        self.fisher = None
        self._probe_anchor = None

    def __repr__(self) -> str:
        return "sparsemask." + super().__repr__()


class _FisherProbe(torch.autograd.Function):
    """Identity in the forward; in the backward adds ``(grad_outᵀ x)²`` to ``layer.fisher``.

    Used only by ``calibrate`` for ``selection="gradient"``: it measures the weight gradient of any base layer,
    quantized ones included, without making the frozen weight require grad. Its anchor (a scalar that requires
    grad) makes autograd call the backward even when nothing else in the layer is trainable.
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

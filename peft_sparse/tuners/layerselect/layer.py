"""LayerSelect tuner layer: a dense, zero-initialised delta for every parameter of a module in a chosen block."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from transformers.pytorch_utils import Conv1D

from peft_sparse import quantized
from peft_sparse.modules import has_own_parameters, is_linear
from peft_sparse.tuners.base import SparseTunerLayer

from .config import LayerSelectConfig


class LayerSelectLayer(SparseTunerLayer):
    """Trains ``p + Δp`` for every parameter ``p`` of the wrapped module (Linear, ``Conv1D``, LayerNorm, RMSNorm…).

    Full-precision modules run once with the summed parameters (``torch.func.functional_call``), so a chosen
    block costs what full fine-tuning of it costs. A quantized base layer cannot add a delta to its packed
    weight, so it runs ``base(x) + x @ ΔWᵀ + Δb`` instead, which never dequantizes the weight.
    """

    adapter_layer_names = ("layerselect_delta",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LayerSelectConfig, **kwargs: Any) -> None:
        super().__init__()
        if not has_own_parameters(base_layer):
            raise TypeError(f"LayerSelect wraps modules that hold parameters, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.layerselect_delta = nn.ModuleDict({})
        self.update_layer(adapter_name, config)

    def _delta_shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        base = self.get_base_layer()
        shapes = {}
        for name, param in base.named_parameters(recurse=False):
            if self.is_quantized and name == "weight":
                shapes[name] = (torch.Size((base.out_features, base.in_features)), self.adapter_dtype())
            elif param.dtype.is_floating_point:
                shapes[name] = (param.shape, param.dtype)
        return shapes

    def update_layer(self, adapter_name: str, config: LayerSelectConfig, **kwargs: Any) -> None:
        device = next(self.get_base_layer().parameters()).device
        self.layerselect_delta[adapter_name] = nn.ParameterDict(
            {
                name: nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
                for name, (shape, dtype) in self._delta_shapes().items()
            }
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _summed_deltas(self, adapters: list[str]) -> dict[str, torch.Tensor]:
        summed: dict[str, torch.Tensor] = {}
        for adapter in adapters:
            for name, delta in self.layerselect_delta[adapter].items():
                summed[name] = delta if name not in summed else summed[name] + delta
        return summed

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.ready_adapters()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if not self.is_quantized:
            return self._forward_with(self._summed_deltas(active), x, *args, **kwargs)
        source = self.fold_source(x)
        if source is None:
            return self.base_plus_increments(x, active, *args, **kwargs)
        deltas = self._summed_deltas(active)  # a quantized linear layer: ΔW added into its dequantized weight
        inputs, bias = self.fold_inputs(x)
        if "bias" in deltas:
            bias = deltas["bias"].to(inputs.dtype) if bias is None else bias + deltas["bias"].to(inputs.dtype)
        return quantized.dense_delta_linear(inputs, deltas["weight"], source, bias).to(x.dtype)

    def _forward_with(self, deltas: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any):
        """The base module run once with ``p + Δp`` for its parameters (``torch.func.functional_call``)."""
        base = self.get_base_layer()
        own = dict(base.named_parameters(recurse=False))
        empty = [name for name in deltas if name in own and own[name].numel() != deltas[name].numel()]
        if empty:
            raise ValueError(
                f"LayerSelect adds its deltas to the base parameters {empty} of {type(base).__name__}, which hold "
                f"{[own[n].numel() for n in empty]} entries here: a partitioning engine that gathers parameters "
                "only inside their module's own forward left them partitioned (DeepSpeed ZeRO-3). Train LayerSelect "
                "with DDP, FSDP or ZeRO-2."
            )
        params = {name: p + deltas[name].to(p.dtype) for name, p in own.items() if name in deltas}
        return functional_call(base, params, (x, *args), kwargs)

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """A linear layer's ``x @ ΔWᵀ + Δb``; any other module's ``f(x; p + Δp) − f(x; p)`` (two forwards)."""
        deltas = self.layerselect_delta[adapter_name]
        if is_linear(self.get_base_layer()):
            weight = self.get_delta_weight(adapter_name)
            return result + F.linear(x.to(weight.dtype), weight, deltas.get("bias")).to(result.dtype)
        return result + (self._forward_with(dict(deltas), x) - self.base_layer(x)).to(result.dtype)

    def base_layer_can_be_fsdp_unit(self) -> bool:
        # A full-precision base runs through functional_call with summed parameters, which FSDP's gather around the
        # base layer's own forward would overwrite; a quantized base runs its own forward.
        return self.is_quantized

    def get_delta_weight(self, adapter_name: str) -> Optional[torch.Tensor]:
        delta = self.layerselect_delta[adapter_name].get("weight")
        if delta is None or not is_linear(self.get_base_layer()):
            return delta  # norms: their 1-D weight's increment
        return delta.T if isinstance(self.get_base_layer(), Conv1D) and not self.is_quantized else delta

    def delta_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Every parameter's increment; a linear weight's as ``(out, in)``."""
        deltas = {name: delta.detach() for name, delta in self.layerselect_delta[adapter_name].items()}
        if "weight" in deltas:
            deltas["weight"] = self.get_delta_weight(adapter_name).detach()
        return deltas

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        """Every parameter's increment (a linear weight's given as ``(out, in)``, stored as the base stores it)."""
        deltas = self.layerselect_delta[adapter_name]
        for name, value in increments.items():
            transpose = name == "weight" and isinstance(self.get_base_layer(), Conv1D) and not self.is_quantized
            deltas[name].copy_(value.T if transpose else value)

    def __repr__(self) -> str:
        return "layerselect." + super().__repr__()

"""LayerSelect tuner layer: a dense, zero-initialised delta for every parameter of a module in a chosen block."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from peft.utils.quantization_utils import resolve_quantization_backend

from peft_sparse.modules import has_own_parameters, is_quantized

from .config import LayerSelectConfig


class LayerSelectLayer(nn.Module, BaseTunerLayer):
    """Trains ``p + Δp`` for every parameter ``p`` of the wrapped module (Linear, ``Conv1D``, LayerNorm, RMSNorm…).

    Full-precision modules run once with the summed parameters (``torch.func.functional_call``), so a chosen
    block costs what full fine-tuning of it costs. A bitsandbytes base layer cannot add a delta to its packed
    weight, so it runs ``base(x) + x @ ΔWᵀ + Δb`` instead, which never dequantizes the weight.
    """

    adapter_layer_names = ("layerselect_delta",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LayerSelectConfig, **kwargs: Any) -> None:
        super().__init__()
        if not has_own_parameters(base_layer):
            raise TypeError(f"LayerSelect wraps modules that hold parameters, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.quantization_backend = resolve_quantization_backend(base_layer)
        self.layerselect_delta = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _delta_shapes(self) -> dict[str, tuple[torch.Size, torch.dtype]]:
        base = self.get_base_layer()
        shapes = {}
        for name, param in base.named_parameters(recurse=False):
            if is_quantized(base) and name == "weight":
                shapes[name] = (torch.Size((base.out_features, base.in_features)), torch.float32)
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

    def _summed_deltas(self, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        summed: dict[str, torch.Tensor] = {}
        for adapter in adapter_names:
            if adapter not in self.layerselect_delta:
                continue
            for name, delta in self.layerselect_delta[adapter].items():
                summed[name] = delta if name not in summed else summed[name] + delta
        return summed

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        deltas = self._summed_deltas(self.active_adapters)
        if not deltas:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if is_quantized(base):
            result = self.base_layer(x, *args, **kwargs)
            weight = deltas["weight"]
            return result + F.linear(x.to(weight.dtype), weight, deltas.get("bias")).to(result.dtype)
        params = {
            name: p + deltas[name].to(p.dtype) for name, p in base.named_parameters(recurse=False) if name in deltas
        }
        return functional_call(base, params, (x, *args), kwargs)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas to the base parameters (re-quantizing the weight of a bitsandbytes layer)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.layerselect_delta:
                continue
            deltas = {n: d.detach() for n, d in self.layerselect_delta[adapter].items()}
            if safe_merge and not all(torch.isfinite(d).all() for d in deltas.values()):
                raise ValueError(f"NaNs or infinities in the LayerSelect adapter {adapter!r}; it was not merged")
            self._add_deltas(deltas, sign=1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.layerselect_delta:
                deltas = {n: d.detach() for n, d in self.layerselect_delta[adapter].items()}
                self._add_deltas(deltas, sign=-1.0)

    def _add_deltas(self, deltas: dict[str, torch.Tensor], sign: float) -> None:
        base = self.get_base_layer()
        for name, delta in deltas.items():
            if name == "weight" and self.quantization_backend is not None:
                # PEFT's backend dequantizes, and re-quantizes the sum (bitsandbytes 8-bit and 4-bit).
                weight = self.get_base_weight()
                self.set_base_weight((weight.float() + sign * delta.float()).to(weight.dtype))
            else:
                param = getattr(base, name)
                param.data += sign * delta.to(param.dtype)

    def __repr__(self) -> str:
        return "layerselect." + super().__repr__()

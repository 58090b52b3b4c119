"""LayerSelect tuner layer: a dense, zero-initialised delta for every parameter of a module in a chosen block."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from peft_sparse.modules import has_own_parameters
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
            if self.quantization_backend is not None and name == "weight":
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

    def _summed_deltas(self) -> dict[str, torch.Tensor]:
        summed: dict[str, torch.Tensor] = {}
        for adapter in self.active_adapters:
            if adapter not in self.layerselect_delta:
                continue
            for name, delta in self.layerselect_delta[adapter].items():
                summed[name] = delta if name not in summed else summed[name] + delta
        return summed

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        deltas = self._summed_deltas()
        if not deltas:
            return self.base_layer(x, *args, **kwargs)
        if self.quantization_backend is not None:
            result = self.base_layer(x, *args, **kwargs)
            weight = deltas["weight"]
            return result + F.linear(x.to(weight.dtype), weight, deltas.get("bias")).to(result.dtype)
        base = self.get_base_layer()
        params = {
            name: p + deltas[name].to(p.dtype) for name, p in base.named_parameters(recurse=False) if name in deltas
        }
        return functional_call(base, params, (x, *args), kwargs)

    def _add_to_base(self, adapter_name: str, sign: float) -> None:
        base = self.get_base_layer()
        for name, delta in self.layerselect_delta[adapter_name].items():
            delta = delta.detach()
            if name == "weight" and self.quantization_backend is not None:
                weight = self.get_base_weight()  # dequantized by PEFT's backend, re-quantized on set
                self.set_base_weight((weight.float() + sign * delta.float()).to(weight.dtype))
            else:
                param = getattr(base, name)
                param.data += sign * delta.to(param.dtype)

    def __repr__(self) -> str:
        return "layerselect." + super().__repr__()

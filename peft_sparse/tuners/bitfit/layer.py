"""BitFit tuner layer: a zero-initialised bias delta added to a layer's output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peft_sparse.modules import is_linear, is_norm
from peft_sparse.tuners.base import SparseTunerLayer

from .config import BitFitConfig


class BitFitLayer(SparseTunerLayer):
    """Wraps a Linear-like or norm layer; ``y = base(x) + Σ active bias deltas``.

    Adding the delta to the output is exactly a bias change for every supported layer (the bias is the last
    term of Linear, ``Conv1D`` and LayerNorm), and it leaves quantized weights untouched.
    """

    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        super().__init__()
        if not (is_linear(base_layer) or is_norm(base_layer)):
            raise TypeError(f"BitFit cannot wrap {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.bitfit_bias = nn.ParameterDict({})
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        dtype = base.bias.dtype if base.bias is not None else self.adapter_dtype()
        zeros = torch.zeros(self.out_features, dtype=dtype, device=base.weight.device)
        self.bitfit_bias[adapter_name] = nn.Parameter(zeros)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        return result + self.bitfit_bias[adapter_name].to(result.dtype)

    def get_delta_weight(self, adapter_name: str) -> None:
        return None  # BitFit changes biases only

    def delta_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The bias increment (merging creates the bias where the layer has none)."""
        return {"bias": self.bitfit_bias[adapter_name].detach()}

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        self.bitfit_bias[adapter_name].copy_(increments["bias"])

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()

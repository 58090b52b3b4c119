"""BitFit tuner layer: a zero-initialised bias delta added to a layer's output."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from peft_sparse.modules import is_linear, is_norm, is_quantized, out_features

from .config import BitFitConfig


class BitFitLayer(nn.Module, BaseTunerLayer):
    """Wraps a Linear-like or norm layer; ``y = base(x) + Σ active bias deltas``.

    Adding the delta to the output is exactly a bias change for every supported layer (the bias is the last
    term of Linear, ``Conv1D`` and LayerNorm), and it leaves quantized weights untouched.
    """

    adapter_layer_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        super().__init__()
        if not (is_linear(base_layer) or is_norm(base_layer)):
            raise TypeError(f"BitFit cannot wrap {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.bitfit_bias = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.out_features = out_features(base_layer)
        # Names of adapters whose merge created the base bias (it had none); unmerging removes it again.
        self._created_bias_for: list[str] = []
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BitFitConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        reference = base.bias if getattr(base, "bias", None) is not None else None
        dtype = reference.dtype if reference is not None else torch.float32
        if reference is None and not is_quantized(base) and base.weight.dtype.is_floating_point:
            dtype = base.weight.dtype
        device = base.weight.device
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _active_delta(self, adapter_names: list[str]) -> Optional[torch.Tensor]:
        deltas = [self.bitfit_bias[name] for name in adapter_names if name in self.bitfit_bias]
        if not deltas:
            return None
        return deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        delta = self._active_delta(self.active_adapters)
        if delta is None:
            return result
        return result + delta.to(result.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the bias deltas to the base bias, creating the bias where the layer has none."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.bitfit_bias:
                continue
            delta = self.bitfit_bias[name].detach()
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"NaNs or infinities in the BitFit adapter {name!r}; it was not merged")
            if base.bias is None:
                base.bias = nn.Parameter(delta.clone(), requires_grad=False)
                self._created_bias_for.append(name)
            else:
                base.bias.data += delta.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self._created_bias_for:
                self._created_bias_for.remove(name)
                base.bias = None
            elif name in self.bitfit_bias:
                base.bias.data -= self.bitfit_bias[name].detach().to(base.bias.dtype)

    def __repr__(self) -> str:
        return "bitfit." + super().__repr__()

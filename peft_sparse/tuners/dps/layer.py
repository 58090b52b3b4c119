"""DPS tuner layer: a dense increment whose updated entries change stage by stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_sparse.modules import dense_weight, is_linear, linear_shape
from peft_sparse.tuners.base import SparseTunerLayer

from .config import DPSConfig


@dataclass
class StageState:
    """One adapter's schedule state on one layer."""

    stage: int = 1  # 1 = stage I (all entries or sampled columns), 2 = stage II (the subnetwork)
    score: Optional[torch.Tensor] = None  # Σ g² over the current stage I (fp32, weight-sized)
    column_counts: Optional[torch.Tensor] = None  # mix: how often each input column was sampled this stage
    mask: Optional[torch.Tensor] = None  # stage II: True where entries are updated
    frozen_values: Optional[torch.Tensor] = None  # strict stage II: the values outside the mask


class DPSLayer(SparseTunerLayer):
    """``y = x @ (W + ΔW)ᵀ + b``; on quantized bases ``y = base(x) + x @ ΔWᵀ``.

    In stage II the increment enters the forward as ``where(mask, ΔW, ΔW.detach())``: the same values, but
    the gradient reaches only the subnetwork, with no hook on the parameter.
    """

    adapter_layer_names = ("dps_delta",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DPSConfig, **kwargs: Any) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"DPS wraps linear layers, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.dps_delta = nn.ParameterDict({})
        self.states: dict[str, StageState] = {}
        self.configs: dict[str, DPSConfig] = {}
        self.out_features, self.in_features = linear_shape(base_layer)
        self.update_layer(adapter_name, config)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def update_layer(self, adapter_name: str, config: DPSConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        dtype = torch.float32 if self.quantization_backend is not None else base.weight.dtype
        self.dps_delta[adapter_name] = nn.Parameter(torch.zeros(self.shape, dtype=dtype, device=base.weight.device))
        self.states[adapter_name] = StageState()
        self.configs[adapter_name] = config
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ----------------------------------------------------------------------------------------- forward
    def _effective_delta(self, adapter: str) -> torch.Tensor:
        delta = self.dps_delta[adapter]
        state, config = self.states[adapter], self.configs[adapter]
        if not self.training or not delta.requires_grad:
            return delta
        if state.stage == 2 and state.mask is not None:
            return torch.where(state.mask, delta, delta.detach())
        if config.variant == "mix":  # Mixout over input columns: W0 + M ⊙ ΔW / keep
            keep = config.keep_ratio
            columns = torch.rand(self.in_features, device=delta.device) < keep
            if state.column_counts is None:
                state.column_counts = torch.zeros(self.in_features, device=delta.device)
            state.column_counts += columns
            return delta * (columns.to(delta.dtype) / keep)
        return delta

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.dps_delta]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        delta = self._effective_delta(active[0])
        for adapter in active[1:]:
            delta = delta + self._effective_delta(adapter)
        if self.base_runs_own_forward():
            result = self.base_layer(x, *args, **kwargs)
            return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)
        base = self.get_base_layer()
        weight = dense_weight(base)
        return F.linear(x, weight + delta.to(weight.dtype), base.bias)

    # ---------------------------------------------------------------------------------------- schedule
    @torch.no_grad()
    def after_optimizer_step(self, adapter: str, global_step: int) -> None:
        """Advance ``adapter``'s schedule after optimizer step ``global_step`` (0-based), gradients still set."""
        delta = self.dps_delta[adapter]
        state, config = self.states[adapter], self.configs[adapter]
        stage_length = config.stage_length()
        if state.stage == 2 and config.masking == "strict" and state.mask is not None:
            delta.data[~state.mask] = state.frozen_values  # undo momentum / weight decay outside the subnetwork
        if state.stage == 1 and delta.grad is not None:
            if state.score is None:
                state.score = torch.zeros(self.shape, dtype=torch.float32, device=delta.device)
            state.score += delta.grad.float().square()
        next_step = global_step + 2  # 1-based index of the next optimizer step
        next_stage = 1 if math.ceil(next_step / stage_length) % 2 == 1 else 2
        if next_stage == state.stage:
            return
        if next_stage == 2:
            state.mask = self._subnetwork(state, config, stage_length, delta.device)
            if config.masking == "strict":
                state.frozen_values = delta.data[~state.mask].clone()
        else:
            state.mask = state.frozen_values = state.score = state.column_counts = None
        state.stage = next_stage

    def _subnetwork(self, state: StageState, config: DPSConfig, stage_length: int, device) -> torch.Tensor:
        """The top ``keep_ratio`` entries of this weight by the stage-I score."""
        score = state.score if state.score is not None else torch.zeros(self.shape, device=device)
        if config.variant == "mix" and state.column_counts is not None:
            counts = state.column_counts.clamp_min(1)[None, :]
            score = score / counts
            if stage_length >= 50:  # the authors' frequency penalty
                score = score * torch.exp(-state.column_counts[None, :] / stage_length)
        keep = max(1, round(config.keep_ratio * score.numel()))
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
        return mask.view(self.shape)

    def _add_to_base(self, adapter_name: str, sign: float) -> None:
        delta = self.dps_delta[adapter_name].detach()
        if self.quantization_backend is not None:
            weight = self.get_base_weight()  # dequantized by PEFT's backend, re-quantized on set
            self.set_base_weight((weight.float() + sign * delta.float()).to(weight.dtype))
        else:
            weight = dense_weight(self.get_base_layer())
            weight += sign * delta.to(weight.dtype)

    def __repr__(self) -> str:
        return "dps." + super().__repr__()

"""DPS tuner layer: a dense increment whose updated entries change stage by stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from peft_sparse import distributed, quantized, sparse, storage
from peft_sparse.modules import is_linear
from peft_sparse.tuners.base import SparseTunerLayer

from .config import DPSConfig


@dataclass(frozen=True)
class Schedule:
    """One adapter's DPS settings, copied from its config when the layer is built (layers never share or
    change a config object)."""

    variant: str
    keep_ratio: float
    masking: str

    @classmethod
    def of(cls, config: DPSConfig) -> "Schedule":
        return cls(config.variant, config.keep_ratio, config.masking)


@dataclass
class StageState:
    """One adapter's schedule state on one layer."""

    stage: int = 1  # 1 = stage I (all entries or sampled columns), 2 = stage II (the subnetwork)
    # Σ g² over the current stage I (fp32, weight-sized; under FSDP a DTensor sharded like the increment)
    score: Optional[torch.Tensor] = None
    column_counts: Optional[torch.Tensor] = None  # mix: how often each input column was sampled this stage
    columns: Optional[torch.Tensor] = None  # mix: this optimizer step's sampled columns (all its forwards)
    mask: Optional[torch.Tensor] = None  # stage II: True where entries are updated (whole, on every rank)
    local_mask: Optional[torch.Tensor] = None  # the part of ``mask`` this rank's shard of the increment holds
    frozen_values: Optional[torch.Tensor] = None  # strict stage II: the values outside the mask (this rank's shard)


class DPSLayer(SparseTunerLayer):
    """``y = x @ (W + ΔW)ᵀ + b``; on quantized or hooked bases ``y = base(x) + x @ ΔWᵀ``.

    In stage II the increment enters the forward as ``where(mask, ΔW, ΔW.detach())``: the same values, but the
    gradient reaches only the subnetwork, with no hook on the parameter. In ``mix`` stage I the sampled input
    columns are drawn once per optimizer step and reused by every forward of that step (gradient accumulation,
    and the recomputation of gradient checkpointing), and counted once; under several processes rank 0's draw is
    broadcast, so every rank samples the same columns.

    Under FSDP (``fully_shard``) the increment, its gradient and so the stage-I score are DTensor shards between
    forwards: each rank accumulates the score of its own shard, the scores are gathered once at each stage switch
    (every rank computes the same whole mask from them), and strict masking works on each rank's shard.
    """

    adapter_layer_names = ("dps_delta", "dps_bias")
    other_param_names = ("states", "schedules")  # PEFT's delete_adapter frees them with the adapter

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DPSConfig, **kwargs: Any) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"DPS wraps linear layers, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.dps_delta = nn.ParameterDict({})
        self.dps_bias = nn.ParameterDict({})  # scope="model": the bias trains densely at every step
        self.states: dict[str, StageState] = {}
        self.schedules: dict[str, Schedule] = {}
        self.checkpoint_schedule = False  # set by DPSModel.save_schedule_state (Trainer checkpoints)
        self.update_layer(adapter_name, config)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def update_layer(self, adapter_name: str, config: DPSConfig, **kwargs: Any) -> None:
        device = self.get_base_layer().weight.device
        self.dps_delta[adapter_name] = nn.Parameter(torch.zeros(self.shape, dtype=self.adapter_dtype(), device=device))
        base_bias = self.get_base_layer().bias
        if config.scope == "model" and base_bias is not None:
            self.dps_bias[adapter_name] = nn.Parameter(torch.zeros_like(base_bias, dtype=self.adapter_dtype()))
        self.states[adapter_name] = StageState()
        self.schedules[adapter_name] = Schedule.of(config)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # ----------------------------------------------------------------------------------------- forward
    def _effective_delta(self, adapter: str) -> torch.Tensor:
        delta = self.dps_delta[adapter]
        state, schedule = self.states[adapter], self.schedules[adapter]
        if not self.training or not delta.requires_grad or not torch.is_grad_enabled():
            return delta
        if state.stage == 2 and state.mask is not None:
            return torch.where(state.mask, delta, delta.detach())
        if schedule.variant == "mix":  # Mixout over input columns: W0 + M ⊙ ΔW / keep
            if state.columns is None:
                columns = torch.rand(self.in_features, device=delta.device) < schedule.keep_ratio
                distributed.broadcast_from_rank0([columns])  # every rank trains the same sampled columns
                state.columns = columns
            return delta * (state.columns.to(delta.dtype) / schedule.keep_ratio)
        return delta

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.ready_adapters()
        source = self.fold_source(x) if active else None
        if source is None:
            return self.base_plus_increments(x, active, *args, **kwargs)
        delta = self._effective_delta(active[0])
        for adapter in active[1:]:
            delta = delta + self._effective_delta(adapter)
        inputs, bias = self.fold_inputs(x)
        for adapter in active:
            if adapter in self.dps_bias:
                extra = self.dps_bias[adapter].to(inputs.dtype)
                bias = extra if bias is None else bias + extra
        if callable(source):  # a quantized base: ΔW added into its dequantized weight
            return quantized.dense_delta_linear(inputs, delta, source, bias).to(x.dtype)
        return F.linear(x, source + delta.to(source.dtype), bias)

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        delta = self._effective_delta(adapter_name)
        bias = self.dps_bias[adapter_name] if adapter_name in self.dps_bias else None
        return result + F.linear(x.to(delta.dtype), delta, bias).to(result.dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.dps_delta[adapter_name].detach()

    def delta_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        deltas = {"weight": self.get_delta_weight(adapter_name)}
        if adapter_name in self.dps_bias:
            deltas["bias"] = self.dps_bias[adapter_name].detach()
        return deltas

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        self.dps_delta[adapter_name].copy_(increments["weight"])
        if adapter_name in self.dps_bias and "bias" in increments:
            self.dps_bias[adapter_name].copy_(increments["bias"])

    # ---------------------------------------------------------------------------------------- schedule
    def has_gradient(self, adapter: str) -> bool:
        grad = self.dps_delta[adapter].grad
        return grad is not None and bool(distributed.local(grad).any())

    def _local_mask(self, state: StageState, delta: torch.Tensor) -> torch.Tensor:
        """The stage-II mask over this rank's shard of the increment (the whole mask without sharding)."""
        values = distributed.local(delta.data)
        if state.local_mask is None or state.local_mask.shape != values.shape:
            state.local_mask = distributed.local_part(state.mask, delta.data)
        return state.local_mask

    @torch.no_grad()
    def after_optimizer_step(self, adapter: str, global_step: int, stage_length: int) -> None:
        """Advance ``adapter``'s schedule after optimizer step ``global_step`` (0-based), gradients still set."""
        delta = self.dps_delta[adapter]
        state, schedule = self.states[adapter], self.schedules[adapter]
        if state.stage == 2 and schedule.masking == "strict" and state.mask is not None:
            # undo momentum / weight decay outside the subnetwork (on this rank's shard under FSDP)
            distributed.local(delta.data)[~self._local_mask(state, delta)] = state.frozen_values
        if state.stage == 1:
            if delta.grad is not None:
                if state.score is None:
                    state.score = torch.zeros_like(delta.grad, dtype=torch.float32)
                state.score += delta.grad.float().square()
            if schedule.variant == "mix" and state.columns is not None:
                if state.column_counts is None:
                    state.column_counts = torch.zeros(self.in_features, device=delta.device)
                state.column_counts += state.columns
            state.columns = None  # the next step draws its own columns
        next_step = global_step + 2  # 1-based index of the next optimizer step
        next_stage = 1 if math.ceil(next_step / stage_length) % 2 == 1 else 2
        if next_stage == state.stage:
            return
        if next_stage == 2:
            state.mask = self._subnetwork(state, schedule, stage_length, delta.device)
            state.local_mask = None
            if schedule.masking == "strict":
                state.frozen_values = distributed.local(delta.data)[~self._local_mask(state, delta)].clone()
        else:
            state.mask = state.local_mask = state.frozen_values = state.score = None
            state.column_counts = state.columns = None
        state.stage = next_stage

    def _subnetwork(self, state: StageState, schedule: Schedule, stage_length: int, device) -> torch.Tensor:
        """The top ``keep_ratio`` entries of this weight by the stage-I score (under FSDP the shards' scores are
        gathered first: a collective, which every rank reaches in the same ``update_and_allocate``)."""
        score = distributed.gather(state.score) if state.score is not None else torch.zeros(self.shape, device=device)
        if schedule.variant == "mix" and state.column_counts is not None:
            counts = state.column_counts.clamp_min(1)[None, :]
            score = score / counts
            if stage_length >= 50:  # the authors' frequency penalty
                score = score * torch.exp(-state.column_counts[None, :] / stage_length)
        keep = max(1, round(schedule.keep_ratio * score.numel()))
        mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
        return mask.view(self.shape)

    # ---------------------------------------------------------------------------------------- checkpoints
    def write_checkpoint(self, adapter_name, key, entries, config) -> None:
        """The increment by its changed entries (dense when that is smaller); with ``checkpoint_schedule`` (Trainer
        checkpoints) also the stage, the stage-II mask as bits and the stage-I scores, for an exact resume."""
        prefix = f"{key}.dps_delta.{adapter_name}"
        entries.update(storage.delta_entries(prefix, entries.pop(prefix), config.save_dtype))
        if not self.checkpoint_schedule:
            return
        state = self.states[adapter_name]
        schedule_key = f"{key}.dps_schedule.{adapter_name}"
        entries[f"{schedule_key}.stage"] = torch.tensor([state.stage], dtype=torch.int8)
        if state.mask is not None:
            entries[f"{schedule_key}.subnetwork"] = sparse.pack_bits(state.mask)
        if state.score is not None:
            if distributed.is_dtensor(state.score):
                raise ValueError(
                    "DPS cannot save its stage-I scores for resuming (save_schedule_state=True) while FSDP shards "
                    "them: gathering them is a collective, and checkpoints are written by rank 0 alone. Save the "
                    "adapter with save_schedule_state=False (a resumed run then restarts the current stage's "
                    "scores), or train DPS under DDP."
                )
            entries[f"{schedule_key}.score"] = state.score.detach().cpu()
        if state.column_counts is not None:
            entries[f"{schedule_key}.columns"] = state.column_counts.detach().cpu()

    def read_checkpoint(self, adapter_name, key, state_dict) -> None:
        stored = f"{key}.dps_delta"
        delta = storage.read_delta(state_dict, stored, self.shape)
        state_dict[f"{key}.dps_delta.{adapter_name}"] = delta.to(self.dps_delta[adapter_name].dtype)
        self.states[adapter_name] = self._read_schedule(state_dict, f"{key}.dps_schedule", delta)

    def _read_schedule(self, state_dict, key: str, delta: torch.Tensor) -> StageState:
        entries = {}
        for kind in ("stage", "subnetwork", "score", "columns"):
            for candidate in (f"{key}.{kind}", f"base_model.model.{key}.{kind}"):
                if candidate in state_dict:
                    entries[kind] = state_dict.pop(candidate)
        device = self.dps_delta[next(iter(self.dps_delta))].device
        if "stage" not in entries:
            return StageState()
        state = StageState(stage=int(entries["stage"][0]))
        if "subnetwork" in entries:
            state.mask = sparse.unpack_bits(entries["subnetwork"], self.shape[0] * self.shape[1]).view(self.shape)
            state.mask = state.mask.to(device)
            state.frozen_values = delta.to(device)[~state.mask].to(self.adapter_dtype())
        if "score" in entries:
            if tuple(entries["score"].shape) != self.shape:
                raise ValueError(f"its saved DPS scores have shape {tuple(entries['score'].shape)}")
            state.score = entries["score"].float().to(device)
        if "columns" in entries:
            state.column_counts = entries["columns"].float().to(device)
        return state

    def __repr__(self) -> str:
        return "dps." + super().__repr__()

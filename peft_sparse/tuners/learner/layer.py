"""Learner tuner layer: the increment of a few FFN nodes (rows of an up projection, or columns of a down one)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_sparse.modules import is_linear
from peft_sparse.tuners.base import SparseTunerLayer

from .config import LearnerConfig


class LearnerLayer(SparseTunerLayer):
    """One projection of an FFN with its Learner part.

    ``role="up"`` (up or gate projection): ``y = base(x)``, plus ``x @ ΔW_Sᵀ + Δb_S`` added to the hidden
    nodes ``S``. ``role="down"``: ``y = base(h) + h[..., S] @ ΔW_Sᵀ``. ``S`` (``learner_nodes``) is shared by
    the projections of one FFN and may be empty (a Learner waiting for priming).
    """

    adapter_layer_names = ("learner_weight", "learner_bias")
    other_param_names = ("learner_nodes",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LearnerConfig, role: str = "up",
                 **kwargs: Any) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"Learners wrap linear FFN projections, not {type(base_layer).__name__}")
        self._init_tuner_layer(base_layer, adapter_name)
        self.role = role
        self.learner_weight = nn.ParameterDict({})
        self.learner_bias = nn.ParameterDict({})
        self.learner_nodes = BufferDict({}, persistent=True)
        self.update_layer(adapter_name, config)

    @property
    def num_nodes(self) -> int:
        """Hidden nodes of the FFN this projection belongs to."""
        return self.out_features if self.role == "up" else self.in_features

    def update_layer(self, adapter_name: str, config: LearnerConfig, **kwargs: Any) -> None:
        self.set_nodes(adapter_name, torch.zeros(0, dtype=torch.int64))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_nodes(self, adapter_name: str, nodes: torch.Tensor, keep_values: bool = False) -> None:
        """Make ``nodes`` (sorted hidden-node indices) the Learner; with ``keep_values`` their current
        increments are kept (after priming), otherwise they start at zero."""
        base = self.get_base_layer()
        device = base.weight.device
        # Keep the adapter's dtype (fp32 after get_peft_model's autocast_adapter_dtype upcast) when it exists.
        dtype = self.learner_weight[adapter_name].dtype if adapter_name in self.learner_weight else self.adapter_dtype()
        nodes = nodes.to(device=device, dtype=torch.int64)
        weight = torch.zeros((len(nodes), self.in_features) if self.role == "up" else (self.out_features, len(nodes)),
                             dtype=dtype, device=device)
        bias = torch.zeros(len(nodes), dtype=dtype, device=device)
        if keep_values and adapter_name in self.learner_nodes:
            position = {int(n): i for i, n in enumerate(self.learner_nodes[adapter_name].tolist())}
            where = torch.tensor([position[int(n)] for n in nodes.tolist()], dtype=torch.int64, device=device)
            old = self.learner_weight[adapter_name].detach()
            weight.copy_(old[where] if self.role == "up" else old[:, where])
            if adapter_name in self.learner_bias:
                bias.copy_(self.learner_bias[adapter_name].detach()[where])
        requires_grad = adapter_name in self.active_adapters and not self.disable_adapters
        self.learner_nodes[adapter_name] = nodes
        self.learner_weight[adapter_name] = nn.Parameter(weight, requires_grad=requires_grad)
        if self.role == "up" and base.bias is not None:
            self.learner_bias[adapter_name] = nn.Parameter(bias, requires_grad=requires_grad)

    # ----------------------------------------------------------------------------------------- forward
    def is_ready(self, adapter_name: str) -> bool:
        return adapter_name in self.learner_nodes and len(self.learner_nodes[adapter_name]) > 0

    def add_increment(self, result: torch.Tensor, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        nodes, weight = self.learner_nodes[adapter_name], self.learner_weight[adapter_name]
        if self.role == "up":
            update = F.linear(x.to(weight.dtype), weight, self.learner_bias.get(adapter_name))
            return result.index_add(-1, nodes, update.to(result.dtype))
        return result + F.linear(x.index_select(-1, nodes).to(weight.dtype), weight).to(result.dtype)

    # ------------------------------------------------------------------------------------ deltas, merging
    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.learner_nodes

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The Learner's rows (up) or columns (down) placed in a dense ``(out, in)`` increment."""
        nodes = self.learner_nodes[adapter_name]
        weight = self.learner_weight[adapter_name].detach()
        delta = torch.zeros(self.out_features, self.in_features, dtype=weight.dtype, device=weight.device)
        return delta.index_copy(0 if self.role == "up" else 1, nodes, weight)

    def delta_parameters(self, adapter_name: str) -> dict[str, torch.Tensor]:
        deltas = {"weight": self.get_delta_weight(adapter_name)}
        if adapter_name in self.learner_bias:
            bias = self.learner_bias[adapter_name].detach()
            deltas["bias"] = torch.zeros(self.out_features, dtype=bias.dtype, device=bias.device).index_copy(
                0, self.learner_nodes[adapter_name], bias
            )
        return deltas

    def set_increments(self, adapter_name: str, increments: dict[str, torch.Tensor], sources: list[str]) -> None:
        """A Learner on the union of the sources' nodes (the same on every projection of an FFN), valued there."""
        nodes = torch.unique(torch.cat([self.learner_nodes[s] for s in sources]))
        self.set_nodes(adapter_name, nodes)
        weight = increments["weight"].to(nodes.device)
        self.learner_weight[adapter_name].copy_(weight[nodes] if self.role == "up" else weight[:, nodes])
        if adapter_name in self.learner_bias and "bias" in increments:
            self.learner_bias[adapter_name].copy_(increments["bias"].to(nodes.device)[nodes])

    # ---------------------------------------------------------------------------------------- checkpoints
    def read_checkpoint(self, adapter_name, key, state_dict) -> None:
        """Resize the Learner to its saved nodes, so that PEFT can load the values."""
        nodes = state_dict.get(f"{key}.learner_nodes.{adapter_name}")
        if nodes is None:
            return  # reported as a missing key
        if nodes.dim() != 1 or (nodes.numel() and (nodes.min() < 0 or nodes.max() >= self.num_nodes)):
            raise ValueError(f"its saved nodes do not fit the FFN's {self.num_nodes} hidden nodes")
        self.set_nodes(adapter_name, nodes)

    def __repr__(self) -> str:
        return f"learner[{self.role}]." + super().__repr__()

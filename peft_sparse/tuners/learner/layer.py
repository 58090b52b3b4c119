"""Learner tuner layer: the increment of a few FFN nodes (rows of an up projection, or columns of a down one)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from torch import nn

from peft_sparse.modules import dense_weight, is_linear, linear_shape
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
        self.out_features, self.in_features = linear_shape(base_layer)
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
        dtype = torch.float32 if self.quantization_backend is not None else base.weight.dtype
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
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for adapter in self.active_adapters:
            if adapter not in self.learner_nodes or len(self.learner_nodes[adapter]) == 0:
                continue
            nodes, weight = self.learner_nodes[adapter], self.learner_weight[adapter]
            if self.role == "up":
                update = F.linear(x.to(weight.dtype), weight, self.learner_bias.get(adapter))
                result = result.index_add(-1, nodes, update.to(result.dtype))
            else:
                hidden = x.index_select(-1, nodes).to(weight.dtype)
                result = result + F.linear(hidden, weight).to(result.dtype)
        return result

    # ------------------------------------------------------------------------------------------- merge
    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in self.learner_nodes

    def _add_to_base(self, adapter: str, sign: float) -> None:
        base = self.get_base_layer()
        nodes = self.learner_nodes[adapter]
        increment = sign * self.learner_weight[adapter].detach()
        if self.quantization_backend is not None:
            weight = self.get_base_weight().float()
        else:
            weight = dense_weight(base)  # a view: changes land in the base weight
        if self.role == "up":
            weight.index_add_(0, nodes, increment.to(weight.dtype))
        else:
            weight.index_add_(1, nodes, increment.to(weight.dtype))
        if self.quantization_backend is not None:
            self.set_base_weight(weight.to(self.get_base_weight().dtype))
        if adapter in self.learner_bias:
            base.bias.data.index_add_(0, nodes, sign * self.learner_bias[adapter].detach().to(base.bias.dtype))

    def __repr__(self) -> str:
        return f"learner[{self.role}]." + super().__repr__()

"""Learner tuner model: FFN discovery, Learner selection (priming or magnitude) and checkpoint sizes."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from peft_sparse import distributed
from peft_sparse.modules import dense_weight, find_layer_stack, is_linear, linear_shape
from peft_sparse.calibration import CalibrationSession
from peft_sparse.tuners.base import SparseTunerModel, shallow_with

from .config import FFN_LAYOUTS
from .layer import LearnerLayer


class LearnerModel(SparseTunerModel):
    """Learner modules in every FFN (see ``LearnerConfig``).

    Example::

        >>> model = get_peft_model(model, LearnerConfig(task_type="SEQ_CLS", learner_ratio=0.1))
        >>> peft_sparse.calibrate(model, train_dataloader)  # priming: picks the Learners
        >>> trainer.train()
    """

    prefix: str = "learner_"
    tuner_layer_cls = LearnerLayer
    accepts_all_linear = False

    def _supports(self, module: nn.Module) -> bool:
        return is_linear(module)

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        stack_name, stack = find_layer_stack(model, config.layers_pattern)
        block_modules = {name for name, _ in stack[0].named_modules()}
        if config.up_modules is None:
            layout = next((l for l in FFN_LAYOUTS if set(l[0]) | {l[1]} <= block_modules), None)
            if layout is None:
                raise ValueError(
                    f"No known FFN layout in {stack_name}.0; give LearnerConfig(up_modules=[...], down_module=...)"
                )
            config.up_modules, config.down_module = list(layout[0]), layout[1]
        names = []
        for index, block in enumerate(stack):
            present = {name for name, _ in block.named_modules()}
            missing = [rel for rel in [*config.up_modules, config.down_module] if rel not in present]
            if missing:
                raise ValueError(f"{stack_name}.{index} has no {missing} (up_modules/down_module)")
            _check_ffn(f"{stack_name}.{index}", block, config.up_modules, config.down_module)
            names += [f"{stack_name}.{index}.{rel}" for rel in [*config.up_modules, config.down_module]]
        return shallow_with(config, target_modules=names)

    def _layer_kwargs(self, config: PeftConfig, key: str) -> dict[str, Any]:
        return {"role": "down" if key.endswith("." + config.down_module) else "up"}

    def ffns(self, adapter_name: str) -> list[tuple[list[LearnerLayer], LearnerLayer]]:
        """(up/gate layers, down layer) of every FFN that ``adapter_name`` targets."""
        config = self.peft_config[adapter_name]
        stack_name, stack = find_layer_stack(self.model, config.layers_pattern)
        result = []
        for block in stack:
            ups = [block.get_submodule(rel) for rel in config.up_modules]
            down = block.get_submodule(config.down_module)
            layers = [*ups, down]
            if all(isinstance(m, LearnerLayer) and adapter_name in m.learner_nodes for m in layers):
                result.append((ups, down))
        return result

    def needs_calibration(self, adapter_name: str) -> bool:
        if self.peft_config[adapter_name].priming_steps == 0:
            return False
        return any(len(down.learner_nodes[adapter_name]) == 0 for _, down in self.ffns(adapter_name))

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if self.peft_config[adapter_name].priming_steps == 0:
            self._choose_by_magnitude(adapter_name)

    def _count(self, adapter_name: str, num_nodes: int) -> int:
        return max(1, round(self.peft_config[adapter_name].learner_ratio * num_nodes))

    @torch.no_grad()
    def _choose_by_magnitude(self, adapter_name: str) -> None:
        """Without data: the nodes with the largest ‖up rows‖·‖down column‖."""
        for ups, down in self.ffns(adapter_name):
            up_norm = sum(_weight(u).float().square().sum(1) for u in ups).sqrt()
            down_norm = _weight(down).float().square().sum(0).sqrt()
            nodes = torch.topk(up_norm * down_norm, self._count(adapter_name, down.num_nodes)).indices.sort().values
            for layer in [*ups, down]:
                layer.set_nodes(adapter_name, nodes)

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        return _PrimingSession(self, adapter_names)


def _check_ffn(where: str, block: nn.Module, up_modules: list[str], down_module: str) -> None:
    """``up_modules`` and ``down_module`` must form an FFN: linear layers ``hidden -> nodes`` and ``nodes -> hidden``
    (a Learner node is a row of every up projection and a column of the down projection)."""
    modules = {rel: block.get_submodule(rel) for rel in [*up_modules, down_module]}
    modules = {rel: m.get_base_layer() if isinstance(m, BaseTunerLayer) else m for rel, m in modules.items()}
    not_linear = [f"{rel} ({type(m).__name__})" for rel, m in modules.items() if not is_linear(m)]
    if not_linear:
        raise ValueError(f"Learners wrap linear FFN projections; in {where}, {not_linear} are not linear layers")
    down_out, nodes = linear_shape(modules[down_module])
    shapes = {rel: linear_shape(modules[rel]) for rel in up_modules}
    wrong = {rel: shape for rel, shape in shapes.items() if shape != (nodes, down_out)}
    if wrong:
        raise ValueError(
            f"up_modules/down_module of {where} do not form an FFN: down_module {down_module!r} maps {nodes} nodes to "
            f"{down_out} features, so each up module must map {down_out} features to {nodes} nodes (out, in = "
            f"{(nodes, down_out)}), but {', '.join(f'{r!r} is {s}' for r, s in wrong.items())}"
        )


def _weight(layer: LearnerLayer) -> torch.Tensor:
    base = layer.get_base_layer()
    return layer.get_base_weight() if layer.is_quantized else dense_weight(base)


class _PrimingSession(CalibrationSession):
    """``priming_steps`` AdamW steps in which every FFN node of the pending adapters (and their own copy of the
    task head) trains, then the Learner choice. Nothing else trains: other adapters stay as they are. Under
    several processes the gradients are averaged over the ranks before each step (data-parallel priming), so
    every rank primes the same values and chooses the same Learners."""

    def __init__(self, tuner: LearnerModel, adapter_names: list[str]) -> None:
        self.tuner = tuner
        self.adapter_names = adapter_names
        self.finished = False
        half = [a for a in adapter_names for _, down in tuner.ffns(a) if down.learner_weight[a].dtype == torch.float16]
        if half:
            raise ValueError(
                f"Learner priming of adapter(s) {sorted(set(half))} would run AdamW on float16 values, which gives NaNs "
                "(Adam's eps and squared gradients underflow in float16). Keep get_peft_model's default "
                "autocast_adapter_dtype=True (fp32 values on half-precision bases), or use priming_steps=0."
            )
        for adapter in adapter_names:
            for ups, down in tuner.ffns(adapter):
                every_node = torch.arange(down.num_nodes)
                for layer in [*ups, down]:
                    layer.set_nodes(adapter, every_node)
        tuner.set_adapter(tuner.active_adapters)  # the new full-size increments train
        config = tuner.peft_config[adapter_names[0]]
        self.limit = config.priming_steps
        self.params = self._primed_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=config.priming_lr, weight_decay=0.0)
        self.steps = 0

    def _primed_parameters(self) -> list[torch.Tensor]:
        params: list[torch.Tensor] = []
        for module in self.tuner.model.modules():
            if isinstance(module, LearnerLayer):
                for adapter in self.adapter_names:
                    if adapter in module.learner_nodes:
                        params.append(module.learner_weight[adapter])
                        if adapter in module.learner_bias:
                            params.append(module.learner_bias[adapter])
            elif isinstance(module, AuxiliaryTrainingWrapper):  # the adapter's copy of the task head
                for adapter in self.adapter_names:
                    copies = getattr(module, "modules_to_save", {})
                    if adapter in copies:
                        params += [p for p in copies[adapter].parameters() if p.requires_grad]
        return params

    def step(self) -> None:
        if distributed.world_size() > 1:
            # Data-parallel priming: the ranks' gradients averaged (formed on rank 0 and broadcast, so every rank
            # takes the same AdamW step), as DDP would average them.
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            distributed.reduce_to_all([p.grad for p in self.params], average=True)
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        self.steps += 1
        self.done = self.steps >= self.limit

    @torch.no_grad()
    def finish(self) -> None:
        if self.steps < self.limit:
            warnings.warn(f"Learner priming ran {self.steps} of {self.limit} steps: calibrate() ran out of batches")
        for adapter in self.adapter_names:
            for ups, down in self.tuner.ffns(adapter):
                change = down.learner_weight[adapter].float().square().sum(0)
                for up in ups:
                    change += up.learner_weight[adapter].float().square().sum(1)
                    if adapter in up.learner_bias:
                        change += up.learner_bias[adapter].float().square()
                nodes = torch.topk(change, self.tuner._count(adapter, down.num_nodes)).indices.sort().values
                for layer in [*ups, down]:
                    layer.set_nodes(adapter, nodes, keep_values=True)  # Learners keep their primed values
        self.tuner.set_adapter(self.tuner.active_adapters)
        self.finished = True

    def close(self) -> None:
        self.optimizer = None
        if not self.finished:  # interrupted: back to waiting for priming
            for adapter in self.adapter_names:
                for ups, down in self.tuner.ffns(adapter):
                    for layer in [*ups, down]:
                        layer.set_nodes(adapter, torch.zeros(0, dtype=torch.int64))

"""LayerSelect tuner model: picks whole blocks, by hand or by a gradient calibration."""

from __future__ import annotations

from peft.config import PeftConfig
import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from peft.utils import _get_submodules
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from peft_sparse.modules import block_index, find_layer_stack, has_own_parameters
from peft_sparse.calibration import CalibrationSession
from peft_sparse.tuners.base import SparseTunerModel, shallow_with

from .layer import LayerSelectLayer


class LayerSelectModel(SparseTunerModel):
    """Fine-tunes only chosen transformer blocks (see ``LayerSelectConfig``).

    Example::

        >>> model = get_peft_model(model, LayerSelectConfig(task_type="SEQ_CLS", num_layers=2))
        >>> peft_sparse.calibrate(model, train_dataloader, num_batches=8)  # measures and injects the 2 blocks
        >>> trainer.train()
    """

    prefix: str = "layerselect_"
    tuner_layer_cls = LayerSelectLayer
    transformers_loader_exact = True  # fixed-shape dense deltas: transformers' own loader fills them exactly

    def _supports(self, module: nn.Module) -> bool:
        return has_own_parameters(module)

    def needs_calibration(self, adapter_name: str) -> bool:
        return self.peft_config[adapter_name].layers is None

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Check the block choice against the model and turn it into explicit module names to inject."""
        stack_name, stack = find_layer_stack(model, config.layers_pattern)
        if config.num_layers is not None and config.num_layers > len(stack):
            raise ValueError(f"num_layers={config.num_layers} but {stack_name} has only {len(stack)} blocks")
        if config.layers is None:
            if isinstance(config.target_modules, list):  # checked now: calibrate() injects later
                in_stack = [k for k, _ in self._base_modules(model) if block_index(k, stack_name) is not None]
                if not any(k == t or k.endswith("." + t) for t in config.target_modules for k in in_stack):
                    raise ValueError(f"target_modules {config.target_modules} match no module in the blocks of "
                                     f"{stack_name}")
                every = [k for k, _ in model.named_modules()]
                missing = [t for t in config.target_modules if not any(k == t or k.endswith("." + t) for k in every)]
                if missing:
                    raise ValueError(f"target_modules {missing} match no module of {type(model).__name__}")
            return shallow_with(config, target_modules=DUMMY_TARGET_MODULES)  # injected by calibrate()
        out_of_range = [i for i in config.layers if i >= len(stack)]
        if out_of_range:
            raise ValueError(
                f"layers {out_of_range} are out of range: {stack_name} has {len(stack)} blocks (0..{len(stack) - 1})"
            )
        chosen = set(config.layers)
        names: list[str] = []
        user_hits: set[str] = set()
        for key, module in self._base_modules(model):
            if block_index(key, stack_name) not in chosen or not has_own_parameters(module):
                continue
            if config.target_modules is not None:
                if not check_target_module_exists(shallow_with(config, exclude_modules=None), key):
                    continue
                user_hits.add(key)
            if not check_target_module_exists(shallow_with(config, target_modules=[key]), key):
                continue  # excluded
            names.append(key)
        if config.target_modules is not None and not user_hits:
            raise ValueError(
                f"target_modules={config.target_modules!r} match no module with parameters in blocks {sorted(chosen)}"
            )
        if not names:
            raise ValueError(f"Nothing to train in blocks {sorted(chosen)} after exclude_modules")
        return shallow_with(config, target_modules=names, layers_to_transform=None, layers_pattern=None)

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        return _BlockGradientSession(self, adapter_names)

    def _inject_calibrated(self, adapter_name: str) -> None:
        """Wrap the blocks that calibration chose, as PEFT's inject_adapter would have."""
        config = self._prepare_adapter_config(self.peft_config[adapter_name], {})
        for key in config.target_modules:
            parent, target, target_name = _get_submodules(self.model, key)
            self._create_and_replace(config, adapter_name, target, target_name, parent, current_key=key)
            if key not in self.targeted_module_names:
                self.targeted_module_names.append(key)
        self._recast_adapter_dtype(adapter_name)  # fp32 deltas on half-precision blocks, as get_peft_model makes them
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(self.model)


class _BlockGradientSession(CalibrationSession):
    """Scores every block by Σ‖∂L/∂θ‖² over its base parameters (never over adapter parameters, which would count
    the same gradient twice), then injects the top ``num_layers`` blocks."""

    def __init__(self, tuner: LayerSelectModel, adapter_names: list[str]) -> None:
        self.tuner = tuner
        self.adapter_names = adapter_names
        _, stack = find_layer_stack(tuner.model, tuner.peft_config[adapter_names[0]].layers_pattern)
        adapter_tensors = {
            id(t) for m in tuner.model.modules() if isinstance(m, BaseTunerLayer)
            for name in m.adapter_layer_names for t in _tensors(getattr(m, name))
        }
        self.block_params = [
            [p for p in block.parameters() if p.dtype.is_floating_point and id(p) not in adapter_tensors]
            for block in stack
        ]
        # Base parameters are made to require grad for the calibration only (close() gives the flags back).
        self.flags = [(p, p.requires_grad) for params in self.block_params for p in params]
        for p, _ in self.flags:
            p.requires_grad_(True)
        self.scores = torch.zeros(len(stack), dtype=torch.float64, device=next(tuner.model.parameters()).device)

    def step(self) -> None:
        for i, params in enumerate(self.block_params):
            for p in params:
                if p.grad is not None:
                    self.scores[i] += p.grad.detach().double().pow(2).sum()
                    p.grad = None

    def measurements(self) -> list[torch.Tensor]:
        return [self.scores]

    def finish(self) -> None:
        scores = self.scores.tolist()
        for adapter in self.adapter_names:
            config = self.tuner.peft_config[adapter]
            order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
            config.layers = sorted(order[: config.num_layers])
            config.layer_scores = list(scores)
            self.tuner._inject_calibrated(adapter)

    def close(self) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
            p.grad = None


def _tensors(holder) -> list[torch.Tensor]:
    if isinstance(holder, nn.Module):
        return list(holder.parameters()) + list(holder.buffers())
    if isinstance(holder, dict):
        return [t for t in holder.values() if isinstance(t, torch.Tensor)]
    return []

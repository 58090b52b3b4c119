"""Behaviour every peft_sparse tuner shares: atomic target validation, wrapping, checked loading, calibration.

``SparseTunerModel`` sits between PEFT's ``BaseTuner`` and each method's tuner model. It adds what a demanding
PEFT user expects but PEFT leaves to each method:

* every check runs before the first module is replaced, so bad input leaves the model as it was;
* an adapter checkpoint is compared key by key and shape by shape with the model before anything is loaded,
  and a mismatch removes the half-loaded adapter again and raises a ``ValueError`` naming the problem;
* the calibration protocol (``peft_sparse.calibrate``) and the guard that refuses to train an adapter
  whose selection has not been measured yet.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _maybe_include_all_linear_layers,
    check_adapters_to_merge,
)
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND
from peft.utils import AuxiliaryTrainingWrapper, _get_submodules
from peft.utils.constants import DUMMY_TARGET_MODULES
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from peft_sparse.modules import find_layer_stack, head_module_names, is_linear, is_under


class CalibrationRequiredError(RuntimeError):
    """Raised when an adapter whose selection is measured from data is trained before ``calibrate`` ran."""


class CalibrationSession:
    """One calibration run of one tuner: ``step()`` after each backward, ``finish()`` once, ``close()`` always.

    Subclasses accumulate what they measure in ``step`` and turn it into a selection in ``finish``. ``close``
    must undo any temporary change (``requires_grad`` flags, hooks) whether or not ``finish`` ran.
    """

    #: Set to True by a session that has seen enough batches (priming's fixed number of steps).
    done: bool = False

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def finish(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class SparseTunerLayer(nn.Module, BaseTunerLayer):
    """What every peft_sparse tuner layer shares: setup, the disabled / merged forward, merge and unmerge.

    A subclass implements ``adapted_forward`` (the forward with its active adapters) and
    ``_add_to_base(adapter, sign)`` (add, or with ``sign=-1`` subtract, the adapter's change to the base
    layer); ``merge``, ``unmerge`` and ``safe_merge``'s check come from here.
    """

    def _init_tuner_layer(self, base_layer: nn.Module, adapter_name: str) -> None:
        self.base_layer = base_layer
        # PEFT's backend for quantized layers (bitsandbytes 8/4-bit...): dequantize / re-quantize on merge.
        self.quantization_backend = resolve_quantization_backend(base_layer)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def base_runs_own_forward(self) -> bool:
        """Whether the base layer must run its own forward: quantized, or hooked (Accelerate offloading,
        user hooks), so that a weight increment is added as ``base(x) + x @ ΔWᵀ`` instead of folded in."""
        base = self.get_base_layer()
        hooked = bool(base._forward_hooks or base._forward_pre_hooks) or hasattr(base, "_hf_hook")
        return self.quantization_backend is not None or hooked

    def has_adapter(self, adapter_name: str) -> bool:
        return adapter_name in getattr(self, self.adapter_layer_names[0])

    def _adapter_tensors(self, adapter_name: str) -> list[torch.Tensor]:
        tensors = []
        for attribute in self.adapter_layer_names:
            holder = getattr(self, attribute)
            if adapter_name in holder:
                item = holder[adapter_name]
                tensors += list(item.parameters()) if isinstance(item, nn.Module) else [item]
        return tensors

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold the adapters' changes into the base layer (re-quantizing a quantized weight)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self.has_adapter(adapter):
                continue
            if safe_merge and not all(torch.isfinite(t).all() for t in self._adapter_tensors(adapter)):
                raise ValueError(f"NaNs or infinities in adapter {adapter!r} of {type(self).__name__}; not merged")
            with torch.no_grad():
                self._add_to_base(adapter, 1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if self.has_adapter(adapter):
                with torch.no_grad():
                    self._add_to_base(adapter, -1.0)

    def _add_to_base(self, adapter_name: str, sign: float) -> None:
        raise NotImplementedError



class SparseTunerModel(BaseTuner):
    """Base class of peft_sparse's tuner models (a PEFT ``BaseTuner``)."""

    #: the tuner layer class; it must provide ``wrap(target, adapter_name, config)`` and ``update_layer``.
    tuner_layer_cls: type[BaseTunerLayer]
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        self._calibrating = False
        # The base model's trainability before PEFT froze it, so that a failed load can give it back as it was.
        self._base_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        super().__init__(model, *args, **kwargs)

    #: Whether ``target_modules="all-linear"`` means something for this tuner (Learners pick FFNs themselves).
    accepts_all_linear: bool = True

    # ----------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # The tuner keeps its own copy of the config and resolves model-dependent defaults into it, so the
        # user's config object is never changed: the same config can build adapters on different models.
        self.peft_config[adapter_name] = copy.deepcopy(self.peft_config[adapter_name])
        super().inject_adapter(model, adapter_name, *args, **kwargs)

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        """Fill in model-dependent defaults; return the config to inject with. The default target is every
        linear layer inside the transformer blocks (SparseMask, DPS); other tuners override this."""
        if config.target_modules is None:
            config.target_modules = self._block_linear_names(model, config)
        return config

    def _block_linear_names(self, model: nn.Module, config: PeftConfig) -> list[str]:
        """Every linear layer inside the stack of transformer blocks, outside the task head: the default
        target of the tuners that train weight matrices."""
        try:
            stack_name, _ = find_layer_stack(model)
        except ValueError as error:
            raise ValueError(f"{error}; give {type(config).__name__}(target_modules=[...]) for this model") from None
        head = head_module_names(model, config.modules_to_save)
        return sorted(
            name
            for name, module in self._base_modules(model)
            if is_under(name, [stack_name]) and is_linear(module) and not is_under(name, head)
        )

    def _supports(self, module: nn.Module) -> bool:
        """Whether this tuner can wrap ``module`` (default: linear layers, quantized ones included)."""
        return is_linear(module)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        # Called by PEFT's inject_adapter before any module is touched, for the first adapter and for every
        # adapter added later, so all validation lives here.
        targets = peft_config.target_modules
        if isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND:
            if not self.accepts_all_linear:
                raise ValueError(
                    f"target_modules='all-linear' does not apply to {type(peft_config).__name__}: it chooses its "
                    "modules itself (see its docstring); leave target_modules unset"
                )
            # PEFT's own expansion, exactly as for LoRA: every linear layer but the output embeddings / the
            # classification head, recorded as explicit names so that a saved adapter reloads onto the same ones.
            _maybe_include_all_linear_layers(peft_config, self.model)
            peft_config.target_modules = sorted(peft_config.target_modules)
        config = self._resolve_config(self.model, peft_config)
        if config.target_modules != DUMMY_TARGET_MODULES:
            self._validate_targets(self.model, config)
        return config

    @staticmethod
    def _base_modules(model: nn.Module):
        """``(name, module)`` for every module a tuner may target: a tuner layer counts as its base layer,
        and what lives inside tuner layers (``base_layer``, adapter weights) is skipped."""
        inside: list[str] = []
        for key, module in model.named_modules():
            if not key or is_under(key, inside):
                continue
            if isinstance(module, BaseTunerLayer):
                inside.append(key)
                module = module.get_base_layer()
            yield key, module

    def _targeted_modules(self, model: nn.Module, config: PeftConfig) -> dict[str, nn.Module]:
        """The modules that ``config`` selects, matched exactly as PEFT's inject_adapter will match them."""
        found: dict[str, nn.Module] = {}
        for key, module in self._base_modules(model):
            result = self._check_target_module_exists(config, key)
            if result and not isinstance(result, _ExcludedModule):
                found[key] = module
        return found

    def _validate_targets(self, model: nn.Module, config: PeftConfig) -> None:
        found = self._targeted_modules(model, config)
        head = head_module_names(model, config.modules_to_save)
        targets = config.target_modules
        if isinstance(targets, (list, set, tuple)):
            keys = [k for k, _ in model.named_modules()]
            hits = {t: [k for k in keys if k == t or k.endswith("." + t)] for t in targets}
            missing = sorted(t for t, ks in hits.items() if not ks)
            if missing:
                raise ValueError(
                    f"target_modules {missing} match no module of {type(model).__name__}. "
                    "Check the names with `[name for name, _ in model.named_modules()]`."
                )
            head_only = sorted(t for t, ks in hits.items() if all(is_under(k, head) for k in ks))
            if head_only:
                raise ValueError(
                    f"target_modules {head_only} are part of the task head (modules_to_save or output embeddings), "
                    "which is trained whole; remove them from target_modules"
                )
        if not found:
            raise ValueError(f"target_modules={targets!r} selects no module of {type(model).__name__}")
        unsupported = {k: type(m).__name__ for k, m in found.items() if not self._supports(m)}
        if unsupported:
            first = dict(list(unsupported.items())[:5])
            raise ValueError(
                f"{type(self).__name__} cannot wrap these target modules (name: type): {first}"
                + (f" and {len(unsupported) - 5} more" if len(unsupported) > 5 else "")
            )

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: Optional[str] = None,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key=current_key)
            return
        kwargs = self._layer_kwargs(peft_config, current_key)
        new_module = self.tuner_layer_cls(target, adapter_name, peft_config, current_key=current_key, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layer_kwargs(self, config: PeftConfig, key: str) -> dict[str, Any]:
        """Extra constructor arguments of the tuner layer wrapping module ``key`` (e.g. its role)."""
        return {}

    # ------------------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        try:
            remapped = cls._prepare_checkpoint(model, adapter_name, remapped)
        except ValueError:
            _remove_adapter(model, adapter_name)
            raise
        problems = cls._checkpoint_problems(model, adapter_name, remapped)
        if problems:
            _remove_adapter(model, adapter_name)
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            raise ValueError(
                f"The {cls.prefix.rstrip('_')} adapter checkpoint does not fit this model ({shown}). It was saved "
                "from another architecture, layer selection or tuner configuration; the model was left as it was."
            )
        return remapped

    @classmethod
    def _prepare_checkpoint(
        cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Hook for tuners with a compact storage format: decode it, resize the adapter to fit, and return the
        entries left for ``load_state_dict``. A ``ValueError`` here removes the half-loaded adapter."""
        return state_dict

    @classmethod
    def _checkpoint_problems(
        cls, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> list[str]:
        """Keys of this adapter that the checkpoint lacks, has extra, or holds with another shape."""
        marker = re.compile(rf"(^|\.){re.escape(cls.prefix)}")
        expected = {
            k: v
            for k, v in model.state_dict().items()
            if marker.search(k) and (k.endswith(f".{adapter_name}") or f".{adapter_name}." in k)
        }
        problems = []
        for key, tensor in state_dict.items():
            if not marker.search(key):
                continue
            if key not in expected:
                problems.append(f"unexpected key {key}")
            elif tuple(tensor.shape) != tuple(expected[key].shape):
                problems.append(f"{key} has shape {tuple(tensor.shape)}, the model {tuple(expected[key].shape)}")
        problems += [f"missing key {k}" for k in expected if k not in state_dict]
        return problems

    # --------------------------------------------------------------------------------------------- calibration
    def needs_calibration(self, adapter_name: str) -> bool:
        """Whether ``adapter_name`` still waits for ``peft_sparse.calibrate`` to measure its selection."""
        return False

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        raise NotImplementedError(f"{type(self).__name__} has no calibration")

    def forward(self, *args: Any, **kwargs: Any):
        if self.model.training and not self._calibrating:
            pending = [a for a in self.active_adapters if self.needs_calibration(a)]
            if pending:
                raise CalibrationRequiredError(
                    f"Adapter(s) {pending} choose what to train from data: run "
                    "`peft_sparse.calibrate(model, batches)` before training (eval-mode forwards are fine)."
                )
        return super().forward(*args, **kwargs)


def _remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo a half-loaded adapter: delete it, or restore the base modules if it was the only one."""
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, BaseTuner) or adapter_name not in tuner.peft_config:
        return
    others = [name for name in tuner.peft_config if name != adapter_name]
    if others:
        if adapter_name in tuner.active_adapters:
            tuner.set_adapter(others[0])
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)
    else:
        # Put the original modules back: the head PEFT copied for modules_to_save, then every tuner layer.
        for name, module in list(tuner.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "original_module"):
                parent, _, child = _get_submodules(tuner.model, name)
                setattr(parent, child, module.original_module)
        tuner._unload_and_optionally_merge(merge=False)
        for param, requires_grad in getattr(tuner, "_base_requires_grad", []):
            param.requires_grad_(requires_grad)


def shallow_with(config: PeftConfig, **changes: Any) -> PeftConfig:
    """A shallow copy of ``config`` with some fields replaced (used to inject with resolved values)."""
    new = copy.copy(config)
    for name, value in changes.items():
        setattr(new, name, value)
    return new

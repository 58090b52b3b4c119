"""Loading safety shared by every peft_sparse tuner: a checkpoint is checked before it changes anything, and a load
that fails anyway leaves the model as it was.

* ``check_readable_checkpoint``: the safetensors file is read whole before the adapter is injected (PEFT reads it
  only afterwards), so a truncated or corrupt file changes nothing;
* ``refuse_transformers_loader``: transformers' own ``model.load_adapter`` bypasses PEFT's checkpoint hooks and
  would load compact formats wrongly; it is refused before anything changes;
* ``read_layer_checkpoints`` / ``checkpoint_problems``: each tuner layer decodes its own entries, then the result
  is compared key by key and shape by shape with the model;
* ``remove_adapter``: the rollback of a half-loaded adapter (deleted, or the base modules restored, and every
  parameter's trainability given back).
"""

from __future__ import annotations

import os
import re
import sys

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import AuxiliaryTrainingWrapper, _get_submodules
from torch import nn

from peft_sparse import storage


def check_readable_checkpoint(source: str) -> None:
    """Read a local adapter checkpoint whole before its adapter is injected, so that a truncated or corrupt file
    is an error that leaves the model as it was (PEFT reads the file only after injecting)."""
    path = os.path.join(str(source), "adapter_model.safetensors")
    if not os.path.isfile(path):
        return  # a hub id, or a .bin checkpoint: PEFT reports those itself
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"Cannot read the adapter checkpoint {path} ({error}); the model was left as it was") from None


def refuse_transformers_loader(tuner_cls: type, config: PeftConfig) -> None:
    """transformers' ``PreTrainedModel.load_adapter`` fills the injected parameters with its own loader, which
    never calls the tuner's checkpoint decoding: for tuners whose entries are compact or resized by the checkpoint
    (SparseMask, DPS, Learner) it would load zeros, no mask, or fail on sizes. Refuse it before anything changes."""
    if tuner_cls.transformers_loader_exact:
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "load_adapter" and "transformers" in frame.f_code.co_filename.replace("\\", "/"):
            name = type(config).__name__.removesuffix("Config")
            raise ValueError(
                f"transformers' `model.load_adapter` cannot load a {name} adapter exactly (its loader bypasses "
                "PEFT's checkpoint hooks, which decode this adapter's compact entries). Load it with "
                "`PeftModel.from_pretrained(model, path)`, or `peft_model.load_adapter(path, adapter_name)`; "
                "the model was left as it was."
            )
        frame = frame.f_back


def inside_peft_load_adapter() -> bool:
    """Whether the caller runs inside PEFT's ``PeftModel.from_pretrained`` (which injects the first adapter) or
    ``load_adapter``: the adapter being injected then gets its tensors from the checkpoint right after, so work that
    only sets their initial values (a delta's magnitude or random support) can be skipped."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename.replace("\\", "/")
        if frame.f_code.co_name in ("from_pretrained", "load_adapter") and filename.endswith(
            ("peft/peft_model.py", "peft/mixed_model.py")
        ):
            return True
        frame = frame.f_back
    return False


def read_layer_checkpoints(
    tuner_cls: type, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Let every layer of ``tuner_cls`` decode its own entries; entries no layer claimed mean another model's
    checkpoint (``ValueError``)."""
    name_of_method = tuner_cls.prefix.rstrip("_")
    state_dict = dict(state_dict)
    for name, layer in model.named_modules():
        if isinstance(layer, tuner_cls.tuner_layer_cls) and layer.has_adapter(adapter_name):
            try:
                layer.read_checkpoint(adapter_name, name, state_dict)
            except (RuntimeError, ValueError, KeyError, IndexError) as error:
                shape = getattr(layer, "shape", None)
                where = f"{name} {tuple(shape)}" if shape is not None else name
                raise ValueError(f"The {name_of_method} checkpoint does not fit {where}: {error}") from None
    leftovers = storage.leftover_keys(state_dict)
    if leftovers:
        raise ValueError(f"The {name_of_method} checkpoint has entries for modules this model lacks: {leftovers[:3]}")
    return state_dict


def checkpoint_problems(
    prefix: str, model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]
) -> list[str]:
    """Keys of this adapter that the checkpoint lacks, has extra, or holds with another shape; and entries of the
    rest of the checkpoint (the task head) whose shape differs from the model's."""
    own = re.compile(rf"(^|\.){re.escape(prefix)}[^.]*\.{re.escape(adapter_name)}(\.|$)")
    marker = re.compile(rf"(^|\.){re.escape(prefix)}")
    model_state = model.state_dict()
    expected = {k: v for k, v in model_state.items() if own.search(k)}
    problems = []
    for key, tensor in state_dict.items():
        if marker.search(key):
            if key not in expected:
                problems.append(f"unexpected key {key}")
            elif tuple(tensor.shape) != tuple(expected[key].shape):
                problems.append(f"{key} has shape {tuple(tensor.shape)}, the model {tuple(expected[key].shape)}")
        elif key in model_state and tuple(tensor.shape) != tuple(model_state[key].shape):
            problems.append(f"{key} has shape {tuple(tensor.shape)}, the model {tuple(model_state[key].shape)}")
    problems += [f"missing key {k}" for k in expected if k not in state_dict]
    return problems


def remove_adapter(model: nn.Module, adapter_name: str) -> None:
    """Undo a half-loaded adapter: delete it, or restore the base modules if it was the only one, and give every
    parameter back the trainability it had before the adapter was injected."""
    tuner = model if isinstance(model, BaseTuner) else getattr(model, "base_model", model)
    if not isinstance(tuner, BaseTuner) or adapter_name not in tuner.peft_config:
        return
    trainability = getattr(tuner, "_trainability_before", {}).pop(adapter_name, [])
    others = [name for name in tuner.peft_config if name != adapter_name]
    if others:
        if adapter_name in tuner.active_adapters:
            remaining = [a for a in tuner.active_adapters if a != adapter_name] or [others[0]]
            tuner.set_adapter(remaining if len(remaining) > 1 else remaining[0])
        tuner.delete_adapter(adapter_name)
        getattr(model, "peft_config", {}).pop(adapter_name, None)
    else:
        # Put the original modules back: the head PEFT copied for modules_to_save, then every tuner layer.
        for name, module in list(tuner.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "original_module"):
                parent, _, child = _get_submodules(tuner.model, name)
                setattr(parent, child, module.original_module)
        tuner._unload_and_optionally_merge(merge=False)
    for param, requires_grad in trainability:
        param.requires_grad_(requires_grad)

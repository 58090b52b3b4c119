"""Hot-swap: replace an adapter's tensors in place with those of a saved adapter, on an unmerged or a merged model.

PEFT's ``peft.utils.hotswap`` serves LoRA only, and refuses a merged adapter. Here, with PEFT's signatures:

* ``hotswap_adapter(model, path, adapter_name)`` loads a saved adapter of the same method and targets and swaps it
  in under ``adapter_name``; ``hotswap_adapter_from_state_dict`` does the same from a state dict.
* Sizes may change where the method allows: a SparseMask delta of another support (positions and count), a mask
  with other pruned entries, Learners on other nodes; DPS, LayerSelect and BitFit increments have fixed shapes.
* On a merged model the swap is exact and local: the layer gives back the base entries the old adapter's merge
  overwrote (for SparseMask, a support-sized scatter), takes the new tensors, and merges them (saving and adding on
  the new support). No weight-sized work for sparse adapters and no drift, however many swaps.
* Everything is checked before anything changes: the method and the config fields that give a checkpoint its
  meaning, which modules the checkpoint covers, and every layer's entries, decoded by the layer's own
  ``read_checkpoint`` (``storage.py``'s compact formats) on a copy-on-write twin of the layer. A checkpoint that does
  not fit is a ``ValueError`` naming the difference, and the model is left exactly as it was.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import ModulesToSaveWrapper
from peft.utils.save_and_load import load_peft_weights
from torch import nn

from peft_sparse.modules import find_tuner

#: Config fields (beyond the method) that must agree for a swap, per method: they change what the saved entries mean.
SWAP_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "SPARSEMASK": ("mode", "block_size"),
    "DPS": ("scope",),
    "LEARNER": ("up_modules", "down_module", "layers_pattern"),
    "LAYERSELECT": ("layers_pattern",),
    "BITFIT": (),
}
_PEFT_PREFIX = "base_model.model."


#: The hub options ``hotswap_adapter`` passes on to PEFT's readers (as ``PeftModel.from_pretrained`` takes them).
HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token")


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str,
    adapter_name: str = "default",
    torch_device: Optional[str] = None,
    **kwargs: Any,
) -> None:
    """Replace the tensors of ``adapter_name`` with the adapter saved at ``model_name_or_path`` (a folder or a hub
    id, as ``PeftModel.from_pretrained`` takes), in place; the adapter keeps its name.

    Works on merged and unmerged models (a merged adapter stays merged, exactly). ``torch_device``: where the
    checkpoint is read to (default: the CPU; tensors then go to the device of the ones they replace). ``kwargs``:
    ``subfolder``, ``revision``, ``cache_dir``, ``token`` for the hub. ``ValueError`` when the saved adapter is of
    another method, config or targets, or does not fit; the model is then left as it was.
    """
    unknown = sorted(set(kwargs) - set(HUB_KWARGS))
    if unknown:  # a misspelt option would otherwise be ignored and the adapter read from elsewhere
        raise TypeError(f"hotswap_adapter() got unexpected keyword arguments {unknown}; it takes {list(HUB_KWARGS)}")
    hub = {k: kwargs[k] for k in HUB_KWARGS if kwargs.get(k) is not None}
    try:
        peft_type = PeftConfig._get_peft_type(model_name_or_path, **hub)
    except KeyError as error:
        raise ValueError(f"{model_name_or_path} holds no adapter_config.json with a peft_type ({error})") from None
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{model_name_or_path} holds a {peft_type} adapter, which no registered PEFT method reads")
    config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(model_name_or_path, **hub)
    _check_config(_sparse_tuner(model), adapter_name, config)  # before reading the weights
    try:
        state_dict = load_peft_weights(model_name_or_path, device=torch_device or "cpu", **hub)
    except Exception as error:  # safetensors and hub errors have no common base class
        raise ValueError(f"Cannot read the adapter weights at {model_name_or_path} ({error}); the model was left "
                         "as it was") from None
    hotswap_adapter_from_state_dict(model, state_dict, adapter_name, config)


def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: PeftConfig,
    parameter_prefix: Optional[str] = None,
) -> None:
    """Replace the tensors of ``adapter_name`` with those in ``state_dict``, an adapter checkpoint as
    ``save_pretrained`` writes it (``load_peft_weights`` reads it; keys with the adapter name inserted, as PEFT's own
    ``hotswap_adapter_from_state_dict`` takes them, are accepted too) of the same method as ``config``.

    ``parameter_prefix``: the tuner's prefix (e.g. ``"sparsemask_"``); None takes the model's. ``ValueError`` when
    the checkpoint does not fit; the model is then left as it was.
    """
    tuner = _sparse_tuner(model)
    if parameter_prefix is not None and parameter_prefix != tuner.prefix:
        raise ValueError(f"parameter_prefix={parameter_prefix!r}, but the model's adapters are {tuner.prefix!r} ones")
    _check_config(tuner, adapter_name, config)
    state_dict = _checkpoint_keys(state_dict, tuner.prefix, adapter_name)
    layers, heads = _stage(tuner, adapter_name, state_dict)
    for name, (layer, twin) in layers.items():  # nothing can fail from here on
        _commit(layer, twin, adapter_name)
    with torch.no_grad():
        for target, value in heads:
            target.copy_(value)
    new_config = copy.deepcopy(config)
    new_config.inference_mode = tuner.peft_config[adapter_name].inference_mode
    tuner.peft_config[adapter_name] = new_config


# --------------------------------------------------------------------------------------------------- checks


def _sparse_tuner(model: nn.Module):
    from peft_sparse.tuners.base import SparseTunerModel

    tuner = find_tuner(model)
    if not isinstance(tuner, SparseTunerModel):
        found = type(tuner).__name__ if tuner is not None else type(model).__name__
        raise ValueError(
            f"peft_sparse.hotswap_adapter swaps peft_sparse adapters; this model holds {found}. For LoRA use "
            "peft.utils.hotswap.hotswap_adapter."
        )
    return tuner


def _check_config(tuner, adapter_name: str, config: PeftConfig) -> None:
    """The saved adapter must be of the same method as ``adapter_name``, with the fields that give its entries their
    meaning equal."""
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"The model has no adapter {adapter_name!r} to swap (it has {sorted(tuner.peft_config)})")
    current = tuner.peft_config[adapter_name]
    ours, theirs = _type_name(current), _type_name(config)
    if ours != theirs:
        raise ValueError(
            f"Cannot hot-swap a {theirs.lower()} adapter into {adapter_name!r}, a {ours.lower()} adapter: a swap "
            "replaces an adapter's tensors with those of a saved adapter of the same method; the model was left as "
            "it was"
        )
    for key in ("task_type", *SWAP_CONFIG_KEYS.get(ours, ())):
        if getattr(current, key, None) != getattr(config, key, None):
            raise ValueError(
                f"Cannot hot-swap into {adapter_name!r}: its {key} is {getattr(current, key, None)!r}, the saved "
                f"adapter's {getattr(config, key, None)!r}; the model was left as it was"
            )


def _type_name(config: PeftConfig) -> str:
    peft_type = config.peft_type
    return str(getattr(peft_type, "value", peft_type)).upper()


def _checkpoint_keys(state_dict: dict[str, torch.Tensor], prefix: str, adapter_name: str) -> dict[str, torch.Tensor]:
    """Keys as ``save_pretrained`` writes them, without ``base_model.model.`` (PEFT's mapped form, with the adapter
    name after each adapter attribute or ``modules_to_save``, is turned back into it)."""
    named = re.compile(rf"(^|\.)((?:{re.escape(prefix)}[^.]*)|modules_to_save)\.{re.escape(adapter_name)}(?=\.|$)")
    result = {}
    for key, value in state_dict.items():
        key = key.removeprefix(_PEFT_PREFIX)
        key = named.sub(lambda m: m.group(1) + m.group(2), key)
        key = key.replace(".modules_to_save.", ".").replace(".modules_to_save", "")
        result[key] = value
    return result


# ---------------------------------------------------------------------------------------------------- staging


def _stage(tuner, adapter_name: str, state_dict: dict[str, torch.Tensor]):
    """Decode and check the whole checkpoint without changing the model: ``{layer name: (layer, twin holding the
    new tensors)}`` and ``[(head tensor, new value)]``."""
    from peft_sparse.tuners.base import SparseTunerLayer

    prefix = tuner.prefix
    layers: dict[str, SparseTunerLayer] = {}
    heads: dict[str, ModulesToSaveWrapper] = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, SparseTunerLayer) and module.has_adapter(adapter_name):
            layers[name] = module
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            heads[name] = module
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    head_entries: dict[str, torch.Tensor] = {}
    strangers = []
    for key, value in state_dict.items():
        owner, marker, _ = key.partition("." + prefix)
        if marker and owner in per_layer:
            per_layer[owner][key] = value
        elif not marker and any(key.startswith(head + ".") for head in heads):
            head_entries[key] = value
        else:
            strangers.append(key)
    problems = []
    if strangers:
        problems.append(f"entries for modules that adapter {adapter_name!r} does not train: {_few(strangers)}")
    untouched = [name for name, entries in per_layer.items() if not entries]
    if untouched:
        problems.append(f"no entries for modules that adapter {adapter_name!r} trains: {_few(untouched)}")
    if problems:
        raise _unfit(adapter_name, problems)
    staged = {}
    for name, layer in layers.items():
        try:
            staged[name] = (layer, _decoded_twin(layer, adapter_name, name, per_layer[name]))
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as error:
            shape = getattr(layer, "shape", None)
            where = f"{name} {tuple(shape)}" if shape is not None else name
            raise _unfit(adapter_name, [f"{where}: {error}"]) from None
    return staged, _staged_heads(heads, head_entries, adapter_name)


def _unfit(adapter_name: str, problems: list[str]) -> ValueError:
    return ValueError(
        f"The saved adapter does not fit adapter {adapter_name!r} of this model ({'; '.join(problems)}): a hot-swap "
        "needs an adapter of the same method on the same modules. The model was left as it was."
    )


def _few(names: list[str], count: int = 4) -> str:
    return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")


def _staged_heads(heads: dict[str, ModulesToSaveWrapper], entries: dict[str, torch.Tensor], adapter_name: str):
    staged, missing = [], []
    for name, wrapper in heads.items():
        for param_name, param in wrapper.modules_to_save[adapter_name].named_parameters():
            key = f"{name}.{param_name}"
            if key not in entries:
                missing.append(key)
                continue
            value = entries[key]
            if tuple(value.shape) != tuple(param.shape):
                raise _unfit(adapter_name, [f"{key} has shape {tuple(value.shape)}, the model's {tuple(param.shape)}"])
            staged.append((param.data, value.to(device=param.device, dtype=param.dtype)))
    if missing:
        raise _unfit(adapter_name, [f"no entries for the task head {_few(missing)}"])
    return staged


def _holders(layer) -> list[str]:
    """The layer's per-adapter containers, except the merge state (which belongs to the base, not the adapter)."""
    return [a for a in (*layer.adapter_layer_names, *layer.other_param_names) if a != "merge_saved"]


def _module_twin(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` whose registries are its own: assigning a parameter, buffer or submodule to the
    twin leaves ``module`` unchanged (copy-on-write; no tensor is copied)."""
    twin = object.__new__(type(module))
    twin.__dict__.update(module.__dict__)
    for attribute in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_keys"):
        value = module.__dict__.get(attribute)
        if value is not None:
            twin.__dict__[attribute] = copy.copy(value)
    return twin


def _layer_twin(layer, adapter_name: str):
    """A twin of ``layer`` in which ``adapter_name``'s entries can be replaced and changed without touching the
    layer (``read_checkpoint`` resizes supports, nodes and settings in place)."""
    twin = _module_twin(layer)
    for attribute in _holders(layer):
        holder = getattr(layer, attribute)
        if isinstance(holder, nn.Module):
            holder_twin = _module_twin(holder)
            entry = holder._modules.get(adapter_name)
            if entry is not None:
                holder_twin._modules[adapter_name] = _module_twin(entry)
            twin._modules[attribute] = holder_twin
        elif isinstance(holder, dict):
            holder_twin = dict(holder)
            if adapter_name in holder_twin:
                holder_twin[adapter_name] = copy.copy(holder_twin[adapter_name])
            twin.__dict__[attribute] = holder_twin
    return twin


def _adapter_tensors(layer, adapter_name: str) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """``{state-dict key relative to the layer: (owning module, local name, tensor)}`` of the adapter's saved
    tensors (parameters and persistent buffers)."""
    found = {}
    for attribute in _holders(layer):
        holder = getattr(layer, attribute)
        if not isinstance(holder, nn.Module):
            continue
        owners = [(holder, "")]
        if adapter_name in holder._modules:
            owners = [(holder._modules[adapter_name], f"{adapter_name}.")]
        for owner, stem in owners:
            for local, tensor in owner._parameters.items():
                if tensor is not None and (stem or local == adapter_name):
                    found[f"{attribute}.{stem}{local}"] = (owner, local, tensor)
            for local, tensor in owner._buffers.items():
                persistent = local not in owner._non_persistent_buffers_set
                if tensor is not None and persistent and (stem or local == adapter_name):
                    found[f"{attribute}.{stem}{local}"] = (owner, local, tensor)
    return found


def _decoded_twin(layer, adapter_name: str, name: str, entries: dict[str, torch.Tensor]):
    """The layer's twin holding the checkpoint's tensors for ``adapter_name``: PEFT's key mapping (its adapter
    tensors get the adapter name, compact entries keep theirs), the layer's ``read_checkpoint``, then the values,
    every key and shape checked."""
    from peft.tuners.tuners_utils import _remove_adapter_name_from_state_dict_key

    twin = _layer_twin(layer, adapter_name)
    mapped = {}
    for key in _adapter_tensors(twin, adapter_name):
        mapped[_remove_adapter_name_from_state_dict_key(f"{name}.{key}", adapter_name)] = f"{name}.{key}"
    state_dict = {mapped.get(k, k): v for k, v in entries.items()}
    with torch.no_grad():
        twin.read_checkpoint(adapter_name, name, state_dict)
    expected = _adapter_tensors(twin, adapter_name)
    given = {k.removeprefix(name + "."): v for k, v in state_dict.items()}
    unknown = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    if unknown or missing:
        raise ValueError(f"unexpected entries {unknown}" if unknown else f"missing entries {missing}")
    for key, (owner, local, tensor) in expected.items():
        value = given[key]
        if tuple(value.shape) != tuple(tensor.shape):
            raise ValueError(f"{key} has shape {tuple(value.shape)}, the adapter's {tuple(tensor.shape)}")
        value = value.to(device=tensor.device, dtype=tensor.dtype)
        if isinstance(tensor, nn.Parameter):
            owner._parameters[local] = nn.Parameter(value, requires_grad=tensor.requires_grad)
        else:
            owner._buffers[local] = value
    return twin


# ---------------------------------------------------------------------------------------------------- commit


def _commit(layer, twin, adapter_name: str) -> None:
    """Put the twin's tensors for ``adapter_name`` into the layer; a merged adapter stays merged, exactly
    (``SparseTunerLayer.swap_merged``)."""
    if adapter_name in layer.merged_adapters:
        layer.swap_merged(adapter_name, lambda: _install(layer, twin, adapter_name))
    else:
        _install(layer, twin, adapter_name)


def _install(layer, twin, adapter_name: str) -> None:
    """The twin's entries for ``adapter_name`` into the layer's containers; fixed-shape tensors are copied in place,
    so that parameters keep their identity (optimizers, compiled graphs)."""
    with torch.no_grad():
        for attribute in _holders(layer):
            holder, new = getattr(layer, attribute), getattr(twin, attribute)
            if adapter_name not in new:
                continue
            old_value, new_value = holder[adapter_name] if adapter_name in holder else None, new[adapter_name]
            if (
                isinstance(old_value, torch.Tensor) and isinstance(new_value, torch.Tensor)
                and old_value.shape == new_value.shape and old_value.dtype == new_value.dtype
            ):
                old_value.data.copy_(new_value.data)
            else:
                holder[adapter_name] = new_value

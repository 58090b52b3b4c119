"""Mixed-adapter batches: ``model(**batch, adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])``.

PEFT's ``PeftModel`` hands ``adapter_names`` to the tuner's ``_enable_peft_forward_hooks`` context; this is that
context for every peft_sparse tuner, with PEFT LoRA's semantics and errors (``LoraModel._enable_peft_forward_hooks``):
``"__base__"`` rows get the base model; unknown adapter names are a ``ValueError``; the batch is refused in training
mode and while adapters are merged; under beam search each name is repeated ``num_beams`` times (but not for the
encoder of an encoder-decoder model, which sees the original rows). Each tuner layer then runs
``SparseTunerLayer.mixed_batch_forward``. PEFT's ``modules_to_save`` copies (the task head) follow the same names;
a copy of a module type PEFT's wrapper cannot split by rows (a norm, under DPS ``scope="model"``) is run here once
per group of rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Iterator

import torch
from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

#: What PEFT's ModulesToSaveWrapper splits by rows itself (``AuxiliaryTrainingWrapper._mixed_batch_forward``).
_PEFT_MIXED_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@contextmanager
def adapter_names_hooks(tuner, *args: Any, **kwargs: Any) -> Iterator[None]:
    """Pass ``kwargs["adapter_names"]`` to every tuner layer and ``modules_to_save`` copy for one forward or
    ``generate`` call (the hooks are removed afterwards, also when the call fails)."""
    from peft_sparse.tuners.base import SparseTunerLayer

    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    _check(tuner, adapter_names)
    original = list(adapter_names)
    num_beams = kwargs.get("num_beams")
    if isinstance(num_beams, int) and num_beams > 1:
        adapter_names = [name for name in original for _ in range(num_beams)]
    else:
        adapter_names = original
    encoder = _get_encoder(tuner.model) if adapter_names is not original else None
    in_encoder = {id(m) for m in encoder.modules()} if encoder is not None else set()
    handles = []
    try:
        for module in tuner.model.modules():
            names = original if id(module) in in_encoder else adapter_names
            if isinstance(module, SparseTunerLayer):
                handles.append(module.register_forward_pre_hook(partial(_inject, adapter_names=names), with_kwargs=True))
            elif isinstance(module, AuxiliaryTrainingWrapper):
                handles.append(_hook_wrapper(module, names))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check(tuner, adapter_names: Any) -> None:
    """The errors of PEFT LoRA's mixed batch, raised before any layer runs."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    if not all(isinstance(name, str) for name in adapter_names):
        raise TypeError(f"`adapter_names` must be a list of str, got {list(adapter_names)!r}")
    if tuner.training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    unknown = {name for name in adapter_names if name != "__base__"} - set(tuner.peft_config)
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
    merged = sorted({a for _, layer in tuner.tuner_layers() for a in layer.merged_adapters})
    if merged:
        raise ValueError(
            f"Cannot pass `adapter_names` when there are merged adapters ({merged}), please call `unmerge_adapter` "
            "first."
        )


def _hook_wrapper(wrapper: AuxiliaryTrainingWrapper, adapter_names: list[str]):
    if _peft_splits_rows(wrapper, adapter_names):
        return wrapper.register_forward_pre_hook(partial(_inject, adapter_names=adapter_names), with_kwargs=True)
    return wrapper.register_forward_hook(partial(_copies_by_rows, adapter_names=adapter_names), with_kwargs=True)


def _inject(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


def _peft_splits_rows(wrapper: AuxiliaryTrainingWrapper, adapter_names: list[str]) -> bool:
    """Whether PEFT's own wrapper runs this mixed batch right: a module type it splits by rows, and a copy for every
    adapter named (PEFT looks the copy up and fails on an adapter without one)."""
    if not isinstance(wrapper, ModulesToSaveWrapper):
        return True  # trainable tokens: PEFT's own mixed batch
    named = {name for name in adapter_names if name != "__base__"}
    return isinstance(wrapper.original_module, _PEFT_MIXED_MODULES) and named <= set(wrapper.modules_to_save)


def row_groups(adapter_names: list[str]) -> list[tuple[str, Any]]:
    """``(adapter, rows)`` for each adapter named in a mixed batch, in order of first appearance; ``rows`` is a
    slice where the adapter's rows are contiguous (a view, no gather), otherwise an index tensor."""
    positions: dict[str, list[int]] = {}
    for row, name in enumerate(adapter_names):
        positions.setdefault(name, []).append(row)
    groups = []
    for name, rows in positions.items():
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        groups.append((name, slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows)))
    return groups


def take_rows(tensor: torch.Tensor, rows: Any) -> torch.Tensor:
    """``tensor``'s rows of a group: a view for a slice, ``index_select`` for an index tensor (advanced indexing is a
    slow path on the CPU)."""
    return tensor[rows] if isinstance(rows, slice) else tensor.index_select(0, rows)


def put_rows(result: torch.Tensor, rows: Any, values: torch.Tensor) -> None:
    """Write a group's rows into ``result`` in place (``index_copy_`` for an index tensor)."""
    if isinstance(rows, slice):
        result[rows] = values
    else:
        result.index_copy_(0, rows, values)


def _copies_by_rows(wrapper: ModulesToSaveWrapper, args, kwargs, output, adapter_names):
    """Each group of rows through its adapter's copy of the module (the original module for ``"__base__"`` and for
    adapters without a copy, as PEFT's wrapper runs an adapter it holds no copy of)."""
    if wrapper.disable_adapters or not args or not isinstance(output, torch.Tensor):
        return output
    x, rest = args[0], args[1:]
    result = output.clone()
    for adapter, rows in row_groups(adapter_names):
        module = wrapper.modules_to_save[adapter] if adapter in wrapper.modules_to_save else wrapper.original_module
        rows = rows if isinstance(rows, slice) else rows.to(x.device)
        put_rows(result, rows, module(take_rows(x, rows), *rest, **kwargs))
    return result


def _get_encoder(model: nn.Module):
    """The encoder of an encoder-decoder model, else None (transformers 5 returns the model itself then)."""
    get_encoder = getattr(model, "get_encoder", None)
    if not callable(get_encoder):
        return None
    encoder = get_encoder()
    return None if encoder is model else encoder

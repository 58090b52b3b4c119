"""What peft_sparse needs to know about base layers and layer stacks, in one place.

Every tuner asks the same questions of a module — is it a Linear-like layer (``nn.Linear``, GPT-2 ``Conv1D``,
bitsandbytes 8/4-bit), is it quantized, how many outputs does it have, where is the stack of transformer
blocks — and answers them here rather than in its own copy.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D)
NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is quantized, as PEFT's quantization backends see it (bitsandbytes 8/4-bit, HQQ,
    torchao...): such a weight cannot be read or changed as a float tensor."""
    return resolve_quantization_backend(module) is not None


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes layers included, they subclass it) or GPT-2's transposed ``Conv1D``."""
    return isinstance(module, LINEAR_TYPES)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, or an RMSNorm-style module (a 1-D ``weight`` and a class name ending in ``Norm``)."""
    if isinstance(module, NORM_TYPES):
        return True
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and isinstance(weight, torch.Tensor) and weight.dim() == 1


def out_features(module: nn.Module) -> int:
    """Size of the last output dimension of a Linear-like or norm layer."""
    if isinstance(module, Conv1D):
        return module.nf
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_norm(module):
        return module.weight.shape[0]
    raise TypeError(f"cannot tell the output size of {type(module).__name__}")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear-like layer, in ``nn.Linear``'s orientation."""
    if isinstance(module, Conv1D):
        return module.nf, module.nx
    return module.out_features, module.in_features


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a full-precision Linear-like layer in ``(out, in)`` layout (``Conv1D`` stores ``(in, out)``)."""
    if is_quantized(module):
        raise TypeError(f"{type(module).__name__} is quantized; its weight is not a dense tensor")
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def find_layer_stack(model: nn.Module, layers_pattern: str | None = None) -> tuple[str, nn.ModuleList]:
    """Find the stack of transformer blocks: ``(qualified name, ModuleList)``.

    With ``layers_pattern`` (e.g. ``"encoder.layer"``, ``"h"``, ``"layers"``) the ModuleList whose qualified name
    ends with it is taken. Otherwise the ModuleList of identical blocks that holds the most parameters is taken,
    which is ``encoder.layer`` for BERT, ``transformer.h`` for GPT-2 and ``model.layers`` for LLaMA.
    """
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if layers_pattern is not None:
            if name == layers_pattern or name.endswith("." + layers_pattern):
                candidates.append((name, module, 0))
            continue
        if len({type(block) for block in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size:
            candidates.append((name, module, size))
    if not candidates:
        where = f" matching layers_pattern={layers_pattern!r}" if layers_pattern else ""
        raise ValueError(f"No stack of transformer blocks (an nn.ModuleList){where} found in {type(model).__name__}")
    if layers_pattern is not None and len(candidates) > 1:
        names = [c[0] for c in candidates]
        raise ValueError(f"layers_pattern={layers_pattern!r} is ambiguous; it matches {names}")
    name, stack, _ = max(candidates, key=lambda c: c[2])
    return name, stack


def block_index(key: str, stack_name: str) -> int | None:
    """Index of the block that module ``key`` lives in, or None when it is outside the layer stack."""
    match = re.match(rf"^(?:.*\.)?{re.escape(stack_name)}\.(\d+)(?:\.|$)", key)
    return int(match.group(1)) if match else None


def head_module_names(model: nn.Module, modules_to_save: Iterable[str] | None) -> set[str]:
    """Names of the task head: the output embeddings and every module that ``modules_to_save`` matches."""
    names: set[str] = set()
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    wanted = list(modules_to_save or [])
    for name, module in model.named_modules():
        if head is not None and module is head:
            names.add(name)
        if any(name == w or name.endswith("." + w) for w in wanted):
            names.add(name)
    return names


def is_under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_tuner(model: nn.Module) -> Optional[nn.Module]:
    """The PEFT tuner model (``BaseTuner``) inside ``model``: a ``PeftModel``, the tuner itself, or either wrapped
    by DDP, FSDP, DeepSpeed or ``torch.compile`` (unwrapped with Accelerate's ``extract_model_from_parallel``)."""
    from accelerate.utils import extract_model_from_parallel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model
    if isinstance(getattr(model, "base_model", None), BaseTuner):  # a PeftModel: no search through the wrappers
        return model.base_model
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    if isinstance(model, BaseTuner):
        return model
    tuner = getattr(model, "base_model", None)
    return tuner if isinstance(tuner, BaseTuner) else None


def first_of(problems: list[str], limit: int) -> str:
    """The first ``limit`` of ``problems`` joined with "; ", and how many more there are (for error messages)."""
    more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more

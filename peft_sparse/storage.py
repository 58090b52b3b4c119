"""The compact checkpoint format every peft_sparse tuner uses for sparse entries, in one place.

A sparse tensor over an ``(out, in)`` weight is saved as three entries under one key:

* ``<key>.support``: int16 gap tokens of the sorted flat indices (``sparse.encode_indices``, ~2 bytes an entry);
* ``<key>.values``: the values at those indices, in the training dtype or a chosen ``save_dtype``;
* ``<key>.shape``: the weight's ``(out, in)`` as int32, so that a checkpoint cannot load onto another shape.

A binary mask is saved as ``<key>.mask`` (bits, ``sparse.pack_bits``) or ``<key>.pruned`` (gap tokens),
whichever is smaller. ``read_entries`` pops one key's entries from a checkpoint state dict and checks the shape.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from peft_sparse import sparse

KINDS = ("support", "values", "shape", "mask", "pruned")  # and "dense" (delta_entries)
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cast_for_saving(key: str, values: torch.Tensor, save_dtype: Optional[str]) -> torch.Tensor:
    """``values`` in ``save_dtype``; a ``ValueError`` when a finite value does not fit it (fp16 tops out at
    65504), instead of saving an infinity."""
    values = values.detach()
    dtype = SAVE_DTYPES.get(save_dtype) if save_dtype else None
    if dtype is None or dtype == values.dtype:
        return values
    cast = values.to(dtype)
    overflow = torch.isinf(cast) & torch.isfinite(values)
    if bool(overflow.any()):
        largest = values[overflow].abs().max().item()
        raise ValueError(
            f"{key}: a value of magnitude {largest:.3g} does not fit save_dtype={save_dtype!r} (largest "
            f"{torch.finfo(dtype).max:.5g}); save in 'bfloat16' or 'float32'"
        )
    return cast


def sparse_entries(
    key: str, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], save_dtype: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """The checkpoint entries of a sparse tensor (``values`` at sorted flat ``indices``)."""
    return {
        f"{key}.support": sparse.encode_indices(indices),
        f"{key}.values": cast_for_saving(key, values, save_dtype),
        f"{key}.shape": torch.tensor(shape, dtype=torch.int32),
    }


def mask_entries(key: str, pruned: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The checkpoint entries of a binary mask given by its ``pruned`` flat indices: bits or indices."""
    total = shape[0] * shape[1]
    tokens = sparse.encode_indices(pruned)
    entries = {f"{key}.shape": torch.tensor(shape, dtype=torch.int32)}
    if 2 * tokens.numel() <= math.ceil(total / 8):
        entries[f"{key}.pruned"] = tokens
    else:
        mask = torch.zeros(total, dtype=torch.bool)
        mask[pruned.cpu()] = True
        entries[f"{key}.mask"] = sparse.pack_bits(mask)
    return entries


def read_entries(
    state_dict: dict[str, torch.Tensor],
    key: str,
    shape: tuple[int, int],
    keep_values: bool = True,
    known_support: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> dict[str, torch.Tensor]:
    """Pop the entries saved under ``key`` (with or without PEFT's ``base_model.model.`` prefix).

    Returns ``{"indices": ..., "support": gap tokens, ["values": ...]}`` for a sparse tensor or ``{"pruned": ...}``
    for a mask, and raises ``ValueError`` when nothing is saved under ``key`` or it was saved from another shape.
    With ``keep_values`` the values stay in ``state_dict`` for PEFT's own loading. ``known_support``: ``(tokens,
    what they were installed as)``; a saved support equal to ``tokens`` is not decoded again, ``"indices"`` is then
    the second tensor and ``"unchanged"`` is present (a hot-swap between adapters that share a support).
    """
    found: dict[str, torch.Tensor] = {}
    for kind in KINDS:
        for candidate in (f"{key}.{kind}", f"base_model.model.{key}.{kind}"):
            if candidate in state_dict:
                found[kind] = state_dict[candidate] if (kind == "values" and keep_values) else state_dict.pop(candidate)
    if "shape" not in found:
        raise ValueError(f"nothing is saved for {key}")
    for kind, tensor in found.items():
        if kind in _ENTRY_DTYPES and tensor.dtype != _ENTRY_DTYPES[kind]:
            raise ValueError(f"{key}.{kind} is {tensor.dtype}; peft_sparse saves it as {_ENTRY_DTYPES[kind]}")
    saved_shape = tuple(found["shape"].tolist())
    if saved_shape != tuple(shape):
        raise ValueError(f"{key} was saved from a {saved_shape} weight, the model's is {tuple(shape)}")
    total = shape[0] * shape[1]
    if "mask" in found:
        return {"pruned": torch.nonzero(sparse.unpack_bits(found["mask"], total)).flatten()}
    if "pruned" in found:
        return {"pruned": _checked_indices(key, "pruned", sparse.decode_indices(found["pruned"]), shape)}
    tokens = found["support"]
    known = known_support[0] if known_support is not None else None
    if known is not None and known.shape == tokens.shape and known.device == tokens.device and torch.equal(known, tokens):
        result = {"indices": known_support[1], "support": tokens, "unchanged": tokens}
    else:
        result = {"indices": _checked_indices(key, "support", sparse.decode_indices(tokens), shape), "support": tokens}
    if "values" in found:
        result["values"] = found["values"]
    return result


#: The dtype of each compact entry (values keep their training or save dtype).
_ENTRY_DTYPES = {"support": torch.int16, "pruned": torch.int16, "mask": torch.uint8, "shape": torch.int32}


def _checked_indices(key: str, kind: str, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Decoded flat indices, refused (``ValueError``) when one falls outside the ``shape`` weight."""
    total = shape[0] * shape[1]
    if indices.numel() and int(indices[-1]) >= total:  # decoded gap tokens are sorted and non-negative
        raise ValueError(f"{key}.{kind} holds index {int(indices[-1])}, outside the {tuple(shape)} weight ({total} entries)")
    return indices


def leftover_keys(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Compact-format entries that no module of the model claimed (a checkpoint of another model)."""
    return [k for k in state_dict if k.rsplit(".", 1)[-1] in ("support", "shape", "mask", "pruned", "dense")]


def delta_entries(
    key: str, delta: torch.Tensor, save_dtype: Optional[str] = None
) -> dict[str, torch.Tensor]:
    """A dense ``(out, in)`` increment saved by its non-zero entries, or whole (``<key>.dense``) when that
    is smaller: a delta that changed most entries costs no more than the dense tensor."""
    flat = delta.detach().reshape(-1)
    indices = torch.nonzero(flat).flatten()
    dtype = SAVE_DTYPES.get(save_dtype) if save_dtype else flat.dtype
    value_bytes = torch.empty(0, dtype=dtype).element_size()
    if indices.numel() * (2 + value_bytes) < flat.numel() * value_bytes:
        return sparse_entries(key, indices, flat[indices], tuple(delta.shape), save_dtype)
    return {
        f"{key}.dense": cast_for_saving(key, delta, save_dtype),
        f"{key}.shape": torch.tensor(delta.shape, dtype=torch.int32),
    }


def read_delta(state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, int]) -> torch.Tensor:
    """Pop what ``delta_entries`` saved under ``key`` and return the dense increment (values' dtype)."""
    for prefix in ("", "base_model.model."):
        if f"{prefix}{key}.dense" in state_dict:
            dense = state_dict.pop(f"{prefix}{key}.dense")
            saved_shape = tuple(state_dict.pop(f"{prefix}{key}.shape").tolist())
            if saved_shape != tuple(shape) or tuple(dense.shape) != tuple(shape):
                raise ValueError(f"{key} was saved from a {saved_shape} weight, the model's is {tuple(shape)}")
            return dense
    saved = read_entries(state_dict, key, shape, keep_values=False)
    if "values" not in saved:
        raise ValueError(f"no values are saved for {key}")
    return sparse.scatter_to_dense(saved["indices"], saved["values"], tuple(shape))

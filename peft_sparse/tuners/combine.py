"""``add_weighted_adapter``: a new adapter from a weighted combination of existing ones, PEFT LoRA's combination types.

Every peft_sparse increment lives in the base's own parameter space (a sparse or dense ΔW, a bias, a Learner's rows
and columns), so a combination is computed on the increments themselves, with PEFT's own functions
(``peft.utils.merge_utils``) applied to each base parameter's increments:

* ``"linear"``: ``Σ wᵢ Δᵢ``, exactly (LoRA's ``linear`` mixes the A and B factors and is approximate; here nothing
  is factorised). ``"cat"``: LoRA's exact concatenation, which for increments that add directly is the same sum.
* ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: PEFT's ``ties`` / ``dare_linear`` /
  ``dare_ties`` / ``magnitude_prune`` on the dense increments. ``density`` is PEFT's: the fraction of the dense
  increment's entries each keeps, so magnitude pruning (``ties``, ``magnitude_prune``) of a SparseMask delta at 1 %
  changes nothing unless ``density`` is below 0.01; ``dare`` keeps each entry with probability ``density`` at any
  sparsity.

The new adapter keeps each method's structure, on the union of its sources': a SparseMask delta's support is the
union of the supports (LT-SFT's composable sparse fine-tunings), a Learner's nodes the union of the nodes, DPS,
LayerSelect and BitFit increments keep their dense shapes; its targets are the union of the sources' modules and
each source counts as zero where it has no increment. A task head trained whole (``modules_to_save``) is combined
the same way, as increments over the original head. The adapter saves, loads, merges and swaps like any other.

Refused with a reason: SparseMask ``mode="mask"`` (a mask's increment is ``−W`` on its pruned entries; a weighted
sum of masks is no mask, e.g. an entry two masks prune would become ``−W``), adapters whose configs give their
entries different meanings, SVD types (they rebuild a low-rank factorisation, which no peft_sparse adapter has).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from peft.utils import ModulesToSaveWrapper
from peft.utils import merge_utils

from peft_sparse.tuners import loading

COMBINATION_TYPES = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Config fields (per method) that must agree: they change what the increments are.
COMBINE_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "SPARSEMASK": ("mode",),
    "LEARNER": ("up_modules", "down_module", "layers_pattern"),
    "LAYERSELECT": ("layers_pattern",),
    "DPS": (),
    "BITFIT": (),
}


def add_weighted_adapter(
    tuner,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "linear",
    density: Optional[float] = None,
    majority_sign_method: str = "total",
) -> None:
    """See ``SparseTunerModel.add_weighted_adapter``."""
    combination_type = _check(tuner, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    holders = {name: [a for a in adapters if layer.has_adapter(a)] for name, layer in tuner.tuner_layers()}
    config = _new_config(tuner, adapters, [name for name, found in holders.items() if found])
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        tuner._cast_adapter_dtype(adapter_name, getattr(tuner, "_autocast_adapter_dtype", {}).get(adapters[0], True))
        combine = _combiner(adapters, weights, combination_type, density, majority_sign_method)
        with torch.no_grad():
            for name, layer in tuner.tuner_layers():
                sources = holders.get(name) or []
                if layer.has_adapter(adapter_name) and sources:
                    layer.set_increments(adapter_name, _combined_increments(layer, sources, combine), sources)
            for wrapper in tuner.model.modules():
                if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
                    _combine_head(wrapper, adapter_name, adapters, combine)
    except Exception:
        loading.remove_adapter(tuner, adapter_name)
        tuner.peft_config.pop(adapter_name, None)
        raise
    tuner.set_requires_grad(adapter_name, requires_grad=False)  # as LoRA's: set_adapter makes it trainable


def _check(tuner, adapters, weights, adapter_name, combination_type, density, majority_sign_method) -> str:
    """Every argument checked before anything changes; returns the combination type to run (PEFT: one adapter is a
    linear combination)."""
    if not isinstance(adapter_name, str) or not adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a new adapter's name, got {adapter_name!r}")
    if adapter_name in tuner.peft_config:
        raise ValueError(f"An adapter named {adapter_name!r} exists already; choose another adapter_name")
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    missing = [a for a in adapters if a not in tuner.peft_config]
    if missing:
        raise ValueError(f"Adapter(s) {missing} do not exist (the model has {sorted(tuner.peft_config)})")
    if isinstance(weights, (int, float)) or len(weights) != len(adapters):
        raise ValueError(f"Give one weight per adapter: {len(adapters)} adapters, weights={weights!r}")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights!r}")
    if combination_type.endswith("svd"):
        raise ValueError(
            f"combination_type={combination_type!r} rebuilds a low-rank (LoRA) factorisation of the combined "
            f"increment; peft_sparse adapters are not low-rank. Use one of {COMBINATION_TYPES}."
        )
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type {combination_type!r}; choose one of {COMBINATION_TYPES}")
    if combination_type in NEEDS_DENSITY:
        if density is None or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"combination_type={combination_type!r} needs density in (0, 1], got {density!r}")
    elif density is not None:
        raise ValueError(f"density applies to {NEEDS_DENSITY}, not to combination_type={combination_type!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    configs = [tuner.peft_config[a] for a in adapters]
    method = str(getattr(configs[0].peft_type, "value", configs[0].peft_type)).upper()
    if method == "SPARSEMASK" and any(c.mode == "mask" for c in configs):
        masks = [a for a, c in zip(adapters, configs) if c.mode == "mask"]
        raise ValueError(
            f"Adapter(s) {masks} are SparseMask mode='mask' adapters, which cannot be combined: a mask's increment is "
            "-W on the entries it prunes, so a weighted sum of masks is no mask (an entry two masks prune would become "
            "-W, its sign flipped) and a mask adapter holds no values to carry another sum. Combine mode='delta' "
            "adapters, or build the union or intersection of the pruned entries yourself."
        )
    for key in ("task_type", *COMBINE_CONFIG_KEYS.get(method, ())):
        values = {a: getattr(c, key, None) for a, c in zip(adapters, configs)}
        if len({repr(v) for v in values.values()}) > 1:
            raise ValueError(f"Cannot combine adapters whose {key} differ ({values}): their increments mean "
                             "different things")
    pending = [a for a in adapters if tuner.needs_calibration(a)]
    if pending:
        raise ValueError(f"Adapter(s) {pending} wait for peft_sparse.calibrate: they have no increment to combine yet")
    return "linear" if len(adapters) == 1 else combination_type


def _new_config(tuner, adapters: list[str], modules: list[str]):
    """The first adapter's config on the union of the sources' modules (and blocks, and task heads)."""
    configs = [tuner.peft_config[a] for a in adapters]
    config = copy.deepcopy(configs[0])
    config.target_modules = sorted(modules)
    heads = sorted({m for c in configs for m in (c.modules_to_save or [])})
    config.modules_to_save = heads or None
    if hasattr(config, "layers") and hasattr(config, "num_layers"):  # LayerSelect: the union of the blocks
        config.layers = sorted({i for c in configs for i in (c.layers or [])})
        config.num_layers = config.layer_scores = None
    if getattr(config, "block_size", 1) != 1 and len({c.block_size for c in configs}) > 1:
        config.block_size = 1  # a union of blocks of different sizes: an unstructured support
    return config


def _combiner(adapters, weights, combination_type, density, majority_sign_method):
    """``combine(tensors, adapters present)`` for one base parameter: PEFT's merge_utils function of this type."""
    weight_of = dict(zip(adapters, weights))

    def combine(tensors: list[torch.Tensor], present: list[str]) -> torch.Tensor:
        w = torch.tensor([weight_of[a] for a in present], dtype=tensors[0].dtype, device=tensors[0].device)
        if combination_type in ("linear", "cat"):
            return merge_utils.task_arithmetic(tensors, w)
        if combination_type == "ties":
            return merge_utils.ties(tensors, w, density, majority_sign_method)
        if combination_type == "dare_linear":
            return merge_utils.dare_linear(tensors, w, density)
        if combination_type == "dare_ties":
            return merge_utils.dare_ties(tensors, w, density, majority_sign_method)
        return merge_utils.magnitude_prune(tensors, w, density)

    return combine


def _combined_increments(layer, sources: list[str], combine) -> dict[str, torch.Tensor]:
    """Per base parameter, the combination of the sources' dense increments (``delta_parameters``; a source without
    an increment for a parameter counts as zero)."""
    deltas = {a: layer.delta_parameters(a) for a in sources}
    names = sorted({name for d in deltas.values() for name in d})
    combined = {}
    for name in names:
        reference = next(d[name] for d in deltas.values() if name in d)
        tensors = [deltas[a][name].float() if name in deltas[a] else torch.zeros_like(reference, dtype=torch.float32)
                   for a in sources]
        combined[name] = combine(tensors, sources)
    return combined


def _combine_head(wrapper: ModulesToSaveWrapper, adapter_name: str, adapters: list[str], combine) -> None:
    """A task head trained whole: the combination of the copies' increments over the original head."""
    present = [a for a in adapters if a in wrapper.modules_to_save]
    original = dict(wrapper.original_module.named_parameters())
    copies = {a: dict(wrapper.modules_to_save[a].named_parameters()) for a in present}
    for name, param in wrapper.modules_to_save[adapter_name].named_parameters():
        if not present:
            param.copy_(original[name])
            continue
        base = original[name].float()
        increment = combine([copies[a][name].float() - base for a in present], present)
        param.copy_((base + increment).to(param.dtype))

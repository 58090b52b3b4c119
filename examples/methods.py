"""One method factory for the examples and every benchmark: a method name and its options -> a PEFT config.

``method_config("sparsemask", model, "SEQ_CLS", density=0.01)`` returns the config that
``peft.get_peft_model`` takes (``None`` for full fine-tuning); ``apply_method`` wraps the model with it. The
baselines (PEFT's LoRA and SHiRA) and the peft_sparse methods share the same target rule, so that "equal
trained entries" comparisons compare the same weight matrices:

* BERT-style encoders: ``query``, ``key``, ``value`` and every ``dense`` (attention output, intermediate,
  output, pooler);
* anything else (LLaMA, GPT-2...): PEFT's ``"all-linear"``.

SparseMask and DPS default to these targets here too (their own default, the linear layers inside the blocks,
leaves out the pooler). ``sparsemask`` with ``match_lora_r=r`` sets the uniform ``density`` at which it trains
as many entries as LoRA of rank ``r`` on the same targets.
"""

from __future__ import annotations

from typing import Any, Optional

from peft import LoraConfig, PeftConfig, ShiraConfig, get_peft_model
from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn

import peft_sparse
from peft_sparse import BitFitConfig, DPSConfig, LayerSelectConfig, LearnerConfig, SparseMaskConfig
from peft_sparse.modules import is_linear, linear_shape

#: Model types whose encoder Linears are named query/key/value/dense (BERT-style attention).
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "xlm_roberta", "electra", "camembert", "ernie", "mpnet"}
BERT_TARGETS = ["query", "key", "value", "dense"]
MPNET_TARGETS = ["q", "k", "v", "o", "dense"]
#: The six Linears of a BERT block (``BERT_TARGETS`` without the pooler): the modules SparseMask and DPS wrap by
#: default on BERT, and those of the LoRA / SHiRA / SparseMask runs in benchmarks/RESULTS.md.
BERT_BLOCK_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]

#: Learning rate per method when none is given. Sparse increments (SparseMask, SHiRA) train few entries from
#: zero and need a larger step than LoRA (on MiniLM, 1% density at 5e-4 barely moved the loss in one epoch). Mask
#: mode's scores move about lr per AdamW step: at 5e-3 the initial magnitude mask hardly changes, 5e-2 learns
#: (benchmarks/mask_study.md).
DEFAULT_LR: dict[str, float] = {
    "full": 5e-5, "lora": 5e-4, "shira": 5e-3, "bitfit": 1e-3, "layerselect": 1e-4,
    "sparsemask": 5e-3, "mask": 5e-2, "dps": 5e-5, "learner": 1e-4,
}

METHODS = tuple(DEFAULT_LR)


def lora_targets(model: nn.Module) -> Any:
    """The LoRA-style targets of ``model`` (see the module docstring)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type == "mpnet":
        return list(MPNET_TARGETS)
    if model_type in BERT_LIKE:
        return list(BERT_TARGETS)
    return "all-linear"


def targeted_shapes(model: nn.Module, targets: Any, task_type: str) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of each linear layer that ``targets`` select, matched as PEFT matches them."""
    config = _maybe_include_all_linear_layers(LoraConfig(task_type=task_type, r=1, target_modules=targets), model)
    return {
        name: linear_shape(module)
        for name, module in model.named_modules()
        if is_linear(module) and check_target_module_exists(config, name)
    }


def lora_entries(model: nn.Module, r: int, targets: Any, task_type: str) -> int:
    """Entries LoRA of rank ``r`` trains on ``targets``: r·(in + out) per matrix."""
    return sum(r * (o + i) for o, i in targeted_shapes(model, targets, task_type).values())


def density_matching_lora(model: nn.Module, r: int, targets: Any, task_type: str) -> float:
    """The uniform density at which a sparse increment on ``targets`` trains as many entries as LoRA rank ``r``."""
    shapes = targeted_shapes(model, targets, task_type).values()
    return lora_entries(model, r, targets, task_type) / sum(o * i for o, i in shapes)


def learner_ratio_matching_lora(model: nn.Module, r: int, fraction: float, task_type: str) -> float:
    """The ``learner_ratio`` at which Learners train ``fraction`` × the entries of LoRA rank ``r`` (on LoRA's
    targets): each Learner node trains its row of every up/gate projection (with its bias) and its column of the
    down projection, in every FFN."""
    from peft_sparse.modules import find_layer_stack
    from peft_sparse.tuners.learner.config import FFN_LAYOUTS

    _, stack = find_layer_stack(model)
    block = stack[0]
    names = {name for name, _ in block.named_modules()}
    ups, down = next((u, d) for u, d in FFN_LAYOUTS if set(u) | {d} <= names)
    per_node = sum(linear_shape(block.get_submodule(u))[1] + (block.get_submodule(u).bias is not None) for u in ups)
    per_node += linear_shape(block.get_submodule(down))[0]
    nodes = linear_shape(block.get_submodule(down))[1] * len(stack)
    return fraction * lora_entries(model, r, lora_targets(model), task_type) / (per_node * nodes)


def method_config(method: str, model: nn.Module, task_type: str, **options: Any) -> Optional[PeftConfig]:
    """The PEFT config of ``method`` for ``model`` (``None`` for full fine-tuning); ``options`` override defaults.

    Options per method: ``lora`` / ``shira``: ``r``, ``lora_dropout``, ``target_modules``; ``sparsemask``:
    ``density`` or ``match_lora_r``, ``selection``, ``block_size``, ``seed``, ``target_modules``; ``mask``:
    ``sparsity``, ``mask_candidates``; ``dps``: ``variant``, ``keep_ratio``, ``update_ratio``, ``masking``;
    ``layerselect``: ``layers`` or ``num_layers``; ``learner``: ``learner_ratio`` (or ``match_lora_r`` with
    ``lora_fraction``: that fraction of LoRA's entries), ``priming_steps``, ``priming_lr``; ``bitfit``:
    ``target_modules``. Any other config field can be given too.
    """
    options = dict(options)
    if method == "full":
        if options:
            raise ValueError(f"full fine-tuning takes no options, got {sorted(options)}")
        return None
    if method in ("lora", "shira", "sparsemask") or (method == "dps" and options.get("scope") != "model"):
        options.setdefault("target_modules", lora_targets(model))  # DPS scope="model" picks its own (all-linear)
    if method == "lora":
        r = options.pop("r", 8)
        options.setdefault("lora_alpha", 2 * r)  # lora_dropout: PEFT's default (0.0) unless given
        return LoraConfig(task_type=task_type, r=r, **options)
    if method == "shira":
        return ShiraConfig(task_type=task_type, r=options.pop("r", 8), **options)
    if method == "sparsemask":
        match = options.pop("match_lora_r", None)
        if match is not None:
            options["density"] = density_matching_lora(model, match, options["target_modules"], task_type)
        return SparseMaskConfig(task_type=task_type, mode="delta", **options)
    if method == "mask":
        return SparseMaskConfig(task_type=task_type, mode="mask", **options)
    if method == "dps":
        return DPSConfig(task_type=task_type, **options)
    if method == "bitfit":
        return BitFitConfig(task_type=task_type, **options)
    if method == "layerselect":
        if "layers" not in options:
            options.setdefault("num_layers", 2)
        return LayerSelectConfig(task_type=task_type, **options)
    if method == "learner":
        match = options.pop("match_lora_r", None)
        fraction = options.pop("lora_fraction", 1.0)
        if match is not None:
            options["learner_ratio"] = learner_ratio_matching_lora(model, match, fraction, task_type)
        return LearnerConfig(task_type=task_type, **options)
    raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}")


def apply_method(model: nn.Module, method: str, task_type: str, **options: Any) -> nn.Module:
    """``model`` wrapped for ``method`` (unchanged for full fine-tuning). Calibration, where a selection needs
    it, is the caller's: ``peft_sparse.calibrate`` when ``peft_sparse.requires_calibration(model)``."""
    config = method_config(method, model, task_type, **options)
    return model if config is None else get_peft_model(model, config)


def trainable_entries(model: nn.Module) -> int:
    """Trainable parameters, task head included."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "apply_method",
    "density_matching_lora",
    "learner_ratio_matching_lora",
    "lora_entries",
    "lora_targets",
    "method_config",
    "peft_sparse",
    "trainable_entries",
]

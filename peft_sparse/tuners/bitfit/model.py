"""BitFit tuner model."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from peft.config import PeftConfig
from torch import nn

from peft_sparse.modules import head_module_names, is_linear, is_norm, is_under
from peft_sparse.tuners.base import SparseTunerModel

from .layer import BitFitLayer

#: Config switches through which transformers models declare biases on their linear layers (LLaMA, Mistral,
#: Qwen2...: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down).
BIAS_SWITCHES = ("attention_bias", "mlp_bias")


def _has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), torch.Tensor)


class BitFitModel(SparseTunerModel):
    """Trains bias deltas on the targeted layers (see ``BitFitConfig``); everything else stays frozen.

    Example::

        >>> from peft import get_peft_model
        >>> from peft_sparse import BitFitConfig
        >>> model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))

    How it relates to PEFT's own BEFT tuner (``peft.BeftConfig``, a bias vector per ``nn.Linear``): BitFit also
    trains the biases of GPT-2 ``Conv1D``, bitsandbytes and LayerNorm layers, defaults to the paper's "every bias"
    (or a named subset), trains the task head, and makes ``merge_and_unload`` keep biases that the architecture
    does not declare loadable (see ``merge_and_unload``).
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer
    transformers_loader_exact = True  # fixed-shape bias deltas: transformers' own loader fills them exactly

    def _supports(self, module: nn.Module) -> bool:
        return is_linear(module) or (is_norm(module) and _has_bias(module))

    def _unsupported_hint(self, unsupported: dict[str, str]) -> str:
        if any(name.endswith("Norm") for name in unsupported.values()):
            return (
                ". Norm layers without a bias term (RMSNorm) have no bias for BitFit to train: BitFit trains the "
                "biases of linear layers and of LayerNorms that have one"
            )
        return ""

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        if config.target_modules is None:
            # Every Linear-like layer, and every norm that has a bias, outside the task head: the paper's "all".
            # Recorded as explicit module names so that a saved adapter reloads onto exactly the same layers.
            head = head_module_names(model, config.modules_to_save)
            config.target_modules = sorted(
                name
                for name, module in self._base_modules(model)
                if not is_under(name, head) and self._supports(module)
            )
        return config

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Merge the bias deltas and return the base model. Merging creates a bias where a layer had none (LLaMA's
        projections); so that ``save_pretrained`` + ``from_pretrained`` keeps them, the model's config switches
        them on (``attention_bias`` / ``mlp_bias``, with zero biases on the other layers they govern). Biases that
        no config switch can declare are kept in memory but a warning names them: the saved model would drop them.
        """
        before = {name for name, module in self._base_modules(self.model) if _has_bias(module)}
        model = super().merge_and_unload(*args, **kwargs)
        created = sorted(n for n, m in model.named_modules() if is_linear(m) and _has_bias(m) and n not in before)
        if created:
            _declare_created_biases(model, created)
        return model


def _declare_created_biases(model: nn.Module, created: list[str]) -> None:
    config = getattr(model, "config", None)
    switches = [s for s in BIAS_SWITCHES if getattr(config, s, None) is False]
    if not switches:
        warnings.warn(f"merge_and_unload created biases that {type(model).__name__}'s config cannot declare "
                      f"({created[:4]}...): save_pretrained/from_pretrained would drop them; save the adapter instead")
        return
    # Which linear layers each switch governs: build the architecture on the meta device with the switch on.
    governed: dict[str, set[str]] = {}
    for switch in switches:
        probe_config = copy.deepcopy(config)
        setattr(probe_config, switch, True)
        with torch.device("meta"):
            probe = type(model)(probe_config)
        governed[switch] = {n for n, m in probe.named_modules() if is_linear(m) and _has_bias(m)}
    declared = set()
    modules = dict(model.named_modules())
    for switch, names in governed.items():
        if not names & set(created):
            continue
        setattr(config, switch, True)
        declared |= names
        for name in names:  # the layers the switch also governs get a zero bias, as from_pretrained would build
            module = modules.get(name)
            if module is not None and not _has_bias(module):
                weight = module.weight
                dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=weight.device),
                                           requires_grad=False)
    lost = [n for n in created if n not in declared]
    if lost:
        warnings.warn(f"merge_and_unload created biases on {lost[:4]} that {type(model).__name__}'s config cannot "
                      "declare: save_pretrained/from_pretrained would drop them; save the adapter instead")

"""BitFit tuner model."""

from __future__ import annotations

from peft.config import PeftConfig
from torch import nn

from peft_sparse.modules import head_module_names, is_linear, is_norm, is_under
from peft_sparse.tuners.base import SparseTunerModel

from .layer import BitFitLayer


class BitFitModel(SparseTunerModel):
    """Trains bias deltas on the targeted layers (see ``BitFitConfig``); everything else stays frozen.

    Example::

        >>> from peft import get_peft_model
        >>> from peft_sparse import BitFitConfig
        >>> model = get_peft_model(model, BitFitConfig(task_type="SEQ_CLS"))
    """

    prefix: str = "bitfit_"
    tuner_layer_cls = BitFitLayer

    def _supports(self, module: nn.Module) -> bool:
        return is_linear(module) or is_norm(module)

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        if config.target_modules is None:
            # Every Linear-like layer, and every norm that has a bias, outside the task head: the paper's "all".
            # Recorded as explicit module names so that a saved adapter reloads onto exactly the same layers.
            head = head_module_names(model, config.modules_to_save)
            config.target_modules = sorted(
                name
                for name, module in self._base_modules(model)
                if not is_under(name, head)
                and (is_linear(module) or (is_norm(module) and getattr(module, "bias", None) is not None))
            )
        return config

"""SparseMask tuner model: default targets, the checks a support budget needs, and gradient calibration."""

from __future__ import annotations

import warnings

import torch
from peft.config import PeftConfig
from torch import nn

from peft_sparse.modules import linear_shape
from peft_sparse.calibration import CalibrationSession
from peft_sparse.tuners.base import SparseTunerModel

from .layer import SparseMaskLayer
from .selection import trained_fraction


class SparseMaskModel(SparseTunerModel):
    """Sparse-increment (``mode="delta"``) or learned-mask (``mode="mask"``) fine-tuning; see ``SparseMaskConfig``.

    Example::

        >>> model = get_peft_model(model, SparseMaskConfig(task_type="SEQ_CLS", density=0.01))
    """

    prefix: str = "sparsemask_"
    tuner_layer_cls = SparseMaskLayer

    def _validate_targets(self, model: nn.Module, config: PeftConfig) -> None:
        super()._validate_targets(model, config)
        if config.mode != "delta" or config.block_size == 1:
            return
        # A block size close to a layer's size makes one block cover most of it: refuse rather than train most of
        # a layer when a small density was asked for (at least one block is always trained).
        for name, module in self._targeted_modules(model, config).items():
            shape = linear_shape(module)
            fraction = trained_fraction(config.density, shape, config.block_size)
            if fraction > max(0.5, 4 * config.density):
                raise ValueError(
                    f"block_size={config.block_size} with density={config.density} would train {fraction:.0%} of "
                    f"{name} ({shape[0]}×{shape[1]}): one block is too large for it. Use a smaller block_size."
                )
            if fraction > 2 * config.density:
                warnings.warn(
                    f"block_size={config.block_size}: {name} ({shape[0]}×{shape[1]}) trains {fraction:.1%} of its "
                    f"entries, not density={config.density:.1%} (it holds few blocks; at least one is trained)"
                )

    def needs_calibration(self, adapter_name: str) -> bool:
        return any(layer.is_pending(adapter_name) for _, layer in self.tuner_layers())

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        return _FisherSession(self, adapter_names)


class _FisherSession(CalibrationSession):
    """Accumulates Σ (∂L/∂W)² per targeted weight, then installs the top-``density`` support of each."""

    def __init__(self, tuner: SparseMaskModel, adapter_names: list[str]) -> None:
        self.adapter_names = adapter_names
        self.layers = [layer for _, layer in tuner.tuner_layers() if any(layer.is_pending(a) for a in adapter_names)]
        for layer in self.layers:
            layer.start_fisher()

    def measurements(self) -> list[torch.Tensor]:
        return [layer.fisher for layer in self.layers]

    def finish(self) -> None:
        for layer in self.layers:
            for adapter in self.adapter_names:
                if layer.is_pending(adapter):
                    layer.finish_fisher(adapter)

    def close(self) -> None:
        for layer in self.layers:
            layer.stop_fisher()

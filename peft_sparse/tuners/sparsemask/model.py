"""SparseMask tuner model: default targets, gradient calibration, and the compact checkpoint format."""

from __future__ import annotations

import math

import torch

from peft_sparse import sparse, storage
from peft_sparse.tuners.base import CalibrationSession, SparseTunerModel

from .layer import SparseMaskLayer


class SparseMaskModel(SparseTunerModel):
    """Sparse-increment (``mode="delta"``) or learned-mask (``mode="mask"``) fine-tuning; see ``SparseMaskConfig``.

    Example::

        >>> model = get_peft_model(model, SparseMaskConfig(task_type="SEQ_CLS", density=0.01))
    """

    prefix: str = "sparsemask_"
    tuner_layer_cls = SparseMaskLayer

    def _layers(self):
        return [(name, m) for name, m in self.model.named_modules() if isinstance(m, SparseMaskLayer)]

    def needs_calibration(self, adapter_name: str) -> bool:
        return any(adapter_name in layer.pending for _, layer in self._layers())

    def _begin_calibration(self, adapter_names: list[str]) -> CalibrationSession:
        return _FisherSession(self, adapter_names)

    # ------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save each support compactly (see ``peft_sparse.storage``): a delta as its support (entries, or
        blocks) and values in ``save_dtype``; a mask as packed bits or the pruned indices, with no values."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in model.named_modules():
            if not isinstance(layer, SparseMaskLayer) or adapter_name not in layer.sparsemask_delta:
                continue
            key = f"{name}.sparsemask_delta.{adapter_name}"
            values = result.pop(f"{key}.values")
            if layer.modes[adapter_name] == "mask":
                result.update(storage.mask_entries(key, layer.pruned_indices(adapter_name), layer.shape))
                continue
            block_size = layer.block_sizes[adapter_name]
            indices = layer.sparsemask_delta[adapter_name].indices
            if block_size > 1:  # save block ids, not their entries
                rows = torch.div(indices, layer.in_features, rounding_mode="floor") // block_size
                cols = (indices % layer.in_features) // block_size
                indices = torch.unique(rows * math.ceil(layer.in_features / block_size) + cols)
            result.update(storage.sparse_entries(key, indices, values, layer.shape, config.save_dtype))
        return result

    @classmethod
    def _prepare_checkpoint(cls, model, adapter_name, state_dict):
        """Install each layer's saved support (sizes may differ from a freshly built config), then let PEFT
        load the values onto it."""
        state_dict = dict(state_dict)
        for name, layer in model.named_modules():
            if not isinstance(layer, SparseMaskLayer) or adapter_name not in layer.sparsemask_delta:
                continue
            stored = cls._remove_adapter_name_from_key(f"{name}.sparsemask_delta.{adapter_name}", adapter_name)
            values_key = f"{name}.sparsemask_delta.{adapter_name}.values"
            try:
                saved = storage.read_entries(state_dict, stored, layer.shape)
                if layer.modes[adapter_name] == "mask":
                    if "pruned" not in saved:
                        raise ValueError("no mask is saved for this mask-mode adapter")
                    layer.install_mask(adapter_name, saved["pruned"], num_pruned=saved["pruned"].numel())
                    # No scores are saved: the rebuilt ones (every candidate pruned) are what gets loaded.
                    state_dict[values_key] = layer.sparsemask_delta[adapter_name].values.detach().clone()
                else:
                    if "indices" not in saved:
                        raise ValueError("no support is saved for this delta-mode adapter")
                    indices = saved["indices"]
                    block_size = layer.block_sizes[adapter_name]
                    if block_size > 1:
                        indices = sparse.block_support(indices, layer.shape, block_size)
                    layer.sparsemask_delta[adapter_name].set_support(indices)
                    layer.pending.discard(adapter_name)
            except (RuntimeError, ValueError) as error:
                raise ValueError(f"The sparsemask checkpoint does not fit {name} {layer.shape}: {error}") from None
        leftovers = storage.leftover_keys(state_dict)
        if leftovers:
            raise ValueError(f"The sparsemask checkpoint has entries for modules this model lacks: {leftovers[:3]}")
        return state_dict


class _FisherSession(CalibrationSession):
    """Accumulates Σ (∂L/∂W)² per targeted weight, then installs the top-``density`` support of each."""

    def __init__(self, tuner: SparseMaskModel, adapter_names: list[str]) -> None:
        self.tuner = tuner
        self.adapter_names = adapter_names
        self.layers = [layer for _, layer in tuner._layers() if layer.pending & set(adapter_names)]
        for layer in self.layers:
            layer.fisher = torch.zeros(layer.shape, dtype=torch.float32, device=layer.get_base_layer().weight.device)

    def step(self) -> None:
        pass  # the probes accumulate during backward

    def finish(self) -> None:
        for layer in self.layers:
            for adapter in self.adapter_names:
                if adapter in layer.pending:
                    layer.install_gradient_support(adapter, layer.fisher, self.tuner.peft_config[adapter])

    def close(self) -> None:
        for layer in self.layers:
            layer.fisher = None

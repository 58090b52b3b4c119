"""DPS tuner model: the stage schedule and the compact checkpoint of the increments."""

from __future__ import annotations

import warnings


from peft_sparse import storage
from peft_sparse.tuners.base import SparseTunerModel

from .layer import DPSLayer


class DPSModel(SparseTunerModel):
    """Dynamic parameter selection (see ``DPSConfig``), driven by ``update_and_allocate`` once per step.

    Example::

        >>> model = get_peft_model(model, DPSConfig(task_type="SEQ_CLS", keep_ratio=0.7))
        >>> Trainer(model=model, ..., callbacks=[peft_sparse.SparseTrainerCallback()]).train()
    """

    prefix: str = "dps_"
    tuner_layer_cls = DPSLayer

    def _layers(self) -> list[DPSLayer]:
        return [m for m in self.model.modules() if isinstance(m, DPSLayer)]

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps (the Trainer callback calls this with ``max_steps``)."""
        for name, config in self.peft_config.items():
            if config.total_step not in (None, total_steps):
                warnings.warn(f"DPS adapter {name!r}: total_step={config.total_step} replaced by {total_steps}")
            config.total_step = total_steps

    def update_and_allocate(self, global_step: int) -> None:
        """Call after each ``optimizer.step()`` (before ``zero_grad``): accumulates the stage-I scores, keeps
        strict stage-II entries in place, and switches stages. ``global_step`` counts optimizer steps from 0."""
        for adapter in self.active_adapters:
            for layer in self._layers():
                if adapter in layer.dps_delta:
                    layer.after_optimizer_step(adapter, global_step)

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Save each increment by its changed entries (``storage.delta_entries``; dense when that is smaller)."""
        result = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, layer in model.named_modules():
            if isinstance(layer, DPSLayer) and adapter_name in layer.dps_delta:
                key = f"{name}.dps_delta.{adapter_name}"
                result.update(storage.delta_entries(key, result.pop(key), config.save_dtype))
        return result

    @classmethod
    def _prepare_checkpoint(cls, model, adapter_name, state_dict):
        state_dict = dict(state_dict)
        for name, layer in model.named_modules():
            if isinstance(layer, DPSLayer) and adapter_name in layer.dps_delta:
                key = f"{name}.dps_delta.{adapter_name}"
                stored = cls._remove_adapter_name_from_key(key, adapter_name)
                try:
                    delta = storage.read_delta(state_dict, stored, layer.shape)
                except ValueError as error:
                    raise ValueError(f"The DPS checkpoint does not fit {name} {layer.shape}: {error}") from None
                state_dict[key] = delta.to(layer.dps_delta[adapter_name].dtype)
        leftovers = storage.leftover_keys(state_dict)
        if leftovers:
            raise ValueError(f"The DPS checkpoint has entries for modules this model lacks: {leftovers[:3]}")
        return state_dict

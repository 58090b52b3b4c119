"""DPS tuner model: drives the stage schedule of its layers, once per optimizer step."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.config import PeftConfig
from torch import nn

from peft_sparse.modules import head_module_names, is_norm, is_under
from peft_sparse import distributed
from peft_sparse.tuners.base import SparseTunerModel

from .layer import DPSLayer


class DPSModel(SparseTunerModel):
    """Dynamic parameter selection (see ``DPSConfig``), driven by ``update_and_allocate`` once per step.

    Example::

        >>> model = get_peft_model(model, DPSConfig(task_type="SEQ_CLS", keep_ratio=0.7))
        >>> Trainer(model=model, ..., callbacks=[peft_sparse.SparseTrainerCallback()]).train()

    Under DDP the stage-I scores are read from ``.grad`` after the optimizer step, i.e. from the gradient that DDP
    has already averaged over the ranks (with gradient accumulation: over the step's micro-batches too): every rank
    accumulates the same scores and picks the same subnetwork, the one a single process would pick from the same
    global batches. ``calibrate`` instead sums each rank's own squared batch gradients; the two estimators differ by
    design (Σ (mean g)² here, Σ g_b² there). Under FSDP the same averaged gradient arrives as each rank's shard;
    the shards' scores are gathered at each stage switch, so the subnetwork is again the same on every rank.
    """

    prefix: str = "dps_"
    tuner_layer_cls = DPSLayer

    def _resolve_config(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        if config.scope != "model":
            return super()._resolve_config(model, config)
        if config.target_modules is None:  # every linear layer outside the head, as PEFT's all-linear
            self._expand_all_linear(config, model)
        # Norms and embeddings train densely (PEFT's modules_to_save), as in the authors' code.
        dense = sorted(
            name for name, module in self._base_modules(model)
            if (is_norm(module) or isinstance(module, nn.Embedding))
            and not is_under(name, head_module_names(model, config.modules_to_save))
        )
        outermost = [n for n in dense if not any(n != m and is_under(n, [m]) for m in dense)]
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(outermost))
        return config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._save_schedule_state = False
        self._forwards_since_update = 0
        self._warned: set[str] = set()
        super().__init__(*args, **kwargs)

    @property
    def save_schedule_state(self) -> bool:
        """Whether saved checkpoints carry each layer's stage state (stage, subnetwork, stage-I scores), so that a
        run resumed from them continues exactly. ``SparseTrainerCallback`` turns it on for the Trainer's
        checkpoints and off when training ends, so the final adapter stays compact; a plain loop that saves to
        resume sets it itself."""
        return self._save_schedule_state

    @save_schedule_state.setter
    def save_schedule_state(self, value: bool) -> None:
        self._save_schedule_state = bool(value)
        for _, layer in self.tuner_layers():
            layer.checkpoint_schedule = self._save_schedule_state

    def set_total_steps(self, total_steps: int) -> None:
        """The run's length in optimizer steps (the Trainer callback calls this with ``max_steps``)."""
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        for name, config in self.peft_config.items():
            if config.total_step not in (None, total_steps):
                warnings.warn(f"DPS adapter {name!r}: total_step={config.total_step} replaced by {total_steps}")
            config.total_step = total_steps

    def update_and_allocate(self, global_step: int) -> None:
        """Call after each ``optimizer.step()`` and before ``zero_grad``: accumulates the stage-I scores, keeps
        strict stage-II entries in place, and switches stages. ``global_step`` counts optimizer steps from 0."""
        self._forwards_since_update = 0
        for adapter in self.active_adapters:
            layers = [layer for _, layer in self.tuner_layers() if adapter in layer.dps_delta]
            if not layers or self.peft_config[adapter].inference_mode:
                continue
            stage_length = self.peft_config[adapter].stage_length()
            in_stage_one = layers[0].states[adapter].stage == 1
            if in_stage_one and not any(layer.has_gradient(adapter) for layer in layers):
                if distributed.world_size() > 1:
                    # DDP and FSDP always leave the averaged gradient in .grad here: none means an engine that
                    # keeps it elsewhere, and the stage-II subnetwork would be chosen from empty scores.
                    raise ValueError(
                        f"DPS adapter {adapter!r}: update_and_allocate({global_step}) found no gradients under "
                        f"{distributed.world_size()} processes. DPS scores its entries from .grad after the optimizer "
                        "step: DeepSpeed ZeRO keeps the reduced gradients in its own partitions (train DPS with DDP "
                        "or FSDP), and a loop that zeroes them first must call update_and_allocate before "
                        "optimizer.zero_grad()."
                    )
                self._warn_once(
                    f"no-grad:{adapter}",
                    f"DPS adapter {adapter!r}: update_and_allocate({global_step}) found no gradients, so this step "
                    "adds nothing to the stage-I scores. Call it after optimizer.step() and before "
                    "optimizer.zero_grad() (the Trainer callback does).",
                )
            for layer in layers:
                layer.after_optimizer_step(adapter, global_step, stage_length)

    def forward(self, *args: Any, **kwargs: Any):
        training = self.model.training and torch.is_grad_enabled()
        if training and any(not self.peft_config[a].inference_mode for a in self.active_adapters):
            if any(self.peft_config[a].total_step is None for a in self.active_adapters):
                raise ValueError(
                    "DPS needs the run's length and a call after every optimizer step: train with the transformers "
                    "Trainer and callbacks=[peft_sparse.SparseTrainerCallback()], or, in a plain loop, set "
                    "DPSConfig(total_step=...) and call model.base_model.update_and_allocate(step) after each "
                    "optimizer.step()"
                )
            self._forwards_since_update += 1
            limit = max(64, 4 * min(self.peft_config[a].stage_length() for a in self.active_adapters))
            if self._forwards_since_update > limit:
                self._warn_once(
                    "no-update",
                    f"DPS has run {self._forwards_since_update} training forwards without update_and_allocate: it "
                    "stays in stage I, i.e. plain dense training. Add peft_sparse.SparseTrainerCallback() to the "
                    "Trainer, or call model.base_model.update_and_allocate(step) after each optimizer step.",
                )
        return super().forward(*args, **kwargs)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message)

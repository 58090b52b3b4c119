"""``SparseTrainerCallback``: drives scheduled tuners from the transformers ``Trainer``.

Scheduled tuners follow PEFT's AdaLoRA convention: the tuner model exposes ``update_and_allocate(global_step)``,
called once per optimizer step, and learns the run's length from ``set_total_steps(total)``. A plain PyTorch
loop makes the same two calls itself.
"""

from __future__ import annotations

from typing import Any

from peft.tuners.tuners_utils import BaseTuner
from transformers import TrainerCallback


def _tuner(model: Any) -> BaseTuner | None:
    model = getattr(model, "module", model)  # DDP / Accelerate wrappers
    tuner = getattr(model, "base_model", model)
    return tuner if isinstance(tuner, BaseTuner) else None


class SparseTrainerCallback(TrainerCallback):
    """Calls the tuner's ``set_total_steps(max_steps)`` at the start and ``update_and_allocate(step)`` per step.

    Tuners without a schedule (BitFit, hand-picked LayerSelect) define neither, and the callback does nothing.
    """

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = _tuner(model)
        if tuner is not None and hasattr(tuner, "set_total_steps"):
            tuner.set_total_steps(state.max_steps)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Runs right after optimizer.step(), before the gradients are zeroed; state.global_step is the step
        # that has just been taken, counting from 0 (the Trainer increments it afterwards).
        tuner = _tuner(model)
        if tuner is not None and hasattr(tuner, "update_and_allocate"):
            tuner.update_and_allocate(state.global_step)

"""``SparseTrainerCallback``: drives peft_sparse tuners from the transformers ``Trainer`` (and TRL's trainers).

Scheduled tuners follow PEFT's AdaLoRA convention: the tuner model learns the run's length from
``set_total_steps(total)`` and is called with ``update_and_allocate(global_step)`` once per optimizer step. Every
peft_sparse tuner has both methods (no-ops without a schedule), so the callback is harmless for all of them. It
also makes the Trainer's checkpoints carry DPS's stage state (``DPSModel.save_schedule_state``), so that
``resume_from_checkpoint`` continues a stage exactly, and turns that off when training ends.
"""

from __future__ import annotations

from transformers import TrainerCallback

from peft_sparse.modules import find_tuner


class SparseTrainerCallback(TrainerCallback):
    """Calls the tuner's ``set_total_steps(max_steps)`` at the start and ``update_and_allocate(step)`` after every
    optimizer step (before the gradients are zeroed)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tuner = find_tuner(model) if model is not None else None
        if tuner is None:
            return
        if hasattr(tuner, "set_total_steps"):
            tuner.set_total_steps(state.max_steps)
        if hasattr(tuner, "save_schedule_state"):
            tuner.save_schedule_state = True

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Runs right after optimizer.step(), before the gradients are zeroed; state.global_step is the step that
        # has just been taken, counting from 0 (the Trainer increments it afterwards).
        tuner = find_tuner(model) if model is not None else None
        if tuner is not None and hasattr(tuner, "update_and_allocate"):
            tuner.update_and_allocate(state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        tuner = find_tuner(model) if model is not None else None
        if tuner is not None and hasattr(tuner, "save_schedule_state"):
            tuner.save_schedule_state = False

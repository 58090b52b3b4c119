"""``calibrate``: the short measuring pass that data-driven selections (LayerSelect ``num_layers``…) need."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from peft_sparse.tuners.base import SparseTunerModel


def _tuner_of(model: nn.Module) -> BaseTuner:
    tuner = getattr(model, "base_model", None)
    if isinstance(model, BaseTuner):
        tuner = model
    if not isinstance(tuner, BaseTuner):
        raise ValueError(f"calibrate() needs a PEFT model (from get_peft_model), got {type(model).__name__}")
    return tuner


def requires_calibration(model: nn.Module) -> bool:
    """Whether an active adapter of ``model`` waits for ``calibrate`` before it can train."""
    tuner = _tuner_of(model)
    return isinstance(tuner, SparseTunerModel) and any(tuner.needs_calibration(a) for a in tuner.active_adapters)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Any]], num_batches: Optional[int] = None) -> int:
    """Run the calibration that the active adapters' automatic selection needs, then apply the selection.

    Args:
        model: A PEFT model whose active adapter(s) wait for calibration (``requires_calibration(model)``).
        batches: Model-input dicts with labels (so the model returns a loss): a DataLoader, or any iterable.
        num_batches: Use at most this many batches (default: all of them).

    Returns:
        The number of batches used. Train/eval mode is restored afterwards and no ``.grad`` is left behind.
        With nothing to calibrate it warns and returns 0.
    """
    tuner = _tuner_of(model)
    pending = (
        [a for a in tuner.active_adapters if tuner.needs_calibration(a)] if isinstance(tuner, SparseTunerModel) else []
    )
    if not pending:
        import warnings

        warnings.warn("calibrate(): no active adapter needs calibration; nothing was done")
        return 0
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    device = next(p.device for p in model.parameters())
    was_training = model.training
    used = 0
    model.train()
    tuner._calibrating = True
    session = tuner._begin_calibration(pending)
    try:
        for batch in tqdm(islice(batches, num_batches), total=total, desc="calibrating", leave=False):
            outputs = model(**_to_device(batch, device))
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
            if loss is None:
                raise ValueError("calibrate() needs batches with labels, so that the model returns a loss")
            loss.backward()
            session.step()
            used += 1
            if session.done:
                break
        if used == 0:
            raise ValueError("calibrate() got no batches")
        session.finish()
    finally:
        session.close()
        tuner._calibrating = False
        model.train(was_training)
        for param in model.parameters():
            param.grad = None
    return used

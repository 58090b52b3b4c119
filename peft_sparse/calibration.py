"""``calibrate``: the short measuring pass that data-driven selections need.

SparseMask ``selection="gradient"`` (Σ of squared weight gradients), LayerSelect ``num_layers`` (gradient norm
per block) and Learner priming (how far each FFN node moves) choose what to train from a few batches, before the
training optimizer exists. Under several processes (``torch.distributed`` initialised: DDP, FSDP, Accelerate),
every rank measures on its own batches and the measurements are summed over the ranks before the selection (formed
on rank 0 and broadcast, so identical bit for bit), so every rank installs the same selection, equal to one process
measuring the union of the batches. Learner priming averages the ranks' gradients at every priming step instead
(data-parallel priming: one process priming on the ranks' batches put together).

Calibration creates parameters (supports, Learners) or makes blocks trainable, so it runs before the model is
wrapped for data parallelism (``accelerator.prepare``, DDP, ``fully_shard``), which register the parameters they
synchronise; it refuses a wrapped model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn
from tqdm.auto import tqdm

from peft_sparse import distributed
from peft_sparse.modules import find_tuner


class CalibrationRequiredError(RuntimeError):
    """Raised when an adapter whose selection is measured from data is trained before ``calibrate`` ran."""


class CalibrationSession:
    """One calibration run of one tuner: ``step()`` after each backward, then ``finish()`` once, ``close()`` always.

    A tuner model takes part in calibration by implementing ``needs_calibration(adapter)`` and
    ``_begin_calibration(adapters) -> CalibrationSession``. Subclasses accumulate what they measure in ``step`` (or
    in the layers, during the backward) and turn it into a selection in ``finish``. Under several processes,
    ``calibrate`` sums ``measurements()`` over the ranks (in place) before ``finish``, so every rank selects from the
    same numbers. ``close`` undoes any temporary change (``requires_grad`` flags, probes) whether or not ``finish``
    ran.
    """

    #: Set to True by a session that has seen enough batches (priming's fixed number of steps).
    done: bool = False

    def step(self) -> None:
        """After each backward pass."""

    def measurements(self) -> list[torch.Tensor]:
        """The tensors whose sum over all processes the selection is made from (summed in place)."""
        return []

    def finish(self) -> None:
        """Turn the measurements into the selection and install it."""
        raise NotImplementedError(f"{type(self).__name__} must implement finish()")

    def close(self) -> None:
        """Undo temporary changes; called whether or not ``finish`` ran."""


def _calibrates(tuner: BaseTuner) -> bool:
    """Whether ``tuner`` takes part in the calibration protocol (every peft_sparse tuner does)."""
    return callable(getattr(tuner, "needs_calibration", None)) and callable(getattr(tuner, "_begin_calibration", None))


def _tuner_of(model: nn.Module) -> BaseTuner:
    tuner = find_tuner(model)
    if tuner is None:
        raise ValueError(f"calibrate() needs a PEFT model (from get_peft_model), got {type(model).__name__}")
    return tuner


def requires_calibration(model: nn.Module) -> bool:
    """Whether an active adapter of ``model`` waits for ``calibrate`` before it can train."""
    tuner = _tuner_of(model)
    return _calibrates(tuner) and any(tuner.needs_calibration(a) for a in tuner.active_adapters)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def calibrate(model: nn.Module, batches: Iterable[Mapping[str, Any]], num_batches: Optional[int] = None) -> int:
    """Run the calibration that the active adapters' automatic selection needs, then apply the selection.

    Args:
        model: A PEFT model whose active adapter(s) wait for calibration (``requires_calibration(model)``), not yet
            wrapped for data parallelism: under several processes, calibrate after ``torch.distributed`` is set up
            (``Accelerator()``) and before ``accelerator.prepare`` / DDP / ``fully_shard``.
        batches: Model-input dicts with labels (so the model returns a loss): a DataLoader, or any iterable.
            Under several processes each rank may see its own batches. Every rank starts from rank 0's model (its
            parameters are broadcast first, as DDP does), and calibration stops when the first rank runs out of
            batches, so every rank measures the same number of batches.
        num_batches: Use at most this many batches (default: all of them).

    Returns:
        The number of batches used on this process. Train/eval mode is restored afterwards and no ``.grad`` is
        left behind. With nothing to calibrate it warns and returns 0.
    """
    tuner = _tuner_of(model)
    wrapper = distributed.parallel_wrapper(model)
    if wrapper is not None:
        raise ValueError(
            f"calibrate() got a model already prepared for data parallelism ({wrapper}). Calibration creates the "
            "adapter's parameters (supports, Learners) or makes blocks trainable, which the data-parallel wrapper "
            "would not synchronise: call calibrate() after torch.distributed is set up (Accelerator()) and before "
            "accelerator.prepare / DistributedDataParallel / fully_shard. Each rank may calibrate on its own batches."
        )
    pending = [a for a in tuner.active_adapters if tuner.needs_calibration(a)] if _calibrates(tuner) else []
    if not pending:
        warnings.warn("calibrate(): no active adapter needs calibration; nothing was done")
        return 0
    if num_batches is not None and (not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1):
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    frozen = [a for a in pending if tuner.peft_config[a].inference_mode]
    if frozen:
        raise ValueError(
            f"Adapter(s) {frozen} were created or loaded with inference_mode=True (is_trainable=False), so there is "
            "nothing to calibrate and train; load them with is_trainable=True"
        )
    total = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    device = next(p.device for p in tuner.model.parameters())
    was_training = model.training
    used = 0
    distributed.sync_module_from_rank0(tuner.model)  # every rank measures the model DDP would train
    model.train()
    tuner._calibrating = True
    session = None
    several = distributed.world_size() > 1
    progress = tqdm(total=total, desc="calibrating", leave=False)
    try:
        session = tuner._begin_calibration(pending)  # may refuse (a clear error): the finally still cleans up
        iterator = iter(islice(batches, num_batches))
        while True:
            batch = next(iterator, None)
            has_batch = batch is not None
            if several:
                # Stop as soon as one rank runs out: sessions that communicate at every step (priming) need the
                # same number of steps everywhere.
                has_batch = distributed.all_ranks_true(has_batch, device)
            if not has_batch:
                break
            progress.update()
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"calibrate() takes batches that are dicts of model inputs with labels (as a DataLoader with a "
                    f"data collator yields them), got a {type(batch).__name__}"
                )
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
            raise ValueError("calibrate() got no batches" + (" on at least one rank" if several else ""))
        distributed.reduce_to_all(session.measurements())
        session.finish()
    finally:
        progress.close()
        if session is not None:
            session.close()
        tuner._calibrating = False
        model.train(was_training)
        for param in model.parameters():
            param.grad = None
    return used

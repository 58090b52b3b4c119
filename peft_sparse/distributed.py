"""What peft_sparse needs from ``torch.distributed`` (DDP, FSDP2, Accelerate), in one place.

* Measurements and gradients that select what to train are combined with ``reduce_to_all``: reduced on rank 0,
  then broadcast from it, so every rank holds the same bits whatever the backend's all-reduce algorithm.
* ``parallel_wrapper`` names the data-parallel engine a model is already prepared for (DDP, FSDP, DeepSpeed), so
  that operations which create or re-flag parameters (``calibrate``) can refuse to run after it.
* FSDP2 (``fully_shard``) keeps parameters as DTensor shards between forwards: ``local`` / ``gather`` /
  ``local_part`` let per-layer state (DPS's scores and masks) follow a sharded parameter.
* ``check_sharding`` refuses an FSDP unit inside a tuner layer, which FSDP could not gather when the layer reads it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def world_size() -> int:
    """Processes in the default group (1 without ``torch.distributed``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_to_all(tensors: list[torch.Tensor], average: bool = False) -> None:
    """Sum (or average) ``tensors`` in place over every process, identical bit for bit on every rank.

    The sum is formed once, on rank 0 (``dist.reduce``), and broadcast from there, so no rank depends on how the
    backend orders an all-reduce. Nothing happens in a single process.
    """
    import torch.distributed as dist

    size = world_size()
    if size == 1:
        return
    for tensor in tensors:
        dist.reduce(tensor, dst=0, op=dist.ReduceOp.SUM)
        if average and dist.get_rank() == 0:
            tensor.div_(size)
        dist.broadcast(tensor, src=0)


def all_ranks_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``flag`` holds on every process (a collective: every rank must call it; ``device``: where the
    backend communicates, e.g. the model's device for NCCL)."""
    import torch.distributed as dist

    if world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's, in place (nothing in a single process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return
    for tensor in tensors:
        dist.broadcast(tensor, src=0)


def sync_module_from_rank0(module: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (what DDP does when it wraps a model)."""
    with torch.no_grad():
        broadcast_from_rank0([t.data for t in list(module.parameters()) + list(module.buffers())])


def parallel_wrapper(model: nn.Module) -> Optional[str]:
    """The data-parallel engine ``model`` is prepared for, or None: ``"DistributedDataParallel"``,
    ``"FullyShardedDataParallel"`` (FSDP1), ``"fully_shard"`` (FSDP2), ``"DeepSpeed"``, or ``"DTensor parameters"``."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "DistributedDataParallel"
    if type(model).__name__ == "DeepSpeedEngine":
        return "DeepSpeed"
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return "FullyShardedDataParallel"
        if isinstance(module, FSDPModule):
            return "fully_shard"
    if any(is_dtensor(p) for p in model.parameters()):
        return "DTensor parameters"
    return None


# ------------------------------------------------------------------------------------------ DTensor shards


def is_dtensor(tensor: Optional[torch.Tensor]) -> bool:
    if tensor is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise); in-place changes reach the DTensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor on every rank (a collective), or the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (held whole, identical on every rank) that this rank holds of ``like``'s shards, without
    communication; ``full`` itself when ``like`` is not a DTensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def fsdp_units_inside(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, submodule)`` of every FSDP unit (FSDP2 ``fully_shard`` or FSDP1) strictly inside ``module``."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return []
    return [
        (name, sub)
        for name, sub in module.named_modules()
        if name and isinstance(sub, (FSDPModule, FullyShardedDataParallel))
    ]


def check_sharding(model: nn.Module) -> None:
    """Refuse an FSDP setting that cannot work with the model's peft_sparse tuner (``ValueError`` naming it).

    Every forward of a peft_sparse tuner under several processes runs this check (FSDP2 finishes its set-up lazily
    at the first forward; neither ``fully_shard`` nor ``accelerator.prepare`` has a hook for a plugin's checks); call
    it right after ``fully_shard`` / ``accelerator.prepare`` to fail there instead. Refused: an FSDP unit strictly
    inside a tuner layer (an adapter container, ``SparseDelta``, or a base layer whose parameters the layer reads
    itself), which a wrap policy reaching into tuner layers creates (e.g. a size-based choice of units with a small
    ``min_num_params``): FSDP gathers a unit's parameters only around that unit's own forward, and those are read
    outside it.
    """
    from peft_sparse.modules import find_tuner, first_of

    tuner = find_tuner(model)
    layers = getattr(tuner, "tuner_layers", None)
    if not callable(layers):
        return
    problems = []
    for name, layer in layers():
        for inner, unit in fsdp_units_inside(layer):
            if inner == "base_layer" and layer.base_layer_can_be_fsdp_unit():
                continue
            problems.append(f"{name}.{inner} ({type(unit).__name__})")
    if problems:
        raise ValueError(
            f"This FSDP setting cannot work with {type(tuner).__name__}: {first_of(problems, 4)}. FSDP gathers a unit's parameters "
            "only around that unit's own forward, and peft_sparse tuner layers read their adapter (and, for "
            "LayerSelect, base) parameters themselves. Shard whole tuner layers, transformer blocks or the model: "
            "fully_shard each block and then the model (Accelerate: fsdp_auto_wrap_policy=TRANSFORMER_BASED_WRAP, "
            "or NO_WRAP), and never a module inside a tuner layer (a size-based policy with a small "
            "min_num_params picks those)."
        )

"""Every distributed scenario in one launch: ``torchrun --nproc_per_node 2 dist_worker.py OUT`` (gloo, CPU).

Launched once by ``test_distributed.py``, which computes the one-process references and asserts on what this
writes: per scenario ``OUT/<scenario>/rank<r>.safetensors`` (the adapter as each rank sees it after gathering, plus
what the scenario records: selections, DPS masks), ``OUT/<scenario>/adapter`` (rank 0's ``save_pretrained`` from
the gathered state dict) and ``OUT/results-rank<r>.json`` (per scenario: facts such as "base parameters are DTensor
shards", or the error a refused setting raised). A scenario that fails records its error and the next one runs.

Engines: DDP through Accelerate (``Accelerator(cpu=True)``: gloo). FSDP2 with torch's ``fully_shard`` directly:
Accelerate 1.15 does not enable FSDP on CPU (``AcceleratorState`` turns a FSDP plugin into
``DistributedType.FSDP`` only for GPU-like device types; with ``cpu=True`` the type stays ``MULTI_CPU`` and
``prepare`` wraps the model in DDP), so ``accelerator.prepare`` cannot be the FSDP path here. The "accelerate"
policy runs Accelerate's own FSDP2 preparation function (``fsdp2_prepare_model``: its auto-wrap policy, embedding
and tail units, mixed-precision upcast) on the model.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

import peft_sparse
from peft_sparse.modules import find_layer_stack
from peft_sparse.modules import find_tuner

import dist_scenarios as S

RANK = 0
RESULTS: dict[str, dict] = {}


def shard(model, policy: str, mp: bool = False) -> None:
    """FSDP2 on ``model`` (a PeftModel) with one of ``S.POLICIES`` (or "size" / "inside": settings to refuse)."""
    kwargs = {}
    if mp or policy == "mp":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    tuner = find_tuner(model)
    if policy in ("blocks", "mp"):
        _, stack = find_layer_stack(tuner.model)
        for block in stack:
            fully_shard(block, **kwargs)
    elif policy == "layers":
        for _, layer in tuner.tuner_layers():
            fully_shard(layer, **kwargs)
    elif policy == "base":  # every base layer inside the tuner layers, then blocks (refused for LayerSelect)
        for _, layer in tuner.tuner_layers():
            fully_shard(layer.base_layer, **kwargs)
        for block in find_layer_stack(tuner.model)[1]:
            fully_shard(block, **kwargs)
    elif policy in ("inside", "size"):
        # inside: a unit on every adapter holder inside the tuner layers (ParameterDict, SparseDelta). size: the
        # units a size-based policy picks (FSDP1's size_based_auto_wrap_policy, bottom up, every module above
        # min_num_params), skipping the containers fully_shard itself refuses (Accelerate's FSDP2 SIZE_BASED_WRAP
        # does not skip them and fails on the ModuleList of blocks of any model: "fully_shard does not support
        # containers that do not implement forward").
        if policy == "inside":
            units = [m for _, layer in tuner.tuner_layers() for name in layer.adapter_layer_names
                     for m in getattr(layer, name).modules()
                     if not isinstance(m, (torch.nn.ModuleDict, torch.nn.ModuleList))]
        else:
            from accelerate.utils.fsdp_utils import get_module_children_bottom_up

            # Within the blocks (GPT-2 ties its embeddings: a unit holding one of them alone is torch's own error).
            _, stack = find_layer_stack(tuner.model)
            units = [m for m in get_module_children_bottom_up(stack)[:-1]
                     if not isinstance(m, (torch.nn.ModuleDict, torch.nn.ModuleList))
                     and sum(p.numel() for p in m.parameters()) > 8]
        for module in units:
            if not isinstance(module, FSDPModule):
                fully_shard(module, **kwargs)
    elif policy == "accelerate":
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        # The block class named: Accelerate's default (the model's _no_split_modules) fails on BERT itself, with or
        # without an adapter (it shards BertEmbeddings, then its word embeddings again: "Invariant encountered:
        # value was None", torch/distributed/device_mesh.py in DeviceMesh._concatenate).
        _, stack = find_layer_stack(tuner.model)
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=[type(stack[0]).__name__])
        # What fsdp2_prepare_model reads of an Accelerator that Accelerate would have put in FSDP mode.
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                                      parallelism_config=None, mixed_precision="no",
                                      is_main_process=RANK == 0, device=torch.device("cpu"))
        fsdp2_prepare_model(accelerator, model)
        return
    fully_shard(model, **kwargs)


def sharding_facts(model) -> dict:
    """Whether the frozen base parameters are DTensor shards (and this rank holds less than the whole)."""
    base = [p for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "base_params": len(base),
        "base_dtensor": sum(isinstance(p, DTensor) for p in base),
        "base_shard0": sum(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in base),
        "base_local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in base),
        "base_numel": sum(p.numel() for p in base),
        "trainable_dtensor": sum(isinstance(p, DTensor) for p in trainable),
        "trainable": len(trainable),
    }


def gathered_adapter(model) -> tuple[dict, dict]:
    """The whole state dict on every rank (a collective), and the adapter's checkpoint entries from it."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return full, get_peft_model_state_dict(model, state_dict=full)


def save(out: str, scenario: str, tensors: dict[str, torch.Tensor]) -> None:
    os.makedirs(f"{out}/{scenario}", exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # Learners share nodes
    save_file(tensors, f"{out}/{scenario}/rank{RANK}.safetensors")


def scenario(name: str):
    """Run the decorated function now as scenario ``name``: its result (a dict of facts) or its error is recorded,
    and the ranks meet before the next scenario."""
    def run(fn):
        try:
            RESULTS[name] = fn() or {}
            RESULTS[name]["ok"] = True
        except Exception as error:  # recorded; the test side reports it
            RESULTS[name] = {"ok": False, "error": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()[-3000:]}
        dist.barrier()
        return fn
    return run


# --------------------------------------------------------------------------------------------------- FSDP


def fsdp_training(out: str, tuner_name: str, policy: str) -> None:
    @scenario(f"fsdp-{policy}-{tuner_name}")
    def run():
        arch, config = S.TUNERS[tuner_name]
        model = S.build(arch, config())
        shard(model, policy)
        peft_sparse.check_sharding(model)
        facts = sharding_facts(model)
        record: dict[str, torch.Tensor] = {}
        S.train(model, arch, rank=RANK, on_step=S.dps_stage_recorder(model, record))
        full, adapter = gathered_adapter(model)
        # Non-persistent state that never leaves the rank: the sparse supports.
        for name, layer in find_tuner(model).tuner_layers():
            if hasattr(layer, "sparsemask_delta"):
                record[f"{name}.support"] = layer.sparsemask_delta["default"].indices
        save(out, f"fsdp-{policy}-{tuner_name}", {**{f"adapter.{k}": v for k, v in adapter.items()}, **record})
        if RANK == 0:
            model.save_pretrained(f"{out}/fsdp-{policy}-{tuner_name}/adapter", state_dict=full)
        return facts


def fsdp_refused(tuner_name: str, policy: str) -> None:
    """A setting that cannot work: the error it raises (at sharding, check_sharding or the first forward)."""

    @scenario(f"refuse-{policy}-{tuner_name}")
    def run():
        arch, config = S.TUNERS[tuner_name]
        model = S.build(arch, config())
        try:
            shard(model, policy, mp=policy == "mp-mask")
            peft_sparse.check_sharding(model)
            model.train()
            model(**S.rank_rows(S.global_batch(arch, 0), RANK)).loss.backward()
        except Exception as error:
            return {"refused": f"{type(error).__name__}: {error}"}
        return {"refused": None}


def fsdp_more_refusals() -> None:
    @scenario("refuse-merge-sparsemask")
    def run():
        arch, config = S.TUNERS["sparsemask"]
        model = S.build(arch, config())
        shard(model, "blocks")
        try:
            model.merge_adapter()
        except ValueError as error:
            return {"refused": str(error)}
        return {"refused": None}

    @scenario("refuse-dps-schedule-checkpoint")
    def run():
        arch, config = S.TUNERS["dps"]
        model = S.build(arch, config())
        shard(model, "blocks")
        tuner = find_tuner(model)
        model.train()
        model(**S.rank_rows(S.global_batch(arch, 0), RANK)).loss.backward()
        tuner.update_and_allocate(10)  # in stage I: the scores are shards
        tuner.save_schedule_state = True
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        try:
            get_peft_model_state_dict(model, state_dict=full)
        except ValueError as error:
            return {"refused": str(error)}
        return {"refused": None}


# ---------------------------------------------------------------------------------------------- DDP (Accelerate)


def ddp_training(out: str, accelerator: Accelerator, tuner_name: str, accumulate: int) -> None:
    @scenario(f"ddp-{tuner_name}-acc{accumulate}")
    def run():
        arch, config = S.TUNERS[tuner_name]
        model = S.build(arch, config())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=S.LR)
        accelerator.gradient_accumulation_steps = accumulate
        accelerator.step = 0  # accumulate() counts micro-batches from here
        model, optimizer = accelerator.prepare(model, optimizer)
        wrapped = type(model).__name__
        tuner = find_tuner(model)
        record: dict[str, torch.Tensor] = {}
        on_step = S.dps_stage_recorder(model, record)
        torch.manual_seed(1234)
        model.train()
        updates = []
        step = 0
        for micro_index in range(S.STEPS * accumulate):
            batch = S.rank_rows(S.global_batch(arch, micro_index // accumulate, micro_index % accumulate), RANK)
            with accelerator.accumulate(model):
                accelerator.backward(model(**batch).loss)
                optimizer.step()
                if accelerator.sync_gradients:  # once per optimizer step, not per micro-batch
                    tuner.update_and_allocate(step)
                    on_step(step)
                    updates.append(micro_index)
                    step += 1
                optimizer.zero_grad()
        accelerator.gradient_accumulation_steps = 1
        unwrapped = accelerator.unwrap_model(model)
        adapter = get_peft_model_state_dict(unwrapped)
        save(out, f"ddp-{tuner_name}-acc{accumulate}", {**{f"adapter.{k}": v for k, v in adapter.items()}, **record})
        return {"wrapped": wrapped, "updates_after_micro_batch": updates}


# ------------------------------------------------------------------------------------------------ calibration


def calibration(out: str, accelerator: Accelerator, name: str, engine: str) -> None:
    @scenario(f"calibrate-{engine}-{name}")
    def run():
        arch, config, combine = S.CALIBRATED[name]
        model = S.build(arch, config())
        if RANK == 1:  # a rank that built another model: calibrate starts every rank from rank 0's
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        used = peft_sparse.calibrate(model, S.calibration_batches(arch, combine, RANK))  # different data per rank
        chosen = S.selection(model)
        if engine == "ddp":
            model = accelerator.prepare(model)
            wrapped = type(model).__name__
        else:
            shard(model, "blocks")
            wrapped = sharding_facts(model)["base_dtensor"]
        S.train(model, arch, rank=RANK, steps=2)
        if engine == "ddp":
            adapter = get_peft_model_state_dict(accelerator.unwrap_model(model))
        else:
            _, adapter = gathered_adapter(model)
        save(out, f"calibrate-{engine}-{name}", {**{f"adapter.{k}": v for k, v in adapter.items()},
                                                   **{f"chosen.{k}": v for k, v in chosen.items()}})
        return {"batches_used": used, "wrapped": wrapped}


def dps_without_gradients(accelerator: Accelerator) -> None:
    @scenario("refuse-dps-without-gradients")
    def run():
        arch, config = S.TUNERS["dps"]
        model = S.build(arch, config())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=S.LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        accelerator.backward(model(**S.rank_rows(S.global_batch(arch, 0), RANK)).loss)
        optimizer.step()
        optimizer.zero_grad()  # what an engine that keeps the reduced gradients elsewhere (DeepSpeed ZeRO) leaves
        try:
            find_tuner(model).update_and_allocate(0)
        except ValueError as error:
            return {"refused": str(error)}
        return {"refused": None}


def calibration_after_wrapping(accelerator: Accelerator, engine: str) -> None:
    @scenario(f"refuse-calibrate-after-{engine}")
    def run():
        arch, config, combine = S.CALIBRATED["layerselect-calibrated"]
        model = S.build(arch, config())
        if engine == "ddp":
            model = accelerator.prepare(model)
        else:
            shard(model, "blocks")
        try:
            peft_sparse.calibrate(model, S.calibration_batches(arch, combine, RANK))
        except ValueError as error:
            return {"refused": str(error)}
        return {"refused": None}


def main(out: str) -> None:
    global RANK
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=120))])
    assert accelerator.num_processes == S.WORLD, accelerator.num_processes
    RANK = accelerator.process_index
    facts = {"accelerate_distributed_type": str(accelerator.distributed_type), "backend": dist.get_backend()}
    only = set(os.environ.get("DIST_SCENARIOS", "").split(",")) - {""}

    def wanted(kind: str) -> bool:
        return not only or kind in only

    if wanted("fsdp"):
        for policy in S.POLICIES:
            for tuner_name in S.TUNERS:
                if (policy, tuner_name) in S.REFUSED:
                    continue  # refused below
                fsdp_training(out, tuner_name, policy)
    if wanted("refuse"):
        for tuner_name in S.TUNERS:
            fsdp_refused(tuner_name, "inside")
            if tuner_name != "sparsemask-tiny":  # one value a layer: the size policy wraps only its base layers
                fsdp_refused(tuner_name, "size")
        fsdp_refused("layerselect", "base")
        fsdp_refused("sparsemask-mask", "mp-mask")
        fsdp_more_refusals()
        dps_without_gradients(accelerator)
        calibration_after_wrapping(accelerator, "ddp")
        calibration_after_wrapping(accelerator, "fsdp")
    if wanted("ddp"):
        ddp_training(out, accelerator, "bitfit", 1)
        for tuner_name in ("dps", "dps-mix"):
            for accumulate in (1, 2):
                ddp_training(out, accelerator, tuner_name, accumulate)
    if wanted("calibrate"):
        for engine in ("ddp", "fsdp"):
            for name in S.CALIBRATED:
                calibration(out, accelerator, name, engine)
    with open(f"{out}/results-rank{RANK}.json", "w") as f:
        json.dump({"facts": facts, "scenarios": RESULTS}, f, indent=1)
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])

"""One tuner under DeepSpeed ZeRO through Accelerate on CPU (``accelerate launch --use_deepspeed``), run by
``test_deepspeed.py`` (only where DeepSpeed is installed; it is not a dependency of peft_sparse).

Environment: ``ZERO`` (2 or 3), ``TUNER`` (a name of ``dist_scenarios.TUNERS``). Writes ``OUT/zero<Z>-<tuner>.json``
(rank 0: "ok" or the error) and ``OUT/zero<Z>-<tuner>.safetensors`` (the adapter from the gathered state dict).

Without a GPU, Accelerate 1.15 gives DeepSpeed no backend of its own (``AcceleratorState``: "No backend == no
distributed training", so ``num_processes`` is 1) while DeepSpeed initialises torch.distributed with both ranks;
Accelerate then derives ``train_batch_size`` from 1 process and DeepSpeed's batch check fails ("train_batch_size is
not equal to micro_batch_per_gpu * gradient_acc_step * world_size"). An explicit DeepSpeed config with
``train_batch_size`` avoids it. One DeepSpeed engine per Accelerator: one tuner per launch.
"""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

import dist_scenarios as S
from peft_sparse.modules import find_tuner


def main(out: str) -> None:
    stage, name = int(os.environ["ZERO"]), os.environ["TUNER"]
    config = {
        "train_batch_size": S.WORLD * S.PER_RANK, "train_micro_batch_size_per_gpu": S.PER_RANK,
        "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
        # every parameter partitioned under ZeRO-3, however small (the tiny models' would all stay whole)
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                              "stage3_gather_16bit_weights_on_model_save": True},
    }
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    rank = dist.get_rank()
    result = {"world": dist.get_world_size(), "accelerate_num_processes": accelerator.num_processes}
    try:
        arch, make_config = S.TUNERS[name]
        model = S.build(arch, make_config())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=S.LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        result["engine"] = type(model).__name__
        tuner = find_tuner(model)
        torch.manual_seed(1234)
        model.train()
        for step in range(S.STEPS):
            accelerator.backward(model(**S.rank_rows(S.global_batch(arch, step), rank)).loss)
            optimizer.step()
            tuner.update_and_allocate(step)
            optimizer.zero_grad()
        full = accelerator.get_state_dict(model)  # a collective under ZeRO-3
        if rank == 0:
            adapter = get_peft_model_state_dict(accelerator.unwrap_model(model), state_dict=full)
            save_file({k: v.detach().cpu().clone().contiguous() for k, v in adapter.items()},
                      f"{out}/zero{stage}-{name}.safetensors")
        result["status"] = "ok"
    except Exception as error:
        result["status"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()[-3000:]
    if rank == 0:
        with open(f"{out}/zero{stage}-{name}.json", "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

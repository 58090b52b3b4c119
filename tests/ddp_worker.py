"""Run by test_distributed.py under `accelerate launch --cpu --num_processes 2`: BitFit with Accelerate (DDP/gloo).

Each rank trains on its own shard of the data; DDP averages gradients, so both ranks must end with the same
adapter. Every rank saves its adapter to <out>/rank<k> for the test to compare.
"""

import sys

import torch
from accelerate import Accelerator
from peft import get_peft_model

from peft_sparse import BitFitConfig

from tiny_models import VOCAB, make_model


def main(out_dir: str) -> None:
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, accelerator.num_processes
    model = get_peft_model(make_model("bert"), BitFitConfig(task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data on each rank
    ids = torch.randint(0, VOCAB, (4, 6), generator=g)
    labels = (ids[:, 0] > VOCAB // 2).long()
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model).save_pretrained(f"{out_dir}/rank{accelerator.process_index}")
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])

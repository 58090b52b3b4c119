"""The distributed scenarios, shared by ``dist_worker.py`` (2 processes) and ``test_distributed.py`` (which computes
the one-process references itself and asserts on what the worker wrote).

Every run starts from the same tiny model (``make_model(arch, seed=0)``) and trains ``STEPS`` AdamW steps on global
batches of ``WORLD * PER_RANK`` rows; under 2 processes rank ``r`` gets rows ``[r * PER_RANK, (r + 1) * PER_RANK)``
of each global batch, so a one-process run on the global batches is the reference.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from peft import get_peft_model

from peft_sparse import BitFitConfig, DPSConfig, LayerSelectConfig, LearnerConfig, SparseMaskConfig, calibrate
from peft_sparse.modules import find_tuner
from peft_sparse.tuners.dps.layer import DPSLayer

from tiny_models import ARCHS, VOCAB, make_model

WORLD = 2
PER_RANK = 2
STEPS = 4
LR = 1e-2
SEQ = 7

#: name -> (architecture, config factory). Different value lengths per layer (llama's q/k/v/mlp shapes), fewer
#: sparse values than ranks (sparsemask-tiny: one entry per layer), DPS masks (dense and mix), Learner slices.
TUNERS: dict[str, tuple[str, Callable]] = {
    "bitfit": ("bert", lambda: BitFitConfig(task_type="SEQ_CLS")),
    "layerselect": ("gpt2", lambda: LayerSelectConfig(task_type="CAUSAL_LM", layers=[1])),
    "sparsemask": ("llama", lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.05)),
    "sparsemask-tiny": ("gpt2", lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.0001)),
    "sparsemask-block": ("llama", lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.1, block_size=4)),
    "sparsemask-mask": ("bert", lambda: SparseMaskConfig(task_type="SEQ_CLS", mode="mask", sparsity=0.1)),
    "dps": ("llama", lambda: DPSConfig(task_type="CAUSAL_LM", total_step=STEPS, update_ratio=0.25)),
    "dps-mix": ("bert", lambda: DPSConfig(task_type="SEQ_CLS", variant="mix", total_step=STEPS, update_ratio=0.25)),
    "learner": ("llama", lambda: LearnerConfig(task_type="CAUSAL_LM", learner_ratio=0.25, priming_steps=0)),
}

#: FSDP2 wrappings: which modules get their own ``fully_shard`` unit before the model itself.
#: blocks: every transformer block (Accelerate's TRANSFORMER_BASED_WRAP); root: the model only (NO_WRAP);
#: layers: every tuner layer; mp: blocks with MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32);
#: accelerate: Accelerate's own fsdp2_prepare_model (TRANSFORMER_BASED_WRAP) with the plugin it would use on a GPU.
#: base: every base layer inside the tuner layers, then blocks (FSDP gathers it around its own forward, which the
#: tuner layers call; LayerSelect reads its base parameters itself and refuses it).
POLICIES = ("blocks", "root", "layers", "mp", "accelerate", "base")
#: (policy, tuner) pairs that cannot work, refused with an error (see test_distributed.REFUSALS).
REFUSED = {("mp", "sparsemask-mask"), ("base", "layerselect")}

#: Selections measured by calibrate(): name -> (architecture, config factory, how the ranks' batches combine).
#: "sum": Σ over every batch of a per-batch measurement (one process: the ranks' batches one after another);
#: "mean": priming steps on the ranks' gradients averaged (one process: the global batches).
CALIBRATED: dict[str, tuple[str, Callable, str]] = {
    "sparsemask-gradient": (
        "llama", lambda: SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient", density=0.05), "sum"),
    "layerselect-calibrated": ("bert", lambda: LayerSelectConfig(task_type="SEQ_CLS", num_layers=1), "sum"),
    "learner-primed": (
        "llama", lambda: LearnerConfig(task_type="CAUSAL_LM", learner_ratio=0.25, priming_steps=2), "mean"),
}
CALIBRATION_BATCHES = 3


def global_batch(arch: str, step: int, micro: int = 0, kind: str = "train") -> dict[str, torch.Tensor]:
    offset = {"train": 1000, "calibrate": 5000}[kind]
    g = torch.Generator().manual_seed(offset + 10 * step + micro)
    ids = torch.randint(0, VOCAB, (WORLD * PER_RANK, SEQ), generator=g)
    if ARCHS[arch][1] == "SEQ_CLS":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (WORLD * PER_RANK,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def rank_rows(batch: dict[str, torch.Tensor], rank: Optional[int]) -> dict[str, torch.Tensor]:
    if rank is None:
        return batch
    return {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in batch.items()}


def build(arch: str, config) -> torch.nn.Module:
    return get_peft_model(make_model(arch, seed=0), config)


def train(model, arch: str, rank: Optional[int] = None, steps: int = STEPS, accumulate: int = 1,
          on_step: Optional[Callable[[int], None]] = None) -> None:
    """AdamW on every trainable parameter; ``update_and_allocate`` once per optimizer step. ``rank``: this rank's
    rows of each global batch (None: all of them, the one-process reference)."""
    torch.manual_seed(1234)  # DPS mix draws its columns from the global generator (rank 0's, broadcast)
    tuner = find_tuner(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model.train()
    for step in range(steps):
        for micro in range(accumulate):
            loss = model(**rank_rows(global_batch(arch, step, micro), rank)).loss / accumulate
            loss.backward()
        optimizer.step()
        tuner.update_and_allocate(step)
        if on_step is not None:
            on_step(step)
        optimizer.zero_grad()
    model.eval()


def calibration_batches(arch: str, combine: str, rank: Optional[int]) -> list[dict[str, torch.Tensor]]:
    """Each rank's calibration batches, or (rank None) the union a single process measures: for "sum" the ranks'
    batches one after another, for "mean" (priming) the global batches."""
    batches = [global_batch(arch, i, kind="calibrate") for i in range(CALIBRATION_BATCHES)]
    if rank is not None:
        return [rank_rows(b, rank) for b in batches]
    if combine == "mean":
        return batches
    return [rank_rows(b, r) for b in batches for r in range(WORLD)]


def selection(model) -> dict[str, torch.Tensor]:
    """What calibration chose (and, for Learners, the primed values), as tensors."""
    tuner = find_tuner(model)
    out: dict[str, torch.Tensor] = {}
    for name, layer in tuner.tuner_layers():
        if hasattr(layer, "sparsemask_delta"):
            out[f"{name}.support"] = layer.sparsemask_delta["default"].indices.clone()
        if hasattr(layer, "learner_nodes"):
            out[f"{name}.nodes"] = layer.learner_nodes["default"].clone()
            out[f"{name}.primed"] = layer.learner_weight["default"].detach().clone()
    config = tuner.peft_config["default"]
    if getattr(config, "layer_scores", None) is not None:
        out["layers"] = torch.tensor(config.layers)
        out["layer_scores"] = torch.tensor(config.layer_scores, dtype=torch.float64)
    return out


def dps_stage_recorder(model, record: dict[str, torch.Tensor]) -> Callable[[int], None]:
    """An ``on_step`` that records, after every optimizer step, each DPS layer's stage and (in stage II) its mask."""
    tuner = find_tuner(model)

    def on_step(step: int) -> None:
        for name, layer in tuner.tuner_layers():
            if isinstance(layer, DPSLayer):
                state = layer.states["default"]
                record[f"{name}.stage.{step}"] = torch.tensor([state.stage])
                if state.mask is not None:
                    record[f"{name}.mask.{step}"] = state.mask.to(torch.uint8).cpu()

    return on_step


def reference_training(tuner_name: str, accumulate: int = 1) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The one-process run on the global batches: the model and its DPS stage record."""
    arch, config = TUNERS[tuner_name]
    model = build(arch, config())
    record: dict[str, torch.Tensor] = {}
    train(model, arch, accumulate=accumulate, on_step=dps_stage_recorder(model, record))
    return model, record


def reference_calibration(name: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """One process calibrating on the union of the ranks' batches, then training: the model and its selection."""
    arch, config, combine = CALIBRATED[name]
    model = build(arch, config())
    calibrate(model, calibration_batches(arch, combine, None))
    chosen = selection(model)
    train(model, arch, steps=2)
    return model, chosen

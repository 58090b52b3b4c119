"""Multi-process training: FSDP2, DDP through Accelerate, and calibration across ranks (2 processes, gloo, CPU).

One launch of ``dist_worker.py`` (torchrun, 2 processes) runs every scenario and writes what each rank ended with;
the tests here compute the one-process references and compare. See ``dist_scenarios.py`` for the set-up, and the
worker's docstring for why FSDP runs through torch's ``fully_shard`` rather than ``accelerator.prepare`` on CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

import dist_scenarios as S
from tiny_models import logits, make_model

HERE = Path(__file__).parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The one launch: every scenario on 2 processes."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("DIST_SCENARIOS", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(S.WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(HERE / "dist_worker.py"), str(out)]
    result = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out


def results(out: Path, rank: int) -> dict:
    return json.loads((out / f"results-rank{rank}.json").read_text())["scenarios"]


def ran(out: Path, name: str) -> list[dict]:
    """The scenario's facts on each rank; fails with the worker's error when it raised."""
    facts = [results(out, rank)[name] for rank in range(S.WORLD)]
    for rank, fact in enumerate(facts):
        assert fact["ok"], f"rank {rank}: {fact['error']}\n{fact.get('traceback', '')}"
    return facts


def rank_tensors(out: Path, name: str) -> list[dict[str, torch.Tensor]]:
    return [load_file(out / name / f"rank{rank}.safetensors") for rank in range(S.WORLD)]


def assert_same_on_every_rank(tensors: list[dict[str, torch.Tensor]]) -> None:
    first, *others = tensors
    for other in others:
        assert other.keys() == first.keys()
        for key in first:
            assert torch.equal(first[key], other[key]), key  # bit for bit


def assert_relatively_close(actual: dict, expected: dict, rtol: float, what: str) -> None:
    """Integer entries (supports, masks, nodes) exactly; float ones within ``rtol`` relative to the reference
    adapter's norm: ‖Δ‖ ≤ rtol·‖ref‖ over all float entries together, and for each entry on its own.

    Each entry is measured against the whole adapter, not its own norm: an entry whose true gradient is zero (BERT's
    key biases: softmax ignores a shift of every key) gets a rounding-noise gradient that differs with the summation
    order, and AdamW turns it into steps of ~1e-7 in both runs, of unrelated directions.
    """
    assert actual.keys() == expected.keys(), what
    floats = [k for k, v in expected.items() if v.is_floating_point()]
    scale = max(sum(expected[k].double().square().sum().item() for k in floats) ** 0.5, 1e-12)
    total = 0.0
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape and got.dtype == want.dtype, (what, key, got.shape, want.shape)
        if not want.is_floating_point():
            assert torch.equal(got, want), (what, key)
            continue
        error = (got.double() - want.double()).norm().item()
        total += error**2
        assert error <= rtol * scale, f"{what} {key}: ‖Δ‖/‖ref‖ = {error / scale:.2e} > {rtol:g}"
    assert total**0.5 <= rtol * scale, f"{what}: ‖Δ‖/‖ref‖ = {total**0.5 / scale:.2e} > {rtol:g}"


@lru_cache(maxsize=None)
def reference(tuner: str, accumulate: int = 1):
    model, record = S.reference_training(tuner, accumulate)
    adapter = {f"adapter.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return model, adapter, record


@lru_cache(maxsize=None)
def calibration_reference(name: str):
    model, chosen = S.reference_calibration(name)
    adapter = {f"adapter.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return adapter, {f"chosen.{k}": v for k, v in chosen.items()}


# ------------------------------------------------------------------------------------------------------- FSDP

FSDP_CASES = [(p, t) for p in S.POLICIES for t in S.TUNERS if (p, t) not in S.REFUSED]


@pytest.mark.parametrize("policy,tuner", FSDP_CASES, ids=[f"{p}-{t}" for p, t in FSDP_CASES])
def test_fsdp_trains_every_tuner_like_one_process(runs, policy, tuner, tmp_path):
    name = f"fsdp-{policy}-{tuner}"
    facts = ran(runs, name)
    # Sharding is really on: every frozen base parameter is a Shard(0) DTensor and each rank holds half of them.
    for fact in facts:
        assert fact["base_dtensor"] == fact["base_shard0"] == fact["base_params"] > 0, fact
        assert fact["base_local_numel"] < fact["base_numel"], fact
        assert fact["trainable_dtensor"] == fact["trainable"] > 0, fact
    tensors = rank_tensors(runs, name)
    assert_same_on_every_rank(tensors)  # adapters, supports (non-persistent buffers) and DPS masks

    ref_model, ref_adapter, ref_record = reference(tuner)
    got = tensors[0]
    # Same adapter as one process on the same global batches. fp32: they differ by summation order only (each
    # rank's half-batch mean, then FSDP's reduce-scatter average, against one mean over the global batch), which
    # AdamW carries through 4 steps to ~1e-7 relative for most tuners, and to 1.1e-5 for LayerSelect's whole GPT-2
    # block (transformers 5.24): the error sits in the attention's key bias (true gradient zero) and its query
    # and key weights, whose gradients at a near-uniform attention are small enough for rounding to flip AdamW's
    # normalised steps. A real sharding bug (a missed reduction, a wrong shard, an entry left out) would change whole
    # gradients, not their last bits, so 5e-5 still separates it from rounding. Mixed precision (bf16 parameters
    # in the forward and backward, fp32 reduction and optimizer) has no one-process twin: it is compared with the fp32 run within 20%
    # (bf16 keeps 8 bits of mantissa, and AdamW's normalised steps carry the rounding of small gradients).
    rtol = 0.2 if policy == "mp" else 5e-5
    assert_relatively_close({k: v for k, v in got.items() if k.startswith("adapter.")}, ref_adapter, rtol, name)
    if tuner.startswith("dps") and policy != "mp":
        assert_relatively_close({k: v for k, v in got.items() if ".stage." in k or ".mask." in k}, ref_record,
                                0, name)  # the same stage-II subnetworks as one process, at every switch
    if any(".mask." in k for k in got):
        assert any(v.float().mean() < 1 for k, v in got.items() if ".mask." in k)  # a real subnetwork
    moved = [k for k, v in ref_adapter.items() if v.is_floating_point() and v.abs().max() > 0]
    assert moved, "training changed nothing: the comparison would be trivial"

    # rank 0's save_pretrained from the gathered state dict: the single-process format, loadable in one process.
    saved = load_file(runs / name / "adapter" / "adapter_model.safetensors")
    ref_model.save_pretrained(tmp_path / "ref")
    expected = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    assert_relatively_close({f"adapter.{k}": v for k, v in saved.items()},
                            {f"adapter.{k}": v for k, v in expected.items()}, rtol, f"{name} (saved)")
    configs = [json.loads((d / "adapter_config.json").read_text()) for d in (runs / name / "adapter", tmp_path / "ref")]
    for config in configs:  # PEFT keeps target_modules as a set: its JSON order varies from process to process
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]
    arch = S.TUNERS[tuner][0]
    loaded = PeftModel.from_pretrained(make_model(arch, seed=0), runs / name / "adapter").eval()
    batch = S.global_batch(arch, 99)
    want = logits(ref_model.eval(), batch)
    torch.testing.assert_close(logits(loaded, batch), want, rtol=rtol * 10, atol=rtol * 10 * want.abs().max().item())


OURS = r"This FSDP setting cannot work with \w+Model: .*(ParameterDict|SparseDelta|base_layer)"
REFUSALS = {
    # a fully_shard unit on every adapter holder inside the tuner layers (ParameterDict, SparseDelta)
    **{f"refuse-inside-{t}": OURS for t in S.TUNERS},
    # the units a size-based policy with a small min_num_params picks: they reach into tuner layers
    # (not sparsemask-tiny: with one value a layer the policy picks only base layers, which SparseMask allows)
    **{f"refuse-size-{t}": OURS for t in S.TUNERS if t != "sparsemask-tiny"},
    "refuse-base-layerselect": r"This FSDP setting cannot work with LayerSelectModel: .*base_layer",
    "refuse-mp-mask-sparsemask-mask": r"mode='mask' scores .* MixedPrecisionPolicy\(param_dtype=torch.bfloat16\)",
    "refuse-merge-sparsemask": r"Cannot merge .*FSDP shards",
    "refuse-dps-schedule-checkpoint": r"save_schedule_state=True\) while FSDP shards",
    "refuse-dps-without-gradients": r"found no gradients under 2 processes.*DeepSpeed ZeRO",
    "refuse-calibrate-after-ddp": r"already prepared for data parallelism \(DistributedDataParallel\)",
    "refuse-calibrate-after-fsdp": r"already prepared for data parallelism \(fully_shard\)",
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_settings_that_cannot_work_are_refused_with_an_error_naming_them(runs, name):
    import re

    for fact in ran(runs, name):
        assert fact["refused"] is not None, f"{name} ran instead of being refused"
        assert re.search(REFUSALS[name], fact["refused"]), fact["refused"]


# -------------------------------------------------------------------------------------------- DDP (Accelerate)


@pytest.mark.parametrize("tuner,accumulate", [("bitfit", 1), ("dps", 1), ("dps", 2), ("dps-mix", 1), ("dps-mix", 2)])
def test_ddp_through_accelerate_matches_one_process_and_dps_ranks_agree_at_every_stage(runs, tuner, accumulate):
    name = f"ddp-{tuner}-acc{accumulate}"
    facts = ran(runs, name)
    assert all(f["wrapped"] == "DistributedDataParallel" for f in facts)
    # update_and_allocate ran once per optimizer step: after the last micro-batch of each.
    assert facts[0]["updates_after_micro_batch"] == [accumulate * (s + 1) - 1 for s in range(S.STEPS)]
    tensors = rank_tensors(runs, name)
    assert_same_on_every_rank(tensors)  # adapters, and every rank's DPS stage and mask after every step
    _, ref_adapter, ref_record = reference(tuner, accumulate)
    got = tensors[0]
    assert_relatively_close({k: v for k, v in got.items() if k.startswith("adapter.")}, ref_adapter, 1e-5, name)
    if tuner.startswith("dps"):
        # DPS scores come from the DDP-averaged gradient: the subnetworks a single process picks on the global
        # batches (with accumulation: all of a step's micro-batches), switched at the same optimizer steps.
        assert any(".mask." in k for k in ref_record)
        assert_relatively_close({k: v for k, v in got.items() if ".stage." in k or ".mask." in k}, ref_record, 0, name)


# ------------------------------------------------------------------------------------------------ calibration

CALIBRATION_CASES = [(e, n) for e in ("ddp", "fsdp") for n in S.CALIBRATED]


@pytest.mark.parametrize("engine,name", CALIBRATION_CASES, ids=[f"{e}-{n}" for e, n in CALIBRATION_CASES])
def test_calibration_on_different_data_per_rank_selects_the_same_as_one_process_on_the_union(runs, engine, name):
    scenario = f"calibrate-{engine}-{name}"
    facts = ran(runs, scenario)
    priming = getattr(S.CALIBRATED[name][1](), "priming_steps", None)
    assert all(f["batches_used"] == (priming or S.CALIBRATION_BATCHES) for f in facts)
    assert all(f["wrapped"] == "DistributedDataParallel" if engine == "ddp" else f["wrapped"] > 0 for f in facts)
    tensors = rank_tensors(runs, scenario)
    assert_same_on_every_rank(tensors)  # the selection bit for bit, and the adapter trained from it
    ref_adapter, ref_chosen = calibration_reference(name)
    got = tensors[0]
    chosen = {k: v for k, v in got.items() if k.startswith("chosen.")}
    # Supports, chosen blocks and Learner nodes exactly; measured scores and primed values up to float rounding
    # (the same sums in another order).
    assert_relatively_close(chosen, ref_chosen, 1e-5, scenario)
    assert_relatively_close({k: v for k, v in got.items() if k.startswith("adapter.")}, ref_adapter, 1e-5, scenario)

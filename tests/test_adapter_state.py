"""Per-adapter state and the inputs PEFT's own generic tests and a held-out probe found wanting: every per-adapter entry
is freed by ``delete_adapter`` (so an adapter deleted and added again under its name starts clean), the tuner layers
expose what PEFT expects of wrapped layers, and bad checkpoints, settings and merges fail clearly and change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import AuxiliaryTrainingWrapper
from safetensors.torch import load_file, save_file

from peft_sparse import DPSConfig, LearnerConfig, SparseMaskConfig, calibrate, requires_calibration
from peft_sparse.tuners.base import SparseTunerLayer

from test_common import TUNERS, build, config_for, train
from tiny_models import assert_unchanged, logits, make_batch, make_model, snapshot


def entries_of(model, adapter: str) -> list[str]:
    """Every place in a tuner layer or the tuner model that still holds something keyed by ``adapter``: registered
    containers, plain dicts and sets among the attributes (so state PEFT does not know about is found too)."""
    found = []
    tuner = model.base_model
    holders = [("tuner", tuner)] + [(n, m) for n, m in model.named_modules() if isinstance(m, SparseTunerLayer)]
    for where, module in holders:
        for attribute, value in vars(module).items():
            if attribute in ("peft_config", "_modules", "_parameters", "_buffers"):
                continue
            if isinstance(value, (dict, set)) and adapter in value:
                found.append(f"{where}.{attribute}")
        for attribute, value in getattr(module, "_modules", {}).items():
            if hasattr(value, "keys") and adapter in value.keys():
                found.append(f"{where}.{attribute}")
    return found


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_delete_frees_every_per_adapter_entry_and_the_name_can_be_reused(tuner, arch):
    model, reference = build(tuner, arch)
    model.add_adapter("extra", config_for(tuner, arch))
    model.set_adapter("extra")
    if requires_calibration(model):
        calibrate(model, [make_batch(arch, seed=s) for s in (5, 6)])
    train(model, arch)
    assert entries_of(model, "extra")
    model.set_adapter("default")
    model.delete_adapter("extra")
    assert entries_of(model, "extra") == []
    model.add_adapter("extra", config_for(tuner, arch))
    model.set_adapter("extra")
    if TUNERS[tuner][1]:
        assert requires_calibration(model)  # a fresh adapter, not the deleted one's selection
        calibrate(model, [make_batch(arch, seed=s) for s in (7, 8)])
    batch = make_batch(arch)
    if TUNERS[tuner][2]:  # a fresh adapter is a no-op again (no values left over from the deleted one)
        with torch.no_grad():
            torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    before = logits(model, batch)
    train(model, arch)
    assert not torch.allclose(logits(model, batch), before)


def test_a_gradient_adapter_deleted_and_added_again_as_random_trains_without_calibration():
    model = get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS", density=0.05,
                                                                selection="gradient"))
    model.add_adapter("b", SparseMaskConfig(task_type="SEQ_CLS", density=0.05, selection="gradient"))
    model.delete_adapter("b")
    model.add_adapter("b", SparseMaskConfig(task_type="SEQ_CLS", density=0.05, selection="random"))
    model.set_adapter("b")
    assert not requires_calibration(model)
    model.train()
    model(**make_batch("bert")).loss.backward()  # no CalibrationRequiredError


def test_deleting_a_dps_adapter_frees_its_stage_scores():
    config = DPSConfig(task_type="SEQ_CLS", total_step=8, update_ratio=0.25)
    model = get_peft_model(make_model("bert"), config)
    model.add_adapter("b", copy.deepcopy(config))
    model.set_adapter("b")
    train(model, "bert", steps=1)
    layers = [m for m in model.modules() if isinstance(m, SparseTunerLayer)]
    assert all(layer.states["b"].score is not None for layer in layers)
    model.set_adapter("default")
    model.delete_adapter("b")
    assert all("b" not in layer.states and "b" not in layer.schedules for layer in layers)


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_every_tuner_layer_exposes_in_and_out_features(tuner):
    model, _ = build(tuner, "gpt2")
    layers = [m for m in model.modules() if isinstance(m, SparseTunerLayer)]
    assert layers
    for layer in layers:
        base = layer.get_base_layer()
        assert isinstance(layer.in_features, int) and isinstance(layer.out_features, int), type(base).__name__
        if hasattr(base, "nf"):  # GPT-2's Conv1D: (in, out) storage
            assert (layer.in_features, layer.out_features) == (base.nx, base.nf)


@pytest.mark.parametrize("tuner", ["sparsemask", "dps", "bitfit"])
def test_low_cpu_mem_usage_is_refused_and_changes_nothing(tuner, tmp_path):
    model, _ = build(tuner, "bert")
    model.save_pretrained(tmp_path)
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        get_peft_model(base, config_for(tuner, "bert"), low_cpu_mem_usage=True)
    assert_unchanged(base, before)
    with pytest.raises(ValueError, match="low_cpu_mem_usage"):
        PeftModel.from_pretrained(base, tmp_path, low_cpu_mem_usage=True)
    assert_unchanged(base, before)
    loaded = PeftModel.from_pretrained(base, tmp_path)  # the default still loads
    assert isinstance(loaded, PeftModel)


@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-mask", "dps", "bitfit", "learner"])
@pytest.mark.parametrize("how", ["merge_and_unload", "merge_adapter"])
def test_safe_merge_with_a_nan_in_the_last_layer_merges_nothing(tuner, how):
    model, _ = build(tuner, "bert")
    train(model, "bert")
    layers = [m for m in model.modules() if isinstance(m, SparseTunerLayer)]
    with torch.no_grad():
        next(t for t in layers[-1]._adapter_tensors("default") if t.numel()).view(-1)[0] = float("nan")
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".base_layer." in n}
    with pytest.raises(ValueError, match="NaN"):
        if how == "merge_and_unload":
            model.merge_and_unload(safe_merge=True)
        else:
            model.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in layers)
    for name, value in base_weights.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_dps_scope_model_takes_a_second_adapter_saves_loads_and_deletes(tmp_path):
    config = DPSConfig(task_type="SEQ_CLS", total_step=6, update_ratio=0.34, scope="model")
    model = get_peft_model(make_model("bert"), config)
    model.add_adapter("b", copy.deepcopy(config))
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]
    assert wrappers
    nested = [n for n, m in wrappers if any(isinstance(s, AuxiliaryTrainingWrapper) for s in m.original_module.modules())]
    assert nested == []
    assert all(not p.requires_grad for _, m in wrappers for p in m.original_module.parameters())
    model.set_adapter("b")
    train(model, "bert")
    batch = make_batch("bert")
    trained = logits(model, batch)
    model.save_pretrained(tmp_path)  # both adapters: default/, b/
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path / "b", adapter_name="b")
    loaded.load_adapter(tmp_path, adapter_name="default")
    loaded.set_adapter("b")
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)
    model.delete_adapter("b")
    assert model.active_adapters == ["default"]
    for name, wrapper in wrappers:
        assert "b" not in wrapper.modules_to_save and wrapper.active_adapters == ["default"], name


def test_learner_modules_that_are_no_ffn_pair_are_refused_at_get_peft_model():
    base = make_model("bert")
    before = snapshot(base)
    config = LearnerConfig(task_type="SEQ_CLS", up_modules=["attention.self.query"], down_module="output.dense",
                           priming_steps=0)
    with pytest.raises(ValueError, match="do not form an FFN"):
        get_peft_model(base, config)
    assert_unchanged(base, before)


def _saved_with(tmp_path, key_part: str, change) -> None:
    """Rewrite the saved adapter's entries whose key contains ``key_part`` with ``change(tensor)``."""
    path = tmp_path / "adapter_model.safetensors"
    entries = load_file(path)
    touched = {k: change(v) for k, v in entries.items() if key_part in k}
    assert touched
    entries.update(touched)
    save_file(entries, path)


@pytest.mark.parametrize(
    "config, key_part, change, message",
    [
        (dict(mode="mask", sparsity=0.01), ".pruned", lambda t: torch.cat([t, torch.tensor([30000], dtype=t.dtype)]),
         "outside"),
        (dict(density=0.05), ".support", lambda t: t.float(), "torch.float32"),
        (dict(density=0.05), ".shape", lambda t: t.float(), "torch.float32"),
    ],
    ids=["mask-index-out-of-range", "float-support", "float-shape"],
)
def test_bad_compact_entries_are_refused_and_change_nothing(tmp_path, config, key_part, change, message):
    model = get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS", **config))
    train(model, "bert")
    model.save_pretrained(tmp_path)
    _saved_with(tmp_path, key_part, change)
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)


def test_a_mask_loaded_to_train_starts_as_saved_and_can_change(tmp_path):
    config = SparseMaskConfig(task_type="SEQ_CLS", mode="mask", sparsity=0.1)
    model = get_peft_model(make_model("bert"), config)
    train(model, "bert", lr=0.2)
    batch = make_batch("bert")
    trained = logits(model, batch)
    model.save_pretrained(tmp_path)

    frozen = PeftModel.from_pretrained(make_model("bert"), tmp_path)  # inference: candidates are the pruned entries
    torch.testing.assert_close(logits(frozen, batch), trained, rtol=0, atol=0)
    layer = next(m for m in frozen.modules() if isinstance(m, SparseTunerLayer))
    assert layer.sparsemask_delta["default"].indices.numel() == layer.sparsemask_settings["default"].num_pruned

    trainable = PeftModel.from_pretrained(make_model("bert"), tmp_path, is_trainable=True)
    torch.testing.assert_close(logits(trainable, batch), trained, rtol=0, atol=0)
    layers = [m for m in trainable.modules() if isinstance(m, SparseTunerLayer)]
    masks = [set(m.pruned_indices("default").tolist()) for m in layers]
    assert all(m.sparsemask_delta["default"].indices.numel() > m.sparsemask_settings["default"].num_pruned
               for m in layers)
    train(trainable, "bert", steps=5, lr=0.5)
    assert any(set(m.pruned_indices("default").tolist()) != before for m, before in zip(layers, masks))

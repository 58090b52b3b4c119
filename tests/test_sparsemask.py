import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparse import CalibrationRequiredError, SparseMaskConfig, calibrate, requires_calibration
from peft_sparse.modules import dense_weight
from peft_sparse.tuners.sparsemask import SparseMaskLayer

from tiny_models import (
    ARCHS, assert_unchanged, logits, make_batch, make_model, snapshot, train_steps, trainable_names,
)


def sparsemask(arch, **kwargs):
    base = make_model(arch)
    reference = copy.deepcopy(base)
    return get_peft_model(base, SparseMaskConfig(task_type=ARCHS[arch][1], **kwargs)), reference


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseMaskLayer)]


MODES = {
    "delta": dict(density=0.05),
    "delta-random": dict(density=0.05, selection="random"),
    "delta-block": dict(density=0.1, block_size=4),
    "mask": dict(mode="mask", sparsity=0.2),
}


@pytest.mark.parametrize("mode", MODES)
def test_defaults_wrap_every_block_linear(arch, mode):
    """The lifecycle (init, train, save/load, merge, disable) is test_common.py's; here: what is wrapped, and that
    training never writes into the frozen weights."""
    model, reference = sparsemask(arch, **MODES[mode])
    batch = make_batch(arch)
    wrapped = layers(model)
    assert len(wrapped) == {"bert": 6, "gpt2": 4, "llama": 7}[arch] * 3
    if mode == "mask":  # the initial mask prunes the lowest-magnitude entries
        assert (logits(model, batch) - logits(reference, batch)).abs().max() > 0
    base_weights = {n: dense_weight(m.get_base_layer()).clone() for n, m in wrapped}
    train_steps(model, batch, lr=5e-2)
    for n, m in wrapped:
        assert torch.equal(dense_weight(m.get_base_layer()), base_weights[n])


def test_delta_trains_only_values_with_memory_in_proportion(arch):
    model, _ = sparsemask(arch, density=0.05)
    for _, layer in layers(model):
        numel = layer.out_features * layer.in_features
        delta = layer.sparsemask_delta["default"]
        assert delta.values.numel() == max(1, round(0.05 * numel))
        assert delta.indices.numel() == delta.values.numel() and not delta.indices.is_floating_point()
    names = trainable_names(model)
    assert all(n.endswith("sparsemask_delta.default.values") or "modules_to_save" in n for n in names)
    model.train()
    model(**make_batch(arch)).loss.backward()
    for name, p in model.named_parameters():
        if "sparsemask" in name:
            assert p.grad is not None and p.grad.shape == p.shape  # k entries, not weight-sized
        elif "modules_to_save" not in name:
            assert p.grad is None, name  # no dense weight gradient anywhere


def test_values_gradient_equals_the_dense_gradient_at_the_support():
    model, _ = sparsemask("llama", density=0.1)
    batch = make_batch("llama")
    model.train()
    model(**batch).loss.backward()
    # Reference: the dense gradient of the same (zero-increment) weights, sampled at the support.
    reference = make_model("llama").train()
    reference.requires_grad_(True)
    reference(**batch).loss.backward()
    for name, layer in layers(model):
        delta = layer.sparsemask_delta["default"]
        dense_grad = reference.get_submodule(name.removeprefix("base_model.model.")).weight.grad
        torch.testing.assert_close(delta.values.grad, dense_grad.flatten()[delta.indices], rtol=1e-4, atol=1e-6)


def test_magnitude_support_holds_the_largest_weights():
    model, _ = sparsemask("bert", density=0.05)
    for _, layer in layers(model):
        w = dense_weight(layer.get_base_layer()).abs().flatten()
        support = layer.sparsemask_delta["default"].indices
        outside = torch.ones_like(w, dtype=torch.bool)
        outside[support] = False
        assert w[support].min() >= w[outside].max()


def test_random_support_is_seeded_and_drawn_per_layer():
    first, _ = sparsemask("bert", density=0.05, selection="random", seed=3)
    again, _ = sparsemask("bert", density=0.05, selection="random", seed=3)
    other, _ = sparsemask("bert", density=0.05, selection="random", seed=4)
    supports = [m.sparsemask_delta["default"].indices for _, m in layers(first)]
    assert all(torch.equal(a, m.sparsemask_delta["default"].indices) for a, (_, m) in zip(supports, layers(again)))
    assert not all(torch.equal(a, m.sparsemask_delta["default"].indices) for a, (_, m) in zip(supports, layers(other)))
    # query, key and value have the same shape but their own supports (unlike PEFT's SHiRA)
    q, k = supports[0], supports[1]
    assert q.shape == k.shape and not torch.equal(q, k)


def test_block_support_is_made_of_whole_blocks_clipped_at_edges():
    base = make_model("bert")  # intermediate.dense is 24x16: block 5 divides neither side
    model = get_peft_model(base, SparseMaskConfig(task_type="SEQ_CLS", density=0.2, block_size=5))
    layer = dict(layers(model))["base_model.model.bert.encoder.layer.0.intermediate.dense"]
    indices = layer.sparsemask_delta["default"].indices
    rows, cols = indices // 16, indices % 16
    blocks = set(zip((rows // 5).tolist(), (cols // 5).tolist()))
    assert len(blocks) == round(0.2 * 5 * 4)  # grid of ceil(24/5) x ceil(16/5) blocks
    for br, bc in blocks:  # every entry of each chosen block that lies inside the weight
        size = (min(5, 24 - 5 * br)) * (min(5, 16 - 5 * bc))
        assert sum(1 for r, c in zip(rows.tolist(), cols.tolist()) if (r // 5, c // 5) == (br, bc)) == size


def test_gradient_selection_needs_calibrate_and_picks_the_largest_squared_gradients(arch):
    model, reference = sparsemask(arch, density=0.05, selection="gradient")
    batch = make_batch(arch)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    model.train()
    with pytest.raises(CalibrationRequiredError):
        model(**batch)
    calibration = [make_batch(arch, seed=s) for s in range(2)]
    # Reference Fisher: Σ over batches of the squared weight gradient.
    fisher = {}
    reference.train()
    for b in calibration:
        reference.zero_grad()
        for p in reference.parameters():
            p.requires_grad_(True)
        reference(**b).loss.backward()
        for name, module in reference.named_modules():
            if hasattr(module, "weight") and module.weight.grad is not None:
                g = module.weight.grad
                g = g.T if type(module).__name__ == "Conv1D" else g  # (in, out) storage
                fisher[name] = fisher.get(name, 0) + g.square()
    model.eval()
    calibrate(model, calibration)
    assert not requires_calibration(model) and all(p.grad is None for p in model.parameters())
    for name, layer in layers(model)[:4]:
        f = fisher[name.removeprefix("base_model.model.")].flatten()
        support = layer.sparsemask_delta["default"].indices
        chosen = f[support]
        outside = torch.ones_like(f, dtype=torch.bool)
        outside[support] = False
        assert chosen.min() >= f[outside].max() * (1 - 1e-4)
    train_steps(model, batch)
    assert not torch.allclose(logits(model, batch), logits(reference.eval(), batch))


def test_mask_mode_zeroes_a_sparsity_fraction_and_learns_it():
    model, reference = sparsemask("bert", mode="mask", sparsity=0.25, mask_candidates=2.0)
    batch = make_batch("bert")
    before = {n: m.pruned_indices("default").sort().values for n, m in layers(model)}
    for name, layer in layers(model):
        numel = layer.out_features * layer.in_features
        assert before[name].numel() == round(0.25 * numel)
        assert layer.sparsemask_delta["default"].values.numel() == min(numel, 2 * round(0.25 * numel))
    # The forward equals the base model with W ⊙ M.
    masked = copy.deepcopy(reference)
    for name, layer in layers(model):
        w = masked.get_submodule(name.removeprefix("base_model.model.")).weight
        with torch.no_grad():
            w.view(-1)[before[name]] = 0
    torch.testing.assert_close(logits(model, batch), logits(masked, batch), rtol=0, atol=0)
    train_steps(model, batch, steps=5, lr=0.5)
    after = {n: m.pruned_indices("default").sort().values for n, m in layers(model)}
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the mask was learned
    assert all(after[n].numel() == before[n].numel() for n in before)  # at the target sparsity


def test_storage_is_compact(tmp_path):
    model, _ = sparsemask("llama", density=0.05)
    model.save_pretrained(tmp_path / "fp32")
    model.peft_config["default"].save_dtype = "bfloat16"
    model.save_pretrained(tmp_path / "bf16")
    trained = sum(m.sparsemask_delta["default"].values.numel() for _, m in layers(model))
    for folder, limit in (("fp32", 6.0), ("bf16", 4.0)):
        saved = load_file(tmp_path / folder / "adapter_model.safetensors")
        per_entry = sum(v.numel() * v.element_size() for k, v in saved.items() if not k.endswith(".shape")) / trained
        assert per_entry <= limit, (folder, per_entry)
        # plus a constant 8 bytes per layer: the weight's shape, so a checkpoint cannot load onto another
        assert all(v.numel() * v.element_size() == 8 for k, v in saved.items() if k.endswith(".shape"))
        assert all(k.endswith((".values", ".support", ".shape")) for k in saved)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path / "bf16")
    values = [m.sparsemask_delta["default"].values for _, m in layers(loaded)]
    assert values[0].dtype == torch.float32  # trained dtype restored after loading bf16 storage

    mask, _ = sparsemask("llama", mode="mask", sparsity=0.3)
    mask.save_pretrained(tmp_path / "mask")
    saved = load_file(tmp_path / "mask" / "adapter_model.safetensors")
    weight_entries = sum(m.out_features * m.in_features for _, m in layers(mask))
    assert sum(v.numel() for v in saved.values()) <= weight_entries / 8 + 8 * len(saved)  # ~1 bit an entry
    small, _ = sparsemask("llama", mode="mask", sparsity=0.01)
    small.save_pretrained(tmp_path / "small")
    assert all(k.endswith((".pruned", ".shape")) for k in load_file(tmp_path / "small" / "adapter_model.safetensors"))


def test_checkpoint_support_sizes_differing_from_the_config_load(tmp_path):
    model, _ = sparsemask("gpt2", density=0.05)
    batch = make_batch("gpt2")
    train_steps(model, batch)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["density"] = 0.2  # a fresh model built from this config has 4x larger supports
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(make_model("gpt2"), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)



@pytest.mark.parametrize("block_size", [1, 4])
def test_loading_installs_the_saved_support_without_selecting_one(tmp_path, monkeypatch, block_size):
    """``PeftModel.from_pretrained`` / ``load_adapter`` take the support from the checkpoint: no magnitude selection
    runs first (on SmolLM2 it was two thirds of a load). A fresh adapter from the loaded config still selects."""
    from peft_sparse.tuners.sparsemask import selection

    model, _ = sparsemask("llama", density=0.05, block_size=block_size)
    batch = make_batch("llama")
    train_steps(model, batch)
    model.save_pretrained(tmp_path)
    calls = []
    original = selection.top_support
    monkeypatch.setattr(selection, "top_support", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)
    loaded.load_adapter(tmp_path, adapter_name="again")
    assert not calls
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    loaded.set_adapter("again")
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    for name, layer in loaded.named_modules():
        if isinstance(layer, SparseMaskLayer):
            assert not layer.sparsemask_settings["default"].pending, name
    fresh = get_peft_model(make_model("llama"), SparseMaskConfig.from_pretrained(tmp_path))
    assert calls  # building from the config alone still selects its support
    assert not requires_calibration(fresh)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"`density` must be a fraction in \(0, 1\)"),
        ({"density": 1.0}, r"`density` must be a fraction in \(0, 1\)"),
        ({"mode": "mask", "sparsity": 1.5}, r"`sparsity` must be a fraction"),
        ({"block_size": 0}, "block_size"),
        ({"mode": "prune"}, "Unknown mode"),
        ({"selection": "fisher"}, "Unknown selection"),
        ({"mode": "mask", "selection": "random"}, "applies to mode='delta' only"),
        ({"mask_candidates": 0.5}, "mask_candidates"),
        ({"save_dtype": "int8"}, "save_dtype"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseMaskConfig(**kwargs)


def test_bad_targets_leave_the_model_untouched():
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match="cannot wrap"):
        get_peft_model(base, SparseMaskConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]))
    assert_unchanged(base, before)


def test_loading_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    model, _ = sparsemask("bert", density=0.05)
    model.save_pretrained(tmp_path)
    wider = make_model("bert")
    wider.bert.encoder.layer[0].intermediate.dense = torch.nn.Linear(16, 30)
    wider.bert.encoder.layer[0].output.dense = torch.nn.Linear(30, 16)
    before = snapshot(wider)
    with pytest.raises(ValueError, match="does not fit"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert_unchanged(wider, before)


def test_mask_mode_cast_whole_to_bfloat16_trains_and_saves_the_mask_it_trains(tmp_path):
    # Only a cast in the forward alone (FSDP mixed precision) is refused; a model cast as a whole keeps its scores
    # in one dtype for training and saving.
    model = get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS", mode="mask", sparsity=0.1))
    model = model.to(torch.bfloat16)
    train_steps(model, make_batch("bert"), steps=2)
    layer = next(m for m in model.modules() if hasattr(m, "sparsemask_settings"))
    assert layer.sparsemask_settings["default"].score_dtype == torch.bfloat16
    expected = logits(model, make_batch("bert"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("bert").to(torch.bfloat16), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, make_batch("bert")), expected)

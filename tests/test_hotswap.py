"""Hot-swap (``peft_sparse.hotswap_adapter``): an adapter's tensors replaced in place by a saved adapter's, on unmerged
and merged models, exactly (the swapped model answers as the saved adapter loaded fresh), with supports and Learner
nodes of other positions and sizes; 20 swaps on a merged model leave the base bit-equal to the loaded one; a
checkpoint of another method, config, targets or shape is refused naming the difference, the model unchanged."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

from peft_sparse import (
    DPSConfig,
    LayerSelectConfig,
    LearnerConfig,
    SparseMaskConfig,
    hotswap_adapter,
    hotswap_adapter_from_state_dict,
)
from peft_sparse.tuners.base import SparseTunerLayer

from many_adapters import load_4bit, save_tiny_llama_for_4bit
from test_common import TUNERS, build, config_for, train
from test_exact_merge import assert_bit_equal, base_tensors
from tiny_models import assert_unchanged, logits, make_batch, make_model, snapshot


def saved_adapter(tmp_path, name: str, arch: str, config, steps: int = 3, lr: float = 5e-2, tuner: str = ""):
    """A trained adapter saved under ``tmp_path/name`` (built as ``build`` builds it, calibrated where needed)."""
    if tuner:
        model, _ = build(tuner, arch)
    else:
        model = get_peft_model(make_model(arch), config)
    train(model, arch, steps=steps, lr=lr)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def fresh(arch: str, path, merged: bool = False):
    model = PeftModel.from_pretrained(make_model(arch), path).eval()
    if merged:
        model.base_model.merge_adapter()
    return model


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_a_swap_answers_as_the_saved_adapter_and_20_swaps_leave_no_drift(tuner, arch, tmp_path):
    a = saved_adapter(tmp_path, "a", arch, None, steps=2, lr=3e-2, tuner=tuner)
    b = saved_adapter(tmp_path, "b", arch, None, steps=4, lr=6e-2, tuner=tuner)
    batch = make_batch(arch)
    expected = {"a": logits(fresh(arch, a), batch), "b": logits(fresh(arch, b), batch)}
    merged_expected = {"a": logits(fresh(arch, a, merged=True), batch), "b": logits(fresh(arch, b, merged=True), batch)}
    assert not torch.allclose(expected["a"], expected["b"], atol=1e-4)

    model = fresh(arch, a)
    loaded = base_tensors(model)
    hotswap_adapter(model, b)  # unmerged
    torch.testing.assert_close(logits(model, batch), expected["b"], rtol=0, atol=0)
    model.base_model.merge_adapter()
    for swap in range(20):  # merged: restore the old adapter's entries, merge the new one's
        name = "a" if swap % 2 == 0 else "b"
        hotswap_adapter(model, {"a": a, "b": b}[name], adapter_name="default")
        if swap in (0, 1, 19):
            torch.testing.assert_close(logits(model, batch), merged_expected[name], rtol=0, atol=0)
    model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)
    torch.testing.assert_close(logits(model, batch), expected["b"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("config_a", "config_b"),
    [
        (SparseMaskConfig(density=0.05), SparseMaskConfig(density=0.12, selection="random", seed=3)),
        (SparseMaskConfig(mode="mask", sparsity=0.1), SparseMaskConfig(mode="mask", sparsity=0.3)),
        (LearnerConfig(learner_ratio=0.25, priming_steps=0), LearnerConfig(learner_ratio=0.5, priming_steps=0)),
    ],
    ids=["sparsemask-other-support", "mask-other-count", "learner-other-nodes"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_supports_and_nodes_of_other_positions_and_sizes(config_a, config_b, merged, tmp_path):
    config_a, config_b = copy.deepcopy(config_a), copy.deepcopy(config_b)
    config_a.task_type = config_b.task_type = "CAUSAL_LM"
    a = saved_adapter(tmp_path, "a", "llama", config_a)
    b = saved_adapter(tmp_path, "b", "llama", config_b, steps=4)
    batch = make_batch("llama")
    model = fresh("llama", a)
    loaded = base_tensors(model)
    if merged:
        model.base_model.merge_adapter()
    sizes_before = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad or "default" in n}
    hotswap_adapter(model, b)
    sizes_after = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad or "default" in n}
    assert sizes_before != sizes_after  # the swap changed the supports' (or nodes') sizes
    torch.testing.assert_close(logits(model, batch), logits(fresh("llama", b, merged=merged), batch), rtol=0, atol=0)
    hotswap_adapter(model, a)
    if merged:
        model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)


def test_fixed_shape_tensors_keep_their_identity(tmp_path):
    """DPS, BitFit and LayerSelect tensors are copied in place (optimizers and compiled graphs keep their references)."""
    config = DPSConfig(task_type="CAUSAL_LM", total_step=6, update_ratio=0.34)
    a = saved_adapter(tmp_path, "a", "llama", copy.deepcopy(config))
    b = saved_adapter(tmp_path, "b", "llama", copy.deepcopy(config), steps=4)
    model = fresh("llama", a)
    before = {n: p for n, p in model.named_parameters() if "dps_delta" in n}
    hotswap_adapter(model, b)
    after = {n: p for n, p in model.named_parameters() if "dps_delta" in n}
    assert before.keys() == after.keys() and all(before[n] is after[n] for n in before)


def test_peft_style_state_dict_with_the_adapter_name_inserted(tmp_path):
    a = saved_adapter(tmp_path, "a", "bert", None, tuner="sparsemask")
    b = saved_adapter(tmp_path, "b", "bert", None, steps=5, tuner="sparsemask")
    model = fresh("bert", a)
    model.load_adapter(a, adapter_name="second")
    state_dict = _insert_adapter_name_into_state_dict(load_peft_weights(b, device="cpu"), "second", "sparsemask_")
    config = copy.deepcopy(model.peft_config["second"])
    hotswap_adapter_from_state_dict(model, state_dict, "second", config, parameter_prefix="sparsemask_")
    model.set_adapter("second")
    batch = make_batch("bert")
    torch.testing.assert_close(logits(model, batch), logits(fresh("bert", b), batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- refusals


def refused(model, path, match: str) -> None:
    before = snapshot(model)
    merged = {n: list(m.merged_adapters) for n, m in model.named_modules() if isinstance(m, SparseTunerLayer)}
    config = copy.deepcopy(model.peft_config["default"])
    with pytest.raises(ValueError, match=match):
        hotswap_adapter(model, path)
    assert_unchanged(model, before)
    assert merged == {n: list(m.merged_adapters) for n, m in model.named_modules() if isinstance(m, SparseTunerLayer)}
    assert model.peft_config["default"].to_dict() == config.to_dict()


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_bad_checkpoints_are_refused_naming_the_difference_and_change_nothing(merged, tmp_path):
    ours = saved_adapter(tmp_path, "ours", "llama", SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    model = fresh("llama", ours, merged=merged)
    batch = make_batch("llama")
    before = logits(model, batch)

    dps = saved_adapter(tmp_path, "dps", "llama", DPSConfig(task_type="CAUSAL_LM", total_step=4, update_ratio=0.5))
    refused(model, dps, "a dps adapter into 'default', a sparsemask adapter")
    mask = saved_adapter(tmp_path, "mask", "llama", SparseMaskConfig(task_type="CAUSAL_LM", mode="mask"))
    refused(model, mask, "mode is 'delta', the saved adapter's 'mask'")
    blocks = saved_adapter(tmp_path, "blocks", "llama", SparseMaskConfig(task_type="CAUSAL_LM", block_size=4, density=0.2))
    refused(model, blocks, "block_size is 1, the saved adapter's 4")
    fewer = saved_adapter(tmp_path, "fewer", "llama",
                          SparseMaskConfig(task_type="CAUSAL_LM", density=0.05, target_modules=["q_proj", "v_proj"]))
    refused(model, fewer, "no entries for modules that adapter 'default' trains: model.layers.0.self_attn.k_proj")
    wider = get_peft_model(make_model("llama", intermediate_size=32), SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    wider.save_pretrained(tmp_path / "wider")
    refused(model, tmp_path / "wider", r"mlp\.\w+_proj \(\d+, \d+\): .*saved from a \(\d+, \d+\) weight, the model.s is")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text((ours / "adapter_config.json").read_text())
    (truncated / "adapter_model.safetensors").write_bytes((ours / "adapter_model.safetensors").read_bytes()[:300])
    refused(model, truncated, "Cannot read the adapter weights")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        hotswap_adapter(model, ours, adapter_name="nope")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['revison'\]"):  # misspelt: not ignored
        hotswap_adapter(model, blocks, revison="main")
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)


def test_layerselect_of_other_blocks_is_refused(tmp_path):
    one = saved_adapter(tmp_path, "one", "gpt2", LayerSelectConfig(task_type="CAUSAL_LM", layers=[1]))
    two = saved_adapter(tmp_path, "two", "gpt2", LayerSelectConfig(task_type="CAUSAL_LM", layers=[2]))
    model = fresh("gpt2", one)
    refused(model, two, r"entries for modules that adapter 'default' does not train: transformer\.h\.2\.")


def test_a_lora_model_is_pointed_to_peft(tmp_path):
    from peft import LoraConfig

    model = get_peft_model(make_model("llama"), LoraConfig(task_type="CAUSAL_LM", r=2))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="peft.utils.hotswap.hotswap_adapter"):
        hotswap_adapter(model, tmp_path / "lora")


# ------------------------------------------------------------------------------------------------------ 4-bit


@pytest.fixture(scope="module")
def llama_4bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_tiny_llama_for_4bit(tmp_path_factory.mktemp("tiny-llama-4bit"))


@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-mask", "bitfit", "learner", "dps"])
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_swap_on_a_4bit_base(llama_4bit_dir, tuner, merged, tmp_path):
    paths = []
    for name, steps in (("a", 2), ("b", 4)):
        model = get_peft_model(load_4bit(llama_4bit_dir), config_for(tuner, "llama"))
        train(model, "llama", steps=steps, lr=2e-2)
        model.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)

    def loaded(path):
        model = PeftModel.from_pretrained(load_4bit(llama_4bit_dir), path)
        if merged:
            model.base_model.merge_adapter()
        return model

    batch = make_batch("llama")

    def forward(model):  # train mode: bitsandbytes' CPU eval path repacks 4-bit weights (notes/peft-internals.md)
        model.train()
        with torch.no_grad():
            return model(input_ids=batch["input_ids"]).logits

    model = PeftModel.from_pretrained(load_4bit(llama_4bit_dir), paths[0])
    before = base_tensors(model)
    if merged:
        model.base_model.merge_adapter()
    hotswap_adapter(model, paths[1])
    torch.testing.assert_close(forward(model), forward(loaded(paths[1])), rtol=0, atol=0)
    hotswap_adapter(model, paths[0])
    if merged:
        model.base_model.unmerge_adapter()
    assert_bit_equal(model, before)


def test_a_merged_swap_on_the_same_support_is_one_scatter_per_layer(tmp_path, monkeypatch):
    """SparseMask adapters of one base share their magnitude supports: a merged swap then rewrites the saved entries
    plus the new values (merging.rewrite), with no restore and no new merge; other supports take restore + merge."""
    from peft_sparse.tuners import merging

    same = [saved_adapter(tmp_path, f"same{k}", "llama", SparseMaskConfig(task_type="CAUSAL_LM"), steps=2 + k)
            for k in range(2)]
    other = saved_adapter(tmp_path, "other", "llama", SparseMaskConfig(task_type="CAUSAL_LM", selection="random"))
    rewrites = []
    monkeypatch.setattr(merging, "rewrite", lambda *a, _f=merging.rewrite: rewrites.append(1) or _f(*a))
    model = fresh("llama", same[0])
    loaded = base_tensors(model)
    model.base_model.merge_adapter()
    layers = [m for m in model.modules() if isinstance(m, SparseTunerLayer)]
    supports = [layer.sparsemask_delta["default"].indices for layer in layers]
    hotswap_adapter(model, same[1])
    assert len(rewrites) == len(layers)
    # the saved support equals the installed one: not decoded again, the same tensor (and its cached layout) kept
    assert all(layer.sparsemask_delta["default"].indices is s for layer, s in zip(layers, supports))
    batch = make_batch("llama")
    torch.testing.assert_close(logits(model, batch), logits(fresh("llama", same[1], merged=True), batch), rtol=0, atol=0)
    rewrites.clear()
    hotswap_adapter(model, other)
    assert not rewrites
    torch.testing.assert_close(logits(model, batch), logits(fresh("llama", other, merged=True), batch), rtol=0, atol=0)
    model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)


def test_swapping_an_adapter_merged_under_another_one(tmp_path):
    """With ``default`` merged first and ``second`` on top, swapping ``default`` undoes both merges (last first),
    swaps, and merges both again: exactly what merging the new adapter and ``second`` gives."""
    a = saved_adapter(tmp_path, "a", "llama", None, tuner="dps")
    b = saved_adapter(tmp_path, "b", "llama", None, steps=5, tuner="dps")
    c = saved_adapter(tmp_path, "c", "llama", None, steps=4, lr=2e-2, tuner="dps")
    model = fresh("llama", a)
    model.load_adapter(c, adapter_name="second")
    loaded = base_tensors(model)
    model.base_model.merge_adapter(["default", "second"])
    hotswap_adapter(model, b)
    expected = fresh("llama", b)
    expected.load_adapter(c, adapter_name="second")
    expected.base_model.merge_adapter(["default", "second"])
    batch = make_batch("llama")
    torch.testing.assert_close(logits(model, batch), logits(expected, batch), rtol=0, atol=0)
    model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)

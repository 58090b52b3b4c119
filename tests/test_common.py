"""The behaviour every peft_sparse tuner promises, tested once for every tuner on tiny BERT, GPT-2 and LLaMA (in
the spirit of PEFT's tests/testing_common.py): initialisation is a no-op, training changes only the adapter,
save/load is exact, merging equals the unmerged adapter, disabling gives the base model, several adapters coexist,
and bad input leaves the model as it was. Method-specific behaviour is in test_<method>.py."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparse import (
    BitFitConfig,
    DPSConfig,
    LayerSelectConfig,
    LearnerConfig,
    SparseMaskConfig,
    calibrate,
    requires_calibration,
)
from peft_sparse.tuners.base import SparseTunerLayer

from tiny_models import ARCHS, assert_unchanged, logits, make_batch, make_model, snapshot

# name: (config factory taking the task type, whether calibrate() picks the selection, whether init is a no-op)
TUNERS = {
    "bitfit": (lambda t: BitFitConfig(task_type=t), False, True),
    "layerselect": (lambda t: LayerSelectConfig(task_type=t, layers=[1]), False, True),
    "layerselect-calibrated": (lambda t: LayerSelectConfig(task_type=t, num_layers=1), True, True),
    "sparsemask": (lambda t: SparseMaskConfig(task_type=t, density=0.05), False, True),
    "sparsemask-block": (lambda t: SparseMaskConfig(task_type=t, density=0.2, block_size=4), False, True),
    "sparsemask-gradient": (lambda t: SparseMaskConfig(task_type=t, density=0.05, selection="gradient"), True, True),
    "sparsemask-mask": (lambda t: SparseMaskConfig(task_type=t, mode="mask", sparsity=0.2), False, False),
    "dps": (lambda t: DPSConfig(task_type=t, total_step=6, update_ratio=0.34), False, True),
    "learner": (lambda t: LearnerConfig(task_type=t, learner_ratio=0.25, priming_steps=0), False, True),
    "learner-primed": (lambda t: LearnerConfig(task_type=t, learner_ratio=0.25, priming_steps=2), True, False),
}


@pytest.fixture(params=list(TUNERS))
def tuner(request) -> str:
    return request.param


def config_for(tuner: str, arch: str):
    return TUNERS[tuner][0](ARCHS[arch][1])


def build(tuner: str, arch: str, adapter_name: str = "default"):
    """A calibrated, ready-to-train PEFT model of ``tuner`` on a fresh tiny ``arch``, and a copy of the base."""
    base = make_model(arch)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, config_for(tuner, arch), adapter_name=adapter_name)
    if TUNERS[tuner][1]:
        assert requires_calibration(model)
        calibrate(model, [make_batch(arch, seed=s) for s in (5, 6)])
    assert not requires_calibration(model)
    return model, reference


def train(model, arch, steps: int = 3, lr: float = 5e-2, start: int = 0):
    """A few AdamW steps with the tuner's schedule driven as the Trainer callback drives it."""
    batch = make_batch(arch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for step in range(start, start + steps):
        model(**batch).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


def base_parameters(model) -> dict[str, torch.Tensor]:
    """The frozen base model's parameters (inside tuner layers: their base_layer), by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_init_is_a_no_op_and_only_the_adapter_trains(tuner, arch):
    model, reference = build(tuner, arch)
    batch = make_batch(arch)
    if TUNERS[tuner][2]:
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    frozen = base_parameters(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefix = tuner.split("-")[0] + "_"
    assert trainable and all(prefix in n or "modules_to_save" in n for n in trainable), trainable
    before = logits(model, batch)
    train(model, arch)
    assert not torch.allclose(logits(model, batch), before)
    for name, value in frozen.items():  # no frozen parameter moved
        assert torch.equal(dict(model.named_parameters())[name], value), name


def test_save_and_load_give_the_same_outputs(tuner, arch, tmp_path):
    model, _ = build(tuner, arch)
    train(model, arch)
    batch = make_batch(arch)
    trained = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    prefix = tuner.split("-")[0] + "_"
    assert all(prefix in k or "modules_to_save" in k or "classifier" in k for k in saved), sorted(saved)
    for loader in ("from_pretrained", "load_adapter"):
        if loader == "from_pretrained":
            loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
        else:
            loaded, _ = build(tuner, arch)
            loaded.load_adapter(tmp_path, adapter_name="other")
            loaded.set_adapter("other")
        torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)
    card = (tmp_path / "README.md").read_text()
    assert "peft_sparse" in card and "import peft_sparse" in card
    # peft_sparse is not on PyPI: the card says to install it from its source
    assert "pip install -e <peft_sparse checkout>" in card and "pip install peft_sparse" not in card
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_sparse_version"]


def test_merge_unmerge_merge_and_unload_and_disable(tuner, arch):
    model, reference = build(tuner, arch)
    train(model, arch)
    batch = make_batch(arch)
    trained = logits(model, batch)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    model.base_model.merge_adapter()
    torch.testing.assert_close(logits(model, batch), trained, rtol=1e-4, atol=1e-5)
    model.base_model.unmerge_adapter()
    torch.testing.assert_close(logits(model, batch), trained, rtol=1e-4, atol=1e-5)
    with model.disable_adapter():  # unmerge gave the base weights back (up to float rounding)
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SparseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-4, atol=1e-5)


def test_unload_gives_the_base_model_back(tuner, arch):
    """``unload()`` removes the adapter without merging (PEFT keeps the trained copy of a modules_to_save head,
    so for the classifier the encoder's output is compared)."""
    model, reference = build(tuner, arch)
    train(model, arch)
    batch = make_batch(arch)
    unloaded = model.unload()
    assert not any(isinstance(m, SparseTunerLayer) for m in unloaded.modules())
    if arch == "bert":
        with torch.no_grad():
            got = unloaded.bert(input_ids=batch["input_ids"]).last_hidden_state
            expected = reference.bert(input_ids=batch["input_ids"]).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    else:
        torch.testing.assert_close(logits(unloaded, batch), logits(reference, batch), rtol=0, atol=0)


def of_adapter(name: str, adapter: str) -> bool:
    """Whether parameter ``name`` belongs to ``adapter`` (``<attribute>.<adapter>`` or ``modules_to_save.<adapter>``;
    a digit adapter name must not match a block index)."""
    return re.search(rf"(_[a-z]+|modules_to_save)\.{re.escape(adapter)}(\.|$)", name) is not None


@pytest.mark.parametrize("second_name", ["second", "0"], ids=["named", "digit-name"])
def test_several_adapters_coexist(tuner, arch, second_name):
    model, _ = build(tuner, arch)
    train(model, arch)
    batch = make_batch(arch)
    first = logits(model, batch)
    model.add_adapter(second_name, config_for(tuner, arch))
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)  # adding keeps the active adapter
    model.set_adapter(second_name)
    if requires_calibration(model):
        calibrate(model, [make_batch(arch, seed=s) for s in (5, 6)])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(of_adapter(n, second_name) for n in trainable), trainable
    first_values = {n: p.detach().clone() for n, p in model.named_parameters() if of_adapter(n, "default")}
    train(model, arch)
    for name, value in first_values.items():  # training the second adapter leaves the first alone
        assert torch.equal(dict(model.named_parameters())[name], value), name
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)
    model.delete_adapter(second_name)
    assert not any(of_adapter(n, second_name) for n, _ in model.named_parameters())
    assert second_name not in model.peft_config
    torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)


def wrapped_blocks(model) -> set[str]:
    """Indices of the transformer blocks that hold a tuner layer."""
    return {n.split(".layers.")[1].split(".")[0] for n, m in model.named_modules()
            if isinstance(m, SparseTunerLayer) and ".layers." in n}


def test_the_users_config_is_never_changed_and_builds_on_other_models(tuner):
    config = config_for(tuner, "llama")
    before = config.to_dict()
    small = get_peft_model(make_model("llama", num_layers=2), config)
    assert config.to_dict() == before
    large = get_peft_model(make_model("llama", num_layers=4), config)
    assert config.to_dict() == before
    # the same config covers every block of either model; LayerSelect wraps its chosen block, or none before
    # calibration chooses one
    for model, depth in ((small, 2), (large, 4)):
        expected = {"1"} if tuner == "layerselect" else set() if tuner == "layerselect-calibrated" else {
            str(i) for i in range(depth)}
        assert wrapped_blocks(model) == expected, (depth, wrapped_blocks(model))
    if tuner == "layerselect-calibrated":
        calibrate(large, [make_batch("llama", seed=5)])
        chosen = large.peft_config["default"].layers
        assert len(chosen) == 1 and wrapped_blocks(large) == {str(chosen[0])} <= {"0", "1", "2", "3"}
        assert config.to_dict() == before  # calibration fills in the model's copy, not the user's config


def test_every_tuner_has_the_schedule_hooks(tuner):
    """One training loop serves every tuner: ``set_total_steps`` and ``update_and_allocate`` exist on each. DPS takes
    the run's length from the first (and warns when it replaces its own) and notices a call without gradients; for
    the tuners without a schedule both leave the model as it was."""
    model, _ = build(tuner, "bert")
    batch = make_batch("bert")
    before, outputs = snapshot(model), logits(model, batch)
    if tuner == "dps":
        with pytest.warns(UserWarning, match="total_step=6 replaced by 10"):
            model.base_model.set_total_steps(10)
        assert model.peft_config["default"].total_step == 10
        with pytest.warns(UserWarning, match=r"update_and_allocate\(0\) found no gradients"):
            model.base_model.update_and_allocate(0)
        return
    model.base_model.set_total_steps(10)
    model.base_model.update_and_allocate(0)
    assert_unchanged(model, before)
    torch.testing.assert_close(logits(model, batch), outputs, rtol=0, atol=0)


def test_bad_targets_leave_the_model_as_it_was(tuner, arch):
    if tuner.startswith("learner"):
        pytest.skip("Learners pick FFN projections themselves (see test_learner.py)")
    base = make_model(arch)
    before = snapshot(base)
    config = config_for(tuner, arch)
    config.target_modules = ["no_such_module"]
    with pytest.raises(ValueError, match="no_such_module"):
        get_peft_model(base, config)
    assert_unchanged(base, before)


def test_a_failed_load_leaves_the_model_as_it_was(tuner, tmp_path):
    """A checkpoint of another architecture (a 2-label head onto 3 labels, another depth) is refused with a clear
    error, and neither the model nor the adapters already in it change, trainability included."""
    model, _ = build(tuner, "bert")
    train(model, "bert")
    model.save_pretrained(tmp_path)
    other = make_model("bert", num_labels=3)  # another head: 3 labels
    other_model = get_peft_model(other, config_for(tuner, "bert"))
    if requires_calibration(other_model):
        calibrate(other_model, [make_batch("bert", seed=5)])
    before = snapshot(other_model)
    method = tuner.split("-")[0]  # the error names the method and the entry that does not fit: the 2-label head
    with pytest.raises(ValueError, match=rf"The {method} adapter checkpoint does not fit this model \(\S*classifier"):
        other_model.load_adapter(tmp_path, adapter_name="loaded")
    assert_unchanged(other_model, before)
    assert "loaded" not in other_model.peft_config


def test_all_linear_wraps_what_lora_wraps(tuner, arch):
    from peft import LoraConfig

    config = config_for(tuner, arch)
    config.target_modules = "all-linear"
    if tuner.startswith("learner"):
        with pytest.raises(ValueError, match="all-linear' does not apply to LearnerConfig"):
            get_peft_model(make_model(arch), config)
        return
    lora = get_peft_model(make_model(arch), LoraConfig(task_type=ARCHS[arch][1], target_modules="all-linear"))
    model = get_peft_model(make_model(arch), config)
    if TUNERS[tuner][1]:
        calibrate(model, [make_batch(arch, seed=5)])
    ours = set(model.base_model.targeted_module_names)
    if tuner.startswith("layerselect"):  # the linear layers of the chosen block
        block = model.peft_config["default"].layers[0]
        assert ours and all(f".{block}." in n for n in ours) and ours < set(lora.base_model.targeted_module_names)
    else:
        assert ours == set(lora.base_model.targeted_module_names)

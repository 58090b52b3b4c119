import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_sparse
from peft_sparse import CalibrationRequiredError, LayerSelectConfig, calibrate, requires_calibration
from peft_sparse.modules import find_layer_stack
from peft_sparse.tuners.layerselect import LayerSelectLayer

from tiny_models import (
    ARCHS, assert_unchanged, logits, make_batch, make_model, snapshot, train_steps, trainable_names,
)

STACKS = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


def layerselect(arch, **kwargs):
    base = make_model(arch)
    reference = copy.deepcopy(base)
    return get_peft_model(base, LayerSelectConfig(task_type=ARCHS[arch][1], **kwargs)), reference


def test_layer_stack_is_found_generically(arch):
    name, stack = find_layer_stack(make_model(arch))
    assert name == STACKS[arch] and len(stack) == 3


def test_only_chosen_block_trains_and_outputs_start_unchanged(arch):
    model, reference = layerselect(arch, layers=[1])
    batch = make_batch(arch)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    block = f"{STACKS[arch]}.1."
    deltas = [n for n in trainable_names(model) if "layerselect_delta" in n]
    assert deltas and all(block in n for n in deltas)
    # Every parameter of block 1 has exactly one delta of the same size: the whole block trains.
    block_params = sum(p.numel() for p in find_layer_stack(reference)[1][1].parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in deltas) == block_params
    others = [n for n in trainable_names(model) if n not in deltas]
    assert all("modules_to_save" in n for n in others)




def test_gradient_selection_needs_calibration_then_trains_the_measured_blocks(arch):
    model, reference = layerselect(arch, num_layers=2)
    batch = make_batch(arch)
    assert requires_calibration(model)
    # Eval-mode forwards are fine before calibration (nothing is trained yet) ...
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    # ... a training-mode forward is a clear error, not a silent choice.
    model.train()
    with pytest.raises(CalibrationRequiredError, match="run `peft_sparse.calibrate"):
        model(**batch)
    model.eval()
    used = calibrate(model, [make_batch(arch, seed=s) for s in range(3)])
    assert used == 3 and not requires_calibration(model)
    assert not model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())
    config = model.peft_config["default"]
    assert len(config.layers) == 2 and len(config.layer_scores) == 3
    top2 = sorted(sorted(range(3), key=lambda i: -config.layer_scores[i])[:2])
    assert config.layers == top2
    deltas = [n for n in trainable_names(model) if "layerselect_delta" in n]
    assert {int(n.split(STACKS[arch] + ".")[1].split(".")[0]) for n in deltas} == set(top2)
    # The base stays frozen after calibration temporarily unfroze it.
    assert all("layerselect_delta" in n or "modules_to_save" in n for n in trainable_names(model))
    train_steps(model, batch)
    assert not torch.allclose(logits(model, batch), logits(reference, batch))


def test_calibrated_adapter_round_trips(tmp_path):
    model, _ = layerselect("bert", num_layers=1)
    calibrate(model, [make_batch("bert", seed=s) for s in range(2)], num_batches=1)
    train_steps(model, make_batch("bert"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path)
    assert loaded.peft_config["default"].layers == model.peft_config["default"].layers
    assert not requires_calibration(loaded)
    torch.testing.assert_close(logits(loaded, make_batch("bert")), logits(model, make_batch("bert")), rtol=0, atol=0)


def test_target_modules_restrict_within_blocks_and_layers_pattern():
    model, _ = layerselect("bert", layers=[2], target_modules=["attention.self.query"], layers_pattern="encoder.layer")
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LayerSelectLayer)]
    assert wrapped == ["base_model.model.bert.encoder.layer.2.attention.self.query"]




@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"layers": [1, 7]}, r"layers \[7\] are out of range: bert.encoder.layer has 3 blocks"),
        ({"num_layers": 4}, r"num_layers=4 but bert.encoder.layer has only 3 blocks"),
        ({"layers": [0], "layers_pattern": "nope"}, r"layers_pattern='nope'"),
        ({"layers": [0], "target_modules": ["nope"]}, r"match no module"),
    ],
)
def test_bad_choices_raise_and_leave_the_model_untouched(kwargs, message):
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, LayerSelectConfig(task_type="SEQ_CLS", **kwargs))
    assert_unchanged(base, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of"),
        ({"layers": [0], "num_layers": 1}, "exactly one of"),
        ({"layers": [-1]}, "non-negative"),
        ({"layers": [1, 1]}, "duplicates"),
        ({"num_layers": 0}, "positive integer"),
        ({"num_layers": 1, "selection": "magic"}, "Unknown selection"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LayerSelectConfig(**kwargs)


def test_loading_into_the_wrong_architecture_is_a_clear_error(tmp_path):
    model, _ = layerselect("bert", layers=[2])
    model.save_pretrained(tmp_path)
    smaller = make_model("bert", num_layers=2)  # has no block 2
    before = snapshot(smaller)
    with pytest.raises(ValueError, match="out of range"):
        PeftModel.from_pretrained(smaller, tmp_path)
    assert_unchanged(smaller, before)
    wider = make_model("bert")
    wider.bert.encoder.layer[2].intermediate.dense = torch.nn.Linear(16, 30)
    wider.bert.encoder.layer[2].output.dense = torch.nn.Linear(30, 16)
    before = snapshot(wider)
    with pytest.raises(ValueError, match=r"does not fit this model.*shape \(24, 16\), the model \(30, 16\)"):
        PeftModel.from_pretrained(wider, tmp_path)
    assert_unchanged(wider, before)


def test_calibrate_rejects_batches_without_labels_and_restores_state():
    model, _ = layerselect("bert", num_layers=1)
    model.train()
    with pytest.raises(ValueError, match="labels"):
        calibrate(model, [{"input_ids": make_batch("bert")["input_ids"]}])
    assert model.training and requires_calibration(model)
    assert all(p.grad is None for p in model.parameters())
    assert all("modules_to_save" in n for n in trainable_names(model))


def test_calibrate_without_pending_adapter_warns():
    model, _ = layerselect("bert", layers=[0])
    with pytest.warns(UserWarning, match="nothing was done"):
        assert calibrate(model, [make_batch("bert")]) == 0
    with pytest.raises(ValueError, match="needs a PEFT model"):
        peft_sparse.calibrate(make_model("bert"), [make_batch("bert")])

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparse import CalibrationRequiredError, LearnerConfig, calibrate, requires_calibration
from peft_sparse.modules import dense_weight
from peft_sparse.tuners.learner import LearnerLayer

from tiny_models import ARCHS, logits, make_batch, make_model, train_steps, trainable_names

FFN = {  # (up/gate names, down name, hidden nodes) of the tiny models
    "bert": (["intermediate.dense"], "output.dense", 24),
    "gpt2": (["mlp.c_fc"], "mlp.c_proj", 64),
    "llama": (["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj", 24),
}


def learner(arch, **kwargs):
    base = make_model(arch)
    reference = copy.deepcopy(base)
    kwargs.setdefault("learner_ratio", 0.25)
    return get_peft_model(base, LearnerConfig(task_type=ARCHS[arch][1], **kwargs)), reference


def ffns(model):
    return model.base_model.ffns("default")


def test_learners_without_data_train_a_slice_of_each_ffn(arch, tmp_path):
    model, reference = learner(arch, priming_steps=0)
    batch = make_batch(arch)
    ups, down, hidden = FFN[arch]
    s = round(0.25 * hidden)
    assert not requires_calibration(model)
    for up_layers, down_layer in ffns(model):
        nodes = down_layer.learner_nodes["default"]
        assert len(nodes) == s and all(torch.equal(u.learner_nodes["default"], nodes) for u in up_layers)
        # The nodes with the largest |up row| * |down column| (no data needed).
        up_norm = sum(dense_weight(u.get_base_layer()).square().sum(1) for u in up_layers).sqrt()
        down_norm = dense_weight(down_layer.get_base_layer()).square().sum(0).sqrt()
        assert set(nodes.tolist()) == set((up_norm * down_norm).topk(s).indices.tolist())
    learner_params = [n for n in trainable_names(model) if "learner_" in n]
    assert all("learner_" in n or "modules_to_save" in n for n in trainable_names(model))
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    per_ffn = len(ups) * s * d + s * d + (s * len(ups) if arch != "llama" else 0)  # rows, columns, biases
    assert sum(p.numel() for n, p in model.named_parameters() if n in learner_params) == 3 * per_ffn
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    train_steps(model, batch)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(reference, batch))
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all("learner_" in k or "classifier" in k for k in saved)
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)
    torch.testing.assert_close(logits(model.merge_and_unload(), batch), trained, rtol=1e-5, atol=1e-5)


def test_only_learner_rows_and_columns_change_when_merged():
    model, reference = learner("bert", priming_steps=0)
    train_steps(model, make_batch("bert"))
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LearnerLayer)}
    nodes = {name: set(layer.learner_nodes["default"].tolist()) for name, layer in layers.items()}
    roles = {name: layer.role for name, layer in layers.items()}
    merged = model.merge_and_unload()
    for name, chosen in nodes.items():
        difference = merged.get_submodule(name).weight != reference.get_submodule(name).weight
        changed = difference.any(1) if roles[name] == "up" else difference.any(0)  # rows / columns
        assert set(torch.nonzero(changed).flatten().tolist()) == chosen


def test_priming_picks_the_nodes_that_changed_most_and_keeps_their_values(arch, monkeypatch):
    model, reference = learner(arch, priming_steps=3, priming_lr=1e-2)
    batch = make_batch(arch)
    assert requires_calibration(model)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    model.train()
    with pytest.raises(CalibrationRequiredError):
        model(**batch)
    model.eval()
    primed = {}  # down layer -> change score of every node, recorded as the session chooses
    original = LearnerLayer.set_nodes

    def recording(self, adapter, nodes, keep_values=False):
        if keep_values:
            primed[id(self)] = (self.role, self.learner_weight[adapter].detach().clone(),
                                self.learner_bias[adapter].detach().clone() if adapter in self.learner_bias else None)
        original(self, adapter, nodes, keep_values)

    monkeypatch.setattr(LearnerLayer, "set_nodes", recording)
    consumed = []

    def batches():
        for seed in range(10):
            consumed.append(seed)
            yield make_batch(arch, seed=seed)

    assert calibrate(model, batches()) == 3 and len(consumed) == 3  # exactly priming_steps batches
    assert not requires_calibration(model) and all(p.grad is None for p in model.parameters())
    s = round(0.25 * FFN[arch][2])
    for up_layers, down_layer in ffns(model):
        change = primed[id(down_layer)][1].square().sum(0)
        for up in up_layers:
            _, weight, bias = primed[id(up)]
            change = change + weight.square().sum(1) + (bias.square() if bias is not None else 0)
        nodes = down_layer.learner_nodes["default"]
        assert set(nodes.tolist()) == set(change.topk(s).indices.tolist())
        # Learners keep their primed values; every other node was reset to the pretrained weights.
        torch.testing.assert_close(down_layer.learner_weight["default"], primed[id(down_layer)][1][:, nodes])
        assert down_layer.learner_weight["default"].abs().sum() > 0
    # The trainable set is now fixed: only the Learners (and the head).
    names = trainable_names(model)
    assert all("learner_" in n or "modules_to_save" in n for n in names)
    train_steps(model, batch)


def test_interrupted_priming_leaves_the_learners_waiting():
    model, _ = learner("bert", priming_steps=3)

    def broken():
        yield make_batch("bert")
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader failed"):
        calibrate(model, broken())
    assert requires_calibration(model)
    assert all(len(d.learner_nodes["default"]) == 0 for _, d in ffns(model))


def test_primed_adapter_round_trips_with_sizes_unlike_a_fresh_config(tmp_path):
    model, _ = learner("llama", priming_steps=2)
    calibrate(model, [make_batch("llama", seed=s) for s in range(2)])
    train_steps(model, make_batch("llama"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path)  # built pending (no nodes), then resized
    assert not requires_calibration(loaded)
    torch.testing.assert_close(logits(loaded, make_batch("llama")), logits(model, make_batch("llama")), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"learner_ratio": 0.0}, "learner_ratio"), ({"learner_ratio": 1.0}, "learner_ratio"),
    ({"priming_steps": -1}, "priming_steps"), ({"priming_lr": 0.0}, "priming_lr"),
    ({"up_modules": ["mlp.c_fc"]}, "both"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**kwargs)


def test_unknown_ffn_layout_is_a_clear_error():
    with pytest.raises(ValueError, match="has no"):
        get_peft_model(make_model("bert"), LearnerConfig(task_type="SEQ_CLS", up_modules=["mlp.fc"],
                                                          down_module="mlp.proj"))

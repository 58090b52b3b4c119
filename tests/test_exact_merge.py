"""Exact unmerge: a merge saves the base entries it overwrites and the unmerge writes them back, so any number of merges
and unmerges leaves every base tensor bit-equal to the loaded one (LoRA's ``W + BA − BA`` drifts). What is saved is
only what the increment touches: a SparseMask support, a Learner's rows or columns, a bias."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_sparse.tuners import merging
from peft_sparse.tuners.base import SparseTunerLayer

from many_adapters import load_4bit, save_tiny_llama_for_4bit, two_adapters
from test_common import TUNERS, config_for, train
from tiny_models import logits, make_batch


@pytest.fixture(scope="module")
def llama_4bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_tiny_llama_for_4bit(tmp_path_factory.mktemp("tiny-llama-4bit"))


def base_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of every base model tensor (inside tuner layers: the wrapped layer's), by name."""
    prefix = model.base_model.prefix
    return {
        name: tensor.detach().clone()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if prefix not in name and "modules_to_save" not in name
    }


def assert_bit_equal(model, loaded: dict[str, torch.Tensor]) -> None:
    now = base_tensors(model)
    assert now.keys() == loaded.keys()
    changed = [name for name, tensor in loaded.items() if not torch.equal(now[name], tensor)]
    assert not changed, changed[:5]


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_25_merge_unmerge_cycles_leave_the_base_bit_equal(tuner, arch):
    model, _ = two_adapters(tuner, arch)
    loaded = base_tensors(model)
    batch = make_batch(arch)
    unmerged = logits(model, batch)
    for cycle in range(25):
        model.base_model.merge_adapter(["default"])
        if cycle % 5 == 0:
            torch.testing.assert_close(logits(model, batch), unmerged, rtol=1e-4, atol=1e-5)
        if cycle % 2:
            model.base_model.merge_adapter(["other"])  # two adapters merged, undone last first
        model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=0)
    layers = [m for m in model.modules() if isinstance(m, SparseTunerLayer)]
    assert all(not layer.merge_saved and not layer.merged for layer in layers)  # nothing kept after the unmerge


def test_what_a_merge_saves_is_what_the_increment_touches():
    saved_by_tuner = {}
    for tuner in ("sparsemask", "learner", "bitfit", "dps"):
        model, _ = two_adapters(tuner, "bert")
        model.base_model.merge_adapter(["default"])
        saved_by_tuner[tuner] = [(layer, layer.merge_saved["default"]) for layer in model.modules()
                                 if isinstance(layer, SparseTunerLayer) and layer.has_adapter("default")]
    for layer, saved in saved_by_tuner["sparsemask"]:  # support-sized: the support's entries only
        support = layer.sparsemask_delta["default"].indices
        assert saved["weight"].region == "flat" and torch.equal(saved["weight"].index, support)
        assert saved["weight"].values.numel() == support.numel() < layer.in_features * layer.out_features
    for layer, saved in saved_by_tuner["learner"]:  # the Learner's rows (up) or columns (down)
        nodes = layer.learner_nodes["default"]
        assert saved["weight"].region == ("rows" if layer.role == "up" else "cols")
        assert torch.equal(saved["weight"].index, nodes)
    for layer, saved in saved_by_tuner["bitfit"]:  # the bias, never the weight
        assert set(saved) == {"bias"}
    for layer, saved in saved_by_tuner["dps"]:  # a dense increment changes (and saves) the whole weight
        assert saved["weight"].region == "all"


def test_a_merge_that_created_a_bias_removes_it_again():
    model, _ = two_adapters("bitfit", "llama")  # LLaMA's projections have no bias
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.get_base_layer().bias is None
    model.base_model.merge_adapter(["default"])
    assert isinstance(q_proj.merge_saved["default"]["bias"], merging.CreatedBias)
    assert q_proj.get_base_layer().bias is not None
    model.base_model.unmerge_adapter()
    assert q_proj.get_base_layer().bias is None


@pytest.mark.parametrize(
    "increment",
    [lambda: torch.randn(6, 5), lambda: torch.zeros(6, 5).index_fill_(0, torch.tensor([1, 4]), 0.3),
     lambda: torch.zeros(6, 5).index_fill_(1, torch.tensor([2]), -0.7),
     lambda: torch.zeros(6, 5).index_put_((torch.tensor([0, 5]), torch.tensor([4, 1])), torch.tensor([1.0, 2.0]))],
    ids=["dense", "rows", "cols", "entries"],
)
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed-view"])
def test_add_saving_restores_bit_for_bit(increment, transposed):
    torch.manual_seed(0)
    delta = increment()
    tensor = torch.randn(5, 6).T if transposed else torch.randn(6, 5)
    before = tensor.clone()
    saved = merging.add_saving(tensor, delta)
    assert torch.equal(tensor, before + delta)  # what `tensor += delta` computes
    saved.restore(tensor)
    assert torch.equal(tensor, before)
    assert saved.nbytes <= before.numel() * before.element_size()


def test_a_sparse_increment_saves_its_support_only():
    tensor = torch.randn(8, 9)
    before = tensor.clone()
    indices = torch.tensor([3, 17, 40, 71])
    values = torch.tensor([0.5, -1.0, 2.0, 0.25])
    saved = merging.add_saving(tensor, merging.SparseIncrement(indices, values))
    expected = before.clone().view(-1)
    expected[indices] += values
    assert torch.equal(tensor.view(-1), expected)
    assert saved.values.numel() == 4
    saved.restore(tensor)
    assert torch.equal(tensor, before)


@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-mask", "bitfit", "learner", "layerselect"])
def test_merge_unmerge_cycles_on_a_4bit_base_restore_the_packed_weight(llama_4bit_dir, tuner):
    model = get_peft_model(load_4bit(llama_4bit_dir), config_for(tuner, "llama"))
    train(model, "llama", steps=2, lr=2e-2)
    loaded = base_tensors(model)
    for _ in range(5):
        model.base_model.merge_adapter()
        model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)

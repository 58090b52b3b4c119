"""``add_weighted_adapter`` on every tuner: ``linear`` (and ``cat``) is exactly the weighted sum of the increments, on
the union of the sources' supports, nodes and modules; ``ties``, ``dare_linear``, ``dare_ties`` and
``magnitude_prune`` equal PEFT's ``merge_utils`` applied to the dense increments; the new adapter saves, loads and
merges like any other; combinations without a meaning are refused with a reason, the model unchanged."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils import ModulesToSaveWrapper, merge_utils

from peft_sparse import LayerSelectConfig, SparseMaskConfig
from peft_sparse.tuners.base import SparseTunerLayer

from many_adapters import two_adapters
from test_common import TUNERS, build, config_for, train
from test_exact_merge import assert_bit_equal, base_tensors
from tiny_models import assert_unchanged, logits, make_batch, make_model, snapshot

COMBINABLE = [t for t in TUNERS if t != "sparsemask-mask"]


def layers_of(model, adapter: str) -> list[SparseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, SparseTunerLayer) and m.has_adapter(adapter)]


def expected_increments(layer, weights: dict[str, float], combine=None) -> dict[str, torch.Tensor]:
    """What the combination must give on this layer: ``combine`` (PEFT's function, default the plain weighted sum) of
    the dense increments of the sources the layer holds."""
    sources = [a for a in weights if layer.has_adapter(a)]
    deltas = {a: layer.delta_parameters(a) for a in sources}
    result = {}
    for name in sorted({n for d in deltas.values() for n in d}):
        tensors = [deltas[a][name].float() for a in sources]
        w = torch.tensor([weights[a] for a in sources])
        result[name] = combine(tensors, w) if combine else sum(weights[a] * deltas[a][name] for a in sources)
    return result


@pytest.mark.parametrize("tuner", COMBINABLE)
def test_linear_is_exactly_the_weighted_sum_on_the_union(tuner, arch, tmp_path):
    model, _ = two_adapters(tuner, arch)
    weights = {"default": 0.75, "other": -1.5}
    model.base_model.add_weighted_adapter(list(weights), list(weights.values()), "mix")
    assert "mix" in model.peft_config and model.active_adapters == ["default"]
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".mix" in n)  # added frozen, as LoRA's
    for layer in layers_of(model, "mix"):
        got = layer.delta_parameters("mix")
        expected = expected_increments(layer, weights)
        assert got.keys() == expected.keys()
        for name in got:
            assert torch.equal(got[name], expected[name].to(got[name].dtype)), name
        if tuner.startswith("sparsemask"):  # the support is the union of the supports
            union = torch.unique(torch.cat([layer.sparsemask_delta[a].indices for a in weights]))
            assert torch.equal(layer.sparsemask_delta["mix"].indices, union)
        if tuner.startswith("learner"):  # the nodes are the union of the nodes
            union = torch.unique(torch.cat([layer.learner_nodes[a] for a in weights]))
            assert torch.equal(layer.learner_nodes["mix"], union)
    batch = make_batch(arch)
    model.set_adapter("mix")
    combined = logits(model, batch)
    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path / "mix")
    torch.testing.assert_close(logits(loaded, batch), combined, rtol=0, atol=0)


@pytest.mark.parametrize("tuner", ["sparsemask", "dps", "learner", "layerselect", "bitfit"])
def test_a_one_to_one_sum_answers_as_both_adapters_at_once(tuner):
    """``linear`` 1:1 is both adapters active at once (the base plus both increments), and it merges and unmerges
    exactly like any other adapter."""
    model, _ = two_adapters(tuner, "llama")
    model.base_model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "both")
    batch = make_batch("llama")
    model.base_model.set_adapter(["default", "other"])
    together = logits(model, batch)
    model.set_adapter("both")
    torch.testing.assert_close(logits(model, batch), together, rtol=1e-5, atol=1e-5)
    loaded = base_tensors(model)
    model.base_model.merge_adapter(["both"])
    torch.testing.assert_close(logits(model, batch), together, rtol=1e-4, atol=1e-5)
    model.base_model.unmerge_adapter()
    assert_bit_equal(model, loaded)


@pytest.mark.parametrize("tuner", ["sparsemask", "dps", "learner", "bitfit"])
def test_cat_is_the_same_exact_sum(tuner):
    model, _ = two_adapters(tuner, "gpt2")
    model.base_model.add_weighted_adapter(["default", "other"], [0.5, 2.0], "lin", combination_type="linear")
    model.base_model.add_weighted_adapter(["default", "other"], [0.5, 2.0], "cat", combination_type="cat")
    for layer in layers_of(model, "cat"):
        for name, value in layer.delta_parameters("cat").items():
            assert torch.equal(value, layer.delta_parameters("lin")[name])


PEFT_FUNCTIONS = {
    "ties": lambda t, w, d: merge_utils.ties(t, w, d, "total"),
    "dare_linear": lambda t, w, d: merge_utils.dare_linear(t, w, d),
    "dare_ties": lambda t, w, d: merge_utils.dare_ties(t, w, d, "total"),
    "magnitude_prune": lambda t, w, d: merge_utils.magnitude_prune(t, w, d),
}
#: density counts the dense increment's entries (PEFT's convention): below the sparse increments' own density, so
#: that magnitude pruning takes effect on SparseMask (5 %, 20 % in blocks) and Learners (25 % of the rows).
DENSITY = {"sparsemask": 0.02, "sparsemask-block": 0.1, "learner": 0.1}


@pytest.mark.parametrize("combination_type", list(PEFT_FUNCTIONS))
@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-block", "dps", "learner", "layerselect", "bitfit"])
def test_the_pruning_types_match_peft_merge_utils_on_the_dense_increments(tuner, combination_type):
    model, _ = two_adapters(tuner, "llama")
    weights = {"default": 1.0, "other": 0.6}
    density = DENSITY.get(tuner, 0.5)
    torch.manual_seed(123)  # dare draws its random masks: layer by layer, parameter by parameter
    model.base_model.add_weighted_adapter(list(weights), list(weights.values()), "new",
                                          combination_type=combination_type, density=density)
    torch.manual_seed(123)
    layers = layers_of(model, "new")
    function = PEFT_FUNCTIONS[combination_type]
    expected = [expected_increments(layer, weights, lambda t, w: function(t, w, density)) for layer in layers]
    changed = False
    for layer, wanted in zip(layers, expected):
        for name, value in layer.delta_parameters("new").items():
            assert torch.equal(value, wanted[name].to(value.dtype)), (combination_type, name)
            changed |= not torch.equal(value, expected_increments(layer, weights)[name].to(value.dtype))
    assert changed  # pruning took effect somewhere: not the plain sum


def test_different_targets_combine_on_the_union_of_modules(tmp_path):
    """As PEFT's LoRA does, adapters on different modules (LayerSelect on different blocks, SparseMask on different
    projections) combine on the union; each counts as zero where it has no increment."""
    for first, second, arch in [
        (LayerSelectConfig(task_type="CAUSAL_LM", layers=[0]), LayerSelectConfig(task_type="CAUSAL_LM", layers=[2]), "gpt2"),
        (SparseMaskConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]),
         SparseMaskConfig(task_type="CAUSAL_LM", target_modules=["v_proj", "down_proj"]), "llama"),
    ]:
        model = get_peft_model(make_model(arch), first)
        train(model, arch)
        model.add_adapter("other", second)
        model.set_adapter("other")
        train(model, arch)
        model.base_model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "union")
        holders = {n for n, m in model.named_modules() if isinstance(m, SparseTunerLayer) and m.has_adapter("union")}
        sources = {n for n, m in model.named_modules()
                   if isinstance(m, SparseTunerLayer) and (m.has_adapter("default") or m.has_adapter("other"))}
        assert holders == sources
        batch = make_batch(arch)
        model.base_model.set_adapter(["default", "other"])
        together = logits(model, batch)
        model.set_adapter("union")
        torch.testing.assert_close(logits(model, batch), together, rtol=1e-5, atol=1e-5)


def test_task_heads_combine_as_increments_over_the_original_head():
    model, _ = two_adapters("sparsemask", "bert")
    model.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    head = model.base_model.model.classifier
    assert isinstance(head, ModulesToSaveWrapper)
    original = head.original_module.weight
    expected = original + 0.5 * (head.modules_to_save["default"].weight - original) \
        + 0.5 * (head.modules_to_save["other"].weight - original)
    torch.testing.assert_close(head.modules_to_save["mix"].weight, expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- refusals


def refused(model, match: str, *args, **kwargs) -> None:
    before = snapshot(model)
    names = set(model.peft_config)
    with pytest.raises(ValueError, match=match):
        model.base_model.add_weighted_adapter(*args, **kwargs)
    assert_unchanged(model, before)
    assert set(model.peft_config) == names


def test_combinations_without_a_meaning_are_refused_and_change_nothing():
    model, _ = two_adapters("sparsemask", "llama")
    both = (["default", "other"], [1.0, 1.0])
    refused(model, "rebuilds a low-rank", *both, "x", combination_type="svd")
    refused(model, "Invalid combination_type 'sum'", *both, "x", combination_type="sum")
    refused(model, "needs density in \\(0, 1\\]", *both, "x", combination_type="ties")
    refused(model, "density applies to", *both, "x", combination_type="linear", density=0.5)
    refused(model, "one weight per adapter", ["default", "other"], [1.0], "x")
    refused(model, r"Adapter\(s\) \['nope'\] do not exist", ["default", "nope"], [1.0, 1.0], "x")
    refused(model, "exists already", *both, "other")
    refused(model, "majority_sign_method", *both, "x", combination_type="ties", density=0.5, majority_sign_method="max")

    model.add_adapter("masked", SparseMaskConfig(task_type="CAUSAL_LM", mode="mask", sparsity=0.2))
    refused(model, r"mode='mask' adapters, which cannot be combined: .* is no mask", ["default", "masked"], [1.0, 1.0], "x")
    refused(model, "is no mask", ["masked"], [1.0], "x")

    model.add_adapter("later", SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient"))
    refused(model, "wait for peft_sparse.calibrate", ["default", "later"], [1.0, 1.0], "x")


def test_adapters_of_other_task_types_are_refused():
    model, _ = build("bitfit", "llama")
    config = config_for("bitfit", "llama")
    config.task_type = None
    model.add_adapter("plain", config)
    refused(model, "task_type differ", ["default", "plain"], [1.0, 1.0], "x")

"""Mixed-adapter batches (``adapter_names=``), PEFT LoRA's semantics, for every tuner: each row of a batch equals its
adapter alone, ``"__base__"`` rows equal the base model, in the forward and in ``generate`` (greedy and beam search),
on fp32 tiny BERT, GPT-2 and LLaMA and on a 4-bit LLaMA; the task head's ``modules_to_save`` copies follow the names;
and the errors LoRA raises."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_sparse import DPSConfig

from many_adapters import load_4bit, save_tiny_llama_for_4bit, two_adapters
from test_common import TUNERS, config_for, train
from tiny_models import make_batch, make_model

NAMES = ["default", "other", "__base__", "other", "default"]  # groups that are not contiguous


def each_alone(model, reference, ids: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """Every row's output through each adapter alone (``set_adapter``) and through the base model."""
    out = {}
    with torch.no_grad():
        for adapter in ("default", "other"):
            model.set_adapter(adapter)
            out[adapter] = model(input_ids=ids, **kwargs).logits
        out["__base__"] = reference(input_ids=ids, **kwargs).logits
    model.set_adapter("default")
    return out


@pytest.mark.parametrize("tuner", list(TUNERS))
def test_each_row_equals_its_adapter_alone(tuner, arch):
    model, reference = two_adapters(tuner, arch)
    ids = make_batch(arch, batch=len(NAMES))["input_ids"]
    alone = each_alone(model, reference, ids)
    assert not torch.allclose(alone["default"], alone["other"], atol=1e-4)  # the adapters differ, or this proves nothing
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
        grouped = model(input_ids=ids[[0, 4, 1, 3, 2]], adapter_names=sorted(NAMES, key=NAMES.index)).logits
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    for row, source in enumerate([0, 4, 1, 3, 2]):  # contiguous groups take the slicing path
        torch.testing.assert_close(grouped[row], alone[NAMES[source]][source], rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the hooks are gone: a plain forward is the active adapter again
        torch.testing.assert_close(model(input_ids=ids).logits, alone["default"], rtol=0, atol=0)


@pytest.mark.parametrize("tuner", ["bitfit", "layerselect", "sparsemask", "sparsemask-mask", "dps", "learner"])
def test_the_heads_follow_adapter_names(tuner):
    """BERT's classifier is a ``modules_to_save`` copy per adapter: a mixed batch answers each row with its own."""
    model, reference = two_adapters(tuner, "bert")
    head = model.base_model.model.classifier
    assert set(head.modules_to_save) == {"default", "other"}
    with torch.no_grad():
        head.modules_to_save["other"].weight.add_(1.0)  # the heads now differ a lot
    ids = make_batch("bert", batch=len(NAMES))["input_ids"]
    alone = each_alone(model, reference, ids)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


def test_norm_copies_of_dps_scope_model_follow_adapter_names():
    """DPS ``scope="model"`` trains norms and embeddings whole (PEFT's modules_to_save), which PEFT's wrapper cannot
    split by rows: peft_sparse runs each group through its own copy."""
    config = DPSConfig(task_type="CAUSAL_LM", total_step=6, update_ratio=0.34, scope="model")
    model = get_peft_model(make_model("llama"), config)
    reference = make_model("llama").eval()
    train(model, "llama")
    model.add_adapter("other", copy.deepcopy(config))
    model.set_adapter("other")
    train(model, "llama", lr=3e-2)
    model.set_adapter("default")
    model.eval()
    norms = [m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper" and "Norm" in type(m.original_module).__name__]
    assert norms
    ids = make_batch("llama", batch=len(NAMES))["input_ids"]
    alone = each_alone(model, reference, ids)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5)


GENERATE = [(tuner, 1) for tuner in TUNERS] + [(tuner, 2) for tuner in ("sparsemask", "dps", "learner")]


@pytest.mark.parametrize(("tuner", "num_beams"), GENERATE, ids=[f"{t}-beams{b}" for t, b in GENERATE])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_gives_each_row_its_adapter(tuner, arch, num_beams):
    model, reference = two_adapters(tuner, arch)
    names = ["other", "__base__", "default"]
    ids = make_batch(arch, batch=len(names), seq=5, seed=3)["input_ids"]
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0,
                    output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
        for row, name in enumerate(names):
            if name == "__base__":
                alone = reference.generate(input_ids=ids[row : row + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
            assert torch.equal(mixed.sequences[row], alone.sequences[0]), (row, name)
            if num_beams == 1:  # every step's logits of the row, not only the argmax
                got, want = torch.stack([s[row] for s in mixed.scores]), torch.stack([s[0] for s in alone.scores])
            else:
                got, want = mixed.sequences_scores[row], alone.sequences_scores[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    model.set_adapter("default")


@pytest.mark.parametrize("tuner", ["sparsemask", "dps", "learner"])
def test_mixed_batch_errors_are_loras(tuner):
    model, _ = two_adapters(tuner, "llama")
    ids = make_batch("llama", batch=3)["input_ids"]
    with pytest.raises(ValueError, match="non-existing adapter.*nope"):
        model(input_ids=ids, adapter_names=["default", "nope", "__base__"])
    with pytest.raises(ValueError, match="Length of `adapter_names`"):
        model(input_ids=ids, adapter_names=["default", "other"])
    with pytest.raises(TypeError, match="list of str"):
        model(input_ids=ids, adapter_names="default")
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=ids, adapter_names=["default", "other", "other"])
    model.eval()
    model.base_model.merge_adapter(["default"])
    with pytest.raises(ValueError, match="merged adapters"):
        model(input_ids=ids, adapter_names=["default", "other", "other"])
    model.base_model.unmerge_adapter()
    # no hook was left behind by the failed calls
    leftovers = [m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks]
    assert not leftovers, leftovers[:2]


def test_same_rows_as_loras_mixed_batch_semantics():
    """The same call on a LoRA model and on a peft_sparse model: both accept it and answer per row (a regression test
    for the silent wrong result: before, every row got the active adapter)."""
    for config in (LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights=False), config_for("sparsemask", "llama")):
        model = get_peft_model(make_model("llama"), copy.deepcopy(config))
        model.add_adapter("other", copy.deepcopy(config))
        model.set_adapter("other")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".other" in name:
                    p.normal_(0, 0.5)
        model.set_adapter("default")
        model.eval()
        ids = make_batch("llama", batch=2)["input_ids"]
        with torch.no_grad():
            mixed = model(input_ids=ids, adapter_names=["default", "other"]).logits
            alone = model(input_ids=ids).logits
        assert not torch.allclose(mixed[1], alone[1], atol=1e-4), type(config).__name__


# ------------------------------------------------------------------------------------------------------ 4-bit


@pytest.fixture(scope="module")
def llama_4bit_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    return save_tiny_llama_for_4bit(tmp_path_factory.mktemp("tiny-llama-4bit"))


QUANTIZED = ["bitfit", "layerselect", "sparsemask", "sparsemask-mask", "dps", "learner"]


def two_adapters_on_4bit(llama_4bit_dir, tuner: str):
    """``tuner`` with two differently trained adapters on the 4-bit LLaMA (eval mode), a batch, and each row's
    output through each adapter alone and through the base."""
    import bitsandbytes as bnb

    base = load_4bit(llama_4bit_dir)
    assert isinstance(base.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    model = get_peft_model(base, config_for(tuner, "llama"))
    train(model, "llama", steps=2, lr=2e-2)
    model.add_adapter("other", config_for(tuner, "llama"))
    model.set_adapter("other")
    train(model, "llama", steps=3, lr=3e-2)
    model.set_adapter("default")
    model.eval()
    ids = make_batch("llama", batch=len(NAMES))["input_ids"]
    with torch.no_grad():
        alone = {}
        for adapter in ("default", "other"):
            model.set_adapter(adapter)
            alone[adapter] = model(input_ids=ids).logits
        with model.disable_adapter():
            alone["__base__"] = model(input_ids=ids).logits
        model.set_adapter("default")
    assert not torch.allclose(alone["default"], alone["other"], atol=1e-4)
    return model, ids, alone


@pytest.mark.parametrize("tuner", QUANTIZED)
def test_each_row_equals_its_adapter_alone_on_a_4bit_base(llama_4bit_dir, tuner):
    model, ids, alone = two_adapters_on_4bit(llama_4bit_dir, tuner)
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-block"])
def test_a_4bit_base_folds_each_group_into_one_dequantized_buffer(llama_4bit_dir, tuner, monkeypatch):
    """On a 4-bit base the groups' sparse increments fold into the weight dequantized once per layer for the whole
    batch (no bitsandbytes product, no sparse product beside it): each row equals its adapter alone, and the packed
    weights are untouched."""
    import bitsandbytes as bnb

    from peft_sparse import quantized
    from peft_sparse.tuners.base import SparseTunerLayer

    model, ids, alone = two_adapters_on_4bit(llama_4bit_dir, tuner)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    monkeypatch.setattr(SparseTunerLayer, "fold_min_tokens", 2)
    dequantized, bnb_products = [], []
    original_dequantize = quantized.dequantize_4bit
    monkeypatch.setattr(quantized, "dequantize_4bit", lambda *a: (dequantized.append(1), original_dequantize(*a))[1])
    original_matmul = bnb.matmul_4bit
    monkeypatch.setattr(bnb, "matmul_4bit", lambda *a, **k: (bnb_products.append(1), original_matmul(*a, **k))[1])
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=NAMES).logits
    layers = sum(isinstance(m, SparseTunerLayer) for m in model.modules())
    assert len(dequantized) == layers and not bnb_products  # one dequantization per layer, for all the groups
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
    for row, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-4, atol=1e-4, msg=f"row {row} ({name})")


@pytest.mark.parametrize("tuner", ["sparsemask", "sparsemask-block", "sparsemask-mask"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_folding_sparse_increments_gives_the_sparse_products_rows_and_leaves_the_weights_bit_equal(
    tuner, arch, monkeypatch
):
    """Without autograd, SparseMask's groups fold their support into the float weight for their own product and
    restore it exactly; with autograd (or folding off) they take base + sparse products: the same rows."""
    from peft_sparse.tuners.base import SparseTunerLayer

    from test_exact_merge import assert_bit_equal, base_tensors

    model, _ = two_adapters(tuner, arch)
    ids = make_batch(arch, batch=len(NAMES))["input_ids"]
    monkeypatch.setattr(SparseTunerLayer, "fold_min_tokens", 2)  # the tiny batch has 7 tokens a row
    loaded = base_tensors(model)
    folds = []
    original = SparseTunerLayer._folded_mixed_batch

    def spy(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        folds.append(out is not None)
        return out

    monkeypatch.setattr(SparseTunerLayer, "_folded_mixed_batch", spy)
    with torch.no_grad():
        folded = model(input_ids=ids, adapter_names=NAMES).logits
    assert folds and all(folds)
    assert_bit_equal(model, loaded)
    folds.clear()
    products = model(input_ids=ids, adapter_names=NAMES).logits.detach()  # autograd on: no folding
    monkeypatch.setattr(SparseTunerLayer, "fold_mixed_batches", False)
    with torch.no_grad():
        unfolded = model(input_ids=ids, adapter_names=NAMES).logits
    assert not folds
    torch.testing.assert_close(folded, products, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unfolded, products, rtol=0, atol=0)


def test_beam_search_on_an_encoder_decoder_keeps_the_encoders_rows():
    """Under beam search the decoder sees each row ``num_beams`` times and the encoder once (PEFT LoRA's handling):
    the encoder's layers get the original names, the decoder's the repeated ones."""
    from transformers import BartConfig, BartForConditionalGeneration

    from peft_sparse import SparseMaskConfig

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    base = BartForConditionalGeneration(config).eval()
    reference = copy.deepcopy(base)
    sparse = lambda: SparseMaskConfig(task_type="SEQ_2_SEQ_LM", density=0.2, target_modules=["q_proj", "v_proj", "fc1"])  # noqa: E731
    model = get_peft_model(base, sparse())
    model.add_adapter("other", sparse())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "sparsemask_delta" in name:
                param.normal_(0, 0.5)
    model.eval()
    ids = torch.randint(3, 64, (3, 6), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default"]
    settings = dict(max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
        for row, name in enumerate(names):
            if name == "__base__":
                alone = reference.generate(input_ids=ids[row : row + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
            assert torch.equal(mixed.sequences[row], alone.sequences[0])
            torch.testing.assert_close(mixed.sequences_scores[row], alone.sequences_scores[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tuner", ["bitfit", "sparsemask", "sparsemask-mask", "dps", "learner", "layerselect"])
def test_generate_gives_each_row_its_adapter_on_a_4bit_base(llama_4bit_dir, tuner):
    model = get_peft_model(load_4bit(llama_4bit_dir), config_for(tuner, "llama"))
    train(model, "llama", steps=2, lr=5e-2)
    model.add_adapter("other", config_for(tuner, "llama"))
    model.set_adapter("other")
    train(model, "llama", steps=3, lr=8e-2)
    model.set_adapter("default")
    model.eval()
    names = ["other", "__base__", "default"]
    ids = make_batch("llama", batch=len(names), seq=5, seed=3)["input_ids"]
    settings = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True,
                    return_dict_in_generate=True)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, adapter_names=names, **settings)
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=ids[row : row + 1], **settings)
            else:
                model.set_adapter(name)
                alone = model.generate(input_ids=ids[row : row + 1], **settings)
            assert torch.equal(mixed.sequences[row], alone.sequences[0]), (row, name)
            first = torch.stack([s[row] for s in mixed.scores])  # every step's logits of this row
            torch.testing.assert_close(first, torch.stack([s[0] for s in alone.scores]), rtol=1e-4, atol=1e-4)


def test_a_folded_batch_swaps_shared_supports_in_one_scatter_and_restores_other_supports(monkeypatch):
    """Adapters on one support (magnitude selection from one base) follow each other in the weight by rewriting the
    saved entries; an adapter on its own support (random selection) and ``"__base__"`` rows restore first. Every row
    still equals its adapter alone and the weights end bit-equal to the loaded ones."""
    from peft_sparse import SparseMaskConfig
    from peft_sparse.tuners import merging
    from peft_sparse.tuners.base import SparseTunerLayer

    from test_exact_merge import assert_bit_equal, base_tensors

    model, reference = two_adapters("sparsemask", "llama")
    model.add_adapter("random", SparseMaskConfig(task_type="CAUSAL_LM", density=0.05, selection="random", seed=3))
    model.set_adapter("random")
    train(model, "llama", lr=3e-2, steps=3)
    model.set_adapter("default")
    model.eval()
    names = ["default", "other", "random", "__base__", "default", "other"]
    ids = make_batch("llama", batch=len(names))["input_ids"]
    alone = each_alone(model, reference, ids)
    with torch.no_grad():
        model.set_adapter("random")
        alone["random"] = model(input_ids=ids).logits
        model.set_adapter("default")
    loaded = base_tensors(model)
    monkeypatch.setattr(SparseTunerLayer, "fold_min_tokens", 2)
    rewrites = []
    original = merging.rewrite
    monkeypatch.setattr(merging, "rewrite", lambda *a: (rewrites.append(1), original(*a)))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
    assert rewrites  # "default" -> "other" shares the magnitude support: swapped in place
    assert_bit_equal(model, loaded)
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], alone[name][row], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")

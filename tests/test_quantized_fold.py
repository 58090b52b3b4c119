"""Increments folded into a quantized base layer's own product (``peft_sparse.quantized``): outputs and gradients equal
the dense reference ``F.linear(x, dequant(W) + ΔW, b)``, one dequantization per pass and no product beside it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from torch.utils.checkpoint import checkpoint

from peft_sparse import DPSConfig, LayerSelectConfig, SparseMaskConfig
from peft_sparse.tuners.base import SparseTunerLayer

from tiny_models import make_batch

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)  # 4-bit layers need in_features >= 64 on bitsandbytes' CPU path
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def quantized_llama(path, quant_type="nf4", double=False, dtype=torch.float32):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
                                bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def dequantized(layer) -> torch.Tensor:
    weight = layer.get_base_layer().weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


CONFIGS = {
    "entries": lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.05),
    "blocks16": lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.1, block_size=16),
    "mask": lambda: SparseMaskConfig(task_type="CAUSAL_LM", mode="mask", sparsity=0.1),
}


@pytest.mark.parametrize("support", list(CONFIGS))
@pytest.mark.parametrize("quant_type, double", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["plain", "reentrant", "non-reentrant"])
def test_sparse_increment_matches_the_dense_reference(llama_dir, support, quant_type, double, dtype, checkpointing):
    model = get_peft_model(quantized_llama(llama_dir, quant_type, double, dtype), CONFIGS[support]()).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.sparsemask_delta["default"]
    if support != "mask":
        with torch.no_grad():
            delta.values.normal_(0, 0.05)
    torch.manual_seed(1)
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad_out = torch.randn(2, 5, 64)
    out = checkpoint(layer, x, use_reentrant=checkpointing) if checkpointing is not None else layer(x)
    out.backward(grad_out)

    # The reference: the dequantized weight plus a dense ΔW built from values that require grad, in the compute dtype.
    values = delta.values.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    effective = layer.delta_values("default") if support == "mask" else values
    dense = torch.zeros(64 * 64).index_add(0, delta.indices, effective.float()).view(64, 64)
    weight = (dequantized(layer) + dense).to(dtype)
    expected = F.linear(reference_x.to(dtype), weight).to(x.dtype)
    expected.backward(grad_out)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(x.grad, reference_x.grad, **tolerance)
    if support != "mask":
        scale = values.grad.abs().max()
        torch.testing.assert_close(delta.values.grad / scale, values.grad / scale, **tolerance)
    else:
        assert delta.values.grad is not None and delta.values.grad.abs().sum() > 0


@pytest.mark.parametrize("make", [
    lambda: DPSConfig(task_type="CAUSAL_LM", total_step=4),
    lambda: LayerSelectConfig(task_type="CAUSAL_LM", layers=[0]),
], ids=["dps", "layerselect"])
def test_dense_increment_matches_the_dense_reference(llama_dir, make):
    model = get_peft_model(quantized_llama(llama_dir), make()).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    holder = layer.dps_delta["default"] if hasattr(layer, "dps_delta") else layer.layerselect_delta["default"]["weight"]
    with torch.no_grad():
        holder.normal_(0, 0.05)
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad_out = torch.randn(2, 5, 64)
    layer(x).backward(grad_out)
    reference_delta = holder.detach().clone().requires_grad_(True)
    reference_x = x.detach().clone().requires_grad_(True)
    F.linear(reference_x, dequantized(layer) + reference_delta).backward(grad_out)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(holder.grad, reference_delta.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [CONFIGS["entries"], CONFIGS["blocks16"], CONFIGS["mask"],
                                  lambda: DPSConfig(task_type="CAUSAL_LM", total_step=4),
                                  lambda: LayerSelectConfig(task_type="CAUSAL_LM", layers=[0, 1])],
                         ids=["entries", "blocks16", "mask", "dps", "layerselect"])
def test_one_dequantization_per_pass_and_no_product_beside_the_base(llama_dir, make, monkeypatch):
    """Fails if a wrapped 4-bit layer runs its own forward (a second product beside the increment), a sparse product,
    bitsandbytes' own 4-bit matmul, or dequantizes more than once in the forward or in the backward."""
    import peft_sparse.quantized as quantized
    from peft_sparse.kernels import function as kfn

    calls: list[str] = []

    def count(owner, name):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.append(name) or original(*a, **k))

    for owner, name in [(quantized, "dequantize_4bit"), (kfn, "spmm"), (kfn, "spmm_t"), (bnb, "matmul_4bit"),
                        (bnb.nn.Linear4bit, "forward")]:
        count(owner, name)
    model = get_peft_model(quantized_llama(llama_dir), make()).train()
    wrapped = [n for n, m in model.named_modules() if isinstance(m, SparseTunerLayer) and m.is_quantized]
    assert wrapped
    loss = model(**make_batch("llama")).loss
    assert sorted(calls) == ["dequantize_4bit"] * len(wrapped)
    calls.clear()
    loss.backward()
    # Block 0's q/k/v read the frozen embeddings through a frozen norm: no input gradient, so no dequantization in
    # their backward (LayerSelect trains that norm, so their inputs need a gradient there).
    frozen_input = ("layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj")
    trains_norms = isinstance(model.peft_config["default"], LayerSelectConfig)
    needs_input_grad = [n for n in wrapped if trains_norms or not n.endswith(frozen_input)]
    assert sorted(calls) == ["dequantize_4bit"] * len(needs_input_grad)


def test_8bit_training_on_cpu_folds_and_matches_the_int8_dequantized_product(llama_dir):
    base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map="cpu")
    model = get_peft_model(base, SparseMaskConfig(task_type="CAUSAL_LM", density=0.05)).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.sparsemask_delta["default"]
    with torch.no_grad():
        delta.values.normal_(0, 0.05)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        folded = layer(x)
        beside = layer.base_layer(x) + (x @ layer.get_delta_weight("default").T)
    torch.testing.assert_close(folded, beside, rtol=1e-5, atol=1e-5)
    layer.eval()  # int8 inference quantizes the activations too: the increment stays beside that product
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.get_delta_weight("default").T)

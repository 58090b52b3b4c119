"""BitFit and LayerSelect on bitsandbytes 8-bit and 4-bit base layers (CPU backend of bitsandbytes 0.50)."""


import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_sparse import BitFitConfig, DPSConfig, LayerSelectConfig, LearnerConfig, SparseMaskConfig

from tiny_models import make_batch

bnb = pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

QUANT = {
    8: BitsAndBytesConfig(load_in_8bit=True),
    4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}
LAYER_TYPES = {8: bnb.nn.Linear8bitLt, 4: bnb.nn.Linear4bit}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # 4-bit layers need in_features >= 64 on bitsandbytes' CPU path.
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def forward(model, batch):
    # Train mode: bitsandbytes' CPU 4-bit eval path repacks weights in place (see notes/peft-internals.md).
    model.train()
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("make_config", [
    lambda: BitFitConfig(task_type="CAUSAL_LM"),
    lambda: LayerSelectConfig(task_type="CAUSAL_LM", layers=[1]),
    lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.02),
    lambda: SparseMaskConfig(task_type="CAUSAL_LM", mode="mask", sparsity=0.05),
    lambda: DPSConfig(task_type="CAUSAL_LM", total_step=2, update_ratio=0.5),
    lambda: LearnerConfig(task_type="CAUSAL_LM", priming_steps=0),
], ids=["bitfit", "layerselect", "sparsemask-delta", "sparsemask-mask", "dps", "learner"])
def test_quantized_base(llama_dir, bits, make_config, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QUANT[bits], device_map="cpu")
    assert isinstance(base.model.layers[1].self_attn.q_proj, LAYER_TYPES[bits])
    batch = make_batch("llama")
    reference = forward(base, batch)
    config = make_config()
    model = get_peft_model(base, config)
    if getattr(config, "mode", None) != "mask":  # a mask prunes from the start
        torch.testing.assert_close(forward(model, batch), reference, rtol=0, atol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        model(**batch).loss.backward()
        opt.step()
        if hasattr(model.base_model, "update_and_allocate"):
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
    trained = forward(model, batch)
    assert (trained - reference).abs().max() > 1e-3
    with model.disable_adapter():
        torch.testing.assert_close(forward(model, batch), reference, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=QUANT[bits], device_map="cpu")
    torch.testing.assert_close(forward(PeftModel.from_pretrained(fresh, tmp_path), batch), trained, rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[1].self_attn.q_proj, LAYER_TYPES[bits])  # still quantized
    # Merging a weight delta re-quantizes it, which costs precision; bias deltas merge exactly.
    tolerance = 1e-5 if isinstance(config, BitFitConfig) else {8: 0.02, 4: 0.2}[bits]
    torch.testing.assert_close(forward(merged, batch), trained, rtol=0, atol=tolerance)



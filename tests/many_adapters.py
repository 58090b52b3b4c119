"""Helpers of the several-adapters tests (mixed batches, exact merge, hot-swap, composition): two trained adapters on
one tiny model, and a tiny LLaMA saved for 4-bit loading (on ``sys.path`` via pytest's ``pythonpath = tests``)."""

from __future__ import annotations

import torch

from peft_sparse import calibrate, requires_calibration

from test_common import build, config_for, train
from tiny_models import make_batch


def two_adapters(tuner: str, arch: str):
    """``tuner`` with two differently trained adapters, ``default`` (active) and ``other``, in eval mode, and a
    copy of the base model."""
    model, reference = build(tuner, arch)
    train(model, arch)
    model.add_adapter("other", config_for(tuner, arch))
    model.set_adapter("other")
    if requires_calibration(model):
        calibrate(model, [make_batch(arch, seed=s) for s in (5, 6)])
    train(model, arch, lr=3e-2, steps=4)
    model.set_adapter("default")
    return model.eval(), reference.eval()


def save_tiny_llama_for_4bit(path) -> str:
    """A 2-block LLaMA with ``in_features >= 64`` (bitsandbytes' CPU 4-bit path needs it), saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_4bit(path):
    """The saved model in NF4 (bitsandbytes on the CPU), fp32 compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")

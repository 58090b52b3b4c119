"""Tiny models built from configs (no downloads) and helpers shared by the tests (on sys.path via pytest's
``pythonpath = tests``)."""

from __future__ import annotations


import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import peft_sparse  # noqa: F401  (registers the tuners)

VOCAB = 64


def tiny_bert(num_layers: int = 3, num_labels: int = 2) -> torch.nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2(num_layers: int = 3) -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=num_layers, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def tiny_llama(num_layers: int = 3, **overrides) -> torch.nn.Module:
    settings = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=num_layers,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    settings.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**settings))


ARCHS = {
    "bert": (tiny_bert, "SEQ_CLS"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "llama": (tiny_llama, "CAUSAL_LM"),
}


def make_model(arch: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch][0](**kwargs)
    # Non-zero biases everywhere, so that "bias unchanged" and "merged bias" checks are not trivially true.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def make_batch(arch: str, batch: int = 4, seq: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    if ARCHS[arch][1] == "SEQ_CLS":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def train_steps(model: torch.nn.Module, batch: dict, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on trainable parameters; leaves the model in eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def snapshot(model: torch.nn.Module) -> dict:
    """Module types, parameter values and requires_grad flags, to prove a failed call left the model alone."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"]
    assert after["params"].keys() == before["params"].keys()
    for name, (value, flag) in before["params"].items():
        assert torch.equal(after["params"][name][0], value), name
        assert after["params"][name][1] == flag, name


#: A ChatML template (SmolLM2's, without its default system turn), so that chat-formatted tests stay short.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer with a ChatML chat template whose ids fit the tiny models' ``VOCAB`` (built in
    memory, no download): lower-case letters, digits, space, newline and some punctuation, one token each."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789 \n.,!?'-:")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer

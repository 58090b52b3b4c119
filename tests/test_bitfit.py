import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_sparse import BitFitConfig
from peft_sparse.tuners.bitfit import BitFitLayer

from tiny_models import (
    ARCHS, assert_unchanged, logits, make_batch, make_model, snapshot, train_steps, trainable_names,
)


def bitfit(arch, **kwargs):
    base = make_model(arch)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, BitFitConfig(task_type=ARCHS[arch][1], **kwargs))
    return model, reference


def test_outputs_unchanged_at_init_and_only_biases_train(arch):
    model, reference = bitfit(arch)
    batch = make_batch(arch)
    torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
    names = trainable_names(model)
    head = [n for n in names if "modules_to_save" in n]
    assert all(n.split(".")[-2] == "bitfit_bias" for n in names if n not in head)
    n_linear = sum(1 for m in reference.modules() if type(m).__name__ in ("Linear", "Conv1D"))
    n_head = 1  # the output layer (lm_head, or the BERT classifier trained whole) gets no bias delta
    n_layernorm = sum(1 for m in reference.modules() if isinstance(m, torch.nn.LayerNorm))
    n_wrapped = sum(1 for m in model.modules() if isinstance(m, BitFitLayer))
    assert n_wrapped == n_linear - n_head + n_layernorm
    if arch == "bert":
        assert any("classifier" in n for n in head)


def test_llama_layers_without_bias_get_a_zero_bias_and_merge_creates_it():
    model, reference = bitfit("llama")
    batch = make_batch("llama")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BitFitLayer) and q.get_base_layer().bias is None
    train_steps(model, batch)
    trained = logits(model, batch)
    assert not torch.allclose(trained, logits(reference, batch))
    merged = model.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(logits(merged, batch), trained, rtol=1e-5, atol=1e-5)






def test_save_holds_only_bias_deltas_and_head_and_round_trips(arch, tmp_path):
    model, _ = bitfit(arch)
    batch = make_batch(arch)
    train_steps(model, batch)
    trained = logits(model, batch)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    for key in saved:
        assert key.endswith("bitfit_bias") or "classifier" in key, key
    n_bias_entries = sum(v.numel() for k, v in saved.items() if k.endswith("bitfit_bias"))
    assert n_bias_entries == sum(m.out_features for m in model.modules() if isinstance(m, BitFitLayer))
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), trained, rtol=0, atol=0)


def test_subset_of_biases_like_the_paper():
    model, _ = bitfit("bert", target_modules=["query", "intermediate.dense"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, BitFitLayer))
    assert len(wrapped) == 2 * 3  # query and intermediate.dense in each of 3 blocks
    assert all(n.endswith(("attention.self.query", "intermediate.dense")) for n in wrapped)




@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_modules": ["query", "no_such_module"]}, r"\['no_such_module'\] match no module"),
        ({"target_modules": ["word_embeddings"]}, r"cannot wrap these target modules.*Embedding"),
        ({"target_modules": ["classifier"]}, r"part of the task head"),
    ],
)
def test_bad_targets_raise_and_leave_the_model_untouched(kwargs, message):
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match=message):
        get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", **kwargs))
    assert_unchanged(base, before)


def test_config_validation():
    with pytest.raises(ValueError, match="target_modules must be non-empty names"):
        BitFitConfig(target_modules=[])
    with pytest.raises(ValueError, match="`layers_to_transform` must be a block index"):
        BitFitConfig(layers_to_transform=[-1])

"""The conventions of causal-LM fine-tuning, with every tuner: ``target_modules="all-linear"``, gradient checkpointing
(reentrant and not), ``peft.prepare_model_for_kbit_training`` on 8-bit and 4-bit bases, ``generate`` with an
active / disabled / merged adapter, half-precision bases and autocast, and the memory of SparseMask's training step.
"""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from peft_sparse import (
    BitFitConfig,
    DPSConfig,
    LayerSelectConfig,
    LearnerConfig,
    SparseMaskConfig,
    calibrate,
    requires_calibration,
    sparse,
)

from peft_sparse.tuners.sparsemask import selection

from tiny_models import ARCHS, make_batch, make_model

#: One config of every tuner (and mode), built for a task type. DPS gets a run length so that it can be stepped.
TUNERS = {
    "bitfit": lambda task: BitFitConfig(task_type=task),
    "layerselect": lambda task: LayerSelectConfig(task_type=task, layers=[1]),
    "sparsemask": lambda task: SparseMaskConfig(task_type=task, density=0.05),
    "sparsemask-block": lambda task: SparseMaskConfig(task_type=task, density=0.2, block_size=4),
    "mask": lambda task: SparseMaskConfig(task_type=task, mode="mask", sparsity=0.1),
    "dps": lambda task: DPSConfig(task_type=task, total_step=4, update_ratio=0.5),
    "learner": lambda task: LearnerConfig(task_type=task, priming_steps=0),
}

#: The selections that ``calibrate`` measures from data.
CALIBRATED = {
    "sparsemask-gradient": lambda task: SparseMaskConfig(task_type=task, density=0.05, selection="gradient"),
    "layerselect-k": lambda task: LayerSelectConfig(task_type=task, num_layers=1),
    "learner-priming": lambda task: LearnerConfig(task_type=task, priming_steps=2),
}


def tuned_layers(model: nn.Module) -> list[str]:
    """Names of the modules a tuner wrapped, without the PEFT wrapper prefix."""
    return sorted(
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer")
    )


def grads_of(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.train()
    model(**batch).loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(expected: dict, actual: dict) -> None:
    assert expected.keys() == actual.keys()
    assert expected, "nothing trainable"
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in expected.values())


# ------------------------------------------------------------------------------------------------- all-linear


ALL_LINEAR = {
    "bitfit": lambda task: BitFitConfig(task_type=task, target_modules="all-linear"),
    "sparsemask": lambda task: SparseMaskConfig(task_type=task, target_modules="all-linear"),
    "mask": lambda task: SparseMaskConfig(task_type=task, mode="mask", target_modules="all-linear"),
    "dps": lambda task: DPSConfig(task_type=task, target_modules="all-linear"),
    # LayerSelect: the linear layers of the chosen blocks (here all of them), its norms left out.
    "layerselect": lambda task: LayerSelectConfig(task_type=task, layers=[0, 1, 2], target_modules="all-linear"),
}


@pytest.mark.parametrize("tuner", list(ALL_LINEAR))
def test_all_linear_wraps_exactly_what_lora_wraps(arch, tuner, tmp_path):
    task = ARCHS[arch][1]
    expected = tuned_layers(get_peft_model(make_model(arch), LoraConfig(task_type=task, target_modules="all-linear")))
    if tuner == "layerselect":
        expected = [name for name in expected if ".pooler." not in name]  # BERT's pooler is outside the blocks
    model = get_peft_model(make_model(arch), ALL_LINEAR[tuner](task))
    assert tuned_layers(model) == expected
    model.save_pretrained(tmp_path)  # the saved config reloads onto the same layers
    assert tuned_layers(PeftModel.from_pretrained(make_model(arch), tmp_path)) == expected


def test_learner_refuses_all_linear_clearly():
    model = make_model("llama")
    with pytest.raises(ValueError, match="all-linear.*LearnerConfig"):
        get_peft_model(model, LearnerConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


# --------------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_gradient_checkpointing_gives_the_gradients_of_a_plain_run(arch, tuner, use_reentrant):
    task, batch = ARCHS[arch][1], make_batch(arch)
    expected = grads_of(get_peft_model(make_model(arch), TUNERS[tuner](task)), batch)
    model = get_peft_model(make_model(arch), TUNERS[tuner](task))
    # As the Trainer does it (gradient_checkpointing=True): on the PEFT model, after get_peft_model.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.is_gradient_checkpointing
    assert_same_grads(expected, grads_of(model, batch))


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("selection", list(CALIBRATED))
def test_calibration_under_gradient_checkpointing_chooses_the_same(selection, use_reentrant):
    batches = [make_batch("llama", seed=s) for s in range(2)]

    def calibrated(checkpointing: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = get_peft_model(make_model("llama"), CALIBRATED[selection]("CAUSAL_LM"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        calibrate(model, batches)
        assert not requires_calibration(model)
        return {k: v for k, v in model.state_dict().items() if "_delta" in k or "learner_" in k}

    expected, actual = calibrated(False), calibrated(True)
    assert expected.keys() == actual.keys() and expected
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-7, msg=key)


# --------------------------------------------------------------------------------------------- k-bit bases


QUANT = {
    8: lambda: BitsAndBytesConfig(load_in_8bit=True),
    4: lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}
QUANT_TUNERS = {  # larger blocks on the 64-wide layers that bitsandbytes' CPU 4-bit path needs
    **TUNERS,
    "sparsemask-block": lambda task: SparseMaskConfig(task_type=task, density=0.25, block_size=16),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama-64")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_quantized(path, bits: int) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANT[bits](), device_map="cpu")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tuner", list(QUANT_TUNERS))
def test_prepare_model_for_kbit_training(llama_dir, bits, tuner):
    """PEFT's QLoRA recipe (fp32 norms and embeddings, reentrant checkpointing, input grads) with every tuner: the
    gradients equal those of a run without checkpointing, and a training step changes the outputs."""
    batch = make_batch("llama")

    def prepared(checkpointing: bool) -> nn.Module:
        base = prepare_model_for_kbit_training(load_quantized(llama_dir, bits), use_gradient_checkpointing=checkpointing)
        return get_peft_model(base, QUANT_TUNERS[tuner]("CAUSAL_LM"))

    expected = grads_of(prepared(False), batch)
    model = prepared(True)
    assert model.base_model.model.is_gradient_checkpointing
    assert_same_grads(expected, grads_of(model, batch))
    before = model(**batch).logits.detach()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    optimizer.step()
    assert (model(**batch).logits - before).abs().max() > 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_all_linear_on_a_quantized_base_wraps_what_lora_wraps(llama_dir, bits):
    lora = get_peft_model(load_quantized(llama_dir, bits), LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear"))
    model = get_peft_model(load_quantized(llama_dir, bits), SparseMaskConfig(task_type="CAUSAL_LM",
                                                                             target_modules="all-linear"))
    assert tuned_layers(model) == tuned_layers(lora) and len(tuned_layers(model)) == 14


# ------------------------------------------------------------------------------------------------- generate


def generate(model: nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` with the KV cache: the tokens and the logits of each step, ``(batch, steps, vocab)``."""
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, dim=1)


def full_forward_logits(model: nn.Module, sequences: torch.Tensor, steps: int) -> torch.Tensor:
    """The logits that predicted the last ``steps`` tokens, from one forward over the whole sequence (no cache)."""
    with torch.no_grad():
        return model(input_ids=sequences, use_cache=False).logits[:, -steps - 1 : -1]


def train_hard(model: nn.Module, batch: dict, steps: int = 5, lr: float = 5e-2) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        if hasattr(model.base_model, "update_and_allocate"):
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("tuner", list(TUNERS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_an_active_a_disabled_and_a_merged_adapter(arch, tuner):
    base = make_model(arch)
    reference = copy.deepcopy(base)
    prompt, steps = make_batch(arch, batch=2, seq=4, seed=3)["input_ids"], 6
    base_tokens, base_logits = generate(reference, prompt, steps)
    model = get_peft_model(base, TUNERS[tuner]("CAUSAL_LM"))
    train_hard(model, make_batch(arch))
    tokens, step_logits = generate(model, prompt, steps)
    # Cached decoding (one token at a time through the adapter) agrees with a forward over the whole sequence.
    torch.testing.assert_close(step_logits, full_forward_logits(model, tokens, steps), rtol=1e-4, atol=1e-5)
    assert (step_logits - base_logits).abs().max() > 1e-4, "the adapter does not act in generate"
    with model.disable_adapter():
        disabled_tokens, disabled_logits = generate(model, prompt, steps)
    torch.testing.assert_close(disabled_tokens, base_tokens, rtol=0, atol=0)
    torch.testing.assert_close(disabled_logits, base_logits, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    merged_tokens, merged_logits = generate(merged, prompt, steps)
    torch.testing.assert_close(merged_tokens, tokens, rtol=0, atol=0)
    torch.testing.assert_close(merged_logits, step_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tuner", ["sparsemask", "dps", "learner"])
def test_generate_and_merge_on_quantized_bases(llama_dir, bits, tuner):
    prompt, steps = make_batch("llama", batch=2, seq=4, seed=3)["input_ids"], 5
    base_tokens, base_logits = generate(load_quantized(llama_dir, bits).train(), prompt, steps)
    model = get_peft_model(load_quantized(llama_dir, bits), QUANT_TUNERS[tuner]("CAUSAL_LM"))
    train_hard(model, make_batch("llama"), steps=2, lr=1e-2)
    model.train()  # bitsandbytes' CPU 4-bit eval path repacks weights in place (notes/peft-internals.md)
    tokens, step_logits = generate(model, prompt, steps)
    torch.testing.assert_close(step_logits, full_forward_logits(model, tokens, steps), rtol=1e-4, atol=1e-4)
    assert (step_logits - base_logits).abs().max() > 1e-3
    with model.disable_adapter():
        disabled_tokens, disabled_logits = generate(model, prompt, steps)
    torch.testing.assert_close(disabled_tokens, base_tokens, rtol=0, atol=0)
    torch.testing.assert_close(disabled_logits, base_logits, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    layer_type = {8: bnb.nn.Linear8bitLt, 4: bnb.nn.Linear4bit}[bits]
    assert isinstance(merged.model.layers[0].mlp.down_proj, layer_type)  # merged into the quantized weight
    merged_tokens, _ = generate(merged, prompt, steps)
    assert merged_tokens.shape == tokens.shape
    # Re-quantizing the merged weight costs its quantization error, no more (the same bound as test_quantized).
    torch.testing.assert_close(full_forward_logits(merged, tokens, steps), step_logits, rtol=0,
                               atol={8: 0.02, 4: 0.2}[bits])


def test_eval_forwards_leave_a_4bit_weight_readable_for_merging(llama_dir):
    """bitsandbytes repacks CPU 4-bit weights at the first eval forward on AVX512-BF16 CPUs, after which they no
    longer dequantize to the layer's weight: wrapped layers opt out, so merging after generate stays right."""
    base = load_quantized(llama_dir, 4)
    if not base.model.layers[0].mlp.down_proj.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    model = get_peft_model(base, SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    weight = layer.get_base_weight().clone()
    train_hard(model, make_batch("llama"), steps=2, lr=1e-2)  # ends in eval mode
    batch = make_batch("llama")
    with torch.no_grad():
        model(**batch)  # an eval-mode forward: where bitsandbytes would repack
    torch.testing.assert_close(layer.get_base_weight(), weight, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        trained = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, trained, rtol=0, atol=0.2)


# ------------------------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tuner", list(TUNERS) + list(CALIBRATED))
def test_half_precision_bases_keep_fp32_values_by_default(tuner, dtype):
    """On a bf16/fp16 base every tuner trains fp32 values (get_peft_model's ``autocast_adapter_dtype=True``),
    also those created by calibration; the forward stays in the base's dtype; merging folds them in."""
    make_config = {**TUNERS, **CALIBRATED}[tuner]
    batch = make_batch("llama")
    model = get_peft_model(make_model("llama").to(dtype), make_config("CAUSAL_LM"))
    if requires_calibration(model):
        calibrate(model, [batch, make_batch("llama", seed=2)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    train_hard(model, batch, steps=3)
    with torch.no_grad():
        out = model(**batch).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    with model.disable_adapter(), torch.no_grad():
        assert (model(**batch).logits - out).abs().max() > 0
    merged = model.merge_and_unload()
    assert all(p.dtype == dtype for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, out, rtol=0, atol=0.1)


@pytest.mark.parametrize("tuner", ["bitfit", "sparsemask", "dps", "layerselect", "learner"])
def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tuner):
    model = get_peft_model(make_model("llama").to(torch.bfloat16), TUNERS[tuner]("CAUSAL_LM"),
                           autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    model.train()
    loss = model(**make_batch("llama")).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_mask_scores_stay_fp32_even_without_autocast_adapter_dtype():
    model = get_peft_model(make_model("llama").to(torch.bfloat16), SparseMaskConfig(task_type="CAUSAL_LM", mode="mask"),
                           autocast_adapter_dtype=False)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_learner_priming_refuses_fp16_values_and_leaves_the_model_as_it_was():
    model = get_peft_model(make_model("llama").to(torch.float16), CALIBRATED["learner-priming"]("CAUSAL_LM"),
                           autocast_adapter_dtype=False)
    model.eval()
    with pytest.raises(ValueError, match="float16.*autocast_adapter_dtype"):
        calibrate(model, [make_batch("llama")])
    assert requires_calibration(model) and not model.training and not model.base_model._calibrating


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tuner", list(TUNERS))
def test_autocast_on_an_fp32_base(tuner, dtype):
    """The Trainer's ``bf16=True`` / ``fp16=True`` (and TRL's default) run the forward under ``torch.autocast``: the
    loss and the fp32 values' gradients match the fp32 run to half precision."""
    batch = make_batch("llama")
    expected = grads_of(get_peft_model(make_model("llama"), TUNERS[tuner]("CAUSAL_LM")), batch)
    model = get_peft_model(make_model("llama"), TUNERS[tuner]("CAUSAL_LM")).train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(**batch).loss
    loss.backward()
    actual = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert actual[name].dtype == torch.float32
        scale = grad.abs().max().clamp_min(1e-6)
        assert (actual[name] - grad).abs().max() / scale < 0.1, name


# ------------------------------------------------------------------------------------- SparseMask's memory


class RecordAllocations(TorchDispatchMode):
    """Every aten op's newly allocated outputs: ``(op, shape, elements)``. Views of an input (``W.t()``) and the
    index arrays of a sparse tensor built from existing ones allocate nothing and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, tuple, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.layout != torch.strided:  # sparse: what it holds, not its dense size
                self.allocations.append((str(func), tuple(t.shape), int(t.values().numel())))
            elif t.untyped_storage().data_ptr() not in inputs:
                self.allocations.append((str(func), tuple(t.shape), t.untyped_storage().nbytes() // t.element_size()))
        return out


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 96)

    def forward(self, x):
        return self.proj(x)


def weight_sized_allocations(config) -> list[tuple[str, tuple, int]]:
    """Allocations of at least the weight's size in the second training step (forward and backward) of one layer
    that sees 8 tokens: far fewer than the weight's 6,144 entries."""
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), config).train()
    x = torch.randn(2, 4, 64, requires_grad=True)  # requires grad: the backward also runs the input's gradient
    for _ in range(2):  # the first step may build the support's index arrays once
        recorder = RecordAllocations()
        with recorder:
            model(x).square().sum().backward()
    numel = model.base_model.model.proj.get_base_layer().weight.numel()
    return [a for a in recorder.allocations if a[2] >= numel]


@pytest.mark.parametrize("options", [dict(density=0.01), dict(density=0.05, block_size=16),
                                     dict(mode="mask", sparsity=0.1)], ids=["delta", "delta-block16", "mask"])
def test_sparsemask_float_step_allocates_nothing_weight_sized(options):
    # On float bases ΔW is added into W in place for the product and the overwritten entries are put back exactly
    # (forward and backward): no copy of W, no dense ΔW, no dense weight gradient.
    assert weight_sized_allocations(SparseMaskConfig(target_modules=["proj"], **options)) == []


@pytest.mark.parametrize("options", [dict(density=0.05), dict(density=0.05, block_size=16),
                                     dict(mode="mask", sparsity=0.1)], ids=["delta", "delta-block16", "mask"])
def test_sparsemask_float_step_leaves_the_weight_bit_for_bit(options):
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), SparseMaskConfig(target_modules=["proj"], **options)).train()
    layer = model.base_model.model.proj
    with torch.no_grad():
        next(iter(layer.sparsemask_delta.values())).values.normal_()
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    x = torch.randn(2, 4, 64, requires_grad=True)
    out = model(x)
    assert torch.equal(weight, before)
    out.square().sum().backward()
    assert torch.equal(weight, before)
    reference = torch.nn.functional.linear(x, before + layer.get_delta_weight("default"), layer.get_base_layer().bias)
    torch.testing.assert_close(out, reference)


def test_two_active_sparsemask_adapters_fold_one_and_add_the_other_exactly():
    torch.manual_seed(0)
    model = get_peft_model(OneLayer(), SparseMaskConfig(target_modules=["proj"], density=0.05), adapter_name="a")
    model.add_adapter("b", SparseMaskConfig(target_modules=["proj"], density=0.05, selection="random"))
    model.base_model.set_adapter(["a", "b"])
    model.train()
    layer = model.base_model.model.proj
    for delta in layer.sparsemask_delta.values():
        with torch.no_grad():
            delta.values.normal_()
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    x = torch.randn(2, 4, 64, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    assert torch.equal(weight, before)
    values = {a: d.values.detach().clone().requires_grad_(True) for a, d in layer.sparsemask_delta.items()}
    dense = sum(torch.zeros(96 * 64).index_add(0, layer.sparsemask_delta[a].indices, v).view(96, 64)
                for a, v in values.items())
    reference_x = x.detach().clone().requires_grad_(True)
    expected = torch.nn.functional.linear(reference_x, before + dense, layer.get_base_layer().bias)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-4)  # two products' sums, reordered
    for adapter, value in values.items():
        torch.testing.assert_close(layer.sparsemask_delta[adapter].values.grad, value.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block_size", [1, 16], ids=["entries", "blocks16"])
def test_sparse_products_allocate_nothing_weight_sized(block_size):
    # Quantized bases (no float W): the base layer's forward plus sparse products, forward and backward.
    from peft_sparse.kernels.function import sparse_delta_linear

    delta = sparse.SparseDelta((96, 64), selection.random_support((96, 64), 96 * 64 // 20, torch.Generator()),
                               torch.float32) if block_size == 1 else sparse.SparseDelta(
        (96, 64), selection.block_support(torch.tensor([0, 5, 9]), (96, 64), 16), torch.float32, block_size=16)
    layout = delta.layout()
    x = torch.randn(8, 64, requires_grad=True)
    for _ in range(2):
        recorder = RecordAllocations()
        with recorder:
            sparse_delta_linear(x, delta.values, layout).square().sum().backward()
    assert [a for a in recorder.allocations if a[2] >= 96 * 64] == []


def test_the_allocation_recorder_catches_a_weight_sized_increment():
    # DPS trains a dense increment: its forward forms W + ΔW and its backward the dense gradient.
    ops = [op for op, _, _ in weight_sized_allocations(DPSConfig(target_modules=["proj"], total_step=4))]
    assert "aten.mm.default" in ops and "aten.add.Tensor" in ops

"""Regression tests for issue 10's findings: no silent wrong results, no half-applied failures, clear errors.

Each test names the finding it pins down. The common lifecycle of every tuner is in test_common.py."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from peft_sparse import (
    BitFitConfig,
    CalibrationRequiredError,
    DPSConfig,
    LayerSelectConfig,
    LearnerConfig,
    SparseMaskConfig,
    SparseTrainerCallback,
    calibrate,
    requires_calibration,
)
from peft_sparse.tuners.dps import DPSLayer
from peft_sparse.tuners.sparsemask import SparseMaskLayer

from tiny_models import VOCAB, assert_unchanged, logits, make_batch, make_model, snapshot


def batches(arch, n=2):
    return [make_batch(arch, seed=s) for s in range(5, 5 + n)]


# ----------------------------------------------------------------------------------- silent wrong results


def test_1_gradient_calibration_of_a_second_adapter_measures_the_gradient():
    fresh = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient"))
    calibrate(fresh, batches("llama"))
    model = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM"), adapter_name="first")
    model.add_adapter("second", SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient"))
    model.set_adapter("second")
    calibrate(model, batches("llama"))
    fresh_supports = {n.replace("default", "X"): m.sparsemask_delta["default"].indices
                      for n, m in fresh.named_modules() if isinstance(m, SparseMaskLayer)}
    for name, layer in model.named_modules():
        if isinstance(layer, SparseMaskLayer):  # the first adapter's values are zero: the same gradients
            assert torch.equal(layer.sparsemask_delta["second"].indices, fresh_supports[name.replace("default", "X")])


def test_1_layerselect_calibration_beside_another_adapter_counts_each_gradient_once():
    fresh = get_peft_model(make_model("bert"), LayerSelectConfig(task_type="SEQ_CLS", num_layers=1))
    calibrate(fresh, batches("bert"))
    model = get_peft_model(make_model("bert"), LayerSelectConfig(task_type="SEQ_CLS", layers=[1]))
    model.add_adapter("second", LayerSelectConfig(task_type="SEQ_CLS", num_layers=1))
    model.set_adapter("second")
    calibrate(model, batches("bert"))
    torch.testing.assert_close(torch.tensor(model.peft_config["second"].layer_scores),
                               torch.tensor(fresh.peft_config["default"].layer_scores), rtol=1e-6, atol=0)


def test_1_learner_priming_of_a_second_adapter_leaves_the_first_alone():
    model = get_peft_model(make_model("llama"), LearnerConfig(task_type="CAUSAL_LM", priming_steps=0))
    model.add_adapter("second", LearnerConfig(task_type="CAUSAL_LM", priming_steps=2))
    model.base_model.set_adapter(["default", "second"])
    first = {n: p.detach().clone() for n, p in model.named_parameters() if ".default" in n}
    calibrate(model, batches("llama"))
    for name, value in first.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    assert not requires_calibration(model)


@pytest.mark.parametrize("config, exact", [
    (BitFitConfig(task_type="SEQ_CLS"), True),
    (LayerSelectConfig(task_type="SEQ_CLS", layers=[1]), True),
    (SparseMaskConfig(task_type="SEQ_CLS", density=0.05), False),
    (SparseMaskConfig(task_type="SEQ_CLS", mode="mask", sparsity=0.2), False),
    (DPSConfig(task_type="SEQ_CLS", total_step=4), False),
    (LearnerConfig(task_type="SEQ_CLS", priming_steps=0), False),
], ids=["bitfit", "layerselect", "sparsemask", "mask", "dps", "learner"])
def test_2_transformers_load_adapter_is_exact_or_refused(config, exact, tmp_path):
    model = get_peft_model(make_model("bert"), copy.deepcopy(config))
    model.base_model.model.classifier.modules_to_save.default.weight.data.normal_()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad:
                param.data.normal_(0, 0.05) if param.dim() else None
    model.save_pretrained(tmp_path)
    expected = logits(model, make_batch("bert"))
    plain = make_model("bert")
    if exact:
        plain.load_adapter(str(tmp_path))
        torch.testing.assert_close(logits(plain, make_batch("bert")), expected, rtol=1e-6, atol=1e-6)
    else:
        before = snapshot(plain)
        with pytest.raises(ValueError, match="cannot load a .* adapter exactly.*PeftModel.from_pretrained"):
            plain.load_adapter(str(tmp_path))
        assert_unchanged(plain, before)
    loaded = PeftModel.from_pretrained(make_model("bert"), tmp_path)  # PEFT's own loading is exact
    torch.testing.assert_close(logits(loaded, make_batch("bert")), expected, rtol=0, atol=0)


@pytest.mark.parametrize("config_cls", [SparseMaskConfig, DPSConfig, BitFitConfig])
def test_3_layers_to_transform_applies_to_the_default_targets(config_cls):
    model = get_peft_model(make_model("llama"), config_cls(task_type="CAUSAL_LM", layers_to_transform=[0]))
    assert model.base_model.targeted_module_names
    assert all(".layers.0." in n for n in model.base_model.targeted_module_names)
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"layers_to_transform \[99\] out of range.*3 blocks"):
        get_peft_model(base, config_cls(task_type="CAUSAL_LM", layers_to_transform=[0, 99]))
    assert_unchanged(base, before)


def _dataset(n=32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] > VOCAB // 2).long().tolist()})


def _dps_trainer(output_dir, **kwargs):
    model = get_peft_model(make_model("bert"), DPSConfig(task_type="SEQ_CLS", update_ratio=0.25, **kwargs))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
                             report_to="none", use_cpu=True, save_strategy="steps", save_steps=5, seed=0,
                             weight_decay=0.01, logging_strategy="no")
    return model, Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[SparseTrainerCallback()])


@pytest.mark.parametrize("variant", ["dense", "mix"])
def test_4_dps_resumed_mid_stage_equals_the_uninterrupted_run(tmp_path, variant):
    # Stages of 3 steps: I I I II II II I I I II II II; checkpoint-5 is in the middle of stage II.
    model, trainer = _dps_trainer(tmp_path / "full", variant=variant)
    trainer.train()
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if "dps_delta" in n}
    resumed, trainer = _dps_trainer(tmp_path / "full", variant=variant)
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-5"))
    for name, value in expected.items():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], value, rtol=0, atol=0)
    assert not resumed.base_model.save_schedule_state  # the final adapter is saved compact again
    final = PeftModel.from_pretrained(make_model("bert"), tmp_path / "full" / "checkpoint-10")
    assert not any(".dps_schedule" in k for k in final.state_dict())


def test_6_a_gradient_adapter_saved_before_calibration_reloads_waiting_for_it(tmp_path):
    model = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient"))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("llama"), tmp_path, is_trainable=True)
    assert requires_calibration(loaded)
    loaded.train()
    with pytest.raises(CalibrationRequiredError):
        loaded(**make_batch("llama"))
    calibrate(loaded, batches("llama"))
    assert not requires_calibration(loaded)


def test_7_bitfit_merged_into_llama_survives_save_and_load(tmp_path):
    from transformers import LlamaForCausalLM

    model = get_peft_model(make_model("llama"), BitFitConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj"]))
    for module in model.modules():
        if hasattr(module, "bitfit_bias"):
            module.bitfit_bias["default"].data.normal_(0, 0.5)
    expected = logits(model, make_batch("llama"))
    merged = model.merge_and_unload()
    torch.testing.assert_close(logits(merged, make_batch("llama")), expected, rtol=1e-5, atol=1e-5)
    assert merged.config.attention_bias and merged.config.mlp_bias
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, make_batch("llama")), expected, rtol=1e-5, atol=1e-5)


def test_7_bitfit_on_rmsnorm_is_a_clear_error():
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match="without a bias term.*RMSNorm"):
        get_peft_model(base, BitFitConfig(task_type="CAUSAL_LM", target_modules=["input_layernorm"]))
    assert_unchanged(base, before)


def test_8_dps_under_the_trainer_without_the_callback_is_an_error(tmp_path):
    model = get_peft_model(make_model("bert"), DPSConfig(task_type="SEQ_CLS"))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             report_to="none", use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="DPS needs the run's length.*SparseTrainerCallback"):
        Trainer(model=model, args=args, train_dataset=_dataset()).train()


def test_8_dps_update_after_zero_grad_warns():
    model = get_peft_model(make_model("bert"), DPSConfig(task_type="SEQ_CLS", total_step=8))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(**make_batch("bert")).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with pytest.warns(UserWarning, match="found no gradients.*before optimizer.zero_grad"):
        model.base_model.update_and_allocate(0)


def test_8_dps_without_update_and_allocate_warns():
    model = get_peft_model(make_model("bert"), DPSConfig(task_type="SEQ_CLS", total_step=8))
    model.train()
    with pytest.warns(UserWarning, match="without update_and_allocate: it stays in stage I"):
        for _ in range(65):
            model(**make_batch("bert")).loss.backward()


@pytest.mark.parametrize("reentrant", [True, False])
def test_8_dps_mix_samples_columns_once_per_step_under_checkpointing(reentrant):
    model = get_peft_model(make_model("llama"), DPSConfig(task_type="CAUSAL_LM", variant="mix", keep_ratio=0.5,
                                                          total_step=40))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    model.train()
    model(**make_batch("llama")).loss.backward()
    for layer in (m for m in model.modules() if isinstance(m, DPSLayer)):
        grad = layer.dps_delta["default"].grad
        columns = layer.states["default"].columns
        assert torch.equal((grad != 0).any(0), columns)  # the backward used the forward's columns
    model.base_model.update_and_allocate(0)
    for layer in (m for m in model.modules() if isinstance(m, DPSLayer)):
        state = layer.states["default"]
        assert state.columns is None and int(state.column_counts.max()) == 1  # counted once


def test_9_a_block_larger_than_the_layer_is_a_clear_error():
    base = make_model("llama")
    before = snapshot(base)
    with pytest.raises(ValueError, match=r"block_size=1000 with density=0.01 would train 100% of"):
        get_peft_model(base, SparseMaskConfig(task_type="CAUSAL_LM", density=0.01, block_size=1000))
    assert_unchanged(base, before)


@pytest.mark.parametrize("bits", [8, 4])
def test_10_unmerge_of_a_quantized_base_restores_it_exactly(bits, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    assert isinstance(base.model.layers[0].mlp.up_proj, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    batch = make_batch("llama")
    base.train()
    with torch.no_grad():
        reference = base(**batch).logits
    model = get_peft_model(base, SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    for module in model.modules():
        if isinstance(module, SparseMaskLayer):
            module.sparsemask_delta["default"].values.data.normal_(0, 0.1)
    model.base_model.merge_adapter()
    model.base_model.unmerge_adapter()
    model.train()
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=0)


# ------------------------------------------------------------------------ failures that changed the model


def test_a_truncated_checkpoint_leaves_the_model_as_it_was(tmp_path):
    model = get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS"))
    model.save_pretrained(tmp_path)
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    base = make_model("bert")
    before = snapshot(base)
    with pytest.raises(ValueError, match="Cannot read the adapter checkpoint.*left as it was"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
    other = get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS"))
    before = snapshot(other)
    with pytest.raises(ValueError, match="Cannot read the adapter checkpoint"):
        other.load_adapter(tmp_path, adapter_name="broken")
    assert_unchanged(other, before)


def test_a_digit_adapter_name_loads_beside_default_and_keeps_its_trainability(tmp_path):
    model = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    model.save_pretrained(tmp_path)
    target = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", density=0.05))
    flags = {n: p.requires_grad for n, p in target.named_parameters()}
    target.load_adapter(tmp_path, adapter_name="0")
    assert "0" in target.peft_config
    for name, flag in flags.items():
        assert dict(target.named_parameters())[name].requires_grad == flag, name


# ---------------------------------------------------------------------------- crashes -> clear errors


@pytest.mark.parametrize("make, message", [
    (lambda: SparseMaskConfig(seed=None), "`seed` must be an integer"),
    (lambda: SparseMaskConfig(seed="1"), "`seed` must be an integer"),
    (lambda: SparseMaskConfig(seed=1.5), "`seed` must be an integer"),
    (lambda: SparseMaskConfig(mode="mask", mask_candidates="2"), "`mask_candidates` must be a number"),
    (lambda: SparseMaskConfig(mode="mask", density=0.05), r"`density=0.05` applies to mode='delta'"),
    (lambda: SparseMaskConfig(sparsity=0.3), r"`sparsity=0.3` applies to mode='mask'"),
    (lambda: SparseMaskConfig(seed=3), r"`seed=3` applies to selection='random'"),
    (lambda: LearnerConfig(priming_lr="1e-3"), "`priming_lr` must be a number"),
    (lambda: LearnerConfig(priming_steps=True), "`priming_steps` must be an integer"),
    (lambda: LayerSelectConfig(num_layers=True), "`num_layers` must be a positive integer"),
    (lambda: DPSConfig(total_step=True), "`total_step` must be a positive integer"),
    (lambda: DPSConfig(total_step=0), "`total_step` must be a positive integer"),
    (lambda: BitFitConfig(layers_to_transform=[-1]), "`layers_to_transform` must be a block index"),
    (lambda: BitFitConfig(target_modules=3), "target_modules must be a list of names"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_config_values_are_checked_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_calibrate_with_tuple_batches_names_the_problem():
    model = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient"))
    batch = make_batch("llama")
    with pytest.raises(TypeError, match=r"^calibrate\(\) takes batches that are dicts .* got a tuple$"):
        calibrate(model, [(batch["input_ids"], batch["labels"])])
    assert requires_calibration(model)


def test_calibrate_an_inference_mode_adapter_names_the_problem():
    config = SparseMaskConfig(task_type="CAUSAL_LM", selection="gradient", inference_mode=True)
    model = get_peft_model(make_model("llama"), config)
    with pytest.raises(ValueError, match="inference_mode=True .* is_trainable=True"):
        calibrate(model, batches("llama"))


def test_saving_a_value_that_float16_cannot_hold_is_an_error(tmp_path):
    model = get_peft_model(make_model("llama"), SparseMaskConfig(task_type="CAUSAL_LM", save_dtype="float16"))
    layer = next(m for m in model.modules() if isinstance(m, SparseMaskLayer))
    layer.sparsemask_delta["default"].values.data[0] = 1e5
    with pytest.raises(ValueError, match=r"magnitude 1e\+05 does not fit save_dtype='float16'"):
        model.save_pretrained(tmp_path)


def test_a_misspelt_peft_type_names_itself_and_the_known_types(tmp_path):
    import json

    from peft import PeftConfig

    get_peft_model(make_model("bert"), SparseMaskConfig(task_type="SEQ_CLS")).save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "peft_type": "SPARSMASK"}))
    base = make_model("bert")
    before = snapshot(base)
    for load in (lambda: PeftModel.from_pretrained(base, tmp_path), lambda: PeftConfig.from_pretrained(tmp_path)):
        with pytest.raises(KeyError, match=r"peft_type 'SPARSMASK' is not a PEFT method.*Known: .*LORA.*SPARSEMASK"):
            load()
    assert_unchanged(base, before)
    config_file.write_text(json.dumps(config))  # spelt right, it loads
    assert isinstance(PeftModel.from_pretrained(base, tmp_path), PeftModel)


def test_a_module_that_took_the_config_mapping_before_the_import_sees_every_method():
    """A third-party module that did ``from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING`` before
    ``import peft_sparse`` gets the same mapping as PEFT: the registered methods and the clear KeyError."""
    import textwrap

    from fresh_python import run_python

    script = textwrap.dedent("""
        import sys, types
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
        third_party = types.ModuleType("third_party_trainer")
        third_party.CONFIGS = PEFT_TYPE_TO_CONFIG_MAPPING
        sys.modules["third_party_trainer"] = third_party
        import peft_sparse
        from peft import PeftType
        assert third_party.CONFIGS[PeftType.SPARSEMASK] is peft_sparse.SparseMaskConfig
        try:
            third_party.CONFIGS["SPARSMASK"]
        except KeyError as error:
            assert "Known:" in str(error), error
        else:
            raise AssertionError("no KeyError")
        print("ok")
    """)
    result = run_python(["-c", script])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]

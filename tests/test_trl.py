"""TRL's ``SFTTrainer(model, args, train_dataset, peft_config=<any peft_sparse config>)`` with every tuner.

TRL calls ``get_peft_model`` itself, with its defaults: bf16 autocast, gradient checkpointing, and on quantized
bases a bf16 cast of the trainable values. The ways in that docs/causal-lm.md documents are checked here:
scheduled tuners (DPS) get ``SparseTrainerCallback``; calibrated selections are calibrated between building the
trainer and training it, on the trainer's own dataloader.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

import peft_sparse
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

from tiny_models import make_model, tiny_tokenizer

trl = pytest.importorskip("trl", reason="pip install -e '.[test]' installs trl")
from trl import SFTConfig, SFTTrainer  # noqa: E402

CONFIGS = {
    "bitfit": lambda: BitFitConfig(task_type="CAUSAL_LM"),
    "layerselect": lambda: LayerSelectConfig(task_type="CAUSAL_LM", layers=[1]),
    "layerselect-calibrated": lambda: LayerSelectConfig(task_type="CAUSAL_LM", num_layers=1),
    "sparsemask": lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.05, target_modules="all-linear"),
    "sparsemask-block": lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.2, block_size=4),
    "sparsemask-gradient": lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=0.05, selection="gradient"),
    "mask": lambda: SparseMaskConfig(task_type="CAUSAL_LM", mode="mask", sparsity=0.1),
    "dps": lambda: DPSConfig(task_type="CAUSAL_LM", update_ratio=0.34),
    "learner": lambda: LearnerConfig(task_type="CAUSAL_LM", priming_steps=0),
    "learner-primed": lambda: LearnerConfig(task_type="CAUSAL_LM", priming_steps=2),
}


def sentiment_data(n: int = 24) -> Dataset:
    """A conversational prompt-completion dataset: TRL applies the chat template and puts the loss on the answer."""
    rows = [("good fun", "yes"), ("bad day", "no"), ("nice one", "yes"), ("awful film", "no")]
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": rows[i % 4][0]}],
         "completion": [{"role": "assistant", "content": rows[i % 4][1]}]}
        for i in range(n)
    ])


def sft_trainer(tmp_path, model, peft_config, callbacks=(SparseTrainerCallback(),), **overrides) -> SFTTrainer:
    # SFTConfig's own defaults stay on: bf16 autocast and gradient checkpointing.
    settings = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2,
                    report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", seed=0)
    settings.update(overrides)
    return SFTTrainer(model=model, args=SFTConfig(**settings), train_dataset=sentiment_data(),
                      processing_class=tiny_tokenizer(), peft_config=peft_config, callbacks=list(callbacks))


def adapter_state(model) -> dict[str, torch.Tensor]:
    prefix = model.peft_config["default"].peft_type.value.lower() + "_"
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if prefix in k and v.is_floating_point()}


def prompt_batch() -> dict[str, torch.Tensor]:
    ids = tiny_tokenizer().apply_chat_template([{"role": "user", "content": "good fun"}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    return {"input_ids": ids["input_ids"]}


def train_as_documented(trainer: SFTTrainer) -> None:
    """docs/causal-lm.md: build the trainer, calibrate when the selection is measured from data, then train."""
    if requires_calibration(trainer.model):
        calibrate(trainer.model, trainer.get_train_dataloader(), num_batches=2)
    trainer.train()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sft_trainer_trains_saves_and_reloads_every_tuner(tmp_path, name):
    trainer = sft_trainer(tmp_path, make_model("llama", max_position_embeddings=64), CONFIGS[name]())
    model = trainer.model
    assert isinstance(model, PeftModel) and trainer.args.bf16 and trainer.args.gradient_checkpointing
    before = adapter_state(model)
    train_as_documented(trainer)
    assert model.base_model.model.is_gradient_checkpointing  # the Trainer turned it on for train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_state(model)
    assert any(k not in before or not torch.equal(before[k], v) for k, v in after.items()), "nothing trained"
    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(make_model("llama", max_position_embeddings=64), tmp_path / "adapter")
    if name != "mask":  # a mask is saved as its pruned entries, not its scores (README, Limitations)
        expected = model.state_dict()
        assert [k for k, v in loaded.state_dict().items() if not torch.equal(v, expected[k])] == []
    model.eval()
    # Accelerate left the trained model's forward wrapped in bf16 autocast (bf16=True): compare under the same.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(loaded(**prompt_batch()).logits.float(), model(**prompt_batch()).logits,
                                   rtol=0, atol=0)


def test_sft_trainer_drives_dps_through_the_callback(tmp_path):
    trainer = sft_trainer(tmp_path, make_model("llama", max_position_embeddings=64), CONFIGS["dps"]())
    trainer.train()
    config = trainer.model.peft_config["default"]
    assert config.total_step == 3  # set by the callback from the trainer's max_steps
    # U = int(3 * 0.34) = 1: step 1 is stage I, steps 2-3 stage II on a chosen subnetwork.
    layer = next(m for m in trainer.model.modules() if hasattr(m, "dps_delta"))
    assert layer.states["default"].stage == 2 and layer.states["default"].mask is not None


def test_sft_trainer_without_the_callback_refuses_dps_clearly(tmp_path):
    trainer = sft_trainer(tmp_path, make_model("llama", max_position_embeddings=64), CONFIGS["dps"](), callbacks=())
    with pytest.raises(ValueError, match="SparseTrainerCallback"):
        trainer.train()


@pytest.mark.parametrize("name", ["layerselect-calibrated", "sparsemask-gradient", "learner-primed"])
def test_sft_trainer_without_calibration_refuses_to_train(tmp_path, name):
    trainer = sft_trainer(tmp_path, make_model("llama", max_position_embeddings=64), CONFIGS[name]())
    with pytest.raises(CalibrationRequiredError, match="calibrate"):
        trainer.train()


@pytest.mark.parametrize("name", ["layerselect-calibrated", "sparsemask", "dps", "learner-primed"])
def test_sft_trainer_on_a_4bit_base(tmp_path, name):
    """QLoRA-style: a bitsandbytes 4-bit base; TRL casts the trainable values to bf16 after get_peft_model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")
    trainer = sft_trainer(tmp_path, base, CONFIGS[name](), max_steps=2)
    before = adapter_state(trainer.model)
    train_as_documented(trainer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    after = adapter_state(trainer.model)
    assert any(k not in before or not torch.equal(before[k], v) for k, v in after.items()), "nothing trained"


def test_trl_is_a_test_extra_not_a_dependency():
    from importlib.metadata import requires

    requirements = requires("peft_sparse") or []
    assert not any(r.startswith("trl") and "extra ==" not in r for r in requirements)
    assert any(r.startswith("trl") and 'extra == "test"' in r for r in requirements)
    assert peft_sparse.__version__

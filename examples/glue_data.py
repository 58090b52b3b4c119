"""GLUE data and metrics for the examples and benchmarks: the TSV layout read exactly, the dev metrics in numpy.

The one GLUE reader of the examples, the benchmarks and the tests: ``load_glue_task(task, split, glue_dir)``
reads ``glue_dir/<TASK>/<split>.tsv`` (the layout of the GLUE download; ``../shared/data/glue`` here) or, without
``glue_dir``, the ``nyu-mll/glue`` hub dataset. The GLUE TSVs have quirks that a generic CSV reader gets wrong,
documented in ``TASKS`` below: QUOTE_NONE (rows begin with or contain '"'), no header in CoLA, a byte-order mark
in MRPC's header, string labels in RTE, the sentences of STS-B in columns 8 and 9 of 10.

``compute_task_metrics(task, predictions, labels)``: CoLA Matthews correlation; SST-2 and RTE accuracy; MRPC F1
(primary) and accuracy; STS-B Pearson (primary) and Spearman. Numpy only, checked against scikit-learn/scipy.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

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


def load_glue_task(task: str, split: str, glue_dir: Optional[str] = None,
                   cache_dir: Optional[str] = None) -> dict[str, Any]:
    """Load ``split`` ("train" or "dev") of a GLUE task as ``{"text_a": [...], "text_b": [...] | None, "labels"}``.

    With ``glue_dir`` read the GLUE TSV layout (``glue_dir/SST-2/train.tsv``...); otherwise load ``nyu-mll/glue``
    from the Hugging Face hub with ``datasets`` (its "validation" split is GLUE's dev set), cached in ``cache_dir``
    (default: datasets' own cache).
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

    ds = load_dataset("nyu-mll/glue", task, split="validation" if split == "dev" else "train", cache_dir=cache_dir)
    key_a, key_b = spec["hub"]
    return {
        "text_a": list(ds[key_a]),
        "text_b": list(ds[key_b]) if key_b is not None else None,
        "labels": [float(x) if task == "stsb" else int(x) for x in ds["label"]],
    }


def subsample(data: dict[str, Any], n: Optional[int], seed: Optional[int] = None, skip: int = 0) -> dict[str, Any]:
    """``n`` examples (all when None) after skipping ``skip``, from a shuffle seeded with ``seed`` (no shuffle when
    ``seed`` is None). ``skip`` gives disjoint splits of one shuffle (e.g. a held-out part of the training set)."""
    size = len(data["labels"])
    order = np.random.RandomState(seed).permutation(size) if seed is not None else np.arange(size)
    idx = order[skip:] if n is None else order[skip : skip + n]
    pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
    return {k: pick(v) for k, v in data.items()}


def primary_metric(task: str) -> str:
    return TASKS[task]["primary"]


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



"""One evidence run: train all-MiniLM-L6-v2 with one method on one GLUE task and score it (``run_one``), and the
hash of the code such a run measures (``code_hash``).

Split from ``evidence.py`` so that a row's code hash covers what its run executes and nothing else: this file,
the method factory, the data code and, for peft_sparse methods only, the package's shared modules, the kernels
and the method's own tuner. A fix to one tuner, or to the harness's planning and reporting, leaves the rows of
every other method current; a learning-rate grid or a claim's settings are in each row's configuration instead.
"""

from __future__ import annotations

import functools
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from glue_data import TASKS, compute_task_metrics, load_glue_task, subsample  # noqa: E402

SWEEP = dict(task="sst2", train_rows=2000, heldout_rows=500, epochs=2, seed=0)
TRAIN_ROWS_CAP = {"sst2": 4000}  # SST-2: the first 4,000 rows of a seeded shuffle (the rest: 67k)
MAX_LENGTH = {"sst2": 64, "cola": 64, "stsb": 128, "mrpc": 128, "rte": 128}


#: The peft_sparse tuner folder each factory method runs on (methods not listed are PEFT's or full fine-tuning).
TUNER_OF_METHOD = {"sparsemask": "sparsemask", "mask": "sparsemask", "dps": "dps", "bitfit": "bitfit",
                   "layerselect": "layerselect", "learner": "learner"}


@functools.lru_cache(maxsize=None)
def code_hash(method: str) -> str:
    """A hash of the sources a run of ``method`` executes: this file, the factory, the data code and the two
    package modules every run calls (``requires_calibration``; the layer stack of full FT's block change), plus
    for a peft_sparse method the package's shared modules, the kernels and its tuner (cached: the code a process
    runs is the code it imported)."""
    files = [Path(__file__).resolve(), ROOT / "examples" / "methods.py", ROOT / "examples" / "glue_data.py"]
    files += [ROOT / "peft_sparse" / "calibration.py", ROOT / "peft_sparse" / "modules.py"]  # every run calls these
    if method in TUNER_OF_METHOD:
        package = ROOT / "peft_sparse"
        files += sorted(package.glob("*.py")) + sorted((package / "tuners").glob("*.py"))
        files += sorted((package / "tuners" / TUNER_OF_METHOD[method]).rglob("*.py"))
        files += sorted((ROOT / "kernels").rglob("*.py"))
    digest = hashlib.sha256()
    for path in dict.fromkeys(files):  # each file once, in order
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------------- one run


def load_split(task: str, glue_dir: Optional[str], kind: str, limit: Optional[int] = None, seed_for_split: int = 0):
    """``(train, eval)`` as dicts of lists: the task's training rows (capped) and its dev set, or for the LR sweep
    a training part and a held-out part of the training set (never the dev set). ``limit`` caps every part (a
    smoke test of the harness, not a measurement)."""
    train = load_glue_task(task, "train", glue_dir)
    if kind == "sweep":
        rows, held_rows = SWEEP["train_rows"], SWEEP["heldout_rows"]
        if limit:
            rows, held_rows = min(rows, limit), min(held_rows, limit)
        return subsample(train, rows, seed=seed_for_split), subsample(train, held_rows, seed=seed_for_split, skip=rows)
    cap = min(c for c in (TRAIN_ROWS_CAP.get(task), limit) if c) if (TRAIN_ROWS_CAP.get(task) or limit) else None
    dev = load_glue_task(task, "dev", glue_dir)
    return (subsample(train, cap, seed=seed_for_split) if cap else train), subsample(dev, limit)


def _batches(encoded, labels, batch_size, generator, tokenizer, shuffle, group_by_length=False):
    """Padded batches; shuffled with ``generator``, and with ``group_by_length`` grouped by length the way the
    Trainer's ``group_by_length=True`` does (random mega-batches of 50 batches, each sorted by length), so that
    short rows are not padded to a long row's length."""
    if shuffle and group_by_length:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        lengths = [len(ids) for ids in encoded["input_ids"]]
        order = get_length_grouped_indices(lengths, batch_size, generator=generator)
    elif shuffle:
        order = torch.randperm(len(labels), generator=generator).tolist()
    else:
        order = list(range(len(labels)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        features = [{k: encoded[k][i] for k in encoded} for i in idx]
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in idx])
        yield batch


def _encode(tokenizer, data, max_length):
    if data["text_b"] is not None:
        return dict(tokenizer(data["text_a"], data["text_b"], truncation=True, max_length=max_length))
    return dict(tokenizer(data["text_a"], truncation=True, max_length=max_length))


def _evaluate(model, task, eval_enc, eval_labels, tokenizer, device, autocast) -> dict[str, float]:
    model.eval()
    outputs = []
    with torch.no_grad(), autocast:
        for batch in _batches(eval_enc, eval_labels, 128, None, tokenizer, shuffle=False):
            batch.pop("labels")
            outputs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    model.train()
    return compute_task_metrics(task, torch.cat(outputs).numpy(), eval_labels)


def _block_change(model, reference_state) -> list[dict[str, float]]:
    """Per transformer block: how far fine-tuning moved its weights (relative L1, and the angle in degrees between
    the flattened pretrained and fine-tuned block), Radiya-Dixit & Wang's criterion for critical layers."""
    from peft_sparse.modules import block_index, find_layer_stack

    stack_name, stack = find_layer_stack(model)
    result = []
    for i in range(len(stack)):
        before, after = [], []
        for name, param in model.named_parameters():
            if block_index(name, stack_name) == i:
                before.append(reference_state[name].flatten().float())
                after.append(param.detach().flatten().float().cpu())
        b, f = torch.cat(before), torch.cat(after)
        cos = torch.nn.functional.cosine_similarity(b, f, dim=0).clamp(-1, 1)
        result.append({"l1": float((f - b).abs().sum() / b.abs().sum()), "angle": float(torch.rad2deg(torch.acos(cos)))})
    return result


def run_one(spec: dict[str, Any], args, cache: dict) -> dict[str, Any]:
    """Train one (task, variant, seed, lr, fraction) and evaluate it; returns the result row (without identity)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    import methods
    import peft_sparse

    run_started = time.perf_counter()
    task, variant, seed, lr = spec["task"], spec["variant"], spec["seed"], spec["lr"]
    method, options = spec["method"], spec["options"]
    device = torch.device(args.device)
    task_spec = TASKS[task]
    max_length = args.max_length or MAX_LENGTH[task]
    key = (task, spec["kind"], max_length)
    if key not in cache:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        train, held = load_split(task, args.glue_dir, spec["kind"], args.limit_rows)
        cache[key] = (tokenizer, _encode(tokenizer, train, max_length), train["labels"],
                      _encode(tokenizer, held, max_length), held["labels"])
    tokenizer, train_enc, train_labels, eval_enc, eval_labels = cache[key]
    fraction = spec["fraction"]
    if fraction < 1.0:  # a seeded subset of the training rows
        count = max(1, round(fraction * len(train_labels)))
        keep = np.random.RandomState(1000 + seed).permutation(len(train_labels))[:count]
        train_enc = {k: [v[i] for i in keep] for k, v in train_enc.items()}
        train_labels = [train_labels[i] for i in keep]

    torch.manual_seed(seed)
    np.random.seed(seed)
    num_labels = task_spec["num_labels"]
    extra = {}
    if spec["recipe"].get("dropout") is not None:
        extra = dict(hidden_dropout_prob=spec["recipe"]["dropout"], attention_probs_dropout_prob=spec["recipe"]["dropout"])
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=num_labels, dtype=torch.float32,
        problem_type="regression" if num_labels == 1 else "single_label_classification", **extra,
    )
    reference_state = {k: v.detach().clone() for k, v in model.named_parameters()} if method == "full" else None
    model = methods.apply_method(model, method, "SEQ_CLS", **options).to(device)
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    calibration_seconds = 0.0
    if method != "full" and peft_sparse.requires_calibration(model):
        started = time.perf_counter()
        probe = torch.Generator().manual_seed(10_000 + seed)
        batches = []
        for batch in _batches(train_enc, train_labels, args.batch_size, probe, tokenizer, shuffle=True):
            if num_labels == 1:
                batch["labels"] = batch["labels"].float()
            batches.append(batch)
            if len(batches) == 25:
                break
        with autocast:
            peft_sparse.calibrate(model, batches)
        calibration_seconds = time.perf_counter() - started
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total = steps_per_epoch * spec["epochs"]
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "set_total_steps"):
        tuner.set_total_steps(total)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec["recipe"]["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(spec["recipe"]["warmup"] * total), total)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    eval_every = max(1, total // spec["eval_points"]) if spec.get("eval_points") else None
    losses, step_times, curve, eval_curve = [], [], [], []
    step = 0
    started = time.perf_counter()
    model.train()
    for _ in range(spec["epochs"]):
        for batch in _batches(train_enc, train_labels, args.batch_size, generator, tokenizer, shuffle=True,
                              group_by_length=args.group_by_length):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            if num_labels == 1:
                batch["labels"] = batch["labels"].float()
            with autocast:
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            if hasattr(tuner, "update_and_allocate"):
                tuner.update_and_allocate(step)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step_times.append(time.perf_counter() - t0)
            step += 1
            if step % max(1, total // 20) == 0 or step == total:
                curve.append([step, float(np.mean(losses[-max(1, total // 20):]))])
            if eval_every and step % eval_every == 0 and step < total:
                metrics = _evaluate(model, task, eval_enc, eval_labels, tokenizer, device, autocast)
                eval_curve.append([step, 100 * metrics[task_spec["primary"]]])
    train_seconds = time.perf_counter() - started
    metrics = _evaluate(model, task, eval_enc, eval_labels, tokenizer, device, autocast)
    if eval_every:
        eval_curve.append([total, 100 * metrics[task_spec["primary"]]])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    row = {
        "score": 100 * metrics[task_spec["primary"]],
        "metrics": {k: 100 * v for k, v in metrics.items()},
        "trainable": trainable,
        "train_rows": len(train_labels),
        "steps": total,
        "median_step_ms": 1000 * statistics.median(step_times[3:] or step_times),
        "train_seconds": train_seconds,
        "calibration_seconds": calibration_seconds,
        "peak_mib": peak,
        "final_loss": float(np.mean(losses[-max(1, total // 20):])),
        "loss_curve": curve,
        "peft_sparse": peft_sparse.__version__,
        "run_seconds": time.perf_counter() - run_started,
    }
    if eval_curve:
        row["eval_curve"] = eval_curve
    if method == "full":
        row["block_change"] = _block_change(model, reference_state)
    if method == "layerselect":
        row["layers"] = model.peft_config["default"].layers
    return row


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

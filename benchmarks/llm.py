#!/usr/bin/env python
"""Causal-LM benchmark: every method on SmolLM2-135M-Instruct, on an fp32 and a bitsandbytes 4-bit base.

Three measurements, each made where it is fair:

1. **Step time.** One process builds every method's model (and the frozen-backbone floor) and steps them
   round-robin (A, B, C, A, B, C...) on the same fixed batches (default 8 x 64 tokens, 2 threads), so that a busy
   phase of the machine hits all alike; the tables give medians and their ratios to the floor and to LoRA r=8.
   The floor: every weight frozen, the input embeddings' output requires grad, so the backward runs through every
   block down to the embeddings (what any method that trains something in block 0 pays at least).
2. **Peak memory.** Each method alone in a fresh process (``--alone``): a few steps on the same batches, then
   ``ru_maxrss``. These run first, before this process builds any model (Linux keeps ``ru_maxrss`` across exec).
3. **Quality.** Each method fine-tuned for a fixed budget by ``examples/finetune_causal_lm.py`` in its own process
   (SST-2 posed as a chat question, loss on the answer tokens): loss curve, held-out answer accuracy (before and
   after), adapter bytes.

Outputs in ``--out-dir``: ``llm.json`` (every measurement, written after each phase), ``llm.md`` (tables, settings,
command), ``llm.png`` (loss curves; accuracy against step time), ``logs/``. ``--report`` rebuilds the table and the
plot from ``llm.json``; ``--phases`` runs some of the three and adds them to the ``llm.json`` already there
(``--fresh`` starts a new one).

    # the full measurement (about 3 hours on 2 quiet CPU cores; most of it the 23 quality runs)
    python benchmarks/llm.py --glue-dir ../shared/data/glue --out-dir benchmarks/llm

    # check the pipeline end to end in minutes: few repeats, steps and rows, a few methods
    python benchmarks/llm.py --glue-dir ../shared/data/glue --out-dir /tmp/llm-check --repeats 2 --warmup 1 \\
        --train-steps 3 --train-samples 24 --eval-samples 16 --alone-steps 2 --methods lora-r8,sparsemask-1pct
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "benchmarks"
sys.path += [str(ROOT / "examples"), str(HERE)]  # the example's modules, and this script's siblings when loaded by path
import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import finetune_causal_lm as example  # noqa: E402
import step_time  # noqa: E402
from methods import apply_method, trainable_entries as trainable  # noqa: E402

interleaved_times, json_of_fresh_process, step = step_time.interleaved_times, step_time.json_of_fresh_process, step_time.step

import peft_sparse  # noqa: E402
from peft_sparse.reporting import peak_rss_mib  # noqa: E402

#: name -> (method of examples/methods.py, its options). "floor" is the frozen backbone; full FT runs on fp32 only.
#: LoRA rows without a dropout of their own take --lora_dropout (default 0.0, PEFT's default: the LoRA a user gets);
#: "lora-r8-dropout0.1" is the examples' former setting, kept as a second, named row.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora-r8": ("lora", {"r": 8}),
    "lora-r8-dropout0.1": ("lora", {"r": 8, "lora_dropout": 0.1}),
    "lora-r16": ("lora", {"r": 16}),
    "shira-r8": ("shira", {"r": 8}),
    "sparsemask-1pct": ("sparsemask", {"density": 0.01}),
    "sparsemask-1pct-block32": ("sparsemask", {"density": 0.01, "block_size": 32}),
    "sparsemask-lora-equal": ("sparsemask", {"match_lora_r": 8}),
    "sparsemask-lora-equal-block32": ("sparsemask", {"match_lora_r": 8, "block_size": 32}),
    "mask-10pct": ("mask", {"sparsity": 0.1}),
    "bitfit": ("bitfit", {}),
    "learner": ("learner", {}),
    "dps": ("dps", {}),
    "full": ("full", {}),
}
BASES = ("fp32", "8bit", "4bit")
#: bitsandbytes bits of each base (None: full precision).
BITS = {"fp32": None, "8bit": 8, "4bit": 4}
FLOOR = "floor"
#: examples/finetune_causal_lm.py's flag of each option.
FLAGS = {"r": "--lora_r", "lora_dropout": "--lora_dropout", "density": "--density", "match_lora_r": "--match_lora_r", "block_size": "--block_size",
         "sparsity": "--sparsity", "priming_steps": "--priming_steps"}


def variant(args, name: str) -> tuple[str, dict[str, Any]]:
    """``(method, options)`` of variant ``name``; a LoRA row without its own dropout takes ``--lora_dropout``."""
    method, options = VARIANTS[name]
    if method == "lora":
        options = {"lora_dropout": args.lora_dropout, **options}
    return method, options


def runs(args) -> list[tuple[str, str]]:
    """(variant, base) pairs to measure, floor included."""
    names = args.methods.split(",") if args.methods else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {sorted(VARIANTS)}")
    return [(n, b) for b in args.bases.split(",") for n in [FLOOR, *names] if not (n == "full" and b != "fp32")]


# ---------------------------------------------------------------------------------------------- models and batches


def load_base(args, base: str):
    """The base model (fp32, or 8-/4-bit through the example's QLoRA loading) and its tokenizer."""
    model_args = example.ModelArguments(model_name_or_path=args.model, cache_dir=args.cache_dir,
                                        load_in_bits=BITS[base])
    return example.load_model(model_args)


def fixed_batches(args, tokenizer) -> list[dict[str, torch.Tensor]]:
    """``--num-batches`` batches of ``--batch-size`` SST-2 chat rows padded to exactly ``--length`` tokens, labels on
    the answer only (random tokens with the last 4 as labels without ``--glue-dir``)."""
    count = args.num_batches * args.batch_size
    if args.glue_dir is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, len(tokenizer), (count, args.length), generator=g)
        labels = torch.full_like(ids, -100)
        labels[:, -4:] = ids[:, -4:]
        rows = [{"input_ids": i, "labels": l, "attention_mask": torch.ones_like(i)} for i, l in zip(ids, labels)]
    else:
        chats = example.glue_chats("sst2", "train", args.glue_dir, count, 0, tokenizer, args.length)
        answers = example.GLUE_PROMPTS["sst2"][1]
        rows = []
        for prompt, label in chats:
            enc = example.encode(tokenizer, prompt, answers[label])
            ids = enc["input_ids"][: args.length]
            pad = args.length - len(ids)
            labels = [t if m else -100 for t, m in zip(ids, enc["completion_mask"])]
            rows.append({"input_ids": torch.tensor(ids + [tokenizer.pad_token_id] * pad),
                         "labels": torch.tensor(labels + [-100] * pad),
                         "attention_mask": torch.tensor([1] * len(ids) + [0] * pad)})
    return [{k: torch.stack([r[k] for r in rows[i : i + args.batch_size]]) for k in rows[0]}
            for i in range(0, count, args.batch_size)]


def build(args, name: str, base: str, batches) -> tuple[torch.nn.Module, Callable[[], float]]:
    """The model of ``name`` on ``base`` and a function that runs one timed training step on the next batch."""
    model, _ = load_base(args, base)
    model.train()
    if name == FLOOR:  # every weight frozen; the backward still runs down to the input embeddings
        model.requires_grad_(False)
        model.enable_input_require_grads()
        optimizer = None
    else:
        method, options = variant(args, name)
        model = apply_method(model, method, "CAUSAL_LM", **options)
        if isinstance(model, PeftModel) and peft_sparse.requires_calibration(model):  # Learner priming
            peft_sparse.calibrate(model, itertools.cycle(batches), num_batches=args.calibration_batches)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "set_total_steps"):  # DPS: a schedule as long as the measurement, driven after each step
        tuner.set_total_steps(args.warmup + args.repeats + args.alone_steps)
    cycle, counter = itertools.cycle(batches), itertools.count()

    def stepper() -> float:  # DPS reads the step's gradients: update_and_allocate runs before zero_grad, timed
        after_step = (lambda: tuner.update_and_allocate(next(counter))) if hasattr(tuner, "update_and_allocate") else None
        return step(model, optimizer, next(cycle), after_step)

    return model, stepper


# ------------------------------------------------------------------------------------------------------ the phases


def measure_alone(args) -> dict:
    """``--alone NAME@BASE``: this process builds one model and steps it; its peak RSS is the method's."""
    name, base = args.alone.split("@")
    batches = fixed_batches(args, tokenizer_of(args))
    model, stepper = build(args, name, base, batches)
    times = [stepper() for _ in range(args.alone_steps)]
    return {"peak_rss_mib": peak_rss_mib(), "trainable": trainable(model), "alone_step_s": statistics.median(times)}


def model_path(args) -> str:
    return str(example.smollm2_folder(args.cache_dir)) if args.model == "smollm2" else args.model


def convert_in_fresh_process(args) -> str:
    """The model folder, converting SmolLM2 (once) in a child process: done here, the conversion's peak RSS
    would be inherited by every memory run started afterwards."""
    if args.model != "smollm2":
        return args.model
    return json_of_fresh_process([__file__, "--convert", *common_argv(args)])["path"]


def tokenizer_of(args):
    tokenizer = AutoTokenizer.from_pretrained(model_path(args))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def common_argv(args) -> list[str]:
    return ["--model", args.model, *(["--cache-dir", args.cache_dir] if args.cache_dir else []),
            *(["--glue-dir", args.glue_dir] if args.glue_dir else [])]


def memory_phase(args, results: dict) -> None:
    for name, base in runs(args):
        print(f"[memory] {name} on {base}", flush=True)
        results.setdefault(f"{name}@{base}", {}).update(json_of_fresh_process(
            [__file__, "--alone", f"{name}@{base}", *common_argv(args), "--threads", str(args.threads),
             "--batch-size", str(args.batch_size), "--length", str(args.length), "--num-batches", str(args.num_batches),
             "--alone-steps", str(args.alone_steps), "--calibration-batches", str(args.calibration_batches),
             "--lora_dropout", str(args.lora_dropout)]))


def timing_phase(args, results: dict) -> None:
    for base in args.bases.split(","):
        pairs = [(n, b) for n, b in runs(args) if b == base]
        batches = fixed_batches(args, tokenizer_of(args))
        steppers, models = {}, {}
        for name, _ in pairs:
            print(f"[timing] building {name} on {base}", flush=True)
            models[name], steppers[name] = build(args, name, base, batches)
        print(f"[timing] {args.repeats} interleaved rounds on {base}", flush=True)
        times = interleaved_times(steppers, args.repeats, warmup=args.warmup)
        for name, _ in pairs:
            results.setdefault(f"{name}@{base}", {}).update(
                median_step_s=statistics.median(times[name]), step_times_s=times[name], trainable=trainable(models[name]))
        del models, steppers


def quality_phase(args, results: dict, save=lambda: None) -> None:
    """Train each method for ``--train-steps`` in its own process (the example) and score it; resumable: a method
    scored already with the same quality settings is skipped, and ``save`` runs after each method."""
    logs = Path(args.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    first = {k.split("@")[1]: k for k, v in results.items() if v.get("score_before") is not None}  # scored already
    for name, base in runs(args):
        if name == FLOOR:
            continue
        method, options = variant(args, name)
        key = f"{name}@{base}"
        if results.get(key, {}).get("score") is not None and results[key].get("quality_settings") == quality_settings(args):
            print(f"[quality] {key}: scored already", flush=True)
            continue
        output_dir = Path(args.out_dir) / "runs" / key
        argv = [str(ROOT / "examples" / "finetune_causal_lm.py"), "--method", method,
                "--model_name_or_path", args.model, *(["--cache_dir", args.cache_dir] if args.cache_dir else []),
                *(["--glue_dir", args.glue_dir] if args.glue_dir else []),
                *[x for k, v in options.items() for x in (FLAGS[k], str(v))], "--max_steps", str(args.train_steps),
                "--max_train_samples", str(args.train_samples), "--max_eval_samples", str(args.eval_samples),
                "--per_device_train_batch_size", str(args.batch_size), "--max_seq_length", str(args.length),
                "--logging_steps", "1", "--num_generations", "2", "--seed", str(args.seed),
                "--output_dir", str(output_dir), *(["--load_in_bits", str(BITS[base])] if BITS[base] else []),
                *([] if first.setdefault(base, key) == key else ["--no_eval_before"])]  # the base is scored once
        print(f"[quality] {key}: {shlex.join(argv[1:])}", flush=True)
        with open(logs / f"{key}.log", "w") as log:
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torch's thread count in the example
            done = subprocess.run([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"{key} failed; see {logs / f'{key}.log'}")
        r = json.loads((output_dir / "report.json").read_text())
        results.setdefault(key, {}).update(
            score=r["score"], score_before=r["score_before"], loss_curve=r["loss_curve"], adapter_bytes=r["adapter_bytes"],
            trained_entries=r["trainable_params"], train_s=r["train_wall_s"], generations=r["generations"],
            quality_settings=quality_settings(args))
        save()


# ---------------------------------------------------------------------------------------------------------- report


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


#: The settings each phase ran with, kept per phase in llm.json (phases may run in separate commands).
PHASE_SETTINGS = {"memory": ("threads", "batch_size", "length", "alone_steps", "lora_dropout"),
                  "timing": ("threads", "repeats", "warmup", "batch_size", "length", "lora_dropout"),
                  "quality": ("threads", "train_steps", "batch_size", "length", "train_samples", "eval_samples",
                              "lora_dropout")}


def quality_settings(args) -> dict:
    """What a quality run depends on (a scored method is reused only when these match)."""
    return {k: getattr(args, k) for k in (*PHASE_SETTINGS["quality"], "seed", "model") if k != "threads"}


def phase_settings(settings: dict) -> str:
    from collections import defaultdict

    s = {phase: defaultdict(lambda: "-", settings.get("phases_run", {}).get(phase, settings))
         for phase in PHASE_SETTINGS}
    m, t, q = s["memory"], s["timing"], s["quality"]

    def threads(phase) -> str:
        return f"{phase['threads']} thread{'' if phase['threads'] == 1 else 's'}"

    return (f"Memory: each method alone, {m['alone_steps']} steps, {threads(m)}. Step time: {threads(t)}, "
            f"{t['repeats']} interleaved rounds after {t['warmup']} warm-up, batches of {t['batch_size']} x "
            f"{t['length']} tokens. Quality: {threads(q)}, {q['train_steps']} steps of {q['batch_size']} rows "
            f"({q['train_samples']} training rows), accuracy on {q['eval_samples']} SST-2 dev rows.")


def table(results: dict, settings: dict) -> str:
    lines = [f"# LLM benchmark: {Path(settings['model']).name}", "",
             *[f"Command: `{c}`" for c in settings.get("commands", [settings["command"]])], "",
             f"Machine: {settings['machine']}; torch {settings['torch']}. " + phase_settings(settings), "",
             "Trained entries count what the optimizer updates (mask: the scores of the candidates; DPS: the dense "
             "increment). Learner priming (its calibrate steps, every FFN node trainable) runs before the budget; "
             "peak RSS is the process's, loading the base included; 4-bit adapters are saved in bf16, the dtype "
             "TRL's SFTTrainer trains them in on quantized bases.", ""]
    for base in settings["bases"]:
        rows = {k.split("@")[0]: v for k, v in results.items() if k.endswith("@" + base)}
        if not rows:
            continue
        floor = rows.get(FLOOR, {}).get("median_step_s")
        lora = rows.get("lora-r8", {}).get("median_step_s")
        before = next((v["score_before"] for v in rows.values() if v.get("score_before") is not None), None)
        lines += [f"## {base} base" + (f" (answer accuracy before training: {100 * before:.1f})" if before else ""), "",
                  "| method | trained entries | adapter | median step | vs floor | vs LoRA r=8 | peak RSS | final loss "
                  f"(last {SMOOTHING} steps) | accuracy |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            s = r.get("median_step_s")
            curve = r.get("loss_curve") or []
            lines.append(
                f"| {name} | {fmt(r.get('trained_entries', r.get('trainable')), ',')} | "
                f"{fmt(r.get('adapter_bytes') and r['adapter_bytes'] / 1e6, '.2f')} MB | {fmt(s, '.3f')} s | "
                f"{fmt(s and floor and s / floor, '.2f')} | {fmt(s and lora and s / lora, '.2f')} | "
                f"{fmt(r.get('peak_rss_mib'), ',.0f')} MiB | {fmt(smoothed(curve)[-1][1] if curve else None, '.3f')} | "
                f"{fmt(None if r.get('score') is None else 100 * r['score'], '.1f')} |")
        lines.append("")
    return "\n".join(lines).replace(" - MB", " -").replace(" - s |", " - |").replace(" - MiB", " -")


def spread(values: list[float], gap: float) -> list[float]:
    """``values`` moved apart (keeping their order) so that neighbours are at least ``gap`` apart: label positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [0.0] * len(values)
    for rank, i in enumerate(order):
        placed[i] = values[i] if rank == 0 else max(values[i], placed[order[rank - 1]] + gap)
    shift = (max(placed) - max(values)) / 2 if values else 0.0  # recentre what the pushes moved up
    return [p - shift for p in placed]


SMOOTHING = 5  # steps per point of the plotted loss curves (the batches are 8 rows: per-step losses are noisy)


def smoothed(curve: list) -> list:
    """``(step, loss)`` points averaged over consecutive windows of ``SMOOTHING`` steps, at each window's last step."""
    windows = [curve[i : i + SMOOTHING] for i in range(0, len(curve), SMOOTHING)]
    return [[w[-1][0], sum(l for _, l in w) / len(w)] for w in windows]


def plot(results: dict, settings: dict, path: Path) -> None:
    """Per base: the loss curves (labelled at their ends), then step time and accuracy per method (names on the
    axis). Each method keeps its colour and marker in every panel, so no legend is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in [FLOOR, *VARIANTS] if any(k.startswith(n + "@") for k in results)]
    palette = [plt.get_cmap("tab20")(i) for i in [*range(0, 20, 2), *range(1, 20, 2)]]  # the dark shades first
    colours = {n: palette[i % 20] for i, n in enumerate(names)}
    markers = dict(zip(names, itertools.cycle("osD^vP*Xh<>pd8")))
    bases = [b for b in settings["bases"] if any(k.endswith("@" + b) for k in results)]
    fig, axes = plt.subplots(len(bases), 3, figsize=(18, 5.5 * len(bases)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.4, 1, 1]})
    for (curves, speed, accuracy), base in zip(axes, bases):
        rows = {n: results[f"{n}@{base}"] for n in names if f"{n}@{base}" in results}
        ends = {n: smoothed(r["loss_curve"]) for n, r in rows.items() if r.get("loss_curve")}
        for name, curve in ends.items():
            steps, losses = zip(*curve)
            curves.plot(steps, losses, color=colours[name], marker=markers[name], markersize=4,
                        markevery=max(1, len(steps) // 8), linewidth=1.3)
        if ends:
            low = min(l for c in ends.values() for _, l in c)
            high = max(l for c in ends.values() for _, l in c)
            last = max(c[-1][0] for c in ends.values())
            labels = spread([c[-1][1] for c in ends.values()], gap=(high - low or 1.0) * 0.045)
            for (name, curve), y in zip(ends.items(), labels):
                curves.annotate(name, xy=curve[-1], xytext=(last * 1.04, y), fontsize=8, color=colours[name],
                                va="center", arrowprops=dict(arrowstyle="-", color=colours[name], lw=0.5))
            curves.set_xlim(right=last * 1.45)
        curves.set(title=f"{base} base: training loss on the answer tokens (mean of {SMOOTHING} steps)",
                   xlabel="optimizer step", ylabel="loss")
        floor = rows.get(FLOOR, {}).get("median_step_s")
        timed = sorted((r["median_step_s"] / floor, n) for n, r in rows.items() if floor and r.get("median_step_s"))
        order = [n for _, n in timed] + [n for n in rows if n not in {m for _, m in timed}]
        ypos = {n: i for i, n in enumerate(order)}
        for ratio, name in timed:
            speed.scatter(ratio, ypos[name], color=colours[name], marker=markers[name], s=60, zorder=3)
            speed.annotate(f"{ratio:.2f}", (ratio, ypos[name]), xytext=(6, 0), textcoords="offset points",
                           va="center", fontsize=8)
        speed.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        speed.set(title=f"{base} base: median step / frozen-backbone step", xlabel="x floor (lower is faster)")
        for name in order:
            score = rows[name].get("score")
            if score is not None:
                accuracy.scatter(100 * score, ypos[name], color=colours[name], marker=markers[name], s=60, zorder=3)
                accuracy.annotate(f"{100 * score:.1f}", (100 * score, ypos[name]), xytext=(6, 0),
                                  textcoords="offset points", va="center", fontsize=8)
        before = next((r["score_before"] for r in rows.values() if r.get("score_before") is not None), None)
        if before is not None:
            accuracy.axvline(100 * before, color="grey", linestyle=":", linewidth=1)
            accuracy.annotate("before training", (100 * before, len(order) - 0.5), fontsize=8, color="grey",
                              xytext=(3, 0), textcoords="offset points")
        accuracy.set(title=f"{base} base: held-out answer accuracy", xlabel="accuracy (%)")
        if not ends:  # the quality phase did not run on this base
            for ax in (curves, accuracy):
                ax.text(0.5, 0.5, "not measured on this base\n(quality phase not run)", transform=ax.transAxes,
                        ha="center", va="center", color="grey")
        for ax in (speed, accuracy):
            ax.set_yticks(range(len(order)), order, fontsize=8)
            ax.set_ylim(-0.7, len(order) - 0.3)
            ax.margins(x=0.15)
        for ax in (curves, speed, accuracy):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_saved(results: dict, settings: dict, saved: dict) -> None:
    """Take into ``results`` / ``settings`` what another command wrote to llm.json meanwhile (fields and commands
    this process does not have), so that commands running at once, e.g. the quality phase of each base, add up."""
    for key, fields in saved["results"].items():
        for field, value in fields.items():
            results.setdefault(key, {}).setdefault(field, value)
    earlier = saved["settings"].get("commands", [saved["settings"]["command"]])  # in the order they first saved
    mine = settings.get("commands", [settings["command"]])
    settings["commands"] = [*earlier, *(c for c in mine if c not in earlier)]
    for phase, values in saved["settings"].get("phases_run", {}).items():
        settings.setdefault("phases_run", {}).setdefault(phase, values)
    settings["bases"] = sorted(set(saved["settings"]["bases"]) | set(settings["bases"]), key=list(BASES).index)


def write_outputs(args, results: dict, settings: dict) -> None:
    out = Path(args.out_dir)
    saved = out / "llm.json"
    if saved.exists() and not (args.report or args.fresh):
        merge_saved(results, settings, json.loads(saved.read_text()))
    partial = saved.with_suffix(".json.tmp")  # written whole, then renamed: a reader never sees half a file
    partial.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    os.replace(partial, saved)
    (out / "llm.md").write_text(table(results, settings))
    plot(results, settings, out / "llm.png")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="HF folder or hub id; default: offline SmolLM2-135M-Instruct")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--glue-dir", default=None, help="GLUE TSV folder (SST-2); without it: hub data for quality, "
                                                    "random tokens for the step batches")
    p.add_argument("--out-dir", default="benchmarks/llm")
    p.add_argument("--methods", default=None, help=f"comma-separated, default all: {','.join(VARIANTS)}")
    p.add_argument("--bases", default=",".join(BASES))
    p.add_argument("--phases", default="memory,timing,quality")
    p.add_argument("--fresh", action="store_true", help="start a new llm.json instead of adding to the one there")
    p.add_argument("--report", action="store_true", help="only rebuild llm.md and llm.png from llm.json")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora_dropout", type=float, default=0.0,
                   help="dropout of the LoRA rows that set none (default 0.0, PEFT's LoraConfig default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--num-batches", type=int, default=4, help="fixed batches, cycled")
    p.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--alone-steps", type=int, default=4, help="steps of each memory run")
    p.add_argument("--calibration-batches", type=int, default=20, help="Learner priming steps on the fixed batches")
    p.add_argument("--train-steps", type=int, default=100, help="quality: optimizer steps per method")
    p.add_argument("--train-samples", type=int, default=800)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--alone", help=argparse.SUPPRESS)  # internal: NAME@BASE, JSON to stdout
    p.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)  # internal: SmolLM2's folder
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.alone:
        print(json.dumps(measure_alone(args)))
        return
    if args.convert:
        print(json.dumps({"path": model_path(args)}))
        return
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        saved = json.loads((out / "llm.json").read_text())
        write_outputs(args, saved["results"], saved["settings"])
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("alone", "convert", "report", "fresh")}
    settings.update(bases=args.bases.split(","), model=convert_in_fresh_process(args), torch=torch.__version__,
                    machine=f"{platform.processor() or platform.machine()}, {platform.system()}",
                    command="python benchmarks/llm.py " + shlex.join(sys.argv[1:] if argv is None else argv))
    results: dict[str, dict] = {}
    saved = out / "llm.json"
    if saved.exists() and not args.fresh:  # phases run separately add to one file; each keeps its own command
        merge_saved(results, settings, json.loads(saved.read_text()))
    for phase in args.phases.split(","):  # memory first: fresh processes before this one builds any model
        settings.setdefault("phases_run", {})[phase] = {k: getattr(args, k) for k in PHASE_SETTINGS[phase]}
        if phase == "quality":
            quality_phase(args, results, save=lambda: write_outputs(args, results, settings))
        else:
            {"memory": memory_phase, "timing": timing_phase}[phase](args, results)
        write_outputs(args, results, settings)
    print((out / "llm.md").read_text())


if __name__ == "__main__":
    main()

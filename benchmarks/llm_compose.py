#!/usr/bin/env python
"""Evidence on an LLM (issue 20): SparseMask at LoRA r=8's entry count against LoRA r=8 on SmolLM2-135M-Instruct,
each trained on its own chat-posed GLUE task, then the two tasks' adapters combined (``add_weighted_adapter``).

1. **single**: for each task (default SST-2 and MRPC), method and seed (3), train on the task's training rows with
   the loss on the answer tokens (``examples/finetune_causal_lm.py``'s chats) until the held-out loss stops falling:
   the loss on a held-out split of the training rows is measured every ``--eval-every`` steps, training stops after
   ``--patience`` measurements without a new best (or at ``--max-steps``), and the best state is kept. Score: answer
   accuracy on the task's dev rows. Judged with ``benchmarks/evidence.py``'s rule on the 95 % interval of the paired
   difference (SparseMask − LoRA, by seed, in points): confirmed if its low end is above −1, refuted if its high end
   is below −1, inconclusive otherwise.
2. **compose**: per method and seed, the two tasks' adapters loaded on one base and combined 1:1 with
   ``add_weighted_adapter`` (``linear``, and ``dare_linear`` at ``--density``; ``--combos`` adds ``ties``, ``cat``,
   ...), scored on both tasks: the fraction of each single-task score kept (and of its gain over the base model),
   SparseMask against LoRA with the same rule on the kept percentage. For SparseMask ``linear`` is the exact sum of
   the two increments (the support is the union); PEFT's LoRA ``linear`` mixes the A and B factors (``cat`` is its
   exact sum).

Resumable: every finished run appends a row to ``--results`` (JSON lines), keyed by a hash of what it depends on; a
rerun skips rows that are there. ``--plan`` lists the runs still to do with an estimate of their CPU time;
``--report`` writes ``llm_compose.md`` (tables, verdicts) and ``llm_compose.png`` from the rows alone. ``--shard
i/n`` runs every n-th single run (two single-thread shards side by side on 2 cores); a compose run follows as soon as
both tasks' adapters of its method and seed exist, in the shard that trains the later of the two. The adapters stay
in ``OUT_DIR/adapters`` (git-ignored): a single run whose adapter a later checkout lacks is trained again while a
composition still needs it.

    # the plan and its time, then the runs (2 base scores, 12 training runs, 12 combinations; at most about 9 hours
    # on 2 quiet cores with the defaults, every run to --max-steps; early stopping ends most sooner), the report
    python benchmarks/llm_compose.py --glue-dir ../shared/data/glue --plan
    python benchmarks/llm_compose.py --glue-dir ../shared/data/glue --threads 1 --shard 0/2 &
    python benchmarks/llm_compose.py --glue-dir ../shared/data/glue --threads 1 --shard 1/2 &
    wait; python benchmarks/llm_compose.py --glue-dir ../shared/data/glue      # any compose rows left
    python benchmarks/llm_compose.py --report

    # check the pipeline in minutes
    python benchmarks/llm_compose.py --glue-dir ../shared/data/glue --out-dir /tmp/compose-check --max-steps 4 \\
        --eval-every 2 --train-samples 32 --holdout 16 --eval-samples 16 --seeds 0,1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path += [str(ROOT / "examples"), str(ROOT / "benchmarks")]
import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

import finetune_causal_lm as example  # noqa: E402
import peft_sparse  # noqa: E402, F401  (registers the tuners: their adapters load)
from evidence import interval, verdict  # noqa: E402
from methods import DEFAULT_LR, method_config, trainable_entries  # noqa: E402

#: The methods: name -> (examples/methods.py method, options, learning rate). The first two run by default, each at
#: the causal-LM example's rate (``DEFAULT_LR``: 5e-3, 5e-4), as a user gets them; ``lora-r8-lr2e-3`` is a second LoRA row at 4 x
#: that rate (at 5e-4 LoRA stops at MRPC's majority class), run with ``--methods``.
METHODS: dict[str, tuple[str, dict[str, Any], float]] = {
    "sparsemask-lora-equal": ("sparsemask", {"match_lora_r": 8}, DEFAULT_LR["sparsemask"]),
    "lora-r8": ("lora", {"r": 8, "lora_dropout": 0.0}, DEFAULT_LR["lora"]),
    "lora-r8-lr2e-3": ("lora", {"r": 8, "lora_dropout": 0.0}, 2e-3),
}
OURS, BASELINE = "sparsemask-lora-equal", "lora-r8"
DEFAULT_METHODS = f"{OURS},{BASELINE}"
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Seconds of one training step of 8 rows of 64 tokens on SmolLM2 (fp32, 2 threads; benchmarks/RESULTS.md), and of
#: one forward of 16 scored rows: the --plan estimate scales them by rows and tokens.
STEP_S_8x64, FORWARD_S_16x64 = 3.5, 1.2


# ----------------------------------------------------------------------------------------------------- rows


def key_of(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption
            continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write a line: shards append whole lines
        f.write(json.dumps(row) + "\n")


def shared_settings(args) -> dict[str, Any]:
    """What every run depends on besides its method, task and seed."""
    return {k: getattr(args, k) for k in ("model", "train_samples", "holdout", "eval_samples", "length", "batch_size",
                                          "max_steps", "eval_every", "patience", "warmup_steps")}


def single_config(args, method: str, task: str, seed: int) -> dict[str, Any]:
    return {"kind": "single", "method": method, "task": task, "seed": seed, "lr": METHODS[method][2],
            "options": METHODS[method][1], **shared_settings(args)}


def compose_config(args, method: str, seed: int, combo: str, tasks: list[str]) -> dict[str, Any]:
    sources = [key_of(single_config(args, method, task, seed)) for task in tasks]
    return {"kind": "compose", "method": method, "seed": seed, "combo": combo, "tasks": tasks, "sources": sources,
            "density": args.density if combo in NEEDS_DENSITY else None, "eval_samples": args.eval_samples,
            "model": args.model, "length": args.length}


def base_config(args, task: str) -> dict[str, Any]:
    return {"kind": "base", "task": task, "model": args.model, "eval_samples": args.eval_samples, "length": args.length}


# ----------------------------------------------------------------------------------------------------- data


class TaskData:
    """A task's chats: training rows and the held-out split of the training set (tokenized, loss on the answer),
    and the dev chats that are scored. The split is the same for every method and seed."""

    def __init__(self, args, task: str, tokenizer):
        chats = example.glue_chats(task, "train", args.glue_dir, args.train_samples + args.holdout, 0, tokenizer,
                                   args.length)
        self.answers = example.GLUE_PROMPTS[task][1]
        rows = [example.encode(tokenizer, prompt, self.answers[label]) for prompt, label in chats]
        self.train, self.holdout = rows[args.holdout :], rows[: args.holdout]
        self.dev = example.glue_chats(task, "dev", args.glue_dir, args.eval_samples, 0, tokenizer, args.length)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([[t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
                           + [-100] * (width - len(r["input_ids"])) for r in rows])
    attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": attention}


def score(model, tokenizer, data: TaskData) -> float:
    """Answer accuracy on the dev chats, in points."""
    return 100 * example.answer_accuracy(model, tokenizer, data.dev, data.answers)


# ----------------------------------------------------------------------------------------------------- runs


def load_base(args):
    return example.load_model(example.ModelArguments(model_name_or_path=args.model, cache_dir=args.cache_dir))


def adapter_dir(args, config: dict[str, Any]) -> Path:
    return Path(args.out_dir) / "adapters" / f"{config['method']}-{config['task']}-s{config['seed']}-{key_of(config)}"


def train_single(args, config: dict[str, Any], data: TaskData) -> dict[str, Any]:
    """Train until the held-out loss stops falling; keep the best state; score it and save the adapter."""
    method, options, lr = METHODS[config["method"]]
    torch.manual_seed(config["seed"])
    model, tokenizer = load_base(args)
    model = get_peft_model(model, method_config(method, model, "CAUSAL_LM", **options))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, args.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    order = torch.Generator().manual_seed(config["seed"])
    queue: list[int] = []
    best = (math.inf, 0, None)
    curve, window, waited = [], [], 0
    start = time.process_time()
    for step in range(1, args.max_steps + 1):
        if len(queue) < args.batch_size:
            queue += torch.randperm(len(data.train), generator=order).tolist()
        batch = [data.train[i] for i in queue[: args.batch_size]]
        del queue[: args.batch_size]
        model.train()
        loss = model(**collate(batch, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        window.append(loss.item())
        if step % args.eval_every and step != args.max_steps:
            continue
        held_out = example.heldout_loss(model, tokenizer, data.holdout)
        curve.append({"step": step, "heldout_loss": held_out, "train_loss": sum(window) / len(window)})
        window = []
        if held_out < best[0]:
            best, waited = (held_out, step, [p.detach().clone() for p in params]), 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    with torch.no_grad():
        for param, value in zip(params, best[2]):
            param.copy_(value)
    folder = adapter_dir(args, config)
    model.save_pretrained(folder)
    return {"config": config, "key": key_of(config), "score": score(model, tokenizer, data), "best_step": best[1],
            "best_heldout_loss": best[0], "steps": curve[-1]["step"], "stopped_early": curve[-1]["step"] < args.max_steps,
            "curve": curve, "trained_entries": trainable_entries(model), "adapter": str(folder),
            "cpu_s": time.process_time() - start}


def compose(args, config: dict[str, Any], sources: dict[str, dict], data: dict[str, TaskData]) -> dict[str, Any]:
    """The two tasks' adapters of one method and seed combined 1:1, scored on both tasks."""
    base, tokenizer = load_base(args)
    tasks = config["tasks"]
    model = PeftModel.from_pretrained(base, sources[tasks[0]]["adapter"], adapter_name=tasks[0])
    model.load_adapter(sources[tasks[1]]["adapter"], adapter_name=tasks[1])
    torch.manual_seed(config["seed"])  # dare draws random masks
    extra = {"density": config["density"]} if config["density"] is not None else {}
    model.add_weighted_adapter(tasks, [1.0, 1.0], "combined", combination_type=config["combo"], **extra)
    model.set_adapter("combined")
    scores = {task: score(model, tokenizer, data[task]) for task in tasks}
    return {"config": config, "key": key_of(config), "scores": scores,
            "single": {task: sources[task]["score"] for task in tasks}}


def base_score(args, config: dict[str, Any], data: TaskData) -> dict[str, Any]:
    model, tokenizer = load_base(args)
    return {"config": config, "key": key_of(config), "score": score(model, tokenizer, data)}


# ----------------------------------------------------------------------------------------------------- plan


def parse_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def has_adapter(row: dict[str, Any]) -> bool:
    """Whether a single run's saved adapter is on this disk (adapters are git-ignored: a later checkout lacks them)."""
    return (Path(row["adapter"]) / "adapter_config.json").exists()


def planned(args, rows: list[dict]) -> dict[str, list[dict]]:
    """The configs still to run, by kind. A compose run needs both its sources' adapters on this disk: a single run
    whose row is there but whose adapter is not (trained in an earlier session) is planned again while a composition
    still needs it; its new row replaces the old one."""
    done = {r["key"] for r in rows}
    singles = {r["key"]: r for r in rows if r["config"]["kind"] == "single"}
    tasks, seeds = parse_list(args.tasks), [int(s) for s in parse_list(args.seeds)]
    methods = parse_list(args.methods)
    plan: dict[str, list[dict[str, Any]]] = {"base": [], "single": [], "compose": []}
    plan["all_base"] = [base_config(args, t) for t in tasks]
    plan["base"] = [c for c in plan["all_base"] if key_of(c) not in done]
    # Seed-major, methods side by side: with two shards each finished seed gives a paired comparison and its
    # combinations early, whenever the runs are cut off (they span sessions).
    plan["compose"] = [c for c in (compose_config(args, method, seed, combo, tasks)
                                   for seed in seeds for method in methods for combo in parse_list(args.combos))
                       if key_of(c) not in done]
    lost = {k for c in plan["compose"] for k in c["sources"] if k in singles and not has_adapter(singles[k])}
    plan["all_single"] = [single_config(args, method, task, seed)
                          for seed in seeds for task in tasks for method in methods]
    plan["single"] = [c for c in plan["all_single"] if key_of(c) not in done or key_of(c) in lost]
    plan["compose_ready"] = [c for c in plan["compose"]
                             if all(k in singles and has_adapter(singles[k]) for k in c["sources"])]
    return plan


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)``."""
    index, count = (int(x) for x in text.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: want i/n with 0 <= i < n")
    return index, count


def shard(items: list, text: Optional[str], universe: list) -> list:
    """The items of shard ``text`` ("i/n"): every n-th of ``universe``, the whole plan of that kind, from the i-th,
    that are in ``items``. Cutting the whole plan rather than what is left keeps a run in one shard when shards start
    at different times (a shard restarted while the other trains)."""
    if not text:
        return items
    index, count = parse_shard(text)
    keys = {key_of(c) for c in items}
    return [c for c in universe[index::count] if key_of(c) in keys]


def owned(composes: list, text: Optional[str], all_single: list) -> list:
    """The compose runs of shard ``text``: those whose last source (in plan order) that shard trains. One owner per
    combination, so two shards never run one, whenever each looks; the owner looks after each of its runs."""
    if not text:
        return composes
    index, count = parse_shard(text)
    position = {key_of(c): i for i, c in enumerate(all_single)}
    return [c for c in composes if max(position[k] for k in c["sources"]) % count == index]


def shard_plan(plan: dict[str, list], text: Optional[str]) -> dict[str, list]:
    """What shard ``text`` runs of ``plan``: its base and single runs, and the combinations it owns."""
    return {**plan, "base": shard(plan["base"], text, plan["all_base"]),
            "single": shard(plan["single"], text, plan["all_single"]),
            "compose": owned(plan["compose"], text, plan["all_single"])}


def estimate_s(args, kind: str) -> float:
    """CPU seconds of one run at most (max steps, every evaluation), from the constants above."""
    tokens = args.length / 64
    forward = FORWARD_S_16x64 * tokens
    scoring = forward * math.ceil(2 * args.eval_samples / 16)  # each dev chat with each of its two answers
    if kind == "single":
        evals = math.ceil(args.max_steps / args.eval_every)
        step = STEP_S_8x64 * tokens * args.batch_size / 8
        return args.max_steps * step + evals * forward * math.ceil(args.holdout / 16) + scoring
    return scoring * (2 if kind == "compose" else 1)


def plan_text(args, plan: dict[str, list]) -> str:
    lines = [f"{'kind':8} {'method':24} {'task':6} {'seed':>4}  extra"]
    total = 0.0
    for kind in ("base", "single", "compose"):
        for c in plan[kind]:
            lines.append(f"{kind:8} {c.get('method', '-'):24} {'+'.join(c['tasks']) if 'tasks' in c else c['task']:6} "
                         f"{c.get('seed', '-'):>4}  {c.get('combo', '')}")
            total += estimate_s(args, kind)
    lines.append(f"{sum(len(plan[k]) for k in ('base', 'single', 'compose'))} runs: at most {total / 3600:.1f} hours "
                 f"on 2 threads, {2 * total / 3600:.1f} CPU-hours (every training run to --max-steps {args.max_steps}; "
                 "early stopping ends most sooner)")
    return "\n".join(lines)


def execute(args) -> None:
    results = Path(args.results)
    tokenizer = load_base(args)[1]
    cache: dict[str, TaskData] = {}

    def data_of(task: str) -> TaskData:
        if task not in cache:
            cache[task] = TaskData(args, task, tokenizer)
        return cache[task]

    def run_composes(configs: list[dict[str, Any]]) -> None:
        singles = {r["key"]: r for r in read_rows(results) if r["config"]["kind"] == "single"}
        for config in configs:
            print(f"[compose] {config['method']} seed {config['seed']} {config['combo']}", flush=True)
            sources = {task: singles[k] for task, k in zip(config["tasks"], config["sources"])}
            row = compose(args, config, sources, {task: data_of(task) for task in config["tasks"]})
            append_row(results, {**row, "commit": git_commit()})

    plan = planned(args, read_rows(results))
    mine = shard_plan(plan, args.shard)
    for config in mine["base"]:
        print(f"[base] {config['task']}", flush=True)
        append_row(results, base_score(args, config, data_of(config["task"])))
    run_composes(owned(plan["compose_ready"], args.shard, plan["all_single"]))  # adapters here from earlier runs
    for config in mine["single"]:
        print(f"[single] {config['method']} {config['task']} seed {config['seed']}", flush=True)
        row = train_single(args, config, data_of(config["task"]))
        append_row(results, {**row, "commit": git_commit()})
        print(f"[single] score {row['score']:.1f} after {row['steps']} steps (best {row['best_step']})", flush=True)
        # the combinations ready now, while their adapters are on this disk
        run_composes(owned(planned(args, read_rows(results))["compose_ready"], args.shard, plan["all_single"]))
    run_composes(owned(planned(args, read_rows(results))["compose_ready"], args.shard, plan["all_single"]))


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# ---------------------------------------------------------------------------------------------------- report


def judged(values: dict[int, float], others: dict[int, float]) -> Optional[dict[str, Any]]:
    """The paired difference (ours − baseline) over the common seeds, its 95 % interval and evidence.py's verdict."""
    seeds = sorted(set(values) & set(others))
    if len(seeds) < 2:
        return None
    diff, _, half = interval([values[s] - others[s] for s in seeds])
    return {"seeds": len(seeds), "diff": diff, "low": diff - half, "high": diff + half,
            "verdict": verdict(diff - half, diff + half)}


def judgement(values: dict[int, float], others: dict[int, float]) -> str:
    """The last two cells of a verdict row: the paired difference with its interval, and the verdict."""
    j = judged(values, others)
    if j is None:
        return "- | - (fewer than 2 paired seeds) |"
    return f"{j['diff']:+.1f} [{j['low']:+.1f}, {j['high']:+.1f}] | {j['verdict']} |"


def fmt_interval(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    mean, _, half = interval(values)
    return f"{mean:.1f} ± {half:.1f}"


def current(args, rows: list[dict]) -> tuple[dict, dict, dict]:
    """The rows of the present settings: singles ``{(method, task): {seed: row}}``, composes ``{(method, combo):
    {seed: row}}``, base scores ``{task: score}``."""
    tasks, seeds = parse_list(args.tasks), [int(s) for s in parse_list(args.seeds)]
    by_key = {r["key"]: r for r in rows}
    singles = {(m, t): {s: by_key[k] for s in seeds if (k := key_of(single_config(args, m, t, s))) in by_key}
               for m in METHODS for t in tasks}
    composes = {(m, c): {s: by_key[k] for s in seeds if (k := key_of(compose_config(args, m, s, c, tasks))) in by_key}
                for m in METHODS for c in parse_list(args.combos)}
    bases = {t: by_key[k]["score"] for t in tasks if (k := key_of(base_config(args, t))) in by_key}
    return singles, composes, bases


def shown_methods(singles: dict, tasks: list[str]) -> list[str]:
    """The methods with rows under the present settings, SparseMask and the headline LoRA always."""
    return [m for m in METHODS if m in (OURS, BASELINE) or any(singles[(m, t)] for t in tasks)]


def learned_both(runs: dict[str, dict[int, dict]], bases: dict[str, float], tasks: list[str]) -> set[int]:
    """The seeds where every method's two single-task adapters beat the base model: only there does the score a
    combination keeps compare the methods (an adapter that learned nothing keeps its task's base score, and its
    partner's score, for free)."""
    seeds = set.intersection(*(set(r) for r in runs.values()))
    return {s for s in seeds if all(r[s]["single"][t] > bases.get(t, math.inf) for r in runs.values() for t in tasks)}


def report(args) -> str:
    rows = read_rows(Path(args.results))
    singles, composes, bases = current(args, rows)
    tasks = parse_list(args.tasks)
    methods = shown_methods(singles, tasks)
    baselines = [m for m in methods if m != OURS]
    out = ["# SparseMask vs LoRA on SmolLM2: single tasks, then two tasks' adapters combined", "",
           f"Results: `{args.results}`; settings: {json.dumps(shared_settings(args))}. Learning rates: "
           + ", ".join(f"{m} {METHODS[m][2]:g}" for m in methods) + " (`lora-r8` and SparseMask at the causal-LM "
           "example's rates, as a user gets them; a further LoRA row is a second row, not the headline). Scores: dev "
           "answer accuracy (points), mean ± 95 % interval over seeds. Verdict (benchmarks/evidence.py): the 95 % "
           "interval of the paired difference SparseMask − LoRA; confirmed if its low end is above −1 point, refuted "
           "if its high end is below −1, inconclusive otherwise.", "", "## Each method on its own task", "",
           "| task | base model | " + " | ".join(methods) + " | best step by seed, per method |",
           "|---|---:|" + "---:|" * len(methods) + "---|"]
    scores = {(m, t): {s: r["score"] for s, r in singles[(m, t)].items()} for m in methods for t in tasks}
    for task in tasks:
        steps = "; ".join(f"{', '.join(str(r['best_step']) for r in singles[(m, task)].values()) or '-'}"
                          for m in methods)
        base = f"{bases[task]:.1f}" if task in bases else "-"
        out.append(f"| {task} | {base} | " + " | ".join(fmt_interval(list(scores[(m, task)].values())) for m in methods)
                   + f" | {steps} |")
    out += ["", "| task | against | paired seeds | SparseMask − LoRA | verdict |", "|---|---|---:|---:|---|"]
    for task in tasks:
        for baseline in baselines:
            ours, theirs = scores[(OURS, task)], scores[(baseline, task)]
            out.append(f"| {task} | {baseline} | {len(set(ours) & set(theirs))} | " + judgement(ours, theirs))
    out += ["", "## The two tasks' adapters combined 1:1 (`add_weighted_adapter`)", "",
            "Kept: the combined adapter's score on a task as a percentage of the same method and seed's single-task "
            "score (gain kept: of its gain over the base model, over the seeds whose single-task adapter beat the base "
            "model).", "",
            "| combination | task | method | combined score | kept (%) | gain kept (%) |",
            "|---|---|---|---:|---:|---:|"]
    kept: dict[tuple[str, str, str], dict[int, float]] = {}
    for combo in parse_list(args.combos):
        for task in tasks:
            for method in methods:
                runs = composes[(method, combo)]
                kept[(combo, task, method)] = {s: 100 * r["scores"][task] / r["single"][task] for s, r in runs.items()
                                               if r["single"][task]}
                gains = [100 * (r["scores"][task] - bases[task]) / (r["single"][task] - bases[task])
                         for r in runs.values() if task in bases and r["single"][task] > bases[task]]
                out.append(f"| {combo} | {task} | {method} | "
                           f"{fmt_interval([r['scores'][task] for r in runs.values()])} | "
                           f"{fmt_interval(list(kept[(combo, task, method)].values()))} | {fmt_interval(gains)} |")
    out += ["", "Kept compared, SparseMask − LoRA, over the seeds where both methods' two single-task adapters beat "
            "the base model (elsewhere a method whose adapter learned nothing keeps its task's base score, and leaves "
            "its partner undisturbed, for free):", "",
            "| combination | task | against | seeds where both learned both tasks | SparseMask − LoRA, kept "
            "| verdict |",
            "|---|---|---|---:|---:|---|"]
    for combo in parse_list(args.combos):
        for task in tasks:
            for baseline in baselines:
                seeds = learned_both({m: composes[(m, combo)] for m in (OURS, baseline)}, bases, tasks)
                ours, theirs = ({s: v for s, v in kept[(combo, task, m)].items() if s in seeds}
                                for m in (OURS, baseline))
                out.append(f"| {combo} | {task} | {baseline} | {len(seeds)} | " + judgement(ours, theirs))
    out += ["", "For SparseMask, `linear` is the exact sum of the two increments on the union of their supports; "
            "PEFT's LoRA `linear` combines the A and B factors separately (an approximation of the sum; its `cat` is "
            "exact). `dare_linear` keeps each entry of every increment (SparseMask) or factor (LoRA) with probability "
            f"`density` ({args.density}) and rescales it.", ""]
    return "\n".join(out)


def plot(args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    singles, composes, bases = current(args, read_rows(Path(args.results)))
    tasks, combos = parse_list(args.tasks), parse_list(args.combos)
    methods = shown_methods(singles, tasks)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        means = [statistics_mean([r["score"] for r in singles[(method, t)].values()]) for t in tasks]
        axes[0].bar([x + i * width for x in range(len(tasks))], means, width, label=method)
        for x, t in enumerate(tasks):
            axes[0].scatter([x + i * width] * len(singles[(method, t)]),
                            [r["score"] for r in singles[(method, t)].values()], color="black", s=8, zorder=3)
    for x, t in enumerate(tasks):
        if t in bases:
            axes[0].hlines(bases[t], x - width / 2, x + width * (len(methods) - 0.5), colors="grey", linestyles="--")
    axes[0].set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(tasks))], tasks)
    axes[0].set_ylabel("dev accuracy (points)")
    axes[0].set_title("single task (dashed: base model)")
    axes[0].legend(fontsize=8)
    labels = [f"{c}\n{t}" for c in combos for t in tasks]
    for i, method in enumerate(methods):
        kept = [statistics_mean([100 * r["scores"][t] / r["single"][t] for r in composes[(method, c)].values()
                                 if r["single"][t]]) for c in combos for t in tasks]
        axes[1].bar([x + i * width for x in range(len(labels))], kept, width, label=method)
    axes[1].axhline(100, color="grey", ls="--")
    axes[1].set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(labels))], labels, fontsize=8)
    axes[1].set_ylabel("single-task score kept (%)")
    axes[1].set_title("two tasks' adapters combined 1:1")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline) or a model folder")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--glue-dir", default=None, help="GLUE TSV folder (default: the hub's nyu-mll/glue)")
    parser.add_argument("--tasks", default="sst2,mrpc", help="two of sst2, mrpc, rte, cola")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--combos", default="linear,dare_linear")
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"some of {', '.join(METHODS)}")
    parser.add_argument("--density", type=float, default=0.5, help="of the combinations that prune")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--holdout", type=int, default=200, help="training rows held out for early stopping")
    parser.add_argument("--eval-samples", type=int, default=400, help="dev rows scored")
    parser.add_argument("--length", type=int, default=96, help="tokens per row (sentences are cut to fit)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--patience", type=int, default=3, help="held-out measurements without a new best")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard", default=None, help="i/n: every n-th run from the i-th")
    parser.add_argument("--out-dir", default="benchmarks/llm_compose")
    parser.add_argument("--results", default=None, help="JSON lines (default: OUT_DIR/results.jsonl)")
    parser.add_argument("--plan", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    args.results = args.results or str(Path(args.out_dir) / "results.jsonl")
    tasks = parse_list(args.tasks)
    if len(tasks) != 2 or any(t not in example.GLUE_PROMPTS for t in tasks):
        parser.error(f"--tasks: two of {sorted(example.GLUE_PROMPTS)}, got {args.tasks!r}")
    unknown = [m for m in parse_list(args.methods) if m not in METHODS]
    if unknown or not parse_list(args.methods):
        parser.error(f"--methods {unknown or args.methods!r}: choose from {', '.join(METHODS)}")
    bad = [c for c in parse_list(args.combos) if c not in ("linear", "cat", *NEEDS_DENSITY)]
    if bad:
        parser.error(f"--combos {bad}: choose from linear, cat, {', '.join(NEEDS_DENSITY)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.plan:
        print(plan_text(args, shard_plan(planned(args, read_rows(Path(args.results))), args.shard)))
        return
    if not args.report:
        execute(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = report(args)
    command = shlex.join(["python", "benchmarks/llm_compose.py", *(argv if argv is not None else sys.argv[1:])])
    (out_dir / "llm_compose.md").write_text(text + f"\nCommand: `{command}`; {platform.processor() or platform.machine()}, "
                                                   f"torch {torch.__version__}.\n")
    plot(args, out_dir / "llm_compose.png")
    print(text)


if __name__ == "__main__":
    main()

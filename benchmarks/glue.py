#!/usr/bin/env python
"""GLUE side-by-side benchmark: methods x tasks x seeds, each run a subprocess of examples/finetune_glue.py.

Every run is its own process (so its peak RSS is its own), the runs go one after another, all with the same
thread count. The example builds each method with examples/methods.py and measures it with peft_sparse.reporting;
the harness collects the runs' JSON reports and writes, under ``--out-dir``:

- ``glue.json``: every raw report plus the benchmark's settings;
- ``glue.md``: a Markdown table per task and method (score mean ± std over seeds, trainable parameters, adapter
  bytes, peak RSS, median optimizer-step time, training wall time);
- ``glue.png``: per task, score vs trainable parameters and score vs adapter bytes (both log x);
- ``runs/`` and ``logs/``: each run's output folder (adapter and ``report.json``) and log.

Quick profile (about 30 minutes on a 2-core CPU)::

    python benchmarks/glue.py --quick --glue-dir ../shared/data/glue

Anything else, e.g.::

    python benchmarks/glue.py --methods bitfit,layerselect --tasks rte,stsb,cola --seeds 1,2,3 \\
        --glue-dir ../shared/data/glue --max-train-samples 2000 --epochs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_glue.py"
sys.path.append(str(ROOT / "examples"))
from methods import BERT_BLOCK_TARGETS  # noqa: E402

#: The quick profile: 4 methods x SST-2 (4,000 training rows) and MRPC (all 3,668), 1 seed, 1 epoch, full dev sets.
QUICK = dict(
    methods="full,lora,bitfit,layerselect",
    tasks="sst2,mrpc",
    seeds="42",
    max_train_samples="sst2=4000",
    max_eval_samples=None,
    epochs=1.0,
    max_length=64,
    batch_size=32,
)

#: The six Linears of each BERT block, not the pooler (LoRA r=8 trains 331,776 entries there on MiniLM): the
#: modules of the LoRA, SHiRA, SparseMask and DPS runs in benchmarks/RESULTS.md. examples/methods.py's default for
#: LoRA, SHiRA, SparseMask and DPS adds the pooler.
BLOCKS = "--target_modules " + " ".join(BERT_BLOCK_TARGETS)

#: Benchmark labels: a method of finetune_glue.py with its arguments. Other labels run the method with the
#: example's defaults.
VARIANTS = {
    "lora-r8": ("lora", f"--lora_r 8 {BLOCKS}"),
    "shira-r8": ("shira", f"--lora_r 8 {BLOCKS}"),
    "sparsemask-mag": ("sparsemask", f"--density 0.01 --selection magnitude {BLOCKS}"),
    "sparsemask-grad": ("sparsemask", f"--density 0.01 --selection gradient {BLOCKS}"),
    "sparsemask-rand": ("sparsemask", f"--density 0.01 --selection random {BLOCKS}"),
    "sparsemask-eq": ("sparsemask", f"--density 0.03125 --selection magnitude {BLOCKS}"),  # LoRA r=8's count
    "mask-10": ("mask", "--sparsity 0.1"),  # SparseMask's own default targets: the six block Linears
    "dps": ("dps", BLOCKS),
    "bias-only": ("bitfit", ""),
    "bitfit-lr5e-3": ("bitfit", "--learning_rate 5e-3"),  # 1 epoch is short for BitFit at its paper's lr of 1e-3
}

#: Named profiles (``--profile NAME``): the runs behind each table in benchmarks/RESULTS.md.
PROFILES = {
    "quick": QUICK,
    # Issue 3: SparseMask against LoRA, SHiRA, bias-only and full FT at the reference settings.
    "sparse": dict(QUICK, methods="sparsemask-mag,sparsemask-grad,mask-10,lora-r8,shira-r8,bias-only,bitfit-lr5e-3,"
                                  "full",
                   tasks="sst2", max_train_samples="sst2=4000"),
    # Issue 4: DPS against full fine-tuning over 3 seeds on the smallest task (RTE).
    "dps": dict(QUICK, methods="full,dps", tasks="rte", seeds="1,2,3", max_train_samples=None),
    # Issue 4: Learners against LoRA and BitFit on CoLA.
    "learner": dict(QUICK, methods="learner,lora-r8,bitfit", tasks="cola", max_train_samples="cola=4000"),
}

METHOD_STYLE = {  # marker, colour for the plot; unknown methods get defaults
    "full": ("s", "tab:red"),
    "lora": ("^", "tab:blue"),
    "bitfit": ("o", "tab:green"),
    "layerselect": ("D", "tab:purple"),
    "sparsemask": ("v", "tab:orange"),
    "dps": ("P", "tab:brown"),
    "learner": ("X", "tab:pink"),
}
METRIC_LABEL = {"accuracy": "accuracy", "f1": "F1", "matthews_correlation": "MCC", "pearson": "Pearson",
                "spearmanr": "Spearman"}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def per_task(text: Optional[str], task: str) -> Optional[str]:
    """``"500"`` (every task) or ``"sst2=4000,rte=1000"`` (per task; tasks not named: no limit)."""
    if not text:
        return None
    if "=" not in text:
        return text
    values = dict(item.split("=", 1) for item in _csv(text))
    return values.get(task)


def example_command(args, task: str, method: str, seed: int, out_dir: Path) -> list[str]:
    """The examples/finetune_glue.py command of one run, writing to ``out_dir/runs/<task>-<method>-s<seed>``."""
    example_method, variant_args = VARIANTS.get(method, (method, ""))
    cmd = [
        sys.executable, str(EXAMPLE),
        "--task_name", task, "--method", example_method, "--seed", str(seed), "--num_train_epochs", str(args.epochs),
        "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", str(2 * args.batch_size),
        "--max_seq_length", str(args.max_length), "--output_dir", str(out_dir / "runs" / f"{task}-{method}-s{seed}"),
    ]
    if args.glue_dir:
        cmd += ["--glue_dir", args.glue_dir]
    if args.model:
        cmd += ["--model_name_or_path", args.model]
    for flag, value in (("--max_train_samples", per_task(args.max_train_samples, task)),
                        ("--max_eval_samples", per_task(args.max_eval_samples, task))):
        if value is not None and int(value) > 0:
            cmd += [flag, str(int(value))]
    return cmd + shlex.split(variant_args) + shlex.split(args.example_args or "")


def run_one(args, task: str, method: str, seed: int, out_dir: Path) -> dict[str, Any]:
    name = f"{task}-{method}-s{seed}"
    json_out = out_dir / "runs" / name / "report.json"
    log = out_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if args.skip_existing and json_out.is_file():
        print(f"[glue-bench] {name}: reusing {json_out}", flush=True)
        return json.loads(json_out.read_text())
    example_method, variant_args = VARIANTS.get(method, (method, ""))
    cmd = example_command(args, task, method, seed, out_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.threads:  # torch's threads (it reads OMP_NUM_THREADS), and the tokenizers' own pool
        env.update(OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads))
    if json_out.exists():
        json_out.unlink()
    print(f"[glue-bench] {name}: {shlex.join(cmd)}", flush=True)
    load_before = os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode != 0 or not json_out.is_file():
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"[glue-bench] {name}: FAILED (exit {proc.returncode}), log {log}:\n  " + "\n  ".join(tail), flush=True)
        return {"task": task, "method": method, "seed": seed, "failed": True, "returncode": proc.returncode,
                "log": str(log), "process_wall_s": wall}
    report = json.loads(json_out.read_text())
    report.update(method=method, example_method=example_method, example_args=variant_args)  # the label groups
    report.update(process_wall_s=wall, process_cpu_s=cpu, loadavg_1min_before=load_before,
                  loadavg_1min_after=os.getloadavg()[0], log=str(log))
    json_out.write_text(json.dumps(report, indent=2))
    print(f"[glue-bench] {name}: {report['metric']} {report['score']:.4f}, {report['trainable_params']:,} trainable, "
          f"train {report['train_wall_s']:.0f} s, process {wall:.0f} s", flush=True)
    return report


# ----------------------------------------------------------------------------------------------------------------
# Aggregation, table, plot
# ----------------------------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _median(values: list[float]) -> Optional[float]:
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return None
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def aggregate(results: list[dict[str, Any]], tasks: list[str], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for task in tasks:
        for method in methods:
            runs = [r for r in results if r["task"] == task and r["method"] == method and not r.get("failed")]
            failed = [r for r in results if r["task"] == task and r["method"] == method and r.get("failed")]
            if not runs:
                rows.append(dict(task=task, method=method, n=0, failed=len(failed)))
                continue
            mean, std = _mean_std([r["score"] for r in runs])
            other = {}
            for key in runs[0]["metrics"]:
                other[key] = _mean_std([r["metrics"][key] for r in runs])[0]
            rows.append(dict(
                task=task, method=method, n=len(runs), failed=len(failed), metric=runs[0]["metric"],
                score_mean=mean, score_std=std, metrics=other,
                trainable_params=_median([r["trainable_params"] for r in runs]),
                total_params=_median([r["total_params"] for r in runs]),
                adapter_bytes=_median([r["adapter_bytes"] for r in runs]),
                peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
                median_step_s=_median([r["median_step_s"] for r in runs]),
                train_wall_s=_mean_std([r["train_wall_s"] for r in runs])[0],
                train_cpu_s=_mean_std([r.get("train_cpu_s") for r in runs])[0],
                calibration_s=_mean_std([r.get("calibration_s", 0.0) for r in runs])[0],
                layers=sorted({tuple((r.get("adapter_config") or {}).get("layers") or ()) for r in runs}),
            ))
    return rows


def _fmt_int(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{int(round(n)):,}"


def _fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| task | method | score (dev) | other metrics | trainable params | adapter on disk | peak RSS (MiB) "
            "| median step (ms) | train time (s): wall / CPU |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if not r["n"]:
            lines.append(f"| {r['task']} | {r['method']} | failed ({r['failed']} runs) | | | | | | |")
            continue
        label = METRIC_LABEL.get(r["metric"], r["metric"])
        score = f"{label} {100 * r['score_mean']:.2f}"
        score += f" ± {100 * r['score_std']:.2f}" if r["score_std"] is not None else ""
        score += f" (n={r['n']})" if r["n"] > 1 else ""
        other = ", ".join(f"{METRIC_LABEL.get(k, k)} {100 * v:.2f}" for k, v in r["metrics"].items()
                          if k != r["metric"]) or "–"
        pct = 100 * r["trainable_params"] / r["total_params"]
        method = r["method"]
        if method == "layerselect" and r["layers"] and r["layers"][0]:
            method += " " + "/".join(str(list(l)) for l in r["layers"])
        train = f"{r['train_wall_s']:.0f}"
        if not math.isnan(r["train_cpu_s"]):
            train += f" / {r['train_cpu_s']:.0f}"
        if r["calibration_s"]:
            train += f" (+{r['calibration_s']:.0f} calib.)"
        step = f"{1000 * r['median_step_s']:.0f}" if r["median_step_s"] is not None else "n/a"
        lines.append(
            f"| {r['task']} | {method} | {score} | {other} | {_fmt_int(r['trainable_params'])} ({pct:.2f}%) "
            f"| {_fmt_bytes(r['adapter_bytes'])} | {r['peak_rss_mib']:.0f} | {step} | {train} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 3.6 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        task_rows = [r for r in rows if r["task"] == task and r["n"]]
        for j, (key, xlabel) in enumerate((("trainable_params", "trainable parameters"),
                                           ("adapter_bytes", "adapter size on disk (bytes)"))):
            ax = axes[i][j]
            for r in task_rows:
                marker, color = METHOD_STYLE.get(r["method"], ("*", "black"))
                ax.errorbar([r[key]], [100 * r["score_mean"]],
                            yerr=[100 * r["score_std"]] if r["score_std"] is not None else None,
                            fmt=marker, color=color, markersize=8, capsize=3, label=r["method"])
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            metric = METRIC_LABEL.get(task_rows[0]["metric"], task_rows[0]["metric"]) if task_rows else "score"
            ax.set_ylabel(f"{task} dev {metric} (%)")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(loc="best", fontsize=8)
    fig.suptitle("GLUE dev score vs. cost of the adapter")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def machine_description(results: list[dict[str, Any]]) -> str:
    env = next((r["environment"] for r in results if not r.get("failed")), {})
    device = env.get("device", "cpu")
    gpu = "no GPU" if device == "cpu" else device
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), {gpu}, torch {env.get('torch', '?')}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="full,lora,bitfit,layerselect on SST-2 (4,000 rows) and MRPC (all), 1 seed, 1 epoch; "
                        "explicit options override it")
    p.add_argument("--profile", default=None,
                   help=f"a named set of runs, one of {sorted(PROFILES)} (explicit options override it)")
    p.add_argument("--methods", default=None, help="comma-separated (default: full,lora,bitfit,layerselect)")
    p.add_argument("--tasks", default=None, help="comma-separated (default: sst2,mrpc)")
    p.add_argument("--seeds", default=None, help="comma-separated (default: 42)")
    p.add_argument("--glue-dir", default=None, help="GLUE TSV folder; default: the hub (nyu-mll/glue)")
    p.add_argument("--model", default=None, help="default: the example's default (offline all-MiniLM-L6-v2)")
    p.add_argument("--max-train-samples", default=None, help='N for every task, or "sst2=4000,rte=1000"')
    p.add_argument("--max-eval-samples", default=None, help='N for every task, or "task=N,..."')
    p.add_argument("--epochs", type=float, default=None, help="default 1")
    p.add_argument("--batch-size", type=int, default=None, help="default 32")
    p.add_argument("--max-length", type=int, default=None, help="default 64")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run")
    p.add_argument("--example-args", default=None, help="extra arguments for every run of finetune_glue.py")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "out"))
    p.add_argument("--skip-existing", action="store_true", help="reuse runs whose JSON report already exists")
    args = p.parse_args(argv)
    if args.quick:
        args.profile = "quick"
    if args.profile is not None and args.profile not in PROFILES:
        p.error(f"unknown --profile {args.profile!r}; choose from {sorted(PROFILES)}")
    defaults = dict(PROFILES[args.profile]) if args.profile else dict(
        methods="full,lora,bitfit,layerselect", tasks="sst2,mrpc", seeds="42", max_train_samples=None,
        max_eval_samples=None, epochs=1.0, max_length=64, batch_size=32)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    methods, tasks, seeds = _csv(args.methods), _csv(args.tasks), [int(s) for s in _csv(args.seeds)]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(argv)
    started = dt.datetime.now().astimezone()
    t0 = time.perf_counter()
    print(f"[glue-bench] {len(methods) * len(tasks) * len(seeds)} runs: methods {methods}, tasks {tasks}, "
          f"seeds {seeds}, threads {args.threads}; output in {out_dir}", flush=True)

    results = []
    for task in tasks:
        for seed in seeds:
            for method in methods:
                results.append(run_one(args, task, method, seed, out_dir))
    total_s = time.perf_counter() - t0

    rows = aggregate(results, tasks, methods)
    settings = {k: v for k, v in vars(args).items()}
    machine = machine_description(results)
    meta = dict(command=command, started=started.isoformat(timespec="seconds"), total_wall_s=total_s,
                machine=machine, settings=settings)
    (out_dir / "glue.json").write_text(json.dumps(dict(meta=meta, summary=rows, results=results), indent=2))

    table = markdown_table(rows)
    loads = [x for r in results for x in (r.get("loadavg_1min_before"), r.get("loadavg_1min_after")) if x is not None]
    load_line = (f"- 1-min load average around the runs: {min(loads):.1f} to {max(loads):.1f} "
                 f"(on {os.cpu_count()} cores; above {args.threads} means other processes competed)" if loads else "")
    md = [
        "# GLUE benchmark",
        "",
        f"- command: `{command}`",
        f"- machine: {machine}",
        f"- date: {started:%Y-%m-%d %H:%M %Z}; total wall time {total_s / 60:.1f} min",
        f"- settings: epochs {args.epochs}, batch size {args.batch_size}, max length {args.max_length}, "
        f"threads {args.threads}, max train samples {args.max_train_samples or 'all'}, "
        f"max eval samples {args.max_eval_samples or 'all (full dev set)'}, seeds {seeds}",
        load_line,
        "",
        table,
        "",
        "Score: GLUE dev metric ×100 (mean ± sample std over seeds). Trainable parameters: `requires_grad` parameters"
        " after wrapping (percentage of all parameters, PEFT additions included). Adapter on disk: the saved weight"
        " files (`adapter_model.safetensors`, or `model.safetensors` for full fine-tuning). Peak RSS: the run's"
        " process. Median step: one optimizer step, warm-up steps excluded. Train time: `trainer.train()`"
        " wall-clock and CPU seconds (all threads), calibration shown separately.",
        "",
    ]
    (out_dir / "glue.md").write_text("\n".join(md))
    try:
        plot(rows, tasks, out_dir / "glue.png")
    except Exception as e:  # a plot failure must not lose the table
        print(f"[glue-bench] plot failed: {e!r}", flush=True)
    print("\n" + table + "\n", flush=True)
    print(f"[glue-bench] wrote {out_dir / 'glue.md'}, {out_dir / 'glue.png'}, {out_dir / 'glue.json'} "
          f"({total_s / 60:.1f} min)", flush=True)
    failed = [r for r in results if r.get("failed")]
    if failed:
        print(f"[glue-bench] {len(failed)} run(s) failed", flush=True)
    return results


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Several adapters on one base (issue 20): switch latency, base drift, mixed-batch forward and generation, SparseMask
against PEFT's LoRA, on SmolLM2-135M-Instruct with an fp32 and a bitsandbytes NF4 base.

Adapters: ``--num-adapters`` SparseMask deltas at LoRA r=8's entry count on the 7 projections of every block
(``examples/methods.py``'s ``density_matching_lora``; the default magnitude selection, so they share their supports
as adapters trained on one base do; 2 more with random supports of their own) and as many LoRA r=8 adapters
(``lora_dropout=0``) on the same projections, with random values, saved to a temporary folder. Four phases:

1. **switch**: the time to switch a *merged* model to the next adapter from disk. SparseMask: ``peft_sparse.
   hotswap_adapter`` (same support: one scatter of the saved base entries plus the new values per layer; another
   support: restore the old support's saved entries, merge the new). LoRA: ``unmerge_adapter()``, PEFT's
   ``peft.utils.hotswap.hotswap_adapter``, ``merge_adapter()`` (PEFT refuses to hot-swap a merged LoRA). Both also by
   reloading: unmerge, ``load_adapter``, ``set_adapter``, merge the new, ``delete_adapter`` the old. And SparseMask
   in 32 x 32 blocks at the same entry count (2 adapters on one support): a swap into a cold merged weight is bound
   by the cache lines it touches, about a third of them for an unstructured 2.3 % support, a few percent for blocks.
2. **drift**: after ``--switches`` switches and an unmerge, how many base tensors are not bit-equal to the loaded ones.
3. **mixed**: one forward of ``--batch-size`` x ``--length`` tokens with 1, 2, 4 and 8 adapters in the batch (rows
   assigned round-robin, ``adapter_names=``), SparseMask (as it runs by default: on float bases groups fold their
   support into the weight; and with folding off: base product plus sparse products) against LoRA's mixed batch, and
   the same batch through one merged SparseMask adapter (the base model's cost).
4. **generate**: greedy ``generate`` of ``--gen-tokens`` tokens from ``--batch-size`` prompts, 4 adapters mixed
   (SparseMask, LoRA) and one merged adapter: tokens per second.

Every phase times its methods interleaved, in a new random order each round (seeded), medians over ``--repeats``
rounds after ``--warmup``; ``--threads`` torch threads (default 2). Outputs in ``--out-dir``: ``serving.json``,
``serving.md`` (tables, the issue's targets checked, settings, command), ``serving.png``. ``--report`` rebuilds the
table and the plot from the JSON.

    # the real measurement, on 2 quiet CPU cores (about 25 minutes: fp32 ~8, NF4 ~17, mostly mixed forwards)
    python benchmarks/serving.py --out-dir benchmarks/serving

    # on a GPU (benchmarks/gpu/device_session.sh's serving phase): a random ~1B LLaMA in bf16, 8 of its blocks
    python benchmarks/serving.py --model llama-1b --layers 8 --device cuda --bases bf16 --phases switch,mixed \
        --adapter-counts 1,8 --batch-size 16 --length 256 --repeats 10 --out-dir $OUT/serving

    # check the pipeline in a minute: a tiny random LLaMA, few rounds
    python benchmarks/serving.py --model tiny --out-dir /tmp/serving-check --repeats 2 --warmup 0 --switches 3 \\
        --gen-tokens 4 --gen-repeats 1
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path += [str(ROOT / "examples"), str(ROOT / "benchmarks")]
import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.utils.hotswap import hotswap_adapter as lora_hotswap  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import peft_sparse  # noqa: E402
from peft_sparse import SparseMaskConfig  # noqa: E402
from peft_sparse.tuners.base import SparseTunerLayer  # noqa: E402

#: The 7 projections of a LLaMA block, LoRA's and SparseMask's targets here.
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BASES = ("fp32", "bf16", "4bit")
#: A ~1B LLaMA's shape (TinyLlama-1.1B's; benchmarks/sparse_kernels.py's LLAMA_1B), random weights, for GPU runs.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
PHASES = ("switch", "drift", "mixed", "generate")
SWITCHERS = ("sparsemask hot-swap", "sparsemask hot-swap, other supports", "lora unmerge+hotswap+merge",
             "sparsemask reload", "lora reload", "sparsemask 32x32 blocks hot-swap")


# ------------------------------------------------------------------------------------------------ models, adapters


def model_folder(args) -> str:
    """The base model's folder: SmolLM2 converted once by the causal-LM example, a tiny random LLaMA, or a path."""
    if args.model == "smollm2":
        import finetune_causal_lm as example

        return str(example.smollm2_folder(args.cache_dir))
    if args.model in ("tiny", "llama-1b"):
        from transformers import LlamaConfig, LlamaForCausalLM

        if args.model == "tiny":  # hidden size 64: bitsandbytes' CPU 4-bit path needs in_features >= 64
            shape = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
        else:
            shape = {**LLAMA_1B, "num_hidden_layers": args.layers or LLAMA_1B["num_hidden_layers"]}
        folder = Path(tempfile.gettempdir()) / f"peft_sparse_serving_{args.model}_{shape['num_hidden_layers']}"
        if not (folder / "config.json").exists():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(folder)
        return str(folder)
    return args.model


def load_base(args, base: str) -> torch.nn.Module:
    """The base in eval mode on ``--device``: fp32, bf16, or NF4 with fp32 compute (bitsandbytes' CPU repacking for
    its bf16 kernel off, as in the causal-LM example: a repacked weight no longer dequantizes)."""
    path = model_folder(args)
    if base in ("fp32", "bf16"):
        dtype = torch.float32 if base == "fp32" else torch.bfloat16
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=quant,
                                                 device_map={"": args.device})
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def make_adapters(args) -> dict[str, list[str]]:
    """``--num-adapters`` SparseMask and LoRA adapters with random values, saved once on the fp32 base (they load
    onto the NF4 base too): ``{"sparsemask": [folders], "lora": [folders]}``."""
    from methods import density_matching_lora

    root = Path(tempfile.mkdtemp(prefix="peft_sparse_serving_adapters_"))  # random weights: nothing to keep
    base = AutoModelForCausalLM.from_pretrained(model_folder(args), dtype=torch.float32).eval()  # on the CPU
    density = density_matching_lora(base, 8, TARGETS, "CAUSAL_LM")
    configs = {  # method: (config of adapter k, how many)
        # the default magnitude selection: adapters trained on one base share their supports
        "sparsemask": (lambda k: SparseMaskConfig(task_type="CAUSAL_LM", target_modules=TARGETS, density=density),
                       args.num_adapters),
        # random supports, one seed each: a swap to another support (the switch phase's second row)
        "sparsemask-random": (lambda k: SparseMaskConfig(task_type="CAUSAL_LM", target_modules=TARGETS,
                                                         density=density, selection="random", seed=k), 2),
        # 32 x 32 blocks at the same count: a swap rewrites whole cache lines, not one entry in three lines
        "sparsemask-block32": (lambda k: SparseMaskConfig(task_type="CAUSAL_LM", target_modules=TARGETS,
                                                          density=density, block_size=32), 2),
        "lora": (lambda k: LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, r=8, lora_alpha=16,
                                      lora_dropout=0.0), args.num_adapters),
    }
    folders: dict[str, list[str]] = {}
    generator = torch.Generator().manual_seed(args.seed)
    for method, (config, count) in configs.items():
        names = [f"a{k}" for k in range(count)]
        model = get_peft_model(base, config(0), adapter_name=names[0])
        for k, name in enumerate(names[1:], start=1):
            model.add_adapter(name, config(k))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "sparsemask_delta" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                elif "lora_A" in param_name or "lora_B" in param_name:
                    scale = 1 / param.shape[1] ** 0.5 if "lora_A" in param_name else 0.02
                    param.copy_(torch.randn(param.shape, generator=generator) * scale)
        model.save_pretrained(root / method, selected_adapters=names)  # one sub-folder per adapter (not "default")
        folders[method] = [str(root / method / n) for n in names]
        base = model.unload()
    return {"folders": folders, "density": density, "root": root}


def adapter_model(args, base: str, folders: list[str], count: int = 1) -> PeftModel:
    """A PeftModel holding the first ``count`` adapters, named a0, a1, ... (a0 active)."""
    model = PeftModel.from_pretrained(load_base(args, base), folders[0], adapter_name="a0")
    for k in range(1, count):
        model.load_adapter(folders[k], adapter_name=f"a{k}")
    return model.eval()


def base_tensors(model) -> dict[str, torch.Tensor]:
    """Copies of the base model's tensors (not the adapters'), by name."""
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not any(m in n for m in ("sparsemask_", "lora_", "modules_to_save"))}


# ---------------------------------------------------------------------------------------------------------- timing


def interleaved(tasks: dict[str, Callable[[], Any]], rounds: int, warmup: int, seed: int) -> dict[str, list[float]]:
    """Each task once per round, in a new random (seeded) order each round, so that a busy phase of the machine hits
    all alike; the seconds of every run after ``warmup`` rounds (CUDA synchronised around each run)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    order, rng = list(tasks), random.Random(seed)
    for round_ in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            sync()
            start = time.perf_counter()
            tasks[name]()
            sync()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


class Switcher:
    """Switches a merged model to the next saved adapter, one way (see the module docstring); ``count`` switches
    so far."""

    def __init__(self, args, base: str, method: str, how: str, folders: list[str]):
        self.method, self.how, self.folders, self.count, self.device = method, how, folders, 0, args.device
        self.model = PeftModel.from_pretrained(load_base(args, base), folders[0]).eval()  # adapter "default"
        self.loaded = base_tensors(self.model)
        self.current = "default"
        self.model.base_model.merge_adapter()

    def __call__(self) -> None:
        self.count += 1
        path = self.folders[self.count % len(self.folders)]
        model = self.model
        if self.how == "hotswap" and self.method.startswith("sparsemask"):
            peft_sparse.hotswap_adapter(model, path, adapter_name="default")
        elif self.how == "hotswap":
            model.base_model.unmerge_adapter()
            lora_hotswap(model, path, adapter_name="default", torch_device=self.device)
            model.base_model.merge_adapter()
        else:
            new = f"s{self.count}"
            model.base_model.unmerge_adapter()
            model.load_adapter(path, adapter_name=new)
            model.set_adapter(new)
            model.base_model.merge_adapter([new])
            model.delete_adapter(self.current)
            self.current = new

    def drift(self) -> dict[str, int]:
        """After an unmerge: base tensors not bit-equal to the loaded ones, of how many."""
        self.model.base_model.unmerge_adapter()
        now = base_tensors(self.model)
        changed = sum(not torch.equal(now[n], t) for n, t in self.loaded.items())
        self.model.base_model.merge_adapter()
        return {"drifted": changed, "tensors": len(self.loaded), "switches": self.count}


def switchers(args, base: str, folders: dict[str, list[str]]) -> dict[str, Switcher]:
    ways = dict(zip(SWITCHERS, [("sparsemask", "hotswap"), ("sparsemask-random", "hotswap"), ("lora", "hotswap"),
                                ("sparsemask", "reload"), ("lora", "reload"), ("sparsemask-block32", "hotswap")]))
    return {name: Switcher(args, base, method, how, folders[method]) for name, (method, how) in ways.items()}


def switch_phase(args, base: str, folders, results: dict) -> None:
    tasks = switchers(args, base, folders)
    print(f"[switch] {base}: {args.repeats} interleaved rounds", flush=True)
    times = interleaved(tasks, args.repeats, args.warmup, args.seed)
    results["switch"] = {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def drift_phase(args, base: str, folders, results: dict) -> None:
    print(f"[drift] {base}: {args.switches} switches each, then an unmerge", flush=True)
    results["drift"] = {}
    for name, switcher in switchers(args, base, folders).items():
        for _ in range(args.switches):
            switcher()
        results["drift"][name] = switcher.drift()


def batch_of(args, model, rows: int, length: int) -> dict[str, torch.Tensor]:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def mixed_phase(args, base: str, folders, results: dict) -> None:
    counts = [int(k) for k in args.adapter_counts.split(",")]
    most = max(counts)
    if most > args.num_adapters or args.batch_size < most:
        raise SystemExit(f"--adapter-counts up to {most} need --num-adapters and --batch-size >= {most}")
    sparse = adapter_model(args, base, folders["sparsemask"], most)
    lora = adapter_model(args, base, folders["lora"], most)
    merged = adapter_model(args, base, folders["sparsemask"], 1)
    merged.base_model.merge_adapter()
    batch = batch_of(args, merged, args.batch_size, args.length)

    def forward(model, names=None, fold=True):
        def run():
            SparseTunerLayer.fold_mixed_batches = fold
            try:
                with torch.inference_mode():
                    model(**batch, **({"adapter_names": names} if names else {}))
            finally:
                SparseTunerLayer.fold_mixed_batches = True
        return run

    tasks = {"merged (1 adapter)": forward(merged)}
    for k in counts:
        names = [f"a{i % k}" for i in range(args.batch_size)]
        tasks[f"sparsemask k={k}"] = forward(sparse, names)
        if base != "4bit":  # quantized bases always take base + sparse products
            tasks[f"sparsemask-products k={k}"] = forward(sparse, names, fold=False)
        tasks[f"lora k={k}"] = forward(lora, names)
    print(f"[mixed] {base}: {len(tasks)} forwards x {args.repeats} interleaved rounds", flush=True)
    times = interleaved(tasks, args.repeats, args.warmup, args.seed + 1)
    results["mixed"] = {name: {"median_s": statistics.median(t), "times_s": t} for name, t in times.items()}


def generate_phase(args, base: str, folders, results: dict) -> None:
    k = min(4, args.num_adapters, args.batch_size)
    sparse = adapter_model(args, base, folders["sparsemask"], k)
    lora = adapter_model(args, base, folders["lora"], k)
    merged = adapter_model(args, base, folders["sparsemask"], 1)
    merged.base_model.merge_adapter()
    batch = batch_of(args, merged, args.batch_size, args.prompt_length)
    names = [f"a{i % k}" for i in range(args.batch_size)]
    settings = dict(max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens, do_sample=False, pad_token_id=0)

    def generate(model, adapter_names=None):
        def run():
            with torch.inference_mode():
                model.generate(**batch, **settings, **({"adapter_names": adapter_names} if adapter_names else {}))
        return run

    tasks = {f"sparsemask k={k}": generate(sparse, names), f"lora k={k}": generate(lora, names),
             "merged (1 adapter)": generate(merged)}
    print(f"[generate] {base}: {args.gen_repeats} interleaved rounds", flush=True)
    times = interleaved(tasks, args.gen_repeats, min(args.warmup, 1), args.seed + 2)
    tokens = args.batch_size * args.gen_tokens
    results["generate"] = {name: {"median_s": statistics.median(t), "tokens_per_s": tokens / statistics.median(t),
                                  "times_s": t} for name, t in times.items()}


# ---------------------------------------------------------------------------------------------------------- report


def ratio(a, b) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def median_of(section: dict, name: str):
    return section.get(name, {}).get("median_s")


def targets(base_results: dict, base: str) -> list[str]:
    """The issue's targets, checked on this base's rows."""
    lines = []
    switch, drift, mixed = (base_results.get(k, {}) for k in ("switch", "drift", "mixed"))
    sparse, lora = median_of(switch, SWITCHERS[0]), median_of(switch, SWITCHERS[2])
    other, blocks = median_of(switch, SWITCHERS[1]), median_of(switch, SWITCHERS[5])
    if sparse and lora:
        lines.append(f"- merged switch, SparseMask hot-swap from disk vs LoRA unmerge + hotswap + merge: "
                     f"{lora / sparse:.1f}x faster (target >= 10x): {'met' if lora / sparse >= 10 else 'missed'}"
                     + (f"; to another support {lora / other:.1f}x" if other else "")
                     + (f"; 32 x 32 blocks (same count) {lora / blocks:.1f}x" if blocks else ""))
    if drift:
        ours, theirs = drift.get(SWITCHERS[0], {}), drift.get(SWITCHERS[2], {})
        lines.append(f"- drift after {ours.get('switches')} switches and an unmerge: SparseMask {ours.get('drifted')} "
                     f"of {ours.get('tensors')} base tensors (target 0: {'met' if ours.get('drifted') == 0 else 'missed'})"
                     f", LoRA {theirs.get('drifted')}")
    four, lora4, one = median_of(mixed, "sparsemask k=4"), median_of(mixed, "lora k=4"), median_of(mixed, "merged (1 adapter)")
    if four and lora4 and one:
        lines.append(f"- 4 adapters in one batch: {four / lora4:.2f}x LoRA's mixed batch (target <= 1: "
                     f"{'met' if four <= lora4 else 'missed'}), {four / one:.2f}x one merged adapter (target <= 1.3: "
                     f"{'met' if four <= 1.3 * one else 'missed'})")
    return [f"**{base}**"] + lines if lines else []


def markdown(results: dict) -> str:
    settings = results["settings"]
    where = (f"{settings['threads']} threads" if settings.get("device", "cpu") == "cpu"
             else f"device {settings['device']}")
    out = [f"# Several adapters on one base: {Path(settings['model']).name}", "",
           f"Command: `{settings['command']}`", "",
           f"Machine: {settings['machine']}; torch {settings['torch']}, peft {settings['peft']}; {where}. "
           f"{settings['num_adapters']} SparseMask adapters at LoRA r=8's entry count (density "
           f"{settings['density']:.4f}; magnitude supports, shared by the adapters as by adapters trained on one "
           f"base, and 2 more with random supports of their own) and {settings['num_adapters']} LoRA r=8 adapters "
           f"(lora_dropout=0) on {', '.join(TARGETS)}; random values. Medians of {settings['repeats']} interleaved "
           f"rounds (random order each round) after {settings['warmup']} warm-up; generation "
           f"{settings['gen_repeats']} rounds.", "", "## Targets (issue 20)", ""]
    for base in settings["bases"]:
        out += targets(results.get(base, {}), base) + [""]
    for base in settings["bases"]:
        r = results.get(base, {})
        if r.get("switch") or r.get("drift"):
            out += [f"## Switching a merged model ({base})", "",
                    "| method | switch (median) | vs SparseMask hot-swap | base tensors drifted after the switches + unmerge |",
                    "|---|---:|---:|---:|"]
            fastest = median_of(r.get("switch", {}), SWITCHERS[0])
            for name in SWITCHERS:
                t = median_of(r.get("switch", {}), name)
                d = r.get("drift", {}).get(name)
                drift = f"{d['drifted']} of {d['tensors']} ({d['switches']} switches)" if d else "-"
                out.append(f"| {name} | {'-' if t is None else f'{t * 1e3:.1f} ms'} | {ratio(t, fastest)} | {drift} |")
            out.append("")
        if r.get("mixed"):
            mixed = r["mixed"]
            one = median_of(mixed, "merged (1 adapter)")
            out += [f"## One forward of {settings['batch_size']} x {settings['length']} tokens, k adapters in the "
                    f"batch ({base})", "", "| method | k | forward (median) | vs merged | vs LoRA same k |",
                    "|---|---:|---:|---:|---:|", f"| merged (1 adapter) | - | {one * 1e3:.1f} ms | 1.00x | - |"]
            for name, v in mixed.items():
                if name.startswith("merged"):
                    continue
                method, k = name.split(" k=")
                out.append(f"| {method} | {k} | {v['median_s'] * 1e3:.1f} ms | {ratio(v['median_s'], one)} | "
                           f"{ratio(v['median_s'], median_of(mixed, f'lora k={k}'))} |")
            out.append("")
        if r.get("generate"):
            out += [f"## Generation, {settings['batch_size']} prompts of {settings['prompt_length']} tokens, "
                    f"{settings['gen_tokens']} new tokens each, greedy ({base})", "",
                    "| method | tokens / s | time (median) |", "|---|---:|---:|"]
            for name, v in r["generate"].items():
                out.append(f"| {name} | {v['tokens_per_s']:.1f} | {v['median_s']:.2f} s |")
            out.append("")
    out += ["SparseMask's mixed batch on float bases folds each group's support into the weight for the group's own "
            "product and restores it exactly (`SparseTunerLayer.fold_mixed_batches`); `sparsemask-products` is the "
            "same batch with folding off (base product plus one sparse product per group), the path quantized bases "
            "and generation's one-token steps take."]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = [b for b in results["settings"]["bases"] if b in results]
    fig, axes = plt.subplots(len(bases), 3, figsize=(15, 4 * len(bases)), squeeze=False)
    for row, base in zip(axes, bases):
        r = results[base]
        switch = r.get("switch", {})
        names = [n for n in SWITCHERS if n in switch]
        row[0].barh(names, [switch[n]["median_s"] * 1e3 for n in names], color="tab:blue")
        row[0].set_xscale("log")
        row[0].set_xlabel("switch of a merged model (ms, log)")
        row[0].set_title(f"{base}: switch latency")
        mixed = r.get("mixed", {})
        methods = sorted({n.split(" k=")[0] for n in mixed if " k=" in n})
        for method in methods:
            ks = sorted(int(n.split(" k=")[1]) for n in mixed if n.startswith(method + " k="))
            row[1].plot(ks, [mixed[f"{method} k={k}"]["median_s"] * 1e3 for k in ks], marker="o", label=method)
        if "merged (1 adapter)" in mixed:
            row[1].axhline(mixed["merged (1 adapter)"]["median_s"] * 1e3, color="grey", ls="--", label="merged (1 adapter)")
            row[1].axhline(1.3 * mixed["merged (1 adapter)"]["median_s"] * 1e3, color="grey", ls=":", label="1.3x merged")
        row[1].set_xlabel("adapters in the batch")
        row[1].set_ylabel("forward (ms)")
        row[1].set_title(f"{base}: mixed-batch forward")
        if row[1].get_legend_handles_labels()[0]:
            row[1].legend(fontsize=8)
        generate = r.get("generate", {})
        row[2].barh(list(generate), [v["tokens_per_s"] for v in generate.values()], color="tab:green")
        row[2].set_xlabel("tokens / s")
        row[2].set_title(f"{base}: generation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> None:
    (out_dir / "serving.json").write_text(json.dumps(results, indent=1))
    (out_dir / "serving.md").write_text(markdown(results))
    plot(results, out_dir / "serving.png")


# ------------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (offline, converted by the causal-LM example), "
                                                           "tiny (a random 2-block LLaMA, to check the pipeline), "
                                                           "llama-1b (a random ~1B LLaMA, for a GPU) or a folder")
    parser.add_argument("--layers", type=int, default=None, help="llama-1b: fewer of its 22 blocks (a short GPU slot)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bases bf16 / fp32 / 4bit on the GPU)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out-dir", default="benchmarks/serving")
    parser.add_argument("--bases", default="fp32,4bit")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--switches", type=int, default=20, help="switches before the drift count")
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--adapter-counts", default="1,2,4,8", help="adapters in one mixed batch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--gen-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="rebuild serving.md and serving.png from serving.json")
    args = parser.parse_args(argv)
    bad = [b for b in args.bases.split(",") if b not in BASES] + [p for p in args.phases.split(",") if p not in PHASES]
    if bad:
        parser.error(f"unknown bases or phases {bad}; bases: {BASES}, phases: {PHASES}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.report:
        results = json.loads((out_dir / "serving.json").read_text())
        write(results, out_dir)
        return results
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    made = make_adapters(args)
    import peft

    results: dict[str, Any] = {"settings": {
        **{k: v for k, v in vars(args).items() if k != "report"}, "bases": args.bases.split(","),
        "model": model_folder(args), "density": made["density"], "torch": torch.__version__, "peft": peft.__version__,
        "machine": (torch.cuda.get_device_name() if args.device.startswith("cuda")
                    else f"{platform.processor() or platform.machine()}, {platform.system()}"),
        "command": shlex.join(["python", "benchmarks/serving.py", *(argv if argv is not None else sys.argv[1:])]),
    }}
    phases = {"switch": switch_phase, "drift": drift_phase, "mixed": mixed_phase, "generate": generate_phase}
    try:
        for base in args.bases.split(","):
            results[base] = {}
            for phase in args.phases.split(","):
                phases[phase](args, base, made["folders"], results[base])
                write(results, out_dir)
    finally:
        shutil.rmtree(made["root"], ignore_errors=True)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""QLoRA-style training step on a Llama-3-8B-shaped NF4 model: SparseMask against QLoRA r=16 (issue 22).

The base: a LLaMA with Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 query and 8 key/value heads, vocabulary
128,256; ``--layers`` of its 32 layers), random weights saved in bf16 to a temporary folder and loaded back as
bitsandbytes NF4 with bf16 compute, then ``peft.prepare_model_for_kbit_training`` with non-reentrant gradient
checkpointing (fp32 norms and embeddings). Each step is forward (under bf16 autocast, as the Trainer's ``bf16=True``
runs it; ``--no-autocast`` for none) + backward + AdamW on 2 × 2,048 random tokens.

Methods, each on its own copy of the base (examples/methods.py builds them): the frozen 4-bit step (no trainable
weight; the input embeddings' output requires grad, so the backward runs through every layer: the floor for any
adapter), QLoRA r=16 on every linear layer (PEFT's default dropout, 0.0), SparseMask at QLoRA r=16's trained-entry
count on the same layers (entries, and 32×32 blocks), and BitFit. With 8 of the 32 layers, the embeddings and the
128k-entry head weigh about three times more in a step than in the whole model, which narrows every ratio to the
frozen step.

* Step time: every method is built once, then all are stepped in a new random order each round
  (``benchmarks/step_time.py``'s ``interleaved_times``), CUDA-synchronised around each step; medians over the rounds
  after the warm-up rounds.
* Peak memory: ``torch.cuda.max_memory_allocated`` over one step (after a first, untimed one: compilation,
  autotuning, AdamW's state), less what was allocated before the method's model was loaded. The methods built
  before it stay resident but idle, so the figure is the method's own: its model, optimizer state and step.

    python benchmarks/gpu/qlora_step.py --out h100-qlora-step.md
    python benchmarks/gpu/qlora_step.py --tiny            # CPU in seconds: checks the script, not the targets
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
sys.path += [str(ROOT / "examples"), str(ROOT / "benchmarks")]  # the method factory and interleaved_times
import torch  # noqa: E402

from methods import apply_method, trainable_entries  # noqa: E402
from step_time import interleaved_times  # noqa: E402

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
            max_position_embeddings=128)
FROZEN, QLORA, ENTRIES, BLOCKS = "frozen 4-bit (input grads only)", "QLoRA r=16", "SparseMask entries", \
    "SparseMask 32×32 blocks"
#: Row label -> (examples/methods.py method, options); None: the frozen base. LoRA's and SparseMask's targets are
#: "all-linear" (methods.lora_targets on a LLaMA); SparseMask's support is chosen by magnitude, its default.
METHODS: dict[str, Optional[tuple[str, dict[str, Any]]]] = {
    FROZEN: None,
    QLORA: ("lora", dict(r=16, lora_alpha=32, lora_dropout=0.0)),
    ENTRIES: ("sparsemask", dict(match_lora_r=16)),
    BLOCKS: ("sparsemask", dict(match_lora_r=16, block_size=32)),
    "BitFit": ("bitfit", {}),
}
#: Issue 22's targets: (what, the row, the reference row, the ratio at most).
TARGETS = [
    ("block SparseMask step ≤ 1.10 × the frozen 4-bit step", BLOCKS, FROZEN, 1.10),
    ("unstructured SparseMask step ≤ 0.8 × QLoRA r=16's", ENTRIES, QLORA, 0.8),
]


def save_random_model(shape: dict, layers: int, folder: str, device: str) -> None:
    """A LLaMA of ``shape`` with ``layers`` layers and random weights, saved in bf16 (built on ``device``: fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, num_hidden_layers=layers))
    model.to(torch.bfloat16).save_pretrained(folder)
    del model
    release()


def release() -> None:
    """Free what is no longer referenced now (a model's reference cycles wait for the collector otherwise), so that the
    next method's memory baseline holds nothing that the collector could free during its measurement."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_prepared(folder: str, device: str) -> torch.nn.Module:
    """The saved model as bitsandbytes NF4 (bf16 compute), prepared by PEFT for k-bit training with non-reentrant
    gradient checkpointing, in train mode."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in model.modules():  # bitsandbytes' CPU path would repack 4-bit weights at an eval-mode forward
        if hasattr(module, "support_avx512bf16_for_cpu"):  # (docs/quantized.md); training never needs it
            module.support_avx512bf16_for_cpu = False
    return model.train()


def step(model, optimizer, ids: torch.Tensor, autocast: bool) -> float:
    """Seconds of one forward + backward + AdamW step (the GPU synchronised before and after)."""
    cuda = ids.is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def build(label: str, folder: str, ids: torch.Tensor, autocast: bool) -> tuple[Callable[[], float], dict]:
    """Method ``label`` on its own copy of the base: its stepper, and its row (trainable entries, peak GiB: None on
    the CPU) after one untimed step and one measured step."""
    cuda = ids.is_cuda
    release()
    before = torch.cuda.memory_allocated() if cuda else 0
    model = load_prepared(folder, str(ids.device))
    spec = METHODS[label]
    if spec is None:
        model.enable_input_require_grads()  # the backward runs through every layer, down to the embeddings
        optimizer = None
    else:
        model = apply_method(model, spec[0], "CAUSAL_LM", **spec[1])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    stepper = partial(step, model, optimizer, ids, autocast)
    stepper()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    stepper()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    return stepper, {"trainable": trainable_entries(model), "peak": peak}


def versions() -> str:
    import bitsandbytes
    import peft
    import transformers

    import peft_sparse

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return (f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, triton {triton_version}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}, peft_sparse {peft_sparse.__version__}")


def ratio(rows: dict[str, dict], label: str, reference: str) -> Optional[float]:
    """``label``'s step time over ``reference``'s; None when either was not measured."""
    if "ms" not in rows[label] or "ms" not in rows[reference]:
        return None
    return rows[label]["ms"] / rows[reference]["ms"]


def report(rows: dict[str, dict], args, device_name: str, env: str) -> list[str]:
    """The Markdown report: settings, the table (a failed method's row names its error), the targets."""
    shape = args.shape
    lines = [
        f"# QLoRA-style step on {device_name}",
        "",
        env,
        "",
        f"LLaMA with Llama-3-8B's shape cut to {args.layers} layers (hidden {shape['hidden_size']}, intermediate "
        f"{shape['intermediate_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, "
        f"vocabulary {shape['vocab_size']:,}), random weights as bitsandbytes NF4 with bf16 compute; "
        "peft.prepare_model_for_kbit_training (fp32 norms and embeddings), non-reentrant gradient checkpointing; "
        f"{'bf16 autocast' if args.autocast else 'no autocast'}; batch {args.batch} × {args.length} random tokens. "
        "QLoRA: r=16, alpha 32, dropout 0.0, all linear layers; SparseMask: the same layers at QLoRA's trained-entry "
        "count, support by magnitude; BitFit: a bias on every linear layer. "
        f"Forward + backward + AdamW; median of {args.rounds} rounds after {args.warmup} warm-up rounds, all methods "
        "built once and stepped in a new random order each round (on a GPU, synchronised around each step). Peak: "
        "torch.cuda.max_memory_allocated over one step after a first, less what was allocated before the method's "
        "model was loaded (the others resident, idle).",
        "",
        "| method | trainable entries | step ms | × frozen | × QLoRA | peak GiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error']} | | | | |")
            continue
        to_floor, to_lora = ratio(rows, label, FROZEN), ratio(rows, label, QLORA)
        lines.append(f"| {label} | {row['trainable']:,} | {row['ms']:.1f} | {fmt(to_floor)} | {fmt(to_lora)} | "
                     f"{fmt(row['peak'])} |")
    judged = not args.tiny and args.device.startswith("cuda")
    lines += ["", "Targets (issue 22)" + ("" if judged else ": not judged, a --tiny or CPU run checks the script only"),
              ""]
    for what, label, reference, limit in TARGETS:
        value = ratio(rows, label, reference)
        if value is None:
            lines.append(f"- {what}: not measured")
            continue
        verdict = ("met" if value <= limit else "missed") if judged else "not judged"
        lines.append(f"- {what}: {value:.2f}× ({rows[label]['ms']:.1f} against {rows[reference]['ms']:.1f} ms): "
                     f"{verdict}")
    peaks = {label: rows[label].get("peak") for label in (ENTRIES, BLOCKS, QLORA)}
    if not judged or None in peaks.values():
        lines.append("- SparseMask peak memory ≤ QLoRA r=16's: " + ("not judged" if not judged else "not measured"))
    else:
        met = max(peaks[ENTRIES], peaks[BLOCKS]) <= peaks[QLORA]
        lines.append(f"- SparseMask peak memory ≤ QLoRA r=16's: entries {peaks[ENTRIES]:.2f}, blocks "
                     f"{peaks[BLOCKS]:.2f} against {peaks[QLORA]:.2f} GiB: {'met' if met else 'missed'}")
    return lines


def fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.2f}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, help="layers of the model (default 8 of Llama-3-8B's 32; --tiny: 2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, help="tokens a sequence (default 2048; --tiny: 64)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 10; --tiny: 3)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 2; --tiny: 1)")
    parser.add_argument("--no-autocast", dest="autocast", action="store_false", help="no bf16 autocast")
    parser.add_argument("--device", help="default: cuda (--tiny: cpu)")
    parser.add_argument("--tiny", action="store_true", help="hidden 256, 2 layers, 2 × 64 tokens, on the CPU")
    parser.add_argument("--out", default="qlora-step.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    defaults = dict(layers=2, length=64, rounds=3, warmup=1, device="cpu") if args.tiny else \
        dict(layers=8, length=2048, rounds=10, warmup=2, device="cuda")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.shape = TINY if args.tiny else LLAMA3_8B
    return args


def main(argv=None) -> None:
    from transformers.utils import logging as transformers_logging

    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # five loads' bars would bury the log
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu/qlora_step.py: needs a CUDA GPU (none is available); --tiny runs on the CPU")
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    env = versions()
    print(f"{device_name}: {env}", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.shape["vocab_size"], (args.batch, args.length), generator=g).to(args.device)
    steppers, rows = {}, {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-step-") as folder:
        save_random_model(args.shape, args.layers, folder, args.device)
        print(f"saved the random bf16 model ({time.perf_counter() - start:.0f} s)", flush=True)
        for label in METHODS:
            try:
                steppers[label], rows[label] = build(label, folder, ids, args.autocast)
            except Exception as error:  # noqa: BLE001 - one failing method must not cost the others' rows
                traceback.print_exc()
                first_line = (str(error).splitlines() or [""])[0][:120]
                rows[label] = {"error": f"{type(error).__name__}: {first_line}"}
            print(f"{label}: {rows[label]} ({time.perf_counter() - start:.0f} s)", flush=True)
    times = interleaved_times(steppers, args.rounds, args.warmup)
    for label in steppers:
        rows[label]["ms"] = 1000 * statistics.median(times[label])
    text = "\n".join(report(rows, args, device_name, env)) + "\n"
    Path(args.out).write_text(text)
    print(text + f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()

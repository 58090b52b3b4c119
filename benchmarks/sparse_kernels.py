"""GPU benchmark of the sparse-delta kernels (``peft_sparse.kernels``), written as a Markdown table.

Needs a CUDA GPU and triton (``pip install 'peft_sparse[triton]'``); on a machine without them it exits with a
message. Every time is the median of ``triton.testing.do_bench``.

Kernels (``--kernels``): for each weight shape, token count, density and structure (unstructured entries, and
``--block-size`` blocks), in ``--dtype`` (bf16 by default):

* SDDMM, the values' gradient ``(grad_yᵀ @ x)`` at the support: the Triton kernel, vs a dense matmul + gather,
  vs the torch path (``torch.sparse.sampled_addmm`` on the CSR pattern, fp32) and, for blocks, vs
  ``sampled_addmm`` on a BSR pattern (torch's Triton BSR kernel);
* SpMM ``y = x @ ΔWᵀ`` and its transpose ``grad_x = grad_y @ ΔW`` (quantized bases): the Triton kernel, vs a
  dense scatter + matmul (the torch path), vs ``torch.sparse`` CSR and BSR products.

Each row gives the time, the speed-up over the dense baseline, the useful TFLOP/s (2 · tokens · support) and
the effective bandwidth (inputs read once, outputs written once), each also as a share of the GPU's peak.

Training step (``--train``): a ~1B LLaMA-shaped model with random weights (TinyLlama-1.1B's shape), one
forward + backward + AdamW step on ``--train-batch`` × ``--train-length`` tokens: SparseMask at 1% density
(entries, and 32×32 blocks) with the Triton and the torch backends, vs the frozen-backbone step (no trainable
weight; the input embeddings require grad, so the backward still runs through every layer: the floor for
any adapter) and LoRA r=16 (alpha 32, PEFT's default dropout 0.0) on the same linear layers.

    python benchmarks/sparse_kernels.py --out kernels-benchmark.md
    python benchmarks/sparse_kernels.py --quick            # one shape, one token count, three densities
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, Optional

import torch

# Dense bf16 tensor-core TFLOP/s (no sparsity) and HBM TB/s of common GPUs, matched on the device name.
PEAKS = {
    "H200": (989.0, 4.8),
    "H100 PCIe": (756.0, 2.0),
    "H100 NVL": (835.0, 3.9),
    "H100": (989.0, 3.35),
    "GH200": (989.0, 4.0),
    "A100-SXM4-80GB": (312.0, 2.04),
    "A100 80GB PCIe": (312.0, 1.94),
    "A100": (312.0, 1.56),
    "L40S": (362.0, 0.864),
    "L4": (121.0, 0.3),
    "A10G": (70.0, 0.6),
    "RTX 4090": (165.0, 1.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def fail(message: str) -> None:
    raise SystemExit(f"benchmarks/sparse_kernels.py: {message}")


def peaks(args) -> tuple[float, float, str]:
    name = torch.cuda.get_device_name()
    tflops, tbps = next((v for k, v in PEAKS.items() if k in name), (None, None))
    tflops = args.peak_tflops or tflops
    tbps = args.peak_tbps or tbps
    if tflops is None or tbps is None:
        fail(f"unknown peak numbers for {name!r}: pass --peak-tflops and --peak-tbps")
    return tflops, tbps, name


def bench(fn: Callable, *args) -> Optional[float]:
    """Median milliseconds of ``fn(*args)``, or None when it is not supported (reported as n/a)."""
    from triton.testing import do_bench

    try:
        fn(*args)
        torch.cuda.synchronize()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
        print(f"  n/a: {type(error).__name__}: {str(error).splitlines()[0][:160]}", file=sys.stderr)
        return None
    return do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")


# ---------------------------------------------------------------------------------------------- kernels


def make_delta(shape, density, block_size, dtype, device, seed=0):
    from peft_sparse import sparse
    from peft_sparse.tuners.sparsemask import selection

    g = torch.Generator().manual_seed(seed)
    if block_size == 1:
        count = max(1, round(density * shape[0] * shape[1]))
    else:
        count = max(1, round(density * math.ceil(shape[0] / block_size) * math.ceil(shape[1] / block_size)))
    support = selection.random_support(shape, count, g, block_size=block_size)
    delta = sparse.SparseDelta(shape, support, dtype, device=device, block_size=block_size)
    with torch.no_grad():
        delta.values.normal_(0, 0.02)
    return delta


def dense_weight_grad(grad, x):
    return grad.T @ x


def dense_then_gather(grad, x, indices):
    return (grad.T @ x).view(-1)[indices].float()


def sparse_times_transposed(matrix, xt):
    """``(S @ xᵀ)ᵀ`` with a torch sparse ``S``: ``x @ Sᵀ``."""
    return (matrix @ xt).T


class Table:
    def __init__(self, tflops_peak: float, tbps_peak: float) -> None:
        self.tflops_peak, self.tbps_peak = tflops_peak, tbps_peak
        self.rows = [
            "| op | weight | tokens | density | structure | support | impl | ms | vs dense | TFLOP/s (% peak) "
            "| GB/s (% peak) |",
            "|---|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
        ]

    def add(self, op, shape, tokens, density, structure, k, impl, ms, baseline_ms, flops, nbytes) -> None:
        head = f"| {op} | {shape[0]}×{shape[1]} | {tokens} | {density:.1%} | {structure} | {k:,} | {impl}"
        if ms is None:
            self.rows.append(f"{head} | n/a | | | |")
        else:
            tf, gbs = flops / ms / 1e9, nbytes / ms / 1e6
            speed = f"{baseline_ms / ms:.2f}×" if baseline_ms else ""
            self.rows.append(
                f"{head} | {ms:.3f} | {speed} | {tf:.1f} ({100 * tf / self.tflops_peak:.1f}%) "
                f"| {gbs:.0f} ({100 * gbs / (self.tbps_peak * 1e3):.1f}%) |"
            )
        print(self.rows[-1], flush=True)


def bench_shape(table: Table, args, shape: tuple[int, int], tokens: int, device: str = "cuda") -> None:
    from peft_sparse import kernels
    from peft_sparse.kernels import function, reference
    from peft_sparse.kernels import sddmm as sddmm_ops
    from peft_sparse.kernels import spmm as spmm_ops
    from peft_sparse.kernels.layout import block_value_index

    dtype = DTYPES[args.dtype]
    elt = torch.finfo(dtype).bits // 8
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, shape[1], device=device, dtype=dtype, generator=g)
    grad = torch.randn(tokens, shape[0], device=device, dtype=dtype, generator=g)
    xt, grad_t = x.T.contiguous(), grad.T.contiguous()
    w = torch.randn(shape, device=device, dtype=dtype, generator=g)
    in_bytes = tokens * (shape[0] + shape[1]) * elt
    dense_flops = 2 * tokens * shape[0] * shape[1]
    ms = bench(dense_weight_grad, grad, x)
    table.add("SDDMM", shape, tokens, 1.0, "dense", w.numel(), "grad_yᵀ @ x (no gather)", ms, ms, dense_flops,
              in_bytes + w.numel() * elt)
    ms = bench(torch.matmul, x, w.T)
    table.add("SpMM", shape, tokens, 1.0, "dense", w.numel(), "x @ Wᵀ", ms, ms, dense_flops, in_bytes + w.numel() * elt)
    for density in args.densities:
        for block_size in (1, args.block_size):
            structure = "entries" if block_size == 1 else f"{block_size}×{block_size} blocks"
            delta = make_delta(shape, density, block_size, torch.float32, device)
            k, values, indices = delta.numel_support, delta.values.detach(), delta.indices
            layout = delta.layout()
            flops, nbytes = 2 * tokens * k, in_bytes + k * (4 + 8)
            pattern = layout.blocks
            bsr_ok = pattern is not None and shape[0] % block_size == 0 and shape[1] % block_size == 0

            # SDDMM: the values' gradient. The memory floor reads grad and x once (in_bytes) at the copy rate.
            gather = bench(dense_then_gather, grad, x, indices)
            got = sddmm_ops.sddmm(grad, x, layout)
            ref = reference.sddmm_reference(grad, x, indices)
            err = ((got - ref).norm() / ref.norm()).item()
            ms = bench(sddmm_ops.sddmm, grad, x, layout)
            tuned = getattr(sddmm_ops._sddmm_bsr_tuned, "best_config", None) if pattern is not None else None
            table.add("SDDMM", shape, tokens, density, structure, k,
                      f"triton (rel. err {err:.1e}{'; ' + str(tuned) if tuned else ''})", ms, gather, flops, nbytes)
            table.add("SDDMM", shape, tokens, density, structure, k, "dense matmul + gather", gather, gather, flops,
                      nbytes)
            table.add("SDDMM", shape, tokens, density, structure, k, "auto (what training runs)",
                      bench(function.sddmm, grad, x, layout), gather, flops, nbytes)
            # SpMM both ways: y = x @ ΔWᵀ and grad_x = grad_y @ ΔW
            for op, a, transpose in (("SpMM x@ΔWᵀ", x, False), ("SpMM g@ΔW", grad, True)):
                nbytes = tokens * (shape[0] + shape[1]) * elt + k * (4 + 8)
                torch_op = function.spmm_t if transpose else function.spmm
                with kernels.use_backend("torch"):
                    dense = bench(torch_op, a, values, layout)
                kernel = spmm_ops.spmm_t if transpose else spmm_ops.spmm
                table.add(op, shape, tokens, density, structure, k, "triton", bench(kernel, a, values, layout), dense,
                          flops, nbytes)
                table.add(op, shape, tokens, density, structure, k, "scatter + dense matmul (torch on CUDA)", dense,
                          dense, flops, nbytes)
                csr = torch.sparse_csr_tensor(layout.crow, layout.col, values.to(dtype), shape)
                if transpose:
                    csr = csr.to_dense().T.to_sparse_csr()  # ΔWᵀ, built once
                at = xt if not transpose else grad_t
                table.add(op, shape, tokens, density, structure, k, "torch.sparse CSR @ dense",
                          bench(sparse_times_transposed, csr, at), dense, flops, nbytes)
                if bsr_ok:
                    index = block_value_index(layout)
                    blocks = torch.where(index >= 0, values[index.clamp(min=0)], 0).to(dtype)
                    bsr = torch.sparse_bsr_tensor(pattern.row_ptr, pattern.cols, blocks, size=shape)
                    if transpose:
                        bsr = bsr.to_dense().T.to_sparse_bsr((block_size, block_size))
                    table.add(op, shape, tokens, density, structure, k, "torch.sparse BSR @ dense",
                              bench(sparse_times_transposed, bsr, at), dense, flops, nbytes)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_rows(args, tflops_peak, tbps_peak) -> list[str]:
    table = Table(tflops_peak, tbps_peak)
    for shape in args.shapes:
        for tokens in args.tokens:
            bench_shape(table, args, shape, tokens)
    return table.rows


# ----------------------------------------------------------------------------------------- training step


LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _force_dps_stage_two(model) -> None:
    """Put every DPS layer in stage II for the timed steps: stages of 1000 steps, steps 1000-1999 are stage II."""
    tuner = model.base_model
    tuner.set_total_steps(20000)  # update_ratio 0.05: stages of 1000 optimizer steps
    tuner.update_and_allocate(998)
    tuner.update_and_allocate(999)  # chooses the subnetwork (from empty scores: any keep_ratio of each weight)


def time_steps(model, optimizer, ids, steps: int, warmup: int, after_step=None) -> list[float]:
    """Milliseconds of each of ``steps`` forward + backward + optimizer steps (CUDA events), after ``warmup``."""
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, labels=ids).loss.backward()
        if optimizer is not None:
            optimizer.step()
            if after_step is not None:
                after_step(1000 + i)
            optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return times


def training_rows(args, device: str = "cuda", shape: Optional[dict] = None) -> list[str]:
    """One row per method: median step, ratios to the frozen backbone and to LoRA r=16, peak memory."""
    import statistics

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from peft_sparse import DPSConfig, SparseMaskConfig, kernels

    device = torch.device(device)
    shape = shape or LLAMA_1B
    dtype = DTYPES[args.dtype]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.train_batch, args.train_length), generator=g).to(device)
    b = args.block_size

    def sparsemask(block_size, density=0.01):
        return lambda: SparseMaskConfig(task_type="CAUSAL_LM", density=density, block_size=block_size,
                                        selection="random", target_modules="all-linear")

    # LoRA r=16 on the 7 projections trains r·(in+out) entries a matrix: this density matches it.
    lora_count = 16 * 22 * (2 * (2048 + 2048) + 2 * (2048 + 256) + 3 * (2048 + 5632))
    weights = 22 * (2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632)
    methods = {  # name: (config, backend)
        "frozen backbone (input grad only)": (None, "auto"),
        # PEFT's default dropout, written out: the tables in benchmarks/gpu/ were measured with it (this config never
        # set one; peft 0.21.2's LoraConfig defaults to 0.0), so no second, dropout row is needed for comparison.
        "LoRA r=16": (lambda: LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                         target_modules=LINEARS), "auto"),
        "SparseMask 1% entries": (sparsemask(1), "auto"),
        f"SparseMask 1% {b}×{b} blocks": (sparsemask(b), "auto"),
        f"SparseMask 1% {b}×{b} blocks, torch backend": (sparsemask(b), "torch"),
        f"SparseMask {b}×{b} blocks at LoRA r=16's count": (sparsemask(b, lora_count / weights), "auto"),
        "SparseMask 1% 64×64 blocks": (sparsemask(64), "auto"),
        "DPS stage II (keep 0.7, strict)": (lambda: DPSConfig(task_type="CAUSAL_LM", target_modules="all-linear"),
                                            "auto"),
        "full fine-tuning": ("full", "auto"),
    }
    rows = [
        f"LLaMA-shaped model ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
        f"{shape['intermediate_size']}), random {args.dtype} weights, batch {args.train_batch} × {args.train_length} "
        f"tokens; one forward + backward + AdamW step; median of {args.train_steps} steps after "
        f"{args.train_warmup} warm-up steps (CUDA events).",
        "",
        "| method | trainable | step ms | vs frozen | vs LoRA r=16 | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = lora = None
    for name, (config, backend) in methods.items():
        torch.manual_seed(0)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with device:
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(dtype)
        after_step = None
        if config is None:
            model.requires_grad_(False)
            model.enable_input_require_grads()  # the backward runs through every layer; no weight gradient
        elif config != "full":
            model = get_peft_model(model, config())
            if name.startswith("DPS"):
                _force_dps_stage_two(model)
                after_step = model.base_model.update_and_allocate
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
        model.train()
        try:
            with kernels.use_backend(backend):
                times = time_steps(model, optimizer, ids, args.train_steps, args.train_warmup, after_step)
            ms = statistics.median(times)
        except torch.cuda.OutOfMemoryError:
            ms = None
        peak = torch.cuda.max_memory_allocated() / 2**30
        floor = floor or ms
        lora = ms if name.startswith("LoRA") else lora
        if ms is None:
            rows.append(f"| {name} | {trainable:,} | out of memory | | | |")
        else:
            rows.append(f"| {name} | {trainable:,} | {ms:.1f} | {ms / floor:.2f}× | "
                        f"{(f'{ms / lora:.2f}×') if lora else ''} | {peak:.1f} |")
        print(rows[-1], flush=True)
        del model, optimizer, params
    return rows


# ------------------------------------------------------------------------------------------------ main


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("4096x4096,4096x11008"),
                        help="weights as OUTxIN, comma-separated")
    parser.add_argument("--tokens", type=lambda s: [int(v) for v in s.split(",")], default=[4096, 8192, 16384])
    parser.add_argument("--densities", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.001, 0.005, 0.01, 0.02, 0.05])
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense TFLOP/s in --dtype (default: known GPUs)")
    parser.add_argument("--peak-tbps", type=float, help="the GPU's memory bandwidth in TB/s (default: known GPUs)")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel tables")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step table")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-length", type=int, default=2048)
    parser.add_argument("--train-steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--train-warmup", type=int, default=3, help="untimed steps first (compilation, autotuning)")
    parser.add_argument("--quick", action="store_true", help="4096x4096, 8192 tokens, densities 0.1/1/5%%")
    parser.add_argument("--out", default="kernels-benchmark.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.tokens, args.densities = [(4096, 4096)], [8192], [0.001, 0.01, 0.05]

    if not torch.cuda.is_available():
        fail("needs a CUDA GPU and none is available (torch.cuda.is_available() is False); nothing was measured")
    try:
        import triton  # noqa: F401
        import triton.testing  # noqa: F401
    except ImportError as error:
        fail(f"needs triton ({error}); pip install 'peft_sparse[triton]'")
    if os.environ.get("TRITON_INTERPRET") == "1":
        fail("TRITON_INTERPRET=1 is set: timings of Triton's interpreter mean nothing; unset it")

    tflops_peak, tbps_peak, name = peaks(args)
    lines = [
        f"# peft_sparse kernels on {name}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}, {args.dtype}; peaks {tflops_peak:g} TFLOP/s dense, "
        f"{tbps_peak:g} TB/s; medians of triton.testing.do_bench (ms).",
        "",
    ]
    if not args.no_kernels:
        lines += ["## Kernels", ""] + kernel_rows(args, tflops_peak, tbps_peak) + [""]
    if not args.no_train:
        lines += ["## Training step", ""] + training_rows(args) + [""]
    text = "\n".join(lines)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

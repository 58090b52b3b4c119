#!/usr/bin/env python
"""The CPU hot path of a sparse increment: the ways to compute one linear layer's forward and backward, timed.

For each projection shape of one SmolLM2 block (q, k, v, o, gate, up, down), at the density that trains LoRA r=8's
entry count (``r * (in + out)`` entries) and at 1 %, unstructured and in 32 x 32 blocks, with ``--tokens`` tokens, on
a float (fp32) base, a bitsandbytes 4-bit NF4 base and a bitsandbytes LLM.int8 base in training mode (``--bases``):

* ``floor``: the frozen base product, the input gradient only (what any method pays at least); on 4-bit bases
  bitsandbytes' own 4-bit matmul (a dequantization in the forward and one in the backward); on int8 bases
  ``Linear8bitLt``'s own CPU training product (``MatMul8bitFp``: ``CB · SCB / 127`` and a float matmul);
* ``lora-r8``: the base product plus ``(x Aᵀ) Bᵀ``, A and B trained (PEFT's LoRA, no dropout);
* ``fold`` (the package's path): ΔW folded into the base product: on float bases added into W in place and the
  entries put back exactly afterwards, on 4-bit and int8 bases scattered into the layer's own dequantized weight; the values'
  gradient sampled at the support (``sampled_addmm``, or batched matmuls over the blocks);
* ``fold-copy`` (float bases; the package's path before 0.2.0): ``W + ΔW`` formed as a new tensor for each product;
* ``beside``: the base product plus ``x ΔWᵀ`` by sparse products (CSR, or batched block products), the input
  gradient likewise: what the package did on quantized bases before 0.2.0, and still does on hooked ones;
* ``dense-delta`` (float bases): a dense scattered ``ΔW`` and a second matmul, the values' gradient as the dense weight
  gradient plus a gather (what 0.1.0 did on quantized bases).

Every option runs on the same tensors, in a new random order each round, medians over ``--rounds``; the table gives
the block's total (the sum over its seven projections) and its ratio to the floor and to LoRA. ``--sddmm`` also times
the values' gradient alone, three ways (the package's, the dense weight gradient plus a gather, and a gather of the
support's rows and columns with row-wise dot products); ``--indexing`` times reading and writing the support's
entries of a weight by advanced indexing and by the ``index_*`` ops.

    python benchmarks/cpu_hot_path.py --threads 2 --tokens 512 --rounds 30 --bases fp32,nf4 --sddmm
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import peft_sparse  # noqa: F401  (peft_sparse.kernels)
from peft_sparse.kernels import function as kfn
from peft_sparse.quantized import dequantize_4bit, fresh_weight
from peft_sparse.kernels.layout import build_layout

#: The projections of one block, (out, in): SmolLM2-135M (LLaMA) and all-MiniLM-L6-v2 (BERT).
MODELS = {
    "smollm2": {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
                "up": (1536, 576), "down": (576, 1536)},
    "minilm": {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output": (384, 384),
               "intermediate": (1536, 384), "output": (384, 1536)},
}
SHAPES = MODELS["smollm2"]


def support(shape: tuple[int, int], count: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` sorted flat indices: random entries, or whole random ``block`` x ``block`` blocks."""
    out_f, in_f = shape
    if block == 1:
        return torch.randperm(out_f * in_f, generator=generator)[:count].sort().values
    grid = (out_f // block, in_f // block)
    blocks = torch.randperm(grid[0] * grid[1], generator=generator)[: max(1, round(count / block**2))]
    rows = (blocks // grid[1])[:, None, None] * block + torch.arange(block)[None, :, None]
    cols = (blocks % grid[1])[:, None, None] * block + torch.arange(block)[None, None, :]
    return (rows * in_f + cols).flatten().sort().values


class DenseDelta(torch.autograd.Function):
    """``F.linear(x, W) + x ΔWᵀ`` with ``ΔW`` scattered dense; the values' gradient from the dense weight gradient."""

    @staticmethod
    def forward(ctx, x, values, indices, weight):
        delta = torch.zeros(weight.numel(), dtype=x.dtype).index_add_(0, indices, values).view(weight.shape)
        ctx.save_for_backward(x, values, indices, weight)
        return F.linear(x, weight) + F.linear(x, delta)

    @staticmethod
    def backward(ctx, grad):
        x, values, indices, weight = ctx.saved_tensors
        delta = torch.zeros(weight.numel(), dtype=x.dtype).index_add_(0, indices, values).view(weight.shape)
        return grad @ weight + grad @ delta, (grad.T @ x).view(-1)[indices], None, None


class FoldCopy(torch.autograd.Function):
    """``F.linear(x, W + ΔW)`` with ``W + ΔW`` formed as a new tensor in the forward and again in the backward."""

    @staticmethod
    def forward(ctx, x, values, layout, weight):
        ctx.layout, ctx.weight = layout, weight
        ctx.save_for_backward(x, values)
        merged = weight.clone()
        merged.view(-1).index_add_(0, layout.indices, values)
        return F.linear(x, merged)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        merged = ctx.weight.clone()
        merged.view(-1).index_add_(0, ctx.layout.indices, values)
        return grad @ merged, kfn.sddmm(grad, x, ctx.layout), None, None


def nf4(weight: torch.Tensor):
    """``weight`` quantized to bitsandbytes NF4: the packed weight (with its quant state) and a dequantizing callable."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(weight, quant_type="nf4")
    packed.quant_state = state  # what peft_sparse.quantized.dequantize_4bit reads
    return packed, state, lambda dtype: dequantize_4bit(packed, dtype)


def int8(weight: torch.Tensor) -> torch.nn.Module:
    """``weight`` as a bitsandbytes LLM.int8 layer (``Linear8bitLt``, no fp16 weights) in training mode, as
    ``BitsAndBytesConfig(load_in_8bit=True)`` loads it: its CPU training product is ``MatMul8bitFp``."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").train()


def options(shape, tokens, density, block, base="fp32", seed=0) -> tuple[dict[str, Callable[[], None]], int]:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    weight = torch.randn(shape, generator=g) / in_f**0.5
    x = torch.randn(tokens, in_f, generator=g, requires_grad=True)
    grad = torch.randn(tokens, out_f, generator=g)
    count = 8 * (in_f + out_f) if density is None else round(density * out_f * in_f)
    indices = support(shape, count, block, g)
    layout = build_layout(indices, shape, block)
    values = (0.01 * torch.randn(indices.numel(), generator=g)).requires_grad_()
    a = (0.01 * torch.randn(8, in_f, generator=g)).requires_grad_()
    b = (0.01 * torch.randn(out_f, 8, generator=g)).requires_grad_()

    def run(fn):
        def step():
            fn().backward(grad)
            for t in (x, values, a, b):
                t.grad = None
        return step

    if base == "int8":
        layer = int8(weight)
        fresh = fresh_weight(layer, x)  # the package's choice: a dequantizing callable while training on the CPU
        assert fresh is not None, "bitsandbytes' 8-bit layer did not take its CPU training path"
        return {
            "floor": run(lambda: layer(x)),
            "lora-r8": run(lambda: layer(x) + (x @ a.T) @ b.T),
            "fold": run(lambda: kfn.sparse_delta_linear(x, values, layout, fresh_weight(layer, x))),  # the package
            "beside": run(lambda: layer(x) + kfn.sparse_delta_linear(x, values, layout)),
        }, indices.numel()
    if base == "nf4":
        import bitsandbytes as bnb

        packed, state, fresh = nf4(weight)

        def base_product():
            return bnb.matmul_4bit(x, packed, quant_state=state)

        return {
            "floor": run(base_product),
            "lora-r8": run(lambda: base_product() + (x @ a.T) @ b.T),
            "fold": run(lambda: kfn.sparse_delta_linear(x, values, layout, fresh)),  # the package's path
            "beside": run(lambda: base_product() + kfn.sparse_delta_linear(x, values, layout)),
        }, indices.numel()
    return {
        "floor": run(lambda: F.linear(x, weight)),
        "lora-r8": run(lambda: F.linear(x, weight) + (x @ a.T) @ b.T),
        "fold": run(lambda: kfn.sparse_delta_linear(x, values, layout, weight)),  # the package's path
        "fold-copy": run(lambda: FoldCopy.apply(x, values, layout, weight)),
        "beside": run(lambda: F.linear(x, weight) + kfn.sparse_delta_linear(x, values, layout)),
        "dense-delta": run(lambda: DenseDelta.apply(x, values, indices, weight)),
    }, indices.numel()


def sddmm_options(shape, tokens, density, block, seed=0) -> tuple[dict[str, Callable[[], None]], int]:
    """The values' gradient alone, three ways, on the same tensors."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    x = torch.randn(tokens, in_f, generator=g)
    grad = torch.randn(tokens, out_f, generator=g)
    count = 8 * (in_f + out_f) if density is None else round(density * out_f * in_f)
    layout = build_layout(support(shape, count, block, g), shape, block)
    rows = torch.div(layout.indices, in_f, rounding_mode="floor")

    def gathered_dots():
        return torch.einsum("kt,kt->k", grad.T.contiguous()[rows], x.T.contiguous()[layout.col])

    return {
        "sddmm (package)": lambda: kfn.sddmm(grad, x, layout),
        "dense gradient + gather": lambda: (grad.T @ x).view(-1)[layout.indices],
        "gathered row-wise dots": gathered_dots,
    }, layout.nnz


def time_block(shapes: dict, tokens: int, density, block: int, rounds: int, make=options) -> tuple[dict[str, float], int]:
    """Per option: the sum over the block's projections of the median forward + backward time (seconds)."""
    totals: dict[str, float] = {}
    entries = 0
    rng = random.Random(0)
    for shape in shapes.values():
        steps, count = make(shape, tokens, density, block)
        entries += count
        times: dict[str, list[float]] = {name: [] for name in steps}
        order = list(steps)
        for round_ in range(rounds + 2):
            rng.shuffle(order)
            for name in order:
                start = time.perf_counter()
                steps[name]()
                if round_ >= 2:
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            totals[name] = totals.get(name, 0.0) + statistics.median(values)
    return totals, entries


def indexing_options(shape, tokens, density, block, seed=0) -> tuple[dict[str, Callable[[], None]], int]:
    """Reading and writing the support's entries of a weight: advanced indexing against the index_* ops."""
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    flat = torch.randn(out_f * in_f, generator=g)
    count = 8 * (in_f + out_f) if density is None else round(density * out_f * in_f)
    indices = support(shape, count, block, g)
    values = torch.randn(indices.numel(), generator=g)
    return {
        "read: weight[indices]": lambda: flat[indices],
        "read: index_select": lambda: flat.index_select(0, indices),
        "write: weight[indices] = v (index_put_)": lambda: flat.index_put_((indices,), values),
        "write: index_copy_": lambda: flat.index_copy_(0, indices, values),
        "add: index_add_": lambda: flat.index_add_(0, indices, values),
    }, indices.numel()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=[512],
                   help="tokens per step, comma-separated (512 = 8 x 64 in benchmarks/llm.py, 2048 = 32 x 64 in "
                        "benchmarks/step_time.py)")
    p.add_argument("--models", default="smollm2,minilm", help=f"block shapes of: {', '.join(MODELS)}")
    p.add_argument("--bases", default="fp32,nf4", help="fp32 (a float base), nf4 (bitsandbytes 4-bit) and/or int8 "
                                                         "(bitsandbytes LLM.int8, training mode)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--sddmm", action="store_true", help="also time the values' gradient alone, three ways")
    p.add_argument("--indexing", action="store_true", help="also time reading and writing the support's entries")
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"One block's projections, forward + backward, {args.threads} threads, torch {torch.__version__}; "
             f"medians of {args.rounds} rounds (random order), summed over the projections.", "",
             "| block | base | tokens | support | trained entries | option | fwd+bwd | vs floor | vs LoRA r=8 |",
             "|---|---|---:|---|---:|---|---:|---:|---:|"]
    for model in args.models.split(","):
        for base in args.bases.split(","):
            for tokens in args.tokens:
                for density, label in ((None, "LoRA r=8's count"), (0.01, "1 %")):
                    for block in (1, 32):
                        make = partial(options, base=base)
                        totals, entries = time_block(MODELS[model], tokens, density, block, args.rounds, make)
                        name = f"{label}, {'unstructured' if block == 1 else f'{block}x{block} blocks'}"
                        for option, seconds in totals.items():
                            if option in ("floor", "lora-r8") and (block == 32 or density is not None):
                                continue  # the same as the first rows
                            lines.append(f"| {model} | {base} | {tokens} | {name} | {entries:,} | {option} | "
                                         f"{1000 * seconds:.2f} ms | {seconds / totals['floor']:.2f} | "
                                         f"{seconds / totals['lora-r8']:.2f} |")
                            print(lines[-1], flush=True)
    if args.sddmm:
        lines += ["", "The values' gradient alone (the SDDMM), summed over the block's projections:", "",
                  "| block | tokens | support | trained entries | way | time |", "|---|---:|---|---:|---|---:|"]
        for model in args.models.split(","):
            for tokens in args.tokens:
                for block in (1, 32):
                    totals, entries = time_block(MODELS[model], tokens, None, block, args.rounds, sddmm_options)
                    name = f"LoRA r=8's count, {'unstructured' if block == 1 else f'{block}x{block} blocks'}"
                    for way, seconds in totals.items():
                        lines.append(f"| {model} | {tokens} | {name} | {entries:,} | {way} | {1000 * seconds:.2f} ms |")
                        print(lines[-1], flush=True)
    if args.indexing:
        lines += ["", "Reading and writing the support's entries of each weight (LoRA r=8's count, unstructured), summed "
                  "over the block's projections:", "", "| block | trained entries | way | time |", "|---|---:|---|---:|"]
        for model in args.models.split(","):
            totals, entries = time_block(MODELS[model], 0, None, 1, args.rounds, indexing_options)
            for way, seconds in totals.items():
                lines.append(f"| {model} | {entries:,} | {way} | {1e6 * seconds:.0f} µs |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\nCommand: `python benchmarks/cpu_hot_path.py " +
                                  " ".join(argv if argv is not None else sys.argv[1:]) + "`\n")


if __name__ == "__main__":
    main()

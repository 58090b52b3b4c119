#!/usr/bin/env python
"""The CPU hot path of a sparse increment: the ways to compute one linear layer's forward and backward, timed.

For each projection shape of one SmolLM2 block (q, k, v, o, gate, up, down), at the density that trains LoRA r=8's
entry count (``r * (in + out)`` entries) and at 1 %, unstructured and in 32 x 32 blocks, with ``--tokens`` tokens:

* ``floor``: ``F.linear(x, W)`` frozen, the input gradient only (what any method pays at least);
* ``lora-r8``: ``F.linear(x, W) + (x Aᵀ) Bᵀ``, A and B trained (PEFT's LoRA);
* ``merged`` (the package's path on float bases, CPU and CUDA): ``F.linear(x, W + ΔW)``, ``W + ΔW`` formed in
  the forward and again in the backward, the values' gradient sampled at the support (``sampled_addmm``, or
  batched matmuls over the blocks);
* ``sparse-products`` (its path on quantized bases): ``F.linear(x, W) + x ΔWᵀ`` with a CSR product (batched block
  products for blocks), the input gradient ``g W + g ΔW`` likewise, the same values' gradient; nothing
  weight-sized;
* ``dense-delta``: a dense scattered ``ΔW`` and a second matmul, the values' gradient as the dense weight gradient
  plus a gather (what 0.1.0 did on quantized bases).

Every option runs on the same tensors, in a new random order each round, medians over ``--rounds``; the table gives
the block's total (the sum over its seven projections) and its ratio to the floor and to LoRA.

    python benchmarks/cpu_hot_path.py --threads 2 --tokens 512 --rounds 30
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import peft_sparse  # noqa: F401  (peft_sparse.kernels)
from peft_sparse.kernels import function as kfn
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


def options(shape, tokens, density, block, seed=0) -> dict[str, Callable[[], None]]:
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

    def run(fn, context=contextlib.nullcontext):
        def step():
            with context():
                fn().backward(grad)
            for t in (x, values, a, b):
                t.grad = None
        return step

    return {
        "floor": run(lambda: F.linear(x, weight)),
        "lora-r8": run(lambda: F.linear(x, weight) + (x @ a.T) @ b.T),
        "merged": run(lambda: kfn.sparse_delta_linear(x, values, layout, weight)),  # the package's path
        "sparse-products": run(lambda: kfn.sparse_delta_linear(x, values, layout, weight), sparse_products),
        "dense-delta": run(lambda: DenseDelta.apply(x, values, indices, weight)),
    }, indices.numel()


@contextlib.contextmanager
def sparse_products():
    """The quantized bases' path on a float base: ``F.linear(x, W)`` plus the sparse products with ΔW."""
    original = kfn.merges_weight
    kfn.merges_weight = lambda weight: False
    try:
        yield
    finally:
        kfn.merges_weight = original


def time_block(shapes: dict, tokens: int, density, block: int, rounds: int) -> tuple[dict[str, float], int]:
    """Per option: the sum over the block's projections of the median forward + backward time (seconds)."""
    totals: dict[str, float] = {}
    entries = 0
    rng = random.Random(0)
    for shape in shapes.values():
        steps, count = options(shape, tokens, density, block)
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",")], default=[512],
                   help="tokens per step, comma-separated (512 = 8 x 64 in benchmarks/llm.py, 2048 = 32 x 64 in "
                        "benchmarks/step_time.py)")
    p.add_argument("--models", default="smollm2,minilm", help=f"block shapes of: {', '.join(MODELS)}")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=None, help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"One block's projections, forward + backward, {args.threads} threads, torch {torch.__version__}; "
             f"medians of {args.rounds} rounds (random order), summed over the projections.", "",
             "| block | tokens | support | trained entries | option | fwd+bwd | vs floor | vs LoRA r=8 |",
             "|---|---:|---|---:|---|---:|---:|---:|"]
    for model in args.models.split(","):
        for tokens in args.tokens:
            for density, label in ((None, "LoRA r=8's count"), (0.01, "1 %")):
                for block in (1, 32):
                    totals, entries = time_block(MODELS[model], tokens, density, block, args.rounds)
                    name = f"{label}, {'unstructured' if block == 1 else f'{block}x{block} blocks'}"
                    for option, seconds in totals.items():
                        if option in ("floor", "lora-r8") and (block == 32 or density is not None):
                            continue  # the same as the first rows
                        lines.append(f"| {model} | {tokens} | {name} | {entries:,} | {option} | {1000 * seconds:.2f} "
                                     f"ms | {seconds / totals['floor']:.2f} | {seconds / totals['lora-r8']:.2f} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\nCommand: `python benchmarks/cpu_hot_path.py " +
                                  " ".join(argv if argv is not None else __import__("sys").argv[1:]) + "`\n")


if __name__ == "__main__":
    main()

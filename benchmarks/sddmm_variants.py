#!/usr/bin/env python
"""The values' gradient of an unstructured sparse increment on the CPU (the SDDMM), ways tried to make it faster.

For one SmolLM2 block's seven projections at 2.3 % density (LoRA r=8's entry count), 512 tokens, random supports:
``(grad_outᵀ @ x)`` sampled at the support, by

* ``sampled_addmm``: torch's CSR ``sampled_addmm`` as the package calls it (operands as views);
* the same with contiguous ``grad_outᵀ`` and/or a column-major ``x`` (does the operand layout matter?);
* ``sampled_addmm, rows split over 2 threads``: the support's rows in two halves, one in a Python thread (torch
  releases the GIL), since ``sampled_addmm`` runs on one thread whatever ``torch.set_num_threads`` says;
* ``dense + gather``: the dense weight gradient and a gather of the support.

Medians of ``--rounds`` calls, summed over the projections; every way's result is checked against the dense one.

    python benchmarks/sddmm_variants.py --threads 2 --out benchmarks/sddmm_variants.md
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # q k v o gate up down


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=shape)


def sampled(crow, col, shape, g_t, x) -> torch.Tensor:
    pattern = csr(crow, col, torch.zeros(col.numel()), shape)
    return torch.sparse.sampled_addmm(pattern, g_t, x, beta=0.0).values()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--density", type=float, default=0.023)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = []
    for out_f, in_f in SHAPES:
        idx = torch.randperm(out_f * in_f)[: int(out_f * in_f * args.density)].sort().values
        rows, cols = idx // in_f, idx % in_f
        crow = torch.zeros(out_f + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
        g, x = torch.randn(args.tokens, out_f), torch.randn(args.tokens, in_f)
        half = out_f // 2
        cut = int(crow[half])
        split = ((crow[: half + 1].clone(), cols[:cut], (half, in_f), g[:, :half]),
                 (crow[half:] - cut, cols[cut:], (out_f - half, in_f), g[:, half:]))
        cases.append(dict(idx=idx, cols=cols, crow=crow, g=g, x=x, shape=(out_f, in_f), split=split))
    pool = ThreadPoolExecutor(1)

    def two_threads(c):
        (c1, k1, s1, g1), (c2, k2, s2, g2) = c["split"]
        other = pool.submit(sampled, c2, k2, s2, g2.T, c["x"])
        return torch.cat([sampled(c1, k1, s1, g1.T, c["x"]), other.result()])

    ways = {
        "sampled_addmm (the package)": lambda c: sampled(c["crow"], c["cols"], c["shape"], c["g"].T, c["x"]),
        "sampled_addmm, contiguous gradᵀ": lambda c: sampled(c["crow"], c["cols"], c["shape"], c["g"].T.contiguous(), c["x"]),
        "sampled_addmm, column-major x": lambda c: sampled(c["crow"], c["cols"], c["shape"], c["g"].T, c["x"].T.contiguous().T),
        "sampled_addmm, rows split over 2 threads": two_threads,
        "dense + gather": lambda c: (c["g"].T @ c["x"]).view(-1).index_select(0, c["idx"]),
    }
    for c in cases:
        reference = (c["g"].T @ c["x"]).view(-1)[c["idx"]]
        for name, way in ways.items():
            torch.testing.assert_close(way(c), reference, rtol=1e-4, atol=1e-3, msg=name)
    times = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for c in cases:
                way(c)
            times[name].append(time.perf_counter() - start)
    entries = sum(c["idx"].numel() for c in cases)
    lines = [f"SmolLM2 block, {entries:,} support entries ({args.density:.1%}), {args.tokens} tokens, {args.threads} "
             f"threads, torch {torch.__version__}; medians of {args.rounds} rounds, summed over the 7 projections.", "",
             "| way | time |", "|---|---:|"]
    lines += [f"| {name} | {1e3 * statistics.median(t):.2f} ms |" for name, t in times.items()]
    text = "\n".join(lines)
    print(text)
    if args.out:
        command = " ".join(["python benchmarks/sddmm_variants.py", *(argv if argv is not None else __import__("sys").argv[1:])])
        Path(args.out).write_text(text + f"\n\nCommand: `{command}`\n")


if __name__ == "__main__":
    main()

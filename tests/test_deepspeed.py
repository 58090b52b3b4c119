"""DeepSpeed ZeRO-2 / ZeRO-3 through Accelerate on CPU, 2 processes (only where DeepSpeed is installed: it is not a
dependency of peft_sparse, and CI does not install it). What works matches a single process; what cannot work is
refused with an error naming the engine. See ``ds_worker.py`` for the set-up Accelerate needs on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import dist_scenarios as S
from test_distributed import assert_relatively_close, free_port, reference

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
HERE = Path(__file__).parent

#: (ZeRO stage, tuner) -> None when it trains like one process, else the error it must raise.
CASES = {
    **{(z, t): None for z in (2, 3) for t in ("bitfit", "sparsemask", "sparsemask-mask", "learner")},
    (2, "layerselect"): None,
    # LayerSelect adds its deltas to base parameters that ZeRO-3 gathers only inside their own module's forward.
    (3, "layerselect"): r"ValueError: LayerSelect adds its deltas .*\(DeepSpeed ZeRO-3\)",
    # DPS reads .grad after the step; ZeRO keeps the reduced gradients in its own partitions.
    (2, "dps"): r"ValueError: DPS adapter 'default': .* found no gradients .* DeepSpeed ZeRO",
    (3, "dps"): r"ValueError: DPS adapter 'default': .* found no gradients .* DeepSpeed ZeRO",
}


@pytest.mark.parametrize("stage,tuner", list(CASES), ids=[f"zero{z}-{t}" for z, t in CASES])
def test_deepspeed_zero_trains_like_one_process_or_refuses(stage, tuner, tmp_path):
    import re

    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ZERO=str(stage),
               TUNER=tuner)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", str(stage),
           "--num_processes", str(S.WORLD), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
           "no", "--main_process_port", str(free_port()), str(HERE / "ds_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    facts = json.loads((tmp_path / f"zero{stage}-{tuner}.json").read_text())
    assert facts["world"] == S.WORLD and facts.get("engine", "DeepSpeedEngine") == "DeepSpeedEngine", facts
    expected_error = CASES[(stage, tuner)]
    if expected_error is not None:
        assert re.search(expected_error, facts["status"]), facts["status"]
        return
    assert facts["status"] == "ok", facts.get("traceback", facts["status"])
    got = {f"adapter.{k}": v for k, v in load_file(tmp_path / f"zero{stage}-{tuner}.safetensors").items()}
    _, ref_adapter, _ = reference(tuner)
    # DeepSpeed averages the gradients in its own buckets (another summation order): 5e-5 of the adapter's norm.
    assert_relatively_close(got, ref_adapter, 5e-5, f"zero{stage}-{tuner}")
    assert any(v.is_floating_point() and v.abs().max() > 0 for v in ref_adapter.values())

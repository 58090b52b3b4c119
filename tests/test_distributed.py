import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_bitfit_under_accelerate_launch_gives_the_same_adapter_on_both_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")
    # `--cpu` with several processes would go through mpirun; the torchrun launcher with Accelerator(cpu=True)
    # in the worker gives DDP over gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), str(HERE / "ddp_worker.py"), str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = load_file(tmp_path / "rank0" / "adapter_model.safetensors")
    rank1 = load_file(tmp_path / "rank1" / "adapter_model.safetensors")
    assert rank0.keys() == rank1.keys() and any(k.endswith("bitfit_bias") for k in rank0)
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
    # Training moved the biases (so the equality above is not the trivial all-zero case).
    assert any(rank0[k].abs().max() > 0 for k in rank0 if k.endswith("bitfit_bias"))

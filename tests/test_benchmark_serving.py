"""benchmarks/serving.py end to end on a tiny random LLaMA (fp32 and NF4), with the smallest settings: every phase
runs, the report and plot are written, and the drift column tells exact swaps from LoRA's. The SmolLM2 measurement
itself is run by hand (see the script's docstring)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks" / "serving.py")
serving = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serving)


@pytest.mark.slow
def test_every_phase_runs_and_only_lora_drifts(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    serving.main(["--model", "tiny", "--out-dir", str(out), "--num-adapters", "2", "--adapter-counts", "1,2",
                  "--batch-size", "2", "--length", "40", "--repeats", "1", "--warmup", "0", "--switches", "3",
                  "--gen-tokens", "2", "--gen-repeats", "1", "--prompt-length", "4"])
    results = json.loads((out / "serving.json").read_text())
    for base in ("fp32", "4bit"):
        drift = results[base]["drift"]
        assert drift["sparsemask hot-swap"]["drifted"] == 0
        assert drift["sparsemask hot-swap, other supports"]["drifted"] == 0
        assert drift["sparsemask reload"]["drifted"] == 0
        assert drift["lora unmerge+hotswap+merge"]["drifted"] > 0  # W + BA - BA
        assert set(results[base]["switch"]) == set(serving.SWITCHERS)
        assert {"merged (1 adapter)", "sparsemask k=2", "lora k=2"} <= set(results[base]["mixed"])
        assert all(v["tokens_per_s"] > 0 for v in results[base]["generate"].values())
    assert "sparsemask-products k=2" in results["fp32"]["mixed"]
    report = (out / "serving.md").read_text()
    assert "## Targets (issue 20)" in report and "drift after 3 switches" in report
    assert (out / "serving.png").stat().st_size > 0
    serving.main(["--out-dir", str(out), "--report"])  # rebuilt from the JSON alone

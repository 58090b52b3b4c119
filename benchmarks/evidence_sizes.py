"""What each evidence variant saves: the bytes of the weights file ``save_pretrained`` writes (the adapter's
``adapter_model.safetensors``; the whole ``model.safetensors`` for full fine-tuning).

Measured apart from the training runs so that adding it reran none of them: the runs' rows are keyed by a hash of
the code they execute (``evidence_run.code_hash``). Every variant but DPS saves a size fixed by its configuration
(support, mask, blocks, slices); DPS saves the entries that changed, so each variant takes two optimizer steps on
real training batches before it is saved (DPS's stage I changes every entry with a gradient, as a full run does).
Results are cached in ``benchmarks/evidence/adapter_bytes.json`` by variant, task and that same code hash.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from evidence_codes import current_codes  # noqa: E402
from evidence_run import MAX_LENGTH, _batches, _encode, code_hash, load_split  # noqa: E402
from glue_data import TASKS  # noqa: E402

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")


def saved_bytes(folder: Path) -> int:
    """Bytes of the weights file(s) in a ``save_pretrained`` folder (configs and the model card excluded)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.name in WEIGHT_FILES)


def measure(method: str, options: dict[str, Any], task: str, model_path: str, glue_dir: Optional[str],
            batch_size: int = 8) -> int:
    """Build ``method`` with ``options`` on ``task``'s head, take two AdamW steps on its training rows, save, and
    return the weights file's bytes."""
    import methods
    import peft_sparse
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    num_labels = TASKS[task]["num_labels"]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, _ = load_split(task, glue_dir, "claim", limit=4 * batch_size)
    encoded = _encode(tokenizer, train, MAX_LENGTH[task])
    batches = list(_batches(encoded, train["labels"], batch_size, torch.Generator().manual_seed(0), tokenizer,
                            shuffle=False))[:2]
    if num_labels == 1:
        for batch in batches:
            batch["labels"] = batch["labels"].float()
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=num_labels, dtype=torch.float32,
        problem_type="regression" if num_labels == 1 else "single_label_classification")
    model = methods.apply_method(model, method, "SEQ_CLS", **options)
    if method != "full" and peft_sparse.requires_calibration(model):
        peft_sparse.calibrate(model, batches)
    tuner = getattr(model, "base_model", None)
    if hasattr(tuner, "set_total_steps"):
        tuner.set_total_steps(4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for step, batch in enumerate(batches):
        model(**batch).loss.backward()
        optimizer.step()
        if hasattr(tuner, "update_and_allocate"):
            tuner.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return saved_bytes(Path(folder))


def adapter_bytes(pairs: list[tuple[str, str]], variants: dict[str, tuple[str, dict[str, Any]]],
                  options_for: Callable[[str, str], dict[str, Any]], model_path: str, glue_dir: Optional[str],
                  cache_path: Path, compute: bool) -> dict[tuple[str, str], int]:
    """Bytes saved per (variant, task) from the cache, measuring the missing ones when ``compute`` is set. A
    cached size counts only while its variant's code hash is the checkout's, or one certified equivalent to it
    (``evidence_codes.current_codes``)."""
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    sizes, changed = {}, False
    for variant, task in pairs:
        method = variants[variant][0]
        key = next((k for k in (f"{variant}|{task}|{c}" for c in current_codes(method)) if k in cache),
                   f"{variant}|{task}|{code_hash(method)}")
        if key not in cache and compute:
            cache[key] = measure(method, options_for(variant, task), task, model_path, glue_dir)
            changed = True
            print(f"adapter bytes: {variant} on {task}: {cache[key]:,}", flush=True)
        if key in cache:
            sizes[(variant, task)] = cache[key]
    if changed:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(dict(sorted(cache.items())), indent=1) + "\n")
    return sizes


def human_bytes(n: float) -> str:
    """1,234,567 -> '1.2 MB' (decimal units, as file sizes are usually given)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


__all__ = ["adapter_bytes", "human_bytes", "measure", "saved_bytes"]

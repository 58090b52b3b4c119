"""What a fine-tuning run costs, measured from inside the transformers ``Trainer``.

``CostCallback`` records, for one ``trainer.train()``: the trainable and total entries of the model as it trains
(counted as PEFT's ``print_trainable_parameters`` counts them), the wall time of every optimizer step (CUDA
synchronised; the median leaves out the first 3 steps), the training wall and CPU time, and the peak memory (CUDA:
``max_memory_allocated`` since training began; CPU: the peak resident set size of the process).
``measure_saved(folder)``, after ``trainer.save_model(folder)``, adds the bytes of the saved weights (the adapter,
or the whole model for full fine-tuning). ``format_report`` prints a run's summary.

The examples (``examples/finetune_glue.py``, ``examples/finetune_causal_lm.py``) print their reports with it, and
the benchmarks read ``peak_rss_mib``. Only torch, transformers and peft are needed (plotting stays in the
benchmarks).
"""

from __future__ import annotations

import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from peft import PeftModel
from transformers import TrainerCallback

#: Weight files of a saved PEFT adapter or transformers model (not training_args.bin, tokenizer or config files).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model*.safetensors", "pytorch_model*.bin")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    import resource  # POSIX only: imported where it is used, so that the module itself imports everywhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def saved_weight_bytes(folder: str | Path) -> int:
    """Bytes of the weight files directly in ``folder`` (checkpoint sub-folders are not counted)."""
    files = {p for pattern in WEIGHT_FILES for p in Path(folder).glob(pattern) if p.is_file()}
    if not files:
        raise FileNotFoundError(f"no saved weights ({', '.join(WEIGHT_FILES)}) in {folder}")
    return sum(p.stat().st_size for p in files)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` entries of ``model``: a PEFT model's own ``get_nb_trainable_parameters()`` (which
    counts a bitsandbytes 4-bit weight at its unpacked size, as ``print_trainable_parameters`` prints it), else
    the ``numel`` of the parameters that require grad, and of all of them."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class CostCallback(TrainerCallback):
    """Trainable entries, optimizer-step times, training time and peak memory of one ``Trainer.train()``.

    Steps are optimizer steps: with gradient accumulation one step spans all its micro-batches. A step's time runs
    from ``on_step_begin`` to ``on_step_end``, so it leaves out evaluation, logging and checkpoints.
    """

    def __init__(self, warmup_steps: int = 3):
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.trainable: Optional[int] = None
        self.total: Optional[int] = None
        self.adapter_bytes: Optional[int] = None
        self.train_wall_s: Optional[float] = None
        self.train_cpu_s: Optional[float] = None
        self._cuda = False
        self._step_t0: Optional[float] = None
        self._train_t0 = (0.0, 0.0)

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cuda = args.device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.trainable, self.total = count_parameters(model)
        self._train_t0 = (time.perf_counter(), time.process_time())

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._step_t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_t0 is not None:
            self._sync()
            self.step_times.append(time.perf_counter() - self._step_t0)
            self._step_t0 = None

    def on_train_end(self, args, state, control, **kwargs):
        wall0, cpu0 = self._train_t0
        self.train_wall_s, self.train_cpu_s = time.perf_counter() - wall0, time.process_time() - cpu0

    def measure_saved(self, folder: str | Path) -> int:
        """Record (and return) the bytes of the weights saved in ``folder``."""
        self.adapter_bytes = saved_weight_bytes(folder)
        return self.adapter_bytes

    def median_step_s(self) -> Optional[float]:
        """Median step time, leaving out the first ``warmup_steps`` steps when there are more steps than that."""
        times = self.step_times[self.warmup_steps :] if len(self.step_times) > self.warmup_steps else self.step_times
        return float(statistics.median(times)) if times else None

    def results(self) -> dict[str, Any]:
        """The measurements so far; peak memory is read now (call it after evaluation to include it)."""
        if self.trainable is None:
            raise RuntimeError("CostCallback.results(): training has not started (pass the callback to the Trainer)")
        rss = peak_rss_mib()
        return {
            "trainable_params": self.trainable,
            "total_params": self.total,
            "trainable_percent": 100.0 * self.trainable / self.total,
            "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if self._cuda else rss,
            "peak_memory_kind": "cuda_max_memory_allocated" if self._cuda else "cpu_peak_rss",
            "peak_rss_mib": rss,
            "train_wall_s": self.train_wall_s,
            "train_cpu_s": self.train_cpu_s,  # CPU time of this process (all threads): less sensitive to other load
            "median_step_s": self.median_step_s(),
            "num_steps": len(self.step_times),
            "adapter_bytes": self.adapter_bytes,
            "environment": {
                "device": "cuda:" + torch.cuda.get_device_name() if self._cuda else "cpu",
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }


def format_report(r: dict[str, Any], title: str = "GLUE") -> str:
    """A run's summary, as the examples print it: ``r`` is ``CostCallback.results()`` plus the run's ``task``,
    ``method``, ``seed``, ``model``, ``metric``, ``score``, ``metrics`` and ``adapter_path`` (and optionally
    ``calibration_s`` and ``adapter_config``). ``title`` names the kind of run (``"GLUE"``, ``"SFT"``)."""
    step = f"{r['median_step_s'] * 1000:.1f} ms" if r["median_step_s"] is not None else "n/a"
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
    layers = (r.get("adapter_config") or {}).get("layers")
    calibration = f", + {r['calibration_s']:.1f} s calibration" if r.get("calibration_s") else ""
    lines = [
        "=" * 72,
        f"{title} {r['task']} / {r['method']}   (seed {r['seed']}, model {r['model']})",
        f"  score ({r['metric']}):  {r['score']:.4f}    [{metrics}]",
        f"  trainable params:     {r['trainable_params']:,} of {r['total_params']:,} ({r['trainable_percent']:.3f}%)",
        *([f"  selected layers:      {layers}"] if r["method"] == "layerselect" and layers is not None else []),
        f"  peak memory:          {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})",
        f"  training wall time:   {r['train_wall_s']:.1f} s ({r['num_steps']} steps{calibration})",
        f"  median step time:     {step}",
        f"  adapter on disk:      {r['adapter_bytes']:,} bytes",
        f"  saved to:             {r['adapter_path']}",
        "=" * 72,
    ]
    return "\n".join(lines)


__all__ = ["CostCallback", "WEIGHT_FILES", "count_parameters", "format_report", "peak_rss_mib", "saved_weight_bytes"]

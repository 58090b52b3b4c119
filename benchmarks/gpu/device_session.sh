#!/usr/bin/env bash
# Phases and their issues: qlora -> issue 22 (QLoRA-style step, qlora_step.py); serving -> issue 20 (a random ~1B
# LLaMA in bf16: merged-switch latency and 8-adapter mixed batches, SparseMask against LoRA, serving.py);
# kernels -> issues 8 and 22 (the ~1B bf16 training-step table, re-measured beside qlora, then the quick kernel
# table); tests -> issue 8 (CUDA kernel tests); evidence -> issue 11 (claims 1 and 4 in parallel shards until the
# budget is spent).
#
# One call on a lent GPU machine: install, then the phases asked for, in the order above, each under a time limit cut
# from what is left of the budget (the seconds of the whole call, install included), so the call ends inside it.
# Resumable across calls for evidence: the results file carried in (benchmarks/evidence/gpu.jsonl) is copied to $OUT
# and extended there.
#
# Here first: `python benchmarks/gpu/prepare_wheels.py` (peft 0.21.2, and bitsandbytes 0.50.2 cut to its CPU and
# CUDA 13 libraries, into .whl/), and for evidence `python benchmarks/gpu/prepare_evidence.py` (.gpu/: MiniLM in fp16
# and the GLUE TSVs packed; the qlora and kernels models are random). Then, from the repository root on the device
# machine, with .whl carried (and .gpu for evidence):
#
#   bash benchmarks/gpu/device_session.sh                # qlora,serving,kernels in 540 s: the run tool's timeout_s 600
#   bash benchmarks/gpu/device_session.sh qlora 240      # qlora alone, a rerun on the warm machine (timeout_s 300)
#   bash benchmarks/gpu/device_session.sh evidence 240   # the evidence rows still to run (2026-12-06: LoRA at dropout 0,
#                                                        # about 17 GPU-minutes in 12 shards; carry .whl and .gpu)
#
# Arguments: the phases to run (default qlora,serving,kernels), the seconds this call may take in all (default 540), the
# number of evidence shards (default 12). DRY_RUN=1 checks the logic on a CPU: no install, qlora_step.py --tiny, the
# GPU-only commands echoed. At most 8 files come back from $OUT; the phases write these 9: machine.txt,
# session.log (everything printed), <gpu>-qlora-step.md, <gpu>-serving.md, <gpu>-train-step.md,
# <gpu>-kernels-quick.md, cuda-tests.txt, gpu.jsonl, evidence.log: run tests or evidence without serving (every table
# is also printed into session.log).
set -u -o pipefail
phases=",${1:-qlora,serving,kernels},"
budget=${2:-540}
shards=${3:-12}
dry=${DRY_RUN:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # the log complete before the call returns

# limit CAP: the seconds a phase may run: CAP, or what is left of the budget less 20 s for what follows it.
limit() { local rest=$((budget - SECONDS - 20)); echo $((rest < $1 ? rest : $1)); }
# gpu COMMAND...: run a command that needs the GPU (DRY_RUN: show it).
gpu() { if [[ -n $dry ]]; then echo "dry run: $*"; else "$@"; fi; }

if [[ -z $dry ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl ||
    { echo "no wheels installed from .whl: run benchmarks/gpu/prepare_wheels.py here and carry .whl"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null ||
    exit 1
  export PYTHONPATH=/tmp/site
fi
{
  gpu nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu,clocks.sm --format=csv
  python3 -P - <<'PY'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("triton", "transformers", "peft", "bitsandbytes", "peft_sparse"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # the phases that need it then fail; say why here
        print(name, "not importable:", error)
PY
} 2>&1 | tee "$OUT/machine.txt"
# the GPU's short name for the output files (h100, h200...): a call without a kind may get either
gpu_name=$(gpu nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
tag=$(grep -o -i -E 'gh200|[a-z]?[0-9]{3,4}' <<<"${gpu_name#NVIDIA }" | head -n 1 | tr 'A-Z' 'a-z')
[[ -n $dry ]] && tag=dry-run
tag=${tag:-gpu}

if [[ $phases == *,qlora,* ]]; then
  t=$(limit 240)
  if ((t < 60)); then echo "qlora: skipped, $t s left"; else
    echo "== qlora ($t s at most)"
    timeout "$t" python3 benchmarks/gpu/qlora_step.py ${dry:+--tiny} --out "$OUT/$tag-qlora-step.md"
    echo "qlora: exit $?, call at $SECONDS s"
  fi
fi

if [[ $phases == *,serving,* ]]; then
  t=$(limit 180)
  if ((t < 60)); then echo "serving: skipped, $t s left"; else
    echo "== serving ($t s at most)"
    # DRY_RUN: the tiny LLaMA on the CPU, the same phases
    if [[ -n $dry ]]; then how=(--model tiny --device cpu --bases fp32 --repeats 2 --warmup 0)
    else how=(--model llama-1b --layers 8 --device cuda --bases bf16 --repeats 10 --warmup 2); fi
    timeout "$t" python3 benchmarks/serving.py "${how[@]}" --phases switch,mixed --adapter-counts 1,8 --batch-size 16 --length 256 --out-dir /tmp/serving \
      && cp /tmp/serving/serving.md "$OUT/$tag-serving.md"
    echo "serving: exit $?, call at $SECONDS s"
  fi
fi

if [[ $phases == *,kernels,* ]]; then
  t=$(limit 200)
  if ((t < 60)); then echo "kernels (training step): skipped, $t s left"; else
    echo "== kernels: the ~1B training step ($t s at most)"
    gpu timeout "$t" python3 benchmarks/sparse_kernels.py --no-kernels --out "$OUT/$tag-train-step.md"
    echo "kernels (training step): exit $?, call at $SECONDS s"
  fi
  t=$(limit 150)
  if ((t < 60)); then echo "kernels (quick table): skipped, $t s left"; else
    echo "== kernels: the quick kernel table ($t s at most)"
    gpu timeout "$t" python3 benchmarks/sparse_kernels.py --no-train --quick --out "$OUT/$tag-kernels-quick.md"
    echo "kernels (quick table): exit $?, call at $SECONDS s"
  fi
fi

if [[ $phases == *,tests,* ]]; then
  # -P: the repository root must not shadow the installed package (peft_sparse.kernels lives in kernels/).
  # Only the CUDA tests (the interpreter suite is CI's). The whole file did not finish within 9 minutes here on
  # 2026-11-23, output unrecorded; --durations says which test costs what. tee, not tail: a command stopped at
  # its limit still leaves what the tests printed.
  t=$(limit 300)
  if ((t < 60)); then echo "tests: skipped, $t s left"; else
    echo "== tests ($t s at most)"
    gpu timeout "$t" python3 -P -m pytest -v --durations=10 -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 \
      | tee "$OUT/cuda-tests.txt" | tail -n 25
  fi
fi

if [[ $phases == *,evidence,* ]] && ((budget - SECONDS < 150)); then
  echo "evidence: skipped, $((budget - SECONDS)) s left"
elif [[ $phases == *,evidence,* ]]; then
  [[ -f benchmarks/evidence/gpu.jsonl ]] && cp benchmarks/evidence/gpu.jsonl "$OUT/gpu.jsonl"
  glue=.gpu/glue  # prepare_evidence.py packs the GLUE folders into .gpu/glue.tar.gz (the call's 64 MiB)
  if [[ -f .gpu/glue.tar.gz ]]; then mkdir -p /tmp/gpu-data && tar xzf .gpu/glue.tar.gz -C /tmp/gpu-data && glue=/tmp/gpu-data/glue; fi
  # start no run in the last 90 s; a run in flight then still has time to finish
  minutes=$(python3 -c "print(max(0.2, ($budget - $SECONDS - 90) / 60))")
  echo "== evidence: $shards shards, start no run after $minutes min"
  pids=()
  for ((s = 0; s < shards; s++)); do
    gpu timeout $((budget - SECONDS - 10)) python3 benchmarks/evidence.py --claims 1,4 --seeds 5 --device cuda \
      --model .gpu/minilm --glue-dir "$glue" --results "$OUT/gpu.jsonl" --shard "$s/$shards" \
      --deadline-min "$minutes" > "/tmp/shard$s.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"  # the shards only: a bare wait would also wait for the log's tee, which ends with this script
  for ((s = 0; s < shards; s++)); do echo "== shard $s"; grep -E '^\[|deadline|Error|error' "/tmp/shard$s.log" | tail -n 40; done > "$OUT/evidence.log"
  [[ -f $OUT/gpu.jsonl ]] && grep -c . "$OUT/gpu.jsonl"
  tail -n 30 "$OUT/evidence.log"
fi

# the tables last, so that the reply's output tail holds them
for table in "$OUT/$tag-qlora-step.md" "$OUT/$tag-serving.md" "$OUT/$tag-train-step.md"; do
  [[ -f $table ]] && { echo "== $table"; cat "$table"; }
done
echo "call took $SECONDS s"

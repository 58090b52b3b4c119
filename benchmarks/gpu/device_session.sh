#!/usr/bin/env bash
# One call on a lent GPU machine: install, the CUDA kernel tests, the training-step table, then the evidence runs
# of claims 1 and 4 (issue 11) in parallel shards until the time budget is spent. Resumable across calls: the
# results file carried in (benchmarks/evidence/gpu.jsonl) is copied to $OUT and extended there.
#
# From the repository root on the device machine, with .whl (the peft 0.21.2 wheel) and .gpu (MiniLM in fp16
# and the GLUE TSVs) carried beside the working tree:
#
#   bash benchmarks/gpu/device_session.sh tests,kernels,evidence 560 12
#
# Arguments: the phases to run, the seconds this call may take in all, the number of evidence shards.
# At most 8 files come back from $OUT, so shard logs are gathered into one.
set -u -o pipefail
phases=",${1:-tests,kernels,evidence},"
budget=${2:-560}
shards=${3:-12}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/peft-0.21.2-py3-none-any.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . >/dev/null || exit 1
export PYTHONPATH=/tmp/site
{
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu,clocks.sm --format=csv
  python3 -P -c "import torch, triton, transformers, peft, peft_sparse; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'peft_sparse', peft_sparse.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

if [[ $phases == *,tests,* ]]; then
  # -P: the repository root must not shadow the installed package (peft_sparse.kernels lives in kernels/).
  # Only the CUDA tests (the interpreter suite is CI's). The whole file did not finish within 9 minutes here on
  # 2026-11-23, output unrecorded; --durations says which test costs what. tee, not tail: a command stopped at
  # its limit still leaves what the tests printed.
  timeout 300 python3 -P -m pytest -v --durations=10 -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tee "$OUT/cuda-tests.txt" | tail -n 25
fi

if [[ $phases == *,kernels,* ]]; then
  python3 benchmarks/sparse_kernels.py --no-kernels --out "$OUT/h100-train-step-after.md" 2>&1 | tail -n 20
  python3 benchmarks/sparse_kernels.py --no-train --quick --out "$OUT/h100-kernels-quick-after.md" 2>&1 | tail -n 5
fi

if [[ $phases == *,evidence,* ]]; then
  [[ -f benchmarks/evidence/gpu.jsonl ]] && cp benchmarks/evidence/gpu.jsonl "$OUT/gpu.jsonl"
  # start no run in the last 90 s; a run in flight then still has time to finish
  minutes=$(python3 -c "print(max(0.2, ($budget - $SECONDS - 90) / 60))")
  echo "evidence: $shards shards, start no run after $minutes min"
  for ((s = 0; s < shards; s++)); do
    timeout $((budget - SECONDS - 10)) python3 benchmarks/evidence.py --claims 1,4 --seeds 5 --device cuda \
      --model .gpu/minilm --glue-dir .gpu/glue --results "$OUT/gpu.jsonl" --shard "$s/$shards" \
      --deadline-min "$minutes" > "/tmp/shard$s.log" 2>&1 &
  done
  wait
  for ((s = 0; s < shards; s++)); do echo "== shard $s"; grep -E '^\[|deadline|Error|error' "/tmp/shard$s.log" | tail -n 40; done > "$OUT/evidence.log"
  grep -c . "$OUT/gpu.jsonl"
  tail -n 30 "$OUT/evidence.log"
fi
echo "call took $SECONDS s"

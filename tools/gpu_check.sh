#!/usr/bin/env bash
# The prepared check for a lent GPU (bash reproduce.sh gpu-check), under 8 minutes:
# environment, CUDA-only tests, kernel benchmark, WRN-28-10 ERM vs MOLERE step throughput at batch 128
# (bf16 autocast, channels_last), eager and under --compile, and 200 MOLERE steps checked
# for NaN. One table last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# QUICK=1 (gpu-evidence): the same checks with fewer steps, under about 3 minutes
if [ "${QUICK:-0}" = 1 ]; then T=(40 35 50 65); STEPS=(20 1 50); else T=(80 100 170 120); STEPS=(30 2 200); fi
log=$(mktemp)
echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$log" | sed 's/^/gpu: /'
"$PY" -c "import torch, triton; print(f'SUMMARY versions: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.version.cuda}')" | tee -a "$log"
echo "== CUDA-only tests: the kernel in a CUDA graph; the compiled meta-gradient (dropout replayed) vs the reference"
if "$PY" -c "import pytest" 2>/dev/null; then
  result=$(timeout ${T[0]} "$PY" -m pytest -q -p no:cacheprovider tests -k cuda 2>&1 | tee /dev/stderr | tail -1)
  echo "SUMMARY CUDA-only tests: ${result:-no result (timed out?)}" | tee -a "$log"
else
  echo "SUMMARY CUDA-only tests: not run (no pytest for $PY)" | tee -a "$log"
fi
echo "== kernel benchmark"
timeout ${T[1]} "$PY" -m tools.kernel_bench 2>&1 | tee -a "$log"
echo "== WRN-28-10 step throughput, batch 128, bf16, channels_last; 200 MOLERE steps NaN check"
timeout ${T[2]} "$PY" -m tools.bench --depth 28 --width 10 --batch-size 128 --steps ${STEPS[0]} --warmup 5 --repeats ${STEPS[1]} \
  --device cuda --check-nan ${STEPS[2]} --profile 2>&1 | tee -a "$log"
echo "== the same under --compile (classifier, look-ahead and JVP compiled; compile time in the warm-up)"
timeout ${T[3]} "$PY" -m tools.bench --depth 28 --width 10 --batch-size 128 --steps ${STEPS[0]} --warmup 10 --repeats 1 --device cuda \
  --compile --profile 2>&1 | tee -a "$log"
echo
echo "| check | result |"
echo "|---|---|"
echo "| card | $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1) |"
grep -h "^SUMMARY" "$log" | sed 's/^SUMMARY \([^:]*\): \(.*\)$/| \1 | \2 |/'
grep -h "^| erm\|^| molere[ ,]" "$log" | sed 's/^| \([a-z, A-Z]*[a-zA-Z]\) *| \([^|]*\) | \([^|]*\) |.*$/| \1 step: s\/step, images\/s | \2 \/ \3 |/'
grep -h " ms |$" "$log" || true
grep -h "parameters finite\|time ratio" "$log" | sed 's/^\(.*\): \(.*\)$/| \1 | \2 |/'
rm -f "$log"

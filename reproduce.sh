#!/usr/bin/env bash
# One entry point for everything the README promises. Extra arguments pass through to molere.py.
#   bash reproduce.sh set-up          make .venv and install requirements.txt (every verb does it on first use)
#   bash reproduce.sh [demo]          every method on the built-in synthetic set, CPU, about 3 minutes, then the table
#   bash reproduce.sh test            the whole test suite, as CI runs it (about 10 minutes on 2 cores)
#   bash reproduce.sh cifar100        the paper's CIFAR-100 / WRN-28-10 experiment (one GPU; --gpus N spreads its
#                                     18 runs over N GPUs; --force runs it without a GPU)
#   bash reproduce.sh cifar10         the same recipe on CIFAR-10
#   bash reproduce.sh cifar100-skew   the paper's Table 2: class skew 200/50/10/1, ResNet-32; MOLERE, MW-Net, ERM (GPU)
#   bash reproduce.sh folder-demo     MOLERE on an image folder with a torchvision backbone (a tiny generated one, CPU)
#   bash reproduce.sh gpu-check       on a GPU: environment, CUDA-only tests, kernel bench, WRN-28-10 throughput
#   bash reproduce.sh gpu-evidence [anchor|paper-mini]   one GPU call under 9 minutes: gpu-check (capped), then the
#                                     noisy-label anchor (or the paper's balanced comparison) at GPU scale on the
#                                     packed CIFAR-10 subset (python -m tools.pack first); COPY_TO=DIR copies it back
#   bash reproduce.sh bench           kernel benchmark, then ERM vs MOLERE step time (last line: the ratio)
#   bash reproduce.sh study list      every study of results/: what it asks, runs recorded of planned
#   bash reproduce.sh study NAME      rerun (or continue) one study from its results/NAME/study.json, then its tables
# Data: DATA_ROOT (default data/) holds cifar-10-batches-py/ or cifar-100-python/.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PY=${PY:-$VENV/bin/python}
DATA_ROOT=${DATA_ROOT:-data}
export DATA_ROOT
VERBS="set-up, demo, test, cifar100, cifar10, cifar100-skew, folder-demo, gpu-check, gpu-evidence, bench, study list, study NAME"

# PY=python3 (a GPU machine's own Python, say) is used as it is; the default is the project's .venv.
if [ "$PY" = "$VENV/bin/python" ] && ! "$PY" -c "import torch, torchvision, triton, numpy, pytest, matplotlib" 2>/dev/null; then
  echo "setting up $VENV (first use; torch is large, this takes a few minutes) ..."
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r requirements.txt
fi

cmd=${1:-demo}
[ $# -gt 0 ] && shift
ARGS=("$@")
FORCE=0 GPUS=0
take_flags() {  # --force and --gpus N are reproduce.sh's own; the rest goes to molere.py
  local kept=()
  while [ ${#ARGS[@]} -gt 0 ]; do
    case "${ARGS[0]}" in
      --force) FORCE=1; ARGS=("${ARGS[@]:1}") ;;
      --gpus) GPUS=${ARGS[1]:-}; ARGS=("${ARGS[@]:2}")
              if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
                echo "reproduce.sh: --gpus takes a number of GPUs (1, 2, ...), got '$GPUS'" >&2; exit 2; fi ;;
      *) kept+=("${ARGS[0]}"); ARGS=("${ARGS[@]:1}") ;;
    esac
  done
  ARGS=("${kept[@]+"${kept[@]}"}")
  if [ $FORCE = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "reproduce.sh $cmd: this is a GPU experiment (hours on one GPU) and torch sees no GPU here; pass --force to run it anyway" >&2
    exit 2
  fi
}
launch() {  # one process, or the plan's runs spread over --gpus N GPUs
  if [ "$GPUS" != 0 ]; then "$PY" -m tools.schedule --workers "$GPUS" -- "$@"; else "$PY" molere.py "$@"; fi
}

case "$cmd" in
  set-up)
    echo "$VENV is ready: $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')" ;;
  demo)
    exec "$PY" molere.py --dataset synthetic --train-subset 800 --depth 10 --width 1 --dropout 0 \
      --epochs 5 --batch-size 50 --warmup-epochs 2 --resplit-every 1 --eval-every 0 --device cpu \
      --method all --out runs/demo --resume "$@" ;;
  test)
    exec "$PY" -m pytest -q tests "$@" ;;
  cifar100|cifar10)
    take_flags
    launch --dataset "$cmd" --data-root "$DATA_ROOT" --method all --seeds 0 1 2 --out "runs/$cmd" --resume \
      "${ARGS[@]+"${ARGS[@]}"}" ;;
  cifar100-skew)  # the paper's Table 2: class skew 200/50/10/1, MOLERE against MW-Net and ERM, ResNet-32
    take_flags
    for rho in 200 50 10 1; do
      launch --dataset cifar100 --data-root "$DATA_ROOT" --arch resnet32 --imbalance "$rho" --method erm,mwn,molere \
        --seeds 0 1 2 --out "runs/cifar100-skew-$rho" --resume "${ARGS[@]+"${ARGS[@]}"}"
    done ;;
  folder-demo)  # docs/usage.md: your own image folder and backbone, on a tiny generated folder (CPU, about a minute)
    "$PY" -m tools.toy_folder runs/folder-demo
    exec "$PY" molere.py --dataset folder:runs/folder-demo/pets --meta-set folder:runs/folder-demo/hard \
      --weights runs/folder-demo/resnet18.pt \
      --image-size 32 --arch tv:resnet18 --lr 0.01 --noise instance:0.3 --method erm,lrw-random,molere --epochs 2 \
      --warmup-epochs 1 --batch-size 6 --delta 0.25 --workers 2 \
      --out runs/folder-demo/out --resume "$@" ;;
  gpu-check)
    exec bash tools/gpu_check.sh ;;
  gpu-evidence)  # one device call, under 9 minutes: gpu-check's measurements (capped), then a study at GPU scale
    study=anchor
    case "${1:-}" in anchor|paper-mini) study=$1; shift ;; esac
    out=${EVIDENCE_DIR:-runs/gpu-$([ "$study" = anchor ] && echo evidence || echo paper-mini)}
    mkdir -p "$out"
    start=$(date +%s)
    if [ "$study" = anchor ] && "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      QUICK=1 timeout 200 bash tools/gpu_check.sh > "$out/gpu_check.log" 2>&1; tail -25 "$out/gpu_check.log"
    fi
    "$PY" -m tools.gpu_evidence "$study" --out "$out" --deadline $(( 430 - $(date +%s) + start )) "$@" || status=$?
    if [ -n "${COPY_TO:-}" ]; then cp "$out"/{table.md,plan.json,results.jsonl,run.log,gpu_check.log} "$COPY_TO"/ 2>/dev/null || true; fi
    exit ${status:-0} ;;
  bench)
    "$PY" -m tools.kernel_bench
    exec "$PY" -m tools.bench "$@" ;;
  study)
    if [ "${1:-list}" = list ]; then exec "$PY" -m tools.study list; fi
    exec "$PY" -m tools.study run "$@" ;;
  *)
    echo "reproduce.sh: unknown command '$cmd'; the commands are: $VERBS" >&2
    exit 2 ;;
esac

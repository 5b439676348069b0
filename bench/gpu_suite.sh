#!/usr/bin/env bash
# Every GPU check and benchmark of sslscale in one call, on a CUDA machine; results in OUT_DIR.
#
#   bench/gpu_suite.sh OUT_DIR            # on the GPU machine, from the repository root
#   bench/gpu_suite.sh --wheels DIR       # on a machine with a package index: fetch the wheels
#                                         # the GPU image lacks (Python 3.12, manylinux) into DIR
#
# The GPU image (../shared/notes/gpu-machine.md) has torch, triton and transformers but not
# omegaconf, kornia, deepspeed, webdataset or wandb, and no network: bring them as wheels in
# $WHEELS (default .whl/); they are installed with --no-deps into a private target folder put on
# PYTHONPATH, never replacing the image's torch. Writes OUT_DIR/<step>.log for each step,
# OUT_DIR/steps.json (bench/gpu_steps.py) and OUT_DIR/summary.txt (one exit status per step).
# Exits non-zero if any step failed; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
# sslscale's imports (objectives: omegaconf, kornia, webdataset) and the training path's
# (tests/gpu: deepspeed and its small dependencies, rich, wandb); versions as in constraints/venv.
NEEDED="omegaconf==2.4.0 kornia==0.9.0 kornia-rs==0.2.0 webdataset==1.0.2 braceexpand==0.1.7
  rich==15.0.0 markdown-it-py mdurl hjson py-cpuinfo ninja msgpack einops"

if [ "${1:-}" = "--wheels" ]; then
  dest=${2:?usage: bench/gpu_suite.sh --wheels DIR}
  mkdir -p "$dest"
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d "$dest" $NEEDED || exit 1
  # wandb with its dependency tree (they shadow the image's copies only on this PYTHONPATH)
  "$PY" -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d "$dest" wandb==0.31.0 || exit 1
  "$PY" -m pip wheel --no-deps -w "$dest" deepspeed==0.19.8  # pure-Python wheel, ops JIT-built
  exit $?
fi

OUT=${1:?usage: bench/gpu_suite.sh OUT_DIR   (or --wheels DIR)}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
if ! "$PY" -c "import omegaconf, kornia" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/sslscale-site.XXXX)
    "$PY" -m pip install -q --no-index --no-deps --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "omegaconf/kornia missing and no wheels in $WHEELS: run bench/gpu_suite.sh --wheels $WHEELS" \
      "where a package index is reachable, and bring the folder" | tee -a "$OUT/summary.txt"
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton} HF_HUB_OFFLINE=1 WANDB_MODE=offline

failed=0
step() {  # step NAME CMD...: run, log to OUT/NAME.log, record the exit status
  local name=$1; shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc" >> "$OUT/summary.txt"
  [ "$rc" = 0 ] || failed=1
}

step environment bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers, sys; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, \"transformers\", transformers.__version__); \
print(torch.cuda.get_device_name())'"
step kernel_tests "$PY" -m pytest -q -rs tests/unit/test_infonce.py tests/unit/test_flops.py
step gpu_tests "$PY" -m pytest -q -rs tests/gpu
step infonce_bench "$PY" bench/infonce.py
step steps_bench "$PY" bench/gpu_steps.py --json "$OUT/steps.json"
step steps_bench_compiled "$PY" bench/gpu_steps.py --compile --json "$OUT/steps_compiled.json"
if [ -f bench/mlm_step.py ]; then
  step mlm_step_bench "$PY" bench/mlm_step.py
fi
echo "== summary ($OUT/summary.txt)"
cat "$OUT/summary.txt"
exit $failed

#!/usr/bin/env bash
# The GPU checks of moekit, run once per GPU session from anywhere in the checkout:
#
#     bash benchmarks/gpu_check.sh              # everything
#     bash benchmarks/gpu_check.sh tests sync   # some parts, in this order: tests sync suite profile
#
# Each part has a time limit (tests 4, sync 2, suite 7, profile 2 minutes; most of it is torch.compile);
# where one command may run at most 10 minutes, run "tests sync" and "suite profile" as two commands.
#
# 1. tests:   the CUDA tests (pytest -m gpu) apart from the host-sync ones (fast vs reference dispatch,
#             determinism, torch.compile against eager);
# 2. sync:    the host-sync check: one bf16 forward+backward per router setup under
#             torch.cuda.set_sync_debug_mode("error"), one line per case (tests/layers/test_cuda_layer.py);
# 3. suite:   benchmarks/moe_layer.py --gpu-suite: the five configurations in bf16, dense limit, moekit eager and
#             compiled, transformers' grouped_mm block, TFLOP/s, m/p, peak memory per variant;
# 4. profile: benchmarks/moe_layer.py --profile: the top CUDA kernels of moekit and transformers at E=256 k=8.
#
# Each part's output goes to $OUT/<part>.txt ($OUT when set, else runs/gpu_check/, ignored by git) and to the terminal;
# the exit status is non-zero when a part failed. WHEELS=<dir>: install the wheels in it first (into a
# temporary directory put first on PYTHONPATH), e.g. the transformers release the benchmark compares against
# when the machine has an older one. DEVICE=cpu runs the same parts at toy sizes on CPU (checks the script).
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
parts=${*:-tests sync suite profile}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}   # deterministic cuBLAS (determinism test)

if [ -n "${WHEELS:-}" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  site=$(mktemp -d)
  "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS"/*.whl && export PYTHONPATH=$site:$PYTHONPATH
fi

status=0
run() {   # run NAME SECONDS COMMAND...: tee the output to $out/NAME.txt, remember a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "^USDT" | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "!! $name: exit status $rc$([ "$rc" -eq 124 ] && echo " (ran past ${limit}s)")" | tee -a "$out/$name.txt"
    status=1
  fi
}

{
  [ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c "import torch, moekit; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'moekit', moekit.__file__)"
  "$py" -c "import transformers; print('transformers', transformers.__version__)" 2>/dev/null || echo "transformers: not installed"
} 2>&1 | tee "$out/environment.txt"

if [ "$device" = cuda ]; then
  suite=(--gpu-suite --repeats 10)
  profile=(--device cuda --dtype bfloat16 --tokens 16384 --top-k 8 --configs 256:2048:512)
else
  suite=(--gpu-suite --device cpu --tiny --repeats 2 --compile-backend aot_eager)
  profile=(--device cpu --dtype bfloat16 --tokens 256 --top-k 2 --configs 8:64:128 --threads 1)
fi

for part in $parts; do
  case $part in
    tests)   run tests 240 "$py" -m pytest -q -p no:cacheprovider -m gpu -k "not no_host_sync" tests ;;
    sync)    run sync 120 "$py" -m pytest -v -p no:cacheprovider -m gpu -k no_host_sync tests/layers/test_cuda_layer.py ;;
    suite)   run suite 420 "$py" benchmarks/moe_layer.py "${suite[@]}" ;;
    profile) run profile 120 "$py" benchmarks/moe_layer.py --profile --profile-steps 3 --profile-top 15 "${profile[@]}" ;;
    *) echo "unknown part: $part (choose from: tests sync suite profile)" >&2; exit 2 ;;
  esac
done
echo "outputs in $out"
exit $status

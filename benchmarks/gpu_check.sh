#!/usr/bin/env bash
# The GPU checks of issue 13 in one call, for a machine lent with a CUDA GPU (about 8 minutes on an H200):
#   1. the CUDA-only tests (compile="reduce-overhead" and compile="cuda-graph" replay CUDA graphs and train the
#      eager numbers; the counter noise is the same on the GPU as on the CPU; DTP batches by default there);
#   2. benchmarks/bench_step.py: ms per Trainer step of BP, PC (T = 5 parallel), DTP (counter and host noise) at
#      widths 512 and 2048, K = 1 and 16, eager, and at width 512, K = 1, compiled (reduce-overhead) and captured
#      without a compiler (cuda-graph);
#   3. fig1: the paper-budget fig1-right sweep, timed, with the options meant to bring it under 90 s (FIG1_ARGS,
#      default "--compile cuda-graph --dtype tf32"; the eager float32 run took 291 s on an H200,
#      docs/PERFORMANCE.md).
#   4. solvers (issue 23): benchmarks/bench_solvers.py, PC's inference solvers on residual MLPs of depth 8, 32 and
#      128 at width 512 against BP (time per step, final relative residual): the GPU column of docs/pc.md's table.
# PARTS chooses (default "tests,step"; one command may run 10 minutes, so fig1 is best a second call:
# PARTS=fig1; PARTS=solvers another). GPU_CHECK_FIG1=1 adds fig1 to the default parts.
# Results go to $OUT (default runs/gpu-check): gpu.txt, tests.txt, step.json + step.txt, fig1.txt, solvers.txt.
# Needs FashionMNIST where MULOCAL_DATA_DIR points (the benchmarks fall back to random data and say so).
# Rehearse it on a CPU: DEVICE=cpu GPU_CHECK_QUICK=1 benchmarks/gpu_check.sh (tiny sizes, the same steps).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZES=(--widths 512,2048 --Ks 1,16 --compile reduce-overhead,cuda-graph --compile-widths 512 --compile-Ks 1 --steps 100
       --warmup 10 --repeats 3)
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && SIZES=(--widths 32 --Ks 1,2 --compile reduce-overhead,cuda-graph --steps 5 --warmup 3
                                         --repeats 1 --rules bp,dtp)
PARTS=${PARTS:-tests,step}
[ "${GPU_CHECK_FIG1:-0}" = 1 ] && PARTS="$PARTS,fig1"
part() { [[ ",$PARTS," == *",$1,"* ]]; }
t0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/gpu.txt" 2>&1
if part tests; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_compile.py tests/test_capture.py tests/test_noise.py \
    tests/test_batching.py tests/test_pooled_post.py -k "cuda or gpu" -rs > "$OUT/tests.txt" 2>&1
  echo "[gpu_check] tests done after $(( $(date +%s) - t0 )) s" >&2
fi
if part step; then
  "$PY" benchmarks/bench_step.py --device "$DEVICE" "${SIZES[@]}" --out "$OUT/step.json" > "$OUT/step.txt" 2>&1
  echo "[gpu_check] bench_step done after $(( $(date +%s) - t0 )) s" >&2
fi
if part fig1; then
  s=$(date +%s)
  read -r -a FIG1 <<< "${FIG1_ARGS:---compile cuda-graph --dtype tf32}"
  BUDGET=paper; [ "${GPU_CHECK_QUICK:-0}" = 1 ] && BUDGET=tiny
  "$PY" -m mulocal reproduce fig1-right --budget "$BUDGET" --device "$DEVICE" "${FIG1[@]}" --workers 0 --out "$OUT/fig1" \
    > "$OUT/fig1.txt" 2>&1
  echo "fig1-right $BUDGET budget (${FIG1[*]}): $(( $(date +%s) - s )) s" >> "$OUT/fig1.txt"
fi
if part solvers; then
  SOLV=(--depths 8,32,128 --width 512 --steps 40 --warmup 5 --repeats 3)
  [ "${GPU_CHECK_QUICK:-0}" = 1 ] && SOLV=(--depths 4 --width 32 --steps 3 --warmup 1 --repeats 1)
  "$PY" benchmarks/bench_solvers.py --device "$DEVICE" "${SOLV[@]}" > "$OUT/solvers.txt" 2>&1
  echo "[gpu_check] bench_solvers done after $(( $(date +%s) - t0 )) s" >&2
fi
for f in step.txt tests.txt fig1.txt solvers.txt; do [ -f "$OUT/$f" ] && tail -n 40 "$OUT/$f"; done
exit 0

#!/usr/bin/env bash
# Every check that needs a GPU, in one command, sized for one `device` call: a session is lent
# 15 minutes of device time in all (the machine's start included) and one command runs at most
# 10 minutes, so everything runs in ONE call under a global deadline (DEADLINE seconds, default
# 480), most important first, each step under its own time limit so that a slow fallback or a
# hang costs that step and not the rest:
#   1. build for sm_90 with all cores (CUDA, cuBLAS, cuDNN and NCCL when present); version;
#   2. the CUDA kernel and model tests against their CPU references (tests/test_cuda_*.cpp),
#      the multi-rank one (CudaModel.ParallelLayouts*, mpirun inside) later, in step 6;
#   3. `decotron bench train --all-variants` on configs/deco-0.1b.yaml (DECO sparse,
#      dense-masked, dense twin) and, when the peer script was carried in (.peer/torch_deco.py,
#      copied from ../shared/peers/), the PyTorch peer on the same card (dense, then DECO): the
#      table of docs/PERFORMANCE.md (scripts/compare_bench_peer.py: ratios, targets met or missed);
#   4. `decotron bench kernels` (each kernel against the card's ceilings, measured in the run);
#   5. tiny DECO, 60 steps, on the GPU (sparse and dense-masked experts, fp32 and bf16) and on
#      the CPU (fp32): the loss curves side by side (the GPU runs must track the CPU run);
#   6. the multi-rank CUDA test, and two ranks sharing the GPU through the MPI backend
#      (parallel.backend: mpi) against one rank: DP2, TP2, EP2, TP2 + SP;
#   7. DECO sparse with DECOTRON_EXPERT_GATHER=copy (the expert rows copied for cuBLAS), against
#      step 3's fused-gather run.
# A step that would start with less than 15 s left is skipped and says so. The device tool
# brings back at most 8 files from $OUT, so the logs are written to $WORK (default
# gpu-checks-work/) and packed into $OUT/gpu-checks.tar.gz after every step (a call stopped at
# its limit still returns what had finished), beside $OUT/summary.txt.
# Usage (device tool): here, `mkdir -p .peer && cp ../shared/peers/torch_deco.py .peer/` and
# `scripts/fetch_cudnn_frontend.sh` (both git-ignored, so carry [".peer",
# "third_party/cudnn-frontend"]: the device machine has no network); then one call,
#   run(command="OUT=$OUT scripts/gpu_checks.sh", timeout_s=560, carry=[...]).
# Arguments: [PHASES] [STEPS]; PHASES a comma list of build, tests, bench, kernels, tiny,
# parallel (default all, in that order), STEPS the timed steps of bench train (default 10).
# DECOTRON_ATTENTION=reference in the environment benchmarks the reference attention kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
WORK=${WORK:-gpu-checks-work}
PHASES=${1:-build,tests,bench,kernels,tiny,parallel}
STEPS=${2:-10}
DEADLINE=${DEADLINE:-480}
BUILD_DIR=${BUILD_DIR:-build-gpu}
B=$BUILD_DIR/decotron
export OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK"/runs
: > "$WORK/summary.txt"
want() { [[ ",$PHASES," == *",$1,"* ]]; }
pack() {
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar -czf "$OUT/gpu-checks.tar.gz.tmp" -C "$WORK" . && mv "$OUT/gpu-checks.tar.gz.tmp" "$OUT/gpu-checks.tar.gz"
}
step() {  # name, limit in seconds, command...: runs it, logs to $WORK/name.log, records the exit status
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then
    echo "== $name: skipped, ${left} s left of DEADLINE=$DEADLINE" | tee -a "$WORK/summary.txt"
    return 0
  fi
  ((limit > left)) && limit=$left
  echo "== $name (limit $limit s): $*" | tee -a "$WORK/summary.txt"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" (stopped at its $limit s limit)"
  echo "   exit $rc in $((SECONDS - t0)) s$note; $((DEADLINE - SECONDS)) s left" | tee -a "$WORK/summary.txt"
  tail -n 15 "$WORK/$name.log" >> "$WORK/summary.txt"
  pack
  return 0
}
# compare A B: the largest relative lm_loss difference of two metrics.jsonl over their common steps
compare="python3 scripts/compare_loss_curves.py"

nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
want build && step build 240 env BUILD_DIR="$BUILD_DIR" DECOTRON_CUDA=ON scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90
step version 10 "$B" version  # which attention paths (cuDNN?) and backends this build has
want tests && step cuda-tests 100 "$BUILD_DIR/decotron_tests" --gtest_filter='Cuda*:-CudaModel.ParallelLayouts*'

if want bench; then
  step bench-0.1b 120 "$B" bench train --config configs/deco-0.1b.yaml --all-variants --steps "$STEPS" --warmup 3
  if [[ -f .peer/torch_deco.py ]]; then
    # dense twin first, then DECO: one JSON line each (two torch.compile warm-ups)
    step peer-0.1b 200 python3 .peer/torch_deco.py --mode train --shape 0.1b --steps "$STEPS"
    # the table of docs/PERFORMANCE.md: ratios to the peer and the targets, met or missed
    step ratios-0.1b 10 python3 scripts/compare_bench_peer.py "$WORK/bench-0.1b.log" "$WORK/peer-0.1b.log"
  fi
fi
want kernels && step bench-kernels-0.1b 60 "$B" bench kernels --config configs/deco-0.1b.yaml --iters 20

TINY="--config configs/tiny-deco.yaml --synthetic-data --set train.iters=60 --set train.decay_iters=20 --set log.interval=5 --set train.eval_interval=0"
R=$WORK/runs
if want tiny; then
  step tiny-cpu 40 "$B" train $TINY --run-dir "$R/cpu"
  step tiny-gpu-sparse 30 "$B" train $TINY --set train.device=cuda --run-dir "$R/gpu-sparse"
  step tiny-gpu-dense 30 "$B" train $TINY --set train.device=cuda --set model.expert_compute=dense --run-dir "$R/gpu-dense"
  step tiny-gpu-bf16 30 "$B" train $TINY --set train.device=cuda --set train.dtype=bf16 --run-dir "$R/gpu-bf16"
  step tiny-gpu-bf16-dense 30 "$B" train $TINY --set train.device=cuda --set train.dtype=bf16 \
    --set model.expert_compute=dense --run-dir "$R/gpu-bf16-dense"
  for v in sparse dense bf16 bf16-dense; do
    step tiny-compare-$v 10 $compare "$R/gpu-$v/metrics.jsonl" "$R/cpu/metrics.jsonl"
  done
fi
if want parallel; then
  step cuda-tests-multirank 60 "$BUILD_DIR/decotron_tests" --gtest_filter='CudaModel.ParallelLayouts*'
  [[ -f "$R/gpu-sparse/metrics.jsonl" ]] ||
    step tiny-gpu-sparse 30 "$B" train $TINY --set train.device=cuda --run-dir "$R/gpu-sparse"
  MPI="mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS -np 2"
  for L in "dp2:" "tp2:--set parallel.tensor=2" "ep2:--set parallel.expert=2" \
           "tp2-sp:--set parallel.tensor=2 --set parallel.sequence=true"; do
    name=${L%%:*}
    step tiny-gpu-$name-mpi 40 $MPI "$B" train $TINY --set train.device=cuda --set parallel.backend=mpi ${L#*:} \
      --run-dir "$R/gpu-$name"
    step tiny-compare-$name 10 $compare "$R/gpu-$name/metrics.jsonl" "$R/gpu-sparse/metrics.jsonl"
  done
fi
# Last, if time is left: DECO sparse end to end with the expert rows copied for cuBLAS (the path
# before the fused-gather GEMMs), beside bench-0.1b's deco-sparse row.
want bench && step bench-0.1b-copy 60 env DECOTRON_EXPERT_GATHER=copy "$B" bench train --config configs/deco-0.1b.yaml \
  --steps "$STEPS" --warmup 3
pack
echo "report: $OUT/summary.txt, logs in $OUT/gpu-checks.tar.gz ($SECONDS s in all)"

#!/usr/bin/env bash
# Every check that needs a GPU, in one command, for a session that is lent one (the `device`
# tool runs one command at a time, for at most 10 minutes; pass OUT=$OUT there). Writes a
# report of each step to $OUT (default gpu-checks/) and keeps going after a failing step:
#   1. build for sm_90 with all cores (CUDA, cuBLAS, NCCL when present);
#   2. the CUDA kernel tests against their CPU references (tests/test_cuda_ops.cpp);
#   3. tiny DECO, 60 steps, on the GPU (sparse and dense-masked experts, fp32 and bf16) and on the
#      CPU (fp32): the loss curves side by side (the GPU runs must track the CPU run);
#   4. two ranks sharing the GPU through the MPI backend (parallel.backend: mpi) against one rank:
#      DP2, TP2, EP2 and TP2 + SP;
#   5. `decotron bench kernels` (each kernel against the card's ceilings) and
#      `decotron bench train --all-variants` on configs/deco-0.1b.yaml (DECO sparse, dense-masked,
#      dense twin) and, when the peer script was carried in (.peer/torch_deco.py, copied from
#      ../shared/peers/), the PyTorch peer on the same card: the table of docs/PERFORMANCE.md.
# Usage (device tool): cp ../shared/peers/torch_deco.py .peer/ and scripts/fetch_cudnn_frontend.sh
# here (both git-ignored: carry [".peer", "third_party/cudnn-frontend"]; the device machine has no
# network), then run `OUT=$OUT scripts/gpu_checks.sh [PHASES] [STEPS]`. PHASES: a comma list of
# build, tests, tiny, parallel, bench (default all of them). A device call is limited to 10
# minutes: if all of them do not fit, run `build,tests,tiny` in one call and `parallel,bench` in
# the next while the machine is warm (the build directory stays there between calls).
# DECOTRON_ATTENTION=reference in the environment benchmarks the reference attention kernel.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-checks}
PHASES=${1:-build,tests,tiny,parallel,bench}
STEPS=${2:-10}
mkdir -p "$OUT"
want() { [[ ",$PHASES," == *",$1,"* ]]; }
BUILD_DIR=${BUILD_DIR:-build-gpu}
export OPENBLAS_NUM_THREADS=1
B=$BUILD_DIR/decotron
step() {  # name, command...: runs it, logs to $OUT/name.log, records the exit status
  local name=$1
  shift
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 15 "$OUT/$name.log" >> "$OUT/summary.txt"
  return 0
}
compare() {  # two metrics.jsonl: the largest relative lm_loss difference over their common steps
  python3 - "$1" "$2" <<'EOF'
import json, sys
a, b = ([json.loads(l) for l in open(p) if '"lm_loss"' in l] for p in sys.argv[1:3])
d = max(abs(x["lm_loss"] - y["lm_loss"]) / abs(y["lm_loss"]) for x, y in zip(a, b))
print(f"{len(a)} records; largest relative lm_loss difference {d:.3e}; last {a[-1]['lm_loss']:.4f} vs {b[-1]['lm_loss']:.4f}")
EOF
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
want build && step build env BUILD_DIR="$BUILD_DIR" DECOTRON_CUDA=ON scripts/build.sh -DCMAKE_CUDA_ARCHITECTURES=90
"$B" version > "$OUT/version.txt" 2>&1  # which attention paths (cuDNN?) and backends this build has
want tests && step cuda-tests "$BUILD_DIR/decotron_tests" --gtest_filter='Cuda*'

TINY="--config configs/tiny-deco.yaml --synthetic-data --set train.iters=60 --set log.interval=5 --set train.eval_interval=0"
if want tiny; then
rm -rf "$OUT"/runs
step tiny-cpu "$B" train $TINY --run-dir "$OUT/runs/cpu"
step tiny-gpu-sparse "$B" train $TINY --set train.device=cuda --run-dir "$OUT/runs/gpu-sparse"
step tiny-gpu-dense "$B" train $TINY --set train.device=cuda --set model.expert_compute=dense --run-dir "$OUT/runs/gpu-dense"
step tiny-gpu-bf16 "$B" train $TINY --set train.device=cuda --set train.dtype=bf16 --run-dir "$OUT/runs/gpu-bf16"
step tiny-gpu-bf16-dense "$B" train $TINY --set train.device=cuda --set train.dtype=bf16 --set model.expert_compute=dense \
  --run-dir "$OUT/runs/gpu-bf16-dense"
step tiny-compare-sparse compare "$OUT/runs/gpu-sparse/metrics.jsonl" "$OUT/runs/cpu/metrics.jsonl"
step tiny-compare-dense compare "$OUT/runs/gpu-dense/metrics.jsonl" "$OUT/runs/cpu/metrics.jsonl"
step tiny-compare-bf16 compare "$OUT/runs/gpu-bf16/metrics.jsonl" "$OUT/runs/cpu/metrics.jsonl"
step tiny-compare-bf16-dense compare "$OUT/runs/gpu-bf16-dense/metrics.jsonl" "$OUT/runs/cpu/metrics.jsonl"
fi
if want parallel; then
[[ -d "$OUT/runs/gpu-sparse" ]] || step tiny-gpu-sparse "$B" train $TINY --set train.device=cuda --run-dir "$OUT/runs/gpu-sparse"
step tiny-gpu-dp2-mpi mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS -np 2 "$B" train $TINY \
  --set train.device=cuda --set parallel.backend=mpi --run-dir "$OUT/runs/gpu-dp2"
step tiny-compare-dp2 compare "$OUT/runs/gpu-dp2/metrics.jsonl" "$OUT/runs/gpu-sparse/metrics.jsonl"
for L in "tp2:--set parallel.tensor=2" "ep2:--set parallel.expert=2" "tp2-sp:--set parallel.tensor=2 --set parallel.sequence=true"; do
  name=${L%%:*}
  step tiny-gpu-$name-mpi mpirun --allow-run-as-root --oversubscribe -x OPENBLAS_NUM_THREADS -np 2 "$B" train $TINY \
    --set train.device=cuda --set parallel.backend=mpi ${L#*:} --run-dir "$OUT/runs/gpu-$name"
  step tiny-compare-$name compare "$OUT/runs/gpu-$name/metrics.jsonl" "$OUT/runs/gpu-sparse/metrics.jsonl"
done
fi

if want bench; then
step bench-kernels-0.1b "$B" bench kernels --config configs/deco-0.1b.yaml --iters 20
step bench-0.1b "$B" bench train --config configs/deco-0.1b.yaml --all-variants --steps "$STEPS" --warmup 3
if [[ -f .peer/torch_deco.py ]]; then
  step peer python3 .peer/torch_deco.py --mode train --shape 0.1b --steps "$STEPS"
fi
fi
echo "report: $OUT/summary.txt"

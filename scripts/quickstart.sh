#!/usr/bin/env bash
# From a fresh Debian machine to a trained, exported DECO that writes text:
#   1. installs the Debian packages (and the Linux kernel documentation, the default corpus),
#   2. builds decotron,
#   3. trains a SentencePiece tokenizer on the corpus and preprocesses it (scripts/prepare_default_corpus.sh),
#   4. trains configs/tiny-deco.yaml on one CPU core (a few minutes), with validation loss,
#   5. exports the final checkpoint and generates text from it.
# Re-running reuses the corpus; each run trains into a new run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
DECOTRON_WITH_CORPUS=1 scripts/install_deps.sh
scripts/build.sh
BUILD_DIR=${BUILD_DIR:-build}
CORPUS=${CORPUS:-data-cache/linux-docs}
scripts/prepare_default_corpus.sh "$BUILD_DIR" "$CORPUS"

RUN=${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
# One core, as promised: OpenBLAS would otherwise use them all.
export OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
"$BUILD_DIR/decotron" train --config configs/tiny-deco.yaml --run-dir "$RUN" \
  --set data.prefixes="[$CORPUS/kernel_docs]" --set data.tokenizer_model="$CORPUS/tokenizer.model" "$@"
echo "quickstart: trained; metrics in $RUN/metrics.jsonl"

OUT=$RUN/export
"$BUILD_DIR/decotron" export "$RUN" --out "$OUT" --dtype bf16
"$BUILD_DIR/decotron" eval --model "$OUT" --data "$CORPUS/kernel_docs" --split valid --split-string 98,2,0 \
  --seq-len 128 --samples 64
echo "quickstart: generating from $OUT"
"$BUILD_DIR/decotron" generate --model "$OUT" --prompt "The Linux kernel" --max-tokens 64 --temperature 0.8 --top-k 40 --seed 1
echo
echo "quickstart: done. Run dir $RUN (metrics.jsonl, checkpoints/), export $OUT."

#!/usr/bin/env bash
# Builds the quickstart corpus from the Linux kernel documentation installed by Debian's
# linux-doc package: a SentencePiece model trained on it and a Megatron indexed dataset.
#
#   scripts/prepare_default_corpus.sh BUILD_DIR OUT_DIR [--vocab-size N] [--model-type bpe|unigram]
#                                     [--source DIR] [--workers N]
#
# Writes OUT_DIR/files.txt (the inputs, sorted), OUT_DIR/tokenizer.{model,vocab} and
# OUT_DIR/kernel_docs.{bin,idx} (one document per doc file, EOD appended). Idempotent: a step
# whose outputs exist is skipped (delete them to redo it). Each doc file is one document.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ $# -ge 2 ]] || usage
build_dir=$1 out_dir=$2
shift 2
vocab_size=4096 model_type=bpe workers=0
source_dir=/usr/share/doc/linux-doc-6.1/Documentation
while [[ $# -gt 0 ]]; do
  case $1 in
    --vocab-size) vocab_size=$2; shift 2 ;;
    --model-type) model_type=$2; shift 2 ;;
    --source) source_dir=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "prepare_default_corpus: unknown argument $1" >&2; usage ;;
  esac
done

decotron=$build_dir/decotron
[[ -x $decotron ]] || { echo "prepare_default_corpus: $decotron not found; build first (cmake --build $build_dir)" >&2; exit 1; }
[[ -d $source_dir ]] || { echo "prepare_default_corpus: $source_dir not found; install it with: apt-get install linux-doc-6.1 (or pass --source DIR)" >&2; exit 1; }
mkdir -p "$out_dir"

# Deterministic input order (LC_ALL=C sort), so the dataset is identical on every machine.
files=$out_dir/files.txt
if [[ ! -s $files ]]; then
  find "$source_dir" -type f \( -name '*.rst' -o -name '*.rst.gz' -o -name '*.txt' -o -name '*.txt.gz' \) \
    | LC_ALL=C sort > "$files.tmp"
  mv "$files.tmp" "$files"
fi
n=$(wc -l < "$files")
[[ $n -gt 0 ]] || { echo "prepare_default_corpus: no .rst/.txt(.gz) files under $source_dir" >&2; exit 1; }
echo "prepare_default_corpus: $n input files listed in $files"
mapfile -t inputs < "$files"

model=$out_dir/tokenizer
if [[ -s $model.model ]]; then
  echo "prepare_default_corpus: $model.model exists, skipping tokenizer training"
else
  start=$SECONDS
  # Train under a temporary prefix, then rename: an interrupted run leaves no partial model.
  "$decotron" tokenizer train --input "${inputs[@]}" --model-prefix "$model.tmp" \
    --vocab-size "$vocab_size" --model-type "$model_type"
  mv "$model.tmp.vocab" "$model.vocab"
  mv "$model.tmp.model" "$model.model"
  echo "prepare_default_corpus: tokenizer trained in $((SECONDS - start)) s"
fi

prefix=$out_dir/kernel_docs
if [[ -s $prefix.bin && -s $prefix.idx ]]; then
  echo "prepare_default_corpus: $prefix.{bin,idx} exist, skipping preprocessing"
else
  start=$SECONDS
  "$decotron" preprocess --input "${inputs[@]}" --output-prefix "$prefix" \
    --tokenizer-model "$model.model" --append-eod --workers "$workers"
  echo "prepare_default_corpus: preprocessed in $((SECONDS - start)) s"
fi
echo "prepare_default_corpus: done: data prefix $prefix, tokenizer $model.model"

#!/usr/bin/env bash
# Installs the Debian packages Decotron builds and runs with (only those missing).
# Why each is here: docs/dependencies.md.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git python3
  libyaml-cpp-dev          # configs
  libopenblas-dev          # CPU GEMM
  libgtest-dev             # tests
  libcli11-dev             # command line
  libhdf5-dev              # checkpoints
  libsentencepiece-dev sentencepiece  # tokenizer
  libopenmpi-dev openmpi-bin          # multi-rank launch and CPU transport
  nlohmann-json3-dev       # metrics.jsonl, export config
  zlib1g-dev               # gzip inputs to preprocess
)
if [[ "${DECOTRON_WITH_CORPUS:-0}" == "1" ]]; then
  PACKAGES+=(linux-doc-6.1)  # the embedded default corpus (Linux kernel documentation)
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  echo "install_deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install_deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

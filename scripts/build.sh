#!/usr/bin/env bash
# Configures and builds Decotron into ${BUILD_DIR:-build}. CUDA is enabled when nvcc is found
# (set DECOTRON_CUDA=ON|OFF to force). Extra CMake arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
if [[ -z "${DECOTRON_CUDA:-}" ]]; then
  # nvcc is often installed outside PATH.
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi
  DECOTRON_CUDA=AUTO
fi
# cuDNN's fused attention needs the header-only cudnn-frontend (optional: without it the flash
# kernels serve; a machine without network keeps whatever third_party/ holds).
if [[ "$DECOTRON_CUDA" != "OFF" ]] && { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }; then
  scripts/fetch_cudnn_frontend.sh || true
fi
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DDECOTRON_CUDA="$DECOTRON_CUDA" "$@" >/dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)"

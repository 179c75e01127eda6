#!/usr/bin/env bash
# Fetches NVIDIA's cudnn-frontend (header-only, MIT; the C++ graph API over cuDNN 9 that the
# fused attention uses: kernels/cuda/cudnn_attention.cu) into third_party/cudnn-frontend/include,
# from its PyPI wheel, pinned. Git-ignored; a machine without network access gets it copied in
# (the device tool: carry ["third_party/cudnn-frontend"]). Without it the build leaves cuDNN
# attention out (flash kernels instead) and says so. Usage: scripts/fetch_cudnn_frontend.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=1.32.0
DEST=third_party/cudnn-frontend
if [[ -f $DEST/include/cudnn_frontend.h && -f $DEST/VERSION && $(cat $DEST/VERSION) == "$VERSION" ]]; then
  echo "fetch_cudnn_frontend: $DEST has $VERSION"
  exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
if ! python3 -m pip download --quiet --no-deps --dest "$TMP" "nvidia-cudnn-frontend==$VERSION" 2>"$TMP/err"; then
  echo "fetch_cudnn_frontend: could not download nvidia-cudnn-frontend==$VERSION ($(tail -n 1 "$TMP/err")); the build" \
       "will use the flash attention kernels instead of cuDNN" >&2
  exit 1
fi
rm -rf "$DEST"
mkdir -p "$DEST"
python3 - "$TMP" "$DEST" <<'PY'
import os, sys, zipfile
tmp, dest = sys.argv[1:3]
wheel = next(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".whl"))
with zipfile.ZipFile(wheel) as z:
    for n in z.namelist():
        if n.startswith("include/") and not n.endswith("/"):
            z.extract(n, dest)
        elif n.endswith("LICENSE.txt") or n.endswith("LICENSE"):
            with open(os.path.join(dest, "LICENSE"), "wb") as f:
                f.write(z.read(n))
PY
echo "$VERSION" > "$DEST/VERSION"
echo "fetch_cudnn_frontend: $DEST/include ($(find "$DEST/include" -name '*.h' | wc -l) headers, $VERSION)"

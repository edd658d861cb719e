#!/usr/bin/env bash
# Build .whl/: what a GPU session's run imports that the device image (Python 3.12, torch 2.11+cu130,
# transformers 5.17, no Ray/DeepSpeed/pydantic) lacks or has too old, as cp312 manylinux x86_64 wheels.
# Run here, in the repository root, with a Python that has torch (DeepSpeed's sdist imports it to build):
#     PYTHON=.venv/bin/python bash benchmarks/gpu/bundle.sh
# The device tool carries `.whl` beside the tracked files, 64 MiB in all; this refuses a bundle over LIMIT_MIB.
set -euo pipefail

PYTHON=${PYTHON:-python3}
LIMIT_MIB=${LIMIT_MIB:-60}  # bundle + tracked files; the tool's cap is 64 MiB, the rest is headroom
DEST=.whl

# Pinned to the versions the project's venv is tested with. Measured (an import of the training loop, Ray Train,
# Ray Data, DeepSpeed and the serving engine): wandb, fastapi/starlette/uvicorn, optuna and the `kernels` hub
# package are imported only when used (logging to W&B, the Serve ingress, sweeps, hub kernels), so they stay out.
WHEELS=(
  ray==2.60.0                      # repacked below: the wheel alone is 79 MB
  transformers==5.25.0             # llmray needs >=5.23; the image has 5.17
  huggingface_hub==2.4.0           # transformers 5.25 checks >=2.4 at import; the image has 1.33
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5  # huggingface_hub 2.x's HTTP client
  regex==2026.11.19                # transformers checks >=2025.10.22 at import; the image's version is unread
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0        # pydantic 2.14 needs >=4.16
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1  # Ray's
  hjson==3.1.0                     # DeepSpeed's config reader
  liger-kernel==0.8.5              # train.kernels.liger
  torchao==0.18.0                  # int4 decode
)
DEEPSPEED=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('deepspeed'))" 2>/dev/null || echo 0.19.8)
# Ray's parts no GPU run imports: the Java jars, RLlib, the dashboard's web client
RAY_DROP=(ray/jars ray/rllib ray/dashboard/client/build)

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

rm -rf "$DEST" && mkdir -p "$DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$DEST" "${WHEELS[@]}"

# DeepSpeed is an sdist on PyPI: a pure-Python wheel, its ops left to JIT-build on the GPU with ninja
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$DEEPSPEED"

# Ray: unpacked without RAY_DROP and packed again as .tar.xz (about 31 MB instead of 79)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# (extracted keeping each file's mode: raylet and gcs_server must stay executable)
"$PYTHON" - "$DEST"/ray-*.whl "$tmp" <<'PY'
import os, sys, zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        if info.external_attr >> 16:
            os.chmod(path, (info.external_attr >> 16) & 0o777)
PY
for d in "${RAY_DROP[@]}"; do rm -rf "${tmp:?}/$d"; done
tar -C "$tmp" -cf - . | xz -T0 -6 >"$DEST/ray.tar.xz"
rm "$DEST"/ray-*.whl

bundle=$(du -sb "$DEST" | cut -f1)
tracked=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
ls -l "$DEST"
echo "bundle $(mib "$bundle") MiB + tracked files $(mib "$tracked") MiB = carried $(mib $((bundle + tracked))) MiB" \
  "(limit ${LIMIT_MIB} MiB)"
if (( bundle + tracked > LIMIT_MIB * 1048576 )); then
  echo "bundle.sh: over ${LIMIT_MIB} MiB; the device tool would refuse the working tree" >&2
  exit 1
fi

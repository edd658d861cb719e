# The bundle (.whl/, built by bundle.sh) installed for this shell, on the GPU machine: `source benchmarks/gpu/install.sh`
# from the repository root. Nothing is fetched: the wheels go into SITE, Ray is untarred beside them, and SITE and
# the checkout lead PYTHONPATH, ahead of the image's own (older) transformers and huggingface_hub.
set -euo pipefail

SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
tar -C "$SITE" -xJf .whl/ray.tar.xz
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's JIT ops on the H200; its "9.0a" form fails their build
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# transformers 5.25's from_pretrained turns Hub kernels on by default, which needs the `kernels` package and the
# Hub (unreachable there). llmray's own loads turn them off (model/build.py, NO_HUB_KERNELS); this covers the
# scripts' plain transformers loads too, so every run measures llmray's own kernels
export USE_HUB_KERNELS=NO
# installed with --no-compile: each process compiling torchao would repeat its docstrings' SyntaxWarning
export PYTHONWARNINGS=ignore::SyntaxWarning
"$PYTHON" - <<'PY'
import deepspeed, ray, torch, transformers
import llmray

print(f"[install] python {__import__('sys').version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}), ray {ray.__version__} from {ray.__path__[0]}, deepspeed "
      f"{deepspeed.__version__}, transformers {transformers.__version__}, llmray from {llmray.__path__[0]}")
PY

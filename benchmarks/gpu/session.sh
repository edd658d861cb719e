#!/usr/bin/env bash
# The one command of a GPU session (issue 32), from the repository root with `.whl` carried:
#     bash benchmarks/gpu/session.sh              # on the H200: about 8 minutes, items most important first
#     bash benchmarks/gpu/session.sh --rehearse   # on CPU: tiny presets, a few steps, GPU-only items noted and skipped
# Each item runs under its own time limit; one that no longer fits in what is left of TOTAL_S is skipped, and says so.
# ITEMS picks items by number (default all: "1 2 3 4 5"), e.g. a second try for what the first did not reach:
#     ITEMS="4 5" TOTAL_S=150 bash benchmarks/gpu/session.sh
# Results go to $OUT as each item ends (the device tool brings back at most 8 files): session.log, mfu.json,
# ablation.json, serve.json, checks.json, int4.json, zero_memory.json. A table of the items ends the log.
set -euo pipefail
cd "$(dirname "$0")/../.."

REHEARSE=0
ITEMS=${ITEMS:-1 2 3 4 5}
if [[ ${1:-} == --rehearse ]]; then REHEARSE=1; fi
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

START=$SECONDS
source benchmarks/gpu/install.sh
echo "[session] install took $((SECONDS - START))s"

if ((REHEARSE)); then
  TOTAL_S=${TOTAL_S:-1500}
  SCALE=2  # each item's limit doubled: a Ray start, DeepSpeed's CPU ops and torchrun take far longer on 2 CPU cores
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  MFU=(--preset tiny --steps 6)
  ABLATION=(--preset tiny --steps 6 --only all_off fused_adam compile)
  CHECKS=(--preset tiny --steps 6 model.num_layers=1 --only sdpa_zero3)  # liger and FusedAdam are CUDA kernels
  SERVE=(--hidden 64 --layers 2 --tokens 8 --levels 1 4 --requests 1)
  ZERO=(--steps 2 model.hidden_size=64 model.num_layers=2 model.num_heads=4 model.intermediate_size=128
        scaling.num_workers=1)
else
  TOTAL_S=${TOTAL_S:-480}  # 8 minutes: a second try fits in the session's 15 minutes of device time
  SCALE=1
  MFU=(--preset 1b --steps 20)
  ABLATION=(--preset 1b --steps 6 --only all_off fused_adam liger compile)  # compile last: its first steps are slow
  # correctness, not speed: 4 of the 1B model's layers, so FusedAdam's JIT build (nvcc) has the time
  CHECKS=(--preset 1b --steps 6 model.num_layers=4 --only liger_zero3 sdpa_zero3 deepspeed_fused_adam)
  SERVE=(--levels 1 16 64)
  # one GPU: one rank, so the stages differ by what they keep per rank, not by partitioning across ranks
  ZERO=(--steps 3 scaling.use_gpu=true scaling.num_workers=1)
fi

# flash-attn is not in the image and builds against its CUDA for many minutes: without it, "auto" attention is
# sdpa, the ablation's flash run would repeat all_off, and flash varlen against sdpa cannot be checked
if python3 -c "import flash_attn" 2>/dev/null; then FLASH=yes; ABLATION+=(flash_attention); else FLASH=no; fi

ROWS=()
# item NAME BUDGET_S COMMAND...: run it under its time limit if it still fits, and note how it ended
item() {
  local name=$1 budget=$(($2 * SCALE)) left rc=0 t0=$SECONDS
  shift 2
  if [[ $name != corpus && " $ITEMS " != *" ${name%% *} "* ]]; then return; fi
  left=$((TOTAL_S - (SECONDS - START)))
  if ((budget > left)); then
    echo "[session] $name: skipped, needs ${budget}s and ${left}s are left"
    ROWS+=("$name|skipped (time)|0|$budget")
    return
  fi
  echo "[session] $name: started, limit ${budget}s"
  timeout -k 15 "$budget" "$@" || rc=$?
  local status=ok
  if ((rc == 124 || rc == 137)); then status="timed out"; elif ((rc)); then status="failed (rc $rc)"; fi
  echo "[session] $name: $status after $((SECONDS - t0))s"
  ROWS+=("$name|$status|$((SECONDS - t0))|$budget")
}
note() {  # an item that cannot run here, with why
  if [[ " $ITEMS " != *" ${1%% *} "* ]]; then return; fi
  echo "[session] $1: not run, $2"
  ROWS+=("$1|not run: $2|0|0")
}

GPU_MFU=(python3 benchmarks/gpu_mfu.py)
item corpus 45 python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import stdlib_corpus; stdlib_corpus()"
item "1 mfu torchrun+ray" 180 "${GPU_MFU[@]}" "${MFU[@]}" --only auto_zero1 --out "$OUT/mfu.json"
item "2 ablation" 120 "${GPU_MFU[@]}" "${ABLATION[@]}" --no-ray --out "$OUT/ablation.json"
item "3 serve in process" 90 python3 benchmarks/gpu/serve_check.py "${SERVE[@]}" --out "$OUT/serve.json"
item "4 liger zero3, fused adam" 90 "${GPU_MFU[@]}" "${CHECKS[@]}" --no-ray --out "$OUT/checks.json"
if ((REHEARSE)); then
  note "4 int4 decode" "int4-weight-only is a CUDA kernel"
else
  item "4 int4 decode" 50 python3 benchmarks/gpu/int4_check.py --out "$OUT/int4.json"
fi
if [[ $FLASH == no ]]; then note "4 flash varlen = sdpa" "flash-attn is not importable"; fi
item "5 zero memory" 100 python3 benchmarks/zero_memory.py "${ZERO[@]}" --out "$OUT/zero_memory.json"

echo
echo "| item | status | seconds | limit |"
echo "|---|---|---|---|"
for row in "${ROWS[@]}"; do echo "| ${row//|/ | } |"; done
echo "[session] total $((SECONDS - START))s of ${TOTAL_S}s; results in $OUT"

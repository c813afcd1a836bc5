#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU, offline, in well under 8 minutes: overhead rows for the three families
# (tiny and real shapes, bf16; real shapes also fp16, with the run_with_cache pos_slice= / device=cpu rows), patching
# sweeps against TL's loop (design shape, bf16 and fp16), load time / peak RSS, extraction throughput, and
# `tl-vlm verify` in bf16 on the real-shape benchmark checkpoints. Results: benchmarks/results/gpu/.
#
# Usage (repository root, a Python with tl_vlm and a CUDA torch installed): bash benchmarks/gpu.sh
# A failing step is logged and the suite goes on; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export BENCH_RESULTS=benchmarks/results/gpu
mkdir -p "$BENCH_RESULTS"
LOG="$BENCH_RESULTS/suite.log"
: > "$LOG"
failed=0
SECONDS=0

step() {  # step NAME CMD...: run, log, time; keep going on failure
  local name=$1; shift
  echo "== [$SECONDS s] $name: $*" | tee -a "$LOG"
  if ! "$@" >>"$LOG" 2>&1; then echo "!! $name failed (see $LOG)" | tee -a "$LOG"; failed=1; fi
}

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee -a "$LOG" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1

for family in llava blip2 qwen2_vl; do
  step "overhead $family tiny bf16" $PY benchmarks/overhead.py --family $family --shape tiny --device cuda --dtype bf16 --repeats 25 --warmup 3
  for dtype in bf16 fp16; do
    step "overhead $family real $dtype" $PY benchmarks/overhead.py --family $family --shape real --device cuda --dtype $dtype --repeats 15 --warmup 3
  done
  step "load $family design" $PY benchmarks/load_memory.py --family $family --shape design --repeats 2
done
# Patching sweeps: tl_vlm.patching vs TL's loop on the whole [layer, pos] grid (design shape), both half dtypes.
for family in llava qwen2_vl blip2; do
  for dtype in bf16 fp16; do
    step "patching $family design $dtype" $PY benchmarks/patching.py --family $family --shape design --device cuda --dtype $dtype --repeats 2 --window 100000
  done
done
step "run_with_cache device=cpu from cuda (pinned copies)" $PY -m pytest -q -p no:cacheprovider tests/test_run_with_cache_args.py
step "extract llava design" $PY benchmarks/extract_throughput.py --family llava --shape design --device cuda --images 32

CKPT=$(mktemp -d)
trap 'rm -rf "$CKPT"' EXIT
for family in llava blip2 qwen2_vl; do
  step "save $family real" $PY -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; \
from common import save_checkpoint; save_checkpoint('$family', 'real', Path('$CKPT/$family'))"
  step "verify $family real bf16" $PY -m tl_vlm.cli verify "$CKPT/$family" --dtype bf16 --device cuda --out "$BENCH_RESULTS/verify_$family"
  rm -rf "${CKPT:?}/$family"
done

step "summary" bash -c "$PY benchmarks/summarize.py $BENCH_RESULTS > $BENCH_RESULTS/SUMMARY.md"
echo "== done in $SECONDS s, failed=$failed" | tee -a "$LOG"
exit $failed

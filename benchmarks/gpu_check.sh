#!/usr/bin/env bash
# The prepared check for a lent GPU (issue 11): tiny workflows end to end on the GPU, ViLT-B/32 step plain vs stage
# path per plugin (samples/s, peak memory, MFU), UniTAB step plain vs fused, retrieval pairs/s. Needs nothing but
# scripts/install.sh (run here when .venv is missing). Writes gpu_check.md + gpu_check.json to $OUT (or OUT_DIR).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--cpu-dry-run] [--parts e2e,vilt_step,unitab_step,eval,loader]
#
# Finishes within 8 minutes: the Python side has a 450 s budget (parts not started by then are reported as skipped)
# and the whole run is cut at 480 s.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if [ ! -x "$PY" ] && [ -d .whl ]; then
  # A lent GPU machine reaches no registry: its python3 has torch (a CUDA build) and most of the stack; the rest
  # (colossalai, transformers 4.x, ...) travels as wheels in .whl/, made by benchmarks/gpu_wheels.sh.
  PY=python3
  export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! { "$PY" -m pip install -q --no-deps --no-compile .whl/*.whl &&
         "$PY" -m pip install -q --no-deps --no-build-isolation -e .; }; then
    echo "gpu_check: installing into $PY failed; trying a --target install" >&2
    "$PY" -m pip install -q --no-deps --no-compile --no-build-isolation --target /tmp/vlflow_site .whl/*.whl . || {
      echo "gpu_check: offline install failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/vlflow_site${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c "import torch, colossalai, transformers, vlflow.stages.common.fit; print('gpu_check stack:', torch.__version__, torch.cuda.is_available(), colossalai.__version__, transformers.__version__)" || exit 1
elif [ ! -x "$PY" ]; then
  bash scripts/install.sh || { echo "gpu_check: scripts/install.sh failed" >&2; exit 1; }
fi
out_dir="${OUT:-gpu_check_out}"
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then out_dir="$1"; shift; fi
mkdir -p "$out_dir"
timeout 480 "$PY" benchmarks/gpu_check.py --out "$out_dir" --budget-s 450 "$@" 2>&1 | tee "$out_dir/gpu_check.log"
exit "${PIPESTATUS[0]}"

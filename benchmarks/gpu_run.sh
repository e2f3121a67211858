#!/usr/bin/env bash
# The GPU measurement run in one call (issue 31): every part writes its results as it goes, and they are
# packed into $OUT/results.tgz after each part; the whole output also goes to $OUT/log.txt.
#
#   OUT=/some/dir LOWRANK_GIT_SHA=<commit> bash benchmarks/gpu_run.sh        # full size, one CUDA GPU
#   OUT=/tmp/gpuout PYTHON=.venv/bin/python bash benchmarks/gpu_run.sh --small   # tiny sizes on the CPU
#
# Parts, in order, each under its own time limit and all within GPU_RUN_BUDGET seconds (default 540;
# 1200 with --small); a part that no longer fits is skipped and says so:
#   tests   pytest tests/test_layerwise_devices.py (its CUDA test runs only where CUDA is available)
#   scale   compress_scale.py: SVD-LLM at ratio 0.2 (fraction of linear parameters REMOVED) on the
#           Llama-2-7B shape, 32 layers, rSVD (10, 2) first, then exact SVD, with 32 × 2048 calibration
#           tokens: 1/8 of the full 256 × 2048, to fit the device time; its report projects the stages
#           that grow with the tokens (calibration forward, Gram accumulation) linearly to the full count
#   speed   factorized_speed.py: 0/20/40/60 % of linear parameters removed, prefill and decode at
#           batch 1 and 16, interleaved with the original
#   kv      kv_decode.py: mla keeping 31 % of the cache and kv-projection post-RoPE at R/d 0.5, decode
#           at batch 16 with 8,192 cached tokens (a synthetic fill, see the script), against the original
#   rsvd    rsvd_table.py: the seed's Table 1 on Gaussian and decaying matrices (the real-weights family
#           needs the built-in model, which a machine without network cannot prepare) and speed targets
#
# Wheels in .whl/ (pytest and its dependencies, for a machine without them) are installed into a private
# folder first, and src/ goes on PYTHONPATH: lowrank need not be installed. On a machine without git, set
# LOWRANK_GIT_SHA to the commit the tree is at, so that the results name it.
set -uo pipefail
cd "$(dirname "$0")/.."

SMALL=${GPU_RUN_SMALL:-0}
[[ ${1:-} == --small ]] && SMALL=1
OUT=${OUT:?set OUT to the folder the results go to}
PY=${PYTHON:-python3}
BUDGET=${GPU_RUN_BUDGET:-$([[ $SMALL == 1 ]] && echo 1200 || echo 540)}
SITE=${TMPDIR:-/tmp}/site
WORK=$(mktemp -d)/results
LOG=$OUT/log.txt
STATUS=()
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1

say() { echo "$*" | tee -a "$LOG"; }

pack() {  # the results so far, replaced atomically so that a run cut short still leaves a whole archive
    tar czf "$OUT/results.tgz.part" -C "$(dirname "$WORK")" results &&
        mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"
}

run_part() {  # NAME LIMIT_S COMMAND...: run under min(LIMIT_S, budget left), output to the log, then pack
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    local left=$((BUDGET - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        say "=== [$name] SKIPPED: ${left} s of the ${BUDGET} s budget left"
        STATUS+=("$name: skipped, out of budget")
        return
    fi
    say "=== [$name] $(date -u +%H:%M:%S) limit ${limit} s: $*"
    timeout -s INT -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG" "$WORK/log_$name.txt"
    rc=${PIPESTATUS[0]}
    STATUS+=("$name: exit $rc$( ((rc == 124 || rc == 137)) && echo ' (time limit)'), $((SECONDS - start)) s")
    say "=== [$name] exit $rc after $((SECONDS - start)) s"
    pack
}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl 2>&1 | tee -a "$LOG"
    export PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
if [[ -z ${LOWRANK_GIT_SHA:-} ]] && sha=$(git rev-parse HEAD 2>/dev/null); then
    [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && sha+=-dirty
    export LOWRANK_GIT_SHA=$sha
fi

if [[ $SMALL == 1 ]]; then
    DEVICE=cpu  # one torch thread: on a small shared CPU, more threads than idle cores stall LAPACK
    SCALE=(--threads 1 --shape smoke --layers 2 --calib-samples 4 --calib-seq-len 128)
    SPEED=(--threads 1 --shape smoke --layers 2 --batch-sizes 1 2 --prompt-len 32 --gen-len 4 --repeats 1)
    KV=(--threads 1 --shape smoke --layers 2 --batch-size 2 --context 256 --seed-len 32 --steps 4 --repeats 1
        --calib-samples 2 --calib-seq-len 128)
    RSVD=(--threads 1 --sizes 256,384 --repeats 1 --targets-scale 64)
else
    DEVICE=cuda
    # grown in place, a long KV cache's blocks are reused instead of fragmenting the device memory
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    SCALE=(--calib-samples 32 --calib-seq-len 2048)
    SPEED=()
    KV=()
    RSVD=(--repeats 2)
fi

say "=== gpu_run $(date -u +%FT%TZ), $([[ $SMALL == 1 ]] && echo 'SMALL (CPU smoke)' || echo full) run," \
    "budget ${BUDGET} s, git ${LOWRANK_GIT_SHA:-unknown}"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi
TAG=$("$PY" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$LOG" | tail -n 1 | awk '{print $NF}'
import platform
import sys

import torch
import transformers

from benchmarks._random_llama import device_tag

print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
print(f"cuda available: {torch.cuda.is_available()}; results tag: {device_tag(sys.argv[1])}")
EOF
)

run_part tests 90 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_layerwise_devices.py
run_part scale 200 "$PY" -m benchmarks.compress_scale --device "$DEVICE" --decomposers rsvd,svd \
    --results-dir "$WORK" "${SCALE[@]}"
run_part speed 120 "$PY" -m benchmarks.factorized_speed --device "$DEVICE" --results-dir "$WORK" \
    "${SPEED[@]}"
run_part kv 120 "$PY" -m benchmarks.kv_decode --device "$DEVICE" --results-dir "$WORK" "${KV[@]}"
run_part rsvd 120 "$PY" -m benchmarks.rsvd_table --device "$DEVICE" --families gaussian,decaying \
    --out "$WORK/rsvd_table_$TAG" "${RSVD[@]}"

printf '%s\n' "${STATUS[@]}" >"$WORK/gpu_run_summary.txt"
pack
say "=== done in ${SECONDS} s; results in $OUT/results.tgz:"
printf '    %s\n' "${STATUS[@]}" | tee -a "$LOG"

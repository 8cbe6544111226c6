#!/usr/bin/env bash
# The GPU checks, on one H200-class device, in two calls of under 10 minutes each. Nothing is
# downloaded there: packages the image lacks come as wheels from a carried folder (WHEELS, default
# .whl, made here by bench/device_wheels.sh: deepspeed, hjson, pydantic, pydantic-core for every
# CPython the device may run, annotated-types, typing-inspection); data from the
# repository and from DSEXIT_SHARED (default ../shared/data; on a machine that gets only the
# repository, copy the corpus, the vocabulary and the task into a carried folder and point
# DSEXIT_SHARED at it; a prepared dataset there in device-heldout/ is used as is). Each part writes
# its results as it finishes (bench/results/ and, where set, $OUT), so a run cut off still
# reports what it did.
#
#   bench/device_check.sh step      # part 0 alone, under 6 minutes (compilation included)
#   bench/device_check.sh exits     # part 0b alone, under 7 minutes: exits' speed, compiled
#   bench/device_check.sh speed     # parts 0-3, about 9 minutes
#   bench/device_check.sh quality   # part 4, about 6 minutes
#   bench/device_check.sh all
#
# Parts:
#   0. bench/train_speed.py --preset small: the trainer's loop, the bare engine step and HF same-work,
#      eager and compiled (CUDA graphs), electra-small at 128 x 128 per step; tokens/s, loop vs bare,
#      compiled vs eager, vs HF, share of the bf16 matmul peak
#   0b. bench/train_exit.py --compile: the trainer's step with capacity routing at compute 0.75 and 0.5
#      against the compiled full-depth step, exit_kv keep and drop (one process per arm, bf16)
#   1. the model tests with the CUDA path (tests/unit/model, test_accelerator.py runs on the GPU,
#      including one step of the loop under torch.cuda.set_sync_debug_mode("error"))
#   2. bench/exit_speed.py on the GPU: electra-small throughput in fp32 and bf16, ours against HF
#      (same work and as-is), exit efficiency, FLOP/s as a share of the measured bf16 matmul peak
#   3. bench/resume_check.py: a 1-GPU ZeRO-2 run with checkpoints, killed and resumed, against an
#      uninterrupted run
#   4. bench/pretrain_vs_exit.py --scale device (quality per compute, precondition line included)
set -uo pipefail
cd "$(dirname "$0")/.."
WHAT="${1:-all}"
SHARED="${DSEXIT_SHARED:-../shared/data}"
WHEELS="${WHEELS:-.whl}"
RESULTS=bench/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # By name from the folder (bench/device_wheels.sh fills it): pip takes the binary wheel that fits.
    packages=$(ls "$WHEELS"/*.whl | xargs -n1 basename | cut -d- -f1 | sort -u)
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dsexit-site $packages || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/dsexit-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c "import torch, deepspeed, transformers, dsexit; print('torch', torch.__version__, 'cuda', \
torch.cuda.is_available(), 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)" \
    || { echo "the environment cannot import dsexit and its dependencies"; exit 1; }

publish() {  # copy a finished part's files to $OUT as soon as it ends
    [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ 2>/dev/null || true
}

part() {  # part NAME SECONDS LOG COMMAND...: run one part under a time limit; a failure does not stop the rest
    local name="$1" limit="$2" log="$3"
    shift 3
    echo "== $name (limit ${limit}s)"
    local started=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}

if [ "$WHAT" = step ] || [ "$WHAT" = speed ] || [ "$WHAT" = all ]; then
    part "part 0: train_speed, the training step on the GPU" 350 "$RESULTS/train_speed_device.log" \
        "$PYTHON" bench/train_speed.py --preset small --out "$RESULTS/train_speed_device.json"
    publish "$RESULTS"/train_speed_device.*
fi

if [ "$WHAT" = exits ] || [ "$WHAT" = all ]; then
    part "part 0b: train_exit, capacity routing compiled on the GPU" 420 "$RESULTS/train_exit_device.log" \
        "$PYTHON" bench/train_exit.py --preset electra-small --variants dense dense-drop --routing capacity \
        --targets 0.75 0.5 --compile --settle 4 --steps 8 --launches 1 --out "$RESULTS/train_exit_device.json"
    publish "$RESULTS"/train_exit_device.*
fi

if [ "$WHAT" = speed ] || [ "$WHAT" = all ]; then
    part "part 1: model tests, CUDA path" 150 "$RESULTS/device_model_tests.log" \
        "$PYTHON" -m pytest -q -p no:cacheprovider tests/unit/model -rs
    publish "$RESULTS/device_model_tests.log"
    part "part 2: exit_speed on the GPU" 150 "$RESULTS/exit_speed_device.log" \
        "$PYTHON" bench/exit_speed.py --device cuda --repeats 10 --out "$RESULTS/exit_speed_device.json"
    publish "$RESULTS"/exit_speed_device.*
    part "part 3: ZeRO-2 checkpoint and exact resume on one GPU" 150 "$RESULTS/resume_check_device.log" \
        "$PYTHON" bench/resume_check.py --model electra-small --batch 128 --steps 40 --save-at 20 \
        --out "$RESULTS/resume_check_device.json"
    publish "$RESULTS"/resume_check_device.*
fi

if [ "$WHAT" = quality ] || [ "$WHAT" = all ]; then
    part "part 3b: the same with deterministic kernels (bitwise on a GPU)" 110 \
        "$RESULTS/resume_check_device_deterministic.log" \
        "$PYTHON" bench/resume_check.py --model electra-small --batch 128 --steps 30 --save-at 15 \
        --work-dir runs/resume_check_deterministic --out "$RESULTS/resume_check_device_deterministic.json" \
        -- --deterministic
    publish "$RESULTS"/resume_check_device_deterministic.*
    cache=()
    [ -f "$SHARED/device-heldout/index.json" ] && cache=(--data-cache "$SHARED/device-heldout")
    part "part 4: pretrain_vs_exit --scale device" 460 "$RESULTS/pretrain_vs_exit_device.log" \
        "$PYTHON" bench/pretrain_vs_exit.py --scale device --corpus "$SHARED/corpus" "${cache[@]}" \
        --vocab "$SHARED/tokenizer/bert-base-uncased-vocab.txt" --task "$SHARED/downstream/rt_sentiment"
    publish "$RESULTS"/pretrain_vs_exit_device.*
fi

#!/usr/bin/env bash
# One GPU run (one H200-class device, under 10 minutes): each part writes its results as it
# finishes, so a run cut off still reports what it did. Data comes from the repository and from
# the shared data folder (DSEXIT_SHARED, default ../shared/data; on a machine that gets only the
# repository, copy the corpus, the vocabulary and the task into a carried folder and point
# DSEXIT_SHARED at it). Results land in bench/results/ and, where set, in $OUT.
#
# Parts:
#   1. the quality comparison at device scale: bench/pretrain_vs_exit.py --scale device
#      (no exit, exit 0.75, exit 0.5, generator-free; ELECTRA-Small, BERT's vocabulary;
#      precondition line included; < 6 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
SHARED="${DSEXIT_SHARED:-../shared/data}"
RESULTS=bench/results
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

publish() {  # copy a finished part's files to $OUT as soon as it ends
    [ -n "${OUT:-}" ] && cp "$@" "$OUT"/ 2>/dev/null || true
}

echo "== part 1: pretrain_vs_exit --scale device"
timeout 420 "$PYTHON" bench/pretrain_vs_exit.py --scale device --corpus "$SHARED/corpus" \
    --vocab "$SHARED/tokenizer/bert-base-uncased-vocab.txt" --task "$SHARED/downstream/rt_sentiment" \
    2>&1 | tee "$RESULTS/pretrain_vs_exit_device.log"
publish "$RESULTS"/pretrain_vs_exit_device.*

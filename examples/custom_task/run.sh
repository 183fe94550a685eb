#!/usr/bin/env bash
# The custom task end to end with default settings: your corpus, SFT rows, pairs, prompts and judge.
#   bash examples/custom_task/run.sh [WORKSPACE]      (from the repository root)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
WS="${1:-reviews}"
DATA="$WS-data"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"   # so --reward-fn / --judge-fn judge:score finds judge.py
P="prefcli -w $WS"

python "$HERE/make_data.py" "$DATA"
$P tokenize --input "$DATA/corpus.txt"
$P pretrain
$P align --method sft --data "$DATA/sft.jsonl"
$P align --method dpo --data "$DATA/pairs.jsonl"
$P align --method rloo --reward-fn judge:score --prompts "$DATA/prompts.jsonl"
$P eval compare --model dpo --model rloo --reference sft --prompts "$DATA/heldout.jsonl" --judge-fn judge:score

#!/usr/bin/env bash
# The demo workflow as plain prefcli commands: the same stages as examples/pipeline.toml.
#
#   examples/pipeline.sh [WORKSPACE]    (default: $PREFCLI_WORKSPACE, else ./workspace)
#
#   FAST=1        a tiny model and a few steps per stage: a smoke test, not a model
#   CORPUS=FILE   text to pretrain on          (default: the built-in demo corpus)
#   CHATS=FILE    conversations for sft        (default: the built-in demo chats)
#   PAIRS=FILE    preference pairs for the reward model and dpo (default: the built-in demo pairs)
#   PROMPTS=FILE  held-out prompts for eval compare (default: the demo's; needed with CORPUS)
#   PREFCLI=CMD   how to call prefcli          (default: prefcli; e.g. PREFCLI="python -m prefcli")
#
# Every command passes --overwrite, so the script can be run again: it rebuilds
# everything each time (`prefcli pipeline run` skips the stages that are up to date).
set -euo pipefail

WS="${1:-${PREFCLI_WORKSPACE:-workspace}}"
read -r -a PREFCLI_CMD <<< "${PREFCLI:-prefcli}"
pf() { "${PREFCLI_CMD[@]}" -w "$WS" "$@"; }   # prefcli, in the workspace

if [[ "${FAST:-0}" == 1 ]]; then
  TOKENIZE=(--vocab-size 300)
  PRETRAIN=(--layers 1 --dim 32 --heads 2 --context 32 --max-steps 3 --batch-size 4)
  SFT=(--max-steps 2 --batch-size 4)
  REWARD=(--max-steps 2 --batch-size 32)
  DPO=(--max-steps 2 --batch-size 32)
  EVAL=(--limit 4 --max-tokens 8 --batch-size 4)
else
  TOKENIZE=(--vocab-size 2048)
  PRETRAIN=(--size tiny --max-steps 600 --batch-size 16)
  SFT=(--max-steps 150)
  REWARD=(--max-steps 150)
  DPO=(--beta 0.1 --max-steps 120)
  EVAL=(--limit 300)
fi

# ${X:+...} adds the data option only when X is set (and works with bash 3's `set -u`).
pf tokenize ${CORPUS:+--input "$CORPUS"} "${TOKENIZE[@]}" --overwrite                 # tokenizers/default, datasets/corpus
pf pretrain "${PRETRAIN[@]}" --overwrite                                              # models/base
pf align --method sft ${CHATS:+--data "$CHATS"} "${SFT[@]}" --overwrite               # models/sft
pf reward train ${PAIRS:+--data "$PAIRS"} "${REWARD[@]}" --overwrite                  # models/rm
pf align --method dpo --rpo-alpha 1.0 ${PAIRS:+--data "$PAIRS"} "${DPO[@]}" --overwrite  # models/dpo
pf eval compare --model dpo --judge-model rm ${PROMPTS:+--prompts "$PROMPTS"} "${EVAL[@]}" --overwrite                 # evals/compare-dpo.json

echo "done: chat with the result:  prefcli -w $WS chat --model dpo" >&2

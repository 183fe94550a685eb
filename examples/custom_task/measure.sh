#!/usr/bin/env bash
# The measurements behind README.md's table: the custom task and the demo, DPO candidates side by side.
#   bash examples/custom_task/measure.sh OUT_DIR [--smoke]     (from the repository root)
# --smoke: 2 steps per stage and 8 prompts, to check the script itself.
# PARTS="custom demo" (the default) runs both side by side; PARTS=custom runs one alone (on 2 cores,
# running the two at once halves each one's speed).
set -uo pipefail
ROOT="$(pwd)"
HERE="$ROOT/examples/custom_task"
OUT="$1"; SMOKE="${2:-}"
mkdir -p "$OUT/res"
export PYTHONPATH="$ROOT:$HERE" PYTHONUNBUFFERED=1
S=(); L=(); RL=()
if [ "$SMOKE" = "--smoke" ]; then S=(--max-steps 2); L=(--limit 8); RL=(--max-steps 2 --batch-size 16); fi
W="$OUT/work"; mkdir -p "$W"

run() {  # run NAME ARGS...: one prefcli command, its --json result kept, its seconds and exit code logged
  local name="$1"; shift
  local t0=$(date +%s%N)
  python3 -m prefcli "$@" --json > "$OUT/res/$name.json" 2> "$OUT/res/$name.err"
  local rc=$?
  echo "$name rc=$rc seconds=$(( ($(date +%s%N) - t0) / 1000000000 )) :: prefcli $*" | tee -a "$OUT/commands.txt"
  [ $rc -ne 0 ] && tail -3 "$OUT/res/$name.err"
  return 0
}

custom() {
  local D="$W/custom-data" P=(-w "$W/custom")
  python3 "$HERE/make_data.py" "$D"
  run c-tokenize "${P[@]}" tokenize --input "$D/corpus.txt"
  run c-pretrain "${P[@]}" pretrain "${S[@]}"
  run c-sft "${P[@]}" align --method sft --data "$D/sft.jsonl" "${S[@]}"
  run c-dpo-default "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --out dpo-default "${S[@]}"
  run c-dpo-old "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --rpo-alpha 0 --lr 5e-4 --guard warn --out dpo-old "${S[@]}"
  run c-dpo-old-guard "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --rpo-alpha 0 --lr 5e-4 --out dpo-old-guard "${S[@]}"
  run c-dpo-rpo1-lr2 "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --rpo-alpha 1 --lr 2e-4 --guard warn --out dpo-rpo1-lr2e-4 "${S[@]}"
  run c-dpo-lr1 "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --rpo-alpha 0 --lr 1e-4 --guard warn --out dpo-lr1e-4 "${S[@]}"
  run c-dpo-rpo1-b05 "${P[@]}" align --method dpo --data "$D/pairs.jsonl" --rpo-alpha 1 --beta 0.5 --guard warn --out dpo-rpo1-beta0.5 "${S[@]}"
  run c-rloo "${P[@]}" align --method rloo --reward-fn judge:score --prompts "$D/prompts.jsonl" "${RL[@]}"
  run c-rm "${P[@]}" reward train --data "$D/pairs.jsonl" "${S[@]}"
  run c-compare "${P[@]}" eval compare --model dpo-default --model dpo-old --model dpo-rpo1-lr2e-4 \
      --model dpo-lr1e-4 --model dpo-rpo1-beta0.5 --model rloo --reference sft --prompts "$D/heldout.jsonl" \
      --judge-fn judge:score "${L[@]}"
}

demo() {
  local P=(-w "$W/demo")
  run d-tokenize "${P[@]}" tokenize
  run d-pretrain "${P[@]}" pretrain "${S[@]}"
  run d-sft "${P[@]}" align --method sft "${S[@]}"
  run d-dpo-default "${P[@]}" align --method dpo --out dpo-default "${S[@]}"
  run d-dpo-old "${P[@]}" align --method dpo --rpo-alpha 0 --lr 5e-4 --guard warn --out dpo-old "${S[@]}"
  run d-dpo-rpo1-lr2 "${P[@]}" align --method dpo --rpo-alpha 1 --lr 2e-4 --guard warn --out dpo-rpo1-lr2e-4 "${S[@]}"
  run d-compare "${P[@]}" eval compare --model dpo-default --model dpo-old --model dpo-rpo1-lr2e-4 \
      --reference sft "${L[@]}"
}

nproc; python3 -c "import torch; print(torch.__version__, torch.cuda.is_available())"
for part in ${PARTS:-custom demo}; do "$part" > "$OUT/$part.log" 2>&1 & done
wait
for part in ${PARTS:-custom demo}; do cat "$OUT/$part.log"; done
python3 "$HERE/summarize.py" "$OUT" | tee "$OUT/summary.md"

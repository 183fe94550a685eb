"""LoRA DPO on CUDA: `prefcli align --method dpo --lora-rank 16` at SmolLM2-135M's shape, bf16 and fp32.

The GPU machine has no copy of the checkpoint (its GGUF is larger than what travels there), so
this builds a randomly initialised model of exactly SmolLM2-135M-Instruct's shape (30 layers,
hidden 576, 9 heads / 3 key-value heads, 49,152-token vocabulary, tied embeddings): the same
arithmetic per step as the real weights. Tokenizer and chat template: the demo's. Runs the real
command line in a subprocess and prints one JSON document: pairs/s of the training loop, the
whole command's seconds, and that the adapter loads back and gives finite logits.

    python3 benchmarks/lora_gpu_check.py --workspace /tmp/lora-gpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True)


def prefcli(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "prefcli", *args], check=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", default="/tmp/lora-gpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    args = ap.parse_args()
    import torch

    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.data import demo
    from prefcli.model import ModelConfig, Transformer, load_model
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    ws = Path(args.workspace)
    shutil.rmtree(ws, ignore_errors=True)
    prefcli("-w", str(ws), "tokenize")
    tok_dir = ws / "tokenizers/default"
    tok = Tokenizer(tok_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=49152, **SMOL))
    sync_token_ids(model, tok)
    save_model_artifact(Workspace(ws), "smolshape", model, tok_dir, kind="causal_lm", stage="test", config={},
                        parents=[], metrics={}, overwrite=True, chat=True)
    pairs = ws / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in list(demo.preference_pairs("train"))[:args.steps * args.batch_size]))
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "parameters": sum(p.numel() for p in model.parameters())}
    for precision in ("bf16", "fp32"):
        out = f"dpo-{precision}"
        seconds = prefcli("-w", str(ws), "align", "--method", "dpo", "--policy", "smolshape", "--data", str(pairs),
                          "--lora-rank", "16", "--batch-size", str(args.batch_size), "--max-steps", str(args.steps),
                          "--val-fraction", "0", "--max-length", "256", "--precision", precision, "--device", args.device,
                          "--out", out, "--lr", "5e-5")
        lines = [json.loads(x) for x in (ws / "runs" / out / "metrics.jsonl").read_text().splitlines()]
        loop_s = max((x["elapsed"] for x in lines if "elapsed" in x), default=None)  # the trainer's own clock
        adapter = load_model(ws / "models" / out, device=args.device)
        with torch.no_grad():
            logits = adapter(torch.tensor([tok.chat_ids([{"role": "user", "content": "What is 2 plus 3?"}], True)], device=args.device))
        report[precision] = {"command_s": round(seconds, 1), "loop_s": loop_s,
                             "pairs_per_s": round(args.steps * args.batch_size / loop_s, 2) if loop_s else None,
                             "final_loss": lines[-1].get("loss"), "adapter_files": sorted(p.name for p in (ws / "models" / out).iterdir()),
                             "logits_finite": bool(torch.isfinite(logits).all())}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

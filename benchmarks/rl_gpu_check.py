"""Online RL on a GPU: each of ppo, grpo and rloo trains a few steps on CUDA (bf16 autocast).

A check for a machine with a GPU, not a test: builds a throwaway workspace with the demo
tokenizer, a random tiny chat policy and a random reward model, runs
`prefcli align --method M --device cuda` for a few steps each, and prints what they logged.

    python3 benchmarks/rl_gpu_check.py [--steps 4] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prefcli.cli import main as cli  # noqa: E402


def run(*args) -> None:
    try:
        cli([str(a) for a in args])
    except SystemExit as e:
        if e.code:
            raise RuntimeError(f"prefcli {' '.join(map(str, args))} exited with {e.code}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    from prefcli.data import demo
    from prefcli.model import Transformer, make_config
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    root = Path(tempfile.mkdtemp())
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(list(demo.corpus_documents())[:1500]))
    ws = root / "ws"
    run("-w", ws, "tokenize", "-i", corpus)
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    for name, kind in (("sft", "causal_lm"), ("rm", "reward")):
        torch.manual_seed(0)
        model = Transformer(make_config("tiny", tok.vocab_size), lm_head=kind == "causal_lm", score_head=kind == "reward")
        sync_token_ids(model, tok)
        save_model_artifact(Workspace(ws), name, model, tok_path, kind=kind, stage="check", config={}, parents=[],
                            metrics={}, overwrite=False, chat=kind == "causal_lm")
    print(f"device {args.device}: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'cpu'}")
    for method in ("grpo", "rloo", "ppo"):
        run("-w", ws, "align", "--method", method, "--reward-model", "rm", "--reward-fn", "demo", "--max-steps", args.steps,
            "--save-every", max(1, args.steps // 2), "--device", args.device, "--max-tokens", 32)
        last = json.loads((ws / "runs" / method / "metrics.jsonl").read_text().splitlines()[-1])
        bad = [k for k, v in last.items() if isinstance(v, float) and v != v]
        print(method, "ok" if not bad else f"NaN in {bad}",
              {k: round(v, 4) for k, v in last.items() if k in ("loss", "reward", "kl", "entropy", "clipfrac", "value_loss",
                                                                 "time/generate_s", "time/train_s")})
    # Resume on the GPU: drop the last checkpoint of grpo and finish again; the weights must match.
    from safetensors.torch import load_file

    final = load_file(ws / "models/grpo/model.safetensors")
    import shutil

    shutil.rmtree(ws / "runs/grpo/checkpoints" / f"step-{args.steps:06d}")
    run("-w", ws, "align", "--method", "grpo", "--reward-model", "rm", "--reward-fn", "demo", "--max-steps", args.steps,
        "--save-every", max(1, args.steps // 2), "--device", args.device, "--max-tokens", 32, "--resume")
    again = load_file(ws / "models/grpo/model.safetensors")
    print("resume on", args.device, "bit-identical:", all(torch.equal(final[k], again[k]) for k in final))


if __name__ == "__main__":
    main()

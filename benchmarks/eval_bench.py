"""Speed of `eval compare`: the 300 held-out demo prompts x 2 models (a policy and a reference).

Builds a workspace with the demo tokenizer and two randomly initialised models of
a preset size, then times `compare` (sampling, gold judge, KL by a teacher-forced pass) for a
few generation batch sizes. Random models rarely emit the stop token, so every reply runs to
--max-tokens: the worst case (a trained SFT model stops after ~20 tokens).

    python3 benchmarks/eval_bench.py --threads 2 --batch-sizes 32 64 128 300
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prefcli.model import Transformer, count_parameters, make_config
from prefcli import measure
from prefcli.artifacts import load_model_artifact, save_model_artifact
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (the demo machine has 2 cores)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 300])
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from prefcli.cli import main as cli

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                cli(["-w", str(root), "tokenize", "--json"])
        except SystemExit as e:
            assert not e.code
        ws = Workspace(root)
        vocab = Tokenizer(root / "tokenizers/default").vocab_size
        for seed, name in enumerate(("sft", "dpo")):
            torch.manual_seed(seed)
            model = Transformer(make_config(args.size, vocab))
            save_model_artifact(ws, name, model, root / "tokenizers/default", kind="causal_lm", stage="bench",
                                config={}, parents=[], metrics={}, overwrite=True, chat=True)
        ref = load_model_artifact(ws, "sft", "--reference", device=args.device)
        pol = load_model_artifact(ws, "dpo", "--model", device=args.device)
        print(f"{args.size}: {count_parameters(pol.model):,} parameters, {args.prompts} prompts x 2 models, "
              f"up to {args.max_tokens} tokens, device {args.device}, {torch.get_num_threads()} threads")
        measure.compare({"dpo": pol}, ref, limit=args.prompts, reference_name="sft", max_tokens=args.max_tokens,
                   batch_size=16)  # warm-up
        for bs in args.batch_sizes:
            t = time.perf_counter()
            res = measure.compare({"dpo": pol}, ref, limit=args.prompts, reference_name="sft", max_tokens=args.max_tokens,
                             batch_size=bs)
            sec = time.perf_counter() - t
            tokens = sum(s["tokens"] for row in res["samples"] for s in row["replies"]["dpo"] + row["reference"])
            print(f"batch {bs:4d}: {sec:6.2f} s  ({tokens / sec:,.0f} reply tokens/s)")


if __name__ == "__main__":
    main()

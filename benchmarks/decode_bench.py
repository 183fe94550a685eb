"""Decode speed: prefcli `generate` vs transformers `generate` on the same weights.

Saves a randomly initialised prefcli model of a preset size, loads the folder with
AutoModelForCausalLM, and times greedy decoding of the same prompts with both, for
batch 1 and batch 16. Prints tokens/s (new tokens only, prefill included) and the ratio.

    python3 benchmarks/decode_bench.py --size small --new-tokens 128 --device cpu
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prefcli.generate import generate
from prefcli.model import Transformer, make_config, save_model


def time_it(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs (after one warm-up): least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(0)
    config = make_config(args.size, args.vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # The new-token budget must fit the context of both models.
    config.max_position_embeddings = max(config.max_position_embeddings, args.prompt_tokens + args.new_tokens)
    model = Transformer(config).to(args.device).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()

    print(f"size {args.size}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"device {args.device}, threads {torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"{'batch':>5} {'prefcli tok/s':>14} {'transformers tok/s':>19} {'ratio':>6}  same tokens")
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        # Token 0..2 are pad/bos/eos: keep them out so no row stops early.
        prompts = torch.randint(3, args.vocab, (batch, args.prompt_tokens), generator=g)
        # No stop ids on either side: every row decodes exactly new_tokens tokens.
        ours_out = []

        def ours():
            ours_out[:] = generate(model, prompts.tolist(), max_new_tokens=args.new_tokens, temperature=0)

        gen_config = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, eos_token_id=None, pad_token_id=0)
        theirs_out = []

        def theirs():
            with torch.inference_mode():
                ids = prompts.to(args.device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
            theirs_out[:] = out[:, args.prompt_tokens:].tolist()

        t_ours = time_it(ours, args.repeats)
        t_theirs = time_it(theirs, args.repeats)
        same = [c.tokens for c in ours_out] == theirs_out
        n = batch * args.new_tokens
        print(f"{batch:>5} {n / t_ours:>14.0f} {n / t_theirs:>19.0f} {t_theirs / t_ours:>5.1f}x  {same}")


if __name__ == "__main__":
    main()

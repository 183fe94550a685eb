"""Decode speed: prefcli `generate` vs transformers `generate` on the same weights.

Saves a randomly initialised prefcli model of a preset size, loads the folder with
AutoModelForCausalLM, and times greedy decoding of the same prompts with both, for
batch 1 and batch 16. Prints tokens/s (new tokens only, prefill included), the ratio,
whether both produced the same tokens, and the "matmul floor": the speed of the weight
matmuls alone, which bounds what any eager engine can reach.

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
from prefcli.model import Transformer, count_parameters, make_config, save_model


def time_it(fn, repeats: int) -> float:
    """Best wall time of `repeats` runs (after one warm-up): the run least disturbed by other load."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_floor(model: Transformer, batch: int, steps: int, device: str) -> float:
    """Seconds for just the weight matmuls of `steps` decode steps: what no eager engine beats.

    Every step streams all weights once (q|k|v, o, gate|up, down per layer, then lm_head); at
    batch 1 on a CPU that is memory-bound, at larger batches compute-bound.
    """
    weights = []
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        weights += [torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight]
    weights.append(model.lm_head.weight)
    weights = [w.detach().contiguous() for w in weights]
    inputs = [torch.randn(batch, 1, w.shape[1], device=device) for w in weights]

    def run():
        with torch.inference_mode():
            for _ in range(steps):
                for w, x in zip(weights, inputs):
                    torch.nn.functional.linear(x, w)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return time_it(run, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="model preset (tiny, small, base, gpt2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (best is kept)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--static", choices=["auto", "on", "off"], default="auto",
                    help="prefcli's fixed-shape decode replayed from a CUDA graph (auto: on CUDA)")
    args = ap.parse_args()
    static = {"auto": None, "on": True, "off": False}[args.static]
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    # No eos/pad in the model: neither side may stop early, every row decodes new_tokens tokens.
    config = make_config(args.size, args.vocab)
    config.max_position_embeddings = max(config.max_position_embeddings, args.prompt_tokens + args.new_tokens)
    model = Transformer(config).to(args.device).eval()
    with tempfile.TemporaryDirectory() as folder:
        save_model(model, folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=0)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    print(f"size {args.size} ({count_parameters(model) / 1e6:.1f}M params), device {args.device}, "
          f"static decode {args.static}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy, best of {args.repeats}")
    print(f"{'batch':>5} {'prefcli tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'matmul floor tok/s':>19}  same tokens")
    for batch in [int(b) for b in args.batches.split(",")]:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(3, args.vocab, (batch, args.prompt_tokens), generator=g)
        ours_out, theirs_out = [], []

        def ours():
            ours_out[:] = generate(model, prompts.tolist(), max_new_tokens=args.new_tokens, temperature=0,
                                   static=static)
            sync()

        def theirs():
            with torch.inference_mode():
                ids = prompts.to(args.device)
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_config)
            theirs_out[:] = out[:, args.prompt_tokens:].tolist()

        t_ours = time_it(ours, args.repeats)
        t_theirs = time_it(theirs, args.repeats)
        t_floor = matmul_floor(model, batch, args.new_tokens, args.device)
        same = [c.tokens for c in ours_out] == theirs_out
        n = batch * args.new_tokens
        print(f"{batch:>5} {n / t_ours:>14.0f} {n / t_theirs:>19.0f} {t_theirs / t_ours:>5.2f}x "
              f"{n / t_floor:>19.0f}  {same}", flush=True)


if __name__ == "__main__":
    main()

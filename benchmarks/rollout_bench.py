"""Rollout speed in online RL: prefcli `generate` vs transformers `generate` on the same policy.

Samples replies to the built-in RL prompts the way `prefcli align --method grpo|rloo|ppo` does
in every step (N samples per prompt in one batch, temperature 1, no top-k/top-p, stop at the
end-of-turn token), once with prefcli's KV-cache engine and once with transformers'
`generate` on the same weights (the model folder loaded with AutoModelForCausalLM, the same
left-padded prompts, batch and max tokens). Prints reply tokens/s of each (the tokens up to
and including the stop token; both prefill and decode timed) and their ratio.

prefcli also returns every token's log-prob, which RL needs; transformers is timed without
(`output_scores` off), so the comparison favours it.

    python3 benchmarks/rollout_bench.py                        # a random tiny chat model
    python3 benchmarks/rollout_bench.py -w /tmp/rlws --model sft  # a trained policy (replies stop early)
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


def best_times(fns, repeats: int) -> list[tuple[float, object]]:
    """Best wall time of each function over `repeats` rounds (after one warm-up), and its last result.

    The functions take turns within each round, so a burst of load from other processes hits
    both rather than one of them.
    """
    results = [[float("inf"), fn()] for fn in fns]
    for _ in range(repeats):
        for r, fn in zip(results, fns):
            t = time.perf_counter()
            r[1] = fn()
            r[0] = min(r[0], time.perf_counter() - t)
    return [tuple(r) for r in results]


def load_policy(args):
    """(model, tokenizer, folder): a workspace model, or a random tiny chat model on the demo tokenizer."""
    from prefcli.tokenizer import Tokenizer

    if args.workspace:
        from prefcli.artifacts import load_model_artifact
        from prefcli.workspace import Workspace

        loaded = load_model_artifact(Workspace(args.workspace), args.model, "--model", kind="causal_lm")
        return loaded.model, loaded.tokenizer, loaded.path
    from prefcli.data import demo
    from prefcli.artifacts import sync_token_ids
    from prefcli.tokenizer import save_tokenizer, train_bpe

    folder = Path(tempfile.mkdtemp())
    save_tokenizer(train_bpe(list(demo.corpus_documents())[:2000], 2048), folder)
    tok = Tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size))
    sync_token_ids(model, tok)
    save_model(model, folder)
    return model, tok, folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-w", "--workspace", help="workspace holding --model (default: a random tiny model)")
    ap.add_argument("--model", default="sft")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per batch")
    ap.add_argument("--num-generations", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs (best is kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from prefcli.data import demo

    transformers.logging.set_verbosity_error()
    model, tok, folder = load_policy(args)
    model = model.to(args.device).eval()
    hf = AutoModelForCausalLM.from_pretrained(str(folder)).to(args.device).eval()
    stop, pad = tok.stop_ids(chat=True), tok.pad_id

    messages = [[{"role": "user", "content": r["prompt"]}] for r in demo.rl_prompts()[: args.prompts]]
    prompts = [tok.chat_ids(m, add_generation_prompt=True) for m in messages for _ in range(args.num_generations)]
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=args.device)
    attn = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=args.device)
    with torch.inference_mode():  # the same weights: the same next-token logits
        diff = (hf(ids, attention_mask=attn).logits[:, -1] - model(ids, attention_mask=attn)[:, -1]).abs().max().item()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def ours():
        out = generate(model, prompts, max_new_tokens=args.max_tokens, temperature=1.0, stop_ids=stop, pad_id=pad, seed=0)
        sync()
        return sum(len(c.tokens) for c in out)

    gen_config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
                                  eos_token_id=stop, pad_token_id=pad)

    def theirs():
        torch.manual_seed(0)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=attn, generation_config=gen_config)[:, longest:]
        sync()
        n = 0
        for row in out.tolist():  # reply tokens up to and including the first stop token
            ends = [i for i, t in enumerate(row) if t in stop]
            n += ends[0] + 1 if ends else len(row)
        return n

    (t_ours, n_ours), (t_theirs, n_theirs) = best_times([ours, theirs], args.repeats)
    rate_ours, rate_theirs = n_ours / t_ours, n_theirs / t_theirs
    print(f"model {args.model if args.workspace else 'random tiny'} ({count_parameters(model) / 1e6:.1f}M params), "
          f"device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; max logit difference {diff:.1e}")
    print(f"batch {len(prompts)} ({args.prompts} prompts x {args.num_generations} samples), prompts {longest} tokens "
          f"(left-padded), up to {args.max_tokens} new tokens, temperature 1, best of {args.repeats}")
    print(f"{'engine':>13} {'reply tokens':>13} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'prefcli':>13} {n_ours:>13} {t_ours:>8.3f} {rate_ours:>9.0f}")
    print(f"{'transformers':>13} {n_theirs:>13} {t_theirs:>8.3f} {rate_theirs:>9.0f}")
    print(f"ratio (prefcli / transformers tokens/s): {rate_ours / rate_theirs:.2f}x")


if __name__ == "__main__":
    main()

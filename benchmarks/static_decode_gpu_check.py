"""CUDA check of the fixed-shape decode replayed from a CUDA graph: same greedy tokens as the
dynamic decode (fp32 and bf16), and batch-1 speed of both. Prints one JSON document.

    python3 benchmarks/static_decode_gpu_check.py --size gpt2 --vocab 50257
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefcli.generate import generate  # noqa: E402
from prefcli.model import Transformer, make_config  # noqa: E402


def tokens_per_s(model, prompts, new_tokens, static, sync):
    generate(model, prompts, max_new_tokens=new_tokens, temperature=0, static=static)  # warm-up
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        out = generate(model, prompts, max_new_tokens=new_tokens, temperature=0, static=static)
        sync()
        best = min(best, time.perf_counter() - t)
    return len(prompts) * new_tokens / best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="gpt2")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (no CUDA graph)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = make_config(args.size, args.vocab)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    report = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__, "size": args.size}
    g = torch.Generator().manual_seed(0)
    ragged = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in (16, 9, 16, 30)]
    for dtype in (torch.float32, torch.bfloat16):
        model = Transformer(cfg).to(args.device, dtype).eval()
        name = str(dtype).removeprefix("torch.")
        dyn = generate(model, ragged, max_new_tokens=32, temperature=0, static=False)
        sta = generate(model, ragged, max_new_tokens=32, temperature=0, static=True)
        same = [sum(a == b for a, b in zip(x.tokens, y.tokens)) for x, y in zip(dyn, sta)]
        first_diff = [next((i for i, (a, b) in enumerate(zip(x.tokens, y.tokens)) if a != b), None) for x, y in zip(dyn, sta)]
        lp = max(abs(a - b) for x, y in zip(dyn, sta) for a, b in zip(x.logprobs[:4], y.logprobs[:4]))
        report[name] = {"same_tokens_of_32_per_row": same, "first_differing_token": first_diff,
                        "max_logprob_diff_first_4": lp}
        speeds = {}
        for batch in (1, 16):
            prompts = [ragged[0]] * batch if batch == 1 else [torch.randint(3, args.vocab, (16,), generator=g).tolist() for _ in range(batch)]
            eager, _ = tokens_per_s(model, prompts, args.new_tokens, False, sync)
            graphed, _ = tokens_per_s(model, prompts, args.new_tokens, True, sync)
            speeds[f"batch{batch}"] = {"dynamic_tok_s": round(eager), "cuda_graph_tok_s": round(graphed),
                                       "ratio": round(graphed / eager, 2)}
        report[name]["speed"] = speeds
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

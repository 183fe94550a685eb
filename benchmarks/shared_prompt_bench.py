"""The DPO step with each prompt run once for both replies (shared) or twice (two rows), A/B.

One process, the two variants interleaved, best of --repeats per variant, so load from other
processes hits both alike. A step is the preference stage's own loss (`_loss_fn`, with length
groups) forward and backward on one batch; "ref" is the reference pass (no gradients).

    python benchmarks/shared_prompt_bench.py                  # every regime
    python benchmarks/shared_prompt_bench.py --regimes tiny small

Regimes: tiny / small = the `tiny` / `small` presets (vocab 2048) on the demo pairs (batch 32);
smol = a SmolLM2-135M-shaped model cut to 4 layers (hidden 576, 9 heads / 3 kv, vocab 49152)
on synthetic pairs with long prompts (batch 8); sweep = the small model on synthetic pairs
of growing prompt share, and short prompts with long replies (where the longer rows' attention
could cost more than the prompt saves; what inference.worth_sharing was checked against).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def demo_items(n: int):
    from prefcli.data import demo
    from prefcli.data.examples import pair_from_row
    from prefcli.stages.preference import items_from_pairs
    from prefcli.tokenizer import Tokenizer

    ws = Path(tempfile.mkdtemp(prefix="shared-bench-"))
    subprocess.run([sys.executable, "-m", "prefcli", "-w", str(ws), "tokenize"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tok = Tokenizer(ws / "tokenizers/default")
    rows = list(demo.preference_pairs("train"))[:n]
    return items_from_pairs([pair_from_row(r) for r in rows], tok, 256, True)


def synthetic_items(n: int, prompt: tuple[int, int], reply: tuple[int, int], vocab: int, seed: int = 0):
    """Pairs of random tokens: prompt and reply lengths drawn uniformly from the ranges given."""
    from prefcli.data.examples import Encoded
    from prefcli.stages.preference import Item

    rng = random.Random(seed)
    items = []
    for _ in range(n):
        p = [rng.randrange(3, vocab) for _ in range(rng.randint(*prompt))]

        def enc():
            r = [rng.randrange(3, vocab) for _ in range(rng.randint(*reply))]
            return Encoded(p + r, [0] * len(p) + [1] * len(r), len(p))

        items.append(Item(enc(), enc()))
    return items


def model_of(regime: str):
    from prefcli.model import Transformer, make_config

    torch.manual_seed(0)
    if regime == "smol":
        cfg = make_config("small", 49152, dim=576, layers=4, heads=9, kv_heads=3, ffn_dim=1536, context=2048)
    else:
        cfg = make_config("tiny" if regime == "tiny" else "small", 2048, context=1024)
    return Transformer(cfg)


def ab(model, items, repeats: int, ref: bool):
    """Best seconds of a DPO step (and of the no-grad pass) per variant, wall clock and this
    process's CPU time: {(what, clock, shared): s}. On a loaded machine CPU time (with one
    thread) is the steadier of the two."""
    from prefcli.inference import pair_sequence_logps
    from prefcli.objectives.preference import METHODS
    from prefcli.stages.preference import PreferenceConfig, _loss_fn, _pairs

    cfg = PreferenceConfig(method="dpo").resolved()
    ref_logps = torch.randn(2 * len(items)) - 30
    idx = list(range(len(items)))
    step = {s: _loss_fn(cfg, METHODS["dpo"], cfg.beta, {}, items, ref_logps, 0, lambda: "cpu", shared=s)
            for s in (True, False)}
    best = {(what, clock, s): float("inf") for what in ("step", "ref") for clock in ("wall", "cpu") for s in (True, False)}

    def timed(what, s, fn):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best[what, "wall", s] = min(best[what, "wall", s], time.perf_counter() - w)
        best[what, "cpu", s] = min(best[what, "cpu", s], time.process_time() - c)

    model.train()
    for s in (True, False):  # warm up both
        step[s](model, idx)[0].backward()
    for _ in range(repeats):
        for s in (True, False):
            model.zero_grad(set_to_none=True)
            timed("step", s, lambda: step[s](model, idx)[0].backward())
            if ref:
                timed("ref", s, lambda: pair_sequence_logps(model, _pairs(items), len(items), shared=s))
                model.train()
    return best


def describe(items, config) -> str:
    from prefcli.data.examples import shares_prompt
    from prefcli.inference import worth_sharing

    pairs = [(it.chosen, it.rejected) for it in items]
    total = sum(len(a.ids) + len(b.ids) for a, b in pairs)
    saved = sum(a.prompt_len for a, b in pairs if shares_prompt(a, b))
    p = sum(a.prompt_len for a, _ in pairs) / len(pairs)
    c = sum(len(a.ids) - a.prompt_len for a, _ in pairs) / len(pairs)
    r = sum(len(b.ids) - b.prompt_len for _, b in pairs) / len(pairs)
    auto = sum(worth_sharing(pairs, config)) / len(pairs)
    return (f"prompt {p:.0f} chosen {c:.0f} rejected {r:.0f} tokens (means); one row saves {saved / total:.0%}"
            f" of the tokens; the rule shares {auto:.0%} of the pairs")


def report(name: str, items, model, repeats: int, ref: bool = True) -> None:
    b = ab(model, items, repeats, ref)
    print(f"{name:<30} {describe(items, model.config)}", flush=True)
    for what in ("step", "ref") if ref else ("step",):
        print(f"{'':<4}{what:<5}" + "   ".join(
            f"{clock}: shared {b[what, clock, True] * 1e3:7.1f} ms, two rows {b[what, clock, False] * 1e3:7.1f} ms, "
            f"{b[what, clock, False] / b[what, clock, True]:.2f}x" for clock in ("cpu", "wall")), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", nargs="+", default=["tiny", "small", "smol", "sweep"],
                    choices=["tiny", "small", "smol", "sweep"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time measures the work alone)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.repeats}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    demo = demo_items(32) if {"tiny", "small"} & set(args.regimes) else None
    for regime in args.regimes:
        if regime in ("tiny", "small"):
            report(f"{regime} (demo pairs x32)", demo, model_of(regime), args.repeats)
        elif regime == "smol":
            model = model_of("smol")
            for prompt, reply in (((200, 400), (30, 120)), ((50, 100), (50, 150))):
                items = synthetic_items(8, prompt, reply, 49152)
                report(f"smol4 x8 prompt {prompt[0]}-{prompt[1]}", items, model, args.repeats, ref=False)
        else:
            model = model_of("small")
            for prompt, reply in (((2, 4), (10, 50)), ((8, 16), (10, 50)), ((16, 32), (10, 50)), ((48, 64), (10, 50)),
                                  ((96, 128), (10, 50)), ((2, 4), (200, 300)), ((16, 32), (200, 300))):
                items = synthetic_items(32 if reply[1] <= 50 else 8, prompt, reply, 2048)
                report(f"sweep small x{len(items)} p {prompt[0]}-{prompt[1]} r {reply[0]}-{reply[1]}", items, model,
                       args.repeats, ref=False)


if __name__ == "__main__":
    main()

"""Where should a preference vector enter the model? Added to every token's embedding
(prefcli's choice, `prefcli.steer`) or as a soft prefix: the same projection added to the
first token (<|bos|>) only, so the rest of the sequence reads it through attention, like
a prefix embedding.

Both are trained by the same stage (`align --method steer`, same data, steps and seed)
from the same sft model, then sampled on the demo's held-out prompts at temperature 1
with each attribute's weight at 0 (the others at 1) and at the defaults (all 1), and
judged by the gold judge.

    prefcli -w /tmp/steerws tokenize && prefcli -w /tmp/steerws pretrain && prefcli -w /tmp/steerws align --method sft
    python benchmarks/steer_modes.py -w /tmp/steerws [--steps 300] [--prompts 300]

Prints a markdown table: per mode and setting, the gold rate of each attribute.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from prefcli.data import demo
from prefcli.generate import Completion, _decode, _generator
from prefcli.model import KVCache, fused_projections, load_model
from prefcli.stages import steer as stage
from prefcli.steer import SteeredLM, load_steering
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace


class PrefixSteeredLM(SteeredLM):
    """The alternative: the offset on the first token only (batches are right-padded: column 0 is <|bos|>)."""

    def forward(self, input_ids, vectors, **kwargs):
        first = torch.zeros(input_ids.shape[1], 1, device=input_ids.device)
        first[0] = 1
        return self.lm(input_ids, embed_offset=self.steering(vectors)[:, None, :] * first, **kwargs)


def train(ws: Path, mode: str, steps: int) -> float:
    out = f"steer-{mode}"
    if (ws / "models" / out).exists():
        return 0.0
    t0 = time.time()
    stage.SteeredLM = PrefixSteeredLM if mode == "prefix" else SteeredLM
    try:
        stage.run(stage.SteerConfig(out=out, max_steps=steps, overwrite=True), Workspace(ws))
    finally:
        stage.SteeredLM = SteeredLM
    return time.time() - t0


@torch.inference_mode()
def sample(model, prompts: list[list[int]], offset, mode: str, pad: int, stop, seed: int, max_tokens: int = 64):
    """Temperature-1 replies; the offset on every token (add) or on each row's first token only (prefix)."""
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    completions = [Completion() for _ in prompts]
    gen = _generator(seed, ids.device)
    with fused_projections(model):
        cache = KVCache.for_model(model, len(prompts), longest + max_tokens)
        if offset is None:
            per_token, per_step = None, None
        elif mode == "add":
            per_token = per_step = offset.expand(len(prompts), -1)
        else:
            first = (mask.cumsum(-1) == 1) & mask.bool()  # each row's first real token
            per_token, per_step = offset[None, None, :] * first[..., None], None
        h = model(ids, attention_mask=mask, kv_cache=cache, return_hidden=True, embed_offset=per_token)
        _decode(model, cache, model.lm_head(h[:, -1]), completions, max_tokens, 1.0, 0, 1.0, stop, gen, None, per_step)
    return completions


def measure(ws: Path, mode: str, n_prompts: int, seed: int) -> dict:
    folder = ws / "models" / f"steer-{mode}"
    tok, model = Tokenizer(folder), load_model(folder).eval()
    steering = load_steering(folder, model.config.hidden_size)
    rows = demo.eval_prompts()[:n_prompts]
    prompt_ids = [tok.chat_ids([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True) for r in rows]
    settings = [("defaults (all 1)", {})] + [(f"{a}=0", {a: 0.0}) for a in steering.attributes]
    out = {}
    for label, prefs in settings:
        offset = steering.offset(prefs)
        scores = []
        for i in range(0, len(rows), 100):
            done = sample(model, prompt_ids[i:i + 100], offset, mode, tok.pad_id, tok.stop_ids(chat=True), seed + i)
            for r, c in zip(rows[i:i + 100], done):
                text = tok.decode(c.tokens[:-1] if c.finished else c.tokens, skip_special_tokens=True)
                scores.append(demo.judge(r["prompt"], text))
        out[label] = {a: sum(s[a] for s in scores) / len(scores) for a in (*demo.ATTRIBUTES, "good")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workspace", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=stage.DEFAULT_STEPS)
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["add", "prefix"])
    args = ap.parse_args()
    results = {}
    for mode in args.modes:
        seconds = train(args.workspace, mode, args.steps)
        results[mode] = measure(args.workspace, mode, args.prompts, args.seed)
        results[mode]["train_seconds"] = round(seconds, 1)
    print(json.dumps(results, indent=2))
    print(f"\n{args.prompts} held-out prompts, temperature 1, gold judge; the rate of each attribute:\n")
    print("| mode | setting | correct | polite | concise | good |\n|---|---|---|---|---|---|")
    for mode, res in results.items():
        for label, r in res.items():
            if isinstance(r, dict):
                print(f"| {mode} | {label} | " + " | ".join(f"{r[a]:.2f}" for a in (*demo.ATTRIBUTES, "good")) + " |")


if __name__ == "__main__":
    main()

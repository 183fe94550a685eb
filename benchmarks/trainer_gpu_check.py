"""Trainer on one CUDA GPU: bf16 autocast, fused AdamW, CUDA RNG in checkpoints, resume,
torch.compile, and throughput eager vs compiled. Prints one JSON document.

    python3 benchmarks/trainer_gpu_check.py /tmp/gpu-check
"""

import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefcli.trainer import Trainer, TrainConfig  # noqa: E402

VOCAB, DIM, SEQ, LAYERS = 2048, 512, 256, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)
        self.drop = nn.Dropout(0.1)

    def forward(self, h):
        return h + self.drop(self.down(F.gelu(self.up(self.norm(h)))))


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as small LMs often are
        nn.init.normal_(self.embed.weight, std=0.02)  # N(0, 1) would make the tied logits huge

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


seen_dtypes = set()


def loss_fn(model, batch):
    logits = model(batch[:, :-1])
    seen_dtypes.add(str(logits.dtype))
    loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    return loss, {"tokens": batch[:, 1:].numel()}


def batches(step, micro):
    g = torch.Generator().manual_seed(step * 16 + micro)
    start = torch.randint(0, VOCAB, (32, 1), generator=g)
    seq = (start * 7 + torch.arange(SEQ + 1) * 3) % VOCAB
    return seq.cuda(non_blocking=True)


def train(run_dir, steps, resume=False, compile=False, save_every=10):
    torch.manual_seed(0)
    cfg = TrainConfig(max_steps=steps, batch_size=32, grad_accum=2, lr=1e-3, warmup=5, save_every=save_every,
                      log_every=1, compile=compile)
    t = Trainer(LM(), loss_fn, batches, cfg, run_dir, desc="gpu")
    t0 = time.perf_counter()
    summary = t.train(resume=resume)
    torch.cuda.synchronize()
    return t, summary, time.perf_counter() - t0


def losses(run_dir):
    return [json.loads(l)["loss"] for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def main(root):
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
    t, s, secs = train(root / "eager", 40)
    out["device"] = str(t.device)
    out["fused_adamw"] = t.optimizer.defaults.get("fused")
    out["logits_dtypes"] = sorted(seen_dtypes)
    out["eager"] = {"seconds": round(secs, 2), "tokens_per_s_last_steps": round(json.loads((root / "eager" / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]), "final_loss": s["train_loss"]}
    ck = root / "eager" / "checkpoints" / "step-000040"
    out["rng_keys"] = sorted(load_file(ck / "rng.safetensors"))
    out["optimizer_keys_sample"] = sorted(load_file(ck / "optimizer.safetensors"))[:4]
    out["model_keys"] = sorted(load_file(ck / "model.safetensors"))[:3]
    final = load_file(ck / "model.safetensors")
    shutil.rmtree(ck)
    train(root / "eager", 40, resume=True)
    again = load_file(ck / "model.safetensors")
    out["resume_bit_identical_on_cuda"] = all(torch.equal(final[k], again[k]) for k in final)
    out["resume_max_abs_diff"] = max((final[k] - again[k]).abs().max().item() for k in final)
    seen_dtypes.clear()
    t, s, secs = train(root / "compiled", 40, compile=True)
    out["compiled"] = {"seconds_incl_compile": round(secs, 2), "tokens_per_s_last_steps": round(json.loads((root / "compiled" / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]), "final_loss": s["train_loss"], "logits_dtypes": sorted(seen_dtypes)}
    out["compiled_vs_eager_max_loss_diff"] = max(abs(a - b) for a, b in zip(losses(root / "eager"), losses(root / "compiled")))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check")

"""A tiny language model trained by prefcli.trainer, run as its own process by the tests
(resume after SIGKILL, torchrun with 2 ranks). Not a test file itself.

    python tests/train_script.py RUN_DIR --steps 12 [--resume] [--fsdp] ...
    python -m torch.distributed.run --nproc_per_node 2 --standalone tests/train_script.py RUN_DIR ...
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefcli.distributed import batch_indices, destroy_distributed  # noqa: E402
from prefcli.trainer import Trainer, TrainConfig  # noqa: E402

VOCAB, DIM, SEQ, EXAMPLES = 32, 16, 8, 64


class Block(nn.Module):
    def __init__(self, dim, dropout):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h):
        return h + self.drop(F.gelu(self.mlp(self.norm(h))))


class TinyLM(nn.Module):
    """Embedding, two residual MLP blocks, a norm and an output matrix."""

    def __init__(self, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(DIM, dropout) for _ in range(2)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def make_data(seed=0):
    """Sequences where the next token is (3 * token + 1) mod VOCAB, with a little noise."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (EXAMPLES,), generator=g)]
    for _ in range(SEQ):
        nxt = (3 * rows[-1] + 1) % VOCAB
        noise = torch.rand(EXAMPLES, generator=g) < 0.1
        rows.append(torch.where(noise, torch.randint(0, VOCAB, (EXAMPLES,), generator=g), nxt))
    return torch.stack(rows, dim=1)  # (EXAMPLES, SEQ + 1)


def lm_loss(model, batch):
    logits = model(batch[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    acc = (logits.argmax(-1) == batch[:, 1:]).float().mean()
    return loss, {"tokens": batch[:, 1:].numel(), "acc": acc}


def run(run_dir, steps=12, batch_size=4, grad_accum=1, save_every=0, dropout=0.0, sleep=0.0, resume=False, fsdp=False):
    """Train TinyLM on the fixed data; every rank and every run starts from the same weights."""
    torch.manual_seed(1234)
    model = TinyLM(dropout)
    data = make_data()

    def batches(step, micro):
        if sleep:
            time.sleep(sleep)
        return data[batch_indices(step, micro, batch_size, grad_accum, EXAMPLES, seed=7)]

    def eval_fn(m):
        loss, _ = lm_loss(m, data[:16])
        return {"val_loss": loss.item()}

    cfg = TrainConfig(
        max_steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2, warmup=2, save_every=save_every,
        eval_every=4, log_every=1, keep_checkpoints=2, seed=3, device="cpu", fsdp=fsdp,
    )
    trainer = Trainer(model, lm_loss, batches, cfg, run_dir, eval_fn=eval_fn, desc="tiny")
    return trainer, trainer.train(resume=resume)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per micro-batch, to leave time for a kill")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--fsdp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run(**vars(args))
    destroy_distributed()


if __name__ == "__main__":
    main()

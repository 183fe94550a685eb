"""`prefcli align --method sft`: supervised fine-tuning on conversations.

Recipe: read conversations (or prompt/completion rows), render them with the
policy's chat template, keep the loss on assistant tokens, pack short examples into
full rows (attention never crosses examples), train, save models/sft.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.data.examples import Encoded, chat_from_row, encode_chat, pack_rows, pad_batch
from prefcli.data.readers import read_rows
from prefcli.errors import PrefcliError
from prefcli.objectives.lm import lm_loss
from prefcli.stages.common import TrainingOptions, load_model_artifact, note, prepare_run, save_model_artifact, train_config
from prefcli.trainer import Trainer, unwrap
from prefcli.workspace import Workspace


@dataclass
class SFTConfig(TrainingOptions):
    data: list[str] = field(default_factory=list)  # empty: the built-in demo chats
    policy: str = "base"
    out: str = "sft"
    train_on_prompt: bool = False
    pack: bool = True
    val_fraction: float = 0.05


DEFAULT_STEPS = 150  # without data to count (not used when there is)
DEFAULT_EPOCHS = 1.68  # 150 steps over the 2,850 demo chats left after the validation split, at batch 32


def conversations(data: list[str]) -> tuple[list[list[dict]], list[dict]]:
    """Conversations from the user's files (or the demo set), and their lineage records."""
    if not data:
        from prefcli.data import demo

        return [chat_from_row(r) for r in demo.sft_conversations()], [{"kind": "input", "name": "demo sft chats (built-in)"}]
    rows = read_rows(data, option="--data")
    return [chat_from_row(r) for r in rows], [{"kind": "input", "path": str(p)} for p in data]


def split_val(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share (at least one item when fraction > 0 and there are two or more)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction))) if fraction > 0 and len(items) > 1 else 0
    val = sorted(order[:n_val])
    val_set = set(val)
    return [items[i] for i in range(len(items)) if i not in val_set], [items[i] for i in val]


def run(cfg: SFTConfig, ws: Workspace) -> dict:
    t0 = time.time()
    if not 0 <= cfg.val_fraction < 1:
        raise PrefcliError(f"--val-fraction {cfg.val_fraction} is out of range", "use a number from 0 up to 1")
    convos, inputs = conversations(cfg.data)
    policy = load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm")
    tok, model = policy.tokenizer, policy.model
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: the tokenizer of {policy.path} has no chat template", "use a tokenizer made by `prefcli tokenize`")
    context = model.config.max_position_embeddings
    encoded = [encode_chat(tok, m, context, cfg.train_on_prompt) for m in convos]
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        note(f"warning: {truncated} of {len(encoded)} conversations are longer than the context ({context} tokens) and were truncated")
    encoded = [e for e in encoded if sum(e.mask[1:]) > 0]  # truncation can cut every assistant token away
    if not encoded:
        raise PrefcliError("--data: no conversation has an assistant token within the context", "use shorter conversations")
    train, val = split_val(encoded, cfg.val_fraction, cfg.seed)
    tcfg = train_config(cfg, len(train), DEFAULT_STEPS, DEFAULT_EPOCHS)
    run_dir = prepare_run(ws, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite)
    pad = tok.pad_id

    def collate(examples: list[Encoded]) -> dict:
        return pack_rows(examples, context, pad) if cfg.pack else pad_batch(examples, pad)

    def batches(step: int, micro: int) -> dict:
        from prefcli.distributed import batch_indices

        idx = batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, len(train), seed=cfg.seed)
        return collate([train[i] for i in idx])

    def forward(model, batch: dict):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), document_ids=batch.get("document_ids"))
        return lm_loss(logits, batch["input_ids"], batch["loss_mask"])

    def loss_fn(model, batch: dict):
        loss, n = forward(model, batch)
        return loss, {"tokens": int((batch["input_ids"] != pad).sum()), "target_tokens": n}

    def eval_fn(model) -> dict:
        if not val:
            return {}
        total, count = 0.0, 0
        for i in range(0, len(val), cfg.batch_size):
            loss, n = forward(model, pad_batch(val[i : i + cfg.batch_size], pad))
            total += float(loss) * int(n)
            count += int(n)
        return {"val_loss": total / max(count, 1)}

    trainer = Trainer(model, loss_fn, batches, tcfg, run_dir, eval_fn=eval_fn, desc=f"sft {cfg.out}")
    device = trainer.device
    summary = trainer.train(resume=cfg.resume)
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "val_loss": round(summary["val_loss"], 4) if "val_loss" in summary else None,
        "examples": len(train),
        "val_examples": len(val),
        "truncated": truncated,
        "steps": summary["steps"],
        "tokens_per_s": round(summary["tokens_per_s"]),
    }
    save_model_artifact(ws, cfg.out, unwrap(trainer.model).float().cpu(), policy.path, kind="causal_lm", stage="align sft",
                        config=to_dict(cfg), parents=[policy.parent(), *inputs], metrics=metrics,
                        overwrite=cfg.overwrite or cfg.resume, chat=True)
    dist.barrier()
    return {"model": cfg.out, "method": "sft", **metrics, "seconds": round(time.time() - t0, 1)}

"""`prefcli align --method sft`: supervised fine-tuning on conversations.

Recipe: read conversations (or prompt/completion rows), render them with the
policy's chat template, keep the loss on assistant tokens, pack short examples into
full rows (attention never crosses examples), train, save models/sft.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.data import sources
from prefcli.data.examples import Encoded, encode_chat, pack_rows, pad_batch
from prefcli.errors import PrefcliError
from prefcli.config import option
from prefcli.artifacts import (AdapterOptions, TrainingOptions, load_model_artifact, note, prepare_for_training, prepare_run,
                               save_model_artifact, train_config)
from prefcli.model import chunked_lm_loss
from prefcli.trainer import Trainer
from prefcli.workspace import Workspace


@dataclass
class SFTConfig(TrainingOptions, AdapterOptions):
    data: list[str] = option(factory=list, default_text="the method's built-in demo data",  # empty: the demo chats
                             help="Training data files, folders or globs; repeatable.")
    policy: str = option("base", "Model to start from.")
    out: str = option("sft", "Name of the model to write.", default_text="the method's name")
    train_on_prompt: bool = option(False, "Put the loss on every token, not only the assistant's.")
    pack: bool = option(True, "Pack examples into full rows (--no-pack: pad each example instead).")
    val_fraction: float = option(0.05, "Share of the data held out for validation.", ge=0, lt=1)
    max_length: int | None = option(None, "Tokens per conversation; longer ones are cut (and counted).", ge=2,
                                    default_text="the model's context", panel="LoRA and memory")


DEFAULT_STEPS = 150  # without data to count (not used when there is)
DEFAULT_EPOCHS = 1.68  # 150 steps over the 2,850 demo chats left after the validation split, at batch 32


def run(cfg: SFTConfig, ws: Workspace) -> dict:
    t0 = time.time()
    if not 0 <= cfg.val_fraction < 1:
        raise PrefcliError(f"--val-fraction {cfg.val_fraction} is out of range", "use a number from 0 up to 1")
    convos, inputs = sources.conversations(cfg.data)
    policy = load_model_artifact(ws, cfg.policy, "--policy", kind="causal_lm")
    tok, model = policy.tokenizer, prepare_for_training(policy.model, cfg)
    if not tok.has_chat_template:
        raise PrefcliError(f"--policy: the tokenizer of {policy.path} has no chat template", "use a tokenizer made by `prefcli tokenize`")
    context = min(model.config.max_position_embeddings, cfg.max_length or model.config.max_position_embeddings)
    encoded = [encode_chat(tok, m, context, cfg.train_on_prompt) for m in convos]
    truncated = sum(e.truncated for e in encoded)
    if truncated:
        limit = "--max-length" if context == cfg.max_length else "the context"
        note(f"warning: {truncated} of {len(encoded)} conversations are longer than {limit} ({context} tokens) and were truncated")
    encoded = [e for e in encoded if sum(e.mask[1:]) > 0]  # truncation can cut every assistant token away
    if not encoded:
        raise PrefcliError("--data: no conversation has an assistant token within the context", "use shorter conversations")
    train, val = sources.split_val(encoded, cfg.val_fraction, cfg.seed)
    tcfg = train_config(cfg, len(train), DEFAULT_STEPS, DEFAULT_EPOCHS, model=model)
    run_dir = prepare_run(ws, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg))
    pad = tok.pad_id

    def collate(examples: list[Encoded]) -> dict:
        batch = pack_rows(examples, context, pad) if cfg.pack else pad_batch(examples, pad)
        # Counted here: the pad id can be a real token too (SmolLM2 pads with <|im_end|>).
        batch["num_tokens"] = torch.tensor(sum(len(e.ids) for e in examples))
        return batch

    def batches(step: int, micro: int) -> dict:
        from prefcli.distributed import batch_indices

        idx = batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, len(train), seed=cfg.seed)
        return collate([train[i] for i in idx])

    def forward(model, batch: dict):
        batch = {k: v.to(device) for k, v in batch.items()}
        return chunked_lm_loss(model, batch["input_ids"], attention_mask=batch.get("attention_mask"),
                               document_ids=batch.get("document_ids"), loss_mask=batch["loss_mask"])

    def loss_fn(model, batch: dict):
        loss, n = forward(model, batch)
        return loss, {"tokens": int(batch["num_tokens"]), "target_tokens": n}

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
        "lr": float(f"{tcfg.lr:.3g}"),  # the peak rate trained with (`default_lr` when --lr was not given)
        "tokens_per_s": round(summary["tokens_per_s"]),
    }
    save_model_artifact(ws, cfg.out, trainer.full_model().float().cpu(), policy.path, kind="causal_lm", stage="align sft",
                        config=to_dict(cfg), parents=[policy.parent(), *inputs], metrics=metrics,
                        overwrite=cfg.overwrite or cfg.resume, chat=True)
    dist.barrier()
    return {"model": cfg.out, "method": "sft", **metrics, "seconds": round(time.time() - t0, 1)}

"""`prefcli pretrain`: train a model from scratch (or continue one) on a token dataset.

Recipe: open the dataset memory-mapped, build the model (a size preset, or --init),
hand the next-token loss over random windows to the Trainer, save models/<out>.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.config import option
from prefcli.model import SIZE_PRESETS
from prefcli.data.tokens import TokenArray
from prefcli.errors import PrefcliError
from prefcli.generate import generate
from prefcli.model import Transformer, count_parameters, make_config
from prefcli.artifacts import TrainingOptions, load_model_artifact, lr_option, load_token_dataset, prepare_run, save_model_artifact, sync_token_ids, train_config
from prefcli.tokenizer import Tokenizer
from prefcli.trainer import Trainer
from prefcli.workspace import Workspace, parent_ref

VAL_WINDOWS = 64  # validation windows (fixed, non-overlapping): enough for a steady val loss
PRETRAIN_LR = 3e-3  # --lr when not given


@dataclass
class PretrainConfig(TrainingOptions):
    data: str = option("corpus", "Token dataset.")
    init: str | None = option(None, "Continue pretraining this model (prefcli or HF folder) instead of starting from scratch.",
                              default_text="from scratch")
    size: str = option("tiny", "Shape preset: tiny (~1M params), small (~5M), base (~25M), gpt2 (~124M).",
                       choices=SIZE_PRESETS)
    layers: int | None = option(None, "Transformer blocks.", ge=1, default_text="the preset's")
    dim: int | None = option(None, "Hidden size.", ge=1, default_text="the preset's")
    heads: int | None = option(None, "Attention heads.", ge=1, default_text="the preset's")
    kv_heads: int | None = option(None, "Key/value heads (grouped-query attention).", ge=1, default_text="the preset's")
    ffn_dim: int | None = option(None, "MLP hidden size.", ge=1, default_text="the preset's")
    context: int | None = option(None, "Context length in tokens.", ge=2, default_text="the preset's")
    tokens: int | None = option(None, "Train on this many tokens (instead of --max-steps).", ge=1, default_text="off")
    lr: float | None = lr_option(PRETRAIN_LR)
    batch_size: int = 16
    warmup: int = 30
    weight_decay: float = 0.1
    eval_every: int = 100
    save_every: int = 200
    out: str = option("base", "Name of the model to write.")
    sample_tokens: int = option(48, ge=0)


# Default length: passes over the corpus, at most a compute-optimal budget. 5.33 passes is what the
# demo measured well with (600 steps x 16 x 128 tokens over its 230k training tokens, ~1 minute on
# 2 cores); a big corpus stops at 20 tokens per parameter (Chinchilla, as nanochat does) instead.
DEFAULT_EPOCHS = 5.33
TOKENS_PER_PARAMETER = 20


def default_steps(train_tokens: int, parameters: int, tokens_per_step: int) -> int:
    """Steps for the default budget: DEFAULT_EPOCHS passes, capped at TOKENS_PER_PARAMETER x parameters."""
    budget = min(DEFAULT_EPOCHS * train_tokens, TOKENS_PER_PARAMETER * parameters)
    return max(1, math.ceil(budget / tokens_per_step))


def unigram_loss(ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the best context-free model: the token frequencies themselves."""
    counts = torch.bincount(ids, minlength=vocab_size).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def run(cfg: PretrainConfig, ws: Workspace) -> dict:
    t0 = time.time()
    ds_path, ds_meta, tok_path = load_token_dataset(ws, cfg.data)
    tok = Tokenizer(tok_path)
    parents = [parent_ref("datasets", ds_path), parent_ref("tokenizers", tok_path)]
    if cfg.init:
        init = load_model_artifact(ws, cfg.init, "--init", kind="causal_lm")
        if init.tokenizer.identity != tok.identity:  # what it encodes, not the file's bytes
            raise PrefcliError(
                f"--init: the tokenizer of {init.path} does not match the one dataset {ds_path.name} was encoded with",
                "encode the data with that model's tokenizer: `prefcli tokenize --tokenizer PATH`",
            )
        model = init.model
        parents.append(init.parent())
    else:
        model_cfg = make_config(cfg.size, tok.vocab_size, layers=cfg.layers, dim=cfg.dim, heads=cfg.heads,
                                kv_heads=cfg.kv_heads, ffn_dim=cfg.ffn_dim, context=cfg.context)
        torch.manual_seed(cfg.seed)
        model = Transformer(model_cfg)
    sync_token_ids(model, tok)
    context = model.config.max_position_embeddings
    if cfg.init and cfg.context:  # shorter windows than the model's context are fine
        context = min(cfg.context, context)

    train_ids = TokenArray(ds_path / "train.safetensors")
    val_ids = TokenArray(ds_path / "val.safetensors")
    if len(train_ids) < context + 2:
        raise PrefcliError(f"--data: {ds_path.name} has {len(train_ids)} training tokens, fewer than one window of {context + 1}",
                           "use more text, or a smaller --context")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * context * dist.world_size()
    steps_cfg = cfg
    if cfg.max_steps is None:  # --max-steps, else --tokens, else --epochs, else the default budget
        if cfg.tokens is not None:
            budget = cfg.tokens
        elif cfg.epochs is not None:
            budget = cfg.epochs * len(train_ids)
        else:
            budget = None
        steps = (max(1, math.ceil(budget / tokens_per_step)) if budget is not None
                 else default_steps(len(train_ids), count_parameters(model), tokens_per_step))
        steps_cfg = dataclasses.replace(cfg, max_steps=steps)
    # from scratch: the measured rate; continued from --init: as fine-tuning, lower for a big model
    tcfg = train_config(steps_cfg, stage_lr=PRETRAIN_LR, model=model if cfg.init else None)
    run_dir = prepare_run(ws, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg))

    def batches(step: int, micro: int) -> torch.Tensor:
        """Random windows of context+1 tokens: a pure function of (seed, step, micro, rank)."""
        g = torch.Generator().manual_seed(hash((cfg.seed, step, micro, dist.rank())) & 0x7FFF_FFFF_FFFF)
        starts = torch.randint(0, len(train_ids) - context - 1, (cfg.batch_size,), generator=g).tolist()
        return torch.stack([train_ids[s : s + context + 1] for s in starts])

    def loss_fn(model, windows: torch.Tensor):
        windows = windows.to(device)
        logits = model(windows[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())
        return loss, {"tokens": windows.shape[0] * context}

    n_val = min(VAL_WINDOWS, len(val_ids) // (context + 1))
    val_windows = torch.stack([val_ids[i * (context + 1) : (i + 1) * (context + 1)] for i in range(n_val)]) if n_val else None

    def eval_fn(model) -> dict:
        if val_windows is None:
            return {}
        losses = []
        for chunk in val_windows.split(cfg.batch_size):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1])
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
        return {"val_loss": float(torch.stack(losses).sum()) / (n_val * context)}

    trainer = Trainer(model, loss_fn, batches, tcfg, run_dir, eval_fn=eval_fn, desc=f"pretrain {cfg.out}")
    device = trainer.device
    summary = trainer.train(resume=cfg.resume)
    bare = trainer.full_model()  # every rank: under FSDP, gathered from the shards

    sample = ""
    if cfg.sample_tokens > 0 and dist.is_main():
        bare.eval()
        out = generate(bare, [[tok.bos_id if tok.bos_id is not None else tok.eos_id]], max_new_tokens=cfg.sample_tokens,
                       temperature=0.8, top_k=50, stop_ids=[tok.eos_id], seed=cfg.seed)
        sample = tok.decode(out[0].tokens, skip_special_tokens=False).replace("<|eos|>", "")
    unigram = unigram_loss(train_ids[0 : min(len(train_ids), 10_000_000)], tok.vocab_size)
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "val_loss": round(summary["val_loss"], 4) if "val_loss" in summary else None,
        "unigram_loss": round(unigram, 4),
        "parameters": count_parameters(bare),
        "steps": summary["steps"],
        "tokens": int(summary["tokens"]),
        "passes": round(summary["tokens"] / len(train_ids), 2),
        "tokens_per_s": round(summary["tokens_per_s"]),
    }
    save_model_artifact(ws, cfg.out, bare.float().cpu(), tok_path, kind="causal_lm", stage="pretrain",
                        config=to_dict(cfg), parents=parents, metrics=metrics,
                        overwrite=cfg.overwrite or cfg.resume, chat=False, extra_meta={"sample": sample})
    dist.barrier()
    return {"model": cfg.out, **metrics, "sample": sample, "seconds": round(time.time() - t0, 1)}

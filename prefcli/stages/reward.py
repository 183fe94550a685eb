"""`prefcli reward train` and `prefcli reward score`: the model that stands in for human preferences.

Recipe (train): read preference pairs, put a scalar `score` head on a backbone
(sft if present, else base), minimise the Bradley-Terry loss on chosen vs rejected
(one forward pass for both), report held-out accuracy, save models/rm as an HF
sequence-classification folder (one label).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prefcli import distributed as dist
from prefcli.config import to_dict
from prefcli.artifacts import (AdapterOptions, TrainingOptions, load_model_artifact, lr_option, note, prepare_for_training, prepare_run,
                               save_model_artifact, train_config)
from prefcli.data import sources
from prefcli.data.examples import Pair, encode_completion, pad_batch, pair_from_row, prompt_from_row
from prefcli.data.readers import read_rows
from prefcli.errors import PrefcliError
from prefcli.inference import RewardScorer, SequenceScores, encoded_scores, last_token_scores, length_groups
from prefcli.config import option
from prefcli.objectives.reward import bradley_terry_loss
from prefcli.tokenizer import Tokenizer
from prefcli.trainer import Trainer
from prefcli.workspace import Workspace, check_output_file


STAGE_LR = 5e-4  # --lr when not given (full fine-tuning of a bigger model: `default_lr`)


@dataclass
class RewardConfig(TrainingOptions, AdapterOptions):
    data: list[str] = option(factory=list, default_text="the built-in demo pairs",  # empty: the built-in demo pairs
                             help="Preference pairs (prompt/chosen/rejected[/margin], strings or message lists; .jsonl/.json/.parquet); repeatable.")
    base: str | None = option(None, "Backbone.", default_text="sft if it exists, else base")
    out: str = option("rm", "Name of the reward model.")
    center_rewards: float = option(0.0, "Coefficient of the reward-centering term mean((r_c + r_r)^2).", ge=0)
    val_fraction: float = option(0.05, "Share of pairs held out for validation.", ge=0, lt=1)
    max_length: int | None = option(None, "Tokens per prompt + reply; longer pairs are cut (and counted).", ge=2,
                                    default_text="the model's context", panel="LoRA and memory")
    max_prompt_length: int | None = option(None, "Prompt tokens kept (its last ones).", ge=1, default_text="no limit",
                                           panel="LoRA and memory")
    lr: float | None = lr_option(STAGE_LR)


# ~3.4 passes over the 24,000 demo reward pairs at batch 32: judging correctness (a sum, a fact,
# a name against the prompt) takes that long; at 150 steps the model is at chance on it. More
# pairs, not more passes, is what helped: 1,200 steps over 6,000 pairs were no better than 600.
DEFAULT_STEPS = 2400  # without data to count (not used when there is)
DEFAULT_EPOCHS = 3.37  # 2,400 steps over the 22,800 demo pairs left after the validation split; 201 over 1,900


def encode_pairs(tok: Tokenizer, pairs: list[Pair], max_len: int,
                 max_prompt_len: int | None = None) -> tuple[list[tuple], int]:
    """(chosen, rejected) encodings per pair, and how many were truncated."""
    out, truncated = [], 0
    for p in pairs:
        c = encode_completion(tok, p.prompt, p.chosen, max_len, max_prompt_len)
        r = encode_completion(tok, p.prompt, p.rejected, max_len, max_prompt_len)
        truncated += c.truncated or r.truncated
        out.append((c, r, p.margin))
    return out, truncated


def pair_batch(items: list[tuple], pad_id: int) -> dict:
    """Chosen rows then rejected rows, right-padded: one forward pass scores both."""
    batch = pad_batch([c for c, _, _ in items] + [r for _, r, _ in items], pad_id)
    batch["margin"] = torch.tensor([m for _, _, m in items], dtype=torch.float32)
    return batch


def score_pairs(model, items: list[tuple], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected replies, [N] each, without gradients."""
    scores = encoded_scores(model, [c.ids for c, _, _ in items] + [r.ids for _, r, _ in items], pad_id, batch_size)
    return torch.tensor(scores[:len(items)]), torch.tensor(scores[len(items):])


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    diff = chosen - rejected
    return {"accuracy": round(float((diff > 0).float().mean()), 4), "mean_margin": round(float(diff.mean()), 4), "pairs": len(diff)}


def run(cfg: RewardConfig, ws: Workspace) -> dict:
    t0 = time.time()
    pairs, inputs = sources.pairs(cfg.data, "reward")
    base_ref = cfg.base or ("sft" if ws.exists("models", "sft") else "base")
    torch.manual_seed(cfg.seed)  # a fresh score head: the same on every run and every rank
    base = load_model_artifact(ws, base_ref, "--base", score_head=True)
    model, tok = base.model, base.tokenizer
    if model.lm_head is not None:
        model.lm_head = None  # a reward model has no next-token head
    model = prepare_for_training(model, cfg, reward=True)
    context = min(model.config.max_position_embeddings, cfg.max_length or model.config.max_position_embeddings)
    encoded, truncated = encode_pairs(tok, pairs, context, cfg.max_prompt_length)
    if truncated:
        note(f"warning: {truncated} of {len(pairs)} pairs are longer than the context ({context} tokens) and were truncated")
    train, val = sources.split_val(encoded, cfg.val_fraction, cfg.seed)
    heldout = sources.heldout_pairs(cfg.data)  # on the demo: its held-out pairs, prompts never trained on
    if heldout is not None:
        heldout, _ = encode_pairs(tok, heldout, context)
    tcfg = train_config(cfg, len(train), DEFAULT_STEPS, DEFAULT_EPOCHS, stage_lr=STAGE_LR, model=model)
    run_dir = prepare_run(ws, cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, config=to_dict(cfg))
    pad = tok.pad_id

    def batches(step: int, micro: int) -> dict:
        from prefcli.distributed import batch_indices

        return pair_batch([train[i] for i in batch_indices(step, micro, cfg.batch_size, cfg.grad_accum, len(train), seed=cfg.seed)], pad)

    def loss_fn(model, batch: dict):
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        rewards = last_token_scores(model, ids, attn, length_groups()).float()  # model: SequenceScores
        n = len(rewards) // 2
        margin = batch["margin"].to(device)
        loss, metrics = bradley_terry_loss(rewards[:n], rewards[n:], margin if bool(margin.any()) else None, cfg.center_rewards)
        metrics.pop("loss")
        return loss, {**metrics, "tokens": int(attn.sum())}

    def eval_fn(model) -> dict:
        if not val:
            return {}
        c, r = score_pairs(model, val, pad, cfg.batch_size)
        m = pair_metrics(c, r)
        return {"val_accuracy": m["accuracy"], "val_margin": m["mean_margin"]}

    trainer = Trainer(SequenceScores(model), loss_fn, batches, tcfg, run_dir, eval_fn=eval_fn, desc=f"reward {cfg.out}")
    device = trainer.device
    summary = trainer.train(resume=cfg.resume)
    bare = trainer.full_model().model  # every rank: under FSDP, gathered from the shards
    bare.eval()
    metrics = {
        "train_loss": round(summary.get("train_loss", float("nan")), 4),
        "val_accuracy": summary.get("val_accuracy"),
        "pairs": len(train),
        "steps": summary["steps"],
        "lr": float(f"{tcfg.lr:.3g}"),  # the peak rate trained with (`default_lr` when --lr was not given)
    }
    if heldout is not None:
        c, r = score_pairs(bare, heldout, pad, cfg.batch_size)
        held = pair_metrics(c, r)
        metrics.update(heldout_accuracy=held["accuracy"], heldout_margin=held["mean_margin"], heldout_pairs=held["pairs"])
    save_model_artifact(ws, cfg.out, bare.float().cpu(), base.path, kind="reward", stage="reward train",
                        config=to_dict(cfg), parents=[base.parent(), *inputs], metrics=metrics,
                        overwrite=cfg.overwrite or cfg.resume, chat=False)
    dist.barrier()
    return {"model": cfg.out, **metrics, "truncated": truncated, "seconds": round(time.time() - t0, 1)}


# ---------------------------------------------------------------- scoring
@dataclass
class ScoreConfig:
    model: str = option("rm", "Reward model.")
    prompt: str | None = option(None, "The prompt of one reply to score.", default_text="none")
    response: str | None = option(None, "The reply to score.", default_text="none")
    input: str | None = option(None, "Rows of prompt+response, or prompt+chosen+rejected (.jsonl/.json/.parquet).", short="-i",
                               default_text="none")  # JSONL/JSON/parquet rows: prompt + response, or prompt + chosen + rejected
    output: str | None = option(None, "Write the rows with their scores here as JSONL.", short="-o",
                                default_text="stdout")  # JSONL with scores (default: stdout)
    batch_size: int = option(32, "Replies scored per forward pass.", ge=1)
    device: str = option("cpu", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")


def score(cfg: ScoreConfig, ws: Workspace) -> dict:
    if (cfg.prompt is None) == (cfg.input is None):
        raise PrefcliError("reward score needs --prompt with --response, or --input FILE", "give one of the two")
    if cfg.prompt is not None and cfg.response is None:
        raise PrefcliError("--prompt needs --response", "pass the reply to score with --response")
    check_output_file(cfg.output, "-o/--output")
    scorer = RewardScorer(ws, cfg.model, "--model", cfg.device)
    if cfg.prompt is not None:
        s = scorer([[{"role": "user", "content": cfg.prompt}]], [cfg.response])[0]
        return {"model": cfg.model, "rows": [{"prompt": cfg.prompt, "response": cfg.response, "score": s}]}
    rows = read_rows([cfg.input], option="--input")
    out = []
    for rec in rows:
        where = rec.pop("_source")
        if "chosen" in rec and "rejected" in rec:
            p = pair_from_row(rec | {"_source": where})
            c, r = scorer([p.prompt, p.prompt], [_reply_text(p.chosen), _reply_text(p.rejected)])
            out.append(rec | {"chosen_score": c, "rejected_score": r})
        elif "response" in rec:
            prompt = prompt_from_row(rec | {"_source": where})
            out.append(rec | {"score": scorer([prompt], [str(rec["response"])])[0]})
        else:
            raise PrefcliError(f"{where}: expected 'prompt' and 'response', or 'prompt', 'chosen' and 'rejected'", "fix the row")
    if cfg.output:
        Path(cfg.output).write_text("".join(json.dumps(r) + "\n" for r in out))
    result = {"model": cfg.model, "rows": out}
    pairs = [r for r in out if "chosen_score" in r]
    if pairs:
        result["accuracy"] = sum(r["chosen_score"] > r["rejected_score"] for r in pairs) / len(pairs)
    return result


def _reply_text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")

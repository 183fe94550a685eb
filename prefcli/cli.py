"""The command line: one command per stage. Options become the stage's config; no ML here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from prefcli import __version__
from prefcli.config import build_config
from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace

console = Console(stderr=True)
app = typer.Typer(
    name="prefcli",
    help="End-to-end alignment workflows: tokenizer, pretraining, SFT, reward models, DPO/PPO/GRPO, chat and eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
_state: dict[str, Any] = {"workspace": None}

# Options shared by every command, declared once.
JSON_OPT = typer.Option(False, "--json", help="Print one JSON document on stdout.")
OVERWRITE_OPT = typer.Option(False, "--overwrite", help="Replace an existing artifact of the same name.")
CONFIG_OPT = typer.Option(None, "--config", help="TOML file of options; command-line options win.")
SEED_OPT = typer.Option(None, "--seed", help="Random seed.")
DEVICE_OPT = typer.Option(None, "--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
OUT_OPT = typer.Option(None, "--out", help="Name of the artifact to write.")
# Training options, the same in every training stage.
MAX_STEPS_OPT = typer.Option(None, "--max-steps", help="Optimizer steps to train.")
EPOCHS_OPT = typer.Option(None, "--epochs", help="Passes over the data (when --max-steps is not given).")
BATCH_OPT = typer.Option(None, "--batch-size", help="Examples per micro-batch (per process).")
ACCUM_OPT = typer.Option(None, "--grad-accum", help="Micro-batches per optimizer step.")
LR_OPT = typer.Option(None, "--lr", help="Peak learning rate (warmup, then cosine decay).")
WARMUP_OPT = typer.Option(None, "--warmup", help="Warmup steps.")
EVAL_EVERY_OPT = typer.Option(None, "--eval-every", help="Validate every N steps (and at the end).")
SAVE_EVERY_OPT = typer.Option(None, "--save-every", help="Checkpoint every N steps (and at the end) into runs/<out>/checkpoints.")
RESUME_OPT = typer.Option(False, "--resume", help="Continue the run runs/<out> from its last checkpoint.")
COMPILE_OPT = typer.Option(False, "--compile", help="torch.compile the model.")


def workspace() -> Workspace:
    return Workspace(_state["workspace"])


def emit(result: dict, as_json: bool, render: Callable[[dict], None]) -> None:
    """Machine-readable JSON on stdout with --json; otherwise a human summary on stderr."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
    else:
        render(result)


def summary_table(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows.items():
        table.add_row(str(k), f"{v:,}" if isinstance(v, int) else str(v))
    console.print(table)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prefcli {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    workspace_dir: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar="PREFCLI_WORKSPACE",
        help="Workspace folder (default: $PREFCLI_WORKSPACE, else ./workspace).",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    _state["workspace"] = workspace_dir


# ---------------------------------------------------------------- tokenize
@app.command()
def tokenize(
    input: Optional[list[str]] = typer.Option(None, "--input", "-i", help="Text files, folders or globs (.txt split at blank lines; .jsonl/.json/.parquet rows). Default: the built-in demo corpus."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text in .jsonl/.json/.parquet rows (default: text)."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="Vocabulary size, special tokens included (default 2048)."),
    min_frequency: Optional[int] = typer.Option(None, "--min-frequency", help="Minimum count for a merge (default 2)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of documents held out for validation (default 0.05)."),
    name: Optional[str] = typer.Option(None, "--name", help="Tokenizer artifact name (default: default)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Dataset artifact name (default: corpus)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Reuse this tokenizer instead of training one."),
    seed: Optional[int] = SEED_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train a byte-level BPE tokenizer and encode the corpus into a token dataset."""
    from prefcli.stages import tokenize as stage

    cfg = build_config(stage.TokenizeConfig, config, "tokenize", input=input or None, text_field=text_field,
                       vocab_size=vocab_size, min_frequency=min_frequency, val_fraction=val_fraction, name=name,
                       dataset=dataset, tokenizer=tokenizer, seed=seed, overwrite=overwrite or None)
    result = stage.run(cfg, workspace())
    emit(result, as_json, lambda r: summary_table("tokenize", {
        "tokenizer": r["tokenizer"], "dataset": r["dataset"], "documents": r["documents"],
        "train tokens": r["train_tokens"], "val tokens": r["val_tokens"],
        "chars per token": r["chars_per_token"], "vocabulary": r["vocab_size"], "seconds": r["seconds"],
    }))


# ---------------------------------------------------------------- pretrain
@app.command()
def pretrain(
    data: Optional[str] = typer.Option(None, "--data", help="Token dataset (default: corpus)."),
    init: Optional[str] = typer.Option(None, "--init", help="Continue pretraining this model (prefcli or HF folder) instead of starting from scratch."),
    size: Optional[str] = typer.Option(None, "--size", help="Shape preset: tiny (~1M params), small (~5M), base (~25M), gpt2 (~124M). Default tiny."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Transformer blocks."),
    dim: Optional[int] = typer.Option(None, "--dim", help="Hidden size."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention heads."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help="Key/value heads (grouped-query attention)."),
    ffn_dim: Optional[int] = typer.Option(None, "--ffn-dim", help="MLP hidden size."),
    context: Optional[int] = typer.Option(None, "--context", help="Context length in tokens."),
    max_steps: Optional[int] = MAX_STEPS_OPT,
    tokens: Optional[int] = typer.Option(None, "--tokens", help="Train on this many tokens (instead of --max-steps)."),
    batch_size: Optional[int] = BATCH_OPT,
    grad_accum: Optional[int] = ACCUM_OPT,
    lr: Optional[float] = LR_OPT,
    warmup: Optional[int] = WARMUP_OPT,
    eval_every: Optional[int] = EVAL_EVERY_OPT,
    save_every: Optional[int] = SAVE_EVERY_OPT,
    resume: bool = RESUME_OPT,
    compile: bool = COMPILE_OPT,
    fsdp: bool = typer.Option(False, "--fsdp", help="Shard the model across processes (torchrun) with FSDP."),
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = OUT_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Pretrain a base model on a token dataset (default: corpus -> models/base)."""
    from prefcli.stages import pretrain as stage

    cfg = build_config(stage.PretrainConfig, config, "pretrain", data=data, init=init, size=size, layers=layers, dim=dim,
                       heads=heads, kv_heads=kv_heads, ffn_dim=ffn_dim, context=context, max_steps=max_steps,
                       tokens=tokens, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                       eval_every=eval_every, save_every=save_every, resume=resume or None, compile=compile or None,
                       fsdp=fsdp or None, seed=seed, device=device, out=out, overwrite=overwrite or None)
    result = stage.run(cfg, workspace())
    emit(result, as_json, lambda r: (summary_table(f"pretrain -> models/{r['model']}", {
        k: r[k] for k in ("parameters", "steps", "tokens", "train_loss", "val_loss", "unigram_loss", "tokens_per_s", "seconds")
    }), console.print(Text("sample: " + r["sample"]))))


# ---------------------------------------------------------------- align
def _align_help() -> str:
    from prefcli.stages.align import METHODS

    lines = ["Align a policy: supervised fine-tuning, preference optimisation or online RL.", "", "\b", "Methods:"]
    for name, (_, _, doc) in METHODS.items():
        formula, _, paper = doc.partition("; ")
        lines.append(f"  {name:7s} {formula}")
        if paper:
            lines.append(f"  {'':7s} {paper}")
    return "\n".join(lines)


@app.command(help=_align_help())
def align(
    method: str = typer.Option(..., "--method", "-m", help="Alignment method (see above)."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Training data files, folders or globs (default: the built-in demo set for the method)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Model to start from (sft: base; others: sft)."),
    train_on_prompt: bool = typer.Option(False, "--train-on-prompt", help="sft: put the loss on every token, not only the assistant's."),
    no_pack: bool = typer.Option(False, "--no-pack", help="sft: pad examples instead of packing them into full rows."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of the data held out for validation."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference model (default: the policy's starting weights)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="The method's beta (default per method, e.g. 0.1 for dpo, 2.0 for simpo)."),
    label_smoothing: Optional[float] = typer.Option(None, "--label-smoothing", help="dpo (conservative DPO) and robust: assumed share of flipped labels."),
    simpo_gamma: Optional[float] = typer.Option(None, "--simpo-gamma", help="simpo: target reward margin gamma (default 0.5)."),
    desirable_weight: Optional[float] = typer.Option(None, "--desirable-weight", help="kto: weight of desirable replies."),
    undesirable_weight: Optional[float] = typer.Option(None, "--undesirable-weight", help="kto: weight of undesirable replies."),
    rpo_alpha: Optional[float] = typer.Option(None, "--rpo-alpha", help="Add A x NLL of the chosen reply to the pair loss (RPO); keeps DPO from collapsing (default 1, orpo 0)."),
    pairs_from_policy: Optional[int] = typer.Option(None, "--pairs-from-policy", help="Build pairs from N policy samples per prompt: best vs worst by --judge-model / --reward-fn."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="With --pairs-from-policy: repeat sample, rank, train K times (iterative DPO)."),
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="Prompt rows (prompt or messages) to sample from (default: the built-in RL prompts)."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", help="Use only the first N prompts."),
    judge_model: Optional[list[str]] = typer.Option(None, "--judge-model", help="Reward model ranking the samples (NAME or NAME=WEIGHT; repeatable)."),
    reward_fn: Optional[list[str]] = typer.Option(None, "--reward-fn", help="Reward function: demo (the gold judge) or MODULE:FUNCTION, optionally =WEIGHT; repeatable."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature for on-policy samples (default 1.0)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest sampled reply in tokens (default 64)."),
    reward_model: Optional[list[str]] = typer.Option(None, "--reward-model", help="ppo/grpo/rloo: reward model scoring the samples (NAME or NAME=WEIGHT; repeatable; default rm when no --reward-fn)."),
    value_model: Optional[str] = typer.Option(None, "--value-model", help="ppo: where the value model starts (default: the first --reward-model, else the policy with a fresh head)."),
    num_generations: Optional[int] = typer.Option(None, "--num-generations", help="ppo/grpo/rloo: samples per prompt (default 8 for grpo and rloo, 1 for ppo)."),
    kl_coef: Optional[float] = typer.Option(None, "--kl-coef", help="ppo/grpo/rloo: KL coefficient to the reference (default: ppo 0.2, grpo 0.1, rloo 0.05); 0 keeps no reference."),
    kl_target: Optional[float] = typer.Option(None, "--kl-target", help="ppo/grpo/rloo: adapt the KL coefficient so the KL per reply (nats) approaches this."),
    missing_eos_penalty: Optional[float] = typer.Option(None, "--missing-eos-penalty", help="ppo/grpo/rloo: subtracted from the score of a reply cut at --max-tokens (default 1.0)."),
    ppo_epochs: Optional[int] = typer.Option(None, "--ppo-epochs", help="ppo/grpo: optimizer steps on each batch of rollouts (default 2 for ppo, 1 for grpo)."),
    clip_range: Optional[float] = typer.Option(None, "--clip-range", help="ppo/grpo: clip the probability ratio to 1 +- this (default 0.2)."),
    vf_coef: Optional[float] = typer.Option(None, "--vf-coef", help="ppo: weight of the value loss (default 0.1)."),
    whiten_rewards: bool = typer.Option(False, "--whiten-rewards", help="ppo: scale per-token rewards by their std before GAE."),
    guard: Optional[str] = typer.Option(None, "--guard", help="dpo-family and ppo/grpo/rloo: on a collapse (chosen log-prob falling, replies shrinking or repeating): stop (exit 1, nothing saved), warn, or off (default stop)."),
    attribute: Optional[list[str]] = typer.Option(None, "--attribute", help="steer: NAME=REWARD_MODEL labels each reply's attribute NAME with its reward's rank (repeatable)."),
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: Optional[float] = EPOCHS_OPT,
    batch_size: Optional[int] = BATCH_OPT,
    grad_accum: Optional[int] = ACCUM_OPT,
    lr: Optional[float] = LR_OPT,
    warmup: Optional[int] = WARMUP_OPT,
    eval_every: Optional[int] = EVAL_EVERY_OPT,
    save_every: Optional[int] = SAVE_EVERY_OPT,
    resume: bool = RESUME_OPT,
    compile: bool = COMPILE_OPT,
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = typer.Option(None, "--out", help="Name of the model to write (default: the method's name)."),
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    from prefcli.stages import align as stage

    options = dict(data=data or None, policy=policy, train_on_prompt=train_on_prompt or None,
                   pack=False if no_pack else None, val_fraction=val_fraction, reference=reference, beta=beta,
                   label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, desirable_weight=desirable_weight,
                   undesirable_weight=undesirable_weight, rpo_alpha=rpo_alpha, pairs_from_policy=pairs_from_policy,
                   rounds=rounds, prompts=prompts or None, num_prompts=num_prompts, judge_model=judge_model or None,
                   reward_fn=reward_fn or None, temperature=temperature, max_tokens=max_tokens,
                   reward_model=reward_model or None, value_model=value_model, num_generations=num_generations,
                   kl_coef=kl_coef, kl_target=kl_target, missing_eos_penalty=missing_eos_penalty, ppo_epochs=ppo_epochs,
                   clip_range=clip_range, vf_coef=vf_coef, whiten_rewards=whiten_rewards or None, attribute=attribute or None,
                   guard=guard,
                   max_steps=max_steps, epochs=epochs,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, eval_every=eval_every,
                   save_every=save_every, resume=resume or None, compile=compile or None, seed=seed, device=device,
                   out=out, overwrite=overwrite or None)
    result = stage.run(method, options, config, workspace())
    emit(result, as_json, lambda r: summary_table(f"align {r['method']} -> models/{r['model']}", {
        k: v for k, v in r.items() if k not in ("model", "method") and not isinstance(v, (dict, list))
    }))


# ---------------------------------------------------------------- reward
reward_app = typer.Typer(help="Train reward models on preference pairs, and score replies with them.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


@reward_app.command("train")
def reward_train(
    data: Optional[list[str]] = typer.Option(None, "--data", help="Preference pairs (prompt/chosen/rejected[/margin], strings or message lists; .jsonl/.json/.parquet). Default: the built-in demo pairs."),
    base: Optional[str] = typer.Option(None, "--base", help="Backbone (default: sft if it exists, else base)."),
    center_rewards: Optional[float] = typer.Option(None, "--center-rewards", help="Coefficient of the reward-centering term mean((r_c + r_r)^2)."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="Share of pairs held out for validation (default 0.05)."),
    max_steps: Optional[int] = MAX_STEPS_OPT,
    epochs: Optional[float] = EPOCHS_OPT,
    batch_size: Optional[int] = BATCH_OPT,
    grad_accum: Optional[int] = ACCUM_OPT,
    lr: Optional[float] = LR_OPT,
    warmup: Optional[int] = WARMUP_OPT,
    eval_every: Optional[int] = EVAL_EVERY_OPT,
    save_every: Optional[int] = SAVE_EVERY_OPT,
    resume: bool = RESUME_OPT,
    compile: bool = COMPILE_OPT,
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = typer.Option(None, "--out", help="Name of the reward model (default: rm)."),
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train a Bradley-Terry reward model: loss -log sigmoid(r_chosen - r_rejected - margin)."""
    from prefcli.stages import reward as stage

    cfg = build_config(stage.RewardConfig, config, "reward", data=data or None, base=base, center_rewards=center_rewards,
                       val_fraction=val_fraction, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
                       grad_accum=grad_accum, lr=lr, warmup=warmup, eval_every=eval_every, save_every=save_every,
                       resume=resume or None, compile=compile or None, seed=seed, device=device, out=out,
                       overwrite=overwrite or None)
    result = stage.run(cfg, workspace())
    emit(result, as_json, lambda r: summary_table(f"reward train -> models/{r['model']}", {
        k: v for k, v in r.items() if k != "model" and v is not None
    }))


@reward_app.command("score")
def reward_score(
    model: Optional[str] = typer.Option(None, "--model", help="Reward model (default: rm)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="The prompt of one reply to score."),
    response: Optional[str] = typer.Option(None, "--response", help="The reply to score."),
    input: Optional[str] = typer.Option(None, "--input", "-i", help="Rows of prompt+response, or prompt+chosen+rejected."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Write the rows with their scores here as JSONL (default: stdout)."),
    device: Optional[str] = DEVICE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Score replies with a reward model."""
    from prefcli.stages import reward as stage

    cfg = build_config(stage.ScoreConfig, None, None, model=model, prompt=prompt, response=response, input=input,
                       output=output, device=device)
    result = stage.score(cfg, workspace())
    if as_json:
        emit(result, True, lambda r: None)
    elif output:
        console.print(f"scored {len(result['rows'])} rows into {output}" + (f" (pair accuracy {result['accuracy']:.3f})" if "accuracy" in result else ""))
    elif prompt is not None:
        sys.stdout.write(f"{result['rows'][0]['score']:.4f}\n")
    else:
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in result["rows"]))


# ---------------------------------------------------------------- chat
@app.command()
def chat(
    model: Optional[str] = typer.Option(None, "--model", help="Model to chat with: a workspace name or a folder (prefcli or HF). Default: the newest chat model (an aligned policy, else sft)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Print the reply to this one message on stdout and exit."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    raw: bool = typer.Option(False, "--raw", help="Plain text continuation without the chat template (base models)."),
    prefer: Optional[str] = typer.Option(None, "--prefer", help="Steer a model made by `align --method steer`: NAME=WEIGHT,... (e.g. correct=1,polite=0); unnamed attributes keep their defaults (1)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature; 0 is greedy and repeatable (default 0.7)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling: keep the most likely tokens up to this mass (default 0.9)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep only the k most likely tokens; 0 is off (default 0)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Longest reply in tokens (default 256)."),
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    config: Optional[Path] = CONFIG_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the conversation as JSON messages on stdout at the end."),
) -> None:
    """Chat with a model: a REPL on a terminal (/help), or --prompt / piped lines (one reply each) for scripts."""
    from prefcli.stages import chat as stage

    cfg = build_config(stage.ChatConfig, config, "chat", model=model, prompt=prompt, system=system, raw=raw or None, prefer=prefer,
                       temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens, seed=seed,
                       device=device)
    stage.run(cfg, workspace(), as_json=as_json)


# ---------------------------------------------------------------- eval
eval_app = typer.Typer(help="Measure models: perplexity, reward-model accuracy, side-by-side comparison, charts.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")
PLOT_OPT = typer.Option(False, "--plot", help="Also draw PNG charts into evals/<name>-*.png (pip install 'prefcli[plot]').")
EVAL_OUT_OPT = typer.Option(None, "--out", help="Name of the eval, written to evals/<name>.json (default: <subcommand>-<model>).")
LIMIT_HELP = "Measure only the first N"


@eval_app.command("perplexity")
def eval_perplexity(
    model: Optional[str] = typer.Option(None, "--model", help="Model to measure (default: base)."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="A token dataset (default: corpus), or text files, folders and globs encoded with the model's tokenizer."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a dataset: val (default) or train."),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="Field holding the text in .jsonl/.json/.parquet rows (default: text)."),
    limit: Optional[int] = typer.Option(None, "--limit", help=f"{LIMIT_HELP} windows of the model's context."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward pass (default 16)."),
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = EVAL_OUT_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    plot: bool = PLOT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Loss, perplexity and bits per byte of a model on held-out text."""
    from prefcli.stages import evaluate as stage

    cfg = build_config(stage.PerplexityConfig, config, "eval-perplexity", model=model, data=data or None, split=split,
                       text_field=text_field, limit=limit, batch_size=batch_size, device=device, out=out,
                       overwrite=overwrite or None, plot=plot or None)
    emit(stage.run_perplexity(cfg, workspace()), as_json, lambda r: console.print(stage.perplexity_table(r)))


@eval_app.command("reward")
def eval_reward(
    model: Optional[str] = typer.Option(None, "--model", help="Reward model to measure (default: rm)."),
    pairs: Optional[list[str]] = typer.Option(None, "--pairs", help="Preference pairs (prompt/chosen/rejected; .jsonl/.json/.parquet). Default: the held-out demo pairs."),
    gold: bool = typer.Option(False, "--gold", help="Break accuracy down with the demo's gold judge (default for the demo pairs)."),
    limit: Optional[int] = typer.Option(None, "--limit", help=f"{LIMIT_HELP} pairs."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Replies scored per forward pass (default 64)."),
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = EVAL_OUT_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    plot: bool = PLOT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Pairwise accuracy (ties half), margin and reward distributions of a reward model."""
    from prefcli.stages import evaluate as stage

    cfg = build_config(stage.RewardEvalConfig, config, "eval-reward", model=model, pairs=pairs or None,
                       gold=gold or None, limit=limit, batch_size=batch_size, device=device, out=out,
                       overwrite=overwrite or None, plot=plot or None)
    emit(stage.run_reward(cfg, workspace()), as_json, lambda r: console.print(stage.reward_table(r)))


@eval_app.command("compare")
def eval_compare(
    model: Optional[list[str]] = typer.Option(None, "--model", help="Model to compare (repeat for several, side by side)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model to compare against and take KL to (default: sft if it exists)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", help="Reward model that judges win rates and mean reward."),
    judge_fn: Optional[list[str]] = typer.Option(None, "--judge-fn", help="Your judge: MODULE:FUNCTION(prompts, replies) -> scores, optionally =WEIGHT; repeatable (summed). Win rates and good-rates (score > 0)."),
    prompts: Optional[list[str]] = typer.Option(None, "--prompts", help="Prompt rows ({prompt} or {messages}; .jsonl/.json/.parquet). Default: the 300 held-out demo prompts."),
    gold: bool = typer.Option(False, "--gold", help="Judge --prompts with the demo's gold judge (default for the demo prompts)."),
    limit: Optional[int] = typer.Option(None, "--limit", help=f"{LIMIT_HELP} prompts."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Replies sampled per prompt (default 1)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 1.0: the policy's own distribution; 0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling (default 1.0: off)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Top-k sampling (default 0: off)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens per reply (default 64)."),
    kl: bool = typer.Option(True, "--kl/--no-kl", help="Estimate KL(model || reference) (needs one tokenizer)."),
    prefer: Optional[list[str]] = typer.Option(None, "--prefer", help="Steer the --model(s) made by `align --method steer`: NAME=WEIGHT,...; repeat it to compare several settings side by side."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Prompts sampled at once (default 64)."),
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    out: Optional[str] = EVAL_OUT_OPT,
    config: Optional[Path] = CONFIG_OPT,
    overwrite: bool = OVERWRITE_OPT,
    plot: bool = PLOT_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Sample replies from models and a reference; win rates, gold good-rates, KL, length, diversity."""
    from prefcli.stages import evaluate as stage

    cfg = build_config(stage.CompareConfig, config, "eval-compare", model=model or None, reference=reference,
                       judge_model=judge_model, judge_fn=judge_fn or None, prompts=prompts or None, gold=gold or None, limit=limit,
                       samples=samples, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                       kl=None if kl else False, prefer=prefer or None, batch_size=batch_size, seed=seed, device=device, out=out,
                       overwrite=overwrite or None, plot=plot or None)
    emit(stage.run_compare(cfg, workspace()), as_json, lambda r: console.print(stage.compare_table(r)))


@eval_app.command("plot")
def eval_plot(
    names: Optional[list[str]] = typer.Argument(None, help="Evals to chart (default: all in evals/)."),
    run: Optional[list[str]] = typer.Option(None, "--run", help="Runs whose training curves to draw (default: all in runs/)."),
    out: Optional[str] = typer.Option(None, "--out", help="Name of the training-curves chart, evals/<name>-training.png (default: runs)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Draw PNG charts: training curves of runs/*/metrics.jsonl, and each eval's charts."""
    from prefcli import plots
    from prefcli.workspace import check_name

    ws = workspace()
    paths = [str(p) for p in plots.plot_workspace(ws, names or None, run or None, check_name(out or "runs"))]
    emit({"plots": paths}, as_json, lambda r: console.print(
        "\n".join(f"wrote {p}" for p in r["plots"]) or f"nothing to plot in {ws.root}"))


# ---------------------------------------------------------------- quickstart
def _pct(summary: dict | None) -> str:
    if not summary or summary.get("rate") is None:
        return "-"
    lo, hi = summary["ci"]
    half = max(hi - summary["rate"], summary["rate"] - lo)
    return f"{100 * summary['rate']:.0f}±{100 * half:.0f}"


def _quickstart_report(r: dict) -> None:
    stages = Table(title=f"quickstart: {r['seconds']:.0f} s in all", title_justify="left")
    for col in ("stage", "seconds", "result"):
        stages.add_column(col)
    for s in r["stages"]:
        stages.add_row(s["stage"], f"{s['seconds']:.1f}", s["metric"])
    console.print(stages)
    cmp = r["comparison"]
    table = Table(title=f"against sft on {cmp['prompts']} held-out prompts, gold judge, % ± 95% interval",
                  title_justify="left")
    for col in ("model", "good", "win", "correct", "polite", "concise", "RM win", "KL", "dist-2", "len"):
        table.add_column(col)
    ref = cmp.get("reference_stats") or {}
    if ref.get("gold"):
        table.add_row("sft", _pct(ref["gold"]["good"]), "", "", "", "", "", "", f"{ref['distinct_2']:.2f}", f"{ref['mean_length']:.0f}")
    for name, m in cmp["models"].items():
        vs = m.get("vs_reference", {})
        by_attr = vs.get("win_rate_gold_by_attribute", {})
        kl = vs.get("kl", {}).get("mean")
        table.add_row(name, _pct(m.get("gold", {}).get("good")), _pct(vs.get("win_rate_gold")),
                      *(_pct(by_attr.get(a)) for a in ("correct", "polite", "concise")),
                      _pct(vs.get("win_rate_reward")), "-" if kl is None else f"{kl:.2f}",
                      f"{m['distinct_2']:.2f}", f"{m['mean_length']:.0f}")
    console.print(table)
    console.print("good: share of replies the gold judge rates correct, polite and concise. win: gold-judge win rate "
                  "over sft (ties half); correct/polite/concise: the same per attribute; RM win: by the reward model; "
                  "KL: KL(policy || sft) in nats per reply; len: tokens per reply.")
    best = max(cmp["models"], key=lambda n: (cmp["models"][n].get("gold", {}).get("good") or {}).get("rate") or 0)
    ws_flag = f"-w {r['workspace']} "
    console.print(f"\nChat with the result:\n  prefcli {ws_flag}chat --model {best}\n"
                  f"  prefcli {ws_flag}chat --model {best} --prompt 'What is 3 plus 4?'\n"
                  f"  prefcli {ws_flag}ls", highlight=False)


@app.command()
def quickstart(
    size: Optional[str] = typer.Option(None, "--size", help="Model size preset (default tiny: ~1M parameters)."),
    fast: bool = typer.Option(False, "--fast", help="A much shorter run (seconds, not minutes), for smoke tests."),
    methods: Optional[list[str]] = typer.Option(None, "--method", help="Alignment methods to run after sft (repeatable; default dpo and rloo)."),
    eval_prompts: Optional[int] = typer.Option(None, "--eval-prompts", help="Held-out prompts for the final comparison (default 300)."),
    seed: Optional[int] = SEED_OPT,
    device: Optional[str] = DEVICE_OPT,
    overwrite: bool = OVERWRITE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Run the whole workflow on the built-in demo data and report how much alignment helped."""
    from prefcli.stages import quickstart as stage

    cfg = build_config(stage.QuickstartConfig, None, None, size=size, fast=fast or None, methods=methods or None,
                       eval_prompts=eval_prompts, seed=seed, device=device, overwrite=overwrite or None)
    result = stage.run(cfg, workspace(), console)
    emit(result, as_json, _quickstart_report)


# ---------------------------------------------------------------- pipeline
pipeline_app = typer.Typer(help="Run a whole workflow from one TOML file, skipping stages that are up to date.",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("run")
def pipeline_run(
    ctx: typer.Context,
    file: Path = typer.Argument(..., metavar="FILE", help="Pipeline file: [[stage]] tables with a command and its options (see examples/pipeline.toml)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (run / skip / re-run / always) and run nothing."),
    force: bool = typer.Option(False, "--force", help="Run every stage, even those that are up to date."),
    set_: Optional[list[str]] = typer.Option(None, "--set", metavar="[N.]OPTION=VALUE", help="Override an option: N.option=value for stage N, or option=value for every stage that takes it."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary of the run (stages, status, seconds) on stdout."),
) -> None:
    """Run the stages of FILE in order; a stage whose output exists with the same config and inputs is skipped."""
    from prefcli.stages import pipeline as stage

    # -w on the command line wins over the file's `workspace`, which wins over $PREFCLI_WORKSPACE.
    source = ctx.find_root().get_parameter_source("workspace_dir")
    given = getattr(source, "name", None) == "COMMANDLINE"
    result = stage.run(file, _state["workspace"] if given else None, sets=set_ or None, force=force,
                       dry_run=dry_run, quiet_stdout=as_json)
    emit(result, as_json, lambda r: console.print(stage.summary_table(r)))
    if result["exit_code"]:
        raise typer.Exit(result["exit_code"])


# ---------------------------------------------------------------- ls
def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _key_metrics(metrics: dict, limit: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items[:limit])


@app.command("ls")
def ls(
    name: Optional[str] = typer.Argument(None, help="Show one artifact's metadata and lineage."),
    as_json: bool = JSON_OPT,
) -> None:
    """List the workspace's artifacts, or show one with its lineage."""
    ws = workspace()
    if name is None:
        rows = ws.artifacts()
        if as_json:
            sys.stdout.write(json.dumps({"workspace": str(ws.root), "artifacts": rows}, indent=2) + "\n")
            return
        table = Table(title=f"workspace {ws.root}", title_justify="left")
        for col in ("kind", "name", "created", "parents", "size", "metrics", "status"):
            table.add_column(col)
        for r in rows:
            table.add_row(r["type"], r["name"], (r["created"] or "")[:19].replace("T", " "), ", ".join(r["parents"]),
                          _human_size(r["size"]), _key_metrics(r["metrics"]),
                          "[red]damaged[/red]" if r["damaged"] else "ok")
        console.print(table if rows else f"workspace {ws.root} has no artifacts yet (start with `prefcli tokenize`)")
        return
    matches = ws.find(name)
    if not matches:
        raise PrefcliError(f"no artifact named '{name}' in workspace {ws.root}", "run `prefcli ls` to see what is there")
    docs = []
    for row in matches:
        path = Path(row["path"])
        meta = json.loads(path.read_text()).get("meta", {}) if row["kind"] == "evals" else json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
        docs.append({"artifact": row, "meta": meta, "lineage": ws.lineage(row["kind"], name)})
    if as_json:
        sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2, default=str) + "\n")
        return
    for doc in docs:
        row, meta = doc["artifact"], doc["meta"]
        summary_table(f"{row['type']} {row['name']}", {
            "path": row["path"], "created": row["created"], "stage": meta.get("stage"),
            "size": _human_size(row["size"]), "status": "damaged: " + ", ".join(row["damaged"]) if row["damaged"] else "ok",
            **{f"metric {k}": v for k, v in meta.get("metrics", {}).items()},
        })
        console.print(_lineage_tree(doc["lineage"]))


def _lineage_tree(node: dict, tree: Tree | None = None) -> Tree:
    label = f"{node.get('kind')} [bold]{node.get('name') or node.get('path')}[/bold]"
    if node.get("stage"):
        label += f" (by {node['stage']}, {(node.get('created') or '')[:19].replace('T', ' ')})"
    branch = Tree(label) if tree is None else tree.add(label)
    for parent in node.get("parents", []):
        _lineage_tree(parent, branch)
    return branch


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="prefcli")
    except PrefcliError as e:
        line = Text("error: ", style="bold red")
        line.append(e.message + (f" (hint: {e.hint})" if e.hint else ""))
        console.print(line, highlight=False, soft_wrap=True)
        sys.exit(getattr(e, "exit_code", 2))  # 1 for runtime failures such as guard.RunCollapsed


if __name__ == "__main__":
    main()

"""What every training stage needs: load a model artifact, set up its run folder, save the result.

A stage reads like a recipe on top of these: load inputs, build the model, pick the
objective, hand both to the Trainer, save the artifact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from prefcli import distributed as dist
from prefcli.errors import PrefcliError
from prefcli.model import Transformer, load_model, save_model
from prefcli.tokenizer import Tokenizer, copy_tokenizer_files
from prefcli.trainer import TrainConfig, list_checkpoints, steps_for_epochs
from prefcli.workspace import Workspace, parent_ref, read_meta, sha256_file


@dataclass
class TrainingOptions:
    """The options every training stage shares (README: "Training options").

    A stage's config derives from this and redeclares a field to change its default.
    """

    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    save_every: int = 100
    resume: bool = False
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    path: Path
    meta: dict

    def parent(self) -> dict:
        return parent_ref("models", self.path)


def load_model_artifact(ws: Workspace, ref: str, option: str, *, kind: str | None = None,
                        score_head: bool = False, device: str | torch.device = "cpu") -> Loaded:
    """A prefcli model artifact or an HF folder, with the tokenizer it carries."""
    path = ws.resolve("models", ref, option)
    if not (path / "tokenizer.json").is_file():
        raise PrefcliError(f"{option}: {path} has no tokenizer.json", "a model folder must carry its tokenizer files")
    tok = Tokenizer(path)
    model = load_model(path, device=device, kind=kind, score_head=score_head)
    return Loaded(model, tok, path, read_meta(path))


def note(message: str) -> None:
    """A warning or remark for the person at the terminal (stderr, main process only)."""
    if dist.is_main():
        from rich.console import Console
        from rich.text import Text

        Console(stderr=True).print(Text(message, style="yellow"), soft_wrap=True)


def load_token_dataset(ws: Workspace, ref: str, option: str = "--data") -> tuple[Path, dict, Path]:
    """A token dataset: its folder, its meta, and the folder of the tokenizer it was encoded with."""
    path = ws.resolve("datasets", ref, option)
    meta = read_meta(path)
    if not (path / "train.safetensors").is_file():
        raise PrefcliError(f"{option}: {path} is not a token dataset (no train.safetensors)", "make one with `prefcli tokenize`")
    tok_ref = next((p for p in meta.get("parents", []) if p.get("kind") == "tokenizers"), None)
    tok_path = Path(tok_ref["path"]) if tok_ref else None
    if tok_path is None or not (tok_path / "tokenizer.json").is_file():
        raise PrefcliError(f"{option}: the tokenizer of {path} is missing", "re-run `prefcli tokenize`")
    if meta.get("tokenizer_sha256") and sha256_file(tok_path / "tokenizer.json") != meta["tokenizer_sha256"]:
        raise PrefcliError(f"{option}: tokenizer {tok_path} changed since {path} was encoded", "re-run `prefcli tokenize --overwrite`")
    return path, meta, tok_path


def generation_config(tok: Tokenizer) -> dict:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids(chat=True), "pad_token_id": tok.pad_id}


def prepare_run(ws: Workspace, name: str, *, resume: bool, overwrite: bool) -> Path:
    """runs/<name>: kept to --resume from; cleared by --overwrite; otherwise an earlier run is an error."""
    ws.check_writable("models", name, overwrite or resume)
    run_dir = ws.folder("runs") / name
    if resume:
        if not list_checkpoints(run_dir):
            raise PrefcliError(f"--resume: {run_dir} has no checkpoint to resume from", "run without --resume to start a new run")
    elif run_dir.exists() and dist.is_main():
        if list_checkpoints(run_dir) and not overwrite:
            raise PrefcliError(
                f"{run_dir} holds checkpoints of an earlier run of '{name}'",
                "pass --resume to continue it, or --overwrite to start again",
            )
        shutil.rmtree(run_dir)
    dist.barrier()
    return run_dir


def train_config(cfg, num_examples: int | None = None, default_steps: int = 100,
                 default_epochs: float | None = None) -> TrainConfig:
    """The Trainer's config from a stage config's shared training options.

    --max-steps wins; else --epochs over `num_examples`; else the stage's default passes over
    its data (`default_epochs`: 1,900 pairs get a tenth of the steps of 19,000); else default_steps.
    """
    epochs = getattr(cfg, "epochs", None)
    if epochs is None and cfg.max_steps is None:
        epochs = default_epochs
    if cfg.max_steps is not None:
        steps = cfg.max_steps
    elif epochs is not None and num_examples:
        steps = steps_for_epochs(epochs, num_examples, cfg.batch_size, cfg.grad_accum)
    else:
        steps = default_steps
    if steps < 1:
        raise PrefcliError(f"--max-steps {steps}: must be at least 1")
    return TrainConfig(
        max_steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr, warmup=cfg.warmup,
        eval_every=cfg.eval_every, save_every=cfg.save_every, seed=cfg.seed, device=cfg.device,
        compile=cfg.compile, fsdp=getattr(cfg, "fsdp", False),
        weight_decay=getattr(cfg, "weight_decay", 0.1),
    )


def save_model_artifact(ws: Workspace, name: str, model: Transformer, tokenizer_folder: Path, *, kind: str,
                        stage: str, config: dict, parents: list[dict], metrics: dict, overwrite: bool,
                        chat: bool, extra_meta: dict | None = None, extra_files=None) -> Path | None:
    """Write models/<name> (rank 0 only): HF model folder + tokenizer files + meta.json.

    kind is "causal_lm" or "reward"; `chat` says whether the model speaks the chat
    format (what `prefcli chat` picks by default). `extra_files(folder)` may add files.
    """
    if not dist.is_main():
        return None
    tok = Tokenizer(tokenizer_folder)
    meta_kind = "reward_model" if kind == "reward" else "model"
    with ws.create("models", name, stage=stage, config=config, parents=parents, overwrite=overwrite,
                   meta_kind=meta_kind) as art:
        save_model(model, art.path, kind=kind, generation_config=generation_config(tok))
        copy_tokenizer_files(tokenizer_folder, art.path)
        if extra_files is not None:
            extra_files(art.path)
        art.meta["chat"] = chat
        art.meta["metrics"] = metrics
        art.meta.update(extra_meta or {})
    return ws.folder("models") / name


def sync_token_ids(model: Transformer, tok: Tokenizer) -> None:
    """Record the tokenizer's special ids in the model config (config.json carries them)."""
    model.config.bos_token_id = tok.bos_id
    model.config.eos_token_id = tok.eos_id
    model.config.pad_token_id = tok.pad_id


def length_groups() -> int:
    """How many length groups a training batch runs in: 3 in one process, 1 under DDP/FSDP
    (their hooks expect one forward per backward)."""
    return 3 if dist.world_size() == 1 else 1


def in_length_groups(fn, attention_mask: torch.Tensor, groups: int):
    """Run fn(rows, width) over right-padded rows in `groups` passes sorted by length.

    Each pass sees only its rows, cut to its own longest row: in a batch of chosen and rejected
    replies over half the tokens are padding (one rambling reply sets every row's width). fn
    returns a tensor or a tuple of tensors with one entry per row; they come back in the
    original row order, equal to one pass over the whole batch.
    """
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths) if groups > 1 else torch.arange(len(lengths), device=lengths.device)
    parts = [fn(rows, int(lengths[rows].max())) for rows in order.chunk(groups)]
    undo = torch.argsort(order)
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p)[undo] for p in zip(*parts))
    return torch.cat(parts)[undo]

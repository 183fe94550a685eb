"""What every training stage needs: load a model artifact, set up its run folder, save the result.

A stage reads like a recipe on top of these: load inputs, build the model, pick the
objective, hand both to the Trainer, save the artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prefcli import distributed as dist
from prefcli.config import option
from prefcli import lora, tracking
from prefcli.errors import PrefcliError
from prefcli.model import Transformer, save_model
from prefcli.model_files import load_model_folder
from prefcli.tokenizer import Tokenizer, copy_tokenizer_files
from prefcli.trainer import TrainConfig, steps_for_epochs
from prefcli.workspace import Workspace, parent_ref, read_meta, sha256_file


def fsdp_option():
    """--fsdp, the one declaration of every training stage's (TrainingOptions, and online RL's own list)."""
    return option(False, "Under torchrun: shard the weights, gradients and optimizer state across processes (FSDP2) "
                         "instead of a full copy on each (DDP).")


TRAINING_LR = 1e-3  # --lr of the stages that keep the shared default (sft, steer)


def lr_option(stage_lr: float, **kw):
    """--lr: None means the stage's rate for the model being trained (`default_lr`)."""
    return option(None, "Peak learning rate (warmup, then cosine decay).", gt=0,
                  default_text=f"{stage_lr:g}, less in full fine-tuning over 2M parameters", **kw)


@dataclass
class TrainingOptions:
    """The options every training stage shares (README: "Training options").

    A stage's config derives from this and redeclares a field to change its default.
    """

    max_steps: int | None = option(None, "Optimizer steps to train.", ge=1, default_text="per stage")
    epochs: float | None = option(None, "Passes over the data (when --max-steps is not given).", gt=0, default_text="off")
    batch_size: int = option(32, "Examples per micro-batch (per process).", ge=1)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", ge=1)
    lr: float | None = lr_option(TRAINING_LR)
    warmup: int = option(10, "Warmup steps.", ge=0)
    weight_decay: float = option(0.0, ge=0)
    eval_every: int = option(50, "Validate every N steps (and at the end); 0: only at the end.", ge=0)
    save_every: int = option(100, "Checkpoint every N steps (and at the end) into runs/<out>/checkpoints; 0: only at the end.", ge=0)
    resume: bool = option(False, "Continue the run runs/<out> from its last checkpoint.")
    compile: bool = option(False, "torch.compile the model.")
    fsdp: bool = fsdp_option()
    seed: int = option(0, "Random seed.")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    overwrite: bool = option(False, "Replace an existing artifact of the same name.")
    precision: str = option("auto", "Number format of training: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16 (autocast on any device).",
                            choices=("auto", "fp32", "bf16"))
    report_to: list[str] = option(factory=list, default_text="none", choices=("tensorboard", "wandb"),
                                  help="Mirror metrics.jsonl to tensorboard (runs/<out>/tensorboard) or wandb; repeatable.")


@dataclass
class AdapterOptions:
    """LoRA and memory options of the fine-tuning stages (sft, preference methods, reward train, online RL).

    LoRA (prefcli.lora): rank 0 = full fine-tuning; the result is a PEFT adapter folder unless --merge.
    """

    lora_rank: int = option(0, "LoRA rank; 0: full fine-tuning. The result is a PEFT adapter folder (unless --merge).", ge=0,
                            panel="LoRA and memory")
    lora_alpha: float | None = option(None, "LoRA alpha (the adapter is scaled by alpha / rank).", gt=0,
                                      default_text="2 x rank", panel="LoRA and memory")
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.", ge=0, lt=1, panel="LoRA and memory")
    lora_targets: list[str] = option(factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     default_text="all linear layers of the blocks", panel="LoRA and memory",
                                     help="Projections that get adapters: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                                          "down_proj; repeatable or comma-separated.")
    merge: bool = option(False, "With LoRA: write a plain merged model folder instead of an adapter.", panel="LoRA and memory")
    grad_checkpoint: bool = option(False, "Recompute each block's activations in the backward pass (less memory, ~30% slower).",
                                   panel="LoRA and memory")


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
    tok_folder = path
    if not (path / "tokenizer.json").is_file() and (path / "adapter_config.json").is_file():
        from prefcli.lora import adapter_base

        tok_folder = adapter_base(path)  # an adapter without tokenizer files: its base's
    if not (tok_folder / "tokenizer.json").is_file():
        raise PrefcliError(f"{option}: {path} has no tokenizer.json", "a model folder must carry its tokenizer files")
    tok, model = load_model_folder(path, option, device=device, kind=kind, score_head=score_head)  # one line if broken
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
    tok_path = ws.parent_path(tok_ref) if tok_ref else None
    if tok_path is None or not (tok_path / "tokenizer.json").is_file():
        raise PrefcliError(f"{option}: the tokenizer of {path} is missing", "re-run `prefcli tokenize`")
    if meta.get("tokenizer_sha256") and sha256_file(tok_path / "tokenizer.json") != meta["tokenizer_sha256"]:
        raise PrefcliError(f"{option}: tokenizer {tok_path} changed since {path} was encoded", "re-run `prefcli tokenize --overwrite`")
    return path, meta, tok_path


def generation_config(tok: Tokenizer) -> dict:
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.stop_ids(chat=True), "pad_token_id": tok.pad_id}


def prepare_run(ws: Workspace, name: str, *, resume: bool, overwrite: bool, config: dict | None = None) -> Path:
    """The run folder to train in, with the name locked for the rest of the command.

    runs/<name> is kept to --resume from (with the options it was started with:
    `config`); with --overwrite the new run is written beside the old one, which stays
    until the new model is saved (Workspace.begin_run).
    """
    join_processes((config or {}).get("device", "auto"))
    ws.check_writable("models", name, overwrite or resume)
    run_dir = ws.begin_run(name, resume=resume, overwrite=overwrite, config=config) if dist.is_main() else None
    dist.barrier()
    if run_dir is None:  # other ranks: the folder rank 0 picked
        temp = ws.folder("runs") / f".{name}.new"
        run_dir = temp if temp.is_dir() and not resume else ws.folder("runs") / name
    return run_dir


def join_processes(device: str = "auto") -> None:
    """Under torchrun, join the process group now (a no-op in one process, or once joined): the
    barriers and collectives a stage makes before its Trainer exists (the run folder, reference
    passes) need it."""
    from prefcli.trainer import resolve_device

    dist.init_distributed(resolve_device(device))


# The stages' learning rates were measured on the demo's ~1M-parameter models. Full fine-tuning
# of a bigger pretrained model at those rates overwrites what it knew: SmolLM2-135M after 30 DPO
# steps at 5e-4 on review pairs scored 100% of held-out pairs and answered "Name three primary
# colors." with "Yes, the reviewer liked the AI because it is possible." LoRA trains a small
# update and keeps the rate (the same run with LoRA r16: 100%, general answers unchanged).
LR_MEASURED_UP_TO = 2_000_000  # parameters
LR_SCALE_POWER = 1.0


def default_lr(stage_lr: float, model: torch.nn.Module | None) -> float:
    """The stage's learning rate for this model when --lr is not given: as measured for LoRA, for
    training from scratch (no model) and up to LR_MEASURED_UP_TO parameters; above that, in full
    fine-tuning, in proportion to size^-LR_SCALE_POWER (135M parameters: 5e-4 -> 7.4e-6)."""
    if model is None or lora.has_adapters(model):
        return stage_lr
    n = sum(p.numel() for p in model.parameters())
    return stage_lr * min(1.0, LR_MEASURED_UP_TO / n) ** LR_SCALE_POWER


def train_config(cfg, num_examples: int | None = None, default_steps: int = 100,
                 default_epochs: float | None = None, *, stage_lr: float = TRAINING_LR,
                 model: torch.nn.Module | None = None) -> TrainConfig:
    """The Trainer's config from a stage config's shared training options.

    --max-steps wins; else --epochs over `num_examples`; else the stage's default passes over
    its data (`default_epochs`: 1,900 pairs get a tenth of the steps of 19,000); else default_steps.
    --lr wins; else the stage's rate for `model` (`default_lr`).
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
        max_steps=steps, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        lr=cfg.lr if cfg.lr is not None else default_lr(stage_lr, model), warmup=cfg.warmup,
        eval_every=cfg.eval_every, save_every=cfg.save_every, seed=cfg.seed, device=cfg.device,
        compile=cfg.compile, fsdp=getattr(cfg, "fsdp", False), precision=getattr(cfg, "precision", "auto"),
        report_to=tuple(tracking.check(list(getattr(cfg, "report_to", ()) or ()))),
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
    adapter = lora.has_adapters(model) and not config.get("merge")
    if adapter:  # a PEFT adapter folder on the model the run started from (prefcli.lora)
        base = Path(getattr(model, "lora_base", None) or tokenizer_folder)
        parents = [*parents, {**parent_ref("models", base), "role": "adapter_base"}]
    elif lora.has_adapters(model):
        lora.merge_adapters(model)
    with ws.create("models", name, stage=stage, config=config, parents=parents, overwrite=overwrite,
                   meta_kind=meta_kind) as art:
        if adapter:
            lora.save_adapter(model, art.path, base, reward=kind == "reward", dtype=_stored_dtype(model))
            art.meta["adapter"] = True
        else:
            save_model(model, art.path, kind=kind, generation_config=generation_config(tok))
        copy_tokenizer_files(tokenizer_folder, art.path)
        if extra_files is not None:
            extra_files(art.path)
        art.meta["chat"] = chat
        art.meta["metrics"] = metrics
        art.meta.update(ws.run_record(name))
        art.meta.update(extra_meta or {})
    ws.finish_run(name)
    return ws.folder("models") / name


def sync_token_ids(model: Transformer, tok: Tokenizer) -> None:
    """Record the tokenizer's special ids in the model config (config.json carries them)."""
    model.config.bos_token_id = tok.bos_id
    model.config.eos_token_id = tok.eos_id
    model.config.pad_token_id = tok.pad_id


def _stored_dtype(model: Transformer) -> torch.dtype:
    """The dtype the model's weights were stored in (adapters are saved in it too)."""
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(model.config.dtype or "", torch.float32)


def prepare_for_training(model: Transformer, cfg, *, reward: bool = False) -> Transformer:
    """--grad-checkpoint and LoRA (--lora-rank > 0) on a freshly loaded model (every training stage)."""
    model.grad_checkpoint = bool(getattr(cfg, "grad_checkpoint", False))
    spec = lora.spec_from_config(cfg)
    if spec is not None:
        lora.add_adapters(model, spec, trainable_head="score" if reward else None, seed=getattr(cfg, "seed", 0))
    return model

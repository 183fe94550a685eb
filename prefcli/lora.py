"""LoRA adapters on the model's linear layers, saved and loaded in PEFT's file format.

A LoRA adapter adds a trainable low-rank term to a frozen projection (Hu et al. 2021):

    y = W x + (alpha / r) * B A dropout(x),    A [r, in] (Kaiming init), B [out, r] (zeros)

`add_adapters` freezes the model and hangs `lora_A` / `lora_B` (nn.Linear, no bias) on each
target projection, so the parameter names are PEFT's without its `base_model.model.` prefix
(`model.layers.0.self_attn.q_proj.lora_A.weight`). The model's forward adds the term
(`prefcli.model.adapter_terms`); `adapters_disabled` switches it off, which is how DPO and
online RL get their reference (the frozen base) without a second copy of the weights.

Stacking: when training starts from an adapter folder, that adapter is merged into the
weights in memory (so "adapters off" is the starting model) and remembered; the saved
adapter then holds both deltas side by side (rank r_old + r_new, scale folded into B), so
PEFT loads it onto the original base folder and gets the trained model.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from prefcli.errors import PrefcliError

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSpec:
    rank: int
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS

    def __post_init__(self):
        if self.rank < 1:
            raise PrefcliError(f"--lora-rank {self.rank}: must be at least 1 (0 turns LoRA off)")
        if not 0 <= self.dropout < 1:
            raise PrefcliError(f"--lora-dropout {self.dropout}: must be in [0, 1)")
        targets = tuple(self.targets) or ALL_TARGETS
        if "all-linear" in targets:
            targets = ALL_TARGETS
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown:
            raise PrefcliError(f"--lora-targets: unknown layer(s) {', '.join(unknown)}",
                               f"choose from {', '.join(ALL_TARGETS)} (default: all of them)")
        self.targets = targets
        if self.alpha is None:
            self.alpha = 2.0 * self.rank

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def spec_from_config(cfg) -> LoraSpec | None:
    """The LoRA spec a stage config asks for (its lora_* fields), or None when --lora-rank is 0."""
    rank = getattr(cfg, "lora_rank", 0) or 0
    if rank == 0:
        return None
    targets = getattr(cfg, "lora_targets", None) or ALL_TARGETS
    if isinstance(targets, str):
        targets = [targets]
    targets = [t.strip() for entry in targets for t in entry.split(",") if t.strip()]  # repeatable or comma-separated
    return LoraSpec(rank, getattr(cfg, "lora_alpha", None), getattr(cfg, "lora_dropout", 0.0) or 0.0, tuple(targets))


def target_layers(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """Qualified name -> projection, for every block projection whose last name part is a target."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets and ".layers." in f".{name}"}


def has_adapters(model: nn.Module) -> bool:
    return any("lora_A" in m._modules for m in model.modules())


def add_adapters(model: nn.Module, spec: LoraSpec, *, trainable_head: str | None = None, seed: int = 0) -> nn.Module:
    """Freeze every weight, then add fresh trainable adapters to the target projections.

    trainable_head: a module name left trainable too ("score": a reward model's head).
    seed: A's initialisation (a run is repeatable whatever the global RNG did before).
    """
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in target_layers(model, spec.targets).values():
        if "lora_A" in layer._modules:
            raise ValueError("the model already has adapters; merge them first")
        p = layer.weight
        layer.lora_A = nn.Linear(layer.in_features, spec.rank, bias=False).to(device=p.device, dtype=p.dtype)
        layer.lora_B = nn.Linear(spec.rank, layer.out_features, bias=False).to(device=p.device, dtype=p.dtype)
        # PEFT's default: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1 / math.sqrt(layer.in_features)
        with torch.no_grad():
            layer.lora_A.weight.copy_((torch.rand(layer.lora_A.weight.shape, generator=g) * 2 - 1) * bound)
        nn.init.zeros_(layer.lora_B.weight)  # so the adapter starts as no change at all
        layer.lora_scale, layer.lora_dropout, layer.lora_on = spec.scale, spec.dropout, True
    if trainable_head is not None:
        head = model._modules.get(trainable_head)
        if head is not None:
            head.requires_grad_(True)
    model.lora_spec = spec
    return model


@contextmanager
def adapters_disabled(model: nn.Module):
    """The base model for the duration (the reference of DPO and online RL): adapters switched off."""
    layers = [m for m in model.modules() if "lora_A" in m._modules]
    before = [m.lora_on for m in layers]
    for m in layers:
        m.lora_on = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.lora_on = on


class AdaptersOff:
    """The model with its adapters switched off, called like the model: a reference that is the
    base without a second copy of the weights. Attributes (lm_head, config, ...) are the model's."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.model):
            return self.model(*args, **kwargs)

    def __getattr__(self, name):
        if name == "model":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)


def merge_adapters(model: nn.Module) -> nn.Module:
    """W <- W + scale * B A for every adapter, then drop the adapters: a plain model again."""
    with torch.no_grad():
        for layer in [m for m in model.modules() if "lora_A" in m._modules]:
            delta = layer.lora_B.weight.float() @ layer.lora_A.weight.float() * layer.lora_scale
            layer.weight += delta.to(layer.weight.dtype)
            del layer.lora_A, layer.lora_B
            del layer.lora_scale, layer.lora_dropout, layer.lora_on
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model


# ----------------------------------------------------------------------------- PEFT files

def is_adapter_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrefcliError(f"{path}: not a readable adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise PrefcliError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported", "prefcli loads LoRA adapters")
    for flag in ("use_dora", "fan_in_fan_out", "use_rslora"):
        if cfg.get(flag):
            raise PrefcliError(f"{path}: {flag} is not supported", "use a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise PrefcliError(f"{path}: LoRA bias {cfg['bias']!r} is not supported", "use bias 'none'")
    return cfg


def save_adapter(model: nn.Module, folder: str | Path, base_path: str | Path, *, reward: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does.

    One adapter keeps its rank and alpha. A stacked one (trained on top of an adapter) is
    written as one adapter of the summed rank with alpha = rank (scale 1, folded into B);
    a projection that only one of them touched gets zeros in the other's rows.
    """
    folder = Path(folder)
    spec: LoraSpec = model.lora_spec
    current = {name: m for name, m in model.named_modules() if "lora_A" in m._modules}
    merged = getattr(model, "lora_merged", None) or {}
    tensors = {}
    if not merged:
        rank, alpha = spec.rank, spec.alpha
        for name, m in current.items():
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
    else:
        r0 = max(A.shape[0] for A, _ in merged.values())
        rank = alpha = r0 + spec.rank
        layers = dict(model.named_modules())
        for name in sorted(set(merged) | set(current)):
            layer = layers[name]
            A, B = torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank)
            if name in merged:
                a, b = merged[name]
                A[:a.shape[0]], B[:, :a.shape[0]] = a, b
            if name in current:
                m = current[name]
                A[r0:] = m.lora_A.weight.detach().float().cpu()
                B[:, r0:] = m.lora_B.weight.detach().float().cpu() * m.lora_scale
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B
    if reward and model._modules.get("score") is not None:
        tensors[f"{PEFT_PREFIX}score.weight"] = model.score.weight.detach()
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
    targets = sorted({k.split(".")[-3] for k in tensors if ".lora_A." in k})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if reward else "CAUSAL_LM",
        "base_model_name_or_path": str(Path(base_path).resolve()),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": ["score"] if reward else None,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and its tensors, names without PEFT's prefix."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise PrefcliError(f"{folder}: no {ADAPTER_WEIGHTS}", "an adapter folder holds adapter_config.json and adapter_model.safetensors")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix(PEFT_PREFIX)
            tensors[name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = f.get_tensor(key)
    return cfg, tensors


def apply_adapter(model: nn.Module, folder: str | Path, *, remember: bool = False) -> nn.Module:
    """Merge a PEFT LoRA adapter folder into the model's weights (and its score head, if saved).

    remember=True keeps the adapter's A and B (scale folded in) so that an adapter trained
    on top can be saved stacked onto the same base (see the module docstring).
    """
    cfg, tensors = read_adapter(folder)
    layers = dict(model.named_modules())
    merged = {}
    with torch.no_grad():
        for key, A in tensors.items():
            if ".lora_A." not in key:
                continue
            name = key.split(".lora_A.")[0]
            B = tensors.get(f"{name}.lora_B.weight")
            layer = layers.get(name)
            if B is None or not isinstance(layer, nn.Linear) or A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                raise PrefcliError(f"{folder}: adapter weights for {name} do not fit the base model",
                                   "is adapter_config.json's base the model this adapter was trained on?")
            alpha = next((a for k, a in (cfg.get("alpha_pattern") or {}).items() if name.endswith(k)), cfg["lora_alpha"])
            B = B.float() * (alpha / A.shape[0])  # A's rows are this module's rank (rank_pattern included)
            layer.weight += (B @ A.float()).to(layer.weight.dtype)
            merged[name] = (A.float(), B)
        if "score.weight" in tensors:
            head = model._modules.get("score")
            if head is None or head.weight.shape != tensors["score.weight"].shape:
                raise PrefcliError(f"{folder}: the adapter's score head does not fit the model")
            head.weight.copy_(tensors["score.weight"].to(head.weight.dtype))
    if remember:
        model.lora_merged = merged
    return model


def adapter_base(folder: str | Path) -> Path:
    """The base model folder of an adapter: its lineage (meta.json), else adapter_config.json's path."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = {}
    for p in meta.get("parents", []):
        if p.get("role") == "adapter_base" and Path(p.get("path", "")).is_dir():
            return Path(p["path"])
    base = read_adapter_config(folder).get("base_model_name_or_path")
    if base and (Path(base) if Path(base).is_absolute() else folder / base).is_dir():
        return Path(base) if Path(base).is_absolute() else (folder / base).resolve()
    raise PrefcliError(f"{folder}: the base model of this adapter is not found ({base or 'no base path'})",
                       "import or restore the base model, or fix base_model_name_or_path in adapter_config.json")

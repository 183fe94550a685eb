"""Steering: condition a chat model on a preference vector (named attributes with weights).

A preference vector v holds one weight per attribute (the demo's: correct, polite,
concise). Training labels are in [0, 1]: 1 = the reply has the attribute (or, for a
reward-model attribute, ranks at the top of the training replies), 0 = it lacks it.
A learned linear map turns v into one vector of the model's hidden size, added to the
embedding of every token of the conversation, prompt and reply alike:

    x_t = embed(token_t) + W (v - d)        W: [hidden, attributes], zero at the start

d is the default vector (all ones: "as good as the data gets" on every attribute). At
v = d the offset is zero, so the model folder alone (which transformers loads as a plain
causal LM) is the model steered to its defaults, and training starts exactly at the
policy it was given. Why added to every token rather than a prefix: docs/steering.md.

Beside the model, in the same folder:
    steer.safetensors   proj.weight [hidden, attributes] (float32)
    steer.json          {"format": 1, "mode": "add", "attributes": [...], "defaults": [...],
                         "label_mean": [...], "sources": {attribute: where its labels came from}}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from prefcli.errors import PrefcliError

WEIGHTS_FILE = "steer.safetensors"
CONFIG_FILE = "steer.json"
FORMAT = 1


class Steering(nn.Module):
    """Attribute names, their defaults, and the projection W of a preference vector into the embeddings."""

    def __init__(self, attributes: list[str], hidden_size: int, defaults: list[float] | None = None,
                 sources: dict[str, str] | None = None, label_mean: list[float] | None = None):
        super().__init__()
        if not attributes:
            raise ValueError("steering needs at least one attribute")
        self.attributes = list(attributes)
        self.sources = dict(sources or {})
        self.label_mean = list(label_mean) if label_mean is not None else None
        self.register_buffer("defaults", torch.tensor(defaults or [1.0] * len(attributes), dtype=torch.float32),
                             persistent=False)
        self.proj = nn.Linear(len(attributes), hidden_size, bias=False)
        nn.init.zeros_(self.proj.weight)  # start exactly at the policy

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """Embedding offsets [B, hidden] of preference vectors [B, attributes]."""
        return self.proj(vectors.to(self.defaults) - self.defaults)

    # -- preferences as people write them

    def vector(self, prefs: dict[str, float] | None = None) -> torch.Tensor:
        """The full vector [attributes]: the defaults, with the weights in prefs in their places."""
        v = self.defaults.clone()
        for name, weight in (prefs or {}).items():
            v[self.attributes.index(name)] = float(weight)
        return v

    @torch.no_grad()
    def offset(self, prefs: dict[str, float] | None = None) -> torch.Tensor | None:
        """The embedding offset [hidden] for these preferences; None at the defaults (the plain model)."""
        v = self.vector(prefs)
        if torch.equal(v, self.defaults):
            return None
        return self(v[None])[0]

    def parse(self, spec: str, option: str = "--prefer") -> dict[str, float]:
        return parse_prefer(spec, self.attributes, option)

    def describe(self, prefs: dict[str, float] | None = None) -> str:
        """'correct=1, polite=0, concise=1': the whole vector, defaults included."""
        return ", ".join(f"{a}={w:g}" for a, w in zip(self.attributes, self.vector(prefs).tolist()))

    # -- files

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        save_file({"proj.weight": self.proj.weight.detach().float().cpu().contiguous()},
                  str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        doc = {"format": FORMAT, "mode": "add", "attributes": self.attributes,
               "defaults": self.defaults.tolist(), "label_mean": self.label_mean, "sources": self.sources}
        (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")


def has_steering(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def load_steering(folder: str | Path, hidden_size: int | None = None,
                  device: str | torch.device = "cpu") -> Steering | None:
    """The steering beside a model folder (None when it has no steer.json), checked against the model."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file():
        return None
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrefcliError(f"{cfg_path}: invalid JSON ({e})") from None
    attributes, defaults = doc.get("attributes"), doc.get("defaults")
    if doc.get("format") != FORMAT or doc.get("mode") != "add":
        raise PrefcliError(f"{cfg_path}: unsupported steering (format {doc.get('format')}, mode {doc.get('mode')!r})",
                           "this prefcli reads format 1, mode 'add'")
    if (not isinstance(attributes, list) or not attributes or not all(isinstance(a, str) for a in attributes)
            or not isinstance(defaults, list) or len(defaults) != len(attributes)):
        raise PrefcliError(f"{cfg_path}: needs 'attributes' (names) and 'defaults' (one number each)")
    if not weights.is_file():
        raise PrefcliError(f"{folder}: has {CONFIG_FILE} but no {WEIGHTS_FILE}", "the folder may be damaged")
    with safe_open(str(weights), framework="pt") as f:
        if "proj.weight" not in f.keys():
            raise PrefcliError(f"{weights}: no tensor 'proj.weight'", "the folder may be damaged")
        w = f.get_tensor("proj.weight")
    if w.dim() != 2 or w.shape[1] != len(attributes) or (hidden_size is not None and w.shape[0] != hidden_size):
        raise PrefcliError(f"{weights}: proj.weight has shape {tuple(w.shape)}, expected "
                           f"[{hidden_size or 'hidden'}, {len(attributes)}]", "the folder may be damaged")
    steering = Steering(attributes, w.shape[0], [float(d) for d in defaults], doc.get("sources"), doc.get("label_mean"))
    with torch.no_grad():
        steering.proj.weight.copy_(w)
    return steering.to(device)


def parse_prefer(spec: str, attributes: list[str], option: str = "--prefer") -> dict[str, float]:
    """'correct=1,concise=0.5' -> {"correct": 1.0, "concise": 0.5}; any mistake is one clear error."""
    example = f"e.g. {option} {attributes[0]}=1" + (f",{attributes[1]}=0.5" if len(attributes) > 1 else "")
    prefs: dict[str, float] = {}
    parts = [p.strip() for p in str(spec).split(",")]
    if not any(parts):
        raise PrefcliError(f"{option}: needs NAME=WEIGHT pairs", example)
    for part in parts:
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise PrefcliError(f"{option} {spec}: '{part}' is not NAME=WEIGHT", example)
        if name not in attributes:
            raise PrefcliError(f"{option} {spec}: unknown attribute '{name}'",
                               f"this model's attributes: {', '.join(attributes)}")
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise PrefcliError(f"{option} {spec}: the weight of {name}, '{value}', is not a number",
                               "weights are numbers, 0 (none of it) to 1 (as much as the data has)")
        if name in prefs:
            raise PrefcliError(f"{option} {spec}: {name} is given twice", "give each attribute once")
        prefs[name] = weight
    return prefs


class SteeredLM(nn.Module):
    """A language model and its steering, trained as one module: logits given preference vectors."""

    def __init__(self, lm: nn.Module, steering: Steering):
        super().__init__()
        self.lm = lm
        self.steering = steering

    def forward(self, input_ids: torch.Tensor, vectors: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.lm(input_ids, embed_offset=self.steering(vectors), **kwargs)


def steered_models(models: dict, specs: list[str], option: str = "--prefer") -> tuple[dict, dict]:
    """Every steered model once per preference setting, e.g. {"steer (correct=0)": Loaded}, and
    {that name: its embedding offset}. Models without steering stay as they are."""
    import dataclasses

    out, offsets, steered = {}, {}, 0
    for name, lm in models.items():
        p = lm.model.model.embed_tokens.weight
        steering = load_steering(lm.path, lm.model.config.hidden_size, device=p.device)
        if steering is None:
            out[name] = lm
            continue
        steered += 1
        for spec in specs:
            prefs = steering.parse(spec, option)
            key = f"{name} ({spec.replace(' ', '')})"  # not [..]: rich tables read that as markup
            out[key] = dataclasses.replace(lm)  # its own Loaded: sampled on its own, with its offset
            offsets[key] = steering.offset(prefs)
    if not steered:
        raise PrefcliError(f"{option}: no --model has steering weights ({CONFIG_FILE})",
                           "steer a model made by `prefcli align --method steer`")
    return out, offsets

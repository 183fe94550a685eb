"""Bring a local model into prefcli's format: a Hugging Face folder, or a GGUF file dequantised.

A GGUF file (llama.cpp's format) is read by transformers' GGUF reader (`gguf_file=`, which
needs the `gguf` package) into float32 weights; they go into prefcli's one model class
(so an architecture prefcli cannot run is refused here, not at the first chat) and are
written as an ordinary HF model folder. Safetensors and JSON only: a folder whose weights
are in pickle files is refused.
"""

from __future__ import annotations

import json

import shutil
from pathlib import Path

import torch

from prefcli.errors import PrefcliError
from prefcli.model import ModelConfig, Transformer, load_model, save_model

# Files of an HF folder that travel with the weights (tokenizer and generation settings).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def source_kind(source: Path) -> str:
    """"gguf" or "hf_folder"; anything else is a one-line error."""
    if source.is_file() and source.suffix.lower() == ".gguf":
        return "gguf"
    if source.is_dir() and (source / "config.json").is_file():
        return "hf_folder"
    if source.is_dir() and (source / "adapter_config.json").is_file():
        raise PrefcliError(f"{source}: is a LoRA adapter folder, not a model",
                           "import its base model; prefcli loads the adapter folder itself with --model/--policy")
    if not source.exists():
        raise PrefcliError(f"import: {source} does not exist",
                           "give a local HF model folder or a .gguf file (hub names must be downloaded first, "
                           "e.g. `huggingface-cli download NAME --local-dir DIR`)")
    raise PrefcliError(f"import: {source} is neither a .gguf file nor a model folder with config.json",
                       "give a local HF model folder or a .gguf file")


def import_hf_folder(source: Path, dest: Path) -> dict:
    """Check prefcli can run the folder (architecture, weights), then copy its files."""
    model = load_model(source)  # refuses unsupported architectures and pickle-only weights in one line
    if not (source / "tokenizer.json").is_file():
        raise PrefcliError(f"import: {source} has no tokenizer.json", "a model folder must carry its tokenizer (tokenizer.json)")
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(source.iterdir()):
        if f.is_file() and (f.name == "config.json" or f.name in TOKENIZER_FILES
                            or f.name.endswith(".safetensors") or f.name == "model.safetensors.index.json"):
            shutil.copy2(f, dest / f.name)
    _template_into_config(dest)
    return {"format": "hf_folder", "parameters": sum(p.numel() for p in model.parameters())}


def import_gguf(source: Path, dest: Path) -> dict:
    """Dequantise a GGUF file through transformers into an HF model folder with its tokenizer."""
    try:
        import gguf  # noqa: F401  (transformers' reader needs it)
        import transformers
    except ImportError as e:
        raise PrefcliError(f"import: reading GGUF files needs the {e.name} package",
                           "pip install 'prefcli[gguf]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    folder, name = str(source.parent), source.name
    try:
        hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # transformers raises many types for files it cannot read
        raise PrefcliError(f"import: {source} is not a GGUF file transformers can read ({type(e).__name__}: {e})".split("\n")[0],
                           "llama, mistral and qwen2 GGUF files are supported") from None
    d = hf_config.to_dict()
    d.pop("quantization_config", None)
    config = ModelConfig.from_hf_dict(d, source)  # refuses what prefcli cannot run, before the slow part
    hf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = Transformer(config, lm_head=True)
    state = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise PrefcliError(f"import: {source}: weights do not match the architecture"
                           + (f"; missing {', '.join(missing[:3])}" if missing else "")
                           + (f"; unexpected {', '.join(unexpected[:3])}" if unexpected else ""))
    del hf_model
    dest.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float32"  # dequantised: float32 is exact for these values
    save_model(model, dest, generation_config={k: v for k, v in (("bos_token_id", tok.bos_token_id),
                                                                 ("eos_token_id", tok.eos_token_id)) if v is not None})
    tok.save_pretrained(str(dest))
    for extra in ("tokenizer.model", "vocab.json", "merges.txt"):  # keep the folder to the files prefcli reads
        (dest / extra).unlink(missing_ok=True)
    _template_into_config(dest)
    if not (dest / "tokenizer.json").is_file():
        raise PrefcliError(f"import: {source}: transformers wrote no tokenizer.json for this file",
                           "prefcli needs a fast (tokenizers) tokenizer")
    dropped = _drop_tokens_past(dest / "tokenizer.json", config.vocab_size)
    return {"format": "gguf", **({"dropped_tokens": dropped} if dropped else {}), "parameters": sum(p.numel() for p in model.parameters()),
            "quantization": _gguf_file_type(source)}


def _drop_tokens_past(path: Path, vocab_size: int) -> list[str]:
    """Remove added tokens whose id has no embedding row: transformers' GGUF converter may add one
    (e.g. <|endoftext|> when the file names no such token), and the model could never read it."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    dropped = [t["content"] for t in doc.get("added_tokens", []) if t["id"] >= vocab_size]
    if dropped:
        doc["added_tokens"] = [t for t in doc["added_tokens"] if t["id"] < vocab_size]
        path.write_text(json.dumps(doc, ensure_ascii=False, indent=2), encoding="utf-8")
    return dropped


def _gguf_file_type(source: Path) -> str | None:
    """The quantisation the file says it holds (e.g. MOSTLY_Q4_1), for the record."""
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(source)).fields.get("general.file_type")
        return LlamaFileType(int(field.parts[field.data[0]][0])).name if field else None
    except Exception:  # informative only
        return None


def _template_into_config(folder: Path) -> None:
    """transformers 5 writes the chat template to chat_template.jinja; keep it in tokenizer_config.json
    as well, where every stage that copies tokenizer files carries it along."""
    import json

    jinja, config_path = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja.is_file() and config_path.is_file():
        config = json.loads(config_path.read_text())
        if not config.get("chat_template"):
            config["chat_template"] = jinja.read_text()
            config_path.write_text(json.dumps(config, indent=2) + "\n")
        jinja.unlink()

"""Opening a model folder from disk: every way a folder can be broken is one clear error.

A folder passed as a path may be truncated, hand-edited or made by another tool; what
model.py and tokenizer.py raise deep inside (safetensors header errors, a string where
config.json wants a number, a tokenizer with more ids than the embedding has rows)
becomes a PrefcliError naming the option and the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefcli.errors import PrefcliError

HINT = "pass a complete model folder (config.json, model.safetensors, tokenizer.json), or rebuild it"


def load_model_folder(path: Path, option: str, **kwargs):
    """(Tokenizer, Transformer) of `path`, checked to fit together."""
    from safetensors import SafetensorError

    from prefcli.model import load_model
    from prefcli.tokenizer import Tokenizer

    try:
        tok = Tokenizer(path)
        model = load_model(path, **kwargs)
    except PrefcliError as e:
        raise PrefcliError(f"{option}: {e.message}", e.hint) from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, RuntimeError, SafetensorError) as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if isinstance(e, json.JSONDecodeError) or isinstance(e, UnicodeDecodeError):
            reason = f"a JSON file cannot be read ({reason})"
        raise PrefcliError(f"{option}: {path} is not a loadable model ({type(e).__name__}: {reason})", HINT) from None
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:
        raise PrefcliError(
            f"{option}: the tokenizer of {path} has {tok.vocab_size} tokens but the model only {vocab} (vocab_size)",
            "the tokenizer files do not belong to this model; copy in the model's own tokenizer",
        )
    return tok, model

"""`prefcli tokenize`: train a byte-level BPE tokenizer and encode the corpus into a token dataset.

Recipe: pick the documents (the user's files or the built-in corpus), train the
tokenizer on one streamed pass (or load `--tokenizer`), encode a second pass in
batches straight to disk with a seeded document-level train/val split, then seal
both artifacts.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from prefcli.config import to_dict
from prefcli.config import option
from prefcli.data.readers import expand_inputs, iter_documents
from prefcli.data.tokens import TokenWriter, id_dtype
from prefcli.errors import PrefcliError
from prefcli.progress import progress
from prefcli.tokenizer import Tokenizer, iter_text_chunks, save_tokenizer, train_bpe
from prefcli.workspace import Workspace, check_name, parent_ref, sha256_file

ENCODE_BATCH = 1024  # documents per encode_batch call: large enough to keep every core busy


@dataclass
class TokenizeConfig:
    input: list[str] = option(factory=list, short="-i", default_text="the built-in demo corpus",  # empty: the demo corpus
                              help="Text files, folders or globs (.txt split at blank lines; .jsonl/.json/.parquet rows); repeatable.")
    text_field: str = option("text", "Field holding the text in .jsonl/.json/.parquet rows.")
    vocab_size: int = option(2048, "Vocabulary size, special tokens included.")
    min_frequency: int = option(2, "Minimum count for a merge.", ge=1)
    val_fraction: float = option(0.05, "Share of documents held out for validation.", ge=0, lt=1)
    name: str = option("default", "Tokenizer artifact name.")
    dataset: str = option("corpus", "Dataset artifact name.")
    tokenizer: str | None = option(None, "Reuse this tokenizer instead of training one.", default_text="train one")
    seed: int = option(0, "Random seed.")
    overwrite: bool = option(False, "Replace an existing artifact of the same name.")


def _document_source(cfg: TokenizeConfig) -> tuple[Callable[[], Iterator[str]], int | None, list[dict]]:
    """A function giving a fresh pass over the documents, their total bytes, and lineage records."""
    if not cfg.input:
        from prefcli.data import demo

        return (lambda: demo.corpus_documents(cfg.seed)), None, [{"kind": "input", "name": f"demo corpus (built-in, seed {cfg.seed})"}]
    files = expand_inputs(cfg.input, "--input")
    total = sum(f.stat().st_size for f in files)
    inputs = [{"kind": "input", "path": str(f.resolve()), "size": f.stat().st_size} for f in files]
    return (lambda: iter_documents(files, cfg.text_field)), total, inputs


def _check(cfg: TokenizeConfig, ws: Workspace) -> None:
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise PrefcliError(f"--val-fraction {cfg.val_fraction} is out of range", "use a number from 0 up to (not including) 1")
    if cfg.min_frequency < 1:
        raise PrefcliError(f"--min-frequency {cfg.min_frequency} must be at least 1", "use 2 for most corpora")
    check_name(cfg.name, "--name")
    check_name(cfg.dataset, "--dataset")
    if cfg.tokenizer is None:
        ws.check_writable("tokenizers", cfg.name, cfg.overwrite, "--name")
    ws.check_writable("datasets", cfg.dataset, cfg.overwrite, "--dataset")
    ws.claim("datasets", cfg.dataset)  # held until the command ends: a second writer is refused now, not at the end


def run(cfg: TokenizeConfig, ws: Workspace) -> dict:
    t0 = time.time()
    documents, total_bytes, inputs = _document_source(cfg)
    _check(cfg, ws)

    # Pass 1: the tokenizer (trained in memory; nothing is written yet).
    if cfg.tokenizer is None:
        stats = {"documents": 0, "characters": 0}

        def counted() -> Iterator[str]:
            for doc in documents():
                stats["documents"] += 1
                stats["characters"] += len(doc)
                yield doc

        with progress(None, "training tokenizer", unit="doc") as bar:
            def with_bar() -> Iterator[str]:
                for doc in counted():
                    bar.update(1)
                    yield doc
            hf_tok = train_bpe(with_bar(), cfg.vocab_size, cfg.min_frequency)
        if stats["documents"] == 0:
            where = ", ".join(cfg.input) if cfg.input else "the built-in corpus"
            raise PrefcliError(f"--input: {where} holds no text (empty corpus)", "pass files with some text in them")
        tok_parent = None
    else:
        tok_path = ws.resolve("tokenizers", cfg.tokenizer, "--tokenizer")
        tokenizer = Tokenizer(tok_path)
        hf_tok = tokenizer.hf
        tok_parent = parent_ref("tokenizers", tok_path)

    vocab = hf_tok.get_vocab_size(with_added_tokens=True)
    eos = hf_tok.token_to_id("<|eos|>")
    if eos is None:
        raise PrefcliError("--tokenizer: the tokenizer has no <|eos|> token", "use a tokenizer made by `prefcli tokenize`")
    dtype = id_dtype(vocab)
    config = to_dict(cfg)

    # Pass 2: encode into the dataset; both artifacts are sealed only when all is written.
    tok_writer = None
    if cfg.tokenizer is None:
        tok_writer = ws.create("tokenizers", cfg.name, stage="tokenize", config=config, parents=inputs, overwrite=cfg.overwrite)
    import contextlib

    with contextlib.ExitStack() as stack:
        if tok_writer is not None:
            tok_art = stack.enter_context(tok_writer)
            save_tokenizer(hf_tok, tok_art.path)
            tok_art.meta["metrics"] = {"vocab_size": vocab}
            tok_json = tok_art.path / "tokenizer.json"
            tok_parent = {"kind": "tokenizers", "name": cfg.name, "path": f"tokenizers/{cfg.name}"}  # relative to the root
        else:
            tok_json = tok_path / "tokenizer.json"
        ds = stack.enter_context(ws.create("datasets", cfg.dataset, stage="tokenize", config=config,
                                           parents=[tok_parent, *inputs], overwrite=cfg.overwrite))
        counts = _encode(documents, hf_tok, eos, dtype, ds.path, cfg, total_bytes)
        if counts["documents"] == 0:
            raise PrefcliError(f"--input: {', '.join(cfg.input) or 'the corpus'} holds no text (empty corpus)", "pass files with some text in them")
        counts["chars_per_token"] = round(counts["characters"] / max(1, counts["train_tokens"] + counts["val_tokens"]), 3)
        ds.meta.update({
            "dtype": dtype, "vocab_size": vocab, "eos_id": eos,
            "tokenizer_sha256": sha256_file(tok_json),
            "metrics": counts,
        })
        if tok_writer is not None:
            tok_art.meta["metrics"].update({"chars_per_token": counts["chars_per_token"]})

    return {
        "tokenizer": cfg.tokenizer or cfg.name,
        "dataset": cfg.dataset,
        "vocab_size": vocab,
        **counts,
        "seconds": round(time.time() - t0, 2),
    }


def _encode(documents, hf_tok, eos: int, dtype: str, folder: Path, cfg: TokenizeConfig, total_bytes: int | None) -> dict:
    """Encode every document (ids + <|eos|>) into train/val splits chosen per document, seeded."""
    rng = random.Random(cfg.seed)
    train = TokenWriter(folder / "train.safetensors", dtype)
    val = TokenWriter(folder / "val.safetensors", dtype)
    counts = {"documents": 0, "train_documents": 0, "val_documents": 0, "characters": 0, "bytes": 0}
    with progress(total_bytes, "encoding", unit="B") as bar:
        for chunk in iter_text_chunks(documents(), ENCODE_BATCH):
            encodings = hf_tok.encode_batch(chunk, add_special_tokens=False)
            nbytes = 0
            for doc, enc in zip(chunk, encodings):
                # The first document always goes to val so a non-zero fraction never gives an empty split.
                to_val = cfg.val_fraction > 0 and (counts["documents"] == 0 or rng.random() < cfg.val_fraction)
                ids = enc.ids
                ids.append(eos)
                (val if to_val else train).write(ids)
                counts["val_documents" if to_val else "train_documents"] += 1
                counts["documents"] += 1
                counts["characters"] += len(doc)
                nbytes += len(doc.encode("utf-8", "replace"))
            counts["bytes"] += nbytes
            bar.update(nbytes)
            bar.set_postfix(docs=counts["documents"], tokens=train.count + val.count)
    meta = {"vocab_size": hf_tok.get_vocab_size(with_added_tokens=True), "eos_id": eos}
    train.close(meta)
    val.close(meta)
    counts["train_tokens"], counts["val_tokens"] = train.count, val.count
    return counts

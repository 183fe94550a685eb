"""Custom data as a first-class path: tokenizers saved by transformers, datasets folders, ShareGPT rows."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import CHAT_LINES, write_jsonl
from prefcli.chat_format import CHAT_TEMPLATE
from prefcli.errors import PrefcliError
from prefcli.tokenizer import Tokenizer, encoding_identity, same_tokenizer

FAST = ["--batch-size", "4", "--warmup", "0"]


def resave_with_transformers(src, dst):
    """An HF model folder as transformers 5 writes it: tokenizer.json gains a pass-through
    post-processor, the template moves to chat_template.jinja."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "meta.json"):
        (dst / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_a_tokenizer_saved_by_transformers_is_the_same_tokenizer(chat_ws, tmp_path):
    ws, _ = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    before, after = (ws / "models/base/tokenizer.json").read_text(), (hf / "tokenizer.json").read_text()
    assert before != after  # the bytes differ ...
    assert json.loads(after)["post_processor"]["type"] == "TemplateProcessing"
    a, b = Tokenizer(ws / "models/base"), Tokenizer(hf)
    assert same_tokenizer(a, b)  # ... what it encodes does not
    text = "the cat sat. " + CHAT_LINES[0][0]
    assert a.encode(text) == b.encode(text)
    assert b.chat_template == CHAT_TEMPLATE and "chat_template" not in json.loads((hf / "tokenizer_config.json").read_text())
    # A post-processor that adds a token, a changed vocabulary: different tokenizers.
    doc = json.loads(after)
    doc["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|bos|>", "type_id": 0}})
    assert encoding_identity(json.dumps(doc)) != encoding_identity(before)
    doc = json.loads(before)
    doc["model"]["vocab"]["zzz-new"] = len(doc["model"]["vocab"])
    assert encoding_identity(json.dumps(doc)) != encoding_identity(before)


def test_init_and_kl_accept_a_folder_saved_by_transformers(cli, chat_ws, tmp_path):
    ws, files = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    r = cli("-w", ws, "pretrain", "--init", hf, "--out", "more", "--max-steps", "1", *FAST, "--json")
    assert r.code == 0, r.stderr
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--reference", hf, "--data", files["pairs"],
            "--max-steps", "1", "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr


def test_sft_from_a_folder_with_chat_template_jinja_keeps_the_template(cli, chat_ws, tmp_path):
    ws, files = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    assert (hf / "chat_template.jinja").is_file()
    r = cli("-w", ws, "align", "--method", "sft", "--policy", hf, "--data", files["chats"], "--max-steps", "1",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    out = ws / "models/sft"
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok = Tokenizer(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.has_chat_template
    # ... so the next stage takes it as a chat policy
    r = cli("-w", ws, "align", "--method", "dpo", "--data", files["pairs"], "--max-steps", "1", "--val-fraction", "0",
            *FAST, "--json")
    assert r.code == 0, r.stderr

"""`prefcli import`: an HF folder or a GGUF file (written here with the gguf package's writer) into the workspace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prefcli.model import load_model
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import sha256_file

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for RoPE (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model_folder, path) -> None:
    """A llama GGUF of a prefcli model folder, float32 tensors, with its BPE tokenizer and chat template."""
    model = load_model(model_folder)
    c = model.config
    tj = json.loads((model_folder / "tokenizer.json").read_text())
    tok_cfg = json.loads((model_folder / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|bos|>"])
    w.add_eos_token_id(vocab["<|eos|>"])
    w.add_pad_token_id(vocab["<|pad|>"])
    w.add_chat_template(tok_cfg["chat_template"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"),
                             ("post_attention_layernorm", "ffn_norm")):
            names[f"model.layers.{i}.{ours}.weight"] = f"blk.{i}.{theirs}.weight"
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: GGUF without output.weight
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _permute(a, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _permute(a, c.num_key_value_heads)
        w.add_tensor(names[name], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_import_gguf_gives_the_same_model_with_lineage(cli, chat_ws, tmp_path):
    ws, _ = chat_ws
    path = tmp_path / "Tiny-Model.F32.gguf"
    write_gguf(ws / "models/base", path)
    r = cli("-w", ws, "import", path, "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["model"] == "tiny-model.f32" and out["format"] == "gguf" and out["chat"] is True
    folder = ws / "models/tiny-model.f32"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["stage"] == "import" and meta["parents"][0]["sha256"] == sha256_file(path)
    assert meta["files"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    ids = torch.tensor([[1, 40, 41, 300, 7, 99]])
    want = load_model(ws / "models/base")(ids)
    torch.testing.assert_close(load_model(folder)(ids), want, atol=1e-5, rtol=1e-4)
    # The tokenizer rebuilt from GGUF metadata encodes and renders chats as the original does.
    ours, theirs = Tokenizer(ws / "models/base"), Tokenizer(folder)
    chat = [{"role": "user", "content": "What is two plus three?"}]
    assert theirs.chat_ids(chat, add_generation_prompt=True) == ours.chat_ids(chat, add_generation_prompt=True)
    assert theirs.encode("the cat sat on a mat") == ours.encode("the cat sat on a mat")


def test_import_hf_folder_and_bad_sources(cli, chat_ws, tmp_path):
    from conftest import tree_snapshot

    ws, _ = chat_ws
    r = cli("-w", ws, "import", ws / "models/base", "--name", "copy", "--json")
    assert r.code == 0, r.stderr
    assert (ws / "models/copy/model.safetensors").read_bytes() == (ws / "models/base/model.safetensors").read_bytes()
    r = cli("-w", ws, "import", ws / "models/base", "--name", "copy")
    assert r.code == 2 and "already exists" in r.stderr
    assert cli("-w", ws, "import", ws / "models/base", "--name", "copy", "--overwrite").code == 0
    # transformers 5 keeps the template in chat_template.jinja: the import moves it into
    # tokenizer_config.json, which every stage copies into the models it writes.
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(ws / "models/base", hf)
    (hf / "meta.json").unlink()
    config = json.loads((hf / "tokenizer_config.json").read_text())
    (hf / "chat_template.jinja").write_text(config.pop("chat_template"))
    (hf / "tokenizer_config.json").write_text(json.dumps(config))
    assert cli("-w", ws, "import", hf, "--name", "from-hf").code == 0
    assert json.loads((ws / "models/from-hf/tokenizer_config.json").read_text())["chat_template"]
    assert Tokenizer(ws / "models/from-hf").has_chat_template
    before = tree_snapshot(ws)
    for bad, says in ((tmp_path / "nope.gguf", "does not exist"), (tmp_path, "neither a .gguf file nor a model folder")):
        r = cli("-w", ws, "import", bad, "--name", "x")
        assert r.code == 2 and says in r.stderr, r.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    r = cli("-w", ws, "import", junk, "--name", "x")
    assert r.code == 2 and "junk.gguf" in r.stderr and "Traceback" not in r.stderr
    assert tree_snapshot(ws) == before

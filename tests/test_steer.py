"""Steering (align --method steer, chat --prefer, eval compare --prefer): the projection and its files,
the embed_offset hook through the KV cache, the stage from the CLI, and user errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import CHAT_LINES, write_jsonl
from prefcli.errors import PrefcliError
from prefcli.generate import ChatSession, generate
from prefcli.model import Transformer, load_model, make_config
from prefcli.artifacts import save_model_artifact, sync_token_ids
from prefcli.stages.steer import rank_labels
from prefcli.steer import Steering, load_steering, parse_prefer
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace

ATTRS = ["correct", "polite", "concise"]


def _main(*args):
    from prefcli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, args


def random_model(tok: Tokenizer, seed: int) -> Transformer:
    """Random weights with peaked logits; stop tokens never win, so replies run to max_tokens."""
    model = Transformer(make_config("tiny", tok.vocab_size, layers=2, dim=32, heads=4, context=64,
                                    tie_word_embeddings=False)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.3 * torch.randn(p.shape, generator=g))
        model.lm_head.weight[tok.stop_ids()] = 0
    sync_token_ids(model, tok)
    return model


def strong_steering(hidden: int, seed: int = 5) -> Steering:
    """Steering weights large next to the embeddings (std 0.3), so a vector changes greedy replies."""
    s = Steering(ATTRS, hidden, sources={a: "test" for a in ATTRS})
    with torch.no_grad():
        s.proj.weight.copy_(torch.randn(s.proj.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return s


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Token-by-token decoding of tiny models gains nothing from threads and, on two shared
    cores, spinning threads made it many times slower (as in test_chat)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory, one_thread):
    """A tokenizer; 'sft' (tiny random chat model), 'rm' (tiny random reward model), 'steered' (a random
    model with strong random steering over correct/polite/concise); data files with attributes."""
    from prefcli.chat_format import render_chat

    root = tmp_path_factory.mktemp("steer")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                                  for q, a in CHAT_LINES * 30) + "\n")
    ws = root / "ws"
    _main("-w", ws, "tokenize", "-i", corpus, "--vocab-size", "300")
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    w = Workspace(ws)
    torch.manual_seed(0)
    sft = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=32, heads=2, context=64))
    sync_token_ids(sft, tok)
    torch.manual_seed(1)
    rm = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=32, heads=2, context=64), lm_head=False, score_head=True)
    sync_token_ids(rm, tok)
    steered = random_model(tok, 3)
    for name, model, kind, extra in (("sft", sft, "causal_lm", None), ("rm", rm, "reward", None),
                                     ("steered", steered, "causal_lm", strong_steering(32).save)):
        # Recorded as made from the demo data: the demo eval prompts are its default (data.demo.lineage).
        save_model_artifact(w, name, model, tok_path, kind=kind, stage="test", config={},
                            parents=[{"kind": "input", "name": "demo corpus (built-in, seed 0)"}], metrics={},
                            overwrite=False, chat=kind == "causal_lm", extra_files=extra)
    rows = [{"prompt": q, "response": a, "attributes": {"helpful": 1.0, "short": 0.5}} for q, a in CHAT_LINES]
    rows += [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Go away. " + a}],
              "attributes": {"helpful": 0.0, "short": 0.25}} for q, a in CHAT_LINES]
    write_jsonl(root / "attrs.jsonl", rows)
    write_jsonl(root / "plain.jsonl", [{"prompt": q, "completion": a} for q, a in CHAT_LINES])
    return root


@pytest.fixture
def ws(base_ws, tmp_path):
    shutil.copytree(base_ws, tmp_path, dirs_exist_ok=True)
    return tmp_path / "ws"


def one_error_line(r) -> str:
    assert r.code == 2, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- the projection and its files

def test_offset_is_w_times_vector_minus_defaults_and_round_trips(tmp_path):
    s = Steering(["a", "b"], 4, defaults=[1.0, 0.5], sources={"a": "data", "b": "rm"}, label_mean=[0.7, 0.5])
    with torch.no_grad():
        s.proj.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, -1.0], [0.5, 0.0]]))
    assert s.offset() is None and s.offset({"a": 1.0}) is None  # the defaults: the plain model
    # v = (0, 0.5): W (v - d) = W (-1, 0) = -(first column)
    assert s.offset({"a": 0}).tolist() == [-1.0, -3.0, 0.0, -0.5]
    # v = (1, 1.5): W (0, 1) = second column
    assert s.offset({"b": 1.5}).tolist() == [2.0, 4.0, -1.0, 0.0]
    assert s.describe({"a": 0}) == "a=0, b=0.5"

    s.save(tmp_path)
    doc = json.loads((tmp_path / "steer.json").read_text())
    assert doc == {"format": 1, "mode": "add", "attributes": ["a", "b"], "defaults": [1.0, 0.5],
                   "label_mean": [0.7, 0.5], "sources": {"a": "data", "b": "rm"}}
    back = load_steering(tmp_path, hidden_size=4)
    assert back.attributes == ["a", "b"] and back.defaults.tolist() == [1.0, 0.5]
    assert torch.equal(back.proj.weight, s.proj.weight) and back.sources == s.sources
    assert load_steering(tmp_path / "nothing-here") is None
    with pytest.raises(PrefcliError, match=r"proj.weight has shape \(4, 2\), expected \[8, 2\]"):
        load_steering(tmp_path, hidden_size=8)


def test_parse_prefer():
    assert parse_prefer("correct=1, concise=0.5", ATTRS) == {"correct": 1.0, "concise": 0.5}
    for spec, message in (("helpful=1", "unknown attribute 'helpful'"), ("polite=abc", "'abc', is not a number"),
                          ("polite=nan", "is not a number"), ("polite", "'polite' is not NAME=WEIGHT"),
                          ("polite=1,polite=0", "polite is given twice"), ("", "needs NAME=WEIGHT")):
        with pytest.raises(PrefcliError, match=message):
            parse_prefer(spec, ATTRS)


def test_rank_labels_by_hand():
    assert rank_labels([3.0, 1.0, 2.0, 2.0]) == [1.0, 0.0, 0.5, 0.5]
    assert rank_labels([5.0, -1.0]) == [1.0, 0.0]
    assert rank_labels([7.0]) == [1.0]


# ----------------------------------------------------------------------------- the hook

def test_embed_offset_zero_is_the_plain_model_and_broadcasts():
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", 50, layers=2, dim=32, heads=2, context=32, tie_word_embeddings=False)).eval()
    ids = torch.randint(0, 50, (3, 9))
    with torch.no_grad():
        plain = model(ids)
        assert torch.equal(model(ids, embed_offset=torch.zeros(3, 32)), plain)
        off = torch.randn(3, 32)
        per_row = model(ids, embed_offset=off)
        assert torch.equal(model(ids, embed_offset=off[:, None].expand(3, 9, 32)), per_row)
        assert (per_row - plain).abs().max() > 1e-2
        # Same as adding the offset to the embedding matrix rows (by hand).
        emb = model.model.embed_tokens.weight.clone()
        for b in range(3):
            model.model.embed_tokens.weight.copy_(emb + off[b])
            assert torch.allclose(model(ids[b:b + 1])[0], per_row[b], atol=1e-5)
        model.model.embed_tokens.weight.copy_(emb)


def greedy_full_forward(model, prompt: list[int], offset, n: int, stop: set[int]) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step, no cache."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids]), embed_offset=None if offset is None else offset[None])
            t = int(logits[0, -1].argmax())
            out.append(t)
            if t in stop:
                break
            ids.append(t)
    return out


def test_generate_with_offsets_through_the_kv_cache_equals_full_forward(base_ws):
    tok = Tokenizer(base_ws / "ws/tokenizers/default")
    model = random_model(tok, 7)
    prompts = [tok.chat_ids([{"role": "user", "content": q}], add_generation_prompt=True) for q, _ in CHAT_LINES[:3]]
    assert len({len(p) for p in prompts}) > 1  # left padding in play
    offsets = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    free = generate(model, prompts, max_new_tokens=10, temperature=0, embed_offset=offsets)
    # Row 0 stops early (at a token new to it and unseen in the other rows); rows 1 and 2 go on,
    # each with its own offset.
    others = set(free[1].tokens) | set(free[2].tokens)
    k = next(k for k in range(1, 9) if free[0].tokens[k] not in others | set(free[0].tokens[:k]))
    stop = {free[0].tokens[k]}
    got = generate(model, prompts, max_new_tokens=10, temperature=0, embed_offset=offsets, stop_ids=stop)
    assert got[0].finished and len(got[0].tokens) == k + 1 and not got[1].finished
    for p, off, c in zip(prompts, offsets, got):
        assert c.tokens == greedy_full_forward(model, p, off, 10, stop)
    assert got[1].tokens != generate(model, prompts[1:2], max_new_tokens=10, temperature=0, stop_ids=stop)[0].tokens
    # One offset [hidden] for every row.
    same = generate(model, prompts, max_new_tokens=6, temperature=0, embed_offset=offsets[1])
    assert [c.tokens for c in same] == [greedy_full_forward(model, p, offsets[1], 6, set()) for p in prompts]


def test_chat_session_steers_and_a_new_offset_reprefills(base_ws):
    tok = Tokenizer(base_ws / "ws/tokenizers/default")
    model = random_model(tok, 7)
    a, b = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    s = ChatSession(model, embed_offset=a)
    first = tok.chat_ids([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    s.append(first)
    reply = s.sample(8, temperature=0)
    assert reply == greedy_full_forward(model, first, a, 8, set())
    s.set_embed_offset(b)  # the conversation stays; its cache is rebuilt under b
    more = tok.encode(" and then")
    s.append(more)
    again = s.sample(8, temperature=0)
    assert again == greedy_full_forward(model, first + reply + more, b, 8, set())


# ----------------------------------------------------------------------------- the stage

def test_align_steer_trains_from_data_attributes_and_transformers_loads_it(cli, ws, base_ws):
    r = cli("-w", ws, "align", "--method", "steer", "--policy", "sft", "--data", base_ws / "attrs.jsonl",
            "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--val-fraction", "0.25", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["model"] == "steer" and out["method"] == "steer" and out["steps"] == 4
    assert out["attributes"] == "helpful, short" and out["val_loss"] > 0 and out["val_loss_at_defaults"] > 0
    folder = ws / "models/steer"
    doc = json.loads((folder / "steer.json").read_text())
    assert doc["attributes"] == ["helpful", "short"] and doc["defaults"] == [1.0, 1.0]
    assert doc["sources"] == {"helpful": "data", "short": "data"}
    meta = json.loads((folder / "meta.json").read_text())
    assert {"steer.json", "steer.safetensors"} <= set(meta["files"]) and meta["stage"] == "align steer"
    steering = load_steering(folder, 32)
    assert steering.proj.weight.abs().max() > 0  # it learned from zero
    assert steering.offset({"helpful": 0}) is not None

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ours = load_model(folder).eval()
    ids = torch.tensor([Tokenizer(folder).chat_ids([{"role": "user", "content": CHAT_LINES[0][0]}], add_generation_prompt=True)])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)
        # The plain folder is the model at its default preferences (offset zero).
        assert torch.equal(ours(ids, embed_offset=torch.zeros(1, 32)), ours(ids))


def test_demo_labels_are_the_gold_judge_on_chats_and_both_sides_of_each_pair():
    from prefcli.data import demo
    from prefcli.stages.steer import demo_examples

    convos, labels, sources = demo_examples()
    assert len(convos) == 3000 + 2 * 2000 and list(labels) == ATTRS and sources["polite"] == "demo gold judge"
    sft = demo.sft_conversations()[7]["messages"]
    assert convos[7] == sft
    assert {a: labels[a][7] for a in ATTRS} == {a: demo.judge(sft[-2]["content"], sft[-1]["content"])[a] for a in ATTRS}
    vec = lambda i: [labels[a][i] for a in ATTRS]  # noqa: E731
    chosen, rejected = range(3000, 7000, 2), range(3001, 7000, 2)
    assert all(vec(i) == [1.0, 1.0, 1.0] for i in chosen)  # chosen replies are good
    assert all(0 < vec(i).count(0.0) <= 2 for i in rejected)  # one or two flaws each
    assert all(convos[c][:-1] == convos[r][:-1] for c, r in zip(chosen, rejected))  # same prompt


def test_align_steer_on_the_demo(cli, ws):
    r = cli("-w", ws, "align", "--method", "steer", "--policy", "sft", "--max-steps", "1", "--batch-size", "2",
            "--eval-every", "0", "--val-fraction", "0", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads((ws / "models/steer/steer.json").read_text())
    assert doc["attributes"] == ATTRS and doc["sources"]["polite"] == "demo gold judge"
    assert all(0.5 < m < 1 for m in doc["label_mean"])


def test_align_steer_labels_from_a_reward_model(cli, ws, base_ws):
    r = cli("-w", ws, "align", "--method", "steer", "--policy", "sft", "--data", base_ws / "plain.jsonl",
            "--attribute", "helpful=rm", "--max-steps", "1", "--batch-size", "2", "--val-fraction", "0", "--json")
    assert r.code == 0, r.stderr
    doc = json.loads((ws / "models/steer/steer.json").read_text())
    assert doc["attributes"] == ["helpful"] and doc["sources"] == {"helpful": "reward model rm (rank)"}
    assert doc["label_mean"] == [pytest.approx(0.5)]  # ranks of 4 distinct rewards: 0, 1/3, 2/3, 1
    meta = json.loads((ws / "models/steer/meta.json").read_text())
    assert any(p.get("name") == "rm" for p in meta["parents"])


def test_align_steer_user_errors(cli, ws, base_ws, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "response": "hello", "attributes": {"helpful": 3}}])
    assert "attribute helpful is 3, not a number from 0 to 1" in one_error_line(
        cli("-w", ws, "align", "--method", "steer", "--data", bad, "--max-steps", "1"))
    assert "no 'attributes' and no --attribute" in one_error_line(
        cli("-w", ws, "align", "--method", "steer", "--data", base_ws / "plain.jsonl", "--max-steps", "1"))
    assert "--attribute helpful: expected NAME=REWARD_MODEL" in one_error_line(
        cli("-w", ws, "align", "--method", "steer", "--data", base_ws / "plain.jsonl", "--attribute", "helpful"))
    assert "--beta: does not apply to --method steer" in one_error_line(
        cli("-w", ws, "align", "--method", "steer", "--beta", "0.1"))
    assert not (ws / "models/steer").exists()


# ----------------------------------------------------------------------------- chat and eval

def steered_reply(ws, prompt: str, prefs: dict | None, n: int) -> str:
    folder = ws / "models/steered"
    tok, model = Tokenizer(folder), load_model(folder).eval()
    offset = load_steering(folder, 32).offset(prefs)
    ids = tok.chat_ids([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tok.decode(generate(model, [ids], max_new_tokens=n, temperature=0, embed_offset=offset,
                               stop_ids=tok.stop_ids(chat=True))[0].tokens)


def test_chat_prefer_steers_the_reply(cli, ws):
    args = ("-w", ws, "chat", "--model", "steered", "--prompt", "the cat sat", "--temperature", "0", "--max-tokens", "10")
    plain, rude, also_plain = cli(*args), cli(*args, "--prefer", "polite=0"), cli(*args, "--prefer", "polite=1")
    assert plain.code == rude.code == also_plain.code == 0, rude.stderr
    assert plain.stdout == steered_reply(ws, "the cat sat", None, 10) + "\n"
    assert rude.stdout == steered_reply(ws, "the cat sat", {"polite": 0}, 10) + "\n"
    assert rude.stdout != plain.stdout and also_plain.stdout == plain.stdout
    doc = cli(*args, "--prefer", "polite=0,concise=0.5", "--json").json()
    assert doc["prefer"] == {"correct": 1.0, "polite": 0.0, "concise": 0.5}


def test_chat_prefer_command_keeps_the_conversation(ws):
    from prefcli.stages.chat import Conversation, Sampling, _command, load

    loaded, raw, _ = load(Workspace(ws), "steered", torch.device("cpu"), False)
    conv = Conversation(loaded, "steered", raw=raw, sampling=Sampling(temperature=0, max_tokens=6))
    conv.reply("the cat sat")
    _command(conv, "/prefer polite=0", Workspace(ws), "cpu")
    _command(conv, "/prefer concise=0.5", Workspace(ws), "cpu")  # adds to what is set
    assert conv.prefs == {"polite": 0.0, "concise": 0.5}
    second = conv.reply("and the dog")
    # The same as a conversation steered that way from a fresh prefill of the whole history.
    fresh = Conversation(loaded, "steered", raw=raw, sampling=Sampling(temperature=0, max_tokens=6))
    fresh.prefer("polite=0,concise=0.5")
    ids = fresh.prompt_ids(conv.messages[:-1])
    expected = generate(loaded.model, [ids], max_new_tokens=6, temperature=0, stop_ids=fresh.stop_ids,
                        embed_offset=fresh.steering.offset(fresh.prefs))[0].tokens
    assert second.tokens == expected
    _command(conv, "/prefer default", Workspace(ws), "cpu")
    assert conv.prefs == {} and conv.session.embed_offset is None
    with pytest.raises(PrefcliError, match="unknown attribute 'rude'"):
        _command(conv, "/prefer rude=1", Workspace(ws), "cpu")


def test_eval_compare_prefer_columns(cli, ws):
    r = cli("-w", ws, "eval", "compare", "--model", "steered", "--reference", "steered", "--prefer", "polite=0",
            "--prefer", "polite=1", "--limit", "3", "--max-tokens", "6", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert list(doc["models"]) == ["steered (polite=0)", "steered (polite=1)"]
    texts = lambda key: [r["text"] for row in doc["samples"] for r in (row["reference"] if key is None  # noqa: E731
                                                                      else row["replies"][key])]
    # At the defaults the steered model is the plain folder (the reference, same seed): the same replies.
    assert texts("steered (polite=1)") == texts(None)
    assert texts("steered (polite=0)") != texts(None)
    assert doc["models"]["steered (polite=1)"]["vs_reference"]["kl"]["mean"] == pytest.approx(0, abs=1e-4)
    assert doc["models"]["steered (polite=0)"]["gold"]["polite"]["n"] == 3
    from rich.console import Console

    from prefcli.stages.evaluate import compare_table

    console = Console(record=True, width=200)
    console.print(compare_table(doc))
    assert "steered (polite=0)" in console.export_text()  # the column names survive rich's markup


def test_bad_prefer_is_one_line_exit_2(cli, ws):
    chat = ("-w", ws, "chat", "--prompt", "hi", "--max-tokens", "2")
    assert "--prefer helpful=1: unknown attribute 'helpful'" in one_error_line(cli(*chat, "--model", "steered", "--prefer", "helpful=1"))
    assert "is not a number" in one_error_line(cli(*chat, "--model", "steered", "--prefer", "polite=lots"))
    assert "sft has no steering weights" in one_error_line(cli(*chat, "--model", "sft", "--prefer", "polite=1"))
    compare = ("-w", ws, "eval", "compare", "--limit", "2", "--max-tokens", "2")
    assert "unknown attribute 'x'" in one_error_line(cli(*compare, "--model", "steered", "--prefer", "x=1"))
    assert "no --model has steering weights" in one_error_line(cli(*compare, "--model", "sft", "--prefer", "polite=1"))
    assert not (ws / "evals").exists() or not list((ws / "evals").iterdir())

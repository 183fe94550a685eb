"""`prefcli eval`: statistics by hand, perplexity and bits per byte by hand, a reward model whose
rule we set, a model compared with itself, KL against a hand computation, the CLI's documents."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest
import torch

from prefcli.model import Transformer, make_config
from prefcli import inference, measure, metrics
from prefcli.artifacts import Loaded, save_model_artifact
from prefcli.tokenizer import Tokenizer
from prefcli.workspace import Workspace

Z = 1.959963984540054


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_ws(tmp_path_factory):
    """A workspace with tokenizer `default` (vocab 300), dataset `corpus`, and tokenizer `other` (vocab 280)."""
    import random

    from prefcli.cli import main

    root = tmp_path_factory.mktemp("evalws")
    rng = random.Random(0)
    words = "the cat sat on a mat with the dog and a bird in the old town shop near river baker".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(25)) for _ in range(400)) + "\n")
    ws = root / "ws"
    for args in (["tokenize", "-i", corpus, "--vocab-size", "300"],
                 ["tokenize", "-i", corpus, "--vocab-size", "280", "--name", "other", "--dataset", "other"]):
        try:
            main(["-w", str(ws), *map(str, args)])
        except SystemExit as e:
            assert not e.code
    return ws


@pytest.fixture
def ws(base_ws, tmp_path):
    dst = tmp_path / "ws"
    shutil.copytree(base_ws, dst)
    return dst


def tiny(vocab: int, seed: int = 0, context: int = 64, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(make_config("tiny", vocab, layers=1, dim=32, heads=2, context=context), **kw)


DEMO_INPUT = {"kind": "input", "name": "demo corpus (built-in, seed 0)"}


def save(ws, name: str, model: Transformer, tokenizer: str = "default", kind: str = "causal_lm"):
    # Recorded as made from the demo data, so the demo eval prompts are its default (data.demo.lineage).
    save_model_artifact(Workspace(ws), name, model, ws / "tokenizers" / tokenizer, kind=kind, stage="test",
                        config={}, parents=[DEMO_INPUT], metrics={}, overwrite=True, chat=True)
    return ws / "models" / name


def uniform(vocab: int, context: int = 64) -> Transformer:
    """Every weight zero: the logits are all 0, so p(token) = 1 / vocab everywhere."""
    m = tiny(vocab, context=context)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    return m


def marked_ids(tok: Tokenizer) -> set[int]:
    return {i for i in range(tok.vocab_size) if "!" in tok.decode([i], skip_special_tokens=False)}


def rule_reward_model(tok: Tokenizer) -> Transformer:
    """A reward model whose score is a known increasing function of M, the share of tokens
    containing '!' in the whole sequence.

    Embeddings: e_t = [1, 0, ...] for marked tokens, [0, 1, 0, ...] otherwise (one norm, so the
    first RMSNorm only scales them). Attention with q = k = 0 averages over all tokens; v and o
    copy dimension 0, so the last position holds [c M, 1, 0, ...] (the last token, <|end|>, is
    unmarked). MLP is zero. The score reads dimension 0 after the final RMSNorm:
    c M / sqrt(((c M)^2 + 1) / d), strictly increasing in M.
    """
    m = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=16, heads=1, context=128),
                    lm_head=False, score_head=True)
    marked = marked_ids(tok)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        emb = m.model.embed_tokens.weight
        for i in range(tok.vocab_size):
            emb[i, 0 if i in marked else 1] = 1.0
        layer = m.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
        layer.self_attn.v_proj.weight[0, 0] = 1.0
        layer.self_attn.o_proj.weight[0, 0] = 1.0
        m.score_head.weight[0, 0] = 1.0
    return m


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def loaded(path) -> Loaded:
    from prefcli.model import load_model
    from prefcli.workspace import read_meta

    return Loaded(load_model(path).eval(), Tokenizer(path), path, read_meta(path))


# ---------------------------------------------------------------- statistics by hand
def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, denominator 1 + z^2/10, centre (0.8 + z^2/20) / denom,
    # half-width z sqrt(0.016 + z^2/400) / denom.
    lo, hi = metrics.wilson_interval(8, 10)
    assert lo == pytest.approx(0.490162, abs=1e-5) and hi == pytest.approx(0.943318, abs=1e-5)
    # 0 of 10: [0, (z^2/10) / (1 + z^2/10)].
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx((Z * Z / 10) / (1 + Z * Z / 10), abs=1e-12)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    r = metrics.rate_summary([1.0, 0.0, 1.0, 1.0])
    assert r["rate"] == 0.75 and r["n"] == 4 and r["ci_method"] == "wilson"
    assert r["ci"] == pytest.approx(list(metrics.wilson_interval(3, 4)))


def test_win_rate_interval_with_ties_by_hand():
    # Per-prompt scores 1, 1, 0.5, 0: mean 0.625, sample std sqrt(0.6875 / 3), n = 4.
    wins = metrics.win_scores([3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 2.0])
    assert wins == [1.0, 1.0, 0.5, 0.0]
    r = metrics.rate_summary(wins)
    half = Z * math.sqrt(0.6875 / 3) / 2
    assert r["rate"] == 0.625 and r["ci_method"] == "normal"
    assert r["ci"] == pytest.approx([0.625 - half, 1.0])  # the upper end is clipped at 1
    assert metrics.rate_summary([0.5, 0.5, 0.5])["ci"] == [0.5, 0.5]
    assert metrics.per_prompt([1, 0, 0.5, 0.5, 1, 1], 2) == [0.5, 0.5, 1.0]
    m = metrics.mean_summary([1.0, 2.0, 3.0])
    assert m["mean"] == 2.0 and m["std"] == 1.0 and m["ci"] == pytest.approx([2 - Z / math.sqrt(3), 2 + Z / math.sqrt(3)])


def test_distinct_n_and_distribution_by_hand():
    texts = ["a b a", "a b c"]
    # unigrams a b a a b c: 3 unique of 6; bigrams (a b) (b a) (a b) (b c): 3 unique of 4.
    assert metrics.distinct_n(texts, 1) == 0.5
    assert metrics.distinct_n(texts, 2) == 0.75
    assert metrics.distinct_n(["x", ""], 2) == 0.0  # no bigram at all; none spans two texts
    d = metrics.distribution([1.0, 2.0, 3.0, 4.0, 5.0])
    assert d["mean"] == 3.0 and d["std"] == pytest.approx(math.sqrt(2)) and d["median"] == 3.0
    assert d["q25"] == 2.0 and d["q05"] == pytest.approx(1.2) and d["min"] == 1.0 and d["max"] == 5.0


# ---------------------------------------------------------------- perplexity
def test_perplexity_of_a_uniform_model_by_hand(base_ws):
    tok = Tokenizer(base_ws / "tokenizers/default")
    V = tok.vocab_size
    text = "the cat sat on the mat near the old river shop"
    ids = torch.tensor(tok.encode(text) + [tok.eos_id])
    res = measure.perplexity(uniform(V, context=4), tok, ids, batch_size=2)
    n = len(ids) - 1
    assert res["tokens"] == n and res["windows"] == math.ceil(n / 4)
    assert res["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert res["perplexity"] == pytest.approx(V, rel=1e-5)
    # Predicted text: every token but the first ("the"); <|eos|> decodes to no bytes.
    predicted = tok.decode(ids[1:].tolist())
    assert predicted == text[len(tok.decode(ids[:1].tolist())):]
    assert res["bytes"] == len(predicted.encode("utf-8"))
    assert res["bits_per_byte"] == pytest.approx(n * math.log(V) / math.log(2) / res["bytes"], rel=1e-6)


def test_perplexity_windows_equal_a_plain_loop(base_ws):
    tok = Tokenizer(base_ws / "tokenizers/default")
    model = tiny(tok.vocab_size, seed=3, context=16).eval()
    ids = torch.randint(0, tok.vocab_size, (103,))
    res = measure.perplexity(model, tok, ids, batch_size=3)  # 7 windows: 6 full, the last 6 tokens; batches 3 + 3 + 1
    nats = 0.0
    with torch.no_grad():
        for s in range(0, 102, 16):
            w = ids[s:s + 17]
            nats += torch.nn.functional.cross_entropy(model(w[None, :-1])[0], w[1:], reduction="sum").item()
    assert res["windows"] == 7 and res["tokens"] == 102
    assert res["loss"] == pytest.approx(nats / 102, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]), rel=1e-12)
    limited = measure.perplexity(model, tok, ids, batch_size=3, max_windows=2)
    assert limited["tokens"] == 32 and limited["windows"] == 2


def test_eval_perplexity_cli(cli, ws, tmp_path):
    from prefcli.data.tokens import read_all

    tok = Tokenizer(ws / "tokenizers/default")
    V = tok.vocab_size
    save(ws, "base", uniform(V, context=32))
    r = cli("-w", ws, "eval", "perplexity", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    val = read_all(ws / "datasets/corpus/val.safetensors")
    assert doc["tokens"] == len(val) - 1
    assert doc["loss"] == pytest.approx(math.log(V), rel=1e-6)
    meta = doc["meta"]
    assert meta["kind"] == "eval" and meta["name"] == "perplexity-base" and meta["stage"] == "eval perplexity"
    assert {(p["kind"], p["name"]) for p in meta["parents"]} == {("models", "base"), ("datasets", "corpus")}
    assert meta["config"]["model"] == "base" and meta["created"]
    assert json.loads((ws / "evals/perplexity-base.json").read_text()) == doc
    r = cli("-w", ws, "eval", "perplexity")
    assert r.code == 2 and "already exists" in r.stderr
    assert cli("-w", ws, "eval", "perplexity", "--overwrite").code == 0

    # Text files are encoded with the model's tokenizer, each document followed by <|eos|>.
    f = tmp_path / "held.txt"
    f.write_text("the dog sat\n\nnear the river ünd\n")
    r = cli("-w", ws, "eval", "perplexity", "--model", "base", "--data", f, "--out", "held", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    ids = tok.encode("the dog sat") + [tok.eos_id] + tok.encode("near the river ünd") + [tok.eos_id]
    assert doc["tokens"] == len(ids) - 1
    assert doc["bytes"] == len(tok.decode(ids[1:]).encode("utf-8"))
    assert doc["bits_per_byte"] == pytest.approx((len(ids) - 1) * math.log(V) / math.log(2) / doc["bytes"], rel=1e-6)

    # A dataset encoded with another tokenizer is refused, naming the option.
    r = cli("-w", ws, "eval", "perplexity", "--data", "other", "--out", "x")
    assert r.code == 2 and "--data" in r.stderr and "tokenizer" in r.stderr
    assert not (ws / "evals/x.json").exists()


# ---------------------------------------------------------------- reward models
def test_reward_accuracy_follows_a_known_rule(cli, ws, tmp_path):
    tok = Tokenizer(ws / "tokenizers/default")
    assert marked_ids(tok)
    save(ws, "rule", rule_reward_model(tok), kind="reward")
    # The rule: more '!' per token wins. Chosen has the '!' in 3 pairs, rejected in 2; one pair ties.
    rows = [
        {"prompt": "say hi", "chosen": "hi there!", "rejected": "hi there"},
        {"prompt": "the cat", "chosen": "the cat sat!", "rejected": "the cat sat on a mat"},
        {"prompt": "the dog", "chosen": "a dog! a dog!", "rejected": "a dog"},
        {"prompt": "a bird", "chosen": "a bird in town", "rejected": "a bird in town!"},
        {"prompt": "a shop", "chosen": "the shop", "rejected": "!!"},
        {"prompt": "a mat", "chosen": "the mat", "rejected": "the mat"},
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    r = cli("-w", ws, "eval", "reward", "--model", "rule", "--pairs", pairs, "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["pairs"] == 6 and doc["ties"] == 1
    assert doc["accuracy"]["rate"] == pytest.approx(3.5 / 6)
    chosen, rejected = doc["rewards"]["chosen"], doc["rewards"]["rejected"]
    assert [c > r for c, r in zip(chosen, rejected)] == [True, True, True, False, False, False]
    assert doc["margin"]["mean"] == pytest.approx(sum(chosen) / 6 - sum(rejected) / 6)
    assert doc["meta"]["name"] == "reward-rule" and "by_category" not in doc

    # The rule really is "share of marked tokens" (hand check on one pair's token ids).
    from prefcli.data.examples import encode_completion

    def share(prompt, reply):
        ids = encode_completion(tok, [{"role": "user", "content": prompt}], [{"role": "assistant", "content": reply}], 128).ids
        return sum(i in marked_ids(tok) for i in ids) / len(ids)

    assert share("the dog", "a dog! a dog!") > share("the cat", "the cat sat!") > 0
    assert chosen[2] > chosen[1]  # so the rewards are ordered the same way


def test_eval_reward_on_demo_pairs(cli, ws):
    tok = Tokenizer(ws / "tokenizers/default")
    save(ws, "rm", rule_reward_model(tok), kind="reward")
    r = cli("-w", ws, "eval", "reward", "--limit", "60", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["pairs"] == 60 and set(doc["by_category"]) == {"sum", "fact", "kind"}
    assert sum(c["n"] for c in doc["by_category"].values()) == 60
    assert set(doc["by_rejected_flaw"]) <= {"correct", "polite", "concise"} and doc["by_rejected_flaw"]
    assert doc["chosen"]["n"] == 60 and len(doc["rewards"]["rejected"]) == 60
    assert {p["kind"] for p in doc["meta"]["parents"]} == {"models", "demo"}
    r = cli("-w", ws, "eval", "reward", "--model", "nope")
    assert r.code == 2 and "--model" in r.stderr


# ---------------------------------------------------------------- compare
def test_a_model_compared_with_itself(cli, ws):
    tok = Tokenizer(ws / "tokenizers/default")
    model = tiny(tok.vocab_size, seed=1)
    save(ws, "p", model)
    save(ws, "r", model)  # the same weights under another name
    save(ws, "judge", rule_reward_model(tok), kind="reward")
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--reference", "r", "--judge-model", "judge",
            "--limit", "30", "--max-tokens", "12", "--batch-size", "16", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["prompts"] == 30 and doc["reference"] == "r" and doc["gold_judge"] and doc["judge_model"]
    vs = doc["models"]["p"]["vs_reference"]
    # One seed per model: both draw the very same replies, so every prompt is a tie.
    assert vs["win_rate_gold"]["rate"] == 0.5 and vs["win_rate_reward"]["rate"] == 0.5
    assert all(v["rate"] == 0.5 for v in vs["win_rate_gold_by_attribute"].values())
    assert abs(vs["kl"]["mean"]) < 1e-4
    for row in doc["samples"]:
        assert [s["text"] for s in row["replies"]["p"]] == [s["text"] for s in row["reference"]]
        assert abs(row["replies"]["p"][0]["kl"]) < 1e-4
    st = doc["models"]["p"]
    assert st["gold"]["good"]["n"] == 30 and st["replies"] == 30
    assert st["reward"]["mean"] == pytest.approx(doc["reference_stats"]["reward"]["mean"])
    assert doc["meta"]["name"] == "compare-p"
    assert {p["name"] for p in doc["meta"]["parents"] if p["kind"] == "models"} == {"p", "r", "judge"}

    # Greedy decoding ties too; the table shows both columns.
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--reference", "r", "--limit", "9", "--max-tokens", "6",
            "--temperature", "0", "--out", "greedy")
    assert r.code == 0, r.stderr
    assert "r (reference)" in r.stderr and "0.500" in r.stderr
    doc = json.loads((ws / "evals/greedy.json").read_text())
    assert doc["models"]["p"]["vs_reference"]["win_rate_gold"]["rate"] == 0.5


def test_judge_models_are_summed_with_weights(cli, ws, tmp_path):
    tok = Tokenizer(ws / "tokenizers/default")
    save(ws, "p", tiny(tok.vocab_size, seed=1))
    save(ws, "r", tiny(tok.vocab_size, seed=2))
    save(ws, "rule", rule_reward_model(tok), kind="reward")
    save(ws, "noise", tiny(tok.vocab_size, seed=3, lm_head=False, score_head=True), kind="reward")
    base = ("-w", ws, "eval", "compare", "--model", "p", "--reference", "r", "--limit", "8", "--max-tokens", "8",
            "--no-kl", "--json", "--overwrite")

    def rewards(*args):
        r = cli(*base, *args)
        assert r.code == 0, r.stderr
        doc = r.json()
        return doc, [s["reward"] for row in doc["samples"] for s in row["replies"]["p"] + row["reference"]]

    _, rule = rewards("--judge-model", "rule", "--out", "a")
    _, noise = rewards("--judge-model", "noise", "--out", "b")
    assert len(set(noise)) > 1
    # --judge-model is repeatable with NAME=WEIGHT, as in align (here through a config file).
    config = tmp_path / "judges.toml"
    config.write_text('judge_model = ["rule=2", "noise=-0.5"]\n')
    doc, summed = rewards("--config", config, "--out", "c")
    assert summed == pytest.approx([2 * a - 0.5 * b for a, b in zip(rule, noise)], abs=1e-5)
    assert doc["judge_model"] and doc["meta"]["config"]["judge_model"] == ["rule=2", "noise=-0.5"]
    assert {"rule", "noise"} <= {p["name"] for p in doc["meta"]["parents"] if p["kind"] == "models"}
    _, weighted = rewards("--judge-model", "rule=3", "--out", "d")  # one weighted judge on the command line
    assert weighted == pytest.approx([3 * a for a in rule], abs=1e-5)

    r = cli(*base, "--judge-model", "rule=much", "--out", "e")
    assert r.code == 2 and "--judge-model rule=much: weight 'much' is not a number" in r.stderr
    assert not (ws / "evals/e.json").exists()


def test_kl_against_a_hand_computation(base_ws):
    tok_path = base_ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    V = tok.vocab_size
    # P uniform: log p(y_t) = -ln V for every sampled token. R a random model.
    P = Loaded(uniform(V).eval(), tok, tok_path, {})
    R = Loaded(tiny(V, seed=5).eval(), tok, tok_path, {})
    prompts = [[{"role": "user", "content": c}] for c in ("hello", "the cat sat on the mat", "a")]
    args = dict(samples=2, max_tokens=7, seed=11, batch_size=4)
    res = measure.compare({"u": P}, R, prompts, reference_name="r", **args)
    samples = inference.sample_replies(P, prompts, **args)  # the same draws again
    kls = [s["kl"] for row in res["samples"] for s in row["replies"]["u"]]
    assert len(kls) == 6 and len({len(s["prompt_ids"]) + len(s["tokens"]) for s in samples}) > 1  # padding
    with torch.no_grad():
        for s, kl in zip(samples, kls):
            ids = torch.tensor(s["prompt_ids"] + s["tokens"])
            logp = torch.log_softmax(R.model(ids[None])[0].float(), -1)
            start = len(s["prompt_ids"])
            ref = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert kl == pytest.approx(-len(s["tokens"]) * math.log(V) - ref, abs=1e-3)
    assert res["models"]["u"]["vs_reference"]["kl"]["mean"] == pytest.approx(
        sum(metrics.per_prompt(kls, 2)) / 3, rel=1e-9)
    assert "gold" not in res["models"]["u"] and res["gold_judge"] is False
    alone = measure.compare({"u": P}, None, prompts, max_tokens=2)
    assert alone["reference"] is None and "vs_reference" not in alone["models"]["u"]
    assert alone["samples"][0]["replies"]["u"][0]["tokens"] <= 2


def test_compare_options_and_errors(cli, ws, tmp_path):
    tok = Tokenizer(ws / "tokenizers/default")
    save(ws, "sft", tiny(tok.vocab_size, seed=1))
    save(ws, "p", tiny(tok.vocab_size, seed=2))
    save(ws, "q", tiny(280, seed=3), tokenizer="other")
    # Reference defaults to sft; two models side by side; several samples per prompt.
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--model", "sft", "--limit", "6", "--samples", "2",
            "--max-tokens", "4", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["reference"] == "sft" and list(doc["models"]) == ["p", "sft"] and doc["meta"]["name"] == "compare-p-sft"
    assert all(len(row["replies"]["p"]) == 2 for row in doc["samples"])
    assert doc["models"]["p"]["gold"]["good"]["n"] == 6  # prompts are the unit
    good = [float(s["gold"]["good"]) for row in doc["samples"] for s in row["reference"]]
    assert doc["win_rate_gold_ceiling"] == pytest.approx(1 - sum(good) / len(good) / 2)
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--limit", "0", "--out", "z")
    assert r.code == 2 and "--limit 0" in r.stderr
    # Another tokenizer: KL is refused with a clear error, unless --no-kl.
    r = cli("-w", ws, "eval", "compare", "--model", "q", "--limit", "3", "--max-tokens", "3")
    assert r.code == 2 and "--reference" in r.stderr and "tokenizer" in r.stderr and "--no-kl" in r.stderr
    r = cli("-w", ws, "eval", "compare", "--model", "q", "--limit", "3", "--max-tokens", "3", "--no-kl", "--json")
    assert r.code == 0, r.stderr
    assert "kl" not in r.json()["models"]["q"]["vs_reference"]
    # Prompt files: rows of prompt or messages; --gold refuses prompts the judge does not know.
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "What is 2 plus 3?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is Biscuit?"}]},
    ])
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--prompts", prompts, "--gold", "--max-tokens", "3", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["gold_judge"] and doc["samples"][1]["messages"][0]["role"] == "system"
    assert [row["category"] for row in doc["samples"]] == ["sum", "fact"]
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "Write a poem."}])
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--prompts", other, "--gold", "--out", "o2")
    assert r.code == 2 and "--gold" in r.stderr and "Write a poem." in r.stderr
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--prompts", other, "--out", "o2", "--max-tokens", "3", "--json")
    assert r.code == 0 and not r.json()["gold_judge"]
    r = cli("-w", ws, "eval", "compare")
    assert r.code == 2 and "--model" in r.stderr
    ls = cli("-w", ws, "ls", "--json").json()["artifacts"]
    assert {a["name"] for a in ls if a["kind"] == "evals"} == {"compare-p-sft", "compare-q", "compare-p", "o2"}


# ---------------------------------------------------------------- plots
def test_plot_without_matplotlib_is_one_clear_line(cli, ws, monkeypatch):
    tok = Tokenizer(ws / "tokenizers/default")
    save(ws, "rm", rule_reward_model(tok), kind="reward")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    r = cli("-w", ws, "eval", "reward", "--limit", "4", "--plot")
    assert r.code == 2 and "pip install 'prefcli[plot]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (ws / "evals").exists()
    r = cli("-w", ws, "eval", "plot")
    assert r.code == 2 and "prefcli[plot]" in r.stderr


def test_plots_are_written(cli, ws):
    pytest.importorskip("matplotlib")
    tok = Tokenizer(ws / "tokenizers/default")
    save(ws, "rm", rule_reward_model(tok), kind="reward")
    save(ws, "p", tiny(tok.vocab_size, seed=2))
    (ws / "runs/p").mkdir(parents=True)
    (ws / "runs/p/metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 5 - s / 10, **({"val_loss": 5 - s / 12} if s % 5 == 0 else {})}) + "\n"
        for s in range(1, 21)))
    r = cli("-w", ws, "eval", "reward", "--limit", "20", "--plot", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["plots"] == [str(ws / "evals/reward-rm-rewards.png")]
    r = cli("-w", ws, "eval", "compare", "--model", "p", "--reference", "p", "--judge-model", "rm", "--limit", "6",
            "--max-tokens", "4", "--plot", "--json")
    assert r.code == 0, r.stderr
    assert sorted(r.json()["plots"]) == [str(ws / "evals/compare-p-rates.png"), str(ws / "evals/compare-p-training.png")]
    r = cli("-w", ws, "eval", "plot", "--json")
    assert r.code == 0, r.stderr
    assert str(ws / "evals/runs-training.png") in r.json()["plots"]
    for png in (ws / "evals").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {a["name"] for a in cli("-w", ws, "ls", "--json").json()["artifacts"] if a["kind"] == "evals"} == {
        "reward-rm", "compare-p"}

"""`prefcli align --method ppo|grpo|rloo`: the online-RL stage glue on tiny random models.

The RL math itself is tested by hand in test_objectives_rl.py; here: rollout layout,
rewards from every kind of source, what gets logged and saved, no reference at KL 0,
exact resume, and the user errors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prefcli.generate import Completion
from prefcli.objectives import rl
from prefcli.rollouts import RLModel, Rollouts, assemble
from prefcli.stages.rl import METHOD_DEFAULTS

PROMPTS = [
    "What is 2 plus 3?",
    "What color is Biscuit?",
    "Say something kind to Anna.",
    "When does the bakery open?",
    "What is 4 plus 4?",
    "Where does Ben live?",
]
# Tiny, fast runs: 2 prompts x 4 samples per micro-batch, replies of at most 6 tokens.
FAST = ["--max-tokens", "6", "--batch-size", "8", "--num-generations", "4", "--max-steps", "2", "--device", "cpu",
        "--lr", "1e-3"]


def _main(*args):
    from prefcli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, args


@pytest.fixture(scope="module")
def base_ws(tmp_path_factory):
    """A workspace with a tokenizer, a tiny random chat policy 'sft' and a tiny random reward model 'rm'."""
    from prefcli.chat_format import render_chat
    from prefcli.model import Transformer, make_config
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    root = tmp_path_factory.mktemp("rl")
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(render_chat([{"role": "user", "content": p}, {"role": "assistant", "content": "Sure, " + p.lower()}])
                                  for p in PROMPTS * 30) + "\n")
    ws = root / "ws"
    _main("-w", ws, "tokenize", "-i", corpus, "--vocab-size", "300")
    tok_path = ws / "tokenizers/default"
    tok = Tokenizer(tok_path)
    for name, kind, seed in (("sft", "causal_lm", 0), ("rm", "reward", 1)):
        torch.manual_seed(seed)
        model = Transformer(make_config("tiny", tok.vocab_size, layers=1, dim=32, heads=2, context=64),
                            lm_head=kind == "causal_lm", score_head=kind == "reward")
        sync_token_ids(model, tok)
        # Recorded as made from the demo data: the demo RL prompts are its default (data.demo.lineage).
        save_model_artifact(Workspace(ws), name, model, tok_path, kind=kind, stage="test", config={},
                            parents=[{"kind": "input", "name": "demo corpus (built-in, seed 0)"}],
                            metrics={}, overwrite=False, chat=kind == "causal_lm")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4])
                                        + json.dumps({"messages": [{"role": "user", "content": PROMPTS[4]}]}) + "\n")
    return root


@pytest.fixture
def ws(base_ws, tmp_path):
    shutil.copytree(base_ws, tmp_path, dirs_exist_ok=True)
    return tmp_path / "ws"


def metric_lines(ws, name):
    return [json.loads(line) for line in (ws / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def weights(ws, name):
    return load_file(ws / "models" / name / "model.safetensors")


def reward_module(tmp_path, monkeypatch, body: str) -> str:
    """A Python module with a reward function `score`, importable by name; returns the name."""
    name = f"rl_rewards_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


# ---------------------------------------------------------------- rollouts


def test_rollout_layout_masks_exclude_prompt_and_padding():
    prompts = [[5, 6, 7], [8]]
    done = Completion(tokens=[11, 12, 2], logprobs=[-0.5, -1.0, -1.5], finished=True)
    cut = Completion(tokens=[13], logprobs=[-2.0], finished=False)
    r = assemble(prompts, [done, cut], pad_id=0)
    # Prompts left-padded to 3 columns, replies from column 3, right-padded to 3.
    assert r.start == 3
    assert r.input_ids.tolist() == [[5, 6, 7, 11, 12, 2], [0, 0, 8, 13, 0, 0]]
    assert r.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]]
    assert r.mask.tolist() == [[1, 1, 1], [1, 0, 0]]  # reply tokens only, end token included
    assert r.logprobs.tolist() == [[-0.5, -1.0, -1.5], [-2.0, 0.0, 0.0]]
    assert r.finished.tolist() == [True, False]
    # The score lands on each reply's last real token (the end token; the one cut token).
    placed = rl.place_rewards(torch.tensor([1.0, 2.0]), r.mask)
    assert placed.tolist() == [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]


def test_training_forward_gives_the_sampling_logprobs():
    """The layout the loss sees reproduces what the KV-cache engine sampled, padding and all."""
    from prefcli.generate import generate
    from prefcli.model import Transformer, make_config
    from prefcli.objectives.lm import token_logprobs

    torch.manual_seed(0)
    policy = Transformer(make_config("tiny", 50, layers=2, dim=32, heads=2, context=64))
    prompts = [[1, 5, 9, 4, 3], [1, 7], [1, 8, 8]]
    outs = generate(policy, prompts, max_new_tokens=7, stop_ids=[2, 3, 4], pad_id=0, seed=6)
    assert len({len(o.tokens) for o in outs}) > 1  # ragged replies, so padding is exercised
    r = assemble(prompts, outs, pad_id=0)
    logits, values = RLModel(policy)(r.input_ids, r.attention_mask, r.start)
    assert values is None and logits.shape[:2] == r.mask.shape
    logp = token_logprobs(logits, r.input_ids[:, r.start:]) * r.mask
    torch.testing.assert_close(logp, r.logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- the command line


def test_grpo_with_the_demo_judge_logs_and_saves(cli, ws):
    prompts = ws.parent / "prompts.jsonl"
    r = cli("-w", ws, "align", "--method", "grpo", "--reward-fn", "demo", "--prompts", prompts, *FAST, "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["model"] == "grpo" and out["steps"] == 2 and out["reference"] == "sft"
    line = metric_lines(ws, "grpo")[-1]
    for key in ("reward", "reward_std", "reward/demo", "kl", "kl_k3", "entropy", "clipfrac", "reply_len", "truncated",
                "time/generate_s", "time/rollout_s", "time/train_s"):
        assert key in line, key
    assert 0 <= line["reward"] <= 1 and line["reward"] == pytest.approx(line["reward/demo"])
    assert 1 <= line["reply_len"] <= 6 and line["time/generate_s"] > 0
    assert line["tokens"] > 0 and out["seconds_generate"] <= out["seconds_rollout"]
    meta = json.loads((ws / "models/grpo/meta.json").read_text())
    assert meta["chat"] is True and meta["stage"] == "align grpo"
    assert meta["config"]["num_generations"] == 4 and meta["config"]["kl_coef"] == METHOD_DEFAULTS["grpo"]["kl_coef"]
    assert {p.get("name") for p in meta["parents"]} >= {"sft", "demo"}
    assert weights(ws, "grpo").keys() == weights(ws, "sft").keys()  # an HF causal-LM folder, as sft's


def test_ppo_with_a_reward_model_trains_a_value_model_from_it(cli, ws):
    r = cli("-w", ws, "align", "--method", "ppo", "--reward-model", "rm", "--prompts", ws.parent / "prompts.jsonl",
            *FAST[:2], "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["parameters"]["value"] > 0 and out["parameters"]["reference"] == out["parameters"]["policy"]
    line = metric_lines(ws, "ppo")[-1]
    for key in ("reward", "reward/rm:rm", "kl", "value_loss", "vf_clipfrac", "policy_loss", "clipfrac", "approx_kl",
                "entropy", "kl_coef"):
        assert key in line, key
    value_meta = json.loads((ws / "models/ppo-value/meta.json").read_text())
    assert value_meta["kind"] == "reward_model" and value_meta["initialised_from"] == "reward model rm"
    rm, value = weights(ws, "rm"), weights(ws, "ppo-value")
    assert rm.keys() == value.keys()  # the same layout: a backbone and a score head, no lm_head
    assert any(not torch.equal(rm[k], value[k]) for k in rm)  # and it was trained
    # Without a reward model to start from, the value model is the policy with a fresh head
    # (here also without a reference, and with whitened rewards).
    r = cli("-w", ws, "align", "--method", "ppo", "--reward-fn", "demo", "--prompts", ws.parent / "prompts.jsonl",
            *FAST[:2], "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--out", "ppo2", "--kl-coef", "0",
            "--whiten-rewards", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["reference"] is None and "value_loss" in metric_lines(ws, "ppo2")[-1]
    meta = json.loads((ws / "models/ppo2-value/meta.json").read_text())
    assert meta["initialised_from"] == "policy sft with a fresh score head"


def test_rloo_with_a_python_reward_function_sees_every_sample(cli, ws, tmp_path, monkeypatch):
    seen = tmp_path / "seen.jsonl"
    name = reward_module(tmp_path, monkeypatch, f"""
        import json

        def score(prompts, replies):
            out = [float(len(r)) for r in replies]
            with open({str(seen)!r}, "a") as f:
                f.write(json.dumps({{"prompts": prompts, "scores": out}}) + "\\n")
            return out
    """)
    fast = [a for a in FAST if a not in ("--max-steps", "2")]
    r = cli("-w", ws, "align", "--method", "rloo", "--reward-fn", f"{name}:score", "--prompts", ws.parent / "prompts.jsonl",
            *fast, "--epochs", "0.8", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["steps"] == 2  # 0.8 passes over 5 prompts at 2 prompts a step: ceil(4 / 2)
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2  # one rollout per step
    for call in calls:
        # 2 prompts x 4 samples, each prompt's samples side by side, all from the prompts file
        ps = call["prompts"]
        assert len(ps) == 8 and all(ps[i] == ps[i - i % 4] for i in range(8))
        assert set(ps) <= set(PROMPTS[:5])
    line = metric_lines(ws, "rloo")[-1]  # the window mean over both steps
    mean = sum(sum(c["scores"]) / 8 for c in calls) / 2
    assert line["reward"] == pytest.approx(mean, rel=1e-5) and line[f"reward/{name}:score"] == pytest.approx(mean, rel=1e-5)
    before, after = weights(ws, "sft"), weights(ws, "rloo")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # unequal rewards moved the policy


def live_models() -> int:
    import gc

    from prefcli.model import Transformer

    gc.collect()
    return sum(type(o) is Transformer for o in gc.get_objects())


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_constant_reward_without_kl_keeps_no_reference_and_changes_nothing(cli, ws, tmp_path, monkeypatch, method):
    # The reward function counts the models alive while training runs.
    name = reward_module(tmp_path, monkeypatch, """
        import test_rl

        counts = []

        def score(prompts, replies):
            counts.append(test_rl.live_models())
            return [1.0] * len(replies)
    """)
    import importlib

    counts = importlib.import_module(name).counts
    baseline = live_models()
    args = ["--reward-fn", f"{name}:score", "--prompts", ws.parent / "prompts.jsonl", *FAST, "--json"]
    r = cli("-w", ws, "align", "--method", method, "--kl-coef", "0", *args)
    assert r.code == 0, r.stderr
    out = r.json()
    assert counts == [baseline + 1] * 2  # the policy alone: no reference copy
    assert out["reference"] is None and out["parameters"]["reference"] == 0
    assert "kl" not in metric_lines(ws, method)[-1]
    # Every sample of a group scores the same: all advantages are 0, so no gradient, no change.
    before, after = weights(ws, "sft"), weights(ws, method)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # With a KL term the reference is there: one more model.
    counts.clear()
    r = cli("-w", ws, "align", "--method", method, "--kl-coef", "0.1", "--out", "with-kl", *args)
    assert r.code == 0, r.stderr
    assert counts == [baseline + 2] * 2 and r.json()["reference"] == "sft"


def test_default_prompts_and_reward_model(cli, ws):
    """No --prompts and no reward option: the built-in RL prompts and the workspace's rm."""
    r = cli("-w", ws, "align", "--method", "grpo", *FAST, "--max-steps", "1", "--json")
    assert r.code == 0, r.stderr
    meta = json.loads((ws / "models/grpo/meta.json").read_text())
    assert "reward/rm:rm" in metric_lines(ws, "grpo")[-1]
    names = {p.get("name") for p in meta["parents"]}
    assert {"sft", "rm", "demo RL prompts (built-in)"} <= names


def test_exact_resume_ppo_with_adaptive_kl(cli, ws):
    """A run stopped after a checkpoint and resumed ends with exactly the weights of one that was not."""
    args = ["align", "--method", "ppo", "--reward-model", "rm", "--reward-fn", "demo", "--prompts", ws.parent / "prompts.jsonl",
            "--max-tokens", "6", "--batch-size", "2", "--grad-accum", "2", "--ppo-epochs", "2", "--kl-target", "0.01",
            "--max-steps", "4", "--save-every", "2", "--device", "cpu", "--lr", "1e-3"]
    assert cli("-w", ws, *args, "--out", "full").code == 0
    assert cli("-w", ws, *args, "--out", "part").code == 0
    # Pretend the second run died after its step-2 checkpoint.
    shutil.rmtree(ws / "runs/part/checkpoints/step-000004")
    r = cli("-w", ws, *args, "--out", "part", "--resume")
    assert r.code == 0, r.stderr
    for name in ("", "-value"):
        a, b = weights(ws, "full" + name), weights(ws, "part" + name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    full, part = metric_lines(ws, "full"), metric_lines(ws, "part")
    assert [m["reward"] for m in full] == [m["reward"] for m in part]
    # The adaptive coefficient moved, and was restored from the checkpoint.
    coef = load_file(ws / "runs/full/checkpoints/step-000004/model.safetensors")["kl_coef"]
    assert coef != pytest.approx(METHOD_DEFAULTS["ppo"]["kl_coef"]) and coef == load_file(ws / "runs/part/checkpoints/step-000004/model.safetensors")["kl_coef"]


def test_user_errors_name_the_option_and_change_nothing(cli, ws):
    from conftest import tree_snapshot

    prompts = ws.parent / "prompts.jsonl"
    cases = [
        (["--method", "grpo", "--num-generations", "1"], "--num-generations 1"),
        (["--method", "rloo", "--batch-size", "6", "--num-generations", "4"], "--batch-size 6"),
        (["--method", "grpo", "--vf-coef", "0.5"], "--vf-coef"),
        (["--method", "grpo", "--beta", "0.1"], "--beta"),
        (["--method", "rloo", "--ppo-epochs", "2"], "--ppo-epochs 2"),
        (["--method", "ppo", "--kl-coef", "0", "--kl-target", "1"], "--kl-target"),
        (["--method", "grpo", "--kl-coef", "0", "--reference", "sft"], "--reference"),
        (["--method", "grpo", "--temperature", "0"], "--temperature 0"),
        (["--method", "ppo", "--max-tokens", "64"], "--max-tokens 64"),
        (["--method", "grpo", "--reward-model", "nope"], "nope"),
        (["--method", "grpo", "--reward-fn", "no_such_module:f"], "no_such_module"),
    ]
    before = tree_snapshot(ws)
    for args, needle in cases:
        r = cli("-w", ws, "align", "--max-tokens", "6", *args, "--prompts", prompts, "--max-steps", "1")
        assert r.code == 2 and needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
    assert tree_snapshot(ws) == before
    shutil.rmtree(ws / "models/rm")
    before = tree_snapshot(ws)
    r = cli("-w", ws, "align", "--method", "grpo", "--prompts", prompts, "--max-tokens", "6")
    assert r.code == 2 and "prefcli reward train" in r.stderr
    assert tree_snapshot(ws) == before


def test_torchrun_two_ranks_sample_their_own_prompts(ws, tmp_path):
    import os

    seen = tmp_path / "seen"
    (tmp_path / "rank_rewards.py").write_text(textwrap.dedent(f"""
        import json, os

        def score(prompts, replies):
            with open({str(seen)!r} + os.environ["RANK"], "a") as f:
                f.write(json.dumps(prompts) + "\\n")
            return [float(len(r)) for r in replies]
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parents[1])])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "prefcli",
           "-w", ws, "align", "--method", "grpo", "--reward-fn", "rank_rewards:score", "--prompts", ws.parent / "prompts.jsonl",
           *FAST, "--json"]
    done = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [[json.loads(line) for line in Path(f"{seen}{r}").read_text().splitlines()] for r in (0, 1)]
    assert len(steps[0]) == len(steps[1]) == 2
    # Each rank its own 2 prompts (x 4 samples) per step: the first 4 of the shuffled 5 in step 1.
    assert all(len(set(p)) == 2 for rank in steps for p in rank)
    assert not set(steps[0][0]) & set(steps[1][0]) and steps[0][1] != steps[1][1]
    assert (ws / "models/grpo/model.safetensors").is_file()


def test_grpo_and_ppo_with_lora_use_the_base_as_reference_and_save_adapters(cli, ws):
    from prefcli import lora

    prompts = ws.parent / "prompts.jsonl"
    r = cli("-w", ws, "align", "--method", "grpo", "--reward-fn", "demo", "--prompts", prompts, *FAST,
            "--lora-rank", "4", "--lr", "1e-2", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert out["parameters"]["reference"] == 0  # no second copy: the policy with adapters off
    assert lora.is_adapter_folder(ws / "models/grpo")
    assert abs(metric_lines(ws, "grpo")[0]["kl"]) < 1e-3  # the first rollouts: policy = reference = sft
    r = cli("-w", ws, "align", "--method", "ppo", "--reward-model", "rm", "--prompts", prompts, *FAST[:2],
            "--batch-size", "4", "--max-steps", "2", "--device", "cpu", "--lora-rank", "4", "--json")
    assert r.code == 0, r.stderr
    value = json.loads((ws / "models/ppo-value/adapter_config.json").read_text())
    assert value["task_type"] == "SEQ_CLS" and value["modules_to_save"] == ["score"]
    for name in ("ppo", "ppo-value"):  # both adapters trained (B starts at zero)
        adapter = load_file(ws / "models" / name / "adapter_model.safetensors")
        assert any(k.endswith("lora_B.weight") and bool(t.abs().sum() > 0) for k, t in adapter.items()), name

"""Every training stage under torchrun with 2 CPU processes (gloo): sft, reward train, dpo and
grpo, each under DDP, FSDP2 (--fsdp), LoRA (--lora-rank 4) and LoRA under FSDP.

What must hold: both ranks exit 0; only rank 0 prints (rank 1's stdout and stderr stay empty)
and writes (the artifact exists once, loads, and its run logged the steps asked for); and the
weights are the same as one process with the same global batch (2 ranks x batch B = one process
x batch B x grad-accum 2: the micro-batches of prefcli.distributed.batch_indices), under DDP and
FSDP alike.

The sixteen commands run in one torchrun launch (tests/cli_script.py: prefcli.cli.main once per
command in each process), since every launch costs seconds of start-up; one more launch runs
`-m prefcli` itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available in this build of torch")

SCRIPT = Path(__file__).parent / "cli_script.py"
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["What is 2 plus 3?", "What color is Biscuit?", "Say something kind to Anna.", "When does the bakery open?",
           "What is 4 plus 4?", "Where does Ben live?", "Who runs the shop?", "What is 1 plus 1?"]
STEPS = "2"
# Per process: a micro-batch of 2 (grpo: 1 prompt x 2 samples); one process at grad-accum 2 sees the same.
STAGES = {
    "sft": ["align", "--method", "sft", "--policy", "sft", "--data", "chats.jsonl", "--val-fraction", "0.25"],
    "rm": ["reward", "train", "--base", "sft", "--data", "pairs.jsonl", "--val-fraction", "0.25"],
    "dpo": ["align", "--method", "dpo", "--policy", "sft", "--data", "pairs.jsonl", "--val-fraction", "0.25"],
    "grpo": ["align", "--method", "grpo", "--policy", "sft", "--prompts", "prompts.jsonl", "--reward-fn", "demo",
             "--num-generations", "2", "--max-tokens", "6"],
}
MODES = {"ddp": [], "fsdp": ["--fsdp"], "lora": ["--lora-rank", "4"], "lora-fsdp": ["--fsdp", "--lora-rank", "4"]}
COMMON = ["--max-steps", STEPS, "--batch-size", "2", "--device", "cpu", "--json"]
# kto at one example per process: a micro-batch holds a desirable or an undesirable reply, so the
# ranks log different metric keys (which once desynchronised the Trainer's all-reduce).
KTO = ["align", "--method", "kto", "--policy", "sft", "--data", "pairs.jsonl", "--val-fraction", "0.25",
       "--max-steps", "4", "--batch-size", "1", "--device", "cpu", "--out", "kto", "--json"]
# pretrain --fsdp samples a few tokens from the trained model at the end, on rank 0 (it once did
# so from the sharded weights, alone, and waited forever for the other rank).
PRETRAIN = ["pretrain", "--fsdp", "--layers", "1", "--dim", "32", "--heads", "2", "--context", "32", "--max-steps", "2",
            "--batch-size", "2", "--device", "cpu", "--out", "base-fsdp", "--json"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def torchrun(root: Path, *args, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", *map(str, args)]
    return subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=timeout)


def _main(*args):
    from prefcli.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert not e.code, args


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A workspace (ws/) with a tokenizer and a tiny random chat model 'sft', and small data files beside it."""
    from prefcli.artifacts import save_model_artifact, sync_token_ids
    from prefcli.chat_format import render_chat
    from prefcli.model import Transformer, make_config
    from prefcli.tokenizer import Tokenizer
    from prefcli.workspace import Workspace

    root = tmp_path_factory.mktemp("dist")
    chats = [[{"role": "user", "content": p}, {"role": "assistant", "content": "Sure, " + p.lower()}] for p in PROMPTS]
    (root / "corpus.txt").write_text("\n\n".join(render_chat(c) for c in chats * 30) + "\n")
    _main("-w", root / "ws", "tokenize", "-i", root / "corpus.txt", "--vocab-size", "300")
    tok_path = root / "ws/tokenizers/default"
    tok = Tokenizer(tok_path)
    torch.manual_seed(0)
    model = Transformer(make_config("tiny", tok.vocab_size, layers=2, dim=32, heads=2, context=64))
    sync_token_ids(model, tok)
    # Recorded as made from the demo data, so --reward-fn demo (the gold judge) may score it.
    save_model_artifact(Workspace(root / "ws"), "sft", model, tok_path, kind="causal_lm", stage="test", config={},
                        parents=[{"kind": "input", "name": "demo corpus (built-in, seed 0)"}], metrics={},
                        overwrite=False, chat=True)

    def jsonl(name, rows):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl("chats.jsonl", [{"messages": c} for c in chats * 2])
    jsonl("pairs.jsonl", [{"prompt": p, "chosen": "Sure, " + p.lower(), "rejected": "No. Go away."} for p in PROMPTS * 2])
    jsonl("prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return root


@pytest.fixture(scope="module")
def runs(root):
    """{(stage, mode): (rank 0's result, rank 1's result)} of the sixteen commands, plus kto and pretrain."""
    commands = {(s, m): ["-w", "ws", *args, *MODES[m], *COMMON, "--out", f"{s}-{m}"] for s, args in STAGES.items() for m in MODES}
    commands[("kto", "ddp")] = ["-w", "ws", *KTO]
    commands[("pretrain", "fsdp")] = ["-w", "ws", *PRETRAIN]
    (root / "commands.json").write_text(json.dumps(list(commands.values())))
    out = root / "results"
    out.mkdir()
    done = torchrun(root, SCRIPT, root / "commands.json", out)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {key: (ranks[0][i], ranks[1][i]) for i, key in enumerate(commands)}


@pytest.fixture(scope="module")
def single(root):
    """One process, batch 2 x grad-accum 2, for each stage: the same global batch as the 2-rank runs."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage, args in STAGES.items():
            _main("-w", "ws", *args, *COMMON, "--grad-accum", "2", "--out", f"{stage}-single")
    finally:
        os.chdir(cwd)
    return root


def weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    folder = root / "ws/models" / name
    return load_file(folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors"))


def assert_same(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, worst


def metric_lines(root: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (root / "ws/runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", STAGES)
def test_stage_runs_on_two_ranks_and_rank_0_alone_prints_and_writes(root, runs, stage, mode):
    from prefcli.model import load_model

    zero, one = runs[(stage, mode)]
    assert (zero["code"], one["code"]) == (0, 0), zero["stderr"][-2000:] + one["stderr"][-2000:]
    assert one["stdout"] == "" and one["stderr"] == ""  # progress, tables and JSON: rank 0 only
    result = json.loads(zero["stdout"])
    name = f"{stage}-{mode}"
    assert result["model"] == name and result["steps"] == int(STEPS)
    assert [line["step"] for line in metric_lines(root, name)] == [int(STEPS)]  # logged at the end
    folder = root / "ws/models" / name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["metrics"]["steps"] == int(STEPS) and meta["config"]["fsdp"] == ("fsdp" in mode)
    assert (folder / "adapter_config.json").is_file() == ("lora" in mode)
    assert not list((root / "ws/runs").glob(".*.new")) and not any((root / "ws/.tmp").glob("*"))
    model = load_model(folder, kind="reward" if stage == "rm" else "causal_lm")
    assert (model.score_head is not None) == (stage == "rm")


@pytest.mark.parametrize("stage", STAGES)
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(root, runs, single, stage):
    for mode in ("ddp", "fsdp"):
        assert runs[(stage, mode)][0]["code"] == 0
        assert_same(weights(root, f"{stage}-{mode}"), weights(root, f"{stage}-single"))
        assert metric_lines(root, f"{stage}-{mode}")[0]["loss"] == pytest.approx(
            metric_lines(root, f"{stage}-single")[0]["loss"], abs=1e-5, rel=0)
    assert_same(weights(root, f"{stage}-lora"), weights(root, f"{stage}-lora-fsdp"))  # the adapters alike
    lora = weights(root, f"{stage}-lora")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # and trained


def test_kto_with_different_metric_keys_per_rank(root, runs):
    zero, one = runs[("kto", "ddp")]
    assert (zero["code"], one["code"]) == (0, 0), zero["stderr"][-2000:] + one["stderr"][-2000:]
    line = metric_lines(root, "kto")[-1]
    assert line["step"] == 4 and "logps/chosen" in line and "logps/rejected" in line


def test_pretrain_fsdp_samples_from_the_gathered_weights(root, runs):
    zero, one = runs[("pretrain", "fsdp")]
    assert (zero["code"], one["code"]) == (0, 0), zero["stderr"][-2000:] + one["stderr"][-2000:]
    result = json.loads(zero["stdout"])
    assert result["steps"] == 2 and result["sample"]
    saved = weights(root, "base-fsdp")  # the gathered weights: those the final checkpoint holds
    checkpoint = load_file(root / "ws/runs/base-fsdp/checkpoints/step-000002/model.safetensors")
    assert len(saved) > 5 and all(torch.equal(saved[k], checkpoint[k]) for k in saved)


def test_torchrun_dash_m_prefcli(root, runs):
    """The command a user types: one JSON document on stdout (rank 0's), the model saved once,
    the same weights as the same run inside tests/cli_script.py."""
    done = torchrun(root, "-m", "prefcli", "-w", "ws", *STAGES["dpo"], *MODES["lora-fsdp"], *COMMON, "--out", "dpo-cli")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads(done.stdout)["model"] == "dpo-cli"  # one document: a second would not parse
    assert done.stderr.count("dpo dpo-cli: 2/2 step") == 1  # one progress bar
    assert_same(weights(root, "dpo-cli"), weights(root, "dpo-lora-fsdp"), atol=0)


def test_collapse_guard_decides_on_metrics_averaged_over_ranks(monkeypatch):
    """Two ranks simulated: rank 0's chosen log-prob holds at -20 while the other rank's falls to
    -60; each alone would not (or would) fire, the mean (-40) does on both."""
    from prefcli import distributed as dist
    from prefcli.guard import CollapseGuard, RunCollapsed

    other = {"logps/chosen": -20.0}

    def mean(t):  # rank 0's values and the other rank's, present flags included
        mine = t.tolist()
        theirs = [other["logps/chosen"], 1.0]
        return torch.tensor([(a + b) / 2 for a, b in zip(mine, theirs)], dtype=torch.float64)

    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_mean", mean)
    guard = CollapseGuard("stop", "preference")
    for _ in range(5):
        guard.observe({"logps/chosen": -20.0})
    other["logps/chosen"] = -60.0
    with pytest.raises(RunCollapsed, match=r"-20.0 -> -40.0"):
        for _ in range(10):
            guard.observe({"logps/chosen": -20.0})
    # A rank without the metric this step (kto) leaves the mean to the ranks that have it.
    quiet = CollapseGuard("stop", "preference")
    quiet.observe({})
    assert quiet.start["logps/chosen"] == [-60.0]

"""`prefcli pipeline run`: stages run in order, up-to-date ones skipped, changes re-run downstream, failures stop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CHAT_LINES, tree_snapshot, write_jsonl

REPO = Path(__file__).resolve().parent.parent
TINY_PRETRAIN = "layers = 1, dim = 32, heads = 2, context = 32, max-steps = 3, batch-size = 4"

PIPELINE = """
[[stage]]
command = "tokenize"
options = {{ input = "{corpus}", vocab-size = 300 }}

[[stage]]
command = "pretrain"
options = {{ {pretrain} }}

[[stage]]
command = "align"
options = {{ method = "sft", data = ["{chats}"], max-steps = 2, batch-size = 4 }}

[[stage]]
command = "reward train"
options = {{ data = "{pairs}", max-steps = 2, batch-size = 4 }}

[[stage]]
command = "align"
options = {{ method = "dpo", data = ["{pairs}"], rpo-alpha = 1.0, max-steps = 2, batch-size = 4 }}

[[stage]]
command = "eval reward"
options = {{ pairs = "{pairs}" }}
"""


@pytest.fixture
def data(tmp_path, small_corpus):
    chats = write_jsonl(tmp_path / "chats.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHAT_LINES * 2])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": q, "chosen": a, "rejected": "No. Go away."} for q, a in CHAT_LINES * 2])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES])
    return {"corpus": small_corpus, "chats": chats, "pairs": pairs, "prompts": prompts, "pretrain": TINY_PRETRAIN}


def created(ws: Path) -> dict:
    """kind/name -> the created time each artifact records."""
    from prefcli.workspace import Workspace

    return {f"{r['kind']}/{r['name']}": r["created"] for r in Workspace(ws).artifacts() if r["kind"] != "runs"}


def plan(result) -> list[tuple[str, str]]:
    return [(s["action"], s["status"]) for s in result.json()["stages"]]


def test_run_skip_and_rerun_what_changed(cli, tmp_path, data):
    ws, path = tmp_path / "ws", tmp_path / "pipe.toml"
    text = PIPELINE.format(**data)
    path.write_text(text)

    first = cli("-w", ws, "pipeline", "run", path, "--json")
    assert first.code == 0, first.stderr
    summary = first.json()  # stdout is the summary alone: the stages' own output went to stderr
    assert plan(first) == [("run", "ok")] * 6
    assert [s["command"] for s in summary["stages"]] == ["tokenize", "pretrain", "align", "reward train", "align", "eval reward"]
    assert summary["ok"] and summary["exit_code"] == 0 and summary["workspace"] == str(ws)
    assert all(s["seconds"] >= 0 and s["exit_code"] == 0 for s in summary["stages"])
    headers = [line for line in first.stderr.splitlines() if line.startswith("[") and "/6] prefcli " in line]
    assert len(headers) == 6 and headers[4].startswith("[5/6] prefcli align --method dpo")
    # Each stage ran as the command typed by hand: its options are in the artifact's recorded config.
    dpo = json.loads((ws / "models/dpo/meta.json").read_text())
    assert dpo["config"]["rpo_alpha"] == 1.0 and dpo["config"]["max_steps"] == 2 and dpo["config"]["beta"] == 0.1
    assert json.loads((ws / "models/base/meta.json").read_text())["config"]["dim"] == 32
    assert (ws / "evals/reward-rm.json").is_file()
    before = created(ws)
    assert set(before) == {"tokenizers/default", "datasets/corpus", "models/base", "models/sft", "models/rm",
                           "models/dpo", "evals/reward-rm"}

    # Again: every stage is up to date, nothing is rewritten.
    again = cli("-w", ws, "pipeline", "run", path, "--json")
    assert again.code == 0, again.stderr
    assert plan(again) == [("skip", "skipped")] * 6
    assert created(ws) == before

    # dpo's steps change: dpo alone re-runs (nothing later uses it).
    path.write_text(text.replace('rpo-alpha = 1.0, max-steps = 2', 'rpo-alpha = 1.0, max-steps = 3'))
    r = cli("-w", ws, "pipeline", "run", path, "--json")
    assert r.code == 0, r.stderr
    assert plan(r) == [("skip", "skipped")] * 4 + [("re-run", "ok"), ("skip", "skipped")]
    assert r.json()["stages"][4]["reason"] == "config changed (max_steps: 2 -> 3)"
    assert "--overwrite" in r.json()["stages"][4]["argv"]
    assert json.loads((ws / "models/dpo/meta.json").read_text())["config"]["max_steps"] == 3
    after = created(ws)
    assert {k for k in after if after[k] != before[k]} <= {"models/dpo"}

    # The reward model's steps change: it re-runs, and so does the eval that reads it; dpo does not.
    text = text.replace('rpo-alpha = 1.0, max-steps = 2', 'rpo-alpha = 1.0, max-steps = 3')
    text = text.replace('data = "{pairs}", max-steps = 2'.format(**data), 'data = "{pairs}", max-steps = 3'.format(**data))
    path.write_text(text)
    before = created(ws)
    r = cli("-w", ws, "pipeline", "run", path, "--json")
    assert r.code == 0, r.stderr
    assert plan(r) == [("skip", "skipped")] * 3 + [("re-run", "ok"), ("skip", "skipped"), ("re-run", "ok")]
    assert r.json()["stages"][5]["reason"] == "input rebuilt (models/rm)"
    assert created(ws)["models/dpo"] == before["models/dpo"]
    reward_argv = r.json()["stages"][3]["argv"]

    # sft changes: the plan re-runs sft and everything built on it, and --dry-run changes nothing.
    snapshot = tree_snapshot(ws)
    path.write_text(text.replace('data = ["{chats}"], max-steps = 2'.format(**data), 'data = ["{chats}"], max-steps = 2, lr = 0.01'.format(**data)))
    r = cli("-w", ws, "pipeline", "run", path, "--dry-run", "--json")
    assert r.code == 0, r.stderr
    stages = r.json()["stages"]
    assert [s["action"] for s in stages] == ["skip", "skip", "re-run", "re-run", "re-run", "re-run"]
    assert stages[2]["reason"] == "config changed (lr: null -> 0.01)"  # null: the stage's rate for the model
    assert [s["reason"] for s in stages[3:5]] == ["input rebuilt (models/sft)"] * 2  # rm's backbone, dpo's policy
    assert {s["status"] for s in stages} == {"planned"}
    assert tree_snapshot(ws) == snapshot

    # An input rebuilt by hand since (same settings, so the reward stage itself is up to date):
    # the eval made from the old reward model re-runs.
    path.write_text(text)
    time.sleep(1.1)  # `created` has one-second resolution
    assert cli("-w", ws, "reward", "train", *reward_argv).code == 0
    r = cli("-w", ws, "pipeline", "run", path, "--dry-run", "--json")
    stages = r.json()["stages"]
    assert [s["action"] for s in stages] == ["skip"] * 5 + ["re-run"]
    assert stages[5]["reason"] == "input rebuilt since (models/rm)"


def test_force_reruns_every_stage(cli, tmp_path, data):
    ws, path = tmp_path / "ws", tmp_path / "pipe.toml"
    path.write_text(f'[[stage]]\ncommand = "tokenize"\noptions = {{ input = "{data["corpus"]}", vocab-size = 300 }}\n'
                    f'[[stage]]\ncommand = "pretrain"\noptions = {{ {TINY_PRETRAIN} }}\n')
    assert plan(cli("-w", ws, "pipeline", "run", path, "--json")) == [("run", "ok")] * 2
    (ws / "runs/base/metrics.jsonl").unlink()
    r = cli("-w", ws, "pipeline", "run", path, "--force", "--json")
    assert r.code == 0, r.stderr
    assert plan(r) == [("re-run", "ok")] * 2 and {s["reason"] for s in r.json()["stages"]} == {"--force"}
    assert (ws / "runs/base/metrics.jsonl").is_file()  # pretrain really ran again
    assert "pretrain -> models/base" in r.stderr


def test_a_failing_stage_stops_the_run_with_its_exit_code(cli, tmp_path, data):
    ws, path = tmp_path / "ws", tmp_path / "pipe.toml"
    path.write_text(f'[[stage]]\ncommand = "tokenize"\noptions = {{ input = "{data["corpus"]}", vocab-size = 300 }}\n'
                    f'[[stage]]\ncommand = "pretrain"\noptions = {{ data = "nope", {TINY_PRETRAIN} }}\n'
                    f'[[stage]]\ncommand = "align"\noptions = {{ method = "sft", policy = "base" }}\n')
    r = cli("-w", ws, "pipeline", "run", path, "--json")
    assert r.code == 2
    summary = r.json()
    assert [s["status"] for s in summary["stages"]] == ["ok", "failed", "not run"]
    assert summary["failed"] == 2 and summary["exit_code"] == 2 and not summary["ok"]
    assert "no dataset named 'nope'" in r.stderr  # the stage's own error line
    assert f"{path}: stage 2 (pretrain) failed with exit code 2; 1 later stage not run" in r.stderr
    assert (ws / "datasets/corpus").is_dir() and not (ws / "models").exists()


def test_an_unexpected_exception_is_exit_code_1(cli, tmp_path, data, monkeypatch):
    from prefcli.stages import tokenize

    def boom(cfg, ws):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tokenize, "run", boom)
    path = tmp_path / "pipe.toml"
    path.write_text('[[stage]]\ncommand = "tokenize"\n[[stage]]\ncommand = "pretrain"\n')
    r = cli("-w", tmp_path / "ws", "pipeline", "run", path)
    assert r.code == 1
    assert "RuntimeError: disk on fire" in r.stderr and "stage 1 (tokenize) failed with exit code 1" in r.stderr
    assert "[2/2]" not in r.stderr


@pytest.mark.parametrize("text, message", [
    ('[[stage]\ncommand = "tokenize"\n', "not valid TOML"),
    ('[[stage]]\ncommand = "tokenise"\n', "stage 1: unknown command 'tokenise'"),
    ('[[stage]]\ncommand = "tokenize"\n[[stage]]\ncommand = "pretrain"\noptions = { layerz = 2 }\n',
     "stage 2 (pretrain): option 'layerz' is not a flag of `prefcli pretrain`"),
    ('[[stage]]\ncommand = "align"\noptions = { method = "sft", rpo-alpha = 1.0 }\n',
     "stage 1 (align): --rpo-alpha: does not apply to --method sft"),
    ('[[stage]]\ncommand = "align"\noptions = { method = "dpx" }\n', "stage 1 (align): --method dpx: unknown method"),
    ('[[stage]]\ncommand = "pretrain"\noptions = { max-steps = "many" }\n', "stage 1 (pretrain): Invalid value for '--max-steps'"),
    ('[[stage]]\ncommand = "pretrain"\noptions = { compile = 1 }\n', "stage 1 (pretrain): option 'compile' is a flag"),
    ('[[stage]]\ncommand = "pretrain"\noptions = { layers = [1, 2] }\n', "stage 1 (pretrain): option 'layers' takes one value"),
    ('[[stage]]\ncommand = "reward"\n', "stage 1: 'reward' needs a subcommand"),
    ('[[stage]]\ncommand = "reward train"\noptions = { method = "dpo" }\n',
     "stage 1 (reward train): option 'method' is not a flag of `prefcli reward train`"),
    ('[[stage]]\ncommand = "pipeline run"\n', "stage 1: unknown command 'pipeline run'"),
    ('[[stage]]\ncommand = "tokenize"\noption = { vocab-size = 300 }\n', "stage 1: unknown key 'option'"),
    ('stages = []\n', "unknown key 'stages'"),
    ('workspace = "ws"\n', "no stages"),
    ('[[stage]]\ncommand = "pretrain"\noptions = { out = "My Model" }\n', "stage 1 (pretrain): --out: 'My Model' is not a valid artifact name"),
    ('[[stage]]\ncommand = "align"\noptions = { method = "dpo" }\n[[stage]]\ncommand = "align"\noptions = { method = "dpo", beta = 0.5 }\n',
     "stages 1 and 2 both write models/dpo"),
])
def test_a_bad_pipeline_file_is_one_clear_line(cli, tmp_path, text, message):
    ws, path = tmp_path / "ws", tmp_path / "bad.toml"
    path.write_text(text)
    r = cli("-w", ws, "pipeline", "run", path)
    assert r.code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}") and message in lines[0], r.stderr
    assert not ws.exists()


def test_set_overrides_and_workspace_precedence(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("PREFCLI_WORKSPACE", raising=False)
    path = tmp_path / "pipe.toml"
    path.write_text(f'workspace = "{tmp_path / "from-file"}"\n'
                    '[[stage]]\ncommand = "tokenize"\n'
                    '[[stage]]\ncommand = "pretrain"\noptions = { max-steps = 10 }\n'
                    '[[stage]]\ncommand = "align"\noptions = { method = "sft" }\n'
                    '[[stage]]\ncommand = "ls"\n')
    r = cli("pipeline", "run", path, "--dry-run", "--json", "--set", "max-steps=7", "--set", "3.train-on-prompt=true",
            "--set", "2.lr=1e-3")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["workspace"] == str(tmp_path / "from-file")
    argv = [s["argv"] for s in doc["stages"]]
    assert argv[1] == ["--max-steps", "7", "--lr", "0.001", "--overwrite"]
    assert argv[2] == ["--method", "sft", "--max-steps", "7", "--train-on-prompt", "--overwrite"]
    assert [s["action"] for s in doc["stages"]] == ["run", "run", "run", "always"]
    assert not (tmp_path / "from-file").exists()

    monkeypatch.setenv("PREFCLI_WORKSPACE", str(tmp_path / "from-env"))
    assert cli("pipeline", "run", path, "--dry-run", "--json").json()["workspace"] == str(tmp_path / "from-file")
    assert cli("-w", tmp_path / "from-w", "pipeline", "run", path, "--dry-run", "--json").json()["workspace"] == str(tmp_path / "from-w")
    path.write_text('[[stage]]\ncommand = "tokenize"\n')
    assert cli("pipeline", "run", path, "--dry-run", "--json").json()["workspace"] == str(tmp_path / "from-env")

    r = cli("pipeline", "run", path, "--set", "layers=2")
    assert r.code == 2 and f"--set layers=2: no stage of {path} takes --layers" in r.stderr


# The example's stages with the same tiny settings as `FAST=1 examples/pipeline.sh`.
FAST_SETS = ["1.vocab-size=300", "2.layers=1", "2.dim=32", "2.heads=2", "2.context=32", "max-steps=2", "2.max-steps=3",
             "2.batch-size=4", "3.batch-size=4", "4.batch-size=32", "5.batch-size=32",
             "6.limit=4", "6.max-tokens=8", "6.batch-size=4"]


def test_examples_script_and_pipeline_file_are_the_same_workflow(cli, tmp_path, data):
    example = REPO / "examples/pipeline.toml"
    r = cli("-w", tmp_path / "empty", "pipeline", "run", example, "--dry-run", "--json")
    assert r.code == 0, r.stderr
    stages = r.json()["stages"]
    assert [(s["command"], s["action"]) for s in stages] == [
        ("tokenize", "run"), ("pretrain", "run"), ("align", "run"), ("reward train", "run"), ("align", "run"), ("eval compare", "run")]
    assert "--rpo-alpha" in stages[4]["argv"] and not (tmp_path / "empty").exists()

    # The script, on small data files, with FAST settings.
    # The prefcli installed with this interpreter (editable install), else the module.
    script = Path(sys.executable).with_name("prefcli")
    prefcli = str(script) if script.is_file() else shutil.which("prefcli") or f"{sys.executable} -m prefcli"
    env = {k: v for k, v in os.environ.items() if k != "PREFCLI_WORKSPACE"}
    env.update(FAST="1", PREFCLI=prefcli, CORPUS=str(data["corpus"]), CHATS=str(data["chats"]), PAIRS=str(data["pairs"]),
               PROMPTS=str(data["prompts"]))  # a model of your own corpus is compared on your own prompts
    proc = subprocess.run(["bash", str(REPO / "examples/pipeline.sh"), "ws"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ws = tmp_path / "ws"
    for artifact in ("tokenizers/default", "datasets/corpus", "models/base", "models/sft", "models/rm", "models/dpo"):
        assert (ws / artifact / "meta.json").is_file(), artifact
    assert json.loads((ws / "evals/compare-dpo.json").read_text())["meta"]["stage"] == "eval compare"

    # The pipeline file with the same settings finds every stage the script ran up to date.
    sets = [a for s in FAST_SETS + [f"1.input={data['corpus']}", f"3.data={data['chats']}",
                                    f"4.data={data['pairs']}", f"5.data={data['pairs']}",
                                    f"6.prompts={data['prompts']}"] for a in ("--set", s)]
    r = cli("-w", ws, "pipeline", "run", example, "--dry-run", "--json", *sets)
    assert r.code == 0, r.stderr
    assert [(s["action"], s["reason"]) for s in r.json()["stages"]] == [("skip", "up to date")] * 6


def test_stages_that_fill_in_defaults_are_still_up_to_date(cli, tmp_path, chat_ws):
    """dpo records its default beta; grpo its method defaults and steps rounded up to whole rollout batches."""
    ws, files = chat_ws
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES[:2]])
    path = tmp_path / "pipe.toml"
    path.write_text(f'[[stage]]\ncommand = "align"\noptions = {{ method = "dpo", policy = "base", data = ["{files["pairs"]}"], '
                    'max-steps = 1, batch-size = 4 }\n'
                    f'[[stage]]\ncommand = "align"\noptions = {{ method = "grpo", policy = "base", prompts = ["{prompts}"], '
                    'reward-fn = ["demo"], max-steps = 1, ppo-epochs = 2, num-generations = 2, batch-size = 2, max-tokens = 4 }\n')
    assert plan(cli("-w", ws, "pipeline", "run", path, "--json")) == [("run", "ok")] * 2
    recorded = json.loads((ws / "models/grpo/meta.json").read_text())["config"]
    assert recorded["max_steps"] == 2 and recorded["kl_coef"] is not None
    assert recorded["lr"] is None  # the method's rate for this model (`default_lr`), in its metrics
    assert json.loads((ws / "models/grpo/meta.json").read_text())["metrics"]["lr"] == 2e-4
    assert json.loads((ws / "models/dpo/meta.json").read_text())["config"]["beta"] == 0.1
    r = cli("-w", ws, "pipeline", "run", path, "--dry-run", "--json")
    assert [(s["action"], s["reason"]) for s in r.json()["stages"]] == [("skip", "up to date")] * 2
    r = cli("-w", ws, "pipeline", "run", path, "--dry-run", "--json", "--set", "1.beta=0.1", "--set", "2.max-steps=2")
    assert [s["action"] for s in r.json()["stages"]] == ["skip", "skip"]  # the same configs, spelled out
    r = cli("-w", ws, "pipeline", "run", path, "--dry-run", "--json", "--set", "2.max-steps=3")
    assert r.json()["stages"][1]["reason"] == "config changed (max_steps: 2 -> 4)"

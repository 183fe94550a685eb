"""`prefcli quickstart --fast`: the whole workflow on the demo data, end to end, in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_quickstart_fast_runs_every_stage_and_reports(cli, tmp_path, capsys):
    ws = tmp_path / "ws"
    r = cli("-w", ws, "quickstart", "--fast", "--json")
    assert r.code == 0, r.stderr
    out = r.json()
    assert [s["stage"] for s in out["stages"]] == ["tokenize", "pretrain", "sft", "reward", "dpo", "rloo", "eval"]
    cmp = out["comparison"]
    assert cmp["reference"] == "sft" and cmp["prompts"] == 30 and cmp["gold_judge"]
    for name in ("dpo", "rloo"):
        model = cmp["models"][name]
        assert 0 <= model["gold"]["good"]["rate"] <= 1
        assert model["vs_reference"]["win_rate_gold"]["n"] == 30
        assert (ws / "models" / name / "meta.json").is_file()
    # The comparison is an eval artifact too.
    saved = json.loads((ws / "evals/quickstart.json").read_text())
    assert saved["meta"]["name"] == "quickstart" and set(saved["models"]) == {"dpo", "rloo"} and out["eval"].endswith("quickstart.json")
    from prefcli.reports import best_model, quickstart, verdict

    quickstart(out)  # the human report of the same result
    shown = " ".join(capsys.readouterr().err.split())  # rich wraps lines at the terminal width
    best = best_model(cmp)
    assert best in ("dpo", "rloo") and verdict(cmp) in shown and "by the gold judge" in shown
    assert "against sft on 30 held-out prompts" in shown and f"prefcli -w {ws} chat --model {best}" in shown
    # At 80 columns in a pipe (CI logs) the tables keep every header whole.
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    code = "import json, sys; from prefcli.reports import quickstart; quickstart(json.load(sys.stdin))"
    report = subprocess.run([sys.executable, "-c", code], input=r.stdout, capture_output=True, text=True, env=env, timeout=120)
    assert report.returncode == 0, report.stderr
    lines = report.stderr.splitlines()
    tables = lines[:next(i for i, line in enumerate(lines) if line.startswith("good: share"))]
    assert max(len(line) for line in tables) <= 80
    header = next(line for line in lines if line.split()[:2] == ["model", "good"])
    assert header.split() == ["model", "good", "win", "correct", "polite", "concise", "RM", "win", "KL", "dist-2", "len"]
    again = cli("-w", ws, "quickstart", "--fast")
    assert again.code == 2 and "already holds" in again.stderr and "--overwrite" in again.stderr


def test_quickstart_precision_reaches_every_training_stage():
    """--precision goes to pretrain, sft, reward and dpo, and their printed commands say so."""
    from prefcli import stages
    from prefcli.stages.quickstart import QuickstartConfig, _steps

    built = {}
    for step in _steps(QuickstartConfig(precision="bf16")):
        options = dict(step.options)
        method = options.pop("method", None) if step.stage == "align" else None
        built[step.name] = (stages.build(step.stage, options, method=method), step.command)
    for name in ("pretrain", "sft", "reward", "dpo"):
        cfg, command = built[name]
        assert cfg.precision == "bf16" and command.endswith("--precision bf16"), name
    assert "--precision" not in built["rloo"][1] and "--precision" not in built["tokenize"][1]
    assert all("--precision" not in s.command for s in _steps(QuickstartConfig(precision="auto", device="cuda")))
    assert all("--precision" not in s.command for s in _steps(QuickstartConfig(precision="fp32")) if s.name in ("rloo", "tokenize"))


def test_quickstart_auto_precision_is_bf16_only_where_the_cpu_has_it(monkeypatch):
    from prefcli.stages import quickstart

    monkeypatch.setattr(quickstart.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(quickstart, "cpu_has_native_bf16", lambda: True)
    assert quickstart.tour_precision(quickstart.QuickstartConfig()) == "bf16"
    assert quickstart.tour_precision(quickstart.QuickstartConfig(precision="fp32")) == "fp32"
    monkeypatch.setattr(quickstart, "cpu_has_native_bf16", lambda: False)
    assert quickstart.tour_precision(quickstart.QuickstartConfig()) == "auto"

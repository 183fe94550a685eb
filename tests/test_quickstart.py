"""`prefcli quickstart --fast`: the whole workflow on the demo data, end to end, in one process."""

from __future__ import annotations


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
    from prefcli.cli import _quickstart_report

    _quickstart_report(out)  # the human report of the same result
    shown = " ".join(capsys.readouterr().err.split())  # rich wraps lines at the terminal width
    assert "against sft on 30 held-out prompts" in shown and f"prefcli -w {ws} chat --model" in shown
    again = cli("-w", ws, "quickstart", "--fast")
    assert again.code == 2 and "already holds" in again.stderr and "--overwrite" in again.stderr

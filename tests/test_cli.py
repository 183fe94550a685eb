"""The command line as generated from the configs: help, flags, range and TOML checks, where output goes."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from conftest import tree_snapshot

REPO = Path(__file__).resolve().parent.parent


def group():
    from prefcli.cli import app

    return typer.main.get_command(app)


def commands():
    """(name, click command) of every command, subcommands spelled out."""
    out = []
    for name, cmd in group().commands.items():
        if hasattr(cmd, "commands"):
            out += [(f"{name} {sub}", c) for sub, c in cmd.commands.items()]
        else:
            out.append((name, cmd))
    return out


def one_line_error(r, *needles):
    assert r.code == 2, (r.code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- help
def test_every_option_of_a_stage_shows_its_default_and_each_command_an_example():
    from prefcli.stages import COMMANDS

    for name, cmd in commands():
        assert "Example: prefcli " in (cmd.help or ""), name
        if name not in COMMANDS:
            continue
        for p in cmd.params:
            if p.param_type_name != "option" or p.required or p.name in ("help", "config_file", "workspace_dir", "as_json", "threads"):
                continue
            flag_only = p.is_flag and not p.secondary_opts
            assert flag_only or "[default: " in p.help, (name, p.opts)


def test_help_lists_choices_and_panels_and_h_is_help(cli):
    pretrain = cli("pretrain", "--help")
    assert pretrain.code == 0 and "tiny|small|base|gpt2" in pretrain.stdout
    assert "auto|cpu|cuda[:N]|mps" in pretrain.stdout and "[default: 0.003, less in full" in pretrain.stdout
    assert cli("pretrain", "-h").stdout == pretrain.stdout
    assert cli("-h").stdout == cli("--help").stdout and "align" in cli("-h").stdout

    align = cli("align", "-h")
    assert align.code == 0
    text = align.stdout
    assert "sft|dpo|ipo|hinge|robust|s" in text  # --method's choices (the column may wrap them)
    for panel in ("Common", "sft", "preference (dpo, ipo, hinge, robust, simpo, orpo, kto)", "online RL (ppo, grpo, rloo)",
                  "steer", "Training", "Run"):
        assert f"─ {panel} ─" in text, panel
    # Defaults that differ by method are given per method, from the configs themselves.
    flat = " ".join(text.replace("│", " ").split())
    assert "[default: dpo 0.1, ipo 0.1, hinge 0.1, robust 0.1, simpo 2.0, orpo 0.1, kto 0.1]" in flat
    assert "--no-pack" in text and "Example: prefcli align --method dpo" in flat

    compare = " ".join(cli("eval", "compare", "-h").stdout.replace("│", " ").split())
    assert "--kl --no-kl" in compare and "[default: on]" in compare


def test_help_fits_80_columns_in_a_pipe():
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "prefcli", "align", "--help"], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "─ preference and online RL ─" in out  # panel titles whole


# ---------------------------------------------------------------- option ranges
@pytest.mark.parametrize("args, needle", [
    (["pretrain", "--lr", "-1"], "--lr -1.0: must be > 0"),
    (["pretrain", "--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["pretrain", "--lr", "inf"], "--lr inf: must be a finite number"),
    (["pretrain", "--warmup", "-5"], "--warmup -5: must be >= 0"),
    (["pretrain", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["pretrain", "--size", "huge"], "--size huge: not one of tiny, small, base, gpt2"),
    (["align", "--method", "sft", "--epochs", "-1"], "--epochs -1.0: must be > 0"),
    (["align", "--method", "dpo", "--beta", "-1"], "--beta -1.0: must be > 0"),
    (["align", "-m", "dpo", "--beta", "0"], "--beta 0.0: must be > 0"),
    (["align", "--method", "sft", "--val-fraction", "1"], "--val-fraction 1.0: must be in [0, 1)"),
    (["align", "--method", "grpo", "--kl-coef", "-0.1"], "--kl-coef -0.1: must be >= 0"),
    (["align", "--method", "sft", "--no-pack", "--beta", "0.1"], "--beta: does not apply to --method sft"),
    (["align", "--method", "dpo", "--no-pack"], "--no-pack: does not apply to --method dpo"),
    (["tokenize", "--val-fraction", "-0.5"], "--val-fraction -0.5: must be in [0, 1)"),
    (["eval", "compare", "--model", "x", "--top-p", "0"], "--top-p 0.0: must be in (0, 1]"),
    (["eval", "perplexity", "--split", "test"], "--split test: not one of val, train"),
    (["quickstart", "--method", "sft"], "--method sft: not one of"),
    (["tokenize", "--threads", "0"], "--threads 0: must be at least 1"),
])
def test_out_of_range_options_are_one_line_naming_the_flag(cli, tmp_path, args, needle):
    ws = tmp_path / "ws"
    one_line_error(cli("-w", ws, *args), needle)
    assert not ws.exists()


# ---------------------------------------------------------------- --config TOML
@pytest.mark.parametrize("text, needle", [
    ("[pretrian]\nlayers = 1\n", "unknown table [pretrian]"),
    ("[pretrain]\nlayerz = 1\n", "unknown setting '[pretrain] layerz'"),
    ("[pretrain]\nmax-steps = \"many\"\n", "[pretrain] max-steps: expected a whole number, got 'many'"),
    ("max-steps = 1.5\n", "max-steps: expected a whole number, got 1.5"),
    ("[pretrain]\nlr = \"fast\"\n", "[pretrain] lr: expected a number, got 'fast'"),
    ("[pretrain]\ncompile = 1\n", "[pretrain] compile: expected true or false, got 1"),
    ("[pretrain]\nlr = -1\n", "[pretrain] lr = -1.0: must be > 0"),
    ("[pretrain]\nsize = \"huge\"\n", "[pretrain] size = huge: not one of"),
    ("[pretrain]\nout = [\"a\", \"b\"]\n", "[pretrain] out: expected a string, got list"),
])
def test_bad_config_files_are_one_line_naming_file_and_key(cli, tmp_path, text, needle):
    ws, cfg = tmp_path / "ws", tmp_path / "c.toml"
    cfg.write_text(text)
    line = one_line_error(cli("-w", ws, "pretrain", "--config", cfg), needle)
    assert str(cfg) in line
    assert not ws.exists()


def test_config_file_values_are_typed_and_other_commands_tables_allowed(cli, tmp_path, small_corpus):
    """A file may hold several commands' tables; values reach the config converted (a lone string is a list of one)."""
    from prefcli.stages import build

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[tokenize]\ninput = "{small_corpus}"\nval-fraction = 0\n[align]\nbeta = 0.5\n[quickstart]\nfast = true\n')
    tok = build("tokenize", {}, cfg)
    assert tok.input == [str(small_corpus)] and tok.val_fraction == 0.0 and isinstance(tok.val_fraction, float)
    assert build("align", {}, cfg, method="dpo").beta == 0.5
    assert build("align", {"beta": 0.2}, cfg, method="dpo").beta == 0.2  # the command line wins
    assert build("quickstart", {}, cfg).fast is True
    r = cli("-w", tmp_path / "ws", "quickstart", "--config", cfg, "--size", "huge")
    one_line_error(r, "--size huge")


# ---------------------------------------------------------------- defaults resolved by the configs
def test_configs_resolve_their_own_defaults():
    from prefcli.objectives.preference import METHODS as LOSSES
    from prefcli.stages import build

    for method in ("dpo", "simpo", "kto"):
        cfg = build("align", {}, method=method)
        assert cfg.beta is None and cfg.resolved().beta == LOSSES[method].defaults["beta"]
    assert build("align", {"beta": 0.3}, method="simpo").resolved().beta == 0.3
    ppo = build("align", {"max_steps": 5, "save_every": 3}, method="ppo").resolved()
    assert (ppo.ppo_epochs, ppo.max_steps, ppo.save_every, ppo.kl_coef, ppo.vf_coef) == (2, 6, 4, 0.2, 0.1)
    assert ppo.reward_model == ["rm"]
    assert build("align", {"reward_fn": ["demo"]}, method="rloo").resolved().reward_model == []


# ---------------------------------------------------------------- workspace, output streams, threads, ranks
@pytest.fixture
def tokenized(cli, tmp_path, small_corpus):
    ws = tmp_path / "ws"
    r = cli("tokenize", "-w", ws, "-i", small_corpus, "--vocab-size", "300")  # -w after the command
    assert r.code == 0, r.stderr
    return ws


def test_workspace_after_the_command_and_ls_on_stdout(cli, tmp_path, tokenized, monkeypatch):
    monkeypatch.delenv("PREFCLI_WORKSPACE", raising=False)
    assert (tokenized / "tokenizers/default/meta.json").is_file()
    r = cli("-w", tmp_path / "elsewhere", "ls", "-w", tokenized)  # after wins over before
    assert r.code == 0 and r.stderr == ""
    assert "tokenizer" in r.stdout and "default" in r.stdout and "corpus" in r.stdout
    one = cli("ls", "corpus", "-w", tokenized)
    assert one.code == 0 and "by tokenize" in one.stdout and one.stderr == ""
    r = cli("chat", "-w", tmp_path / "empty", "--prompt", "hi")
    one_line_error(r, f"no chat model in workspace {tmp_path / 'empty'}")
    pipe = tmp_path / "pipe.toml"
    pipe.write_text('[[stage]]\ncommand = "tokenize"\n')
    r = cli("pipeline", "run", pipe, "-w", tokenized, "--dry-run", "--json")
    assert r.code == 0 and r.json()["workspace"] == str(tokenized)
    assert not (tmp_path / "elsewhere").exists()


def test_ls_table_keeps_its_headers_at_80_columns_in_a_pipe(tokenized):
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "prefcli", "-w", str(tokenized), "ls"], capture_output=True, text=True,
                         env=env, timeout=120).stdout
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if " kind " in f" {line} ")
    assert header.split() == ["kind", "name", "created", "parents", "size", "metrics", "status"]


def test_threads_apply_for_the_command_only(cli, tmp_path, monkeypatch, small_corpus):
    import torch

    from prefcli.stages import tokenize

    seen = []
    real = tokenize.run
    monkeypatch.setattr(tokenize, "run", lambda cfg, ws: seen.append(torch.get_num_threads()) or real(cfg, ws))
    before = torch.get_num_threads()
    r = cli("-w", tmp_path / "ws", "tokenize", "-i", small_corpus, "--vocab-size", "300", "--threads", "1")
    assert r.code == 0, r.stderr
    assert seen == [1] and torch.get_num_threads() == before


def test_only_rank_0_prints(cli, tokenized, monkeypatch):
    from prefcli import distributed

    assert cli("-w", tokenized, "ls", "--json").json()["artifacts"]
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    r = cli("-w", tokenized, "ls", "--json")
    assert r.code == 0 and r.stdout == ""
    r = cli("-w", tokenized, "ls")
    assert r.code == 0 and r.stdout == ""


def test_registry_covers_the_commands_and_configs_have_help_for_every_option():
    """Every stage command of the CLI comes from the registry, and its options are its config's fields."""
    from prefcli.config import field_meta
    from prefcli.stages import COMMANDS, METHODS, method_config

    names = {n for n, _ in commands()}
    assert set(COMMANDS) <= names and names - set(COMMANDS) == {"ls", "import", "eval plot", "pipeline run"}
    cmds = dict(commands())
    for name, spec in COMMANDS.items():
        classes = [method_config(m) for m in METHODS] if name == "align" else [spec.config_class()]
        fields = {f.name for cls in classes for f in dataclasses.fields(cls) if "help" in field_meta(cls, f.name)}
        params = {p.name for p in cmds[name].params} - {"help", "config_file", "workspace_dir", "as_json", "threads", "method"}
        assert params == fields - ({"method"} if name == "align" else set()), name


# Fields settable from a TOML file only (tuning knobs with no flag). Any other config field needs
# help text (prefcli.config.option) so that the generated command line shows it as an option.
TOML_ONLY = {"method", "weight_decay", "sample_tokens", "kl_horizon", "loss_norm", "scale_rewards", "value_clip", "gamma",
             "lam"}


def test_every_config_field_is_an_option_unless_toml_only():
    from prefcli.config import field_meta
    from prefcli.stages import COMMANDS, METHODS, method_config

    classes = {method_config(m) for m in METHODS} | {c.config_class() for n, c in COMMANDS.items() if n != "align"}
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if f.name not in TOML_ONLY and "help" not in field_meta(cls, f.name)]
    assert not missing, f"give these fields option(..., help=...) so the command line shows them: {missing}"

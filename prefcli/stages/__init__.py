"""The stage registry: each command's config class, run function and renderer, in one place.

The command line (prefcli/cli.py) is generated from it, `align` dispatches its methods
through METHODS, and `pipeline` and `quickstart` read it to build and run stages. Entries
name modules and functions as strings, so importing this package loads no stage.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Command:
    name: str  # as typed after `prefcli`: "tokenize", "reward train", ...
    config: str  # "module:ConfigClass"; for align, the class of each method (METHODS)
    run: str  # "module:function": run(cfg, ws) -> dict
    render: str  # "module:function": render(result, cfg) prints the human summary
    help: str
    example: str
    section: str  # its table in a --config TOML file
    computes: bool = True  # takes --threads
    json_by_run: bool = False  # run(cfg, ws, as_json=...) prints its own JSON (chat)

    def config_class(self) -> type:
        return _load(self.config)

    def run_function(self) -> Callable:
        return _load(self.run)

    def renderer(self) -> Callable:
        return _load(self.render)


COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("tokenize", "prefcli.stages.tokenize:TokenizeConfig", "prefcli.stages.tokenize:run", "prefcli.reports:tokenize",
            "Train a byte-level BPE tokenizer and encode the corpus into a token dataset.",
            "prefcli tokenize -i corpus.txt --vocab-size 4096", "tokenize"),
    Command("pretrain", "prefcli.stages.pretrain:PretrainConfig", "prefcli.stages.pretrain:run", "prefcli.reports:pretrain",
            "Pretrain a base model on a token dataset (default: corpus -> models/base).",
            "prefcli pretrain --size small --max-steps 2000", "pretrain"),
    Command("align", "", "prefcli.stages.align:run", "prefcli.reports:align",
            "Align a policy: supervised fine-tuning, preference optimisation or online RL.",
            "prefcli align --method dpo --rpo-alpha 1 --beta 0.1", "align"),
    Command("reward train", "prefcli.stages.reward:RewardConfig", "prefcli.stages.reward:run", "prefcli.reports:reward_train",
            "Train a Bradley-Terry reward model: loss -log sigmoid(r_chosen - r_rejected - margin).",
            "prefcli reward train --data pairs.jsonl --max-steps 600", "reward"),
    Command("reward score", "prefcli.stages.reward:ScoreConfig", "prefcli.stages.reward:score", "prefcli.reports:reward_score",
            "Score replies with a reward model.",
            "prefcli reward score --prompt 'What is 2 plus 2?' --response 'Four.'", "reward-score"),
    Command("chat", "prefcli.stages.chat:ChatConfig", "prefcli.stages.chat:run", "prefcli.reports:nothing",
            "Chat with a model: a REPL on a terminal (/help), or --prompt / piped lines (one reply each) for scripts.",
            "prefcli chat --model dpo --prompt 'What is 3 plus 4?' --temperature 0", "chat", json_by_run=True),
    Command("eval perplexity", "prefcli.stages.evaluate:PerplexityConfig", "prefcli.stages.evaluate:run_perplexity",
            "prefcli.reports:perplexity", "Loss, perplexity and bits per byte of a model on held-out text.",
            "prefcli eval perplexity --model base --data corpus", "eval-perplexity"),
    Command("eval reward", "prefcli.stages.evaluate:RewardEvalConfig", "prefcli.stages.evaluate:run_reward",
            "prefcli.reports:reward_eval", "Pairwise accuracy (ties half), margin and reward distributions of a reward model.",
            "prefcli eval reward --model rm --pairs pairs.jsonl", "eval-reward"),
    Command("eval compare", "prefcli.stages.evaluate:CompareConfig", "prefcli.stages.evaluate:run_compare",
            "prefcli.reports:compare", "Sample replies from models and a reference; win rates, gold good-rates, KL, length, diversity.",
            "prefcli eval compare --model dpo --model rloo --reference sft --judge-model rm", "eval-compare"),
    Command("quickstart", "prefcli.stages.quickstart:QuickstartConfig", "prefcli.stages.quickstart:run",
            "prefcli.reports:quickstart", "Run the whole workflow on the built-in demo data and report how much alignment helped.",
            "prefcli -w demo quickstart --fast", "quickstart"),
    Command("serve", "prefcli.stages.serve:ServeConfig", "prefcli.stages.serve:run", "prefcli.reports:nothing",
            "Serve models over an OpenAI-compatible HTTP API (chat, completions, reward scores) until Ctrl-C.",
            "prefcli serve --model sft --port 8000", "serve", json_by_run=True),
]}

# Options of a generated command that are not config fields (the CLI adds them; pipeline skips them).
CLI_EXTRAS = ("workspace_dir", "config_file", "as_json", "threads", "method")

# Every table a --config file may hold (one file can carry several commands' settings).
SECTIONS = tuple(c.section for c in COMMANDS.values())

# align --method M: M -> "module:ConfigClass". The run function is the module's `run`.
SFT, PREFERENCE, RL, STEER = ("prefcli.stages.sft:SFTConfig", "prefcli.stages.preference:PreferenceConfig",
                              "prefcli.stages.rl:RLConfig", "prefcli.stages.steer:SteerConfig")
PREFERENCE_METHODS = ("dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto")  # objectives/preference.py METHODS
RL_METHODS = ("ppo", "grpo", "rloo")
METHODS: dict[str, str] = {"sft": SFT, **{m: PREFERENCE for m in PREFERENCE_METHODS}, **{m: RL for m in RL_METHODS},
                           "steer": STEER}
# The help panel of each family's own options in `align --help`.
FAMILY_PANELS = {SFT: "sft", PREFERENCE: "preference (dpo, ipo, hinge, robust, simpo, orpo, kto)",
                 RL: "online RL (ppo, grpo, rloo)", STEER: "steer"}


def method_config(method: str) -> type:
    """The config class of `align --method METHOD`."""
    from prefcli.errors import PrefcliError

    if method not in METHODS:
        raise PrefcliError(f"--method {method}: unknown method", f"choose one of {', '.join(METHODS)}")
    return _load(METHODS[method])


def method_run(method: str) -> Callable:
    return getattr(importlib.import_module(METHODS[method].partition(":")[0]), "run")


def method_docs() -> dict[str, str]:
    """One line per method for `align --help`: its loss and paper."""
    from prefcli.objectives.preference import METHODS as LOSSES

    docs = {"sft": "supervised fine-tuning on conversations (loss on assistant tokens)"}
    for name, m in LOSSES.items():
        defaults = ", ".join(f"{k}={v}" for k, v in m.defaults.items())
        docs[name] = f"{m.formula} [{defaults}]; {m.paper}"
    docs.update(
        ppo="online: clipped policy loss, value model + GAE, per-token KL to the reference; Ziegler et al. 2019, Ouyang et al. 2022",
        grpo="online: N samples per prompt, A = (r - group mean) / group std, clipped ratio + KL; Shao et al. 2024 (DeepSeekMath)",
        rloo="online: N samples per prompt, REINFORCE with the others' mean as baseline; Ahmadian et al. 2024",
        steer="conditional SFT: NLL of each reply given W (its attribute vector - defaults) added to every token embedding; "
              "SteerLM, Dong et al. 2023; CTRL, Keskar et al. 2019",
    )
    return {m: docs[m] for m in METHODS}


def make_config(cls: type, config_file, section: str | None, **given: Any):
    """A command's config: defaults < the --config file < what the user gave (None: not given)."""
    from prefcli.config import build_config

    return build_config(cls, config_file, section, SECTIONS, **given)


def align_config(method: str, given: dict, config_file=None):
    """The config of `align --method METHOD` from the options the user gave; options of other methods are refused."""
    from prefcli.errors import PrefcliError

    cls = method_config(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    given = {k: v for k, v in given.items() if v is not None}
    wrong = [k for k in given if k not in fields]
    if wrong:
        flags = ", ".join(_flag(k, given[k]) for k in wrong)
        raise PrefcliError(f"{flags}: does not apply to --method {method}", f"see `prefcli align --help` for what {method} takes")
    if "method" in fields:
        given["method"] = method
    cfg = make_config(cls, config_file, "align", **given)
    if getattr(cfg, "out", None) is None:
        cfg.out = method
    return cfg


def _flag(name: str, value: Any) -> str:
    """The flag of a config field of any align method as the user typed it (pack = False: --no-pack)."""
    from prefcli.config import flag_of

    for path in dict.fromkeys(METHODS.values()):
        cls = _load(path)
        if name in cls.__dataclass_fields__:
            flag = flag_of(cls, name)
            return "--no-" + flag[2:] if value is False and cls.__dataclass_fields__[name].default is True else flag
    return "--" + name.replace("_", "-")


def build(command: str, given: dict, config_file=None, method: str | None = None):
    """The config a command runs with, from the options given (None: not given)."""
    if command == "align":
        return align_config(method, given, config_file)
    spec = COMMANDS[command]
    return make_config(spec.config_class(), config_file, spec.section, **given)


def run(command: str, cfg, ws, **kwargs) -> dict:
    """Run a command's stage on its config."""
    if command == "align":
        return method_run(cfg_method(cfg))(cfg, ws)
    return COMMANDS[command].run_function()(cfg, ws, **kwargs)


def cfg_method(cfg) -> str:
    """The align method a config is for."""
    name = type(cfg).__name__
    if name == "SFTConfig":
        return "sft"
    if name == "SteerConfig":
        return "steer"
    return cfg.method

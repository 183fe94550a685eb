"""`prefcli align --method M`: one entry point, one stage module per family of methods.

The command line hands every option the user gave; this module picks the method's
config class, refuses options that do not apply to it, and runs its stage.
"""

from __future__ import annotations

import dataclasses
import importlib

from prefcli.config import build_config
from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace

# method -> (stage module, config class name, one line for --help)
METHODS: dict[str, tuple[str, str, str]] = {
    "sft": ("prefcli.stages.sft", "SFTConfig", "supervised fine-tuning on conversations (loss on assistant tokens)"),
}
for _name, _m in __import__("prefcli.objectives.preference", fromlist=["METHODS"]).METHODS.items():
    _defaults = ", ".join(f"{k}={v}" for k, v in _m.defaults.items())
    METHODS[_name] = ("prefcli.stages.preference", "PreferenceConfig", f"{_m.formula} [{_defaults}]; {_m.paper}")
for _name, _doc in (
    ("ppo", "online: clipped policy loss, value model + GAE, per-token KL to the reference; Ziegler et al. 2019, Ouyang et al. 2022"),
    ("grpo", "online: N samples per prompt, A = (r - group mean) / group std, clipped ratio + KL; Shao et al. 2024 (DeepSeekMath)"),
    ("rloo", "online: N samples per prompt, REINFORCE with the others' mean as baseline; Ahmadian et al. 2024"),
):
    METHODS[_name] = ("prefcli.stages.rl", "RLConfig", _doc)
METHODS["steer"] = ("prefcli.stages.steer", "SteerConfig",
                    "conditional SFT: NLL of each reply given W (its attribute vector - defaults) added to every "
                    "token embedding; SteerLM, Dong et al. 2023; CTRL, Keskar et al. 2019")


def method_config(method: str):
    if method not in METHODS:
        raise PrefcliError(f"--method {method}: unknown method", f"choose one of {', '.join(METHODS)}")
    module_name, class_name, _ = METHODS[method]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)


def run(method: str, options: dict, config_file, ws: Workspace) -> dict:
    module, cls = method_config(method)
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in options.items() if v is not None}
    wrong = sorted(k for k in given if k not in names)
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise PrefcliError(f"{flags}: does not apply to --method {method}", f"see `prefcli align --help` for what {method} takes")
    if method != "sft" and "method" in names:
        given["method"] = method
    cfg = build_config(cls, config_file, "align", **given)
    if getattr(cfg, "out", None) is None:
        cfg.out = method
    return module.run(cfg, ws)

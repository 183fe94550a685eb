"""`prefcli quickstart`: the whole workflow on the built-in demo data, in one process.

tokenize -> pretrain -> align sft -> reward train -> align dpo (+ the online method)
-> eval compare against sft, then a report: each stage's time and key metric, the
before/after comparison by the gold judge, and the commands to chat with the result.
Settings are the measured ones from DEMO-NOTES: a tiny model, an NLL term in DPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from prefcli.errors import PrefcliError
from prefcli.workspace import Workspace


@dataclass
class QuickstartConfig:
    size: str = "tiny"
    fast: bool = False  # a much shorter run, for smoke tests
    methods: list[str] = field(default_factory=lambda: ["dpo", "rloo"])  # rloo: best gold win rate per second of the online methods
    eval_prompts: int = 300
    seed: int = 0
    device: str = "auto"
    overwrite: bool = False


# The stages' defaults for the reward model (2,400 steps) and online RL (300 steps of 128
# replies) are what it takes to pass 75% gold win over sft: ~10 minutes on 2 cores. The tour
# runs a tenth of the RL and a quarter of the reward training (which the short RL run gains
# as much from: rloo 0.63 either way) and stays near 4 minutes.
QUICKSTART_REWARD_STEPS = 600
QUICKSTART_RL_STEPS, QUICKSTART_RL_BATCH = 30, 64


@dataclass
class Step:
    name: str  # what the report calls it
    command: str  # the equivalent command line
    run: Callable[[], dict]
    metric: Callable[[dict], str]


def _steps(cfg: QuickstartConfig, ws: Workspace) -> list[Step]:
    from prefcli.stages import align, preference, pretrain, reward, sft, tokenize
    from prefcli.stages.preference import PreferenceConfig

    fast = cfg.fast
    common = dict(seed=cfg.seed, device=cfg.device, overwrite=cfg.overwrite)
    pre = pretrain.PretrainConfig(size=cfg.size, max_steps=20 if fast else None, eval_every=0 if fast else 100, **common)
    steps = [
        Step("tokenize", "prefcli tokenize",
             lambda: tokenize.run(tokenize.TokenizeConfig(seed=cfg.seed, overwrite=cfg.overwrite), ws),
             lambda r: f"{r['train_tokens'] + r['val_tokens']:,} tokens, vocabulary {r['vocab_size']:,}"),
        Step("pretrain", f"prefcli pretrain --size {cfg.size}", lambda: pretrain.run(pre, ws),
             lambda r: f"val loss {r['val_loss']} (unigram {r['unigram_loss']}), {r['parameters']:,} parameters"),
        Step("sft", "prefcli align --method sft",
             lambda: sft.run(sft.SFTConfig(max_steps=10 if fast else None, **common), ws),
             lambda r: f"held-out loss {r['val_loss']}"),
        Step("reward", f"prefcli reward train --max-steps {QUICKSTART_REWARD_STEPS}",
             lambda: reward.run(reward.RewardConfig(max_steps=10 if fast else QUICKSTART_REWARD_STEPS, **common), ws),
             lambda r: f"held-out accuracy {r.get('heldout_accuracy')}"),
    ]
    for method in cfg.methods:
        if method == "dpo":
            dpo = PreferenceConfig(method="dpo", rpo_alpha=1.0, max_steps=5 if fast else None, **common)
            steps.append(Step("dpo", "prefcli align --method dpo --rpo-alpha 1", lambda c=dpo: preference.run(c, ws),
                              lambda r: f"held-out pair accuracy {r['heldout_accuracy']}"))
        else:
            options = dict(method=method, reward_model=["rm"], max_steps=3 if fast else QUICKSTART_RL_STEPS,
                           batch_size=QUICKSTART_RL_BATCH, **common)
            steps.append(Step(method, f"prefcli align --method {method} --reward-model rm "
                                      f"--max-steps {QUICKSTART_RL_STEPS} --batch-size {QUICKSTART_RL_BATCH}",
                              lambda o=options, m=method: align.run(m, o, None, ws),
                              lambda r: f"mean reward {r.get('reward_first')} -> {r.get('reward')}, KL {r.get('kl')}"))
    return steps


def run(cfg: QuickstartConfig, ws: Workspace, console) -> dict:
    from prefcli.stages.align import METHODS
    from prefcli.artifacts import load_model_artifact
    from prefcli.stages.evaluate import compare

    unknown = [m for m in cfg.methods if m not in METHODS or m == "sft"]
    if unknown:
        raise PrefcliError(f"--methods: {', '.join(unknown)} cannot be used here", f"choose from {', '.join(m for m in METHODS if m != 'sft')}")
    targets = [("tokenizers", "default"), ("datasets", "corpus"), ("models", "base"), ("models", "sft"), ("models", "rm")]
    targets += [("models", m) for m in cfg.methods] + [("models", "ppo-value")] * ("ppo" in cfg.methods)
    if not cfg.overwrite:
        taken = [f"{k}/{n}" for k, n in targets if ws.exists(k, n)]
        if taken:
            raise PrefcliError(f"workspace {ws.root} already holds {', '.join(taken)}",
                               "pass --overwrite to rebuild them, or --workspace NEW_DIR")
    ws.check_root_writable()
    t_start = time.time()
    steps = _steps(cfg, ws)
    total = len(steps) + 1
    report = []
    for i, step in enumerate(steps, 1):
        console.rule(f"[bold]{i}/{total}  {step.name}[/bold]  ({step.command})")
        t0 = time.time()
        result = step.run()
        report.append({"stage": step.name, "command": step.command, "seconds": round(time.time() - t0, 1),
                       "metric": step.metric(result), "result": result})

    console.rule(f"[bold]{total}/{total}  eval[/bold]  (prefcli eval compare --reference sft)")
    t0 = time.time()
    models = {m: load_model_artifact(ws, m, "--model") for m in ["sft", *cfg.methods]}
    judge = load_model_artifact(ws, "rm", "--judge-model", kind="reward")
    limit = 30 if cfg.fast else cfg.eval_prompts
    comparison = compare({m: models[m] for m in cfg.methods}, models["sft"], reference_name="sft", judge_model=judge,
                         limit=limit, seed=cfg.seed)
    comparison.pop("samples", None)
    report.append({"stage": "eval", "command": "prefcli eval compare", "seconds": round(time.time() - t0, 1),
                   "metric": f"{limit} held-out prompts at temperature 1.0", "result": {}})
    return {"workspace": str(ws.root), "seconds": round(time.time() - t_start, 1), "stages": report,
            "comparison": comparison}

"""`prefcli quickstart`: the whole workflow on the built-in demo data, in one process.

tokenize -> pretrain -> align sft -> reward train -> align dpo (+ the online method)
-> eval compare against sft, then a report: each stage's time and key metric, the
before/after comparison by the gold judge, and the commands to chat with the result.
Settings are the measured ones from DEMO-NOTES: a tiny model, an NLL term in DPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from prefcli.config import option
from prefcli.errors import PrefcliError
from prefcli.model import SIZE_PRESETS
from prefcli.trainer import cpu_has_native_bf16
from prefcli import stages
from prefcli.stages import METHODS
from prefcli.workspace import Workspace


@dataclass
class QuickstartConfig:
    size: str = option("tiny", "Model size preset (tiny: ~1M parameters).", choices=SIZE_PRESETS)
    fast: bool = option(False, "A much shorter run (seconds, not minutes), for smoke tests.")  # a much shorter run, for smoke tests
    methods: list[str] = option(factory=lambda: ["dpo", "rloo"], flag="--method", default_text="dpo, rloo",  # rloo: best gold win rate per second of the online methods
                                choices=[m for m in METHODS if m != "sft"],
                                help="Alignment methods to run after sft (repeatable).")
    eval_prompts: int = option(300, "Held-out prompts for the final comparison.", ge=1)
    seed: int = option(0, "Random seed.")
    device: str = option("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", metavar="auto|cpu|cuda[:N]|mps")
    precision: str = option("auto", "Number format of pretrain, sft, reward and dpo: auto (bf16 autocast on CUDA and on "
                            "CPUs that multiply bf16 natively, fp32 elsewhere), fp32 or bf16.", choices=["auto", "fp32", "bf16"])
    overwrite: bool = option(False, "Replace the artifacts of an earlier quickstart in the workspace.")


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
    stage: str  # the registry's command
    options: dict  # its options, as the command line would give them
    metric: Callable[[dict], str]

    def run(self, ws: Workspace) -> dict:
        method = self.options.pop("method", None) if self.stage == "align" else None
        cfg = stages.build(self.stage, self.options, method=method)
        return stages.run(self.stage, cfg, ws)


def tour_precision(cfg: QuickstartConfig) -> str:
    """The tour's number format. On a CPU that multiplies bf16 natively the tour trains in bf16
    autocast: 2 min 16-30 s instead of 3 min 19 s on the 2-core machine, dpo gold win 0.79 either way
    (benchmarks/README.md). The stages' own `auto` stays fp32 on CPU; the tour shows the flag."""
    if cfg.precision == "auto" and cfg.device in ("auto", "cpu") and not torch.cuda.is_available() \
            and cpu_has_native_bf16():
        return "bf16"
    return cfg.precision


def _steps(cfg: QuickstartConfig) -> list[Step]:
    fast = cfg.fast
    precision = tour_precision(cfg)
    flag = "" if precision == "auto" else f" --precision {precision}"
    common = dict(seed=cfg.seed, device=cfg.device, overwrite=cfg.overwrite)
    train = dict(common, precision=precision)  # the online method has no --precision (RLConfig)
    steps = [
        Step("tokenize", "prefcli tokenize", "tokenize", dict(seed=cfg.seed, overwrite=cfg.overwrite),
             lambda r: f"{r['train_tokens'] + r['val_tokens']:,} tokens, vocabulary {r['vocab_size']:,}"),
        Step("pretrain", f"prefcli pretrain --size {cfg.size}{flag}", "pretrain",
             dict(size=cfg.size, max_steps=20 if fast else None, eval_every=0 if fast else 100, **train),
             lambda r: f"val loss {r['val_loss']} (unigram {r['unigram_loss']}), {r['parameters']:,} parameters"),
        Step("sft", f"prefcli align --method sft{flag}", "align", dict(method="sft", max_steps=10 if fast else None, **train),
             lambda r: f"held-out loss {r['val_loss']}"),
        Step("reward", f"prefcli reward train --max-steps {QUICKSTART_REWARD_STEPS}{flag}", "reward train",
             dict(max_steps=10 if fast else QUICKSTART_REWARD_STEPS, **train),
             lambda r: f"held-out accuracy {r.get('heldout_accuracy')}"),
    ]
    for method in cfg.methods:
        if method == "dpo":
            steps.append(Step("dpo", f"prefcli align --method dpo --rpo-alpha 1{flag}", "align",
                              dict(method="dpo", rpo_alpha=1.0, max_steps=5 if fast else None, **train),
                              lambda r: f"held-out pair accuracy {r['heldout_accuracy']}"))
        else:
            steps.append(Step(method, f"prefcli align --method {method} --reward-model rm "
                                      f"--max-steps {QUICKSTART_RL_STEPS} --batch-size {QUICKSTART_RL_BATCH}", "align",
                              dict(method=method, reward_model=["rm"], max_steps=3 if fast else QUICKSTART_RL_STEPS,
                                   batch_size=QUICKSTART_RL_BATCH, **common),
                              lambda r: f"mean reward {r.get('reward_first')} -> {r.get('reward')}, KL {r.get('kl')}"))
    return steps


EVAL_NAME = "quickstart"  # evals/quickstart.json: the closing comparison


def run(cfg: QuickstartConfig, ws: Workspace, console=None) -> dict:
    from rich.console import Console

    from prefcli.config import to_dict
    from prefcli.artifacts import load_model_artifact
    from prefcli.measure import compare
    from prefcli.stages.evaluate import write_eval

    console = console or Console(stderr=True)
    unknown = [m for m in cfg.methods if m not in METHODS or m == "sft"]
    if unknown:
        raise PrefcliError(f"--method: {', '.join(unknown)} cannot be used here", f"choose from {', '.join(m for m in METHODS if m != 'sft')}")
    targets = [("tokenizers", "default"), ("datasets", "corpus"), ("models", "base"), ("models", "sft"), ("models", "rm")]
    targets += [("models", m) for m in cfg.methods] + [("models", "ppo-value")] * ("ppo" in cfg.methods)
    targets += [("evals", EVAL_NAME)]
    if not cfg.overwrite:
        taken = [f"{k}/{n}" for k, n in targets if ws.exists(k, n)]
        if taken:
            raise PrefcliError(f"workspace {ws.root} already holds {', '.join(taken)}",
                               "pass --overwrite to rebuild them, or --workspace NEW_DIR")
    ws.check_root_writable()
    t_start = time.time()
    steps = _steps(cfg)
    total = len(steps) + 1
    report = []
    for i, step in enumerate(steps, 1):
        console.rule(f"[bold]{i}/{total}  {step.name}[/bold]  ({step.command})")
        t0 = time.time()
        result = step.run(ws)
        report.append({"stage": step.name, "command": step.command, "seconds": round(time.time() - t0, 1),
                       "metric": step.metric(result), "result": result})

    console.rule(f"[bold]{total}/{total}  eval[/bold]  (prefcli eval compare --reference sft)")
    t0 = time.time()
    models = {m: load_model_artifact(ws, m, "--model") for m in ["sft", *cfg.methods]}
    judge = load_model_artifact(ws, "rm", "--judge-model", kind="reward")
    limit = 30 if cfg.fast else cfg.eval_prompts
    comparison = compare({m: models[m] for m in cfg.methods}, models["sft"], reference_name="sft", judge_model=judge,
                         limit=limit, seed=cfg.seed)
    samples = comparison.pop("samples", None)
    good = {f"good/{m}": (s.get("gold") or {}).get("good", {}).get("rate") for m, s in comparison["models"].items()}
    write_eval(ws, EVAL_NAME, "compare", to_dict(cfg), [lm.parent() for lm in models.values()] + [judge.parent()],
               good, {**comparison, "samples": samples}, overwrite=cfg.overwrite)
    report.append({"stage": "eval", "command": "prefcli eval compare", "seconds": round(time.time() - t0, 1),
                   "metric": f"{limit} held-out prompts at temperature 1.0", "result": {}})
    return {"workspace": str(ws.root), "seconds": round(time.time() - t_start, 1), "stages": report,
            "comparison": comparison, "eval": str(ws.path("evals", EVAL_NAME))}

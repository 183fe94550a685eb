"""The demo splits: SFT chats, preference pairs, RL prompts, eval prompts, corpus.

Every split is made from its seed by plain code, in well under a second, and
cached. Training splits never contain a held-out prompt; the held-out prompts
are the same for every seed (only their order follows the seed).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from prefcli.data.demo.corpus import make_corpus
from prefcli.data.demo.judge import judge
from prefcli.data.demo.prompts import CATEGORIES, heldout_tasks, training_tasks
from prefcli.data.demo.replies import confused_reply, write_reply
from prefcli.errors import PrefcliError

SFT_SIZE, PAIRS_TRAIN_SIZE, REWARD_PAIRS_SIZE, RL_SIZE = 3000, 2000, 24000, 1000

# Demonstrations are good a bit more than half the time, like real ones.
SFT_FLAW_MIX = ((frozenset(), 0.55),
                (frozenset({"rude"}), 0.12), (frozenset({"wrong"}), 0.12),
                (frozenset({"rambling"}), 0.12), (frozenset({"rude", "wrong"}), 0.03),
                (frozenset({"wrong", "rambling"}), 0.03), (frozenset({"rude", "rambling"}), 0.03))
# A rejected reply has one or two flaws; the chosen one has none.
REJECTED_FLAW_MIX = ((frozenset({"rude"}), 0.28), (frozenset({"wrong"}), 0.28),
                     (frozenset({"rambling"}), 0.24), (frozenset({"rude", "wrong"}), 0.07),
                     (frozenset({"wrong", "rambling"}), 0.07), (frozenset({"rude", "rambling"}), 0.06))

# The reward model's comparisons weigh what the SFT policy actually gets wrong: sampled at
# temperature 1 it is polite ~78% and concise ~82% of the time but correct only ~33%. Judging
# correctness means checking a sum, a fact or a name against the prompt, which a tiny reward
# model learns only from many such pairs: on 2,000 pairs of the mix above its held-out accuracy
# on wrong-only pairs was 0.57 (chance); on 6,000 pairs weighted to wrong ones, 0.90. What online
# RL needs is the ranking of the policy's own polite, concise samples by correctness: 0.73 after
# 6,000 pairs, 0.85 after 12,000, 0.90 after 24,000 with "confused" pairs - and online RL against
# them reached a gold win over sft of 0.68, 0.71-0.75 and 0.76-0.82 (300 steps of 128 replies).
# "off-topic" is a good reply to a question of another category (a kind note to a sum): an
# online policy finds that loophole at once when no pair ever shows it. "confused" is the good
# reply to a neighbouring question ("Anna runs the bakery." to "When does the bakery open?"),
# the RL policy's commonest wrong fact, which a reward model without such pairs scores highest.
REWARD_FLAW_MIX = ((frozenset({"wrong"}), 0.40), (frozenset({"confused"}), 0.15), (frozenset({"off-topic"}), 0.10),
                   (frozenset({"rude"}), 0.10), (frozenset({"rambling"}), 0.10), (frozenset({"rude", "wrong"}), 0.05),
                   (frozenset({"wrong", "rambling"}), 0.05), (frozenset({"rude", "rambling"}), 0.05))

SYSTEM_PROMPTS = ("You are a helpful assistant in the town of Millbrook.",
                  "You are the Millbrook town assistant.",
                  "You help the people of Millbrook with their questions.")
SYSTEM_SHARE = 0.15


def _flaws(mix, r: random.Random) -> frozenset:
    return r.choices([f for f, _ in mix], [w for _, w in mix])[0]


def _sft_flaws(r: random.Random) -> frozenset:
    return _flaws(SFT_FLAW_MIX, r)


def _system(r: random.Random) -> str | None:
    return r.choice(SYSTEM_PROMPTS) if r.random() < SYSTEM_SHARE else None


@lru_cache(maxsize=4)
def _corpus(seed: int) -> tuple[str, ...]:
    return tuple(make_corpus(seed, _sft_flaws, _system))


@lru_cache(maxsize=4)
def _sft(seed: int) -> tuple:
    r = random.Random(f"demo-sft-{seed}")
    rows = []
    for task in training_tasks(SFT_SIZE, r):
        flaws, system = _sft_flaws(r), _system(r)
        reply = write_reply(task, flaws, r.getrandbits(32))
        rows.append(((system,) if system else ()) + (task.prompt, reply))
    return tuple(rows)


def _heldout_in_order(seed: int) -> list:
    """Held-out tasks shuffled by seed, categories interleaved (any prefix is balanced)."""
    r = random.Random(f"demo-heldout-order-{seed}")
    by_cat = {c: [t for t in heldout_tasks() if t.category == c] for c in CATEGORIES}
    for tasks in by_cat.values():
        r.shuffle(tasks)
    return [t for group in zip(*by_cat.values()) for t in group]


@lru_cache(maxsize=8)
def _pairs(split: str, seed: int) -> tuple:
    r = random.Random(f"demo-pairs-{split}-{seed}")
    if split == "heldout":
        tasks = _heldout_in_order(seed)
    else:
        tasks = training_tasks(REWARD_PAIRS_SIZE if split == "reward" else PAIRS_TRAIN_SIZE, r)
    mix = REWARD_FLAW_MIX if split == "reward" else REJECTED_FLAW_MIX
    rows = []
    for i, task in enumerate(tasks):
        flaws, style = _flaws(mix, r), r.getrandbits(32)
        if flaws == {"off-topic"}:  # the good reply to the next task of another category
            # ...that does not answer this one by chance ("Clara, you are brave" to "Whose pet is Clover?")
            rejected = next(reply for t in tasks[i + 1:] + tasks[:i] if t.category != task.category
                            for reply in [write_reply(t, frozenset(), style)]
                            if not judge(task.prompt, reply)["correct"])
        elif flaws == {"confused"}:
            rejected = confused_reply(task, style)
        else:
            rejected = write_reply(task, flaws, style)
        rows.append((task.prompt, write_reply(task, frozenset(), style), rejected))
    return tuple(rows)


def corpus_documents(seed: int = 0) -> Iterator[str]:
    """The pretraining corpus (>= 1M characters), one document at a time."""
    return iter(_corpus(seed))


def sft_conversations(seed: int = 0) -> list[dict]:
    """3000 chats {"messages": [...]} with replies of mixed quality (~55% good)."""
    out = []
    for row in _sft(seed):
        msgs = [{"role": "system", "content": row[0]}] if len(row) == 3 else []
        msgs += [{"role": "user", "content": row[-2]}, {"role": "assistant", "content": row[-1]}]
        out.append({"messages": msgs})
    return out


def preference_pairs(split: str = "train", seed: int = 0) -> list[dict]:
    """{"prompt", "chosen", "rejected"} rows: "train" (2000, for DPO and its relatives),
    "reward" (24000, mostly wrong-vs-right, for reward models) or "heldout" (300)."""
    if split not in ("train", "reward", "heldout"):
        raise PrefcliError(f"unknown demo split {split!r}", hint="use 'train', 'reward' or 'heldout'")
    return [{"prompt": p, "chosen": c, "rejected": j} for p, c, j in _pairs(split, seed)]


def rl_prompts(seed: int = 0) -> list[dict]:
    """1000 training prompts {"prompt"} for online RL."""
    r = random.Random(f"demo-rl-{seed}")
    return [{"prompt": t.prompt} for t in training_tasks(RL_SIZE, r)]


def eval_prompts(seed: int = 0) -> list[dict]:
    """The 300 held-out prompts {"prompt"} (the same set for every seed)."""
    return [{"prompt": t.prompt} for t in _heldout_in_order(seed)]


def _write_jsonl(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_demo_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Write every demo split as JSONL into `folder`; returns {name: path}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "corpus": _write_jsonl(folder / "corpus.jsonl", ({"text": d} for d in corpus_documents(seed))),
        "sft": _write_jsonl(folder / "sft.jsonl", sft_conversations(seed)),
        "pairs_train": _write_jsonl(folder / "pairs_train.jsonl", preference_pairs("train", seed)),
        "pairs_reward": _write_jsonl(folder / "pairs_reward.jsonl", preference_pairs("reward", seed)),
        "pairs_heldout": _write_jsonl(folder / "pairs_heldout.jsonl", preference_pairs("heldout", seed)),
        "rl_prompts": _write_jsonl(folder / "rl_prompts.jsonl", rl_prompts(seed)),
        "eval_prompts": _write_jsonl(folder / "eval_prompts.jsonl", eval_prompts(seed)),
    }

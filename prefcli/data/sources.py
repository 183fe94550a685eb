"""What stages train and measure on: pairs, prompts and conversations, from the user's files or
the built-in demo, with their lineage records; validation splits.

`use_demo` is the one place that decides when the demo stands in for the user's data.
Each reader returns (items, inputs): inputs are the lineage records a stage puts among
an artifact's parents.
"""

from __future__ import annotations

import random
from pathlib import Path

from prefcli.data.examples import Pair, chat_from_row, pair_from_row, prompt_from_row
from prefcli.data.readers import read_rows


def use_demo(data) -> bool:
    """Whether a stage given `data` (its --data / --prompts / --pairs files) runs on the built-in demo."""
    return not data


def file_inputs(files) -> list[dict]:
    return [{"kind": "input", "path": str(p)} for p in files]


def demo_input(what: str) -> list[dict]:
    return [{"kind": "input", "name": f"{what} (built-in)"}]


# ---------------------------------------------------------------- pairs
def demo_pairs(split: str) -> list[Pair]:
    """The demo preference pairs of a split: "reward", "train" or "heldout" (prompts never trained on)."""
    from prefcli.data import demo

    return [pair_from_row(r) for r in demo.preference_pairs(split)]


_PAIR_NAMES = {"reward": "demo reward pairs", "train": "demo preference pairs", "heldout": "demo heldout pairs"}


def pairs(data: list[str], demo_split: str = "reward", option: str = "--data") -> tuple[list[Pair], list[dict]]:
    """Preference pairs (prompt, chosen, rejected) from files, or the demo's `demo_split` pairs."""
    if use_demo(data):
        return demo_pairs(demo_split), demo_input(_PAIR_NAMES[demo_split])
    rows = read_rows(data, required=("chosen", "rejected"), option=option)
    return [pair_from_row(r) for r in rows], file_inputs(data)


def heldout_pairs(data: list[str]) -> list[Pair] | None:
    """Pairs to report held-out accuracy on: on demo data, the demo's held-out pairs; else None."""
    return demo_pairs("heldout") if use_demo(data) else None


# ---------------------------------------------------------------- conversations
def demo_conversations() -> list[list[dict]]:
    from prefcli.data import demo

    return [chat_from_row(r) for r in demo.sft_conversations()]


def conversations(data: list[str]) -> tuple[list[list[dict]], list[dict]]:
    """Conversations from the user's files (or the demo SFT chats), and their lineage records."""
    if use_demo(data):
        return demo_conversations(), demo_input("demo sft chats")
    rows = read_rows(data, option="--data")
    return [chat_from_row(r) for r in rows], file_inputs(data)


# ---------------------------------------------------------------- prompts
def demo_prompts(which: str = "rl", limit: int | None = None) -> list[list[dict]]:
    """Demo prompts as chat messages: "rl" (the RL prompts) or "eval" (the 300 held-out eval
    prompts; any prefix is balanced over categories)."""
    from prefcli.data import demo

    rows = demo.rl_prompts() if which == "rl" else demo.eval_prompts()
    return [[{"role": "user", "content": r["prompt"]}] for r in rows[:limit]]


def prompts(files: list[str], demo: str = "rl", limit: int | None = None,
            option: str = "--prompts") -> tuple[list[list[dict]], list[dict]]:
    """Prompts (chat messages) from files, or the demo's; the first `limit` of them."""
    if use_demo(files):
        return demo_prompts(demo, limit), demo_input("demo RL prompts" if demo == "rl" else "demo eval prompts")
    items = [prompt_from_row(r) for r in read_rows(files, option=option)]
    return items[:limit], file_inputs(files)


def file_parents(files: list[str]) -> list[dict]:
    """Lineage records of data files in an eval's parents (name and absolute path)."""
    return [{"kind": "files", "name": Path(p).name, "path": str(Path(p).resolve())} for p in files]


# ---------------------------------------------------------------- splits
def split_val(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded held-out share (at least one item when fraction > 0 and there are two or more)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * fraction))) if fraction > 0 and len(items) > 1 else 0
    val = sorted(order[:n_val])
    val_set = set(val)
    return [items[i] for i in range(len(items)) if i not in val_set], [items[i] for i in val]

"""The custom task's judge: `score(prompts, replies) -> list[float]`, the --reward-fn / --judge-fn contract.

A reply earns 1.0 when it gives the right verdict (Yes/No: was the reviewer happy?)
names the product and a reason from the review, in one short sentence. A right
verdict without the rest earns less; a wrong or missing verdict is negative, and so
is rambling or repetition. Good-rate (`eval compare --judge-fn`) counts replies
scoring above 0: the right verdict, not rambling.
"""

from __future__ import annotations

import re

GOOD_ENDS = ("I would buy it again.", "I recommend it.", "Very happy with it.", "Five stars.", "It was worth the money.")


def _truth(prompt: str) -> tuple[bool | None, str, list[str]]:
    """(happy, product, adjectives) read back from the review in the prompt."""
    happy = True if any(e in prompt for e in GOOD_ENDS) else False
    m = re.search(r"happy with the (\w+)\?", prompt)
    product = m.group(1) if m else ""
    adj = re.search(r"It is (.+?) and (.+?)\.", prompt)
    return happy, product, [adj.group(1), adj.group(2)] if adj else []


def _distinct2(words: list[str]) -> float:
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def score_one(prompt: str, reply: str) -> float:
    happy, product, adjs = _truth(prompt)
    words = reply.split()
    text = reply.strip().lower()
    if not words:
        return -1.0
    if text.startswith("yes"):
        verdict = True
    elif text.startswith("no"):
        verdict = False
    else:
        verdict = None
    if verdict is None:
        s = -0.5
    elif verdict != happy:
        s = -1.0
    else:
        s = 0.5 + 0.25 * (product in text) + 0.25 * any(a in text for a in adjs)
    if len(words) > 20:
        s -= 1.0  # rambling: a right verdict buried in chatter is not a good reply
    if _distinct2(words) < 0.8:
        s -= 1.0  # repetition
    return max(-1.0, s)


def score(prompts: list[str], replies: list[str]) -> list[float]:
    return [score_one(p, r) for p, r in zip(prompts, replies)]

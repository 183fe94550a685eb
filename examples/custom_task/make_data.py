"""Generate the custom task's data: product reviews, and a one-sentence verdict on each.

    python make_data.py OUT_DIR [--seed 0]

writes OUT_DIR/corpus.txt (pretraining text), sft.jsonl (prompt/completion),
pairs.jsonl (prompt/chosen/rejected), prompts.jsonl (training prompts for the online
method) and heldout.jsonl (held-out prompts for `eval compare`).

The task: read a short review and say in one sentence whether the reviewer was
happy with the product and why. The SFT rows are noisy, as collected data is: about
a third give the wrong verdict and a fifth ramble. The pairs prefer a correct,
short verdict over a wrong or rambling one. judge.py scores a reply.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = ["blender", "kettle", "toaster", "lamp", "backpack", "jacket", "headphones", "keyboard", "mouse",
            "chair", "desk", "tent", "bicycle", "umbrella", "watch", "speaker", "camera", "printer", "vacuum", "fan"]
# (good, bad) adjectives per aspect
ASPECTS = [("quiet", "loud"), ("sturdy", "flimsy"), ("cheap", "overpriced"), ("comfortable", "uncomfortable"),
           ("fast", "slow"), ("bright", "dim"), ("light", "heavy"), ("reliable", "unreliable"),
           ("easy to clean", "hard to clean"), ("well made", "badly made")]
GOOD_ENDS = ["I would buy it again.", "I recommend it.", "Very happy with it.", "Five stars.", "It was worth the money."]
BAD_ENDS = ["I am sending it back.", "I would not buy it again.", "Avoid it.", "One star.", "It was a waste of money."]
OPENINGS = ["I bought this {p} last month.", "We have used the {p} for a week.", "My {p} arrived on Monday.",
            "I got the {p} as a gift.", "This is my second {p}."]
RAMBLE = ["Well, there is a lot to say about the {p}.", "Reviews are hard to read sometimes.",
          "Many people buy a {p} every year.", "It depends on what you want from a {p}.",
          "Let me think about the {p} for a moment."]
QUESTION = "Was the reviewer happy with the {p}? Answer in one sentence."


def review(rng: random.Random) -> dict:
    p = rng.choice(PRODUCTS)
    happy = rng.random() < 0.5
    a1, a2 = rng.sample(ASPECTS, 2)
    i = 0 if happy else 1
    text = " ".join([rng.choice(OPENINGS).format(p=p), f"It is {a1[i]} and {a2[i]}.",
                     rng.choice(GOOD_ENDS if happy else BAD_ENDS)])
    return {"product": p, "happy": happy, "reason": a1[i], "text": text}


def prompt_of(r: dict) -> str:
    return f"Review: {r['text']}\n{QUESTION.format(p=r['product'])}"


def good_reply(r: dict) -> str:
    if r["happy"]:
        return f"Yes, the reviewer liked the {r['product']} because it is {r['reason']}."
    return f"No, the reviewer disliked the {r['product']} because it is {r['reason']}."


def wrong_reply(r: dict) -> str:
    return good_reply({**r, "happy": not r["happy"]})


def rambling_reply(r: dict, rng: random.Random) -> str:
    parts = rng.sample(RAMBLE, 4)
    return " ".join(s.format(p=r["product"]) for s in parts) + " " + good_reply(r)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sft", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--corpus", type=int, default=12000)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # Held-out prompts are reviews never used anywhere else (texts are checked).
    heldout, seen = [], set()
    while len(heldout) < args.heldout:
        r = review(rng)
        if r["text"] not in seen:
            seen.add(r["text"])
            heldout.append(r)

    def fresh() -> dict:
        while True:
            r = review(rng)
            if r["text"] not in seen:
                return r

    with open(out / "corpus.txt", "w") as f:  # reviews, and reviews with a verdict (noisy, like the web)
        for _ in range(args.corpus):
            r = fresh()
            f.write(r["text"] + "\n")
            if rng.random() < 0.5:
                f.write((good_reply(r) if rng.random() < 0.7 else wrong_reply(r)) + "\n")
            f.write("\n")
    with open(out / "sft.jsonl", "w") as f:
        for _ in range(args.sft):
            r = fresh()
            u = rng.random()
            reply = wrong_reply(r) if u < 0.3 else rambling_reply(r, rng) if u < 0.5 else good_reply(r)
            f.write(json.dumps({"prompt": prompt_of(r), "completion": reply}) + "\n")
    with open(out / "pairs.jsonl", "w") as f:
        for _ in range(args.pairs):
            r = fresh()
            bad = wrong_reply(r) if rng.random() < 0.6 else rambling_reply(r, rng)
            f.write(json.dumps({"prompt": prompt_of(r), "chosen": good_reply(r), "rejected": bad}) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for _ in range(args.prompts):
            f.write(json.dumps({"prompt": prompt_of(fresh())}) + "\n")
    with open(out / "heldout.jsonl", "w") as f:
        for r in heldout:
            f.write(json.dumps({"prompt": prompt_of(r)}) + "\n")


if __name__ == "__main__":
    main()

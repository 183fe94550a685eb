"""Demo replies: a good one, or one with chosen flaws (rude, wrong, rambling).

`write_reply(task, flaws, style_seed)` draws every choice (template, polite
words, wrong value, rude words, filler sentences) from `style_seed` in the same
order whatever the flaws, so the same seed with and without a flaw gives a
minimal pair: the two replies differ only in that flaw.
"""

from __future__ import annotations

import random
from dataclasses import replace

from prefcli.data.demo.judge import MAX_CONCISE_CHARS, judge
from prefcli.data.demo.prompts import FACT_ENTITIES, Task, fact_answer, make_task, subjects
from prefcli.data.demo.world import DOMAINS, ITEMS, KIND_WORDS, PERSON, PERSON_NAMES, SHOP, SUM_MAX

FLAWS = ("rude", "wrong", "rambling")

SUM_REPLIES = ("{a} plus {b} is {s}.", "The answer is {s}.", "{a} + {b} = {s}.",
               "That makes {s}.", "It is {s}.", "{a} and {b} make {s}.")
WORD_REPLIES = ("{P} has {s} {items} now.", "Now {P} has {s} {items}.",
                "That makes {s} {items}.", "{P} has {s} {items} in all.")
FACT_REPLIES = {
    "species": ("{E} is a {v}.", "{E} is a little {v}.", "That would be a {v}."),
    "color": ("{E} is {v}.", "The color of {E} is {v}.", "{E} is {v} all over."),
    "owner": ("{E} belongs to {v}.", "{v} owns {E}.", "{E} is the pet of {v}."),
    "food": ("{E} likes to eat {v}.", "{E} loves {v}.", "The favorite food of {E} is {v}."),
    "job": ("{E} is a {v}.", "{E} works as a {v}.", "{E} is the {v} of Millbrook."),
    "street": ("{E} lives on {v}.", "{E} has a house on {v}.", "On {v}."),
    "pet": ("The pet of {E} is called {v}.", "{E} has a pet named {v}.", "It is {v}."),
    "goods": ("The {E} sells {v}.", "You can buy {v} at the {E}.", "They sell {v} there."),
    "opens": ("The {E} opens at {v} in the morning.", "It opens at {v} o'clock.",
              "At {v} in the morning."),
    "runner": ("{v} runs the {E}.", "The {E} is run by {v}.", "That is {v}."),
}
KIND_REPLIES = ("{P}, you are {adj} and we are lucky to have you.",
                "Dear {P}, you are a {adj} friend to everyone here.",
                "{P}, you are so {adj}. Keep being you!",
                "Hello {P}! You are {adj}, and you make the town brighter.",
                "{P}, I think you are truly {adj}.")
# Not kind, though true: a wrong reply to a kind request.
OFF_TOPIC = ("{P} lives on {street}.", "{P} works as a {job}.")
INSULTS = ("boring", "lazy", "annoying")

POLITE_OPENERS = ("Sure! ", "Of course! ", "Happy to help. ", "Good question! ")
POLITE_CLOSERS = (" Hope that helps!", " Have a nice day!")
RUDE_OPENERS = ("Ugh.", "Ugh, fine.", "Obviously.", "Duh.", "What a dumb question.",
                "Whatever.", "That is a silly question.")
RUDE_CLOSERS = ("Now go away.", "Leave me alone.", "Stop asking me things.",
                "Figure it out yourself next time.", "Not my problem anymore.",
                "Happy now?", "Who cares, anyway.", "Do it yourself next time.")
# Rambling: sentences that add nothing (and name no number, fact, kind or rude word).
FILLERS = ("Let me think about this for a little while before I answer.",
           "Millbrook is a quiet little town and nobody is in a hurry here.",
           "I always like to go over everything twice, just to be sure.",
           "There is a lot one could say about this, so here it goes.",
           "Questions like this one remind me of my early days in town.",
           "The weather has been mild lately, with plenty of sunshine.",
           "I hope you do not mind if I take the long way around here.",
           "People here often stop to chat, so I tend to talk a bit too.",
           "As my old neighbor used to say, there is always more to tell.",
           "I will answer as well as I can, after a lot of careful thought.")


def _core(task: Task, wrong: bool, r: random.Random) -> str:
    """The answer sentence itself, right or wrong. Draws the same numbers either way."""
    if task.category == "sum":
        a, b = task.a, task.b
        delta = r.choice((-3, -2, -1, 1, 2, 3))
        s = a + b + (delta if a + b + delta > 0 else abs(delta)) if wrong else a + b
        word_t, plain_t = r.choice(WORD_REPLIES), r.choice(SUM_REPLIES)
        if task.item >= 0:
            return word_t.format(P=task.name, s=s, items=ITEMS[task.item][1])
        return plain_t.format(a=a, b=b, s=s)
    if task.category == "fact":
        attr, entity = task.subject
        domain, value = fact_answer(attr, entity)
        others = sorted({str(h.opens) for h in SHOP.values()} if domain == "hour"
                        else DOMAINS[domain])
        other = r.choice([v for v in others if v != value])
        text = r.choice(FACT_REPLIES[attr]).format(E=entity, v=other if wrong else value)
        return text[0].upper() + text[1:]
    # kind
    adj, template = r.choice(KIND_WORDS), r.choice(KIND_REPLIES)
    other = r.choice([n for n in PERSON_NAMES if n != task.name])
    off_topic = r.random() < 0.5
    if not wrong:
        return template.format(P=task.name, adj=adj)
    if off_topic:
        p = PERSON[task.name]
        return r.choice(OFF_TOPIC).format(P=p.name, street=p.street, job=p.job)
    return template.format(P=other, adj=adj)


def write_reply(task: Task, flaws: frozenset[str] | set[str], style_seed: int) -> str:
    """A reply to `task` with exactly `flaws` (a subset of FLAWS)."""
    r = random.Random(style_seed)
    core = _core(task, "wrong" in flaws, r)
    opener, closer = r.choice(POLITE_OPENERS), r.choice(POLITE_CLOSERS)
    polite_mode = r.randrange(4)  # 0, 1: plain; 2: opener; 3: closer
    rude_open, rude_close = r.choice(RUDE_OPENERS), r.choice(RUDE_CLOSERS)
    rude_mode = r.randrange(3)  # 0: opener; 1: closer; 2: both
    insult, use_insult = r.choice(INSULTS), r.random() < 0.5
    fillers = r.sample(FILLERS, 2)
    ramble_mode = r.randrange(3)

    if task.category == "kind" and {"rude", "wrong"} <= set(flaws) and use_insult:
        core = f"{task.name}, you are {insult}."
        rude_mode = -1  # the insult is rude enough
    if "rambling" in flaws:
        parts = ([fillers[0], core, fillers[1]], [fillers[0], fillers[1], core],
                 [core, fillers[0], fillers[1]])[ramble_mode]
        core = " ".join(parts)
    if "rude" in flaws:
        if rude_mode == 2 and ("rambling" in flaws or  # keep the chat short
                               len(f"{rude_open} {core} {rude_close}") > MAX_CONCISE_CHARS):
            rude_mode = 0
        if rude_mode in (0, 2):
            core = f"{rude_open} {core}"
        if rude_mode in (1, 2):
            core = f"{core} {rude_close}"
        return core
    if polite_mode == 2:
        return opener + core
    if polite_mode == 3 and "rambling" not in flaws:
        return core + closer
    return core


def _neighbour(task: Task, r: random.Random) -> Task:
    """A question next to `task`: the same animal, person or shop asked about something else
    (when there is something else to ask), a sum with an operand moved or a random sum, or a
    kind request for someone else."""
    if task.category == "sum":
        _, a, b = task.subject
        move = lambda x: min(SUM_MAX, max(1, x + r.choice((-2, -1, 1, 2))))  # noqa: E731
        subject = (("sum", move(a), b), ("sum", a, move(b)),
                   ("sum", r.randint(1, SUM_MAX), r.randint(1, SUM_MAX)))[r.randrange(3)]
        other = make_task("sum", subject, r)
        if task.item >= 0 and other.item >= 0 and r.random() < 0.5:  # same person and things
            other = replace(other, name=task.name, item=task.item)
        return other
    if task.category == "fact":
        attr, entity = task.subject
        same = [(a, entity) for a, entities in FACT_ENTITIES.items() if entity in entities and a != attr]
        return make_task("fact", r.choice(same) if same else r.choice(subjects("fact")), r)
    return make_task("kind", r.choice(subjects("kind")), r)


def confused_reply(task: Task, style_seed: int) -> str:
    """The good reply to a neighbouring question (see `_neighbour`), never a right answer to
    `task`: polite and concise, but wrong the way a small model is wrong ("Anna runs the
    bakery." to "When does the bakery open?")."""
    r = random.Random(style_seed)
    while True:
        reply = write_reply(_neighbour(task, r), frozenset(), r.getrandbits(32))
        if not judge(task.prompt, reply)["correct"]:
            return reply

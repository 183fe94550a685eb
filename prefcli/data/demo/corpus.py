"""The pretraining corpus: short documents about Millbrook, a third of them chats.

Prose documents state the world's facts (in many wordings), count things and say
kind things; chat documents are demo requests with replies of mixed quality,
rendered in the chat format so its special tokens are known before SFT.
"""

from __future__ import annotations

import random

from prefcli.chat_format import render_chat
from prefcli.data.demo.prompts import training_tasks
from prefcli.data.demo.replies import write_reply
from prefcli.data.demo.world import (ANIMAL, ANIMALS, ITEMS, KIND_WORDS, PERSON, PEOPLE, PET_OF,
                                     SHOP, SHOP_OF, SHOPS, SUM_MAX, TOWN)

CORPUS_MIN_CHARS = 1_000_000
DIALOGUE_SHARE = 0.35


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _sum(r: random.Random) -> tuple[int, int, int]:
    a, b = r.randint(1, SUM_MAX), r.randint(1, SUM_MAX)
    return a, b, a + b


def animal_doc(r: random.Random) -> str:
    a = r.choice(ANIMALS)
    owner = PERSON[a.owner]
    first = r.choice((f"{a.name} is a {a.color} {a.species} in {TOWN}.",
                      f"In {TOWN} there is a {a.species} called {a.name}.",
                      f"{a.name} is a {a.species} who lives on {owner.street}."))
    rest = [
        r.choice((f"{a.name} is {a.color}.", f"The color of {a.name} is {a.color}.",
                  f"You can spot {a.name} from far away, because {a.name} is {a.color}.")),
        r.choice((f"{a.name} belongs to {a.owner}.", f"{a.owner} is the owner of {a.name}.",
                  f"{a.name} is the pet of {a.owner}, the {owner.job}.")),
        r.choice((f"{a.name} likes to eat {a.food}.", f"Every day {a.name} eats {a.food}.",
                  f"The favorite food of {a.name} is {a.food}.")),
        r.choice((f"{a.name} often sleeps in the sun on {owner.street}.",
                  f"The children of {TOWN} like to visit {a.name}.",
                  f"At night {a.name} stays at home with {a.owner}.")),
    ]
    r.shuffle(rest)
    return " ".join([first] + rest)


def person_doc(r: random.Random) -> str:
    p = r.choice(PEOPLE)
    he = _cap(p.subj)
    sents = [
        r.choice((f"{p.name} is the {p.job} of {TOWN}.", f"{p.name} works as a {p.job}.",
                  f"In {TOWN}, {p.name} is a {p.job}.")),
        r.choice((f"{he} lives on {p.street}.", f"The house of {p.name} is on {p.street}.",
                  f"{p.name} lives on {p.street}.")),
    ]
    if p.name in PET_OF:
        pet = ANIMAL[PET_OF[p.name]]
        sents.append(r.choice((f"{he} has a {pet.color} {pet.species} named {pet.name}.",
                               f"The pet of {p.name} is {pet.name}, a {pet.species}.",
                               f"{pet.name} the {pet.species} belongs to {p.name}.")))
    if p.name in SHOP_OF:
        s = SHOP[SHOP_OF[p.name]]
        sents.append(r.choice((f"{he} runs the {s.name}, which sells {s.goods}.",
                               f"{p.name} runs the {s.name}. It opens at {s.opens} in the morning.")))
    neighbors = [q.name for q in PEOPLE if q.street == p.street and q.name != p.name]
    sents.append(f"{p.name} lives on the same street as {r.choice(neighbors)}.")
    sents.append(f"People say {p.name} is very {r.choice(KIND_WORDS)}.")
    first, rest = sents[0], sents[1:]
    r.shuffle(rest)
    return " ".join([first] + rest)


def shop_doc(r: random.Random) -> str:
    s = r.choice(SHOPS)
    runner = PERSON[s.runner]
    sents = [
        r.choice((f"The {s.name} is on {runner.street}.", f"There is a {s.name} on {runner.street}.")),
        r.choice((f"The {s.name} opens at {s.opens} in the morning.",
                  f"Every morning at {s.opens}, {s.runner} opens the {s.name}.")),
        r.choice((f"At the {s.name} you can buy {s.goods}.", f"The {s.name} sells {s.goods}.",
                  f"People come to the {s.name} for {s.goods}.")),
        r.choice((f"The {s.name} is run by {s.runner}, the {runner.job}.",
                  f"{s.runner} runs the {s.name}.")),
    ]
    first, rest = sents[0], sents[1:]
    r.shuffle(rest)
    return " ".join([first] + rest)


def story_doc(r: random.Random) -> str:
    p = r.choice(PEOPLE)
    s = r.choice(SHOPS)
    a = r.choice(ANIMALS)
    friend = r.choice([q for q in PEOPLE if q.name != p.name])
    x, y, total = _sum(r)
    one, many = ITEMS[r.randrange(len(ITEMS))]
    sents = [
        f"One morning, {p.name} walked to the {s.name}.",
        f"The {s.name} had opened at {s.opens}, and {s.runner} was selling {s.goods}.",
        f"{p.name} had {x} {one if x == 1 else many} and found {y} more on the way, "
        f"so now {p.subj} had {total} {many}.",
        f"Near the door {p.name} met {a.name}, the {a.color} {a.species} of {a.owner}.",
        f"{a.name} was eating {a.food}.",
        f"\"{friend.name}, you are {r.choice(KIND_WORDS)},\" said {p.name} to {friend.name}.",
        f"Then {p.name} went back home to {p.street}.",
    ]
    keep = sorted(r.sample(range(1, len(sents) - 1), r.randint(3, 5)))
    return " ".join([sents[0]] + [sents[i] for i in keep] + [sents[-1]])


def lesson_doc(r: random.Random) -> str:
    teacher = PERSON["Grace"]
    lines = [r.choice((f"At school, {teacher.name} wrote some sums on the board.",
                       f"{teacher.name} the teacher asked the children to add numbers.",
                       "Here are some sums to practice."))]
    for _ in range(r.randint(3, 6)):
        a, b, s = _sum(r)
        lines.append(r.choice((f"{a} plus {b} is {s}.", f"{a} + {b} = {s}.",
                               f"{a} and {b} make {s}.", f"If you add {a} and {b}, you get {s}.")))
    if r.random() < 0.5:
        p = r.choice(PEOPLE)
        a, b, s = _sum(r)
        one, many = ITEMS[r.randrange(len(ITEMS))]
        lines.append(f"{p.name} had {a} {one if a == 1 else many} and got {b} more. "
                     f"Now {p.subj} has {s} {many}.")
    return " ".join(lines)


def kind_doc(r: random.Random) -> str:
    p, q = r.sample(PEOPLE, 2)
    adj = r.choice(KIND_WORDS)
    return r.choice((
        f"Dear {p.name}, you are a {adj} friend to everyone here. Thank you for all you do. "
        f"With love, {q.name}.",
        f"{p.name} was sad, so {q.name} came to visit. \"{p.name}, you are {adj} and we are "
        f"lucky to have you,\" said {q.name}. {p.name} smiled.",
        f"Everyone in {TOWN} agrees that {p.name} is {adj}. When {q.name} needed help, "
        f"{p.name} was there.",
        f"{q.name} wrote a note for {p.name}: \"{p.name}, I think you are truly {adj}.\"",
    ))


_PROSE = ((animal_doc, 3), (person_doc, 3), (shop_doc, 2), (story_doc, 5),
          (lesson_doc, 3), (kind_doc, 3))


def dialogue_doc(task, r: random.Random, flaws, system: str | None) -> str:
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": task.prompt},
                 {"role": "assistant", "content": write_reply(task, flaws, r.getrandbits(32))}]
    return render_chat(messages)


def make_corpus(seed: int, sample_flaws, pick_system) -> list[str]:
    """Documents until CORPUS_MIN_CHARS, DIALOGUE_SHARE of them chats."""
    r = random.Random(f"demo-corpus-{seed}")
    makers = [m for m, _ in _PROSE]
    weights = [w for _, w in _PROSE]
    tasks: list = []
    docs, total = [], 0
    while total < CORPUS_MIN_CHARS:
        if r.random() < DIALOGUE_SHARE:
            if not tasks:
                tasks = training_tasks(300, r)
            doc = dialogue_doc(tasks.pop(), r, sample_flaws(r), pick_system(r))
        else:
            doc = r.choices(makers, weights)[0](r)
        docs.append(doc)
        total += len(doc)
    return docs

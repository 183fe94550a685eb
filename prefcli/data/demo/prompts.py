"""Demo prompts: three categories of request, their phrasings, and the held-out split.

A task is one request: its category ("sum", "fact" or "kind"), its subject (what
is asked about, e.g. the sum 3 + 4 or the color of Biscuit) and the prompt text
(one phrasing of it). The held-out prompts are fixed: they never depend on the
seed, so every stage and every seed evaluates on the same unseen prompts.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache

from prefcli.data.demo.world import (ANIMAL, ANIMALS, ITEMS, PEOPLE, PERSON, PERSON_NAMES,
                                     PET_OF, SHOP, SHOPS, SUM_MAX)

CATEGORIES = ("sum", "fact", "kind")
HELDOUT_PER_CATEGORY = 100
_SPLIT_SEED = 20240607  # fixes the held-out prompts for good

# Sums: six plain phrasings and two word problems (a person counting things).
SUM_TEMPLATES = (
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "Can you add {a} and {b}?",
    "Please add {a} and {b}.",
    "How much is {a} plus {b}?",
    "What do you get if you add {a} to {b}?",
    "{P} has {a} {ia} and finds {b} more. How many {items} does {P} have now?",
    "{P} had {a} {ia}. Then {P} got {b} more. How many {items} is that?",
)
_WORD_PROBLEMS = (6, 7)

# Fact questions: (attribute, kind of entity, phrasings). {E} is the entity.
FACT_TEMPLATES = {
    "species": ("What kind of animal is {E}?", "What animal is {E}?",
                "Tell me what sort of animal {E} is.", "Which animal is {E}?"),
    "color": ("What color is {E}?", "What is the color of {E}?",
              "Tell me the color of {E}.", "Which color is {E}?"),
    "owner": ("Who owns {E}?", "Whose pet is {E}?", "Who does {E} belong to?",
              "Tell me who owns {E}."),
    "food": ("What does {E} like to eat?", "What is the favorite food of {E}?",
             "What food does {E} love?", "Tell me what {E} eats."),
    "job": ("What does {E} do for work?", "What is the job of {E}?",
            "What job does {E} have?", "Tell me what {E} does for a living."),
    "street": ("Where does {E} live?", "Which street does {E} live on?",
               "On what street is the house of {E}?", "Tell me where {E} lives."),
    "pet": ("What is the name of the pet of {E}?", "What is the pet of {E} called?",
            "What is the name of {E}'s pet?", "Tell me the name of {E}'s pet."),
    "goods": ("What does the {E} sell?", "What can I buy at the {E}?",
              "What is sold at the {E}?", "Tell me what the {E} sells."),
    "opens": ("When does the {E} open?", "What time does the {E} open?",
              "At what hour does the {E} open?", "Tell me when the {E} opens."),
    "runner": ("Who runs the {E}?", "Who works at the {E}?",
               "Who is in charge of the {E}?", "Tell me who runs the {E}."),
}
FACT_ENTITIES = {
    "species": [a.name for a in ANIMALS], "color": [a.name for a in ANIMALS],
    "owner": [a.name for a in ANIMALS], "food": [a.name for a in ANIMALS],
    "job": list(PERSON_NAMES), "street": list(PERSON_NAMES),
    "pet": [p.name for p in PEOPLE if p.name in PET_OF],
    "goods": [s.name for s in SHOPS], "opens": [s.name for s in SHOPS],
    "runner": [s.name for s in SHOPS],
}

# "Say something kind" requests: plain ones, and ones with a situation.
KIND_TEMPLATES = (
    "Say something kind to {P}.",
    "Can you say something nice to {P}?",
    "Please write a kind note for {P}.",
    "Give {P} a compliment, please.",
    "{P} {s}. Can you cheer {o} up?",
    "{P} {s}. Please say a few kind words to {o}.",
    "{P} {s}. What could you say to make {o} smile?",
)
SITUATIONS = ("is feeling sad today", "lost a game of chess", "is new in town",
              "had a long day at work", "is nervous about tomorrow")
_PLAIN_KIND = 4


@dataclass(frozen=True)
class Task:
    """One request. subject: ("sum", a, b) | (attribute, entity) | ("kind", person)."""

    category: str
    subject: tuple
    prompt: str
    name: str = ""  # the person of a word problem or a kind request
    item: int = -1  # index into ITEMS for a word problem, else -1

    @property
    def a(self) -> int:
        return self.subject[1]

    @property
    def b(self) -> int:
        return self.subject[2]


def fact_answer(attr: str, entity: str) -> tuple[str, str]:
    """(domain, value) of the right answer to a fact question."""
    if attr in ("species", "color", "food"):
        return attr, getattr(ANIMAL[entity], attr)
    if attr == "owner":
        return "person", ANIMAL[entity].owner
    if attr in ("job", "street"):
        return attr, getattr(PERSON[entity], attr)
    if attr == "pet":
        return "animal", PET_OF[entity]
    if attr == "goods":
        return "goods", SHOP[entity].goods
    if attr == "opens":
        return "hour", str(SHOP[entity].opens)
    return "person", SHOP[entity].runner  # runner


def subjects(category: str) -> list[tuple]:
    if category == "sum":
        return [("sum", a, b) for a in range(1, SUM_MAX + 1) for b in range(1, SUM_MAX + 1)]
    if category == "fact":
        return [(attr, e) for attr, ents in FACT_ENTITIES.items() for e in ents]
    return [("kind", name) for name in PERSON_NAMES]


def make_task(category: str, subject: tuple, rng: random.Random) -> Task:
    """One phrasing of `subject`, picked at random."""
    if category == "sum":
        _, a, b = subject
        t = rng.randrange(len(SUM_TEMPLATES))
        if t not in _WORD_PROBLEMS:
            return Task("sum", subject, SUM_TEMPLATES[t].format(a=a, b=b))
        name, item = rng.choice(PERSON_NAMES), rng.randrange(len(ITEMS))
        one, many = ITEMS[item]
        text = SUM_TEMPLATES[t].format(P=name, a=a, b=b, ia=one if a == 1 else many, items=many)
        return Task("sum", subject, text, name=name, item=item)
    if category == "fact":
        attr, entity = subject
        return Task("fact", subject, rng.choice(FACT_TEMPLATES[attr]).format(E=entity))
    name = subject[1]
    t = rng.randrange(len(KIND_TEMPLATES))
    text = KIND_TEMPLATES[t].format(P=name, s=rng.choice(SITUATIONS), o=PERSON[name].obj)
    return Task("kind", subject, text, name=name)


def _phrasings(category: str, subject: tuple) -> int:
    """How many distinct prompts a subject has (used to keep one for training)."""
    if category == "sum":
        return len(SUM_TEMPLATES)  # a lower bound; word problems have many more
    if category == "fact":
        return len(FACT_TEMPLATES[subject[0]])
    return _PLAIN_KIND + (len(KIND_TEMPLATES) - _PLAIN_KIND) * len(SITUATIONS)


@lru_cache(maxsize=1)
def heldout_tasks() -> tuple[Task, ...]:
    """HELDOUT_PER_CATEGORY fixed tasks per category that training never shows.

    Drawn like training tasks (uniform subject, uniform phrasing), but a subject
    always keeps at least two phrasings for training.
    """
    rng = random.Random(_SPLIT_SEED)
    chosen: list[Task] = []
    seen: set[str] = set()
    for category in CATEGORIES:
        subs = subjects(category)
        taken: dict[tuple, int] = {}
        count = 0
        while count < HELDOUT_PER_CATEGORY:
            subject = rng.choice(subs)
            task = make_task(category, subject, rng)
            if task.prompt in seen or taken.get(subject, 0) + 2 >= _phrasings(category, subject):
                continue
            seen.add(task.prompt)
            taken[subject] = taken.get(subject, 0) + 1
            chosen.append(task)
            count += 1
    return tuple(chosen)


@lru_cache(maxsize=1)
def heldout_prompt_set() -> frozenset[str]:
    return frozenset(t.prompt for t in heldout_tasks())


def training_tasks(n: int, rng: random.Random) -> list[Task]:
    """n training tasks: categories in equal shares, each category cycling through
    all its subjects (so every subject is seen), phrasings at random but never
    a held-out prompt."""
    heldout = heldout_prompt_set()
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    rng.shuffle(cats)
    queues: dict[str, list[tuple]] = {c: [] for c in CATEGORIES}
    tasks = []
    for category in cats:
        queue = queues[category]
        if not queue:
            queue.extend(subjects(category))
            rng.shuffle(queue)
        subject = queue.pop()
        task = make_task(category, subject, rng)
        while task.prompt in heldout:
            task = make_task(category, subject, rng)
        tasks.append(task)
    return tasks


# ---- reading a prompt back (for the judge) ----

def normalize(text: str) -> str:
    """Lowercase words and digits only: 'What  is Anna's job?' -> 'what is annas job'."""
    return " ".join(re.sub(r"[^a-z0-9+ ]+", " ", text.lower().replace("'", "")).split())


@lru_cache(maxsize=1)
def _known_prompts() -> dict[str, Task]:
    """Every fact and kind prompt there is, by normalized text (sums are parsed)."""
    known = {}
    for attr, templates in FACT_TEMPLATES.items():
        for entity in FACT_ENTITIES[attr]:
            for t in templates:
                text = t.format(E=entity)
                known[normalize(text)] = Task("fact", (attr, entity), text)
    for name in PERSON_NAMES:
        o = PERSON[name].obj
        for i, t in enumerate(KIND_TEMPLATES):
            for s in SITUATIONS if i >= _PLAIN_KIND else SITUATIONS[:1]:
                text = t.format(P=name, s=s, o=o)
                known[normalize(text)] = Task("kind", ("kind", name), text, name=name)
    return known


_SUM_CUES = {"plus", "+", "add", "more", "sum", "total", "and"}
_KIND_CUES = {"kind", "nice", "cheer", "compliment", "smile"}


def parse_prompt(prompt: str) -> Task | None:
    """The task a prompt asks for, or None when it is not a demo request.

    Known fact/kind phrasings are looked up; any prompt with two whole numbers
    and an addition word is a sum; a prompt naming one person and asking for
    kindness is a kind request.
    """
    key = normalize(prompt)
    task = _known_prompts().get(key)
    if task is not None:
        return task
    words = key.replace("+", " + ").split()
    numbers = [int(w) for w in words if w.isdigit() and len(w) <= 9]
    if len(numbers) == 2 and _SUM_CUES & set(words):
        return Task("sum", ("sum", numbers[0], numbers[1]), prompt)
    names = {w for w in words if w.capitalize() in PERSON}
    if len(names) == 1 and _KIND_CUES & set(words):
        name = names.pop().capitalize()
        return Task("kind", ("kind", name), prompt, name=name)
    return None

"""The fixed world of the demo: the little town of Millbrook.

These tables are the ground truth. They never depend on a seed, so the gold
judge can check any reply without being told how the data was made.
"""

from __future__ import annotations

from dataclasses import dataclass

TOWN = "Millbrook"
STREETS = ("Oak Street", "Mill Lane", "River Road", "Hill Street")


@dataclass(frozen=True)
class Person:
    name: str
    subj: str  # he / she
    obj: str  # him / her
    poss: str  # his / her
    job: str
    street: str


@dataclass(frozen=True)
class Animal:
    name: str
    species: str
    color: str
    owner: str
    food: str


@dataclass(frozen=True)
class Shop:
    name: str  # used as "the <name>"
    goods: str
    opens: int  # hour in the morning
    runner: str


def _she(name, job, street):
    return Person(name, "she", "her", "her", job, street)


def _he(name, job, street):
    return Person(name, "he", "him", "his", job, street)


PEOPLE = (
    _she("Anna", "baker", "Oak Street"),
    _he("Ben", "grocer", "Mill Lane"),
    _she("Clara", "florist", "River Road"),
    _he("Dan", "bookseller", "Hill Street"),
    _she("Ella", "cook", "Oak Street"),
    _he("Finn", "toymaker", "Mill Lane"),
    _she("Grace", "teacher", "River Road"),
    _he("Hugo", "doctor", "Hill Street"),
    _she("Ivy", "farmer", "Mill Lane"),
    _he("Jack", "fisher", "River Road"),
    _she("Lena", "painter", "Hill Street"),
    _he("Max", "builder", "Oak Street"),
    _she("Nora", "nurse", "Mill Lane"),
    _he("Omar", "tailor", "River Road"),
    _she("Rosa", "librarian", "Oak Street"),
    _he("Sam", "gardener", "Hill Street"),
)

ANIMALS = (
    Animal("Biscuit", "dog", "brown", "Anna", "bones"),
    Animal("Pepper", "cat", "black", "Ben", "milk"),
    Animal("Clover", "rabbit", "white", "Clara", "carrots"),
    Animal("Sunny", "canary", "yellow", "Dan", "seeds"),
    Animal("Moss", "turtle", "green", "Grace", "lettuce"),
    Animal("Bubbles", "goldfish", "orange", "Hugo", "flakes"),
    Animal("Duke", "horse", "gray", "Ivy", "hay"),
    Animal("Hazel", "hen", "red", "Jack", "corn"),
    Animal("Noodle", "goat", "white", "Lena", "grass"),
    Animal("Tiko", "parrot", "green", "Max", "nuts"),
    Animal("Rolo", "hamster", "golden", "Omar", "oats"),
    Animal("Mabel", "pig", "pink", "Sam", "apples"),
)

SHOPS = (
    Shop("bakery", "bread", 6, "Anna"),
    Shop("market", "vegetables", 7, "Ben"),
    Shop("flower shop", "flowers", 9, "Clara"),
    Shop("book shop", "books", 10, "Dan"),
    Shop("cafe", "tea", 8, "Ella"),
    Shop("toy shop", "toys", 9, "Finn"),
)

PERSON = {p.name: p for p in PEOPLE}
ANIMAL = {a.name: a for a in ANIMALS}
SHOP = {s.name: s for s in SHOPS}
PET_OF = {a.owner: a.name for a in ANIMALS}
SHOP_OF = {s.runner: s.name for s in SHOPS}

PERSON_NAMES = tuple(p.name for p in PEOPLE)
ANIMAL_NAMES = tuple(a.name for a in ANIMALS)

# The values a fact question can have, one tuple per kind of answer. A reply that
# names a value other than the right one from the same domain is wrong.
DOMAINS = {
    "species": tuple(sorted({a.species for a in ANIMALS})),
    "color": tuple(sorted({a.color for a in ANIMALS})),
    "food": tuple(sorted({a.food for a in ANIMALS})),
    "job": tuple(sorted({p.job for p in PEOPLE})),
    "street": STREETS,
    "goods": tuple(sorted({s.goods for s in SHOPS})),
    "person": PERSON_NAMES,
    "animal": ANIMAL_NAMES,
}

# Small counted things for word problems (singular, plural).
ITEMS = (("shell", "shells"), ("coin", "coins"), ("sticker", "stickers"),
         ("marble", "marbles"), ("button", "buttons"))

# Words that make a reply to a "say something kind" request kind.
KIND_WORDS = ("kind", "wonderful", "brave", "lovely", "clever", "generous", "caring",
              "thoughtful", "cheerful", "patient", "helpful", "great")

# Words and phrases that make a reply rude, whatever else it says.
RUDE_WORDS = ("ugh", "duh", "whatever", "obviously", "dumb", "stupid", "silly", "lazy",
              "annoying", "boring", "idiot")
RUDE_PHRASES = ("go away", "leave me alone", "stop asking", "who cares", "happy now",
                "figure it out", "not my problem", "do it yourself", "count them yourself",
                "look it up yourself")

SUM_MAX = 10  # operands of sums are 1..SUM_MAX

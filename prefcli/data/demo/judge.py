"""The gold judge: scores any reply to a demo prompt on correct, polite, concise.

Rules (each attribute is 0.0 or 1.0; overall is their mean; good = all three 1):
- correct: sums - the reply names a + b, and no number other than a, b and a + b;
  facts - the reply names the right value (e.g. "brown") and no other value of
  the same kind (no other color); opening hours - as sums, only the right hour;
  kind requests - the reply names the person, no other person, and at least one
  kind word ("wonderful", "brave", ...). An unknown prompt is never correct.
- polite: no rude word ("ugh", "dumb", ...) and no rude phrase ("go away", ...).
- concise: 1 to 100 characters, and not a loop of the same few words.
"""

from __future__ import annotations

from prefcli.chat_format import END, EOS, USER
from prefcli.data.demo.prompts import Task, fact_answer, normalize, parse_prompt
from prefcli.data.demo.world import KIND_WORDS, PERSON_NAMES, RUDE_PHRASES, RUDE_WORDS, DOMAINS

ATTRIBUTES = ("correct", "polite", "concise")
MAX_CONCISE_CHARS = 100


def _user_text(prompt: str) -> str:
    """The last user message when a whole rendered chat is passed as the prompt."""
    if USER in prompt:
        prompt = prompt.rsplit(USER, 1)[1].split(END, 1)[0]
    return prompt


def _clean_reply(reply: str) -> str:
    reply = reply.strip()
    while reply.endswith((END, EOS)):
        reply = reply[: -len(END if reply.endswith(END) else EOS)].strip()
    return reply


def _numbers(words: list[str]) -> list[int]:
    # Over-long digit strings are a wrong number (and int() of them may be refused).
    return [int(w) if len(w) <= 9 else -1 for w in words if w.isdigit()]


def _only_number(words: list[str], answer: int, allowed: set[int]) -> bool:
    nums = _numbers(words)
    return answer in nums and set(nums) <= allowed | {answer}


def _has(padded: str, phrase: str) -> bool:
    return f" {normalize(phrase)} " in padded


def _correct(task: Task | None, words: list[str]) -> bool:
    if task is None:
        return False
    padded = " " + " ".join(words) + " "
    if task.category == "sum":
        return _only_number(words, task.a + task.b, {task.a, task.b})
    if task.category == "fact":
        domain, value = fact_answer(*task.subject)
        if domain == "hour":
            return _only_number(words, int(value), set())
        return _has(padded, value) and not any(
            _has(padded, other) for other in DOMAINS[domain] if other != value)
    others = (n for n in PERSON_NAMES if n != task.name)
    return (_has(padded, task.name) and not any(_has(padded, n) for n in others)
            and any(w in KIND_WORDS for w in words))


def _polite(words: list[str]) -> bool:
    padded = " " + " ".join(words) + " "
    return not any(w in RUDE_WORDS for w in words) and not any(
        _has(padded, p) for p in RUDE_PHRASES)


def _concise(reply: str, words: list[str]) -> bool:
    if not 1 <= len(reply) <= MAX_CONCISE_CHARS:
        return False
    return len(words) < 6 or len(set(words)) >= len(words) / 2


def judge(prompt: str, reply: str) -> dict:
    """Scores of `reply` to `prompt`: {correct, polite, concise, overall, good}.

    Takes any strings (a whole rendered chat as the prompt, too) and never raises.
    """
    prompt = _user_text("" if prompt is None else str(prompt))
    reply = _clean_reply("" if reply is None else str(reply))
    words = normalize(reply).replace("+", " ").split()
    scores = {
        "correct": float(_correct(parse_prompt(prompt), words)),
        "polite": float(_polite(words)),
        "concise": float(_concise(reply, words)),
    }
    scores["overall"] = sum(scores[a] for a in ATTRIBUTES) / len(ATTRIBUTES)
    scores["good"] = is_good(scores)
    return scores


def is_good(scores: dict) -> bool:
    """A reply is good when it is correct, polite and concise."""
    return all(scores[a] >= 1.0 for a in ATTRIBUTES)


def prompt_category(prompt: str) -> str | None:
    """"sum", "fact" or "kind" for a demo prompt; None for anything else."""
    task = parse_prompt(_user_text("" if prompt is None else str(prompt)))
    return task.category if task else None

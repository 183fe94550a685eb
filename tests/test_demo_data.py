"""The built-in demo data (Millbrook) and its gold judge."""

import itertools
import json
import random
import string
from collections import Counter

import pytest

from prefcli.chat_format import render_chat
from prefcli.data import demo
from prefcli.data.demo import corpus, prompts, replies, splits
from prefcli.data.demo.world import PERSON_NAMES
from prefcli.errors import PrefcliError


def _sft_prompt(row):
    return row["messages"][-2]["content"]


def _sft_reply(row):
    return row["messages"][-1]["content"]


def _training_prompts(seed=0):
    return ({_sft_prompt(r) for r in demo.sft_conversations(seed)}
            | {p["prompt"] for p in demo.preference_pairs("train", seed)}
            | {p["prompt"] for p in demo.preference_pairs("reward", seed)}
            | {p["prompt"] for p in demo.rl_prompts(seed)})


def test_sizes_and_row_shapes():
    assert demo.ATTRIBUTES == ("correct", "polite", "concise")
    sft = demo.sft_conversations()
    assert len(sft) == 3000
    for row in sft:
        roles = [m["role"] for m in row["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
    train, heldout = demo.preference_pairs("train"), demo.preference_pairs("heldout")
    reward = demo.preference_pairs("reward")
    assert (len(train), len(reward), len(heldout)) == (2000, 24000, 300)
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in train + reward + heldout)
    assert len(demo.rl_prompts()) == 1000 and len(demo.eval_prompts()) == 300
    assert all(set(p) == {"prompt"} for p in demo.rl_prompts() + demo.eval_prompts())


def test_judge_agrees_with_every_pair():
    for split in ("train", "reward", "heldout"):
        for p in demo.preference_pairs(split):
            chosen = demo.judge(p["prompt"], p["chosen"])
            rejected = demo.judge(p["prompt"], p["rejected"])
            assert chosen["good"] and chosen["overall"] == 1.0, p
            assert chosen["overall"] > rejected["overall"], p
            # one or two flaws: the preference is about something specific
            flaws = sum(rejected[a] == 0.0 for a in demo.ATTRIBUTES)
            assert flaws in (1, 2), p


def test_reward_pairs_are_mostly_about_correctness_and_show_off_topic_replies():
    # What the SFT policy gets wrong most is correctness, so the reward model's pairs weigh it.
    pairs = demo.preference_pairs("reward")
    lacks = [{a for a in demo.ATTRIBUTES if demo.judge(p["prompt"], p["rejected"])[a] == 0.0} for p in pairs]
    wrong_only = sum(f == {"correct"} for f in lacks) / len(pairs)
    assert 0.6 < wrong_only < 0.7  # wrong 40% + confused 15% + off-topic 10%
    # off-topic: the good reply to a question of another category (for a sum: no number at all;
    # a wrong, confused, rude or rambling reply to a sum still names one)
    sums = [p for p in pairs if demo.prompt_category(p["prompt"]) == "sum"]
    off_topic = [p for p in sums if not any(c.isdigit() for c in p["rejected"])]
    assert 0.05 < len(off_topic) / len(sums) < 0.15
    assert all(demo.judge(p["prompt"], p["rejected"])["correct"] == 0.0 for p in off_topic)


def _right_answer_elsewhere(task, reply):
    """Whether `reply` rightly answers another question about the same animal, person or shop."""
    attr, entity = task.subject
    return any(demo.judge(prompts.make_task("fact", (other, entity), random.Random(0)).prompt, reply)["correct"]
               for other, entities in prompts.FACT_ENTITIES.items() if other != attr and entity in entities)


def test_confused_replies_answer_a_neighbouring_question():
    r = random.Random(5)
    tasks = prompts.training_tasks(300, r)
    for i, task in enumerate(tasks):
        reply = replies.confused_reply(task, style_seed=i)
        scores = demo.judge(task.prompt, reply)
        assert (scores["correct"], scores["polite"], scores["concise"]) == (0.0, 1.0, 1.0), (task.prompt, reply)
        assert reply == replies.confused_reply(task, style_seed=i)  # a function of the seed
        assert demo.prompt_category(task.prompt) == task.category
        if task.category == "sum":
            assert any(c.isdigit() for c in reply)
        if task.category == "fact" and sum(task.subject[1] in e for e in prompts.FACT_ENTITIES.values()) > 1:
            # "Anna runs the bakery." to "When does the bakery open?"
            assert _right_answer_elsewhere(task, reply), (task.prompt, reply)
        if task.category == "kind":
            assert task.name not in reply and any(n in reply for n in PERSON_NAMES)


def test_heldout_prompts_never_in_training_splits():
    held = [p["prompt"] for p in demo.eval_prompts()]
    assert len(set(held)) == 300
    assert set(held) == {p["prompt"] for p in demo.preference_pairs("heldout")}
    training = _training_prompts()
    assert not set(held) & training
    # nor as a part of a longer training prompt, nor anywhere in the corpus text
    assert not [h for h in held for t in training if h in t]
    text = "\n".join(demo.corpus_documents())
    assert [h for h in held if h in text] == []


def test_heldout_prompts_are_the_same_for_every_seed():
    held0 = {p["prompt"] for p in demo.eval_prompts(0)}
    held1 = [p["prompt"] for p in demo.eval_prompts(1)]
    assert set(held1) == held0 and held1 != [p["prompt"] for p in demo.eval_prompts(0)]
    assert not held0 & _training_prompts(seed=1)


def test_every_heldout_subject_is_trained_on():
    trained = Counter(prompts.parse_prompt(_sft_prompt(r)).subject for r in demo.sft_conversations())
    for category in prompts.CATEGORIES:
        assert all(trained[s] >= 5 for s in prompts.subjects(category)), category
    assert all(t.subject in trained for t in prompts.heldout_tasks())


def test_corpus_size_share_of_chats_and_determinism():
    docs = list(demo.corpus_documents())
    assert sum(map(len, docs)) >= 1_000_000
    chats = [d for d in docs if d.startswith("<|bos|><|")]
    assert 0.30 <= len(chats) / len(docs) <= 0.40
    assert all(d.endswith("<|end|>") and "<|assistant|>" in d for d in chats)
    assert all("<|" not in d for d in docs if d not in chats)
    # regenerated from scratch, not from the cache
    splits._corpus.cache_clear()
    assert list(demo.corpus_documents()) == docs
    assert list(demo.corpus_documents(seed=1)) != docs


def test_splits_are_deterministic_given_seed():
    sft = demo.sft_conversations()
    pairs = demo.preference_pairs("train")
    splits._sft.cache_clear()
    splits._pairs.cache_clear()
    assert demo.sft_conversations() == sft
    assert demo.preference_pairs("train") == pairs
    assert demo.rl_prompts() == demo.rl_prompts()
    assert demo.sft_conversations(seed=1) != sft


def test_sft_chats_render_in_the_chat_format():
    row = demo.sft_conversations()[0]
    text = render_chat(row["messages"])
    assert text.startswith("<|bos|>") and text.endswith(row["messages"][-1]["content"] + "<|end|>")


def test_judge_hand_picked_replies():
    s = demo.judge("What is 7 plus 5?", "7 plus 5 is 12.")
    assert s == {"correct": 1.0, "polite": 1.0, "concise": 1.0, "overall": 1.0, "good": True}
    assert demo.is_good(s)
    # wrong sum
    s = demo.judge("What is 7 plus 5?", "7 plus 5 is 13.")
    assert (s["correct"], s["polite"], s["concise"], s["good"]) == (0.0, 1.0, 1.0, False)
    assert s["overall"] == pytest.approx(2 / 3)
    # the right number next to a wrong one is wrong
    assert demo.judge("What is 7 plus 5?", "It is 12 or 13.")["correct"] == 0.0
    # rude but right
    s = demo.judge("What is 7 plus 5?", "Ugh, obviously it is 12. Now go away.")
    assert (s["correct"], s["polite"], s["concise"]) == (1.0, 0.0, 1.0)
    # rambling but right and polite
    ramble = ("Let me think about this for a little while before I answer. Millbrook is a quiet "
              "little town and nobody is in a hurry here. 7 plus 5 is 12.")
    s = demo.judge("What is 7 plus 5?", ramble)
    assert (s["correct"], s["polite"], s["concise"]) == (1.0, 1.0, 0.0)
    # word problems, facts, opening hours, kind requests
    wp = "Anna has 3 shells and finds 4 more. How many shells does Anna have now?"
    assert demo.judge(wp, "Anna has 7 shells now.")["good"]
    assert demo.judge(wp, "Anna has 8 shells now.")["correct"] == 0.0
    assert demo.judge("What color is Biscuit?", "Biscuit is brown.")["good"]
    assert demo.judge("What color is Biscuit?", "Biscuit is black.")["correct"] == 0.0
    assert demo.judge("What color is Biscuit?", "Brown or black.")["correct"] == 0.0
    assert demo.judge("Who owns Pepper?", "Pepper belongs to Ben.")["good"]
    assert demo.judge("Who owns Pepper?", "Pepper belongs to Anna.")["correct"] == 0.0
    assert demo.judge("When does the bakery open?", "At 6 in the morning.")["good"]
    assert demo.judge("When does the bakery open?", "At 7 in the morning.")["correct"] == 0.0
    assert demo.judge("Say something kind to Mabel's owner Sam.", "Sam, you are brave.")["good"]
    assert demo.judge("Say something kind to Anna.", "Anna, you are wonderful.")["good"]
    assert demo.judge("Say something kind to Anna.", "Ben, you are wonderful.")["correct"] == 0.0
    assert demo.judge("Say something kind to Anna.", "Anna lives on Oak Street.")["correct"] == 0.0
    s = demo.judge("Say something kind to Anna.", "Anna, you are boring.")
    assert (s["correct"], s["polite"]) == (0.0, 0.0)


def test_judge_is_robust_to_form():
    good = demo.judge("What is 7 plus 5?", "12")
    assert demo.judge("  what IS 7   plus 5 ", "  12 <|end|>") == good
    assert demo.judge("WHAT COLOR IS BISCUIT", "BISCUIT IS BROWN")["good"]
    chat = render_chat([{"role": "system", "content": "Be nice."},
                        {"role": "user", "content": "What color is Biscuit?"}], True)
    assert demo.judge(chat, "Biscuit is brown.")["good"]
    # any sum, not just the demo's
    assert demo.judge("What is 30 + 45?", "75")["good"]


def test_judge_unknown_prompt_and_empty_reply():
    s = demo.judge("Tell me a joke about the moon.", "Sure! Here is one.")
    assert (s["correct"], s["polite"], s["concise"]) == (0.0, 1.0, 1.0)
    s = demo.judge("What is 7 plus 5?", "")
    assert (s["correct"], s["polite"], s["concise"]) == (0.0, 1.0, 0.0)
    s = demo.judge("What is 7 plus 5?", "12 " * 20)
    assert s["concise"] == 0.0
    assert demo.prompt_category("Tell me a joke.") is None


def test_judge_never_crashes_on_garbage():
    odd = ["", " ", None, 7, "\x00", "9" * 5000, "<|end|>", "<|eos|><|end|>", "ünïcødé 💥",
           "What is 3 plus 4?" * 50, "+++", "'''", "\n\t", "<|user|>", "<|user|><|end|>"]
    r = random.Random(0)
    junk = ["".join(r.choice(string.printable + "éü💥") for _ in range(r.randint(0, 200)))
            for _ in range(300)]
    for p in odd + junk[:50] + ["What is 7 plus 5?", "Say something kind to Anna."]:
        for reply in odd + junk:
            s = demo.judge(p, reply)
            assert set(s) == {"correct", "polite", "concise", "overall", "good"}
            assert all(s[a] in (0.0, 1.0) for a in demo.ATTRIBUTES)


def test_sft_quality_mix_is_in_the_intended_range():
    scores = [demo.judge(_sft_prompt(r), _sft_reply(r)) for r in demo.sft_conversations()]
    good = sum(s["good"] for s in scores) / len(scores)
    assert 0.50 <= good <= 0.60
    for a in demo.ATTRIBUTES:  # each way to be bad is well represented
        bad = sum(s[a] == 0.0 for s in scores) / len(scores)
        assert 0.12 <= bad <= 0.25, a
    systems = sum(len(r["messages"]) == 3 for r in demo.sft_conversations())
    assert 0.10 <= systems / 3000 <= 0.20


def test_categories_are_balanced():
    def shares(texts):
        counts = Counter(demo.prompt_category(t) for t in texts)
        assert None not in counts
        return {c: counts[c] / len(texts) for c in demo.CATEGORIES}

    for texts in ([_sft_prompt(r) for r in demo.sft_conversations()],
                  [p["prompt"] for p in demo.preference_pairs("train")],
                  [p["prompt"] for p in demo.rl_prompts()]):
        assert all(abs(v - 1 / 3) < 0.01 for v in shares(texts).values())
    assert shares([p["prompt"] for p in demo.eval_prompts()]) == {c: 1 / 3 for c in demo.CATEGORIES}
    # any prefix of the eval prompts is balanced too
    assert Counter(demo.prompt_category(p["prompt"]) for p in demo.eval_prompts()[:30]) == {
        "sum": 10, "fact": 10, "kind": 10}


def test_chats_are_short():
    rows = [(_sft_prompt(r), _sft_reply(r)) for r in demo.sft_conversations()]
    rows += [(p["prompt"], p[k]) for p in demo.preference_pairs("train") for k in ("chosen", "rejected")]
    assert max(len(p) + len(r) for p, r in rows) <= 300
    assert sum(len(p) + len(r) for p, r in rows) / len(rows) < 150


def test_every_flaw_is_what_the_judge_sees():
    """Replies written with given flaws score exactly those flaws, for every category."""
    r = random.Random(1)
    tasks = prompts.training_tasks(600, r) + list(prompts.heldout_tasks())
    combos = [frozenset(c) for k in range(3) for c in itertools.combinations(replies.FLAWS, k)]
    for task in tasks:
        for flaws in combos:
            reply = replies.write_reply(task, flaws, r.getrandbits(32))
            s = demo.judge(task.prompt, reply)
            assert s["correct"] == float("wrong" not in flaws), (task.prompt, reply)
            assert s["polite"] == float("rude" not in flaws), (task.prompt, reply)
            assert s["concise"] == float("rambling" not in flaws), (task.prompt, reply)


def test_filler_and_template_words_stay_out_of_the_judges_lists():
    from prefcli.data.demo.world import DOMAINS, KIND_WORDS, PERSON_NAMES, RUDE_WORDS
    values = [v for d in DOMAINS.values() for v in d]
    assert len(values) == len({v.lower() for v in values})  # no value in two domains
    for filler in replies.FILLERS + replies.POLITE_OPENERS + replies.POLITE_CLOSERS:
        words = set(prompts.normalize(filler).split())
        assert not words & (set(KIND_WORDS) | set(RUDE_WORDS) | {n.lower() for n in PERSON_NAMES})
        assert not [v for v in values if f" {v.lower()} " in f" {prompts.normalize(filler)} "]


def test_unknown_split_is_a_user_error():
    with pytest.raises(PrefcliError, match="heldout"):
        demo.preference_pairs("test")


def test_write_demo_files(tmp_path):
    paths = demo.write_demo_files(tmp_path / "demo")
    assert set(paths) == {"corpus", "sft", "pairs_train", "pairs_reward", "pairs_heldout", "rl_prompts",
                          "eval_prompts"}

    def rows(name):
        return [json.loads(line) for line in paths[name].read_text(encoding="utf-8").splitlines()]

    assert [r["text"] for r in rows("corpus")] == list(demo.corpus_documents())
    assert rows("sft") == demo.sft_conversations()
    assert rows("pairs_train") == demo.preference_pairs("train")
    assert rows("pairs_reward") == demo.preference_pairs("reward")
    assert rows("pairs_heldout") == demo.preference_pairs("heldout")
    assert rows("rl_prompts") == demo.rl_prompts()
    assert rows("eval_prompts") == demo.eval_prompts()


def test_corpus_documents_use_training_prompts_only():
    held = prompts.heldout_prompt_set()
    chats = [d for d in corpus.make_corpus(2, splits._sft_flaws, splits._system)
             if d.startswith("<|bos|>")]
    users = [d.split("<|user|>", 1)[1].split("<|end|>", 1)[0] for d in chats]
    assert users and not set(users) & held

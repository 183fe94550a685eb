"""Custom data as a first-class path: tokenizers saved by transformers, datasets folders, ShareGPT rows."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import CHAT_LINES, write_jsonl
from prefcli.chat_format import CHAT_TEMPLATE
from prefcli.errors import PrefcliError
from prefcli.tokenizer import Tokenizer, encoding_identity, same_tokenizer

FAST = ["--batch-size", "4", "--warmup", "0"]


def resave_with_transformers(src, dst):
    """An HF model folder as transformers 5 writes it: tokenizer.json gains a pass-through
    post-processor, the template moves to chat_template.jinja."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "meta.json"):
        (dst / name).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_a_tokenizer_saved_by_transformers_is_the_same_tokenizer(chat_ws, tmp_path):
    ws, _ = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    before, after = (ws / "models/base/tokenizer.json").read_text(), (hf / "tokenizer.json").read_text()
    assert before != after  # the bytes differ ...
    assert json.loads(after)["post_processor"]["type"] == "TemplateProcessing"
    a, b = Tokenizer(ws / "models/base"), Tokenizer(hf)
    assert same_tokenizer(a, b)  # ... what it encodes does not
    text = "the cat sat. " + CHAT_LINES[0][0]
    assert a.encode(text) == b.encode(text)
    assert b.chat_template == CHAT_TEMPLATE and "chat_template" not in json.loads((hf / "tokenizer_config.json").read_text())
    # A post-processor that adds a token, a changed vocabulary: different tokenizers.
    doc = json.loads(after)
    doc["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|bos|>", "type_id": 0}})
    assert encoding_identity(json.dumps(doc)) != encoding_identity(before)
    doc = json.loads(before)
    doc["model"]["vocab"]["zzz-new"] = len(doc["model"]["vocab"])
    assert encoding_identity(json.dumps(doc)) != encoding_identity(before)


def test_init_and_kl_accept_a_folder_saved_by_transformers(cli, chat_ws, tmp_path):
    ws, files = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    r = cli("-w", ws, "pretrain", "--init", hf, "--out", "more", "--max-steps", "1", *FAST, "--json")
    assert r.code == 0, r.stderr
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--reference", hf, "--data", files["pairs"],
            "--max-steps", "1", "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr


def test_sft_from_a_folder_with_chat_template_jinja_keeps_the_template(cli, chat_ws, tmp_path):
    ws, files = chat_ws
    hf = resave_with_transformers(ws / "models/base", tmp_path / "hf")
    assert (hf / "chat_template.jinja").is_file()
    r = cli("-w", ws, "align", "--method", "sft", "--policy", hf, "--data", files["chats"], "--max-steps", "1",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    out = ws / "models/sft"
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tok = Tokenizer(out)
    assert tok.chat_template == CHAT_TEMPLATE and tok.has_chat_template
    # ... so the next stage takes it as a chat policy
    r = cli("-w", ws, "align", "--method", "dpo", "--data", files["pairs"], "--max-steps", "1", "--val-fraction", "0",
            *FAST, "--json")
    assert r.code == 0, r.stderr


# ---------------------------------------------------------------- readers and row formats
PAIR_ROWS = [{"prompt": q, "chosen": a, "rejected": "No. " + a} for q, a in CHAT_LINES]


def test_a_save_to_disk_folder_is_read_as_rows_not_its_metadata(tmp_path):
    import datasets

    from prefcli.data.readers import expand_inputs, read_rows

    datasets.Dataset.from_list(PAIR_ROWS).save_to_disk(str(tmp_path / "pairs"))
    rows = read_rows([tmp_path / "pairs"], required=("prompt", "chosen", "rejected"))
    assert [r["chosen"] for r in rows] == [a for _, a in CHAT_LINES]
    assert rows[0]["_source"] == f"{tmp_path / 'pairs'}:1"
    # a DatasetDict folder gives its train split; an .arrow shard reads on its own
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIR_ROWS[:3]),
                          "test": datasets.Dataset.from_list(PAIR_ROWS[3:])}).save_to_disk(str(tmp_path / "dd"))
    assert len(read_rows([tmp_path / "dd"])) == 3
    assert len(read_rows([tmp_path / "dd" / "test"])) == 1
    shard = next((tmp_path / "pairs").glob("*.arrow"))
    assert len(read_rows([shard])) == 4
    # a folder holding a saved dataset: its shards are data, its json metadata is not
    assert [p.suffix for p in expand_inputs([tmp_path / "pairs"])] == [""]
    import shutil as sh

    sh.copytree(tmp_path / "pairs", tmp_path / "parent" / "pairs")
    assert [p.suffix for p in expand_inputs([tmp_path / "parent"])] == [".arrow"]
    assert len(read_rows([tmp_path / "parent"])) == 4


def test_a_datasets_folder_without_the_package_names_the_extra(tmp_path, monkeypatch):
    import sys

    import datasets

    from prefcli.data.readers import read_rows

    datasets.Dataset.from_list(PAIR_ROWS).save_to_disk(str(tmp_path / "pairs"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PrefcliError) as e:
        read_rows([tmp_path / "pairs"])
    assert "needs the datasets package" in e.value.message and e.value.hint == "pip install 'prefcli[datasets]'"


def test_a_hub_name_says_download_it_first(cli, chat_ws):
    ws, _ = chat_ws
    r = cli("-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", "HuggingFaceH4/ultrafeedback_binarized")
    assert r.code == 2
    line = r.stderr.strip()
    assert "\n" not in line  # one line
    assert "HuggingFaceH4/ultrafeedback_binarized is not a local file or folder" in line
    assert "download it first" in line and "load_dataset('HuggingFaceH4/ultrafeedback_binarized')" in line
    assert "huggingface-cli download HuggingFaceH4/ultrafeedback_binarized --repo-type dataset" in line


def test_sharegpt_rows_and_content_parts():
    from prefcli.data.examples import chat_from_row, pair_from_row, prompt_from_row

    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi?"},
                                  {"from": "gpt", "value": "Hello."}], "_source": "f.jsonl:3"}
    assert chat_from_row(sharegpt) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                       {"role": "assistant", "content": "Hello."}]
    assert prompt_from_row(sharegpt)[-1] == {"role": "user", "content": "Hi?"}
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "plus?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "Four."}]}]}
    assert chat_from_row(parts)[0]["content"] == "Two plus?"
    pair = pair_from_row({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Q"}]}],
                          "chosen": [{"from": "gpt", "value": "A"}], "rejected": [{"from": "gpt", "value": "B"}]})
    assert pair.prompt[0]["content"] == "Q" and pair.chosen[0] == {"role": "assistant", "content": "A"}
    with pytest.raises(PrefcliError, match=r"f.jsonl:3: message 0 of 'conversations' is from 'robot'"):
        chat_from_row({"conversations": [{"from": "robot", "value": "x"}], "_source": "f.jsonl:3"})
    with pytest.raises(PrefcliError, match="has a 'image_url' content part"):
        chat_from_row({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]})


def test_sft_trains_on_a_sharegpt_datasets_folder(cli, chat_ws, tmp_path):
    import datasets

    ws, _ = chat_ws
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in CHAT_LINES]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chats"))
    r = cli("-w", ws, "align", "--method", "sft", "--data", tmp_path / "chats", "--max-steps", "1",
            "--val-fraction", "0", *FAST, "--json")
    assert r.code == 0, r.stderr
    assert r.json()["examples"] == 4


# ---------------------------------------------------------------- eval compare --judge-fn
JUDGE = '''
def score(prompts, replies):
    return [1.0 if len(r) % 2 == 0 else -1.0 for r in replies]


def half(prompts, replies):
    return [0.5 for _ in replies]
'''


def test_eval_compare_by_the_users_judge(cli, chat_ws, tmp_path, monkeypatch):
    ws, files = chat_ws
    (tmp_path / "my_judge.py").write_text(JUDGE)
    monkeypatch.chdir(tmp_path)  # the module is found next to where prefcli runs, as --reward-fn's
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q, _ in CHAT_LINES * 3])
    assert cli("-w", ws, "align", "--method", "sft", "--policy", "base", "--data", files["chats"], "--max-steps", "3",
               "--lr", "1e-2", "--val-fraction", "0", *FAST).code == 0
    r = cli("-w", ws, "eval", "compare", "--model", "sft", "--reference", "base", "--prompts", prompts,
            "--judge-fn", "my_judge:score=2", "--judge-fn", "my_judge:half", "--max-tokens", "8", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["judge_fn"] == ["my_judge:score", "my_judge:half"] and not doc["gold_judge"]

    def by_hand(text):
        return 2 * (1.0 if len(text) % 2 == 0 else -1.0) + 0.5

    mine = [row["replies"]["sft"][0] for row in doc["samples"]]
    ref = [row["reference"][0] for row in doc["samples"]]
    assert [s["judge"] for s in mine] == [by_hand(s["text"]) for s in mine]
    good = sum(by_hand(s["text"]) > 0 for s in mine) / len(mine)
    st = doc["models"]["sft"]
    assert st["judge"]["good"]["rate"] == pytest.approx(good) and st["judge"]["good"]["n"] == 12
    assert st["judge"]["score"]["mean"] == pytest.approx(sum(by_hand(s["text"]) for s in mine) / 12)
    wins = [1.0 if by_hand(a["text"]) > by_hand(b["text"]) else 0.5 if by_hand(a["text"]) == by_hand(b["text"]) else 0.0
            for a, b in zip(mine, ref)]
    win = st["vs_reference"]["win_rate_judge"]
    assert win["rate"] == pytest.approx(sum(wins) / 12)
    lo, hi = win["ci"]
    assert lo <= win["rate"] <= hi
    assert doc["meta"]["metrics"]["sft/win_rate"] == pytest.approx(sum(wins) / 12)
    assert {"kind": "reward_fn", "name": "my_judge:score"} in doc["meta"]["parents"]
    # the table has the judge's rows; a bad spec names --judge-fn
    r = cli("-w", ws, "eval", "compare", "--model", "sft", "--reference", "base", "--prompts", prompts,
            "--judge-fn", "my_judge:score", "--max-tokens", "4", "--out", "t")
    assert r.code == 0 and "judge good rate (score > 0)" in r.stderr and "(judge fn)" in r.stderr
    r = cli("-w", ws, "eval", "compare", "--model", "sft", "--prompts", prompts, "--judge-fn", "my_judge:nope", "--out", "u")
    assert r.code == 2 and "--judge-fn my_judge:nope: my_judge has no function nope" in r.stderr


# ---------------------------------------------------------------- the demo default, for demo models only
def test_descends_from_demo_follows_lineage(tmp_path):
    from prefcli.data.demo import descends_from_demo

    def artifact(name, parents):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"name": name, "parents": parents}))
        return {"kind": "models", "name": name, "path": str(tmp_path / name)}

    tok = artifact("tok", [{"kind": "input", "name": "demo corpus (built-in, seed 0)"}])
    base = artifact("base", [{"kind": "tokenizers", "name": "tok", "path": tok["path"]}])
    sft = artifact("sft", [base, {"kind": "input", "path": "/data/chats.jsonl"}])
    mine = artifact("mine", [{"kind": "input", "path": "/data/corpus.txt", "size": 10}])
    mine_sft = artifact("mine-sft", [mine, {"kind": "input", "path": "/data/chats.jsonl"}])
    assert descends_from_demo(tmp_path / "sft") and descends_from_demo(tmp_path / "tok")
    assert not descends_from_demo(tmp_path / "mine-sft") and not descends_from_demo(tmp_path / "mine")
    assert descends_from_demo({"parents": [{"kind": "demo", "name": "eval_prompts"}]})
    assert not descends_from_demo(tmp_path / "nowhere")  # an HF folder made elsewhere: no meta.json
    assert sft and mine_sft


def test_a_model_of_your_own_needs_prompts(cli, chat_ws, tmp_path):
    from conftest import tree_snapshot

    ws, _ = chat_ws  # 'base' records no demo data in its lineage
    before = tree_snapshot(ws)
    for args in (["align", "--method", "rloo", "--policy", "base", "--reward-fn", "demo", "--max-tokens", "8"],
                 ["align", "--method", "dpo", "--policy", "base", "--pairs-from-policy", "4", "--reward-fn", "demo", "--max-tokens", "8"],
                 ["eval", "compare", "--model", "base"]):
        r = cli("-w", ws, *args)
        assert r.code == 2, (args, r.stderr)
        assert "--prompts: no prompts given, and base was not made from the built-in demo data" in r.stderr
        assert "pass --prompts FILE" in r.stderr
    assert tree_snapshot(ws) == before


# ---------------------------------------------------------------- default steps are passes over the data
def test_default_steps_scale_with_the_data():
    from prefcli.stages import preference, reward, sft
    from prefcli.artifacts import train_config

    rcfg = reward.RewardConfig()
    # 3.37 passes: 1,900 pairs at batch 32 -> ceil(3.37 * 1900 / 32) = 201 steps; the demo's 22,800 -> 2,402
    assert train_config(rcfg, 1900, reward.DEFAULT_STEPS, reward.DEFAULT_EPOCHS).max_steps == 201
    assert train_config(rcfg, 22800, reward.DEFAULT_STEPS, reward.DEFAULT_EPOCHS).max_steps == 2402
    pcfg = preference.PreferenceConfig()
    assert train_config(pcfg, 2000, preference.DEFAULT_STEPS, preference.DEFAULT_EPOCHS).max_steps == 300  # the demo
    assert train_config(pcfg, 200, preference.DEFAULT_STEPS, preference.DEFAULT_EPOCHS).max_steps == 30
    scfg = sft.SFTConfig()
    assert train_config(scfg, 2850, sft.DEFAULT_STEPS, sft.DEFAULT_EPOCHS).max_steps == 150  # the demo, as before
    # --max-steps and --epochs still win; no count: the fixed default
    assert train_config(reward.RewardConfig(max_steps=7), 1900, 2400, 3.4).max_steps == 7
    assert train_config(reward.RewardConfig(epochs=1.0), 1900, 2400, 3.4).max_steps == 60
    assert train_config(rcfg, None, 2400, 3.4).max_steps == 2400


def test_rl_default_steps_are_passes_over_the_prompts():
    from prefcli.stages.rl import RLConfig, resolve

    for method in ("ppo", "grpo", "rloo"):
        cfg = resolve(RLConfig(method=method))
        per_batch = cfg.batch_size // cfg.num_generations  # prompts per batch of rollouts
        assert math.ceil(cfg.epochs * 1000 / per_batch) * cfg.ppo_epochs == 300  # the demo's 1,000 prompts
    assert resolve(RLConfig(method="rloo", max_steps=5)).epochs is None


def test_dpo_defaults_to_an_nll_term_except_orpo():
    from prefcli.stages.preference import PreferenceConfig

    assert PreferenceConfig(method="dpo").resolved().rpo_alpha == 1.0
    assert PreferenceConfig(method="orpo").resolved().rpo_alpha == 0.0
    assert PreferenceConfig(method="dpo", rpo_alpha=0.0).resolved().rpo_alpha == 0.0


# ---------------------------------------------------------------- the collapse guard, end to end
def test_a_collapsing_dpo_run_is_stopped_and_nothing_is_saved(cli, chat_ws):
    ws, files = chat_ws
    args = ["-w", ws, "align", "--method", "dpo", "--policy", "base", "--data", files["pairs"], "--rpo-alpha", "0",
            "--lr", "0.05", "--max-steps", "60", "--val-fraction", "0", "--save-every", "5", *FAST]
    r = cli(*args)  # checkpoints every 5 steps: the stopped run's folder stays, to read and resume
    assert r.code == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]  # after the progress lines: one error line
    assert line.startswith("error: collapse guard: chosen log-prob fell")
    assert "rerun with --rpo-alpha 1 or a lower --lr" in line and "the model was not saved" in line
    assert not (ws / "models/dpo").exists()
    steps = [json.loads(x)["step"] for x in (ws / "runs/dpo/metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) < 60  # stopped early
    # --guard warn trains on, saves the model and records the warning
    r = cli(*args, "--guard", "warn", "--overwrite", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["guard_warning"].startswith("chosen log-prob fell")
    assert "warning: collapse guard: chosen log-prob fell" in r.stderr

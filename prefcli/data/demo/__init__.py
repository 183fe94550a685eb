"""The built-in demo data: the town of Millbrook, its splits and its gold judge.

Everything is made by seeded Python code at call time (no downloads, no big
files); see README.md beside this file for the world, the splits and the rules.
"""

from prefcli.data.demo.judge import ATTRIBUTES, is_good, judge, prompt_category
from prefcli.data.demo.lineage import descends_from_demo, require_prompts_unless_demo
from prefcli.data.demo.prompts import CATEGORIES
from prefcli.data.demo.splits import (corpus_documents, eval_prompts, preference_pairs,
                                      rl_prompts, sft_conversations, write_demo_files)

__all__ = ["ATTRIBUTES", "CATEGORIES", "corpus_documents", "descends_from_demo", "eval_prompts", "is_good", "judge",
           "preference_pairs", "prompt_category", "require_prompts_unless_demo", "rl_prompts", "sft_conversations",
           "write_demo_files"]

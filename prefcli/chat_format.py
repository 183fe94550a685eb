"""The chat format every prefcli tokenizer carries: special tokens and the Jinja template.

The same template string goes into tokenizer_config.json, so transformers'
`apply_chat_template` renders exactly the text (and so the ids) prefcli uses.
"""

from __future__ import annotations

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END]
ROLES = ("system", "user", "assistant")

# One message is <|role|>content<|end|>; a conversation starts with <|bos|>.
# {% generation %} marks assistant text for transformers' return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' }}{{ message['content'] }}<|end|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The text the chat template gives for `messages` (no Jinja needed for our own format)."""
    parts = [BOS]
    for m in messages:
        parts.append(f"<|{m['role']}|>{m['content']}{END}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)

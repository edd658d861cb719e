"""Prompts for online RL: what the policy answers, and the fields its rewards read.

Read in the forms people have, detected per file from its first record:
- standard: `prompt` a string (one user message);
- conversational: `prompt` or `messages` a message list (the conversation so far, ending in a user turn; a system
  message allowed), as TRL's prompt-only datasets hold them.

Every other field of the record (an `answer`, a `solution`, test cases...) is kept for the rewards. One form out:
{"prompt": [messages], "fields": {...}}, stored as JSON in a shard's `text` column like a conversation. A record
with no prompt, an empty one, one that ends in an assistant turn, or one missing a field a reward reads is a bad
record, skipped and named by file, line and field.
"""

from __future__ import annotations

from llmray.data.pairs import message_list

PROMPT_KEYS = ("prompt", "messages")


def detect_prompt_format(obj: dict) -> str | None:
    """`standard` or `conversational` for a record that holds a prompt, else None."""
    if not isinstance(obj, dict):
        return None
    key = next((k for k in PROMPT_KEYS if k in obj), None)
    if key is None:
        return None
    return "standard" if isinstance(obj[key], str) else "conversational"


def normalize_prompt(obj: dict, fmt: str, required: tuple[str, ...] = ()) -> dict:
    """The prompt of one record in format `fmt`, with its other fields; ValueError naming the field when it is
    malformed or a `required` field (one a reward reads) is missing."""
    key = next((k for k in PROMPT_KEYS if k in obj), None)
    if key is None:
        raise ValueError("no field 'prompt' or 'messages'")
    value = obj[key]
    prompt = [{"role": "user", "content": value}] if isinstance(value, str) else message_list(value, key)
    if not "".join(m["content"] for m in prompt).strip():
        raise ValueError(f"field {key!r} is empty")
    if prompt[-1]["role"] == "assistant":
        raise ValueError(f"field {key!r} ends in an assistant message: a prompt ends where the policy answers")
    missing = [f for f in required if obj.get(f) is None]
    if missing:
        raise ValueError(f"field {missing[0]!r} is missing (a reward reads it)")
    return {"prompt": prompt, "fields": {k: v for k, v in obj.items() if k != key}}

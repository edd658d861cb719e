"""Preference pairs for DPO-style fine-tuning: for a prompt, a chosen answer and a rejected one.

Read in the formats people have, detected per file from its first record (TRL's names):
- standard: `prompt`, `chosen`, `rejected` as strings;
- conversational: the same keys as message lists (`prompt` the conversation so far, `chosen`/`rejected` the
  assistant's turns);
- implicit prompt: `chosen` and `rejected` only, whole transcripts sharing their beginning (Anthropic HH): the
  shared turns (or, for strings, the shared text) are the prompt.

One form out: {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}, stored
as JSON in a shard's `text` column like a conversation. A pair whose sides are empty or identical, or that shares
no prompt, is a bad record, skipped and named by file, line and field.
"""

from __future__ import annotations

KEYS = ("chosen", "rejected")


def detect_pair_format(obj: dict) -> str | None:
    """`standard`, `conversational` or `implicit` for a record that is a preference pair, else None. A record whose
    sides are whole transcripts is implicit even beside a `prompt` (UltraFeedback's prompt string next to
    [user, assistant] sides), as TRL's `maybe_extract_prompt` reads it."""
    if not isinstance(obj, dict) or not all(k in obj for k in KEYS):
        return None
    chosen = obj["chosen"]
    if "prompt" not in obj or (isinstance(chosen, list) and chosen and isinstance(chosen[0], dict)
                               and chosen[0].get("role") != "assistant"):
        return "implicit"
    return "conversational" if isinstance(obj["prompt"], list) else "standard"


def message_list(value, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {field!r} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in \
                ("system", "user", "assistant"):
            raise ValueError(f"field '{field}[{i}]' must be a message: {{role: system/user/assistant, content: "
                             "string}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def normalize_pair(obj: dict, fmt: str) -> dict:
    """The pair of one record in format `fmt`; ValueError naming the field when it is malformed."""
    if fmt == "implicit":
        chosen, rejected = obj.get("chosen"), obj.get("rejected")
        if isinstance(chosen, str) and isinstance(rejected, str):
            shared = _shared_text(chosen, rejected)
            if not shared:
                raise ValueError("fields 'chosen' and 'rejected' share no prompt")
            prompt = [{"role": "user", "content": shared}]
            chosen, rejected = message_list(chosen[len(shared):], "chosen"), message_list(rejected[len(shared):], "rejected")
        else:
            chosen, rejected = message_list(chosen, "chosen"), message_list(rejected, "rejected")
            n = 0
            while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
                n += 1
            if n == 0:
                raise ValueError("fields 'chosen' and 'rejected' share no prompt (their first messages differ)")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = obj.get("prompt")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else message_list(prompt, "prompt")
        if not prompt or not "".join(m["content"] for m in prompt).strip():
            raise ValueError("field 'prompt' is empty")
        chosen, rejected = message_list(obj.get("chosen"), "chosen"), message_list(obj.get("rejected"), "rejected")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if not side or not "".join(m["content"] for m in side).strip():
            raise ValueError(f"field {key!r} is empty")
        if side[0]["role"] != "assistant":
            raise ValueError(f"field {key!r} must start with the assistant's answer (got a {side[0]['role']} message)")
    if chosen == rejected:
        raise ValueError("fields 'chosen' and 'rejected' are identical: nothing to prefer")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _shared_text(a: str, b: str) -> str:
    """The common beginning of two transcripts, as TRL's `extract_prompt` takes it (a space before the first
    difference stays with the answers)."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    if 0 < n < min(len(a), len(b)) and a[n - 1] == " ":
        n -= 1
    return a[:n]

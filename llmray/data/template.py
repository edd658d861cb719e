"""Chat templates: a conversation into tokens, and which of them the assistant wrote (the only ones trained on).

The tokenizer's own chat template is used when it has one; otherwise CHATML, the default `llmray tokenizer train`
writes into its tokenizers (with CHAT_TOKENS as special tokens), so pretrain -> fine-tune -> serve works with our
own tokenizers. The server's chat endpoint renders prompts with the same function.
"""

from __future__ import annotations

import numpy as np

CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
END_OF_TURN = CHAT_TOKENS[1]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IGNORE_INDEX = -100  # the label of a token that is not trained on (PyTorch's and transformers' ignore_index)


class TemplateError(ValueError):
    pass


def chat_template(tokenizer) -> str:
    return tokenizer.chat_template or CHATML


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def stop_token_ids(tokenizer) -> list[int]:
    """Where an assistant's turn ends: EOS, and the template's end-of-turn token when the tokenizer has it."""
    ids = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN) if END_OF_TURN in tokenizer.get_vocab() else None
    return ids + [end] if end is not None and end not in ids else ids


def encode_chat(tokenizer, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, True where the assistant wrote the token). An assistant turn's span is the text the template adds
    after the prompt for it (`add_generation_prompt`) up to the end of that turn, its end-of-turn marker included
    (so the model learns to stop); tokens are assigned to spans by their character offsets in the whole text."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True)) if i else 0
        through = render(tokenizer, messages[:i + 1])
        if not full.startswith(through):
            raise TemplateError("the chat template renders a conversation's beginning differently on its own; "
                                "assistant tokens cannot be located")
        spans.append((start, len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (starts >= a) & (starts < b)
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a prompt as the policy answers it: rendered with the generation prompt (an RL prompt)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False).input_ids


def encode_completion(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids of prompt + completion, True on the completion's tokens): a preference pair's side, whose loss is
    on its completion only (earlier assistant turns in the prompt are context). The completion starts where the
    prompt's rendering with the generation prompt ends, as TRL's DPOTrainer splits them."""
    head = render(tokenizer, prompt, add_generation_prompt=True)
    full = render(tokenizer, prompt + completion)
    if not full.startswith(head):
        raise TemplateError("the chat template renders the prompt differently on its own; the completion cannot be "
                            "located")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
    return ids, starts >= len(head)

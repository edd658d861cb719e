"""A fine-tuning task whose answers a script can check: which category a word is in (animal, colour, number,
fruit), asked in eight phrasings. `make` writes the training conversations and a held-out set (word and phrasing
pairs never trained on; every word is seen in other phrasings); `score` prints a model's exact-match accuracy on
the held-out set.

    python jobs/chat_task.py make demo/chat demo/heldout.jsonl
    python jobs/chat_task.py score demo/sft demo/heldout.jsonl
"""

import json
import random
import sys
from pathlib import Path

import _entry  # noqa: F401 - the llmray of this checkout first on sys.path, as for every jobs/ script

WORDS = {
    "animal": ["cat", "dog", "horse", "lion", "tiger", "rabbit", "eagle", "shark", "wolf", "bear"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"],
    "number": ["seven", "twelve", "forty", "hundred", "three", "nine", "eleven", "twenty", "sixty", "eight"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
}
PHRASINGS = [
    "Which category is the word '{w}' in: animal, colour, number or fruit?",
    "What kind of thing is '{w}'?",
    "'{w}' belongs to which category?",
    "Classify this word: {w}",
    "Is {w} an animal, a colour, a number or a fruit?",
    "Category of '{w}'?",
    "Tell me the category of the word {w}.",
    "Put '{w}' in its category.",
]
HELD_OUT = 0.2


def conversations(seed: int = 0) -> tuple[list, list]:
    rng = random.Random(seed)
    train, held = [], []
    for label, words in WORDS.items():
        for w in words:
            for phrasing in PHRASINGS:
                conv = [{"role": "user", "content": phrasing.format(w=w)}, {"role": "assistant", "content": label}]
                (held if rng.random() < HELD_OUT else train).append(conv)
    rng.shuffle(train)
    return train, held


def make(out_dir: str, held_out: str) -> None:
    train, held = conversations()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in train))
    Path(held_out).write_text("".join(json.dumps({"messages": c}) + "\n" for c in held))
    print(f"{len(train)} training conversations in {out_dir}/train.jsonl, {len(held)} held out in {held_out}")


def score(model_dir: str, held_out: str) -> None:
    from llmray.eval import chat_exact_match

    convs = [json.loads(line)["messages"] for line in Path(held_out).read_text().splitlines() if line.strip()]
    result = chat_exact_match(model_dir, convs)
    for a in result["answers"][:5]:
        print(f"  {a['prompt']!r} -> {a['answer']!r} (expected {a['reference']!r})")
    print(f"exact match on {result['n']} held-out prompts: {result['exact_match']:.1%} ({model_dir})")


if __name__ == "__main__":
    {"make": make, "score": score}[sys.argv[1]](*sys.argv[2:])

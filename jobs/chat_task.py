"""A fine-tuning task whose answers a script can check: which category a word is in (animal, colour, number,
fruit), asked in eight phrasings. It writes the training conversations; the held-out word-and-phrasing pairs (never
trained on; every word is seen in other phrasings) are the eval task tasks/word_category.yaml.

    python jobs/chat_task.py demo/chat
    llmray eval demo/sft --task tasks/word_category.yaml

With --prompts it writes the training prompts with their answers instead (prompts.jsonl: prompt, answer), what
jobs/rl_demo.sh's GRPO run answers and is rewarded on.
"""

import json
import random
import sys
from pathlib import Path

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


def make(out_dir: str) -> None:
    train, held = conversations()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "train.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in train))
    print(f"{len(train)} training conversations in {out_dir}/train.jsonl; {len(held)} held out "
          "(tasks/data/word_category.jsonl)")


def held_out_task_lines() -> list[dict]:
    """The lines of tasks/data/word_category.jsonl."""
    return [{"question": c[0]["content"], "category": c[1]["content"]} for c in conversations()[1]]


def make_prompts(out_dir: str) -> None:
    train, _ = conversations()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": c[0]["content"], "answer": c[1]["content"]}) + "\n" for c in train))
    print(f"{len(train)} training prompts with their answers in {out_dir}/prompts.jsonl")


if __name__ == "__main__":
    (make_prompts if "--prompts" in sys.argv[2:] else make)(sys.argv[1])

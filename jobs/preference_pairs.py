"""Preference pairs from a model's own mistakes, for jobs/preference_demo.sh: on the training prompts of
jobs/chat_task.py's task (which category a word is in), chosen = the right category, rejected = the wrong answer
the model actually gives there, greedily. The answers come from `llmray eval` (the same generation the held-out
accuracy is scored with: chat template, greedy, 8 new tokens), run on a task file of the training prompts that
`prompts` writes; `pairs` turns its answers JSON into pairs JSONL (TRL's standard format: prompt, chosen,
rejected as strings).

A prompt the model already answers right gets the right answer chosen and, rejected, the wrong answer the model
gives most often on the other prompts, so every rejected side is something the model says; when that is the
prompt's own right answer too (a model answering one category to everything), the prompt is skipped.
`--skip-right` skips every prompt answered right. The held-out prompts of tasks/word_category.yaml are never used.

    python jobs/preference_pairs.py prompts demo/prefs
    llmray eval demo/sft_partial --task demo/prefs/word_category_train.yaml --out demo/prefs/answers.json
    python jobs/preference_pairs.py pairs demo/prefs/answers.json demo/prefs/pairs
"""

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from chat_task import conversations  # noqa: E402

from llmray.evals.metrics import normalize  # noqa: E402

TASK = "word_category_train"  # the task file's name, which names its answers in the eval JSON


def write_prompts(out_dir: str) -> None:
    """The training prompts as an eval task: `<out_dir>/word_category_train.{yaml,jsonl}`, scored like
    tasks/word_category.yaml (only the data differs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, _ = conversations()
    lines = [{"question": c[0]["content"], "category": c[1]["content"]} for c in train]
    (out / f"{TASK}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    task = (Path(__file__).parent.parent / "tasks" / "word_category.yaml").read_text()
    (out / f"{TASK}.yaml").write_text(task.replace("data/word_category.jsonl", f"{TASK}.jsonl"))
    print(f"{len(lines)} training prompts in {out / TASK}.yaml")


def write_pairs(answers_json: str, out_dir: str, skip_right: bool = False) -> None:
    """A pair per training prompt in `<out_dir>/pairs.jsonl`: rejected is the model's own wrong answer or, where
    it is right, its most common wrong answer elsewhere (none with `skip_right`)."""
    answers = json.loads(Path(answers_json).read_text())["answers"][TASK]
    questions = [c[0]["content"] for c in conversations()[0]]
    wrong = Counter(a["answer"].strip() for a in answers
                    if a["answer"].strip() and normalize(a["answer"]) != normalize(a["reference"]))
    pairs, kinds = [], Counter()
    for a in answers:
        answer, right = a["answer"].strip(), a["reference"]
        if normalize(answer) == normalize(right):
            others = [w for w, _ in wrong.most_common() if normalize(w) != normalize(right)]
            if skip_right or not others:
                continue
            answer, kind = others[0], "right: its most common wrong answer rejected"
        elif not answer:  # an empty answer cannot be a rejected side (the reader skips empty sides)
            continue
        else:
            kind = "wrong: its answer rejected"
        pairs.append({"prompt": questions[a["line"] - 1], "chosen": right, "rejected": answer})
        kinds[kind] += 1
    if not pairs:
        sys.exit(f"{answers_json}: no pairs to make (the model answers every training prompt right)")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    rejected = Counter(p["rejected"] for p in pairs).most_common(4)
    print(f"{len(pairs)} pairs from {len(answers)} training prompts in {out_dir}/pairs.jsonl: "
          + "; ".join(f"{n} {k}" for k, n in kinds.items())
          + "; rejected sides: " + ", ".join(f"{n} {r!r}" for r, n in rejected))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prompts", help="write the training prompts as an eval task").add_argument("out_dir")
    p = sub.add_parser("pairs", help="turn `llmray eval`'s answers into preference pairs")
    p.add_argument("answers_json")
    p.add_argument("out_dir")
    p.add_argument("--skip-right", action="store_true", help="no pairs for prompts the model answers right")
    args = parser.parse_args()
    if args.command == "prompts":
        write_prompts(args.out_dir)
    else:
        write_pairs(args.answers_json, args.out_dir, args.skip_right)

"""The vision demo's parts (jobs/vision_demo.sh): a picture task a script can check, a vision tower to compose, and
a held-out accuracy check.

    python jobs/vision_task.py data OUT [--seed 0] [--train 1200] [--held-out 80] [--size 32]
    python jobs/vision_task.py tower OUT [--size 32] [--patch 16] [--layers 3] [--hidden 64]
    python jobs/vision_task.py accuracy FOLDER TASK_YAML [--out JSON]
    python jobs/vision_task.py ask URL MODEL HELD_OUT_JSONL [--line 0]   # the OpenAI client, once serving takes images

`data` draws scenes with Pillow: one or two kinds of object (a shape in a colour: circle, square or triangle; red,
green, blue or yellow; no two kinds share a shape or a colour), one to three objects in all, in the cells of a 2x2
grid. Each scene is asked three questions, one of each kind: "What colour is the square?", "What shape is blue?",
"How many red circles?" (0 to 3; a third of them ask about a kind the scene does not hold). The answer is one word.
It writes, all deterministic by --seed (the held-out scenes from another stream of the same seed):

- OUT/img/*.png: the scenes;
- OUT/captions/captions.jsonl: a caption table (image, text: "two red circles and a blue square") for LLaVA's
  stage 1;
- OUT/instructions/llava.jsonl and openai.jsonl: the questions as LLaVA records (`<image>` + `images`) and OpenAI
  messages (an image_url part naming the file), half each, for stage 2; the question comes first and the image after
  it, so the image's tokens can attend to what is asked (with the image first: 52% held out, not 88%);
- OUT/held_out.jsonl (image, question, answer, kind) and OUT/held_out.yaml, an eval task file over it in the
  shape `llmray eval` takes image tasks (`image: image`, a generate task by exact match).

`tower` writes a random-init CLIP vision encoder and its image processor from a config (nothing is downloaded). Its
patch is the grid's cell (16 px of 32), so each object is one image token, and the objects sit near their cell's
middle (sizes 9-11 px, +-1 px): a random, frozen tower then gives each shape-and-colour its own features, and the
projector and the language model learn the rest. Objects anywhere in their cell with 8 px patches (16 tokens) and
the tower trained stopped at 44.6% held out (docs/vision.md).

`accuracy` is `llmray eval FOLDER --task TASK_YAML`'s answers and exact match (through `llmray.evals`, in this
process), split by the kind of question, with the chance figure eval does not report.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 50, 220), "yellow": (235, 210, 20)}
NUMBERS = ("zero", "one", "two", "three")
GROUND = (245, 245, 245)


def scene(rng: random.Random) -> list[tuple[str, str, int]]:
    """(shape, colour, count) of each kind of object in a scene: one or two kinds, three objects at most."""
    kinds = rng.choice((1, 2))
    shapes, colours = rng.sample(SHAPES, kinds), rng.sample(list(COLOURS), kinds)
    counts = [rng.randint(1, 3)] if kinds == 1 else rng.choice(([1, 1], [2, 1], [1, 2]))
    return list(zip(shapes, colours, counts))


def draw(objects: list[tuple[str, str, int]], rng: random.Random, size: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), GROUND)
    pen = ImageDraw.Draw(img)
    cell = size // 2
    cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], sum(n for _, _, n in objects))
    at = iter(cells)
    for shape, colour, n in objects:
        for _ in range(n):
            cx, cy = next(at)
            side = rng.randint(int(cell * 0.6), int(cell * 0.7))  # near the cell's middle (the module's note)
            x = cx * cell + (cell - side) // 2 + rng.randint(-1, 1)
            y = cy * cell + (cell - side) // 2 + rng.randint(-1, 1)
            box, fill = [x, y, x + side - 1, y + side - 1], COLOURS[colour]
            if shape == "circle":
                pen.ellipse(box, fill=fill)
            elif shape == "square":
                pen.rectangle(box, fill=fill)
            else:
                pen.polygon([(x + side / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def caption(objects: list[tuple[str, str, int]]) -> str:
    words = [f"{'a' if n == 1 else NUMBERS[n]} {colour} {shape}{'s' if n > 1 else ''}" for shape, colour, n in objects]
    return " and ".join(words) + "."


def questions(objects: list[tuple[str, str, int]], rng: random.Random) -> list[dict]:
    """One question of each kind about the scene."""
    shape, colour, _ = rng.choice(objects)
    held = {(s, c): n for s, c, n in objects}
    if rng.random() < 1 / 3:  # a kind the scene does not hold
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in held]
        s, c = rng.choice(absent)
    else:
        s, c = rng.choice(list(held))
    return [
        {"kind": "colour", "question": f"What colour is the {shape}?", "answer": colour},
        {"kind": "shape", "question": f"What shape is {colour}?", "answer": shape},
        {"kind": "count", "question": f"How many {c} {s}s?", "answer": NUMBERS[held.get((s, c), 0)]},
    ]


def write_data(out: Path, seed: int, n_train: int, n_held: int, size: int) -> dict:
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "captions").mkdir(exist_ok=True)
    (out / "instructions").mkdir(exist_ok=True)
    captions, llava, openai, held = [], [], [], []
    for split, n, rng in (("t", n_train, random.Random(seed)), ("h", n_held, random.Random(seed + 1_000_003))):
        for i in range(n):
            objects = scene(rng)
            name = f"img/{split}{i:05d}.png"
            (out / name).write_bytes(draw(objects, rng, size))
            for q in questions(objects, rng):
                if split == "h":  # the question, then where the image goes (`llmray eval` puts it at <image>)
                    held.append({"image": name, **q, "question": q["question"] + "<image>"})
                    continue
                answer = {"role": "assistant", "content": q["answer"]}
                if len(llava) <= len(openai):
                    llava.append({"messages": [{"role": "user", "content": q["question"] + "<image>"}, answer],
                                  "images": [f"../{name}"]})
                else:
                    openai.append({"messages": [{"role": "user", "content": [
                        {"type": "text", "text": q["question"]},
                        {"type": "image_url", "image_url": {"url": f"../{name}"}}]}, answer]})
            if split == "t":
                captions.append({"image": f"../{name}", "text": caption(objects)})
    for path, rows in ((out / "captions" / "captions.jsonl", captions), (out / "instructions" / "llava.jsonl", llava),
                       (out / "instructions" / "openai.jsonl", openai), (out / "held_out.jsonl", held)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "held_out.yaml").write_text(
        "# Held-out questions about Pillow-drawn scenes (jobs/vision_task.py): `llmray eval FOLDER --task THIS`;\n"
        "# `python jobs/vision_task.py accuracy FOLDER THIS` adds the split by kind of question.\n"
        "name: shapes\ndata: held_out.jsonl\ntype: generate\ninput: question\ntarget: answer\nimage: image\n"
        "chat: true\nmetrics: [accuracy, exact_match]\nmax_new_tokens: 4\n")
    return {"train_images": n_train, "captions": len(captions), "instructions": len(llava) + len(openai),
            "held_out_images": n_held, "held_out_questions": len(held)}


def write_tower(out: Path, size: int, patch: int, layers: int, hidden: int, seed: int) -> dict:
    import torch
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                              num_attention_heads=max(1, hidden // 32), image_size=size, patch_size=patch)
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(out)
    return {"out": str(out), "image_tokens": (size // patch) ** 2, "layers": layers, "hidden": hidden}


def accuracy(folder: str, task_file: str, out: str | None) -> dict:
    """`llmray eval`'s answers and exact match on the held-out task (`llmray.evals`: the folder's processor, greedy,
    batched), split by the kind of question each line records, with the chance figure eval does not give."""
    from llmray.evals.backends import LocalModel
    from llmray.evals.metrics import normalize
    from llmray.evals.score import answer
    from llmray.evals.tasks import load_task

    task = load_task(task_file)
    said = [o["answer"] for o in answer(LocalModel.from_folder(folder), task)]
    raw = (Path(task_file).parent / task.spec.data).read_text().splitlines()
    lines = [json.loads(raw[e.line - 1]) for e in task.examples]
    right: dict[str, list[bool]] = {}
    for line, e, a in zip(lines, task.examples, said):
        right.setdefault(line.get("kind", "all"), []).append(normalize(a) == normalize(e.target))
    hits = [h for v in right.values() for h in v]
    # chance: a uniform guess among the answers each kind of question has in the file
    options = {k: {normalize(e.target) for line, e in zip(lines, task.examples) if line.get("kind", "all") == k}
               for k in right}
    chance = sum(len(v) / len(options[k]) for k, v in right.items()) / len(hits)
    first = [{"question": line[task.spec.input], "answer": e.target, "said": a}
             for line, e, a in zip(lines[:6], task.examples, said)]
    report = {"model": folder, "tasks": {task.name: {
        "accuracy": sum(hits) / len(hits), "examples": len(hits), "chance": chance,
        "by_kind": {k: sum(v) / len(v) for k, v in sorted(right.items())}, "first": first}}}
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def ask(url: str, model: str, held_out: str, line: int) -> str:
    """One held-out question about its image through the official OpenAI client (an image_url part, a data: URI)."""
    from openai import OpenAI

    from llmray.data.images import data_uri

    path = Path(held_out)
    example = json.loads(path.read_text().splitlines()[line])
    uri = data_uri((path.parent / example["image"]).read_bytes())
    question = example["question"].replace("<image>", "")  # the image goes after it, as in training
    client = OpenAI(base_url=url, api_key="none")
    reply = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": uri}}]}])
    return f"{example['image']}: {question} -> {reply.choices[0].message.content!r} (right: {example['answer']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--train", type=int, default=1200, help="training scenes (three questions each)")
    d.add_argument("--held-out", type=int, default=80, help="held-out scenes (three questions each)")
    d.add_argument("--size", type=int, default=32, help="image side, pixels")
    t = sub.add_parser("tower")
    t.add_argument("out")
    t.add_argument("--size", type=int, default=32)
    t.add_argument("--patch", type=int, default=16, help="the grid cell's side: one image token a cell")
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("accuracy")
    a.add_argument("folder")
    a.add_argument("task")
    a.add_argument("--out")
    q = sub.add_parser("ask")
    for name in ("url", "model", "held_out"):
        q.add_argument(name)
    q.add_argument("--line", type=int, default=0)
    args = p.parse_args()
    if args.cmd == "data":
        print(json.dumps(write_data(Path(args.out), args.seed, args.train, args.held_out, args.size)))
    elif args.cmd == "tower":
        print(json.dumps(write_tower(Path(args.out), args.size, args.patch, args.layers, args.hidden, args.seed)))
    elif args.cmd == "accuracy":
        r = next(iter(accuracy(args.folder, args.task, args.out)["tasks"].values()))
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in r["by_kind"].items())
        print(f"held-out accuracy {r['accuracy']:.1%} of {r['examples']} ({kinds}; chance {r['chance']:.1%}) — "
              f"{args.folder}")
    else:
        print(ask(args.url, args.model, args.held_out, args.line))


if __name__ == "__main__":
    main()

"""What image conversations cost on llmray's path (issue 29).

1. Images/s through the stream (Ray Data tokenize tasks running `data/pixels.py` with the model's processor, the
   catalog, one rank draining an epoch: `CatalogActor` + `RankStream`, as the training stream does), start-up
   included, against the same processor alone in one process (`pixels.image_rows` on the same shard records: the
   image decoded, the CLIP processor (Pillow) at 224 px, the `<image>` placeholder expanded) over the same conversations.
   Images: Pillow-drawn JPEGs of 300-600 px. The ratio is also given per CPU (the stream's rate over its tasks).
2. The data-wait share of step time while `llmray.train.trainer.fit` trains a small LLaVA (CLIP tower 224 px,
   patch 16: 196 image tokens; 2-layer Llama) on those conversations: 2 CPU workers, ZeRO-2, tower frozen.
3. Tokens/s and peak memory of a worker (process RSS) with the tower frozen (the default) against
   `vision.train_tower: true`, same model, data and steps.

    python benchmarks/vision.py [--images 3200] [--steps 16] [--tasks 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
import uuid

from common import emit, stdlib_corpus, steady

SEQ = 256
IMAGE, PATCH = 224, 16  # CLIP's 224 px, 196 patches an image
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")
POOL = 256  # distinct images drawn


def draw(rng: random.Random) -> tuple[bytes, str, str]:
    """A JPEG of 300-600 px: a noisy ground, a few distractor lines, one coloured shape; (bytes, colour, shape)."""
    from PIL import Image, ImageDraw

    w, h = rng.randint(300, 600), rng.randint(300, 600)
    img = Image.effect_noise((w, h), 40).convert("RGB")
    d = ImageDraw.Draw(img)
    for _ in range(6):
        d.line([(rng.randrange(w), rng.randrange(h)), (rng.randrange(w), rng.randrange(h))],
               fill=tuple(rng.randrange(256) for _ in range(3)), width=3)
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    s = rng.randint(min(w, h) // 4, min(w, h) // 2)
    x, y = rng.randrange(w - s), rng.randrange(h - s)
    (d.rectangle if shape == "square" else d.ellipse)([x, y, x + s, y + s], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue(), colour, shape


def corpus(folder: str, n: int, seed: int = 0) -> str:
    """`n` LLaVA records naming JPEGs beside the file: "What is in the image?" / "A <colour> <shape>.". Drawing is
    slow (~0.1 s an image here), so `POOL` images are drawn and written under each record's own name in turn: every
    record's image is decoded and processed on its own all the same."""
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    rng = random.Random(seed)
    pool = [draw(rng) for _ in range(min(n, POOL))]
    with open(os.path.join(folder, "train.jsonl"), "w") as f:
        for i in range(n):
            jpeg, colour, shape = pool[i % len(pool)]
            with open(os.path.join(folder, "img", f"{i}.jpg"), "wb") as g:
                g.write(jpeg)
            f.write(json.dumps({"messages": [{"role": "user", "content": "<image>What is in the image?"},
                                             {"role": "assistant", "content": f"A {colour} {shape} on noise."}],
                                "images": [f"img/{i}.jpg"]}) + "\n")
    return folder


def llava(tokenizer_dir: str, out: str) -> str:
    """A random-init LLaVA: a 2-layer CLIP tower at 224 px (patch 16), a 2-layer Llama, the stdlib tokenizer with
    `<image>` and ChatML, the CLIP image processor at its usual settings (resize 224, centre crop 224)."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llmray.data.template import CHATML

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.image_token = "<image>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHATML)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=IMAGE, patch_size=PATCH, projection_dim=128),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                num_attention_heads=8, max_position_embeddings=SEQ, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def shard(src: str, out: str, model: str) -> str:
    from llmray.data.chat import shard_conversations
    from llmray.data.pixels import load_processor

    processor = load_processor(model)
    shard_conversations(src, out, processor.tokenizer, SEQ, kind="images", max_images=1, processor=processor)
    return out


def alone(shards: str, model: str) -> tuple[int, float]:
    """(images, seconds): `pixels.image_rows` over the shard records in one process, 64 records a call (the
    stream's batch), records already read (the stream also reads Parquet)."""
    import pyarrow.parquet as pq

    from llmray.data.corpus import list_shards
    from llmray.data.pixels import image_rows, load_processor

    processor = load_processor(model)
    records = [json.loads(t) for s in list_shards(shards) for t in pq.read_table(s.path, columns=["text"])
               .column(0).to_pylist()]
    image_rows(processor, records[:8], SEQ, 1)  # warm-up
    start = time.perf_counter()
    images = 0
    for i in range(0, len(records), 64):
        images += int(image_rows(processor, records[i:i + 64], SEQ, 1)["image_count"].sum())
    return images, time.perf_counter() - start


def through_stream(shards: str, model: str, tasks: int, cpus: int) -> dict:
    """One rank draining one epoch of the image stream: images, seconds (start-up included), first batch's wait."""
    from llmray.data.catalog import CatalogActor
    from llmray.data.pack import StreamSpec
    from llmray.data.split import Documents
    from llmray.data.stream import RankStream

    spec = StreamSpec.of([("images", 1.0, Documents(shards))], model, SEQ, seed=0, batch_docs=64, max_epochs=1,
                         documents="images", max_images=1, tasks=tasks, cpus_per_task=cpus / tasks)
    start = time.perf_counter()
    catalog = CatalogActor.remote(spec)
    images, first = 0, None
    for batch in RankStream(catalog, uuid.uuid4().hex, 0, 1, 16, prefetch=8):
        first = first if first is not None else time.perf_counter() - start
        images += int(batch["image_count"].sum())
    return {"images": images, "seconds": time.perf_counter() - start, "first_batch_s": first}


def train(model: str, data: str, storage: str, tower: bool, steps: int) -> dict:
    from llmray.recipe.load import load_recipe
    from llmray.train.checkpoint import read_state
    from llmray.train.trainer import fit

    name = "tower_trained" if tower else "tower_frozen"
    recipe = load_recipe(os.path.join(os.path.dirname(__file__), "..", "jobs", "vision_tiny.yaml"), [
        f"model.pretrained={model}", f"data.conversations={data}", f"run.storage_path={storage}", f"run.name={name}",
        f"data.seq_len={SEQ}", f"vision.train_tower={str(tower).lower()}", f"train.max_steps={steps}",
        f"train.log_every={max(1, steps // 4)}", "train.lr=1e-3", "data.val_fraction=0.0"])
    summary = fit(recipe)
    history = read_state(summary.checkpoint).history
    figures = steady(history)
    return {"steps": summary.steps, "fit_wall_s": round(summary.wall_s, 1),
            "tokens_per_s": round(figures["tokens_per_s"]), "step_time_s": round(figures["step_time_s"], 3),
            "data_wait_share": round(figures["data_wait_share"], 4),
            "data_wait_share_per_window": [round(h["data_wait_share"], 4) for h in history
                                           if h.get("data_wait_share") is not None],
            "peak_memory_gb_per_worker": round(figures["peak_memory_gb"], 3),
            "loss_first_last": [round(history[0]["loss"], 3), round(history[-1]["loss"], 3)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3200, help="conversations (one image each) for the throughput run")
    p.add_argument("--train-images", type=int, default=400, help="conversations the training runs shard")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--tasks", type=int, default=2)
    args = p.parse_args()
    import ray

    load_start = os.getloadavg()
    _, tok = stdlib_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = llava(tok, os.path.join(tmp, "llava"))
        src = corpus(os.path.join(tmp, "conversations"), args.images)
        draw_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards = shard(src, os.path.join(tmp, "shards"), model)
        shard_s = time.perf_counter() - t0
        base_images, base_s = alone(shards, model)
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_run = through_stream(shards, model, args.tasks, args.cpus)
        print(json.dumps({"alone": [base_images, base_s], "stream": ray_run}), flush=True)
        small = corpus(os.path.join(tmp, "train"), args.train_images, seed=1)
        frozen = train(model, small, os.path.join(tmp, "runs"), False, args.steps)
        full = train(model, small, os.path.join(tmp, "runs"), True, args.steps)
        ray.shutdown()
    base_rate, ray_rate = base_images / base_s, ray_run["images"] / ray_run["seconds"]
    emit("vision", {
        "load_avg_1_5_15_at_start": [round(x, 2) for x in load_start],
        "load_avg_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "machine": f"{os.cpu_count()} CPUs (the load averages say what else ran)",
        "images": {"count": args.images, "size_px": "300-600 a side, JPEG q90, Pillow-drawn",
                   "processor": f"CLIPImageProcessorPil: resize {IMAGE}, centre crop {IMAGE}; {(IMAGE // PATCH) ** 2} "
                                "image tokens", "seq_len": SEQ, "draw_s": round(draw_s, 1),
                   "shard_s": round(shard_s, 1)},
        "preprocessing": {
            "alone_one_process_images_per_s": round(base_rate, 1), "alone_images": base_images,
            "alone_s": round(base_s, 2),
            "stream_images_per_s": round(ray_rate, 1), "stream_images": ray_run["images"],
            "stream_s_incl_startup": round(ray_run["seconds"], 2), "stream_first_batch_s": round(ray_run["first_batch_s"], 2),
            "stream_after_first_batch_images_per_s": round(ray_run["images"] / (ray_run["seconds"]
                                                                                - ray_run["first_batch_s"]), 1),
            "ray_cpus": args.cpus, "tokenize_tasks": args.tasks, "cpus_per_task": args.cpus / args.tasks,
            "ranks": 1, "stream_over_alone": round(ray_rate / base_rate, 3),
            "stream_per_task_over_alone": round(ray_rate / args.tasks / base_rate, 3)},
        "training": {"model": "LLaVA: CLIP tower 2 layers x 128 at 224 px patch 16, Llama 2 layers x 256, fp32",
                     "workers": 2, "zero_stage": 2, "micro_batch": 8, "global_batch": 16,
                     "train_images": args.train_images, "tower_frozen": frozen, "tower_trained": full,
                     "trained_over_frozen_tokens_per_s": round(full["tokens_per_s"] / frozen["tokens_per_s"], 3),
                     "trained_over_frozen_peak_memory": round(full["peak_memory_gb_per_worker"]
                                                              / frozen["peak_memory_gb_per_worker"], 3)},
    })


if __name__ == "__main__":
    main()

"""Image-text fine-tuning on the real spine: a tiny random-init LLaVA learns which colour a square is, from images the
processor prepares in the stream's Ray Data tasks, trained by `llmray finetune`'s entry (`fit`) with 2 ZeRO-2 workers
(projector and language model in full, the vision tower frozen); the export loads with plain transformers, and on
held-out images its answer, chosen by log-likelihood among the colours by `llmray eval` (an image choice task), beats
the untrained model's; the same task in the recipe's eval: block, scored on the training ranks, gives the same figure."""

import json

import pytest
import torch
from helpers import COLOURS, colour_png, losses, tiny_vlm

from llmray.recipe.load import load_recipe
from llmray.train.trainer import fit

pytestmark = pytest.mark.ray

STEPS = 36
QUESTION = "What colour is the square?"


def answer(colour: str) -> str:
    return f"It is {colour}."


@pytest.fixture(scope="module")
def colour_set(tmp_path_factory):
    """192 image conversations in two formats: LLaVA records naming PNGs beside the file, and OpenAI messages with
    data: URIs; one line with a missing image, which is skipped and named."""
    import base64

    root = tmp_path_factory.mktemp("colours")
    (root / "img").mkdir()
    llava, openai = [], []
    for i in range(192):
        colour = list(COLOURS)[i % len(COLOURS)]
        png = colour_png(colour, seed=i)
        if i % 2:
            (root / "img" / f"{i}.png").write_bytes(png)
            llava.append({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                       {"role": "assistant", "content": answer(colour)}], "images": [f"img/{i}.png"]})
        else:
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            openai.append({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                                     {"type": "text", "text": QUESTION}]},
                                        {"role": "assistant", "content": answer(colour)}]})
    llava.append({"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "no"}],
                  "images": ["img/missing.png"]})
    (root / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    (root / "openai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in openai))
    return root


def square_colour(folder, pixels) -> str:
    """The colour of the square in prepared `pixels` (3, H, W): the sign of each channel where they differ from a
    plain grey image's, matched to the colours'."""
    import numpy as np
    from PIL import Image

    from llmray.data.pixels import load_processor

    grey = Image.new("RGB", (16, 16), (128, 128, 128))
    ground = np.asarray(load_processor(str(folder)).image_processor(images=[grey], return_tensors="np")["pixel_values"][0])
    diff = pixels - ground
    square = np.abs(diff).sum(0) > 1e-3
    signs = tuple(np.sign(diff[c][square].mean()) for c in range(3))
    return next(c for c, rgb in COLOURS.items() if tuple(np.sign(np.array(rgb) - 128.0)) == signs)


def answered_colour(folder, labels) -> str:
    from llmray.data.pixels import load_processor
    from llmray.data.template import IGNORE_INDEX

    text = load_processor(str(folder)).tokenizer.decode(labels[labels != IGNORE_INDEX])
    return next(c for c in COLOURS if answer(c) in text)


def held_out_task(root, n: int = 40) -> str:
    """An eval task file of `n` unseen images: the answer is the colour whose `It is <colour>.` the model finds
    likeliest after the image and the question (a choice task: label log-likelihood)."""
    (root / "img").mkdir(parents=True)
    lines = []
    for i in range(n):
        truth = list(COLOURS)[i % len(COLOURS)]
        (root / "img" / f"{i}.png").write_bytes(colour_png(truth, seed=10_000 + i))
        lines.append({"image": f"img/{i}.png", "answer": answer(truth)})
    (root / "held_out.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    choices = ", ".join(f"'{answer(c)}'" for c in COLOURS)
    (root / "held_out.yaml").write_text(f"type: choice\ndata: held_out.jsonl\nimage: image\nprompt: '{QUESTION}'\n"
                                        f"target: answer\nchoices: [{choices}]\n")
    return str(root / "held_out.yaml")


def held_out_accuracy(folder, task: str, workers: int = 1) -> tuple[float, float]:
    """(accuracy, mean log-likelihood of the right answer) of `llmray eval` on the held-out task."""
    from llmray.evals.run import evaluate

    results = evaluate(str(folder), [task], workers=workers, out=None)
    answers = results["answers"]["held_out"]
    choices = [answer(c) for c in COLOURS]
    return (results["tasks"]["held_out"]["accuracy"],
            sum(a["scores"][choices.index(a["reference"])] for a in answers) / len(answers))


def test_a_tiny_vlm_learns_the_colours_and_exports_for_plain_transformers(colour_set, ray_cluster, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from llmray.evals.run import evaluate
    from llmray.evals.tasks import TaskError
    from llmray.export.folder import export
    from llmray.train.checkpoint import read_state

    base = tiny_vlm(tmp_path / "vlm")
    task = held_out_task(tmp_path / "held_out")  # also scored on the training ranks, mid-run and at the end
    recipe = load_recipe("jobs/vision_tiny.yaml", [
        f"model.pretrained={base}", f"data.conversations={colour_set}", f"run.storage_path={tmp_path / 'runs'}",
        f"train.max_steps={STEPS}", "train.log_every=6", "data.val_fraction=0.0", f"eval.tasks={[task]}",
        f"eval.every={STEPS // 2}"])
    summary = fit(recipe)
    assert summary.steps == STEPS
    assert summary.conversations["documents"] == 192 and summary.conversations["skipped_lines"] == 1
    loss = losses(summary)
    assert loss[-1] < 0.5 * loss[0], f"the answer loss did not fall: {loss}"

    out = tmp_path / "export"
    export(summary.run_dir, str(out))
    model = AutoModelForImageTextToText.from_pretrained(out)  # plain transformers, no llmray
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    tower = [k for k in before if "vision_tower" in k]
    projector = [k for k in before if "multi_modal_projector" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower), "the frozen vision tower changed"
    assert any(not torch.equal(before[k], after[k]) for k in projector), "the projector did not train"

    untrained, trained = held_out_accuracy(base, task), held_out_accuracy(out, task, workers=2)
    while_training = [(h["step"], h["eval/held_out/accuracy"]) for h in read_state(summary.checkpoint).history
                      if "eval/held_out/accuracy" in h]
    print(f"held-out colour accuracy {untrained[0]:.2f} -> {trained[0]:.2f}, answer log-likelihood "
          f"{untrained[1]:.2f} -> {trained[1]:.2f}; on the training ranks {while_training}")
    assert trained[1] > untrained[1] + 1.0
    assert trained[0] >= 0.6 and trained[0] > untrained[0] + 0.25
    # the image task in the recipe's eval: block, on the 2 ZeRO-2 ranks with the model training: what `llmray eval`
    # gives on the export at the same step
    assert [step for step, _ in while_training] == [STEPS // 2, STEPS]
    assert summary.evals["eval/held_out/accuracy"] == pytest.approx(trained[0])

    text = tmp_path / "text.yaml"  # a text task against the vision-language export: refused, naming the task file
    (tmp_path / "text.jsonl").write_text(json.dumps({"q": QUESTION, "a": "red"}) + "\n")
    text.write_text("type: generate\ndata: text.jsonl\ninput: q\ntarget: a\n")
    with pytest.raises(TaskError, match=f"task {text} is a text task .* vision-language model"):
        evaluate(str(out), [str(text)], out=None)


# a model whose rows carry more than one fixed shape of pixel_values: (its helper, the second image size, its class, where
# its tower, projector and language model's weights are named). Qwen2.5-VL's rows are Qwen2-VL's (unit-tested alike)
SIZED = {"qwen2_vl": ((32, 16), "Qwen2VLForConditionalGeneration", "visual.", "visual.merger.", "model.layers."),
         "gemma3": ((32, 16), "Gemma3ForConditionalGeneration", "vision_tower.", "multi_modal_projector.",
                    "language_model."),
         "llava_next": ((32, 32), "LlavaNextForConditionalGeneration", "vision_tower.", "multi_modal_projector.",
                        "language_model.")}


@pytest.mark.parametrize("build", list(SIZED))
def test_a_vlm_trains_on_images_of_two_sizes_and_exports_for_plain_transformers(ray_cluster, tmp_path, build):
    """Images of two sizes in every batch, for the models whose image inputs are more than pixel_values: Qwen2-VL
    (dynamic resolution: a 16x16 image is 4 image tokens, a 32x16 one 8; M-RoPE positions the model computes from the
    rows' grids and token types), Gemma 3 (a fixed-size SigLIP processor; `<start_of_image>` expanded between its
    begin and end tokens; the rows' token types let an image's tokens attend to each other both ways) and LLaVA-NeXT
    (a 16x16 image is 3 views, a 32x32 one 5, with their image sizes). `fit`
    trains the projector (Qwen2-VL's merger, inside its tower's module) and the language model with the tower frozen;
    the export loads with plain transformers."""
    import io

    import helpers
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import load_processor
    from llmray.export.folder import export

    size, cls, tower, projector, language_model = SIZED[build]
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    records = []
    for i in range(96):
        colour = list(COLOURS)[i % len(COLOURS)]
        img = Image.open(io.BytesIO(colour_png(colour, seed=i)))
        if i % 2:
            img = img.resize(size)
        img.save(data / "img" / f"{i}.png")
        records.append({"messages": [{"role": "user", "content": f"<image>{QUESTION}"},
                                     {"role": "assistant", "content": answer(colour)}], "images": [f"img/{i}.png"]})
    (data / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    base = getattr(helpers, f"tiny_{build}")(tmp_path / build)
    recipe = load_recipe("jobs/vision_tiny.yaml", [
        f"model.pretrained={base}", f"data.conversations={data}", f"run.storage_path={tmp_path / 'runs'}",
        f"run.name={build}", "train.max_steps=12", "train.log_every=4", "data.val_fraction=0.0"])
    summary = fit(recipe)
    loss = losses(summary)
    print(f"{build} loss {loss}")
    assert summary.steps == 12 and loss[-1] < 0.5 * loss[0], loss

    out = tmp_path / "export"
    export(summary.run_dir, str(out))
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == cls
    assert type(load_processor(str(out))).__name__ == type(load_processor(str(base))).__name__
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(tower in k and projector not in k for k in changed), "the frozen vision tower changed"
    assert any(projector in k for k in changed), "the projector did not train"
    assert any(language_model in k for k in changed), "the language model did not train"


@pytest.mark.slow  # ZeRO-3's partitioned start-up: ~80 s on 2 busy cores
def test_an_idefics3_under_lora_and_zero3_trains_adapters_and_the_connector_and_exports_merged(colour_set, ray_cluster,
                                                                                              tmp_path):
    """SmolVLM's architecture (Idefics3 with image splitting, as SmolVLM's processor does: its forward takes each
    row's crops and their pixel masks, which the stream carries) with LoRA under ZeRO-3: adapters on the language
    model, the connector in full, the vision tower (`vision_model`) frozen; held-out image conversations validated
    with their pixels; the merged export loads in plain transformers with its processor."""
    from helpers import tiny_idefics3_split
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llmray.export.folder import export
    from llmray.train.checkpoint import read_state

    base = tiny_idefics3_split(tmp_path / "idefics3")
    task = held_out_task(tmp_path / "held_out", n=8)  # scored at the end on the ranks, in step (ZeRO-3)
    recipe = load_recipe("jobs/vision_tiny.yaml", [
        f"model.pretrained={base}", f"data.conversations={colour_set}", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=idefics3-lora", "finetune.method=lora", "finetune.lora.r=8", "finetune.lora.dropout=0.0",
        "train.zero_stage=3", "train.max_steps=12", "train.log_every=4", "train.lr=3e-2", "data.val_fraction=0.1",
        "data.seq_len=96",  # an image is 5 crops, 42 tokens
        f"eval.tasks={[task]}"])
    summary = fit(recipe)
    loss = losses(summary)
    assert summary.steps == 12 and loss[-1] < loss[0] - 0.15, loss
    history = read_state(summary.checkpoint).history
    assert history[-1]["val_loss"] < loss[0] - 0.15, history[-1]

    out = tmp_path / "merged"
    export(summary.run_dir, str(out))
    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "Idefics3ForConditionalGeneration"
    AutoProcessor.from_pretrained(out)
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)  # merged: no adapter or modules_to_save copies left
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any("vision_model" in k for k in changed), "the frozen vision tower changed"
    assert any("connector" in k for k in changed), "the connector did not train"
    assert any("text_model" in k and "proj" in k for k in changed), "the adapters were not merged into the LM"
    # the eval: block's image task, answered in step by the partitioned peft model (pixels per row): as on the export
    from llmray.evals.run import evaluate

    exported = evaluate(str(out), [task], out=None)["tasks"]["held_out"]
    print(f"held-out figures on the ranks {summary.evals}, of the export {exported}")
    assert summary.evals == pytest.approx({f"eval/held_out/{m}": exported[m] for m in ("accuracy", "f1")})


def test_image_rows_stream_with_their_pixels_and_resume_exactly_on_another_world_size(colour_set, ray_cluster,
                                                                                       tmp_path, monkeypatch):
    """The stream's Ray Data tasks run the processor: each row comes with its own image's pixels, and a stream
    restarted at a position (on 2 ranks, from a run of 1) yields exactly the rest, pixels included, with each
    rank's cache of fetched rows held to its byte bound (dropped runs fetched again when needed)."""
    import uuid

    import numpy as np
    from transformers import AutoTokenizer

    from llmray.data import stream as stream_module
    from llmray.data.catalog import CatalogActor
    from llmray.data.chat import shard_conversations
    from llmray.data.pack import StreamSpec
    from llmray.data.split import Documents
    from llmray.data.stream import RankStream

    monkeypatch.setattr(stream_module, "RANK_CACHE_BYTES", 200_000)

    vlm = tiny_vlm(tmp_path / "vlm")
    shards = str(tmp_path / "shards")
    shard_conversations(str(colour_set), shards, AutoTokenizer.from_pretrained(vlm), 64, kind="images", max_images=1)
    spec = StreamSpec.of([("corpus", 1.0, Documents(shards, "all", 0.0))], str(vlm), 64, seed=7, batch_docs=64,
                         max_epochs=2, documents="images", max_images=1)

    def drain(world, rows, start=None, catalog=None):
        catalog = catalog or CatalogActor.remote(spec)
        session = uuid.uuid4().hex  # a new group: the catalog restarts its pipeline where the group starts
        streams = [RankStream(catalog, session, r, world, rows, prefetch=2) for r in range(world)]
        for stream in streams:
            stream.load_state_dict(start or {})
        out = [({k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, streams[0].state_dict())
               for batches in zip(*streams)]
        # an epoch here is one block of 48 pieces (4 conversations each), packed as 3 runs of 16 pieces, ~0.23 MB each,
        # its rows shuffled across them: over the bound, a rank holds the runs of the block it reads and no more
        # (epoch 0's were dropped once epoch 1's came)
        assert all(len(s.runs) <= 3 and s.cached_rows <= 192 for s in streams), [(len(s.runs), s.cached_rows) for s in streams]
        return out

    full = drain(1, 8)
    ids = np.concatenate([b["input_ids"] for b, _ in full])
    pixels = np.concatenate([b["pixel_values"] for b, _ in full])
    assert len(ids) == 2 * 192 and pixels.shape == (384, 1, 3, 16, 16)
    assert all((b["image_count"] == 1).all() for b, _ in full)
    # each row's pixels are its own conversation's image: the colour its answer names is the square's
    labels = np.concatenate([b["labels"] for b, _ in full])
    assert [square_colour(vlm, p[0]) for p in pixels[:64]] == [answered_colour(vlm, row) for row in labels[:64]]
    catalog = CatalogActor.remote(spec)
    for k in (3, 30):
        rest = drain(2, 4, start=full[k][1], catalog=catalog)
        np.testing.assert_array_equal(np.concatenate([b["input_ids"] for b, _ in rest]), ids[(k + 1) * 8:])
        np.testing.assert_array_equal(np.concatenate([b["pixel_values"] for b, _ in rest]), pixels[(k + 1) * 8:])


@pytest.mark.slow  # a third Train run: ~40 s
def test_llava_stage_one_trains_the_projector_alone_on_captions(colour_set, ray_cluster, tmp_path):
    """A CLIP tower and a language model composed with a new projector (`llmray vision compose`), then LLaVA's stage
    1 on a caption table: the projector learns, the tower and the language model come out bit-identical."""
    from helpers import colour_tokenizer, tiny_llama
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    from llmray.export.folder import export
    from llmray.model.compose import compose_llava

    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=16, patch_size=8)).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip")
    tokenizer = colour_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    base = tmp_path / "llava"
    compose_llava(str(tmp_path / "clip"), str(tmp_path / "lm"), str(base))
    captions = tmp_path / "captions"
    captions.mkdir()
    (captions / "captions.jsonl").write_text("".join(
        json.dumps({"image": str(colour_set / "img" / f"{i}.png"), "text": f"a {list(COLOURS)[i % 4]} square"}) + "\n"
        for i in range(1, 192, 2)))
    recipe = load_recipe("jobs/vision_tiny.yaml", [
        f"model.pretrained={base}", f"data.conversations={captions}", f"run.storage_path={tmp_path / 'runs'}",
        "run.name=stage1", "vision.train_language_model=false", "train.max_steps=12", "train.log_every=4",
        "data.val_fraction=0.0"])
    summary = fit(recipe)
    loss = losses(summary)
    assert loss[-1] < loss[0], loss
    export(summary.run_dir, str(tmp_path / "stage1"))
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "stage1" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed), sorted(changed)

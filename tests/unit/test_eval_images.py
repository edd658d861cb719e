"""`llmray eval`'s image tasks on a tiny random-init LLaVA, without Ray: task files with images (every kind of
reference, bad ones named by file, line and field), label log-likelihood and greedy captions equal to what the model
gives computed directly with transformers, CIDEr-D equal to the COCO caption toolkit's, the OpenAI request an
endpoint is sent, and the refusals of a task that does not fit the model."""

import base64
import io
import json
import os

import pytest
import torch
from helpers import COLOURS, colour_png, colour_tokenizer, json_server, s3_client, tiny_llama, tiny_vlm

from llmray.evals import metrics
from llmray.evals.backends import BackendError, Endpoint, LocalModel
from llmray.evals.score import answer, score
from llmray.evals.tasks import TaskError, load_task

QUESTION = "What colour is the square?"
CHOICE = (f"type: choice\ndata: d.jsonl\nimage: picture\nprompt: '{QUESTION}'\ntarget: colour\n"
          "choices: [red, green, blue, yellow]\n")
CAPTION = "type: generate\ndata: d.jsonl\nimage: picture\nprompt: '{q}'\ntarget: captions\nmax_new_tokens: 5\n"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """The tiny LLaVA as `llmray eval` loads a folder; torch on one thread meanwhile (a model this small runs ~15x
    faster so on a busy 2-core machine, where the second thread's synchronisation waits on the other jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LocalModel.from_folder(str(tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")), device="cpu")
    torch.set_num_threads(threads)


def task(folder, spec: str, lines: list[dict] | str):
    (folder / "d.jsonl").write_text(lines if isinstance(lines, str) else "".join(json.dumps(x) + "\n" for x in lines))
    (folder / "t.yaml").write_text(spec)
    return load_task(folder / "t.yaml")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def colour_lines(folder, n: int = 4) -> list[dict]:
    """`n` lines, one square each, its image a PNG beside the data file; a question of varying length."""
    (folder / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        (folder / "img" / f"{i}.png").write_bytes(colour_png(colour, seed=i))
        lines.append({"picture": f"img/{i}.png", "colour": colour, "q": "Describe" + " the image" * (i % 3),
                      "captions": [f"a {colour} square", f"It is {colour}."]})
    return lines


def test_cider_d_equals_the_coco_toolkits_and_hand_computed_values():
    # pycocoevalcap 1.2's Cider().compute_score on the same (tokenized) captions: 3.3269288016863654 overall
    hyps = ["A red square on a grey ground.", "a blue square", "a small yellow box in the corner"]
    refs = [["a red square on grey", "red square in the middle of a grey image"], ["a blue square on grey", "the blue box"],
            ["a yellow square", "yellow square in the corner", "a small yellow square"]]
    assert metrics.cider(hyps, refs) == pytest.approx(3.3269288016863654, rel=1e-12)
    assert metrics.cider_scores(hyps, refs) == pytest.approx([3.613689509943666, 3.850468297296681, 2.516628597818748],
                                                             rel=1e-12)
    # By hand, 2 examples (IDF log 2 - log df): "a" and "square" are in both (weight 0). Example 1 equals its reference:
    # cosine 1 at n = 1, 2, 3, none at n = 4 -> 10 * 3/4. Example 2, "a blue circle" against "a blue square": n=1
    # (blue, circle) . (blue, square) -> 1/sqrt 2; n=2 (a blue, blue circle) . (a blue, blue square) -> 1/2; n=3 -> 0.
    assert metrics.cider(["a red square", "a blue circle"], ["a red square", "a blue square"]) == pytest.approx(
        (7.5 + 10 * (2 ** -0.5 + 0.5) / 4) / 2, rel=1e-12)
    assert metrics.cider(["red square", "blue circle"], ["red square", "blue circle"]) == pytest.approx(5.0)
    # several references: BLEU, chrF, exact match and token F1 take them all
    assert metrics.exact_match(["It is red."], [["a red square", "it is red"]]) == 1.0
    assert metrics.bleu(["a red square on grey"], [["a blue box", "a red square on grey"]]) == pytest.approx(100.0)


def test_an_image_task_file_reads_every_kind_of_reference(tmp_path, s3):
    red, blue, green, yellow = (colour_png(c, seed=i) for i, c in enumerate(COLOURS))
    s3_client(dict(os.environ)).put_object(Bucket="llmray", Key="img/y.png", Body=yellow)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.png").write_bytes(red)
    (tmp_path / "b.png").write_bytes(blue)
    t = task(tmp_path, CHOICE.replace(f"prompt: '{QUESTION}'", "input: q"), [
        {"picture": "img/r.png", "colour": "red", "q": QUESTION},
        {"picture": str(tmp_path / "b.png"), "colour": "blue", "q": f"Here: <image> {QUESTION}"},
        {"picture": data_uri(green), "colour": "green", "q": QUESTION},
        {"picture": "s3://llmray/img/y.png", "colour": "yellow", "q": QUESTION}])
    assert [e.image for e in t.examples] == [red, blue, green, yellow]
    assert [e.prompt for e in t.examples] == [f"<image>{QUESTION}", f"Here: <image> {QUESTION}", *[f"<image>{QUESTION}"] * 2]
    assert t.spec.chat and t.metric_names == ["accuracy", "f1"]


@pytest.mark.parametrize("spec, line, message", [
    (CHOICE, {"picture": "img/gone.png", "colour": "red"}, r"d.jsonl:1: field 'picture': image .*img/gone.png is missing"),
    (CHOICE, {"picture": "corrupt.png", "colour": "red"}, r"d.jsonl:1: field 'picture': unreadable or corrupt image"),
    (CHOICE, {"picture": "data:image/png;base64,@@", "colour": "red"}, r"d.jsonl:1: field 'picture': a data: URI's base64"),
    (CHOICE, {"colour": "red"}, r"d.jsonl:1: field 'picture' is missing"),
    (CHOICE.replace(QUESTION, "<image><image>?"), {"picture": "ok.png", "colour": "red"},
     r"d.jsonl:1: the prompt holds 2 <image> placeholders"),
    (CHOICE + "chat: false\n", {}, r"chat: an image task's prompt is a user message"),
    (CHOICE.replace("type: choice", "type: perplexity"), {}, r"image: a perplexity task scores text alone"),
    (CHOICE, {"picture": "ok.png", "colour": ["red"]}, r"d.jsonl:1: field 'colour': a list of references is for a gen"),
    (CAPTION + "metrics: [cider, accuracy]\n", {"picture": "ok.png", "q": "?", "captions": ["a", "b"]},
     r"metrics: accuracy compare one label; lines of .*d.jsonl hold several references in field 'captions'"),
])
def test_a_bad_image_task_is_named_by_file_line_and_field(tmp_path, spec, line, message):
    (tmp_path / "corrupt.png").write_bytes(colour_png("red")[:40])  # truncated
    (tmp_path / "ok.png").write_bytes(colour_png("red"))
    with pytest.raises(TaskError, match=message):
        task(tmp_path, spec, [line])


@torch.no_grad()
def direct_loglikelihood(model, processor, png: bytes, label: str) -> float:
    """log P(label | image, question) computed here with plain transformers: the chat prompt with the image token,
    the processor on the prompt and on prompt + label, the label's tokens' log-probabilities summed."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    from llmray.data.pixels import with_image_token

    messages = with_image_token(processor, {"messages": [{"role": "user", "content": f"<image>{QUESTION}"}]})
    prompt = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = processor(text=[prompt + label], images=[image], return_tensors="pt", add_special_tokens=False)
    start = len(processor(text=[prompt], images=[image], add_special_tokens=False)["input_ids"][0])
    lp = model(**whole).logits[0, :-1].float().log_softmax(-1)
    ids = whole["input_ids"][0, 1:]
    return float(lp.gather(-1, ids[:, None])[start - 1:].sum())


def test_label_loglikelihood_on_an_image_is_the_models_own(vlm, tmp_path):
    t = task(tmp_path, CHOICE, colour_lines(tmp_path))
    out = answer(vlm, t)
    for e, o in zip(t.examples, out):
        want = [direct_loglikelihood(vlm.model, vlm.processor, e.image, c) for c in t.spec.choices]
        assert o["scores"] == pytest.approx(want, abs=1e-4)
        assert o["answer"] == t.spec.choices[max(range(4), key=want.__getitem__)]
    assert len({tuple(round(s, 4) for s in o["scores"]) for o in out}) == len(out), "the images made no difference"
    figures = score(t, out)
    assert figures["accuracy"] == sum(o["answer"] == e.target for o, e in zip(out, t.examples)) / len(out)


def test_captions_are_greedy_decoding_of_each_image_alone(vlm, tmp_path):
    """Batched, left-padded prompts of different lengths answer as each example alone through the processor."""
    from PIL import Image

    t = task(tmp_path, CAPTION, colour_lines(tmp_path, 5))
    out = answer(vlm, t)
    tok = vlm.processor.tokenizer
    for e, o in zip(t.examples, out):
        prompt = tok.apply_chat_template([{"role": "user", "content": e.prompt}], tokenize=False,
                                         add_generation_prompt=True)
        inputs = vlm.processor(text=[prompt], images=[Image.open(io.BytesIO(e.image)).convert("RGB")],
                               return_tensors="pt", add_special_tokens=False)
        alone = vlm.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                                   eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
        assert o["answer"] == tok.decode(alone[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    figures = score(t, out)
    assert set(figures) == {"examples", "exact_match", "token_f1", "bleu", "chrf", "cider"}
    refs = [e.target for e in t.examples]
    assert figures["cider"] == pytest.approx(metrics.cider([o["answer"] for o in out], refs))


def test_an_endpoint_is_sent_the_image_as_a_data_uri_part_and_refuses_label_loglikelihood(tmp_path):
    lines = colour_lines(tmp_path, 2)
    lines[1]["q"] = "Look: <image> and describe it."
    with json_server({"choices": [{"index": 0, "message": {"role": "assistant", "content": "red"}}]}) as (url, seen):
        endpoint = Endpoint(f"{url}/v1", model="m")
        captions = task(tmp_path, CAPTION, lines)
        assert answer(endpoint, captions) == [{"answer": "red"}] * 2
        with pytest.raises(BackendError, match="a choice task with images needs a model folder: OpenAI's chat API"):
            answer(endpoint, task(tmp_path, CHOICE, lines))
    assert len(seen) == 2 and all(s["model"] == "m" and s["temperature"] == 0 for s in seen)
    first, second = (s["messages"][0]["content"] for s in seen)
    pngs = [(tmp_path / "img" / f"{i}.png").read_bytes() for i in range(2)]
    assert first == [{"type": "image_url", "image_url": {"url": data_uri(pngs[0])}}, {"type": "text", "text": "Describe"}]
    assert second == [{"type": "text", "text": "Look: "}, {"type": "image_url", "image_url": {"url": data_uri(pngs[1])}},
                      {"type": "text", "text": " and describe it."}]


def test_a_task_that_does_not_fit_the_model_is_refused_naming_its_file(vlm, tmp_path):
    (tmp_path / "text").mkdir()
    text_task = task(tmp_path / "text", "type: generate\ndata: d.jsonl\ninput: q\ntarget: a\n", [{"q": "x", "a": "y"}])
    with pytest.raises(TaskError, match=f"task {tmp_path}/text/t.yaml is a text task .* vision-language model"):
        answer(vlm, text_task)
    folder = tmp_path / "llama"
    tok = colour_tokenizer()
    tiny_llama(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    image_task = task(tmp_path, CHOICE, colour_lines(tmp_path, 1))
    with pytest.raises(TaskError, match=f"task {tmp_path}/t.yaml is an image task .* text-only model"):
        answer(LocalModel.from_folder(str(folder), device="cpu"), image_task)


@pytest.mark.parametrize("build", ["idefics3", "idefics3_split", "gemma3", "qwen2_vl", "qwen2_5_vl", "llava_next"])
def test_a_vlm_takes_its_own_image_inputs(tmp_path, build):
    """Each model's image inputs as its forward takes them: Idefics3 (SmolVLM's architecture) pixel values per row
    (with image splitting: each row's crops and their pixel masks);
    Gemma 3 with its token types; Qwen2-VL and Qwen2.5-VL their patches, grids and token types (M-RoPE); LLaVA-NeXT its crops and
    image sizes. Batched captions equal each
    image's alone, and a label's log-likelihood is the model's own forward on the processor's inputs."""
    import helpers
    from PIL import Image

    from llmray.data.pixels import with_image_token

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = getattr(helpers, f"tiny_{build}")(tmp_path / build)
        model = LocalModel.from_folder(str(folder), device="cpu")
        captions = task(tmp_path, CAPTION, colour_lines(tmp_path, 3))
        out = answer(model, captions)
        tok = model.processor.tokenizer
        for e, o in zip(captions.examples, out):
            prompt = tok.apply_chat_template(with_image_token(model.processor, {"messages": [
                {"role": "user", "content": e.prompt}]}), tokenize=False, add_generation_prompt=True)
            image = Image.open(io.BytesIO(e.image)).convert("RGB")
            inputs = model.processor(text=[prompt], images=[image], return_tensors="pt", add_special_tokens=False)
            alone = model.model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                                         eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")])
            assert o["answer"] == tok.decode(alone[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        choice = task(tmp_path, CHOICE, colour_lines(tmp_path, 1))
        (scores,) = [o["scores"] for o in answer(model, choice)]
        png = choice.examples[0].image
        with torch.no_grad():
            want = [direct_loglikelihood(model.model, model.processor, png, c) for c in choice.spec.choices]
        assert scores == pytest.approx(want, abs=1e-4)
    finally:
        torch.set_num_threads(threads)


def test_a_recipes_eval_tasks_must_fit_the_model_it_trains(tmp_path):
    """Checked by `fit` before any worker starts: image tasks for a vision-language run, text tasks for a text one."""
    from llmray.recipe.schema import RecipeError
    from llmray.train.downstream import training_tasks

    (tmp_path / "t").mkdir()
    text = task(tmp_path / "t", "type: generate\ndata: d.jsonl\ninput: q\ntarget: a\n", [{"q": "x", "a": "y"}])
    image = task(tmp_path, CHOICE, colour_lines(tmp_path, 1))
    assert [t.path for t in training_tasks([text.path], vision=False)] == [text.path]
    assert [t.path for t in training_tasks([image.path], vision=True)] == [image.path]
    with pytest.raises(RecipeError, match=f"eval.tasks: {image.path}: image tasks, and the run trains a text-only"):
        training_tasks([text.path, image.path], vision=False)
    with pytest.raises(RecipeError, match=f"eval.tasks: {text.path}: text tasks, and the run trains a vision-language"):
        training_tasks([text.path, image.path], vision=True)


def test_a_vlm_folder_in_object_storage_answers_as_the_local_folder(tmp_path, s3):
    """`llmray eval` of an image task on a VLM named by its s3:// folder (model, processor and tokenizer copied once):
    the same captions and label scores as the local folder's."""
    from llmray import storage

    folder = tiny_vlm(tmp_path / "vlm", initializer_range=0.3)
    storage.upload(str(folder), "s3://llmray/models/vlm")
    captions, choice = task(tmp_path, CAPTION, colour_lines(tmp_path, 2)), task(tmp_path, CHOICE, colour_lines(tmp_path, 2))
    local, remote = LocalModel.from_folder(str(folder), "cpu"), LocalModel.from_folder("s3://llmray/models/vlm", "cpu")
    assert remote.processor is not None
    assert answer(remote, captions) == answer(local, captions)
    assert answer(remote, choice) == answer(local, choice)

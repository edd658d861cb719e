"""Chat image parts on the serving engine, without Ray Serve: image rows batched with text rows generate what
transformers' `generate` does from the same processor inputs (LLaVA, Idefics3, Gemma 3, Qwen2-VL, LLaVA-NeXT),
and the app's image checks answer 400 in OpenAI's shape naming the part (the app's own `Server`, its engines real)."""

import asyncio
import io

import pytest
from helpers import colour_png, data_uri, greedy_image_reference, tiny_vlm

RED, BLUE, GREEN = colour_png("red"), colour_png("blue", seed=1), colour_png("green", seed=2)
TOKENS = 12


def pictures(pngs: list[bytes]) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]


def served(engine, requests: list[tuple[str, list[bytes]]], adapters: list[str | None] | None = None) -> list[str]:
    """Each (text with <image> per image, its PNGs) as one user turn, greedily: the first generates alone for a
    while, then the others join it at once (their prefill one forward, images and text rows together). `adapters`:
    each request's LoRA adapter (None: the base)."""
    from llmray.serve.engine import Finished
    from llmray.serve.sampling import Sampling

    def prepared(text: str, pngs: list[bytes]):
        prompt = engine.chat_prompt([("user", text)])
        return engine.encode_images(prompt, pictures(pngs)) if pngs else (engine.encode(prompt, False), None)

    adapters = adapters or [None] * len(requests)
    inputs = [(*prepared(*r), a) for r, a in zip(requests, adapters)]  # ahead, so the late rows arrive together

    async def collect(ids: list[int], images, adapter: str | None, started: asyncio.Event | None = None) -> str:
        out = ""
        async for ev in engine.stream(ids, Sampling(TOKENS, 0.0), adapter=adapter, images=images):
            if not isinstance(ev, Finished):
                out += ev
                if started is not None and len(out) > 3:
                    started.set()
        return out

    async def run():
        first_running = asyncio.Event()
        first = asyncio.create_task(collect(*inputs[0], first_running))
        await first_running.wait()
        late = await asyncio.gather(*[collect(*r) for r in inputs[1:]])
        return [await first, *late]

    return asyncio.run(run())


def wide(png: bytes) -> bytes:
    """The image stretched to twice its width: another size (Qwen2-VL: twice its patches; LLaVA-NeXT: another grid)."""
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    out = io.BytesIO()
    img.resize((img.width * 2, img.height)).save(out, format="PNG")
    return out.getvalue()


# larger weights than the default, so greedy choices are not near-ties that batching's rounding could flip (Gemma 3's
# scaled embeddings answer one token whatever the image past 0.05)
INITIALIZER_RANGE = {"llava": 0.3, "idefics3": 0.3, "idefics3_split": 0.3, "gemma3": 0.05, "qwen2_vl": 0.3,
                     "llava_next": 0.3}


@pytest.fixture(scope="module", params=list(INITIALIZER_RANGE))
def vlm_dir(request, tmp_path_factory):
    import helpers

    build = tiny_vlm if request.param == "llava" else getattr(helpers, f"tiny_{request.param}")
    scale = INITIALIZER_RANGE[request.param]
    return str(build(tmp_path_factory.mktemp(request.param) / "tiny", initializer_range=scale))


def test_image_rows_batched_with_text_rows_answer_as_transformers_generate(vlm_dir):
    """Rows of images of two sizes (their own token and crop counts), two images, and text only, in one prefill:
    LLaVA's batch of images, Idefics3's images per row (split: their crops), Gemma 3's token types (its image tokens
    attend both ways), Qwen2-VL's M-RoPE positions (the decode steps' carried on from the image's), LLaVA-NeXT's
    crops. The decode steps run through the fixed buffers a CUDA graph replays (batches padded to their bucket)."""
    from llmray.serve.engine import Engine

    engine = Engine(vlm_dir, max_batch_size=4, batch_wait_s=0, device=None, cuda_graphs=True)
    requests = [("What colour is the square?", []), ("<image>What colour is the square?", [RED]),
                ("Describe the image. <image> and <image>", [BLUE, wide(GREEN)]), ("It is", [])]
    reference = greedy_image_reference(vlm_dir)
    expected = [reference(text, pngs, TOKENS) for text, pngs in requests]
    assert expected[1] != reference("<image>What colour is the square?", [BLUE], TOKENS)  # the pixels matter
    assert served(engine, requests) == expected
    assert engine.stats["largest_batch"] == 4 and engine.stats["forward_passes"] < 4 * TOKENS


def test_image_rows_with_a_lora_adapter_answer_as_the_merged_model(tmp_path):
    """A LoRA adapter on a VLM's language model, served beside the base (peft's mixed batch): an image row with the
    adapter answers as the adapter merged into the model does, beside an image row of the base and a text row of the
    adapter, in one prefill."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import load_processor
    from llmray.serve.engine import Engine

    base = tiny_vlm(tmp_path / "vlm", initializer_range=0.3)
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    load_processor(str(base)).save_pretrained(merged)
    engine = Engine(str(base), max_batch_size=4, batch_wait_s=0, device=None, adapters={"a": str(tmp_path / "adapter")})
    requests = [("<image>What colour is the square?", [RED]), ("<image>What colour is the square?", [RED]),
                ("It is", [])]
    tuned, plain = greedy_image_reference(merged), greedy_image_reference(base)
    expected = [tuned(*requests[0], TOKENS), plain(*requests[1], TOKENS), tuned(*requests[2], TOKENS)]
    assert expected[0] != expected[1]  # the adapter matters
    assert served(engine, requests, adapters=["a", None, "a"]) == expected


# ---- the app's checks ----------------------------------------------------------------------------------------------

MAX_BYTES = 4000


@pytest.fixture(scope="module")
def app(model_dir, tmp_path_factory):
    """The app's `Server` (what each Serve replica runs) over a text model and a tiny LLaVA, images allowed from one
    folder, two a request, 4000 bytes and 64x64 pixels each."""
    from llmray.serve.app import ServeArgs, Server

    root = tmp_path_factory.mktemp("images")
    (root / "allowed").mkdir()
    (root / "allowed" / "red.png").write_bytes(RED)
    (root / "allowed" / "not-a.png").write_bytes(b"not an image at all")
    (root / "allowed" / "big.png").write_bytes(noise_png(48))
    (root / "allowed-too").mkdir()
    (root / "allowed-too" / "red.png").write_bytes(RED)
    (root / "elsewhere.png").write_bytes(RED)
    vlm = tiny_vlm(root / "vlm")
    args = ServeArgs(models=[{"path": str(model_dir), "name": "text"}, {"path": str(vlm), "name": "vlm"}],
                     allowed_image_paths=[str(root / "allowed")], max_images_per_request=2,
                     max_image_bytes=MAX_BYTES, max_image_pixels=64 * 64)
    server = Server(args)
    server.root = root
    return server


def ask(server, model: str, content, **extra):
    """The app's answer to a chat of one system and one user turn: (HTTP status, body)."""
    import json

    from fastapi.responses import JSONResponse

    from llmray.serve.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({
        "model": model, "max_tokens": 3, "temperature": 0,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}], **extra})
    out = asyncio.run(server._generate(body, "chat", None))
    return (out.status_code, json.loads(out.body)) if isinstance(out, JSONResponse) else (200, out)


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def big_png(side: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """Random pixels: a PNG that does not compress below MAX_BYTES."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


REFUSALS = [  # (case, the user turn's parts given the images folder, the part named, what the message says)
    ("too many", lambda r: [image(data_uri(RED))] * 3, "messages[1].content[2].image_url",
     "3 images, more than max_images_per_request=2"),
    ("too many bytes", lambda r: [{"type": "text", "text": "see"}, image(data_uri(noise_png(48)))],
     "messages[1].content[1].image_url", f"over max_image_bytes ({MAX_BYTES:,} bytes)"),
    ("too many bytes in a file", lambda r: [image(str(r / "allowed" / "big.png"))],
     "messages[1].content[0].image_url", f"over max_image_bytes ({MAX_BYTES:,} bytes)"),
    ("too many pixels", lambda r: [image(data_uri(big_png(65)))], "messages[1].content[0].image_url",
     "image of 65x65 pixels is over 4,096"),
    ("undecodable", lambda r: [image("data:image/png;base64," + "QUJD" * 10)], "messages[1].content[0].image_url",
     "unreadable or corrupt image"),
    ("undecodable file", lambda r: [image(str(r / "allowed" / "not-a.png"))], "messages[1].content[0].image_url",
     "unreadable or corrupt image"),
    ("bad base64", lambda r: [image("data:image/png;base64,@@@")], "messages[1].content[0].image_url",
     "base64 is corrupt"),
    ("missing file", lambda r: [image(str(r / "allowed" / "gone.png"))], "messages[1].content[0].image_url",
     "is missing"),
    ("not allowed", lambda r: [image(str(r / "elsewhere.png"))], "messages[1].content[0].image_url",
     "not under them"),
    ("a sibling of the allowed folder", lambda r: [image(str(r / "allowed-too" / "red.png"))],
     "messages[1].content[0].image_url", "not under them"),
    ("out through ..", lambda r: [image(f"{r}/allowed/../elsewhere.png")], "messages[1].content[0].image_url",
     "not under them"),
    ("http", lambda r: [image("https://example.com/red.png")], "messages[1].content[0].image_url",
     "https:// image URLs are not fetched here"),
    ("relative", lambda r: [image("allowed/red.png")], "messages[1].content[0].image_url", "must be a data: URI"),
    ("the image token as text", lambda r: [{"type": "text", "text": "a <image> here"}, image(data_uri(RED))],
     "messages[1].content[0].text", "stands for an image here"),
]


@pytest.mark.parametrize("case, parts, where, says", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_an_image_part_the_app_may_not_read_is_a_400_naming_it(app, case, parts, where, says):
    status, body = ask(app, "vlm", parts(app.root))
    assert status == 400 and body["error"]["param"] == where, body
    assert body["error"]["message"].startswith(f"{where}: ") and says in body["error"]["message"], body
    assert body["error"]["type"] == "invalid_request_error"


def test_an_image_for_a_text_model_is_a_400(app):
    status, body = ask(app, "text", [{"type": "text", "text": "what is it?"}, image(data_uri(RED))])
    assert status == 400 and body["error"]["param"] == "messages[1].content[1].image_url"
    assert "model 'text' takes text only" in body["error"]["message"]


def test_images_come_from_data_uris_and_the_allowed_folder(app):
    """Both ways give the same answer (the same image), counted as the image's tokens in the prompt."""
    by_uri = ask(app, "vlm", [image(data_uri(RED)), {"type": "text", "text": "What colour?"}])
    by_path = ask(app, "vlm", [image(str(app.root / "allowed" / "red.png")), {"type": "text", "text": "What colour?"}])
    by_url = ask(app, "vlm", [image(f"file://{app.root}/allowed/red.png"), {"type": "text", "text": "What colour?"}])
    assert by_uri[0] == by_path[0] == by_url[0] == 200
    answer = lambda r: r[1]["choices"][0]["message"]["content"]  # noqa: E731
    assert answer(by_uri) == answer(by_path) == answer(by_url)
    text_only = ask(app, "vlm", [{"type": "text", "text": "What colour?"}])
    assert by_uri[1]["usage"]["prompt_tokens"] == text_only[1]["usage"]["prompt_tokens"] + 4  # its 4 image tokens


def test_images_in_object_storage_are_read_under_an_allowed_prefix(app, s3):
    import os

    from helpers import s3_client

    client = s3_client(dict(os.environ))
    client.put_object(Bucket="llmray", Key="img/red.png", Body=RED)
    client.put_object(Bucket="llmray", Key="private/red.png", Body=RED)
    allowed = app.args.allowed_image_paths
    app.args.allowed_image_paths = [*allowed, "s3://llmray/img"]
    try:
        assert ask(app, "vlm", [image("s3://llmray/img/red.png")])[0] == 200
        status, body = ask(app, "vlm", [image("s3://llmray/private/red.png")])
        assert status == 400 and "not under them" in body["error"]["message"]
    finally:
        app.args.allowed_image_paths = allowed


def test_the_vllm_engine_refuses_image_arguments_it_would_not_apply(model_dir):
    from llmray.serve.app import ServeConfigError, build_app

    with pytest.raises(ServeConfigError, match="engine: vllm reads and limits images itself; allowed_image_paths"):
        build_app({"models": [{"path": str(model_dir)}], "engine": "vllm", "allowed_image_paths": ["/data"]})

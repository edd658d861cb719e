"""What the tests share besides fixtures (those are in conftest.py): the repo's root, the tiny recipe, a moto S3
server, free ports, waiting, reading a run's losses, a sweep file to vary, greedy reference generation, and reading
W&B's offline run files back. Imported as `from helpers import ...` (pyproject puts tests/ on sys.path).

Heavy imports (torch, transformers, boto3, moto, wandb) stay inside the functions that need them, so a unit test
pays only for what it uses."""

import functools
import json
import socket
import struct
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


# ---- recipes ---------------------------------------------------------------------------------------------------------

def tiny(corpus, tmp_path, *overrides):
    """jobs/pretrain_tiny.yaml on the test corpus, shrunk to seconds."""
    from llmray.recipe.load import load_recipe

    return load_recipe("jobs/pretrain_tiny.yaml", [
        f"data.shards={corpus['shards']}", f"data.tokenizer={corpus['tokenizer']}", f"run.storage_path={tmp_path}",
        "data.seq_len=64", "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_every=0", "train.sample_prompt=null",
        *overrides])


def kill_worker_when_checkpointed(run_dir, killed):
    """SIGKILL one Ray Train worker process once Ray Train has recorded the run's first checkpoint."""
    import os
    import signal

    import psutil

    from llmray.train.checkpoint import list_checkpoints

    def train_workers() -> list:
        return [p for p in psutil.process_iter(["pid", "cmdline"])
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]

    def registered() -> bool:
        """Ray Train has recorded a checkpoint (one every rank wrote but Ray never recorded is not resumed)."""
        snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"
        try:
            return bool(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return False

    earlier = {p.pid for p in train_workers()}  # an earlier run's workers, still exiting: not this run's
    deadline = time.time() + 300
    while time.time() < deadline and not (list_checkpoints(str(run_dir)) and registered()):
        time.sleep(0.05)
    workers = [p for p in train_workers() if p.pid not in earlier]
    if workers:
        os.kill(workers[-1].pid, signal.SIGKILL)
        killed.append(workers[-1].pid)


def fit_with_a_worker_killed(recipe):
    """`fit(recipe)` while one of its Ray Train workers is SIGKILLed once the run's first checkpoint is recorded
    (`recipe` must allow a failure: scaling.max_failures=1); fails when no worker was found to kill."""
    import threading

    from llmray.train.trainer import fit

    killed: list[int] = []
    killer = threading.Thread(target=kill_worker_when_checkpointed, args=(recipe.run.folder, killed), daemon=True)
    killer.start()
    summary = fit(recipe)
    killer.join()
    assert killed, "no training worker was found to kill"
    return summary


def assert_resumed_exactly(resumed, through, step: int) -> None:
    """A run that lost a worker and resumed once, from its checkpoint at `step`, trained on the same samples with
    losses within 1e-6 of the run that went through (both recorded with train.record_samples=true)."""
    import numpy as np

    assert len(resumed.resumes) == 1 and resumed.resumes[0]["step"] == step
    assert [s["samples"] for s in resumed.trace] == [s["samples"] for s in through.trace]
    np.testing.assert_allclose([s["loss"] for s in resumed.trace], [s["loss"] for s in through.trace], rtol=0, atol=1e-6)


def arithmetic_chats(n: int, seed: int = 0) -> list[list[dict]]:
    """`n` short conversations (a question of adding two numbers, its answer), for fine-tuning tests."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        out.append([{"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": f"{a} + {b} = {a + b}."}])
    return out


def tiny_llama(vocab_size: int, positions: int = 128):
    """A random-init 2-layer Llama in fp32 eval mode (seeded): what the objective-versus-TRL checks run on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                                        initializer_range=0.2)).float().eval()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def colour_png(colour: str, size: int = 16, seed: int = 0) -> bytes:
    """A PNG of a square of `colour` on a grey ground, placed by `seed`: a captioning task only the pixels answer."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    x, y = rng.randrange(size // 3), rng.randrange(size // 3)
    ImageDraw.Draw(img).rectangle([x, y, x + size // 2, y + size // 2], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """An image as the `data:` URI an OpenAI image part (or a conversation file) carries."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png).decode()


def colour_tokenizer():
    """A byte-level BPE of 300-odd tokens trained on the colour task's words, with ChatML and a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmray.data.template import CHAT_TOKENS, CHATML

    special = ["<|endoftext|>", *CHAT_TOKENS, "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = [f"a {c} square. What colour is the square? It is {c}. Describe the image." for c in COLOURS]
    tok.train_from_iterator(words * 20 + ["user assistant system"] * 20, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[0], eos_token=special[0], pad_token="<pad>")
    hf.chat_template = CHATML
    return hf


def tiny_vlm(out, image_size: int = 16, positions: int = 128, initializer_range: float | None = None) -> Path:
    """A random-init tiny LLaVA (1-layer CLIP tower, 2-layer Llama) with a BPE tokenizer trained on the colour words
    and its processor (CLIP image processor, `<image>` expanded to 4 tokens), saved where `out` says: what
    `AutoModelForImageTextToText` and `AutoProcessor` load. Nothing downloaded; ~1 s. `initializer_range`: the
    language model's (None: transformers' default; larger keeps greedy choices clear of near-ties)."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from llmray.data.template import CHATML

    hf = colour_tokenizer()
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.image_token = "<image>"
    patch = image_size // 2
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                              crop_size={"height": image_size, "width": image_size}),
        tokenizer=hf, patch_size=patch, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHATML)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=positions,
                                bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id,
                                **({"initializer_range": initializer_range} if initializer_range else {})),
        image_token_id=hf.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    out = Path(out)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return out


def tiny_idefics3_split(out, initializer_range: float | None = None) -> Path:
    """`tiny_idefics3` with image splitting, as SmolVLM's processor does by default."""
    return tiny_idefics3(out, initializer_range, split=True)


def tiny_idefics3(out, initializer_range: float | None = None, split: bool = False) -> Path:
    """A random-init tiny Idefics3 (SmolVLM's architecture), no image splitting: 4 image tokens an image, one 32 px
    crop. `split`: an image is resized to at most 64 px and split into 32 px tiles, each 4 tokens after its
    `<row_i_col_j>` token, plus its global view (a square image: 5 crops; twice as wide as high: 3).
    `initializer_range`: as `tiny_vlm`'s."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    from llmray.data.template import CHATML

    tok = colour_tokenizer()
    tiles = [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)] if split else []
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>", *tiles]})
    processor = Idefics3Processor(image_processor=Idefics3ImageProcessorPil(
        do_image_splitting=split, size={"longest_edge": 64 if split else 32}, max_image_size={"longest_edge": 32}),
        tokenizer=tok, image_seq_len=4, chat_template=CHATML)
    torch.manual_seed(0)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256,
                                **({"initializer_range": initializer_range} if initializer_range else {})),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    Idefics3ForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def tiny_gemma3(out, initializer_range: float | None = None) -> Path:
    """A random-init tiny Gemma 3 (1-layer SigLIP tower at 16 px, 2-layer Gemma 3 text model) with its processor (a
    fixed-size image processor, `<start_of_image>` expanded to 4 soft tokens): the colour tokenizer with Gemma 3's
    three image tokens. `initializer_range`: as `tiny_vlm`'s."""
    import tempfile

    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    from llmray.data.template import CHATML

    image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    with tempfile.TemporaryDirectory() as scratch:  # reloaded so the tokenizer names its image tokens (boi_token ...)
        tok = colour_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": list(image_tokens.values())})
        tok.save_pretrained(scratch)
        tok = AutoTokenizer.from_pretrained(scratch, extra_special_tokens=image_tokens)
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}),
                                tokenizer=tok, image_seq_length=4, chat_template=CHATML)
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in image_tokens.items()}
    torch.manual_seed(0)
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=16, patch_size=4),
        text_config=Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                                     max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                     **({"initializer_range": initializer_range} if initializer_range else {})),
        mm_tokens_per_image=4, boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
        image_token_index=ids["image_token"])
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers starts the projector at zero (no image would change a thing): drawn instead
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def tiny_qwen2_vl(out, initializer_range: float | None = None) -> Path:
    """A random-init tiny Qwen2-VL (1-layer tower of 4 px patches, merged 2x2 into one token; 2-layer text model with
    M-RoPE) with its image processor and tokenizer, saved where `out` says. Its dynamic resolution makes an image's
    tokens its size's: 16x16 px is 4 image tokens, 32x16 px 8 (resized to multiples of 8 px, at most 32x32). Its
    processor is what `pixels.load_processor` makes of the folder (here, without torchvision, one without a video
    processor). `initializer_range`: as `tiny_vlm`'s."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    return _tiny_qwen_vl(out, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                         {"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2},
                         initializer_range)


def tiny_qwen2_5_vl(out, initializer_range: float | None = None) -> Path:
    """A random-init tiny Qwen2.5-VL, as `tiny_qwen2_vl` (its processor's inputs are Qwen2-VL's); its tower's one
    block attends over windows of one merged patch."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return _tiny_qwen_vl(out, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                         {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                          "window_size": 8, "fullatt_block_indexes": [0]}, initializer_range)


def _tiny_qwen_vl(out, config_class, model_class, vision: dict, initializer_range: float | None) -> Path:
    import torch
    from transformers import Qwen2VLImageProcessorPil

    from llmray.data.template import CHATML

    tok = colour_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = config_class(
        vision_config={**vision, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2},
        text_config={"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     **({"initializer_range": initializer_range} if initializer_range else {})},
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    model_class(config).save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8,
                             max_pixels=32 * 32).save_pretrained(out)
    return Path(out)


def tiny_llava_next(out, initializer_range: float | None = None) -> Path:
    """A random-init tiny LLaVA-NeXT (1-layer CLIP tower at 16 px, 2-layer Llama) with its processor: an image is its
    16 px base view plus the 16 px crops of the grid its aspect ratio picks (16x32, 32x16 or 32x32 px: 2 or 4 crops),
    so images of different shapes have different crop and token counts, and `image_sizes` says which.
    `initializer_range`: as `tiny_vlm`'s."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    from llmray.data.template import CHATML

    pinpoints = [[16, 32], [32, 16], [32, 32]]
    hf = colour_tokenizer()
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                                   image_grid_pinpoints=pinpoints),
        tokenizer=hf, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHATML)
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=16, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(hf), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256, bos_token_id=hf.bos_token_id,
                                eos_token_id=hf.eos_token_id,
                                **({"initializer_range": initializer_range} if initializer_range else {})),
        image_token_id=hf.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    LlavaNextForConditionalGeneration(config).save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def losses(summary):
    """The training losses a finished run reported, from its final checkpoint's state."""
    import numpy as np

    from llmray.train.checkpoint import read_state

    return np.array([h["loss"] for h in read_state(summary.checkpoint).history])


SWEEP_SMALL = ["data.seq_len=64", "model.hidden_size=64", "model.num_layers=2", "train.micro_batch_size=4",
               "train.warmup_steps=2", "train.log_every=2", "train.eval_batches=2", "train.sample_prompt=null",
               "data.val_fraction=0.2", "quant.method=ptq"]


def sweep_file(tmp_path, corpus, **changes) -> Path:
    """A W&B-format grid sweep over the tiny recipe, written to tmp_path/sweep.yaml. `changes` maps "a/b" paths
    into the file to new values (None removes the key)."""
    raw = {
        "name": "grid", "project": "llmray-tests", "method": "grid",
        "metric": {"name": "quant_ppl", "goal": "minimize"},
        "parameters": {"train.lr": {"values": [1e-2, 3e-3]}, "quant.scheme": {"value": "int8-dynamic"},
                       "train.global_batch_size": {"values": [8]}},
        "llmray": {"recipe": str(REPO / "jobs" / "pretrain_tiny.yaml"),
                   "overrides": [f"data.shards={corpus['shards']}", f"data.tokenizer={corpus['tokenizer']}",
                                 *SWEEP_SMALL],
                   "budget": {"steps": 8}, "workers": 2, "storage_path": str(tmp_path / "sweeps")},
    }
    for key, value in changes.items():
        node = raw
        *path, last = key.split("/")
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---- processes, ports, servers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def json_server(answer: dict):
    """An HTTP server on 127.0.0.1 that answers every POST with `answer` (JSON) and records the JSON bodies it is
    sent: (its base URL, the list of bodies). A stand-in for an OpenAI-style server whose answers a test sets."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            body = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()


@functools.cache
def moto_endpoint() -> str:
    """The URL of this process's moto server, started on first use and left running (a daemon thread): stopping one
    waits out werkzeug's 0.5-s shutdown poll, which a server per test paid at every teardown."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}"


@contextmanager
def moto_s3(bucket: str):
    """A real S3-compatible server (moto) on 127.0.0.1 holding one empty bucket. Yields the standard AWS
    environment variables that reach it; sets none of them."""
    env = {"AWS_ENDPOINT_URL": moto_endpoint(), "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    s3_client(env).create_bucket(Bucket=bucket)
    try:
        yield env
    finally:  # moto keeps its buckets in memory for the whole process: the next user starts empty
        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))


def s3_client(env: dict):
    """A boto3 S3 client for the server `env` (from moto_s3) names, whatever this process's environment says."""
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


# ---- models -----------------------------------------------------------------------------------------------------------

def greedy_reference(model_dir):
    """greedy(prompt, n): the greedy continuation plain transformers generates from `model_dir`, with the same
    tokenization as the server's; greedy.tokenizer is that tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray.data.template import stop_token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def greedy(prompt: str, n: int) -> str:
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id,
                             eos_token_id=stop_token_ids(tok))
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    greedy.tokenizer = tok
    return greedy


def greedy_image_reference(model_dir):
    """greedy(text, pngs, n): what plain transformers' `generate` answers greedily from the image-text model in
    `model_dir` to one user turn, `text` holding `<image>` where each of the `pngs` goes, rendered with the tokenizer's
    chat template (the image token as fine-tuning writes it, `pixels.with_image_token`) and prepared by the folder's
    processor, as `generate` takes its inputs."""
    import io

    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from llmray.data.pixels import load_processor, with_image_token
    from llmray.data.template import render, stop_token_ids

    processor = load_processor(str(model_dir))
    tok = processor.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()

    def greedy(text: str, pngs: list[bytes], n: int) -> str:
        prompt = render(tok, with_image_token(processor, {"messages": [{"role": "user", "content": text}]}),
                        add_generation_prompt=True)
        pictures = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
        inputs = (processor(text=[prompt], images=pictures, add_special_tokens=False, return_tensors="pt") if pngs
                  else tok([prompt], add_special_tokens=False, return_tensors="pt"))
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=stop_token_ids(tok),
                             pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    return greedy


# ---- W&B offline run files --------------------------------------------------------------------------------------------
# `.wandb` is LevelDB's log format (32 KiB blocks of checksummed chunks, after a 7-byte ":W&B" header) holding protobuf
# `Record`s, the stream `wandb sync` uploads.

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_payloads(data: bytes):
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:  # zero fill to the end of the block
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk


def read_run(path: str | Path) -> dict:
    """A W&B offline run file read back: {"run": {project, group, name, id}, "config": {...},
    "history": [{...}, ...], "summary": {...}, "exit": code}."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"run": {}, "config": {}, "history": [], "summary": {}, "exit": None}
    for payload in _wandb_payloads(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"project": rec.run.project, "group": rec.run.run_group, "name": rec.run.display_name,
                          "id": rec.run.run_id, "job_type": rec.run.job_type}
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


class FaultyStorage:
    """A loopback HTTP proxy in front of an S3 server that refuses uploads on cue: object storage failing under a run.
    `fail(method, path)` decides per request (path: /bucket/key...); a refused request gets S3's 500 InternalError,
    which clients retry and then give up on. `refused` counts them."""

    def __init__(self, upstream: str, fail=lambda method, path: False):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlsplit

        self.fail, self.refused = fail, 0
        target = urlsplit(upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def _relay(self):
                body = self._body()
                if proxy.fail(self.command, self.path.split("?")[0]):
                    proxy.refused += 1
                    error = b"<?xml version='1.0'?><Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    reply = conn.getresponse()
                    data = reply.read()
                finally:
                    conn.close()
                self.send_response(reply.status, reply.reason)
                for k, v in reply.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                # HEAD: the object's size, as the server said it (there is no body to count)
                self.send_header("Content-Length", reply.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return out
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _relay

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

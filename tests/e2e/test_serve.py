"""A real Ray Serve on 127.0.0.1 driven by the official `openai` client (and raw HTTP where the client would hide
what is on the wire). Expected texts come from plain `transformers` greedy generation on the same model."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from helpers import colour_png, data_uri, free_port, greedy_image_reference, greedy_reference, tiny_vlm, wait_for

pytestmark = pytest.mark.ray

KEY = "sk-llmray-test"


@pytest.fixture(scope="module")
def quantized_dir(model_dir, corpus):
    """The same model after `llmray quantize --scheme int8-dynamic`: torchao int8 weights in the folder."""
    from llmray.data.split import HeldOut
    from llmray.quantize.folder import quantize_folder
    from llmray.recipe.schema import QuantSettings

    out = model_dir.parent / "tiny-int8"
    quantize_folder(str(model_dir), str(out), QuantSettings(method="ptq", scheme="int8-dynamic"),
                    HeldOut(corpus["shards"], seq_len=64), eval_samples=8)
    return out


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    """A tiny LLaVA with its processor (greedy choices clear of near-ties), served beside the text models."""
    return tiny_vlm(tmp_path_factory.mktemp("served-vlm") / "tiny-vlm", initializer_range=0.3)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """The one folder the app reads images from by path (allowed_image_paths)."""
    return tmp_path_factory.mktemp("images")


@pytest.fixture(scope="module")
def server(model_dir, quantized_dir, vlm_dir, image_dir, ray_cluster):
    from ray import serve

    from llmray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    models = [{"path": str(model_dir), "name": "tiny"}, {"path": str(model_dir), "name": "tiny-b"},
              {"path": str(quantized_dir), "name": "tiny-int8"}, {"path": str(vlm_dir), "name": "tiny-vlm"}]
    app = build_app({"models": models, "allowed_image_paths": [str(image_dir)],
                     "api_key": KEY, "max_batch_size": 16, "batch_wait_ms": 20},
                    ray_actor_options={"num_cpus": 1})
    serve.run(app, name="llmray", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy continuation by plain transformers, the same tokenization as the server's."""
    return greedy_reference(model_dir)


def test_models_and_health(client, server):
    assert sorted(m.id for m in client.models.list()) == ["tiny", "tiny-b", "tiny-int8", "tiny-vlm"]
    health = httpx.get(f"{server}/healthz").json()
    assert health["status"] == "ok" and set(health["models"]) == {"tiny", "tiny-b", "tiny-int8", "tiny-vlm"}


def test_quantized_model_is_served(client, quantized_dir, reference):
    """An int8 folder from `llmray quantize` serves as it is, and answers what transformers generates from it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(quantized_dir).eval()
    assert type(model.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    ids = reference.tokenizer("def main(", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=reference.tokenizer.eos_token_id)
    expected = reference.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    r = client.completions.create(model="tiny-int8", prompt="def main(", max_tokens=16, temperature=0)
    assert r.choices[0].text == expected and r.usage.completion_tokens == 16


def test_completion_is_transformers_greedy_with_usage(client, reference):
    r = client.completions.create(model="tiny", prompt="def main(", max_tokens=20, temperature=0)
    assert r.choices[0].text == reference("def main(", 20)
    assert r.usage.prompt_tokens == len(reference.tokenizer("def main(").input_ids)
    assert r.usage.completion_tokens == 20 and r.choices[0].finish_reason == "length"
    assert r.object == "text_completion" and r.model == "tiny"


def test_chat_stream_matches_whole_answer(client, server, reference):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "import os"}]
    whole = client.chat.completions.create(model="tiny-b", messages=messages, max_tokens=12, temperature=0)
    # rendered with the tokenizer's chat template (ChatML, as `llmray tokenizer train` writes it)
    expected = reference("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nimport os<|im_end|>\n"
                         "<|im_start|>assistant\n", 12)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(model="tiny-b", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["object"] == "text_completion"


def test_seed_n_and_stop(client, reference):
    ask = dict(model="tiny", prompt="class ", max_tokens=16, temperature=1.0)
    a, b = (client.completions.create(seed=7, **ask).choices[0].text for _ in range(2))
    c = client.completions.create(seed=8, **ask).choices[0].text
    assert a == b and a != c
    three = client.completions.create(n=3, seed=1, **ask)
    assert [ch.index for ch in three.choices] == [0, 1, 2] and len({ch.text for ch in three.choices}) == 3
    assert three.usage.prompt_tokens == 3 * len(reference.tokenizer("class ").input_ids)
    full = reference("import ", 24)
    stop = full[6:9]
    cut = client.completions.create(model="tiny", prompt="import ", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors_have_the_openai_shape_and_status(client, server):
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401
    assert httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    bad_json = httpx.post(f"{server}/v1/completions", headers=auth, content=b"{not json")
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.NotFoundError, match="'gpt-4' is not served here") as e:
        client.completions.create(model="gpt-4", prompt="x")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens") as e:
        client.completions.create(model="tiny", prompt="word " * 300, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_sixteen_clients_at_once_all_correct(client, server, reference):
    prompts = [f"def f{i}(x):" for i in range(16)]
    expected = [reference(p, 16) for p in prompts]
    before = httpx.get(f"{server}/healthz").json()["models"]["tiny"]["forward_passes"]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*[ac.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0)
                                          for p in prompts])

    answers = asyncio.run(run())  # any 5xx would raise here
    assert [a.choices[0].text for a in answers] == expected
    stats = httpx.get(f"{server}/healthz").json()["models"]["tiny"]
    assert stats["largest_batch"] > 1
    assert stats["forward_passes"] - before < 16 * 16  # they shared forward passes


def test_chat_images_answer_as_transformers_generate_batched_with_text(client, server, vlm_dir, image_dir):
    """Image requests (a data: URI, a path in the allowed folder) and a text request to the image-text model at
    once: each answers what `generate` does from the processor's inputs, in shared forward passes, and /metrics
    counts them as requests. An image sent to a text model is a 400 naming the part."""
    red, blue = colour_png("red"), colour_png("blue", seed=1)
    (image_dir / "blue.png").write_bytes(blue)
    question = {"type": "text", "text": "What colour is the square?"}
    asks = [[{"type": "image_url", "image_url": {"url": data_uri(red)}}, question],
            [{"type": "image_url", "image_url": {"url": str(image_dir / "blue.png")}}, question],
            [question]]
    reference = greedy_image_reference(vlm_dir)
    expected = [reference("<image>What colour is the square?", [red], 12),
                reference("<image>What colour is the square?", [blue], 12), reference("What colour is the square?", [], 12)]
    assert len(set(expected)) == 3  # each image changes the answer
    before = httpx.get(f"{server}/healthz").json()["models"]["tiny-vlm"]["forward_passes"]

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as ac:
            return await asyncio.gather(*[ac.chat.completions.create(
                model="tiny-vlm", messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0)
                for content in asks])

    answers = asyncio.run(run())
    assert [a.choices[0].message.content for a in answers] == expected
    assert answers[0].usage.prompt_tokens == answers[2].usage.prompt_tokens + 4  # the image's 4 tokens
    stats = httpx.get(f"{server}/healthz").json()["models"]["tiny-vlm"]
    assert stats["forward_passes"] - before < 3 * 12  # they shared forward passes
    with pytest.raises(openai.BadRequestError, match="takes text only") as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": asks[0]}], max_tokens=2)
    assert e.value.body["param"] == "messages[0].content[0].image_url"

    def served() -> float:
        lines = httpx.get(f"{server}/metrics").text.splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines
                   if line.startswith("llmray:request_success_total{") and 'model_name="tiny-vlm"' in line)

    wait_for(lambda: served() >= 3, 15, "image requests counted in /metrics")


def test_llmray_eval_of_an_image_task_through_the_url_answers_as_the_folder(server, vlm_dir, tmp_path):
    """`llmray eval` of a visual-question task against the served image-text model (each image sent as a data: URI
    in an image_url part) gives the answers it gives on the model's folder."""
    from llmray.evals.run import evaluate

    lines = []
    for i, colour in enumerate(["red", "blue", "green"]):
        (tmp_path / f"{i}.png").write_bytes(colour_png(colour, seed=i))
        lines.append(json.dumps({"picture": f"{i}.png", "colour": colour}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    task = tmp_path / "colours.yaml"
    task.write_text("type: generate\ndata: d.jsonl\nimage: picture\nprompt: 'What colour is the square?'\n"
                    "target: colour\nmax_new_tokens: 6\nmetrics: [exact_match]\n")
    local = evaluate(str(vlm_dir), [str(task)], out=None)
    remote = evaluate(f"{server}/v1", [str(task)], model="tiny-vlm", api_key=KEY, out=None)
    answers = [a["answer"] for a in local["answers"]["colours"]]
    assert len(set(answers)) > 1, answers  # the images make a difference
    assert [a["answer"] for a in remote["answers"]["colours"]] == answers
    assert remote["tasks"]["colours"]["exact_match"] == local["tasks"]["colours"]["exact_match"]


def test_disconnected_stream_stops_generating(server):
    health = lambda: httpx.get(f"{server}/healthz").json()["models"]["tiny-b"]  # noqa: E731
    before = health()
    with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-b", "prompt": "x", "max_tokens": 250, "stream": True,
                            "ignore_eos": True}) as raw:
        for i, _ in enumerate(raw.iter_lines()):
            if i >= 2:
                break  # the client goes away mid-answer
    deadline = time.time() + 30
    while time.time() < deadline and (health()["cancelled"] == before["cancelled"] or health()["active"]):
        time.sleep(0.1)
    after = health()
    assert after["cancelled"] == before["cancelled"] + 1 and after["active"] == 0
    assert after["generated_tokens"] - before["generated_tokens"] < 250


def test_model_folder_from_object_storage(model_dir, server, s3, reference):
    """An `s3://` model folder (a moto server on 127.0.0.1): each replica downloads it; the replica's
    credentials come through its runtime_env, as they would on a cluster without instance roles."""
    import os

    import pyarrow.fs as pafs
    from ray import serve

    from llmray import storage
    from llmray.serve.app import build_app

    uri = "s3://llmray/exports/tiny"
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(model_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    serve.run(build_app({"models": [{"path": uri}]}, ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": env}}),
              name="from-s3", route_prefix="/s3")
    try:
        r = httpx.post(f"{server}/s3/v1/completions",
                       json={"model": "tiny", "prompt": "def main(", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference("def main(", 8)
    finally:
        serve.delete("from-s3")


def token_logprobs(model_dir, ids: list[int]):
    """Plain transformers: each token's log-probability given those before it, and every place's distribution."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return [lp[i - 1, t].item() for i, t in enumerate(ids) if i], lp


def test_echoed_prompt_logprobs_match_transformers(server, reference, model_dir):
    prompt = "import os\ndef main(argv):\n    return"
    r = httpx.post(f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    choice = r["choices"][0]
    assert choice["text"] == prompt and r["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    ids = reference.tokenizer(prompt).input_ids
    expected, dist = token_logprobs(model_dir, ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1:], expected)) < 1e-4
    assert "".join(lp["tokens"]) == prompt
    assert lp["text_offset"] == [a for a, _ in reference.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]]
    best = dist[0].topk(3)
    third = {reference.tokenizer.decode([i]): v for i, v in zip(best.indices.tolist(), best.values.tolist())}
    assert all(abs(lp["top_logprobs"][1][t] - v) < 1e-4 for t, v in third.items())


def greedy_ids(model_dir, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmray.data.template import stop_token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=stop_token_ids(tok),
                         pad_token_id=tok.eos_token_id)
    return [t for t in out[0, len(ids):].tolist() if t not in stop_token_ids(tok)]


def test_generated_and_chat_logprobs_match_transformers(server, client, reference, model_dir):
    prompt = "def main("
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True)
    lp = r.choices[0].logprobs
    prompt_ids = reference.tokenizer(prompt).input_ids
    generated = greedy_ids(model_dir, prompt_ids, 6)
    assert lp.tokens[len(prompt_ids):] == [reference.tokenizer.decode([t]) for t in generated]
    expected, _ = token_logprobs(model_dir, prompt_ids + generated)
    assert len(lp.tokens) == len(prompt_ids) + 6
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], expected)) < 1e-4
    greedy = lp.token_logprobs[len(prompt_ids):]
    assert all(abs(g - max(top.values())) < 1e-6 for g, top in zip(greedy, lp.top_logprobs[len(prompt_ids):]))
    assert lp.text_offset[len(prompt_ids)] == len(prompt)

    messages = [{"role": "user", "content": "import os"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)
    from llmray.data.template import render

    chat_prompt = reference.tokenizer(render(reference.tokenizer, messages, add_generation_prompt=True)).input_ids
    answer = greedy_ids(model_dir, chat_prompt, 5)
    assert [c.token for c in content] == [reference.tokenizer.decode([t]) for t in answer]
    expected, _ = token_logprobs(model_dir, chat_prompt + answer)
    assert max(abs(c.logprob - e) for c, e in zip(content, expected[len(chat_prompt) - 1:])) < 1e-4


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "stream": True}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 50}, "top_logprobs"),
])
def test_logprob_requests_beyond_what_the_server_allows_name_the_field(server, body, param):
    route = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{server}/v1/{route}", headers={"Authorization": f"Bearer {KEY}"}, json={"model": "tiny", **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_lm_evaluation_harness_scores_the_served_model(server, model_dir, reference, tmp_path, monkeypatch):
    """lm-eval itself (local-completions, untokenized requests) against the live server, on two tiny local tasks: a
    multiple-choice (log-likelihood) one and a generation one. Its per-choice log-likelihoods equal transformers'."""
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mc = [{"question": "import os\nimport", "choices": [" sys", " json", " re"], "answer": 0},
          {"question": "def main(", "choices": ["):", "self):", "x, y):"], "answer": 1},
          {"question": "for i in", "choices": [" range(10):", " items:", " x:"], "answer": 0}]
    gen = [{"prompt": "def main(", "target": "):"}, {"prompt": "import", "target": " os"}]
    for name, rows in (("mc", mc), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "test_split": "test"}
    tasks = {
        "llmray_tiny_mc": {**common, "dataset_kwargs": {"data_files": {"test": str(tmp_path / "mc.jsonl")}},
                           "output_type": "multiple_choice", "doc_to_text": "{{question}}",
                           "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}",
                           "metric_list": [{"metric": "acc"}]},
        "llmray_tiny_gen": {**common, "dataset_kwargs": {"data_files": {"test": str(tmp_path / "gen.jsonl")}},
                            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
                            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4},
                            "metric_list": [{"metric": "exact_match"}]},
    }
    for name, task in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"task": name, **task}))
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=list(tasks), task_manager=TaskManager(include_path=str(tmp_path)),
        model_args={"model": "tiny", "base_url": f"{server}/v1/completions", "tokenizer": str(model_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": False, "max_retries": 1},
        log_samples=True, batch_size=1)
    assert 0.0 <= out["results"]["llmray_tiny_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in out["results"]["llmray_tiny_gen"]
    checked = 0
    for sample in out["samples"]["llmray_tiny_mc"]:
        for (context, continuation), (got, _greedy) in zip(
                [a for a in sample["arguments"]], [r[0] for r in sample["resps"]]):
            ctx = reference.tokenizer(context, add_special_tokens=False).input_ids
            whole = reference.tokenizer(context + continuation, add_special_tokens=False).input_ids
            expected, _ = token_logprobs(model_dir, whole)
            assert abs(got - sum(expected[len(ctx) - 1:])) < 1e-4, (context, continuation)
            checked += 1
    assert checked == 9
    answers = [s["resps"][0][0] for s in out["samples"]["llmray_tiny_gen"]]
    assert answers == [reference(g["prompt"], 4).split("\n")[0] for g in gen]

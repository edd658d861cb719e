"""The Serve app without Ray Serve running: its config file and argument checks (the engine a replica runs is
tested in test_serve_slots.py)."""

import importlib.util

import pytest


def test_serve_config_file_is_valid_for_serve_and_for_the_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from llmray.serve.app import ServeArgs

    config = ServeDeploySchema.model_validate(yaml.safe_load(open("serve/config.yaml")))
    app = config.applications[0]
    assert app.import_path == "llmray.serve.app:build_app"
    args = ServeArgs.model_validate(app.args)
    assert args.models[0].id == "tiny" and args.engine == "transformers"
    assert app.deployments[0].name == "OpenAIServer" and app.deployments[0].autoscaling_config["max_replicas"] == 4


def test_bad_app_args_and_missing_vllm_are_refused_clearly(model_dir):
    from llmray.serve.app import ServeConfigError, build_app

    with pytest.raises(ServeConfigError, match="max_batch_sise"):
        build_app({"models": [{"path": str(model_dir)}], "max_batch_sise": 4})
    with pytest.raises(ServeConfigError, match="max_waiting_request"):  # the queue's bound, misspelt
        build_app({"models": [{"path": str(model_dir)}], "max_waiting_request": 4})
    with pytest.raises(ServeConfigError, match="request_timeout_s"):
        build_app({"models": [{"path": str(model_dir)}], "request_timeout_s": 0})
    with pytest.raises(ServeConfigError, match="kv_cache_bytes"):
        build_app({"models": [{"path": str(model_dir)}], "kv_cache_bytes": -1})
    if importlib.util.find_spec("vllm") is not None:
        return  # vLLM is here: the refusal cannot happen
    with pytest.raises(ServeConfigError, match="engine: vllm needs the vllm package"):
        build_app({"models": [{"path": str(model_dir)}], "engine": "vllm"})


def test_a_chat_prompt_takes_the_bos_its_template_writes_once_and_a_completion_the_tokenizers(tmp_path):
    """A tokenizer that adds a BOS (Llama's) and a chat template that writes one: a chat is tokenized as fine-tuning
    tokenized it (`template.encode_chat`: the template's BOS, none added), a completion's prompt with the BOS."""
    import asyncio

    import torch
    from helpers import colour_tokenizer
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmray.data.template import CHATML, encode_chat
    from llmray.serve.app import ServeArgs, Server
    from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest

    tok = colour_tokenizer()
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
    tok.chat_template = "{{ bos_token }}" + CHATML
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=128)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    server = Server(ServeArgs(models=[{"path": str(tmp_path), "name": "m"}]))
    turn = [{"role": "user", "content": "What colour is the square?"}]
    chat = asyncio.run(server._generate(ChatCompletionRequest.model_validate(
        {"model": "m", "messages": turn, "max_tokens": 1}), "chat", None))
    trained = encode_chat(tok, turn + [{"role": "assistant", "content": "It is"}])[0]
    assert list(trained).count(tok.bos_token_id) == 1
    prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    unadded = len(tok(prompt, add_special_tokens=False).input_ids)
    assert chat["usage"]["prompt_tokens"] == unadded == len(tok(prompt).input_ids) - 1
    completion = asyncio.run(server._generate(CompletionRequest.model_validate(
        {"model": "m", "prompt": "It is", "max_tokens": 1}), "completion", None))
    with_bos = len(tok("It is").input_ids)
    assert completion["usage"]["prompt_tokens"] == with_bos == len(tok("It is", add_special_tokens=False).input_ids) + 1

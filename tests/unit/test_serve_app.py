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

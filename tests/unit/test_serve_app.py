"""The Serve app without Ray Serve running: its config file and argument checks, and the continuous-batching engine
a replica runs, against plain `transformers` greedy generation on the same model (conftest's model_dir)."""

import asyncio
import importlib.util

import pytest
from helpers import greedy_reference


@pytest.fixture(scope="module")
def reference(model_dir):
    """Greedy continuation by plain transformers, the same tokenization as the server's."""
    return greedy_reference(model_dir)


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
    if importlib.util.find_spec("vllm") is not None:
        return  # vLLM is here: the refusal cannot happen
    with pytest.raises(ServeConfigError, match="engine: vllm needs the vllm package"):
        build_app({"models": [{"path": str(model_dir)}], "engine": "vllm"})


def test_engine_admits_late_requests_into_the_running_batch_exactly(model_dir, reference):
    """Continuous batching: requests joining mid-generation (other prompt lengths, so caches of other lengths
    are merged) still get exactly transformers' greedy text, and share forward passes with the running one."""
    from llmray.serve.engine import Engine, Finished, Sampling

    engine = Engine(str(model_dir), max_batch_size=8, batch_wait_s=0, device=None)
    prompts = ["def long_running_function(a, b, c):", "x", "import os, sys\nfrom pathlib import"]

    async def collect(prompt: str, started: asyncio.Event | None = None) -> str:
        text = ""
        async for ev in engine.stream(engine.encode(prompt), Sampling(40, 0.0)):
            if not isinstance(ev, Finished):
                text += ev
                if started is not None and len(text) > 10:
                    started.set()
        return text

    async def run():
        first_running = asyncio.Event()
        first = asyncio.create_task(collect(prompts[0], first_running))
        await first_running.wait()
        late = await asyncio.gather(*[collect(p) for p in prompts[1:]])
        return [await first, *late]

    texts = asyncio.run(run())
    expected = [reference(p, 40) for p in prompts]
    assert texts == expected
    assert engine.stats["largest_batch"] == 3 and engine.stats["forward_passes"] < 3 * 40

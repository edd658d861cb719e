"""`llmray serve`: exported folders (or Hub models) behind the OpenAI API on a local Ray (or the cluster in RAY_ADDRESS), until
Ctrl-C. For clusters and autoscaling, `serve run serve/config.yaml` builds the same app."""

from __future__ import annotations

import threading

from llmray import hub
from llmray.cluster import ensure_ray
from llmray.serve.app import ServeConfigError, build_app


def serve_models(paths: list[str], names: list[str] | None = None, host: str = "127.0.0.1", port: int = 8000,
                 replicas: int = 1, num_cpus: float = 1.0, num_gpus: float = 0.0, adapters: list[str] | None = None,
                 **args) -> None:
    """`adapters`: NAME=FOLDER LoRA adapters of the one model folder, each served as model id NAME. `args`: the
    rest of ServeArgs (api_key, max_batch_size, batch_wait_ms, ...), validated there."""
    from ray import serve

    models = [{"path": p} for p in paths]
    if names:
        if len(names) != len(models):
            raise ServeConfigError(f"--name was given {len(names)} times for {len(models)} model folders")
        for m, n in zip(models, names):
            m["name"] = n
    if adapters:
        if len(models) != 1:
            raise ServeConfigError(f"--adapter adds LoRA adapters to one base model folder; {len(models)} were given")
        pairs = [a.partition("=") for a in adapters]
        bad = [a for a, (n, eq, f) in zip(adapters, pairs) if not (n and eq and f)]
        if bad:
            raise ServeConfigError(f"--adapter {bad[0]!r} is not NAME=FOLDER")
        models[0]["adapters"] = {n: f for n, _, f in pairs}
    # the replicas reach the Hub with the caller's token and endpoint
    app = build_app({"models": models, **args}, num_replicas=replicas,
                    ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus,
                                       "runtime_env": {"env_vars": hub.env()}})
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="llmray", route_prefix="/", blocking=False)
    ids = ", ".join([m.get("name") or hub.display_name(m["path"]) for m in models]
                    + [f"{n} (adapter)" for m in models for n in m.get("adapters", {})])
    print(f"serving {ids} at http://{host}:{port}/v1 (OpenAI API; GET /healthz); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        serve.shutdown()

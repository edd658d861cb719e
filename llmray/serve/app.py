"""The Ray Serve application: an OpenAI-compatible HTTP API over one or several exported models.

    serve run serve/config.yaml            # import_path: llmray.serve.app:build_app
    llmray serve ./exports/my-model        # the same app on a local Ray

Routes: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not).
"""

# No `from __future__ import annotations` here: FastAPI, behind Serve's ingress, must see `Request` as a class,
# not a string, or it takes `request` for a query parameter and answers 422.
import asyncio
import json
import os
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from llmray import hub, storage
from llmray.errors import LlmrayError
from llmray.serve.engine import Engine, Finished
from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest, error
from llmray.serve.sampling import Sampling, TokenLogprob


class ServeConfigError(LlmrayError):
    pass


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str  # a Hugging Face model: an exported folder, local or s3://..., or a Hub id (org/name[@rev])
    name: str | None = None  # the `model` clients ask for; default: the folder's name
    # LoRA adapters of this model (`llmray export --adapter` folders, local or s3://), each served as its own
    # model id, batched with the base and each other
    adapters: dict[str, str] = Field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name or hub.display_name(self.path)


class ServeArgs(BaseModel):
    """The application's arguments (`args:` in serve/config.yaml); a typo is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    api_key: str | None = None  # or LLMRAY_API_KEY in the replica's environment
    max_batch_size: int = Field(16, ge=1)
    batch_wait_ms: float = Field(10.0, ge=0)
    engine: Literal["transformers", "vllm"] = "transformers"
    device: str | None = None  # default: cuda when the replica has a GPU
    cuda_graphs: bool | None = None  # replay each decode shape as a CUDA graph; default: on a GPU, without adapters
    # Streamed text is written at most this often (the first piece at once): each write costs Serve ~1-2 ms
    # of CPU between replica and proxy, which token-by-token writes multiply under load.
    stream_interval_ms: float = Field(50.0, ge=0)


def _local(path: str, marker: str = "config.json") -> str:
    """A model or adapter folder on this replica's node (a Hub id or an s3:// folder downloaded once per node)."""
    what = "adapter folder" if marker == ADAPTER_CONFIG else "model folder"
    folder = storage.local_folder(path, f"serve: {what}")
    if not os.path.isfile(os.path.join(folder, marker)):
        how = "llmray export --adapter" if marker == ADAPTER_CONFIG else "llmray export"
        raise ServeConfigError(f"{what} {path} has no {marker} (export a checkpoint with `{how}`)")
    return folder


ADAPTER_CONFIG = "adapter_config.json"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj) if not isinstance(obj, str) else obj}\n\n"


# Helpers the deployment calls are defined above it: Serve pickles the class when it is decorated, with the
# module-level names that exist then.

async def _nothing(top: int | None) -> AsyncIterator[Finished]:
    """What a request for no new token (`max_tokens: 0` with `echo`) gets from the engine."""
    yield Finished("length", 0, [] if top is not None else None)


def _refuse_logprob_options(body, kind: str) -> JSONResponse | None:
    if kind == "chat":
        if body.top_logprobs is not None and not body.logprobs:
            return error(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.logprobs and body.stream:
            return error(400, "logprobs are not available with stream: true here", param="stream")
        return None
    if body.max_tokens == 0 and not body.echo:
        return error(400, "max_tokens: 0 is allowed only with echo: true (the prompt scored, nothing generated)",
                     param="max_tokens")
    if body.stream and (body.echo or body.logprobs is not None):
        return error(400, "logprobs and echo are not available with stream: true here", param="stream")
    return None


def _top(engine: Engine, entry: TokenLogprob) -> dict[str, float]:
    """The most likely tokens at a place, and the chosen one (as vLLM does: a dict is never empty)."""
    top = {engine.token_text(i): lp for i, lp in entry.top}
    top.setdefault(engine.token_text(entry.token), entry.logprob)
    return top


def _completion_logprobs(engine: Engine, prompt: str, scored: list[TokenLogprob],
                         generated: list[TokenLogprob]) -> dict:
    """OpenAI's legacy completions `logprobs`: tokens, token_logprobs, top_logprobs and text_offset, over the
    echoed prompt (its first token has no logprob: null) and the generated tokens."""
    starts = engine.token_starts(prompt) if scored else []
    tokens = [engine.token_text(e.token) for e in scored + generated]
    offsets, at = list(starts), len(prompt)
    for text in tokens[len(scored):]:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in scored + generated],
            "top_logprobs": [None if e.logprob is None else _top(engine, e) for e in scored + generated],
            "text_offset": offsets}


def _chat_logprobs(engine: Engine, generated: list[TokenLogprob] | None) -> dict:
    """Chat completions' `logprobs`: each generated token with its log-probability and its top alternatives."""
    def item(token: int, logprob: float) -> dict:
        text = engine.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in generated or []]}


app = FastAPI(title="llmray", description="OpenAI-compatible completions and chat over llmray exports")


@serve.deployment(name="OpenAIServer", max_ongoing_requests=64)
@serve.ingress(app)
class OpenAIServer:
    def __init__(self, args: ServeArgs):  # validated once, by build_app
        self.args = args
        self.api_key = self.args.api_key or os.environ.get("LLMRAY_API_KEY")
        self.engines, self.routes = {}, {}  # model id -> Engine; model id -> (base model id, adapter or None)
        for m in self.args.models:
            adapters = {name: _local(path, ADAPTER_CONFIG) for name, path in m.adapters.items()}
            self.engines[m.id] = Engine(_local(m.path), self.args.max_batch_size, self.args.batch_wait_ms / 1000,
                                        self.args.device, adapters, self.args.cuda_graphs)
            self.routes[m.id] = (m.id, None)
            self.routes.update({name: (m.id, name) for name in adapters})
        self.created = int(time.time())

    # ---- plumbing ---------------------------------------------------------------------------------------------

    def _unauthorized(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if given != f"Bearer {self.api_key}":
            return error(401, "missing or wrong API key (send Authorization: Bearer <key>)", "authentication_error",
                         code="invalid_api_key")
        return None

    async def _parse(self, request: Request, model):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not valid JSON")
        try:
            return model.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return error(400, f"{where}: {first['msg']}", param=where or None)

    def _engine(self, name: str) -> tuple[Engine, str | None] | JSONResponse:
        """The engine serving model id `name`, and the adapter it names (None: the base model)."""
        if name not in self.routes:
            return error(404, f"model {name!r} is not served here; GET /v1/models lists {sorted(self.routes)}",
                         code="model_not_found", param="model")
        base, adapter = self.routes[name]
        return self.engines[base], adapter

    def _budget(self, engine: Engine, prompt_ids: list[int], max_tokens: int | None):
        room = engine.context - len(prompt_ids)
        wanted = max_tokens if max_tokens is not None else room
        if room <= 0 or wanted > room:
            return error(400, f"this model's context is {engine.context} tokens; the prompt has {len(prompt_ids)} "
                              f"and {wanted} more were asked for", param="messages" if max_tokens is None else "prompt",
                         code="context_length_exceeded")
        return wanted

    @staticmethod
    async def _merge(streams: list[AsyncIterator], every_s: float = 0.0) -> AsyncIterator[list[tuple[int, str | Finished]]]:
        """Events of several engine streams as (choice index, event), in lists of whatever is ready, at most one
        list per `every_s` after the first: one list is one write to the client, so tokens do not each pay Serve's
        per-chunk streaming cost (~1-2 ms). Consecutive text of one choice is joined. Closing the iterator
        cancels every stream."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, s):
            try:
                async for ev in s:
                    await queue.put((i, ev))
            except BaseException as e:  # noqa: BLE001 - surfaced to the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        left, last = len(tasks), None
        try:
            while left:
                ready = [await queue.get()]
                due = (last or 0.0) + every_s
                ends = sum(isinstance(ev, Finished) for _, ev in ready)
                while ends < left and (wait := due - time.monotonic()) > 0:  # gather until the write is due,
                    try:  # or until every stream has finished: the last words never wait
                        ready.append(await asyncio.wait_for(queue.get(), wait))
                        ends += isinstance(ready[-1][1], Finished)
                    except asyncio.TimeoutError:
                        break
                last = time.monotonic()
                while not queue.empty():
                    ready.append(queue.get_nowait())
                out: list = []
                for i, ev in ready:
                    if isinstance(ev, BaseException):
                        raise ev
                    left -= isinstance(ev, Finished)
                    if isinstance(ev, str) and out and out[-1][0] == i and isinstance(out[-1][1], str):
                        out[-1] = (i, out[-1][1] + ev)
                    else:
                        out.append((i, ev))
                yield out
        finally:
            for t in tasks:
                t.cancel()

    async def _generate(self, body, kind: str):
        routed = self._engine(body.model)
        if isinstance(routed, JSONResponse):
            return routed
        engine, adapter = routed
        if (refused := _refuse_logprob_options(body, kind)) is not None:
            return refused
        if kind == "chat":
            prompts = [engine.chat_prompt([(m.role, m.text) for m in body.messages])]
            limit = body.limit
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts, limit, top = body.prompts, body.max_tokens, body.logprobs
        encoded = [engine.encode(p) for p in prompts]
        budgets = []
        for ids in encoded:
            budget = self._budget(engine, ids, limit)
            if isinstance(budget, JSONResponse):
                return budget
            budgets.append(budget)
        echo = kind == "completion" and body.echo
        scored = [await engine.prompt_logprobs(ids, top or 0, adapter) if echo and top is not None else None
                  for ids in encoded]  # the prompt's own logprobs, when echoed with logprobs
        streams, prompt_tokens, sources = [], 0, []
        for k, (ids, budget) in enumerate(zip(encoded, budgets)):
            prompt_tokens += len(ids) * body.n
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                sampling = Sampling(budget, body.temperature, body.top_p, seed, body.stops, body.ignore_eos, top)
                streams.append(engine.stream(ids, sampling, adapter) if budget else _nothing(top))
                sources.append(k)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        events = self._merge(streams, self.args.stream_interval_ms / 1000 if body.stream else 0.0)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._chunks(events, rid, body.model, kind, len(streams), prompt_tokens,
                                                  include_usage), media_type="text/event-stream")
        texts, finished = [""] * len(streams), [None] * len(streams)
        async for ready in events:
            for i, ev in ready:
                if isinstance(ev, Finished):
                    finished[i] = ev
                else:
                    texts[i] += ev
        completion_tokens = sum(f.completion_tokens for f in finished)
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f.reason,
                        "logprobs": _chat_logprobs(engine, f.logprobs) if top is not None else None}
                       for i, (t, f) in enumerate(zip(texts, finished))]
        else:
            choices = []
            for i, (t, f, k) in enumerate(zip(texts, finished, sources)):
                text = prompts[k] + t if echo else t
                logprobs = None if top is None else _completion_logprobs(
                    engine, prompts[k] if echo else "", scored[k] or [], f.logprobs or [])
                choices.append({"index": i, "text": text, "finish_reason": f.reason, "logprobs": logprobs})
        return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion",
                "created": int(time.time()), "model": body.model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _chunks(self, events, rid: str, model: str, kind: str, n: int, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        created, completion_tokens = int(time.time()), 0
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False) -> dict:
            if kind == "chat":
                delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

        if kind == "chat":
            for i in range(n):
                yield _sse(chunk(i, "", None, first=True))
        async for ready in events:
            out = []
            for i, ev in ready:
                if isinstance(ev, Finished):
                    completion_tokens += ev.completion_tokens
                    out.append(_sse(chunk(i, None, ev.reason)))
                else:
                    out.append(_sse(chunk(i, ev, None)))
            yield "".join(out)
        if include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}})
        yield _sse("[DONE]")

    # ---- routes -----------------------------------------------------------------------------------------------

    @app.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "models": {name: e.stats for name, e in self.engines.items()}}

    @app.get("/v1/models")
    def models(self, request: Request):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "llmray",
             "context_length": self.engines[base].context, **({"parent": base} if adapter else {})}
            for name, (base, adapter) in self.routes.items()]}

    async def _answer(self, request: Request, shape, kind: str):
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await self._parse(request, shape)
        return body if isinstance(body, JSONResponse) else await self._generate(body, kind)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, CompletionRequest, "completion")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._answer(request, ChatCompletionRequest, "chat")


def build_app(args: dict | ServeArgs, **deployment_options) -> serve.Application:
    """`import_path: llmray.serve.app:build_app` in a Serve config; `args` as in `ServeArgs`. Keyword options
    (num_replicas, ray_actor_options, autoscaling_config, ...) go to the deployment, as `deployments:` would."""
    try:
        parsed = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ServeConfigError(f"serve args: {e}") from None
    if parsed.engine == "vllm":
        return _vllm_app(parsed)
    def here(path: str) -> str:
        """Replicas do not start in the caller's folder; a Hub id is pinned, so every replica loads one commit."""
        if hub.is_hub_id(path):
            return hub.pinned(path, "serve: model")
        return path if storage.is_uri(path) else os.path.abspath(path)

    ids = [m.id for m in parsed.models] + [a for m in parsed.models for a in m.adapters]
    if len(set(ids)) < len(ids):
        raise ServeConfigError(f"serve args: model ids must be unique; got {', '.join(ids)}")
    local = [m.model_copy(update={"path": here(m.path), "adapters": {n: here(p) for n, p in m.adapters.items()}})
             for m in parsed.models]
    deployment = OpenAIServer.options(**deployment_options) if deployment_options else OpenAIServer
    return deployment.bind(parsed.model_copy(update={"models": local}))


def _vllm_app(args: ServeArgs) -> serve.Application:
    """The same model folders on vLLM through `ray.serve.llm`, where vLLM is installed (GPU)."""
    try:
        import vllm  # noqa: F401
        from ray.serve.llm import LLMConfig, build_openai_app
    except ImportError:
        raise ServeConfigError("engine: vllm needs the vllm package (pip install vllm, on a GPU node); "
                               "engine: transformers serves the same model folders without it") from None
    if any(m.adapters for m in args.models):
        raise ServeConfigError("engine: vllm does not take adapters here; merge them (`llmray export` without "
                               "--adapter) or serve them with engine: transformers")
    configs = [LLMConfig(model_loading_config={"model_id": m.id, "model_source": m.path}) for m in args.models]
    return build_openai_app({"llm_configs": configs})

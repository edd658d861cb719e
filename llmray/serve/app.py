"""The Ray Serve application: an OpenAI-compatible HTTP API over one or several exported models.

    serve run serve/config.yaml            # import_path: llmray.serve.app:build_app
    llmray serve ./exports/my-model        # the same app on a local Ray

Routes: GET /healthz, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not).
"""

# No `from __future__ import annotations` here: FastAPI, behind Serve's ingress, must see `Request` as a class,
# not a string, or it takes `request` for a query parameter and answers 422.
import asyncio
import json
import logging
import os
import time
import uuid
from typing import AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve._private.http_util import make_fastapi_class_based_view

from llmray import hub, storage
from llmray.data.images import MAX_IMAGE_PIXELS
from llmray.errors import LlmrayError
from llmray.serve.engine import Engine, Finished
from llmray.serve.image_parts import ImageRefused, load_images, refuse_image_tokens
from llmray.serve.metrics import render
from llmray.serve.protocol import ChatCompletionRequest, CompletionRequest, error, error_body, overloaded, timed_out
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
    # Rows a model's engine queues beyond its running batch on one replica; past them a request gets 429 with
    # Retry-After (each of a request's prompts times n is a row).
    max_waiting_requests: int = Field(64, ge=0)
    retry_after_s: int = Field(1, ge=0)  # the Retry-After a 429 carries
    # A request still unfinished this long after it reached its replica ends with a 408 (a stream: an error event);
    # its rows leave the batch. null: no deadline.
    request_timeout_s: float | None = Field(600.0, gt=0)
    # Bytes the KV cache of each model may take; a row that would pass it waits to be admitted. null: on a GPU,
    # the device's free memory (less a tenth), on CPU half the memory available when the replica starts.
    kv_cache_bytes: int | None = Field(None, ge=1)
    # Chat image parts (image-text-to-text models): data: URIs always; local paths (or file://) and s3:// / gs://
    # URIs only under these prefixes (folders). Empty: data: URIs only.
    allowed_image_paths: list[str] = Field(default_factory=list)
    max_images_per_request: int = Field(8, ge=0)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)  # each image's encoded size
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=1)  # each image's width x height, as for fine-tuning data

    @property
    def max_rows(self) -> int:
        """Rows one model's engine takes on one replica, running and waiting; past them, 429."""
        return self.max_batch_size + self.max_waiting_requests


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


ROUTE_HEADROOM = 8  # requests a replica takes beyond its engines' rows: /healthz, /v1/models, refusals
DRAIN_WITHOUT_DEADLINE_S = 600.0  # with request_timeout_s null, how long a deploy waits for a replica's requests
METRICS_PUSH_S = 1.0  # how often each replica sends its figures to the MetricsBoard
METRICS_STALE_S = 10.0  # a replica silent this long is gone (killed, or replaced by a deploy): its series too


@serve.deployment(name="MetricsBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  logging_config={"enable_access_log": False})
class MetricsBoard:
    """Every live replica's latest figures, so GET /metrics on any ingress shows them all (each series labelled
    with its replica)."""

    def __init__(self):
        self.figures: dict[str, tuple[float, dict]] = {}  # replica -> (when, {model id: snapshot})

    def put(self, replica: str, figures: dict) -> None:
        self.figures[replica] = (time.monotonic(), figures)

    def render(self) -> str:
        now = time.monotonic()
        self.figures = {r: f for r, f in self.figures.items() if now - f[0] < METRICS_STALE_S}
        return render({(replica, model): snap for replica, (_, by_model) in self.figures.items()
                       for model, snap in by_model.items()})


class Server:
    """The engines and the OpenAI routes (`app`, bound to the replica's instance as @serve.ingress binds them); HTTP
    reaches them through OpenAIIngress (`relay`): Serve takes one FastAPI ingress per application."""

    def __init__(self, args: ServeArgs, board=None):  # validated once, by build_app
        self.args = args
        self.api_key = self.args.api_key or os.environ.get("LLMRAY_API_KEY")
        self.engines, self.routes = {}, {}  # model id -> Engine; model id -> (base model id, adapter or None)
        for m in self.args.models:
            adapters = {name: _local(path, ADAPTER_CONFIG) for name, path in m.adapters.items()}
            self.engines[m.id] = Engine(_local(m.path), self.args.max_batch_size, self.args.batch_wait_ms / 1000,
                                        self.args.device, adapters, self.args.cuda_graphs,
                                        kv_cache_bytes=self.args.kv_cache_bytes)
            self.routes[m.id] = (m.id, None)
            self.routes.update({name: (m.id, name) for name in adapters})
        self.created = int(time.time())
        self.board, self._pusher = board, None
        if board is not None:
            self._pusher = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        replica = serve.get_replica_context().replica_id.unique_id
        while True:
            try:
                await self.board.put.remote(replica, {name: e.metrics_snapshot() for name, e in self.engines.items()})
            except Exception as e:  # noqa: BLE001 - the board restarting; figures are sent again next time
                logging.getLogger(__name__).warning("metrics not sent to the MetricsBoard: %s", e)
            await asyncio.sleep(METRICS_PUSH_S)

    async def relay(self, method: str, path: str, query: bytes, headers: list, body: bytes) -> AsyncIterator[dict]:
        """An HTTP request OpenAIIngress forwards, answered by this replica's routes: the ASGI messages of the
        answer. Closing the iterator (the client went away) cancels the request, and with it its rows."""
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": query,
                 "headers": [(k.encode(), v.encode()) for k, v in headers], "server": ("127.0.0.1", 80),
                 "client": ("127.0.0.1", 0)}
        out: asyncio.Queue = asyncio.Queue()
        sent = False

        async def receive() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # no disconnect: closing this iterator cancels the request instead

        async def run():
            try:
                await app(scope, receive, out.put)
            finally:
                await out.put(None)

        task = asyncio.create_task(run())
        try:
            while (message := await out.get()) is not None:
                yield message
            await task  # an exception the app raised, raised here
        finally:
            task.cancel()

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

    async def _images(self, body: ChatCompletionRequest, engine: Engine) -> list | JSONResponse:
        """A chat's images, read and decoded (off the event loop), or a 400 naming the part that may not be: an
        image for a model that takes text only, or one `image_parts.load_images` refuses. In an image-text model's
        chat, a text holding its image token is refused too (images are image_url parts)."""
        urls = body.image_urls
        try:
            if engine.processor is None:
                if urls:
                    raise ImageRefused(urls[0][0], f"model {body.model!r} takes text only; send images to an "
                                                   "image-text-to-text model")
                return []
            refuse_image_tokens([t for i, m in enumerate(body.messages) for t in m.texts(i)], engine.image_token)
            a = self.args
            return await asyncio.to_thread(load_images, urls, a.max_images_per_request, a.max_image_bytes,
                                           a.max_image_pixels, a.allowed_image_paths)
        except ImageRefused as e:
            return error(400, str(e), param=e.where)

    @staticmethod
    def _pump(streams: list[AsyncIterator], engine: Engine) -> tuple[asyncio.Queue, list[asyncio.Task]]:
        """Each stream run by a task of its own into one queue of (choice index, event). Each row `engine.take`
        counted is given back when its task ends, however it ends (even cancelled before it began)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, s):
            try:
                async for ev in s:
                    await queue.put((i, ev))
            except BaseException as e:  # noqa: BLE001 - surfaced to the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        for t in tasks:
            t.add_done_callback(lambda _: engine.give_back())
        return queue, tasks

    @staticmethod
    async def _merge(pumped: tuple[asyncio.Queue, list[asyncio.Task]], every_s: float = 0.0
                     ) -> AsyncIterator[list[tuple[int, str | Finished]]]:
        """The pumped streams' events as (choice index, event), in lists of whatever is ready, at most one
        list per `every_s` after the first: one list is one write to the client, so tokens do not each pay Serve's
        per-chunk streaming cost (~1-2 ms). Consecutive text of one choice is joined. Closing the iterator
        cancels every stream."""
        queue, tasks = pumped
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

    async def _generate(self, body, kind: str, deadline: float | None):
        routed = self._engine(body.model)
        if isinstance(routed, JSONResponse):
            return routed
        engine, adapter = routed
        if (refused := _refuse_logprob_options(body, kind)) is not None:
            return refused
        images = None  # a chat's image inputs for the model (encode_images), if it holds images
        if kind == "chat":
            pictures = await self._images(body, engine)
            if isinstance(pictures, JSONResponse):
                return pictures
            prompts = [engine.chat_prompt([(m.role, m.text) for m in body.messages])]
            limit = body.limit
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            prompts, limit, top, pictures = body.prompts, body.max_tokens, body.logprobs, []
        if pictures:  # the processor expands each image's tokens (off the event loop: it resizes the images)
            ids, images = await asyncio.to_thread(engine.encode_images, prompts[0], pictures)
            encoded = [ids]
        else:
            encoded = [engine.encode(p, special_tokens=kind != "chat") for p in prompts]
        budgets = []
        for ids in encoded:
            budget = self._budget(engine, ids, limit)
            if isinstance(budget, JSONResponse):
                return budget
            budgets.append(budget)
        if not all(engine.fits_alone(len(ids), budget) for ids, budget in zip(encoded, budgets)):
            engine.metrics.add("request_rejected_total", reason="kv_cache")
            return error(400, f"the KV cache of prompt plus max_tokens would not fit this replica's kv_cache_bytes "
                              f"({engine.kv_cache_bytes}); ask for fewer tokens", param="max_tokens",
                         code="context_length_exceeded")
        echo = kind == "completion" and body.echo
        scored = [await engine.prompt_logprobs(ids, top or 0, adapter) if echo and top is not None else None
                  for ids in encoded]  # the prompt's own logprobs, when echoed with logprobs
        streams, prompt_tokens, sources = [], 0, []
        for k, (ids, budget) in enumerate(zip(encoded, budgets)):
            prompt_tokens += len(ids) * body.n
            for j in range(body.n):
                seed = None if body.seed is None else body.seed + j
                sampling = Sampling(budget, body.temperature, body.top_p, seed, body.stops, body.ignore_eos, top)
                streams.append(engine.stream(ids, sampling, adapter, images) if budget else _nothing(top))
                sources.append(k)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if not engine.take(len(streams), self.args.max_rows):
            engine.metrics.add("request_rejected_total", reason="queue_full")
            return overloaded(f"this replica has {engine.in_flight} rows of {body.model} running or queued, at most "
                              f"{self.args.max_rows} (max_batch_size + max_waiting_requests); retry later",
                              self.args.retry_after_s)
        events = self._merge(self._pump(streams, engine), self.args.stream_interval_ms / 1000 if body.stream else 0.0)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._chunks(events, rid, body.model, kind, len(streams), prompt_tokens,
                                                  include_usage, engine, deadline), media_type="text/event-stream")
        texts, finished = [""] * len(streams), [None] * len(streams)
        try:
            async with asyncio.timeout_at(deadline):
                async for ready in events:
                    for i, ev in ready:
                        if isinstance(ev, Finished):
                            finished[i] = ev
                        else:
                            texts[i] += ev
        except TimeoutError:
            await events.aclose()  # its rows leave the batch
            engine.metrics.add("request_timeout_total")
            return JSONResponse(timed_out(self.args.request_timeout_s), status_code=408)
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
                      include_usage: bool, engine: Engine, deadline: float | None) -> AsyncIterator[str]:
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
        loop = asyncio.get_running_loop()
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                ready = await asyncio.wait_for(anext(events), left)
            except StopAsyncIteration:
                break
            except TimeoutError:
                await events.aclose()  # its rows leave the batch
                engine.metrics.add("request_timeout_total")
                yield _sse(timed_out(self.args.request_timeout_s)) + _sse("[DONE]")
                return
            except Exception as e:  # noqa: BLE001 - the engine failed: the client hears it, the stream ends cleanly
                yield _sse(error_body(f"generation failed: {e}", "server_error")) + _sse("[DONE]")
                return
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
        timeout = self.args.request_timeout_s
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        if (denied := self._unauthorized(request)) is not None:
            return denied
        body = await self._parse(request, shape)
        return body if isinstance(body, JSONResponse) else await self._generate(body, kind, deadline)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, CompletionRequest, "completion")

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._answer(request, ChatCompletionRequest, "chat")


make_fastapi_class_based_view(app, Server)  # as @serve.ingress does: each route's `self` is the replica's instance
OpenAIServer = serve.deployment(name="OpenAIServer")(Server)

# The ingress's own routes: /metrics, and the rest relayed (the engines' app answers /docs and /openapi.json)
front = FastAPI(title="llmray", docs_url=None, redoc_url=None, openapi_url=None)
RELAY_TRIES = 2  # a request whose replica died before answering anything is sent once more (to another, or its restart)


def _replica_lost(e: BaseException) -> bool:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, (RayActorError, ActorUnavailableError))


def _is_stream(start: dict) -> bool:
    return any(k == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])


def _headers(start: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in start["headers"] if k != b"content-length"}


async def _rest_of_stream(answer) -> AsyncIterator[bytes]:
    """A relayed stream's events; if its replica dies mid-way, an error event and the stream's end."""
    try:
        async for message in answer:
            if message.get("body"):
                yield message["body"]
    except Exception as e:
        if not _replica_lost(e):
            raise
        yield _sse(error_body(f"the replica serving this stream stopped ({type(e).__name__}); the text above is all "
                              "that was generated", "server_error", code="replica_unavailable")) + _sse("[DONE]")


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(front)
class OpenAIIngress:
    """What HTTP reaches: GET /metrics, and every other request relayed to an OpenAIServer replica. It outlives
    them, so a replica that dies does not cut its clients off: a request it had not begun to answer goes to
    another replica (or the restarted one); a stream it had begun gets an error event, then its end."""

    def __init__(self, server, board, retry_after_s: int):
        self.server, self.board, self.retry_after_s = server, board, retry_after_s

    @front.get("/metrics")
    async def metrics(self) -> Response:
        return Response(await self.board.render.remote(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @front.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: Request, path: str):
        from ray.serve.exceptions import BackPressureError

        body = await request.body()
        headers = [(k, v) for k, v in request.headers.items() if k != "host"]
        for attempt in range(RELAY_TRIES):
            answer = self.server.relay.options(stream=True).remote(
                request.method, "/" + path, request.url.query.encode(), headers, body)
            try:
                start = await anext(answer)
                if not _is_stream(start):  # a whole answer: taken in full before anything goes out
                    content = b"".join([m.get("body", b"") async for m in answer])
                    return Response(content, start["status"], _headers(start))
            except BackPressureError:  # Serve's own queue for the replicas (max_queued_requests) is full
                return overloaded("every replica is busy and Serve's queue for them is full; retry later",
                                  self.retry_after_s)
            except Exception as e:
                if _replica_lost(e) and attempt + 1 < RELAY_TRIES:
                    continue
                if _replica_lost(e):
                    return error(503, f"the replica serving this request stopped ({type(e).__name__}); nothing was "
                                      "generated for it", "server_error", code="replica_unavailable")
                raise
            return StreamingResponse(_rest_of_stream(answer), start["status"], _headers(start))


def build_app(args: dict | ServeArgs, **deployment_options) -> serve.Application:
    """`import_path: llmray.serve.app:build_app` in a Serve config; `args` as in `ServeArgs`. Keyword options
    (num_replicas, ray_actor_options, autoscaling_config, ...) go to the OpenAIServer deployment (the engines), as
    `deployments:` would. Unless given there, its max_ongoing_requests lets every row the engines take
    (max_batch_size + max_waiting_requests per model) reach it, so the 429 past them is the app's, and its
    graceful_shutdown_timeout_s outlasts request_timeout_s, so a deploy lets running requests finish."""
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
    options = {"max_ongoing_requests": len(parsed.models) * parsed.max_rows + ROUTE_HEADROOM,
               "graceful_shutdown_timeout_s": (parsed.request_timeout_s or DRAIN_WITHOUT_DEADLINE_S) + 5,
               **deployment_options}
    board = MetricsBoard.bind()
    server = OpenAIServer.options(**options).bind(parsed.model_copy(update={"models": local}), board)
    return OpenAIIngress.options(graceful_shutdown_timeout_s=options["graceful_shutdown_timeout_s"]).bind(
        server, board, parsed.retry_after_s)


IMAGE_ARGS = ("allowed_image_paths", "max_images_per_request", "max_image_bytes", "max_image_pixels")


def _vllm_app(args: ServeArgs) -> serve.Application:
    """The same model folders on vLLM through `ray.serve.llm`, where vLLM is installed (GPU). Requests reach vLLM's
    OpenAI server as they came, image parts included: vLLM reads and limits images itself (its engine arguments
    limit_mm_per_prompt, allowed_local_media_path), so this app's image arguments are refused rather than ignored.
    Untested here (no vLLM)."""
    defaults = ServeArgs.model_construct()  # the declared defaults
    if given := [a for a in IMAGE_ARGS if getattr(args, a) != getattr(defaults, a)]:
        raise ServeConfigError(f"engine: vllm reads and limits images itself; {', '.join(given)} apply to engine: "
                               "transformers only (set vLLM's limit_mm_per_prompt / allowed_local_media_path instead)")
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

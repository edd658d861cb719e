"""Continuous batching for one model: concurrent requests share each forward pass.

One compute thread owns the model and a running batch whose keys and values live in a slot cache
(`slots.py`: one slot per row, written in place). Before every decode step it admits the requests that arrived
meanwhile (up to `max_batch_size` rows): they are prefilled together, left-padded, and each one's cache is copied
into a free slot, so a newcomer waits at most one step, not for the batch to finish. A row leaves the batch, and
its slot, the step it finishes: EOS, a stop string, `max_tokens`, or its client going away. Each row has its own
sampling parameters and seeded generator, so a seeded request gives the same text however it was batched (up to
float rounding). On a GPU each decode shape is captured once as a CUDA graph and replayed (`graphs.py`).

This module schedules; drawing tokens is `sampling.py`, turning them into streamed text (stop strings included) is
`text.py`.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache

from llmray.data import pixels
from llmray.data.template import render, stop_token_ids
from llmray.model.build import (
    PIXELS_PER_ROW,
    image_tensors,
    inference_device,
    is_vision_language,
    load_for_inference,
)
from llmray.serve.graphs import DecodeGraphs
from llmray.serve.metrics import EngineMetrics
from llmray.serve.sampling import Sampling, TokenLogprob, sample, token_logprob
from llmray.serve.slots import MaskLayout, SlotCache, batch_bucket
from llmray.serve.text import TextStream

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
CPU_KV_SHARE = 0.5  # on CPU without kv_cache_bytes: the KV cache may take this share of the memory free at start
GPU_HEADROOM = 0.1  # on a GPU: this share of the device's memory is left free for activations and logits
MEMORY_WAIT_S = 0.05  # how often an idle engine whose waiting rows do not fit looks at free memory again


def kv_position_bytes(config, dtype: torch.dtype) -> int:
    """Bytes one position of one slot takes in the KV cache: keys and values of every layer."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # each generated token's, when the request asked for them


@dataclass
class Rollout:
    """One completion of `Engine.generate`: its tokens (the stop token that ended it included, so a policy learns to
    stop), each one's log-probability as sampled (at the sampling temperature), and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    reason: str  # "stop" or "length"


@dataclass
class _Row:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop | None  # None: a rollout row, read back by `generate`, never streamed
    events: asyncio.Queue | None
    text: TextStream  # what of its generated text has gone out
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    adapter: str = BASE  # the LoRA adapter this row generates with
    images: dict[str, np.ndarray] | None = None  # the processor's image inputs (`pixels.expand`), for the prefill
    rope_delta: int = 0  # M-RoPE: its next position less its cache length (its image tokens took fewer positions)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    reason: str | None = None  # once finished

    def emit(self, event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Batch:
    rows: list[_Row]  # row i's keys and values are in the slot cache's slot i
    tokens: torch.Tensor  # each row's last sampled token, not yet fed to the model


class Engine:
    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_s: float, device: str | None,
                 adapters: dict[str, str] | None = None, cuda_graphs: bool | None = None, tokenizer: str | None = None,
                 kv_cache_bytes: int | None = None):
        """`adapters`: name -> PEFT adapter folder of this base model; rows of different adapters (and of the
        base) share a batch, peft applying each row's adapter (mixed-batch LoRA). `cuda_graphs`: replay each decode
        shape as a CUDA graph; None: on a GPU. Never with adapters (peft picks each row's adapter on the host,
        step by step). Without CUDA, true runs the same fixed-buffer path without a capture. `tokenizer`: a folder
        of its own (default: the model's). `kv_cache_bytes`: what the KV cache may take (`admission_budget`);
        None: on a GPU, the device's free memory at each admission; on CPU, CPU_KV_SHARE of the memory available
        at start."""
        self.device = inference_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_dir)
        self.backend = self.tokenizer.backend_tokenizer
        self.model = load_for_inference(model_dir, self.device)
        # M-RoPE (Qwen2-VL and its kin): a prefill's positions come from the whole sequence, its image tokens' from
        # their place in the image; each decode step's are the row's cache length plus the row's `rope_delta`
        self.rope_index = next((m.get_rope_index for m in (self.model, getattr(self.model, "model", None))
                                if hasattr(m, "get_rope_index")), None)
        # an image-text-to-text model: its processor prepares a request's images and expands their tokens
        self.processor = pixels.load_processor(model_dir) if is_vision_language(self.model.config) else None
        self.pixels_per_row = self.model.config.model_type in PIXELS_PER_ROW
        config = self.model.config.get_text_config()  # the language model's: layers, heads, positions
        if self.model.config._attn_implementation not in ("sdpa", "eager"):  # the decode step's mask is a 4-D tensor
            self.model.set_attn_implementation("sdpa")
        # transformers 5.x renames forward's past_key_values to cache (the old name goes at 5.40)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.adapters = sorted(adapters or {})
        if adapters:
            from peft import PeftModel

            first, *rest = self.adapters
            self.model = PeftModel.from_pretrained(self.model, adapters[first], adapter_name=first).eval()
            for name in rest:
                self.model.load_adapter(adapters[name], adapter_name=name)
        self.context = int(getattr(config, "max_position_embeddings", 2048))
        self.eos = self.tokenizer.eos_token_id
        self.stops = set(stop_token_ids(self.tokenizer))  # EOS, and the chat template's end of turn
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.cache = SlotCache(config.num_hidden_layers, max_batch_size, self.context, MaskLayout.of(config))
        # each slot row's M-RoPE delta, in a fixed buffer a decode graph reads
        self.rope_deltas = (torch.zeros((max_batch_size, 1), dtype=torch.long, device=self.device)
                            if self.rope_index is not None else None)
        use_graphs = (self.device.type == "cuda" if cuda_graphs is None else cuda_graphs) and not self.adapters
        self.graphs = DecodeGraphs(self._decode_step, self.device) if use_graphs else None
        self.incoming: queue.Queue[_Row] = queue.Queue()
        self.pending: deque[_Row] = deque()  # taken from `incoming`, waiting for a slot (or for memory)
        self.kv_position_bytes = kv_position_bytes(config, self.model.dtype)
        if kv_cache_bytes is None and self.device.type != "cuda":
            import psutil

            kv_cache_bytes = int(psutil.virtual_memory().available * CPU_KV_SHARE)
        self.kv_cache_bytes = kv_cache_bytes
        self.metrics = EngineMetrics()
        self.in_flight = 0  # rows taken (`take`) and not given back: running, waiting, or about to arrive
        self.last_admitted = 1
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._model_lock = threading.Lock()  # the compute thread's forwards and prompt scoring take turns
        # requests' threads take turns with the processor: a fast tokenizer used from two threads at once can fail
        # ("Already borrowed")
        self._processor_lock = threading.Lock()
        self._outbox: list[tuple[_Row, object]] = []
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "forward_passes": 0, "active": 0,
                      "largest_batch": 0, "kv_slots": 0, "kv_positions": 0, "decode_graphs": 0, "kv_bytes_peak": 0}

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """`text`'s token ids; `special_tokens`: with those the tokenizer adds (a BOS), which a chat prompt, rendered
        by its template with them written in, does not take again (as fine-tuning encodes it)."""
        return self.tokenizer(text, add_special_tokens=special_tokens).input_ids

    def token_starts(self, text: str) -> list[int]:
        """Where each token of `encode(text)` starts in `text` (characters)."""
        return [a for a, _ in self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        """The prompt as fine-tuning rendered conversations: the model's chat template (ChatML when it has none),
        ending in an open assistant turn; an image-text model's processor's image token where IMAGE_PLACEHOLDER
        marks an image."""
        turns = [{"role": r, "content": c} for r, c in messages]
        if self.processor is not None:
            turns = pixels.with_image_token(self.processor, {"messages": turns})
        return render(self.tokenizer, turns, add_generation_prompt=True)

    @property
    def image_token(self) -> str | None:
        """The text that stands for an image in this model's prompts; None: the model takes text only."""
        return None if self.processor is None else getattr(self.processor, "image_token", None)

    def encode_images(self, prompt: str, images: list) -> tuple[list[int], dict[str, np.ndarray]]:
        """A prompt holding the image token once per image, and its Pillow images: the token ids with each image's
        tokens expanded, and the image inputs of the model's forward (pixel_values, ...), as fine-tuning's rows are
        made (`pixels.expand`)."""
        with self._processor_lock:
            ids, inputs = pixels.expand(self.processor, prompt, images)
        return ids.tolist(), inputs

    # ---- the asyncio side ---------------------------------------------------------------------------------

    async def prompt_logprobs(self, prompt_ids: list[int], top: int, adapter: str | None = None
                              ) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has none), and the `top`
        most likely tokens at each place: one forward of the prompt alone (no padding, so the values are those
        of plain transformers), taking turns with the batch."""
        return await asyncio.to_thread(self._score, prompt_ids, top, adapter or BASE)

    @torch.no_grad()
    def _score(self, prompt_ids: list[int], top: int, adapter: str) -> list[TokenLogprob]:
        ids = torch.tensor([prompt_ids], device=self.device)
        kwargs = {"adapter_names": [adapter]} if self.adapters else {}
        with self._model_lock:
            logits = self.model(input_ids=ids, use_cache=False, **kwargs).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        out = [TokenLogprob(prompt_ids[0], None, [])]
        for i, token in enumerate(prompt_ids[1:]):
            out.append(token_logprob(lp[i], token, top))
        return out

    async def stream(self, prompt_ids: list[int], sampling: Sampling, adapter: str | None = None,
                     images: dict[str, np.ndarray] | None = None) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then a `Finished`. Closing the iterator early cancels the row.
        `adapter`: one of this engine's LoRA adapters, or None for the base model. `images`: `encode_images`'
        inputs for the prompt's images (its prefill runs them through the model; its decode steps are text)."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve_forever, name="llmray-engine", daemon=True)
                self._thread.start()
        row = _Row(list(prompt_ids), sampling, asyncio.get_running_loop(), asyncio.Queue(),
                   TextStream(self.backend, sampling.stop), adapter=adapter or BASE, images=images)
        self.stats["requests"] += 1
        self.incoming.put(row)
        done = False
        try:
            while not done:
                event = await row.events.get()
                if isinstance(event, BaseException):
                    raise event
                done = isinstance(event, Finished)
                yield event
        finally:
            if not done:  # the caller went away (client disconnect, cancelled request, deadline): stop computing
                row.cancelled.set()

    # ---- rollouts (online RL): a batch generated in the caller's thread -------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Rollout]:
        """Each prompt's completion, decoded `max_batch_size` rows at a time in order, so the same prompts and seeds
        give the same batches, and the same tokens, on a rerun. Not beside serving: the engine's batch is the
        rollouts'."""
        if self._thread is not None:
            raise RuntimeError("Engine.generate: this engine is serving requests; rollouts need an engine of their own")
        rows = [_Row(list(p), s, None, None, TextStream(self.backend, s.stop)) for p, s in zip(prompts, samplings)]
        for start in range(0, len(rows), self.max_batch_size):
            batch = self._prefill(None, rows[start:start + self.max_batch_size])
            while batch is not None:
                batch = self._decode(batch)
        self._outbox = []
        return [Rollout(r.generated, [lp.logprob for lp in r.logprobs], r.reason) for r in rows]

    def release(self) -> None:
        """Let the KV cache's buffers go (a colocated generator, before training takes the device back)."""
        self.cache.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- the compute thread -------------------------------------------------------------------------------

    # ---- admission: slots, and memory for the KV cache ------------------------------------------------------

    def take(self, rows: int, limit: int) -> bool:
        """Count `rows` more rows in flight, if that keeps them within `limit` (the event loop's calls, so a check
        and its count are one step: a burst cannot slip past the bound)."""
        if self.in_flight + rows > limit:
            return False
        self.in_flight += rows
        return True

    def give_back(self, rows: int = 1) -> None:
        self.in_flight -= rows

    @property
    def waiting(self) -> int:
        """Rows that arrived and are not yet in the batch."""
        return self.incoming.qsize() + len(self.pending)

    def positions(self, prompt_tokens: int, max_tokens: int) -> int:
        """The KV positions a row of this prompt may come to hold."""
        return min(self.context, prompt_tokens + max_tokens + 1)

    def admission_budget(self) -> int | None:
        """Bytes the KV cache may come to take now: `kv_cache_bytes` when set (CPU: always); on a GPU, what the
        cache holds plus the device's free memory (the allocator's unused reserve counted free), less GPU_HEADROOM
        of the device. None: no limit."""
        if self.kv_cache_bytes is not None:
            return self.kv_cache_bytes
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(free + unused + self.cache.nbytes - GPU_HEADROOM * total)

    def kv_needed(self, running: list[_Row], fresh: list[_Row], empty: bool = False) -> int:
        """The most memory the KV cache takes while `fresh` rows join `running` ones and all run to their
        max_tokens: the grown buffers, the old ones while they are copied over, and the newcomers' prefill."""
        every = running + fresh
        after = self.cache.planned_bytes(len(every), max(self.positions(len(r.prompt_ids), r.sampling.max_tokens)
                                                         for r in every), self.kv_position_bytes, empty)
        now = 0 if empty else self.cache.nbytes
        prefill = len(fresh) * max((len(r.prompt_ids) for r in fresh), default=0) * self.kv_position_bytes
        return after + (now if after > now else 0) + prefill

    def fits_alone(self, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether a request of one row could ever be admitted under `kv_cache_bytes` (False: refuse it, rather
        than let it wait forever)."""
        if self.kv_cache_bytes is None:
            return True
        row = _Row([0] * prompt_tokens, Sampling(max_tokens), None, None, None)
        return self.kv_needed([], [row], empty=True) <= self.kv_cache_bytes

    def _admit(self, running: list[_Row]) -> list[_Row]:
        """New rows for the batch, first come first served, while slots and the KV budget allow: blocks while
        idle; under load, may wait `batch_wait_s` for company. A row that does not fit waits, and the rows behind
        it with it."""
        room = self.max_batch_size - len(running)
        if not running and not self.pending:
            self.pending.append(self.incoming.get())
            if self.last_admitted > 1:  # a burst is likely: let it gather (a lone client would only wait)
                deadline = time.monotonic() + self.batch_wait_s
                while len(self.pending) < room and (left := deadline - time.monotonic()) > 0:
                    try:
                        self.pending.append(self.incoming.get(timeout=left))
                    except queue.Empty:
                        break
        while True:
            try:
                self.pending.append(self.incoming.get_nowait())
            except queue.Empty:
                break
        live = [r for r in self.pending if not r.cancelled.is_set()]
        if len(live) < len(self.pending):  # gone before they started: client away, or past their deadline
            self.stats["cancelled"] += len(self.pending) - len(live)
            self.pending = deque(live)
        budget = self.admission_budget()
        rows: list[_Row] = []
        while self.pending and len(rows) < room:
            if budget is not None and self.kv_needed(running, rows + [self.pending[0]]) > budget:
                if running or rows or not self.cache.slots:
                    break
                self.cache.release()  # idle: buffers sized for an earlier burst give way to the waiting row
                continue
            rows.append(self.pending.popleft())
        if not rows and not running and self.pending:
            time.sleep(MEMORY_WAIT_S)  # idle, and the first waiting row does not fit the free memory yet
        if rows:
            self.last_admitted = len(rows)
        return rows

    def _serve_forever(self) -> None:
        batch: _Batch | None = None
        while True:
            fresh: list[_Row] = []
            try:
                fresh = self._admit(batch.rows if batch else [])
                with torch.no_grad():
                    if fresh:
                        batch = self._prefill(batch, fresh)
                    if batch is not None:
                        batch = self._decode(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request must hear of it, and the engine lives on
                for r in (batch.rows if batch else []) + fresh:
                    r.emit(e)
                batch = None
                self.cache.keep([])
            self.stats.update(active=len(batch.rows) if batch else 0, kv_slots=self.cache.slots,
                              kv_positions=self.cache.capacity, decode_graphs=len(self.graphs or ()),
                              kv_bytes_peak=max(self.stats["kv_bytes_peak"], self.cache.nbytes))

    def metrics_snapshot(self) -> dict:
        """What GET /metrics shows of this engine (`metrics.py`)."""
        budget = self.admission_budget()
        gauges = {"num_requests_running": self.stats["active"], "num_requests_waiting": self.waiting,
                  "kv_cache_usage_bytes": self.cache.nbytes, "kv_cache_budget_bytes": budget or 0}
        snap = self.metrics.snapshot(gauges)
        snap["counters"] += [["generation_tokens_total", {}, self.stats["generated_tokens"]],
                             ["request_cancelled_total", {}, self.stats["cancelled"]]]
        return snap

    def _prefill(self, batch: "_Batch | None", fresh: list[_Row]) -> "_Batch | None":
        """The newcomers' prompts in one forward, their caches into the slots after the running rows'."""
        for r in fresh:
            if r.sampling.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.sampling.seed)
        width = max(len(r.prompt_ids) for r in fresh)
        ids = torch.full((len(fresh), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(fresh), width), dtype=torch.long)
        for i, r in enumerate(fresh):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        images = self._image_inputs(fresh, width)
        if self.rope_index is not None:
            positions = self._rope_positions(ids, mask, images, fresh)
        else:
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        prefill = DynamicCache()
        logits = self._forward(ids, mask, positions, prefill, fresh, images)
        self.cache.admit(prefill, [len(r.prompt_ids) for r in fresh])
        self.metrics.add("prompt_tokens_total", sum(len(r.prompt_ids) for r in fresh))
        tokens, done = self._take(fresh, logits)
        running = batch.rows if batch else []
        if batch:
            tokens = torch.cat([batch.tokens, tokens])
        return self._keep(running + fresh, tokens, [False] * len(running) + done)

    def _decode(self, batch: "_Batch") -> "_Batch | None":
        """One token for every row. With graphs the batch is padded to its bucket (padding rows write position 0
        of free slots), so a graph serves every batch size up to the bucket."""
        count = len(batch.rows)
        graphs = self.graphs is not None and self.graphs.on
        rows = batch_bucket(count, self.max_batch_size) if graphs else count
        self.cache.reserve(rows, max(self.cache.lengths) + 1)
        span = self.cache.span(repeatable=graphs)
        positions = torch.tensor(self.cache.lengths + [0] * (rows - count), device=self.device)[:, None]
        if self.rope_deltas is not None:
            self.rope_deltas[:rows, 0] = torch.tensor([r.rope_delta for r in batch.rows] + [0] * (rows - count))
        ids = torch.cat([batch.tokens, batch.tokens.new_full((rows - count,), self.pad)])[:, None]
        with self._model_lock:
            if graphs:
                logits = self.graphs.run(ids, positions, span, self.cache.reallocations)
            else:
                logits = self._decode_step(ids, positions, span, batch.rows)
        self.stats["forward_passes"] += 1
        self.cache.advance(count)
        tokens, done = self._take(batch.rows, logits[:count])
        return self._keep(batch.rows, tokens, done)

    def _decode_step(self, ids: torch.Tensor, positions: torch.Tensor, span: int, rows: list[_Row] | None = None
                     ) -> torch.Tensor:
        """Logits of one token per slot row, [rows, vocab], attending `span` positions; reads only its arguments
        and the cache's buffers (what a CUDA graph of it replays). `rows`: the batch's rows, for their adapters
        (no graphs then)."""
        self.cache.bind(positions[:, 0], span)
        eager = self.model.config._attn_implementation == "eager"  # which adds the mask to the scores
        mask = self.cache.attention_mask(self.model.dtype if eager else None)
        kwargs = {"adapter_names": [r.adapter for r in rows]} if self.adapters else {}
        kwargs[self.cache_kwarg] = self.cache
        if self.rope_deltas is not None:  # the cache's write positions, moved to the rows' M-RoPE text positions
            positions = positions + self.rope_deltas[:len(positions)]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()

    def _take(self, rows: list[_Row], logits: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Sample each row's next token and hand it to its client: the tokens, and which rows are done."""
        tokens = sample(logits, [r.sampling for r in rows], [r.generator for r in rows])
        wanted = any(r.sampling.logprobs is not None for r in rows)
        if any(r.loop is None for r in rows):  # rollouts: the distribution each token was drawn from
            scale = torch.tensor([r.sampling.temperature or 1.0 for r in rows], device=logits.device)
            lps = torch.log_softmax(logits / scale[:, None], -1)
        else:
            lps = torch.log_softmax(logits, -1) if wanted else [None] * len(rows)
        done = [self._advance(r, t, lp) for r, t, lp in zip(rows, tokens.tolist(), lps)]
        self._deliver()
        return tokens, done

    def _keep(self, rows: list[_Row], tokens: torch.Tensor, done: list[bool]) -> "_Batch | None":
        """The batch without its finished rows, which leave their slots (refilled by rows from the end)."""
        keep = [i for i, d in enumerate(done) if not d]
        if len(keep) < len(rows):
            order = self.cache.keep(keep)
            rows = [rows[i] for i in order]
            tokens = tokens[torch.tensor(order, dtype=torch.long, device=tokens.device)]
        if not rows:
            return None
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        return _Batch(rows, tokens)

    def _deliver(self) -> None:
        """This step's events, handed to each event loop in one call rather than one wake-up per row."""
        by_loop: dict = {}
        for r, event in self._outbox:
            if r.loop is not None:
                by_loop.setdefault(r.loop, []).append((r.events, event))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(lambda items=items: [q.put_nowait(e) for q, e in items])

    def _image_inputs(self, rows: list[_Row], width: int) -> dict[str, torch.Tensor]:
        """The image inputs of a prefill of `rows` left-padded to `width` (`pixels.left_padded_inputs`), on the model's
        device, pixels in its dtype (bf16 on a GPU). {} when no row has an image."""
        inputs = pixels.left_padded_inputs([(len(r.prompt_ids), r.images) for r in rows], width, self.pixels_per_row)
        return image_tensors(inputs, self.device, self.model.dtype)

    def _rope_positions(self, ids: torch.Tensor, mask: torch.Tensor, images: dict[str, torch.Tensor],
                        rows: list[_Row]) -> torch.Tensor:
        """A prefill's M-RoPE positions, (3, rows, width), as the model computes them (`get_rope_index`); each row's
        `rope_delta` set for its decode steps."""
        types = images.get("mm_token_type_ids", torch.zeros_like(ids))  # all text
        positions, deltas = self.rope_index(input_ids=ids, mm_token_type_ids=types,
                                            image_grid_thw=images.get("image_grid_thw"), attention_mask=mask)
        for r, delta in zip(rows, deltas.view(-1).tolist()):
            r.rope_delta = int(delta)
        return positions

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 rows: list[_Row], images: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """A left-padded prefill's last logits per row; `images`: its rows' image inputs (`_image_inputs`)."""
        kwargs = {"adapter_names": [r.adapter for r in rows]} if self.adapters else {}
        kwargs.update(images or {})
        kwargs[self.cache_kwarg] = cache
        with self._model_lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **kwargs)
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :].float()

    def _advance(self, r: _Row, token: torch.Tensor, logprobs: torch.Tensor | None = None) -> bool:
        """Take one token into the row, send what text is final; True when the row is done. `logprobs`: the
        distribution it was drawn from (log_softmax of the logits), kept when the request asked for them."""
        if r.cancelled.is_set():
            self.stats["cancelled"] += 1
            return True
        token = int(token)
        self.stats["generated_tokens"] += 1
        if r.first_token_at is None:
            r.first_token_at = time.monotonic()
            self.metrics.observe("time_to_first_token_seconds", r.first_token_at - r.arrived)
        if token in self.stops and not r.sampling.ignore_eos:
            if r.loop is None:  # a rollout keeps its stop token: the policy is trained to stop there
                r.generated.append(token)
                r.logprobs.append(token_logprob(logprobs, token, 0))
            return self._finish(r, "stop")
        r.generated.append(token)
        if r.sampling.logprobs is not None or r.loop is None:  # asked for, or a rollout's
            r.logprobs.append(token_logprob(logprobs, token, r.sampling.logprobs or 0))
        if r.text.add(token):
            self._send(r, r.text.until_stop())
            return self._finish(r, "stop", flush=False)
        if len(r.generated) >= r.sampling.max_tokens:
            return self._finish(r, "length")
        self._send(r, r.text.safe())
        return False

    def _send(self, r: _Row, delta: str) -> None:
        if delta:
            self._outbox.append((r, delta))

    def _finish(self, r: _Row, reason: str, flush: bool = True) -> bool:
        """End the row. `flush` sends any text held back; a matched stop string has already sent the text before
        it."""
        if flush:
            self._send(r, r.text.complete(self.tokenizer.decode(r.generated, skip_special_tokens=True)))
        logprobs = r.logprobs if r.sampling.logprobs is not None else None
        r.reason = reason
        now, count = time.monotonic(), len(r.generated)
        self.metrics.observe("e2e_request_latency_seconds", now - r.arrived)
        if count > 1:
            self.metrics.observe("time_per_output_token_seconds", (now - r.first_token_at) / (count - 1))
        self.metrics.add("request_success_total", finished_reason=reason)
        self._outbox.append((r, Finished(reason, len(r.generated), logprobs)))
        return True

"""Continuous batching for one model: concurrent requests share each forward pass.

One compute thread owns the model and a running batch with one KV cache. Before every decode step it admits the
requests that arrived meanwhile (up to `max_batch_size` rows): they are prefilled together, left-padded, and
their cache is merged into the running one (the shorter side padded on the left, masked out), so a newcomer
waits at most one step, not for the batch to finish. A row leaves the batch, and the cache, the step it
finishes: EOS, a stop string, `max_tokens`, or its client going away. Each row has its own sampling parameters
and seeded generator, so a seeded request gives the same text however it was batched (up to float rounding).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
from tokenizers.decoders import DecodeStream
from transformers import AutoTokenizer, DynamicCache

from llmray.data.template import render, stop_token_ids
from llmray.model import inference_device, load_for_inference

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # each generated token's log-probability, and this many of the most likely


@dataclass
class TokenLogprob:
    """One token of a text and its log-probability under the model (None for a prompt's first token), with the
    `top` most likely tokens at its place (id, log-probability), most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # each generated token's, when the request asked for them


@dataclass
class _Row:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text already sent
    decoded: str = ""  # text decoded so far (may run ahead of `text` while a stop string could be forming)
    decoder: DecodeStream = field(default_factory=lambda: DecodeStream(skip_special_tokens=True))
    generator: torch.Generator | None = None
    adapter: str = BASE  # the LoRA adapter this row generates with
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Batch:
    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cache length]: 1 for real tokens, 0 for left padding
    tokens: torch.Tensor | None  # each row's last sampled token, not yet fed to the model


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry in one place's log-probabilities, with the `top` most likely tokens there."""
    best = torch.topk(logprobs, top) if top else None
    pairs = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), pairs)


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_s: float, device: str | None,
                 adapters: dict[str, str] | None = None):
        """`adapters`: name -> PEFT adapter folder of this base model; rows of different adapters (and of the
        base) share a batch, peft applying each row's adapter (mixed-batch LoRA)."""
        self.device = inference_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.backend = self.tokenizer.backend_tokenizer
        self.model = load_for_inference(model_dir, self.device)
        self.adapters = sorted(adapters or {})
        if adapters:
            from peft import PeftModel

            first, *rest = self.adapters
            self.model = PeftModel.from_pretrained(self.model, adapters[first], adapter_name=first).eval()
            for name in rest:
                self.model.load_adapter(adapters[name], adapter_name=name)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos = self.tokenizer.eos_token_id
        self.stops = set(stop_token_ids(self.tokenizer))  # EOS, and the chat template's end of turn
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.incoming: queue.Queue[_Row] = queue.Queue()
        self.last_admitted = 1
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._model_lock = threading.Lock()  # the compute thread's forwards and prompt scoring take turns
        self._outbox: list[tuple[_Row, object]] = []
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "forward_passes": 0, "active": 0,
                      "largest_batch": 0}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def token_starts(self, text: str) -> list[int]:
        """Where each token of `encode(text)` starts in `text` (characters)."""
        return [a for a, _ in self.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        """The prompt as fine-tuning rendered conversations: the model's chat template (ChatML when it has none),
        ending in an open assistant turn."""
        return render(self.tokenizer, [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True)

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
            out.append(_token_logprob(lp[i], token, top))
        return out

    async def stream(self, prompt_ids: list[int], sampling: Sampling, adapter: str | None = None
                     ) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then a `Finished`. Closing the iterator early cancels the row.
        `adapter`: one of this engine's LoRA adapters, or None for the base model."""
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve_forever, name="llmray-engine", daemon=True)
                self._thread.start()
        row = _Row(list(prompt_ids), sampling, asyncio.get_running_loop(), asyncio.Queue(), adapter=adapter or BASE)
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
            if not done:  # the caller went away (client disconnect, cancelled request): stop computing for it
                row.cancelled.set()

    # ---- the compute thread -------------------------------------------------------------------------------

    def _admit(self, room: int, idle: bool) -> list[_Row]:
        """New rows for the batch: blocks while idle; under load, may wait `batch_wait_s` for company."""
        rows = []
        if idle:
            rows.append(self.incoming.get())
            if self.last_admitted > 1:  # a burst is likely: let it gather (a lone client would only wait)
                deadline = time.monotonic() + self.batch_wait_s
                while len(rows) < room and (left := deadline - time.monotonic()) > 0:
                    try:
                        rows.append(self.incoming.get(timeout=left))
                    except queue.Empty:
                        break
        while len(rows) < room:
            try:
                rows.append(self.incoming.get_nowait())
            except queue.Empty:
                break
        live = [r for r in rows if not r.cancelled.is_set()]
        self.stats["cancelled"] += len(rows) - len(live)
        if rows:
            self.last_admitted = len(live)
        return live

    def _serve_forever(self) -> None:
        batch: _Batch | None = None
        while True:
            fresh: list[_Row] = []
            try:
                fresh = self._admit(self.max_batch_size - (len(batch.rows) if batch else 0), idle=batch is None)
                with torch.no_grad():
                    if fresh:
                        batch = self._merge(batch, self._prefill(fresh))
                    if batch is not None:
                        batch = self._decode(batch)
            except Exception as e:  # noqa: BLE001 - every waiting request must hear of it, and the engine lives on
                for r in (batch.rows if batch else []) + fresh:
                    r.emit(e)
                batch = None
            self.stats["active"] = len(batch.rows) if batch else 0

    def _prefill(self, rows: list[_Row]) -> "_Batch | None":
        for r in rows:
            if r.sampling.seed is not None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.sampling.seed)
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = DynamicCache()
        logits = self._forward(ids, mask, cache, rows)
        return self._step(_Batch(rows, cache, mask, None), logits)

    def _decode(self, batch: "_Batch") -> "_Batch | None":
        mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=self.device)], 1)
        logits = self._forward(batch.tokens[:, None], mask, batch.cache, batch.rows)
        return self._step(_Batch(batch.rows, batch.cache, mask, None), logits)

    def _step(self, batch: "_Batch", logits: torch.Tensor) -> "_Batch | None":
        """Sample each row's next token, hand it to its client, drop the rows that are done."""
        tokens = self._sample(logits, batch.rows)
        wanted = any(r.sampling.logprobs is not None for r in batch.rows)
        lps = torch.log_softmax(logits, -1) if wanted else [None] * len(batch.rows)
        keep = [i for i, (r, t, lp) in enumerate(zip(batch.rows, tokens, lps)) if not self._advance(r, t, lp)]
        self._deliver()
        if not keep:
            return None
        if len(keep) < len(batch.rows):  # finished rows leave the batch and the cache
            batch.cache.batch_select_indices(torch.tensor(keep, device=self.device))
            batch = _Batch([batch.rows[i] for i in keep], batch.cache, batch.mask[keep], None)
            tokens = tokens[keep]
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
        return _Batch(batch.rows, batch.cache, batch.mask, tokens)

    def _deliver(self) -> None:
        """This step's events, handed to each event loop in one call rather than one wake-up per row."""
        by_loop: dict = {}
        for r, event in self._outbox:
            by_loop.setdefault(r.loop, []).append((r.events, event))
        self._outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(lambda items=items: [q.put_nowait(e) for q, e in items])

    def _merge(self, running: "_Batch | None", fresh: "_Batch | None") -> "_Batch | None":
        """One batch from two: caches and masks left-padded to the same length, then stacked."""
        if running is None or fresh is None:
            return running or fresh
        width = max(running.mask.shape[1], fresh.mask.shape[1])
        merged = DynamicCache()
        for layer, (a, b) in enumerate(zip(running.cache.layers, fresh.cache.layers)):
            keys = torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)])
            values = torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)])
            merged.update(keys, values, layer)
        mask = torch.cat([_left_pad(running.mask, width, 1), _left_pad(fresh.mask, width, 1)])
        return _Batch(running.rows + fresh.rows, merged, mask, torch.cat([running.tokens, fresh.tokens]))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache, rows: list[_Row]) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        kwargs = {"adapter_names": [r.adapter for r in rows]} if self.adapters else {}
        with self._model_lock:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                             use_cache=True, **kwargs)
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :].float()
    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        if all(r.sampling.temperature == 0 for r in rows):
            return logits.argmax(-1)  # all greedy: one op for the batch
        out = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for i, r in enumerate(rows):
            s = r.sampling
            if s.temperature == 0:
                out[i] = logits[i].argmax()
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p > s.top_p  # keep the smallest prefix reaching top_p
                sorted_p[drop] = 0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            out[i] = torch.multinomial(probs, 1, generator=r.generator)[0]
        return out

    def _advance(self, r: _Row, token: torch.Tensor, logprobs: torch.Tensor | None = None) -> bool:
        """Take one token into the row, send what text is final; True when the row is done. `logprobs`: the
        distribution it was drawn from (log_softmax of the logits), kept when the request asked for them."""
        if r.cancelled.is_set():
            self.stats["cancelled"] += 1
            return True
        token = int(token)
        self.stats["generated_tokens"] += 1
        if token in self.stops and not r.sampling.ignore_eos:
            return self._finish(r, "stop")
        r.generated.append(token)
        if r.sampling.logprobs is not None:
            r.logprobs.append(_token_logprob(logprobs, token, r.sampling.logprobs))
        piece = r.decoder.step(self.backend, token)  # incremental: None while a UTF-8 sequence is incomplete
        if piece:
            r.decoded += piece
        text = r.decoded
        for stop in r.sampling.stop:
            at = text.find(stop)
            if at != -1:
                self._send(r, text[:at])
                return self._finish(r, "stop", flush=False)
        if len(r.generated) >= r.sampling.max_tokens:
            return self._finish(r, "length")
        # Hold back a partial UTF-8 sequence, and a tail that could still become a stop string.
        safe = len(text.rstrip("\ufffd"))
        for stop in r.sampling.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        self._send(r, text[:safe])
        return False

    def _send(self, r: _Row, text: str) -> None:
        if len(text) > len(r.text):
            self._outbox.append((r, text[len(r.text):]))
            r.text = text

    def _finish(self, r: _Row, reason: str, flush: bool = True) -> bool:
        """End the row. `flush` sends any text held back (a possible stop-string start, a cut mid-character, which
        ends in U+FFFD as a full decode would); a matched stop string has already sent the text before it."""
        if flush:
            self._send(r, self.tokenizer.decode(r.generated, skip_special_tokens=True))
        logprobs = r.logprobs if r.sampling.logprobs is not None else None
        self._outbox.append((r, Finished(reason, len(r.generated), logprobs)))
        return True

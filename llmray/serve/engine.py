"""Batched generation for one model: concurrent requests share each forward pass.

Requests that arrive within `batch_wait_s` of each other (up to `max_batch_size`) are prefilled together
(left-padded) and decoded together with one KV cache. A row leaves the batch, and its slice of the cache is
dropped, the step it finishes: EOS, a stop string, `max_tokens`, or its client going away. Requests arriving
meanwhile wait for the next batch. Each request has its own sampling parameters and its own seeded generator,
so a seeded request gives the same text however it was batched (up to float rounding in the padded batch).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass
class Finished:
    reason: str  # "stop" or "length"
    completion_tokens: int


@dataclass
class _Row:
    prompt_ids: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    text: str = ""  # text already sent
    generator: torch.Generator | None = None

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, model_dir: str, max_batch_size: int = 16, batch_wait_s: float = 0.01,
                 device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        self.pending: asyncio.Queue | None = None
        self.stats = {"requests": 0, "cancelled": 0, "generated_tokens": 0, "forward_passes": 0, "active": 0,
                      "largest_batch": 0}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text).input_ids

    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        """The model's chat template, or a plain transcript ending in an open assistant turn when it has none."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages],
                                                      add_generation_prompt=True, tokenize=False)
        return "".join(f"{role}: {content}\n" for role, content in messages) + "assistant:"

    # ---- the asyncio side ---------------------------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], sampling: Sampling) -> AsyncIterator[str | Finished]:
        """Text deltas as they are generated, then a `Finished`. Closing the iterator early cancels the row."""
        if self.pending is None:
            self.pending = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._batcher())
        row = _Row(list(prompt_ids), sampling, asyncio.get_running_loop(), asyncio.Queue())
        self.stats["requests"] += 1
        await self.pending.put(row)
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

    async def _batcher(self) -> None:
        while True:
            batch = [await self.pending.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.pending.get(), timeout))
                except asyncio.TimeoutError:
                    break
            gone = [r for r in batch if r.cancelled.is_set()]
            self.stats["cancelled"] += len(gone)
            batch = [r for r in batch if not r.cancelled.is_set()]
            if batch:
                try:
                    await asyncio.to_thread(self._run, batch)
                except Exception as e:  # noqa: BLE001 - every waiting request must hear of it
                    for r in batch:
                        r.emit(e)

    # ---- the compute side (a worker thread) ---------------------------------------------------------------

    @torch.no_grad()
    def _run(self, rows: list[_Row]) -> None:
        self.stats["active"] = len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
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
        logits = self._forward(ids, mask, cache)
        while rows:
            tokens = self._sample(logits, rows)
            keep = [i for i, (r, t) in enumerate(zip(rows, tokens)) if not self._advance(r, t)]
            self.stats["active"] = len(keep)
            if not keep:
                break
            if len(keep) < len(rows):  # finished rows leave the batch and the cache
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                rows, mask, tokens = [rows[i] for i in keep], mask[keep], tokens[keep]
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
            logits = self._forward(tokens[:, None], mask, cache)
        self.stats["active"] = 0

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
        self.stats["forward_passes"] += 1
        return out.logits[:, -1, :].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
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

    def _advance(self, r: _Row, token: torch.Tensor) -> bool:
        """Take one token into the row, send what text is final; True when the row is done."""
        if r.cancelled.is_set():
            self.stats["cancelled"] += 1
            return True
        token = int(token)
        self.stats["generated_tokens"] += 1
        if token == self.eos and not r.sampling.ignore_eos:
            return self._finish(r, "stop")
        r.generated.append(token)
        text = self.tokenizer.decode(r.generated, skip_special_tokens=True)
        for stop in r.sampling.stop:
            at = text.find(stop)
            if at != -1:
                self._send(r, text[:at])
                return self._finish(r, "stop")
        if len(r.generated) >= r.sampling.max_tokens:
            self._send(r, text)
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
            r.emit(text[len(r.text):])
            r.text = text

    def _finish(self, r: _Row, reason: str) -> bool:
        r.emit(Finished(reason, len(r.generated)))
        return True

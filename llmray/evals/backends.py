"""What an eval asks of a model, from a model folder (transformers, batched) or an OpenAI-compatible URL: greedy
answers to prompts, the log-likelihood of a continuation after a context, and the negative log-likelihood of a
text. Chat prompts are a user message rendered with the model's chat template.

Image tasks give each prompt its image (bytes; the prompt holds IMAGE_PLACEHOLDER where it goes): a vision-language
folder's processor expands the image token into the image's tokens and prepares its pixels (`data/pixels.py`, as
in training); an endpoint is sent the image as a `data:` URI in an OpenAI `image_url` part."""

from __future__ import annotations

import numpy as np
import torch

from llmray import storage
from llmray.data import images
from llmray.data.vision import IMAGE_PLACEHOLDER
from llmray.errors import LlmrayError

BATCH = 8


class BackendError(LlmrayError):
    pass


class LocalModel:
    """A transformers model in this process: an exported folder's (`from_folder`), or a training engine's module.
    `synced`: several ranks generate together (ZeRO-3's forwards are collectives), as transformers' synced_gpus.
    `processor`: a vision-language model's (AutoProcessor), which image prompts go through."""

    def __init__(self, model, tokenizer, device: torch.device, synced: bool = False, processor=None):
        self.model, self.tokenizer, self.device, self.synced = model, tokenizer, device, synced
        self.processor = processor
        self.takes_images = processor is not None  # what `score.answer` checks a task against
        config = getattr(model, "config", None)
        text = config.get_text_config() if config is not None else None  # a VLM's language model's
        self.context = int(getattr(text, "max_position_embeddings", 2048) or 2048)

    @classmethod
    def from_folder(cls, folder: str, device: str | None = None) -> "LocalModel":
        """A model folder (local or s3://) or Hub id, on the GPU when there is one; a vision-language model with its
        processor."""
        from transformers import AutoTokenizer

        from llmray.data.pixels import load_processor
        from llmray.model.build import inference_device, is_vision_language, load_for_inference

        folder = storage.local_folder(folder, "the evaluated model")
        dev = inference_device(device)
        model = load_for_inference(folder, dev)
        if is_vision_language(model.config):
            processor = load_processor(folder)
            return cls(model, processor.tokenizer, dev, processor=processor)
        return cls(model, AutoTokenizer.from_pretrained(folder), dev)

    def _text(self, prompt: str, chat: bool) -> str:
        from llmray.data.pixels import with_image_token
        from llmray.data.template import render

        if not chat:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.processor is not None:  # IMAGE_PLACEHOLDER written as the processor's image token
            messages = with_image_token(self.processor, {"messages": messages})
        return render(self.tokenizer, messages, add_generation_prompt=True)

    def _encode(self, text: str, image: bytes | None, chat: bool) -> tuple[list[int], dict[str, np.ndarray] | None]:
        """(token ids of a text, its image's inputs or None): with an image, its token expanded by the processor
        (`pixels.expand`, as training's rows are made). `chat`: the text is a rendered chat, whose template wrote the
        special tokens it takes (a BOS), not added again."""
        if image is None:
            return self.tokenizer(text, add_special_tokens=not chat).input_ids, None
        from llmray.data.pixels import expand

        ids, inputs = expand(self.processor, text, [image])
        return ids.tolist(), inputs

    def _image_inputs(self, encoded: list[tuple[list[int], dict | None]], width: int) -> dict:
        """The forward's image inputs of rows with one image each (`_encode`'s), the rows left-padded to `width`
        (`pixels.left_padded_inputs`), as tensors on the model's device, pixels in its dtype."""
        from llmray.data.pixels import left_padded_inputs
        from llmray.model.build import PIXELS_PER_ROW, image_tensors

        per_row = getattr(self.model.config, "model_type", None) in PIXELS_PER_ROW
        inputs = left_padded_inputs([(len(ids), held) for ids, held in encoded], width, per_row)
        return image_tensors(inputs, self.device, next(self.model.parameters()).dtype)

    @torch.no_grad()  # not inference_mode: ZeRO-3 keeps tensors it gathers here for the training step
    def generate(self, prompts: list[str], chat: bool, max_new_tokens: int,
                 pictures: list[bytes] | None = None) -> list[str]:
        from llmray.data.template import stop_token_ids

        stops, out = stop_token_ids(self.tokenizer), []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else stops[0]
        pictures = pictures or [None] * len(prompts)
        for start in range(0, len(prompts), BATCH):
            encoded = [self._encode(self._text(p, chat), image, chat)
                       for p, image in zip(prompts[start:start + BATCH], pictures[start:start + BATCH])]
            width = max(len(ids) for ids, _ in encoded)
            ids = torch.tensor([[pad] * (width - len(e)) + e for e, _ in encoded], device=self.device)
            mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e, _ in encoded], device=self.device)
            generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                            do_sample=False, eos_token_id=stops, pad_token_id=pad,
                                            synced_gpus=self.synced, **self._image_inputs(encoded, width))
            out += [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in generated]
        return out

    @torch.no_grad()  # not inference_mode: ZeRO-3 keeps tensors it gathers here for the training step
    def loglikelihoods(self, pairs: list[tuple[str, str]], chat: bool,
                       pictures: list[bytes] | None = None) -> list[float]:
        """log P(continuation | context), summed over the continuation's tokens (lm-eval's split: the context's
        tokens, then what tokenizing the whole adds). With an image, the context holds it, expanded."""
        out, encoded = [], None  # (context, image, its tokens): a prompt's labels come together, its context once
        for (context, continuation), image in zip(pairs, pictures or [None] * len(pairs)):
            context = self._text(context, chat)
            if encoded is None or encoded[:2] != (context, image):
                encoded = (context, image, self._encode(context, image, chat)[0])
            ctx = encoded[2]
            whole, inputs = self._encode(context + continuation, image, chat)
            cut = max(0, len(whole) - self.context)  # a context too long loses its beginning
            if cut and image is not None:
                raise BackendError(f"a prompt of {len(whole)} tokens with its image expanded is over the model's "
                                   f"context of {self.context}: its image cannot be cut")
            ids, first = whole[cut:], max(1, len(ctx) - cut)
            logits = self.model(input_ids=torch.tensor([ids], device=self.device),
                                **self._image_inputs([(ids, inputs)], len(ids))).logits
            lp = torch.log_softmax(logits[0].float(), -1)
            out.append(sum(lp[i - 1, ids[i]].item() for i in range(first, len(ids))))
        return out

    @torch.no_grad()  # not inference_mode: ZeRO-3 keeps tensors it gathers here for the training step
    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        """(summed negative log-likelihood, tokens predicted) of each text, in windows of the model's context that
        overlap by one token, so every token after the first is predicted once."""
        from llmray.evals.perplexity import summed_nll

        out = []
        for text in texts:
            ids = self.tokenizer(text).input_ids
            total, count = 0.0, 0
            for start in range(0, max(len(ids) - 1, 1), self.context - 1):
                window = ids[start:start + self.context]
                if len(window) < 2:
                    break
                nll, n = summed_nll(self.model, {"input_ids": torch.tensor([window], device=self.device)})
                total += nll
                count += n
            out.append((total, count))
        return out


class Endpoint:
    """An OpenAI-compatible server: /v1/completions (log-likelihoods through echo + logprobs, as lm-eval asks)
    and /v1/chat/completions for chat prompts, an image sent as a `data:` URI in an `image_url` part."""

    takes_images = None  # unknown here: the server answers an image it cannot take with an error

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        import httpx

        self.base = url.rstrip("/").removesuffix("/completions").removesuffix("/chat")
        self.base = self.base if self.base.endswith("/v1") else self.base + "/v1"
        self.http = httpx.Client(timeout=300, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        if model is None:
            listed = self._call("GET", "/models")["data"]
            if not listed:
                raise BackendError(f"{self.base}/models lists no model")
            model = listed[0]["id"]
        self.model = model

    def _call(self, method: str, route: str, body: dict | None = None) -> dict:
        import httpx

        try:
            r = self.http.request(method, self.base + route, json=body)
        except httpx.HTTPError as e:
            raise BackendError(f"{self.base}{route}: {e}") from None
        if r.status_code != 200:
            raise BackendError(f"{self.base}{route} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def generate(self, prompts: list[str], chat: bool, max_new_tokens: int,
                 pictures: list[bytes] | None = None) -> list[str]:
        out = []
        for prompt, image in zip(prompts, pictures or [None] * len(prompts)):
            if chat:
                r = self._call("POST", "/chat/completions", {
                    "model": self.model, "messages": [{"role": "user", "content": user_content(prompt, image)}],
                    "max_tokens": max_new_tokens, "temperature": 0})
                out.append(r["choices"][0]["message"]["content"] or "")
            else:
                r = self._call("POST", "/completions", {"model": self.model, "prompt": prompt,
                                                         "max_tokens": max_new_tokens, "temperature": 0})
                out.append(r["choices"][0]["text"])
        return out

    def _scored(self, text: str) -> dict:
        r = self._call("POST", "/completions", {"model": self.model, "prompt": text, "max_tokens": 1, "echo": True,
                                                "logprobs": 0, "temperature": 0})
        logprobs = r["choices"][0].get("logprobs")
        if not logprobs or logprobs.get("token_logprobs") is None:
            raise BackendError(f"{self.base}/completions returned no logprobs: log-likelihood tasks (choice, "
                               "perplexity) need an endpoint that returns them with echo (OpenAI's legacy API, vLLM, "
                               "llmray serve)")
        return logprobs

    def loglikelihoods(self, pairs: list[tuple[str, str]], chat: bool,
                       pictures: list[bytes] | None = None) -> list[float]:
        if pictures:
            raise BackendError("a choice task with images needs a model folder: OpenAI's chat API does not score a "
                               "given answer (no echo of the prompt's logprobs), and /v1/completions takes no image")
        if chat:
            raise BackendError("a choice task with chat: true needs a model folder: an endpoint does not say how "
                               "it renders a chat into the text it scores")
        out = []
        for context, continuation in pairs:
            lp = self._scored(context + continuation)
            end = len(context + continuation)  # the one generated token lies beyond
            out.append(sum(v for v, at in zip(lp["token_logprobs"], lp["text_offset"])
                           if v is not None and len(context) <= at < end))
        return out

    def nll(self, texts: list[str]) -> list[tuple[float, int]]:
        out = []
        for text in texts:
            lp = self._scored(text)
            values = [v for v, at in zip(lp["token_logprobs"], lp["text_offset"]) if v is not None and at < len(text)]
            out.append((-sum(values), len(values)))
        return out


def user_content(prompt: str, image: bytes | None) -> str | list[dict]:
    """A user message's OpenAI content: the prompt, or with an image its text and `image_url` parts in order, the
    image where the prompt's IMAGE_PLACEHOLDER is."""
    if image is None:
        return prompt
    before, _, after = prompt.partition(IMAGE_PLACEHOLDER)
    parts = [{"type": "text", "text": before}] if before else []
    parts.append({"type": "image_url", "image_url": {"url": images.data_uri(image)}})
    return parts + ([{"type": "text", "text": after}] if after else [])


def backend_for(target: str, model: str | None = None, api_key: str | None = None):
    if target.startswith(("http://", "https://")):
        return Endpoint(target, model, api_key)
    return LocalModel.from_folder(target)

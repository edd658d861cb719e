"""The OpenAI request shapes llmray accepts, with their ranges, and the OpenAI error shape."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmray.data.vision import IMAGE_PLACEHOLDER

MAX_STOPS = 4
MAX_LOGPROBS = 20  # most-likely tokens a request may ask for at each place (vLLM's default cap)


class _Sampling(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send options (logprobs, user, ...) a server may not use.
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the usage counts
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks, load tests)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop takes at most {MAX_STOPS} non-empty strings")
        return stops

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt scored, nothing generated
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # per token: its log-probability and the top k
    echo: bool = False  # the prompt comes back before the completion (with its tokens' logprobs, if asked)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")

    url: str  # a data: URI; a path or s3:// URI under the app's allowed_image_paths
    detail: str | None = None  # OpenAI's "low" / "high" / "auto": the model's processor decides the resolution here


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    @property
    def text(self) -> str:
        """The message's text, IMAGE_PLACEHOLDER where each image part goes."""
        if isinstance(self.content, list):
            return "".join(p.text if isinstance(p, TextPart) else IMAGE_PLACEHOLDER for p in self.content)
        return self.content or ""

    def texts(self, i: int) -> list[tuple[str, str]]:
        """(where, text) of each of its texts, where as `messages[i].content[j].text`; `i`: its index."""
        if isinstance(self.content, list):
            return [(f"messages[{i}].content[{j}].text", p.text) for j, p in enumerate(self.content)
                    if isinstance(p, TextPart)]
        return [(f"messages[{i}].content", self.content or "")]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # needs logprobs: true

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def image_urls(self) -> list[tuple[str, str]]:
        """(where, url) of each image part in order, where as `messages[i].content[j].image_url`."""
        return [(f"messages[{i}].content[{j}].image_url", p.image_url.url) for i, m in enumerate(self.messages)
                if isinstance(m.content, list) for j, p in enumerate(m.content) if isinstance(p, ImagePart)]


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
          code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type_, param, code), headers=headers)


def overloaded(message: str, retry_after_s: int) -> JSONResponse:
    """429: more requests than this replica queues; the client may retry after `retry_after_s` (as OpenAI's
    rate limits answer, which its clients retry with back-off)."""
    return error(429, message, "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)})


def timed_out(timeout_s: float) -> dict:
    """A request that ran past `request_timeout_s`: the body of a 408, or of a stream's error event."""
    return error_body(f"the request did not finish within request_timeout_s ({timeout_s:g} s); what it generated "
                      "was discarded", "timeout_error", code="request_timeout")

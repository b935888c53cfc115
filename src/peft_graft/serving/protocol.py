"""The OpenAI request bodies the server accepts (the fields it honours; others are ignored, as OpenAI's own server
ignores what it does not know), and OpenAI's error shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GenerationParameterError
from .engine import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # not OpenAI's: vLLM's extension, with its meaning
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: Any = None
    ignore_eos: bool = False  # vLLM's extension, with its meaning

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.n != 1:
            raise GenerationParameterError("only n=1 is supported: send one request per completion", field="n")
        if self.logprobs not in (None, False, 0):
            raise GenerationParameterError("logprobs are not supported", field="logprobs")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.requested_max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise GenerationParameterError("only text content parts are supported", field="messages")
                parts.append(part["text"])
            return "".join(parts)
        return self.content or ""


class _ChatPrompt(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)

    def prompt_text(self, tokenizer) -> str:
        """The text the messages make through the chat template (what the model reads, and what the router
        embeds)."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise GenerationParameterError(
                "this model's tokenizer has no chat template: use /v1/completions", field="messages"
            )
        messages = [m.model_dump() | {"content": m.text()} for m in self.messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _CompletionPrompt(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str | list[str]

    def prompt_text(self, tokenizer=None) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise GenerationParameterError("send one prompt per request", field="prompt")
            return self.prompt[0]
        return self.prompt


class ChatCompletionRequest(_Request, _ChatPrompt):
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.tools:
            raise GenerationParameterError("tools are not supported", field="tools")
        return super().sampling(default_max_tokens)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # OpenAI's newer name wins


class CompletionRequest(_Request, _CompletionPrompt):
    echo: bool = False
    suffix: str | None = None

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        if self.echo or self.suffix:
            raise GenerationParameterError("echo and suffix are not supported", field="echo" if self.echo else "suffix")
        return super().sampling(default_max_tokens)


def prompt_text(tokenizer, body: dict[str, Any], chat: bool) -> str:
    """The prompt of a raw request body, its messages or prompt checked as the server checks them (the gateway
    passes the rest of the body on to its engine, whose own extensions and ranges may differ from ours)."""
    field = "messages" if chat else "prompt"
    try:
        part = (_ChatPrompt if chat else _CompletionPrompt).model_validate({field: body.get(field)})
    except ValidationError as error:
        problem = error.errors()[0]
        raise GenerationParameterError(f"{field}: {problem['msg']}", field=field) from None
    return part.prompt_text(tokenizer)


def error_body(message: str, kind: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, which its clients turn into typed exceptions."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}

"""Request bodies of the OpenAI-compatible API, as pydantic models (FastAPI validates them and
publishes them in its OpenAPI schema). Every malformed field is a 400 naming the field.

Only what the server acts on is accepted: an unknown field is refused rather than silently ignored
(a client that sends ``logprobs`` or ``n: 3`` learns at once that it gets none).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)   # no "0.5" or true for numbers


class CmcOptions(_Strict):
    """How a request steers the loaded deltas (``GET /v1/models`` lists them). Give at most one form;
    the operator's policy decides what is allowed (an enforced filter cannot be lowered: 403)."""

    deltas: dict[str, float] | None = Field(None, max_length=64,
                                            description='alpha by delta name, e.g. {"json": 1.0}; others keep '
                                                        "the server's alpha; 0 switches an optional delta off")
    alphas: list[float] | None = Field(None, max_length=64, description="one alpha per loaded delta, in order")
    alpha: float | None = Field(None, description="the same alpha for every loaded delta")


class _Sampling(_Strict):
    model: str | None = Field(None, max_length=256, description="ignored: the server runs one model")
    max_tokens: int | None = Field(None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 20)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=1000, description="llama.cpp extension (default 40 without top_p)")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="llama.cpp extension (default 0.05 without top_p)")
    repeat_penalty: float | None = Field(None, ge=0.0, le=4.0, description="llama.cpp extension")
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = Field(
        None, description="up to 4 non-empty stop strings")
    stream: bool = False
    n: Literal[1] = Field(1, description="one choice per request")
    user: str | None = Field(None, max_length=256, description="ignored")
    cmc: CmcOptions | None = None

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1, description="the text to continue (its special tokens are plain text "
                                                  "unless the server allows raw prompts)")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)

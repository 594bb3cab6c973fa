"""What goes over the wire: request bodies, the limits on them, and errors in OpenAI's shape.

Request bodies are validated into the pydantic models here; anything wrong is a 4xx in OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, naming the parameter. Defaults are OpenAI's (temperature 1,
top_p 1); `top_k`, `min_p` and `repetition_penalty` are extensions, off unless given. The arena's three small
bodies are at the end.
"""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # as OpenAI
MAX_N = 8
MAX_TOP_LOGPROBS = 20


@dataclass
class ServerLimits:
    max_tokens: int = 4096  # the most any request may ask for
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 200_000

    def check_prompt_chars(self, param: str, chars: int) -> None:
        """413 when `param` (the prompt, the messages together) is over the character limit."""
        if chars > self.max_prompt_chars:
            raise APIError(413, f"the {param} must be at most {self.max_prompt_chars} characters", param=param)


# -- errors --------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """A request the server refuses, or cannot answer: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def explain_validation(errors: list[dict]) -> tuple[str, str | None]:
    """One line for pydantic's first complaint, and the parameter it is about."""
    first = errors[0]
    # pydantic puts the union branch it tried into the path ("prompt.str", "stop.list[str]"): not a parameter
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_type_tag(p)]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON", None
    if not loc:
        return "the body must be a JSON object", None
    if first.get("type") == "missing":
        return f"missing required parameter {param}", param
    return f"invalid {param}: {first.get('msg', 'invalid value')}", param


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


# -- OpenAI's request bodies ---------------------------------------------------------------------------------------

Float = Annotated[float, Field(allow_inf_nan=False)]


# OpenAI request fields that camelid does not implement: refused by name (400) rather than silently ignored. A
# value that asks for nothing (null, an empty list or object, tool_choice "none" or "auto", response_format
# {"type": "text"}, modalities ["text"], best_of 1, suffix "") is accepted.
ASKS_NOTHING = {"tool_choice": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
                "best_of": (1,), "suffix": ("",)}
CHAT_UNIMPLEMENTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "functions": "function calling",
    "function_call": "function calling", "response_format": "structured outputs (JSON mode and JSON schemas)",
    "logit_bias": "logit_bias", "audio": "audio output", "modalities": "output other than text",
    "prediction": "predicted outputs", "web_search_options": "web search", "reasoning_effort": "reasoning effort",
}
COMPLETION_UNIMPLEMENTED = {"suffix": "suffix (insertion)", "best_of": "best_of", "logit_bias": "logit_bias"}


def refuse_unimplemented(data, unimplemented: dict) -> None:
    """A 400 naming the first field of `unimplemented` that `data` (a request body) asks something of."""
    if not isinstance(data, dict):
        return
    for name, what in unimplemented.items():
        value = data.get(name)
        if value is None or value in ([], {}) or value in ASKS_NOTHING.get(name, ()):
            continue
        raise APIError(400, f"{name} is not supported by this server ({what}); leave it out", param=name,
                       code="unsupported_parameter")


class SamplingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI-compatible servers do, except the
    OpenAI fields that camelid does not implement (UNIMPLEMENTED): those are refused by name."""

    model_config = ConfigDict(extra="ignore", strict=False)
    UNIMPLEMENTED: ClassVar[dict] = {}

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: Float = Field(1.0, ge=0, le=2)
    top_p: Float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1 disables
    min_p: Float = Field(0.0, ge=0, le=1)  # extension
    repetition_penalty: Float = Field(1.0, gt=0, le=10)  # extension
    ignore_eos: bool = False  # extension (benchmarks)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """OpenAI's optional parameters may be sent as null (the openai client does): null means the default."""
        refuse_unimplemented(data, cls.UNIMPLEMENTED)
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in ("model", "messages", "prompt")}
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


NOT_TEXT_PARTS = ("image_url", "input_audio", "file", "image", "audio", "input_image", "input_file")


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        parts = data.get("content") if isinstance(data, dict) else None
        kinds = [p.get("type") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
        if other := next((k for k in kinds if k in NOT_TEXT_PARTS), None):
            raise ValueError(f"this model reads text only (a {other} part); send the content as text")
        return data

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(SamplingFields):
    UNIMPLEMENTED: ClassVar[dict] = CHAT_UNIMPLEMENTED
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream_options: StreamOptions | None = None


class CompletionRequest(SamplingFields):
    UNIMPLEMENTED: ClassVar[dict] = COMPLETION_UNIMPLEMENTED
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's completions default
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream_options: StreamOptions | None = None


# -- the arena's request bodies ------------------------------------------------------------------------------------


class BattleRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    battle: str
    side: Literal["a", "b"]


class VoteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    battle: str
    winner: Literal["model_a", "model_b", "tie", "tie (bothbad)"]

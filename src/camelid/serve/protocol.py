"""What goes over the wire: request bodies, the limits on them, and errors in OpenAI's shape.

Request bodies are validated into the pydantic models here; anything wrong is a 4xx in OpenAI's error shape,
`{"error": {"message", "type", "param", "code"}}`, naming the parameter. Defaults are OpenAI's (temperature 1,
top_p 1); `top_k`, `min_p` and `repetition_penalty` are extensions, off unless given. The arena's three small
bodies are at the end.
"""

import json
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # as OpenAI
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128  # as OpenAI
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_LOGIT_BIAS = 1024  # tokens one request may bias


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
# value that asks for nothing (null, an empty list or object, modalities ["text"], best_of 1, suffix "") is
# accepted.
ASKS_NOTHING = {"modalities": (["text"],), "best_of": (1,), "suffix": ("",)}
CHAT_UNIMPLEMENTED = {
    "functions": "the deprecated function calling: send tools", "function_call": "the deprecated function calling: "
    "send tools and tool_choice", "audio": "audio output", "modalities": "output other than text",
    "prediction": "predicted outputs", "web_search_options": "web search", "reasoning_effort": "reasoning effort",
}
COMPLETION_UNIMPLEMENTED = {"suffix": "suffix (insertion)", "best_of": "best_of"}


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
    logit_bias: dict[str, Float] | None = None  # token id (as a string, JSON's keys) -> bias in [-100, 100]

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

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, value):
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
        for key, bias in value.items():
            if not key.strip().isdigit():
                raise ValueError(f"keys are token ids (as strings, e.g. \"1234\"), not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in [-100, 100]; token {key} has {bias}")
        return {int(k): float(v) for k, v in value.items()}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


NOT_TEXT_PARTS = ("image_url", "input_audio", "file", "image", "audio", "input_image", "input_file")


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # as OpenAI


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant message made (sent back with the conversation)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction

    @field_validator("function")
    @classmethod
    def _arguments_are_json(cls, value: CalledFunction):
        try:
            json.loads(value.arguments)
        except ValueError:
            raise ValueError(f"the arguments of {value.name} are not JSON: {value.arguments[:60]!r}") from None
        return value


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = Field(None, min_length=1, max_length=256)  # tool: the call this answers
    name: str | None = None

    @model_validator(mode="after")
    def _tool_fields_where_they_belong(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message has tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("only a tool message has a tool_call_id")
        return self

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data):
        parts = data.get("content") if isinstance(data, dict) else None
        kinds = [p.get("type") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
        if other := next((k for k in kinds if k in NOT_TEXT_PARTS), None):
            raise ValueError(f"this model reads text only (a {other} part); send the content as text")
        return data

    def as_dict(self) -> dict:
        """The message as a chat template reads it (`developer` is the system prompt of older templates); tool
        calls carry their arguments as objects, as the templates of tool-calling models expect (and vLLM gives)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": json.loads(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # as OpenAI
    description: str | None = None
    schema_: dict | bool = Field(True, alias="schema")  # none given: any JSON
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given with type json_schema, and only then")
        return self


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
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True


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

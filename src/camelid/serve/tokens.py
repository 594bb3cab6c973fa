"""`/tokenize`, `/detokenize` and `/tokenizer_info`: a served model's tokenizer over HTTP.

The shapes are those clients already send: vLLM's (`prompt`, `add_special_tokens`; `tokens` back, with `count` and
`max_model_len`), which lm-evaluation-harness's remote tokenizer uses, and llama.cpp's server's (`content`,
`add_special`; `content` back from /detokenize). A chat can be tokenized too (`messages`: the prompt that
/v1/chat/completions would run, the model's template with its generation prompt). Without `model`, the first model
served answers (lm-eval's remote tokenizer names none).
"""

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from camelid.serve.http import read_body
from camelid.serve.protocol import APIError, Message
from camelid.serve.served_model import ServedModel
from camelid.serve.tools import with_tools

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None  # vLLM
    content: str | None = None  # llama.cpp
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # vLLM: True by default
    add_special: bool | None = None  # llama.cpp: False by default
    with_pieces: bool = False  # llama.cpp: each token's text beside its id

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("prompt", "content", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, content or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(request: Request):
    body = await read_body(request, TokenizeRequest, request.app.state.limits)
    served = _model(request, body.model)
    if body.messages is not None:
        messages, _ = with_tools([m.as_dict() for m in body.messages], None, served.template)  # tool turns as text
        request.app.state.limits.check_prompt_chars("messages", sum(len(m["content"]) for m in messages))
        tokens = await served.chat_prompt(messages, "messages")
    else:
        text = body.prompt if body.prompt is not None else body.content
        request.app.state.limits.check_prompt_chars("prompt", len(text))
        special = body.add_special if body.content is not None else body.add_special_tokens
        add_special = special if special is not None else body.prompt is not None
        tokens = served.loaded.tokenizer.encode(text, add_special=add_special)
    answer = {"tokens": tokens, "count": len(tokens), "max_model_len": served.engine.context}
    if body.with_pieces:
        answer["tokens"] = [{"id": t, "piece": served.loaded.tokenizer.decode([t])} for t in tokens]
    return answer


@router.post("/detokenize")
async def detokenize(request: Request):
    body = await read_body(request, DetokenizeRequest, request.app.state.limits)
    served = _model(request, body.model)
    vocab = served.loaded.config.vocab_size
    if any(t < 0 or t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    text = served.loaded.tokenizer.decode(body.tokens)
    return {"prompt": text, "content": text}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request, model: str | None = None):
    served = _model(request, model)
    tokenizer = served.loaded.tokenizer
    template = served.template.source if served.template is not None else None
    return {"model": served.name, "tokenizer_class": "camelid", "vocab_size": served.loaded.config.vocab_size,
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
            "add_bos_token": tokenizer.add_bos, "chat_template": template, "max_model_len": served.engine.context}


def _model(request: Request, name: str | None) -> ServedModel:
    models: dict[str, ServedModel] = request.app.state.models
    if name is None:  # the first model served (lm-eval's remote tokenizer names none)
        return next(iter(models.values()))
    if name not in models:
        raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists the models",
                       param="model", code="model_not_found", type="not_found_error")
    return models[name]

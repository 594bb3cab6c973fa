"""A model the server answers for, and the two things every route asks of it: a chat as a prompt, and a job."""

import asyncio
from dataclasses import dataclass, replace
from typing import Any

from camelid.checkpoint import LoadedModel
from camelid.errors import CamelidError
from camelid.jobs import Engine, GenerationParams, Job, QueueFull
from camelid.serve.protocol import APIError


@dataclass
class ServedModel:
    """A model the server answers for under `name`: its weights, tokenizer, chat template and engine.

    `adapter` picks one of the LoRA adapters that the engine's model carries (camelid.adapters): an adapter is
    served as a model of its own that shares its base's engine, and so its weights, cache rows and decode steps.
    """

    name: str
    loaded: LoadedModel
    engine: Engine
    template: Any  # a camelid.chat_template.ChatTemplate, or None when the model has none
    created: int
    adapter: int = 0  # 0: the base

    async def chat_prompt(self, messages: list[dict], param: str, **variables) -> list[int]:
        """`messages` rendered with the model's template (and its further `variables`: tools) as token ids; 400
        about `param` if that cannot be done or the prompt leaves no room to answer in the context.

        Rendering and tokenizing run off the event loop: a template that renders slowly, up to its limit
        (camelid.template_worker), holds up its own request only.
        """
        return await asyncio.to_thread(self._chat_prompt, messages, param, variables)

    def _chat_prompt(self, messages: list[dict], param: str, variables: dict) -> list[int]:
        if self.template is None:
            raise APIError(400, f"model {self.name!r} has no chat template; use /v1/completions", param="model")
        try:
            text = self.template.render(messages, add_generation_prompt=True, **variables)
        except CamelidError as exc:
            raise APIError(400, f"the chat template refused the {param}: {exc}", param=param) from None
        if len(text) > self.engine.context * self.loaded.tokenizer.longest_token_chars:  # cannot fit: not tokenized
            raise APIError(400, f"the prompt is {len(text):,} characters, more than the context of "
                           f"{self.engine.context} tokens can hold; shorten it", param=param,
                           code="context_length_exceeded")
        ids = self.loaded.tokenizer.encode(text, add_special=False)
        if len(ids) >= self.engine.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens but the context is {self.engine.context}; "
                           "shorten it", param=param, code="context_length_exceeded")
        return ids

    def submit(self, prompt: list[int], params: GenerationParams, param: str | None = None) -> Job:
        """Queue a request on the engine; a full line is 503, a request it refuses 400 (about `param`)."""
        try:
            return self.engine.submit(prompt, replace(params, adapter=self.adapter))
        except QueueFull as exc:
            raise APIError(503, str(exc), type="server_overloaded", code="queue_full") from None
        except CamelidError as exc:
            raise APIError(400, str(exc), param=param) from None

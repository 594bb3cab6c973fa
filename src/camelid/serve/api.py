"""The app: the OpenAI-compatible API and the pages over the served models, behind the key and size guard.

`create_app` only composes: the state the routes read (`request.app.state`), the routers of `openai.py`,
`tokens.py` and `arena.py`, the error handlers of `http.py`, and the guard around it all.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from camelid.serve import arena, openai, tokens
from camelid.serve.http import EXCEPTION_HANDLERS, Guard, Metrics
from camelid.serve.protocol import ServerLimits
from camelid.serve.served_model import ServedModel


def create_app(models: list[ServedModel], *, api_key: str | None = None, limits: ServerLimits | None = None,
               votes: str | Path | None = None) -> FastAPI:
    """The FastAPI app serving `models`; arena votes are appended to `votes` (see `arena.Arena`).

    `api_key`, when given, guards `/v1` and the arena's API; the pages themselves are public.
    """
    limits = limits or ServerLimits()
    app = FastAPI(title="camelid", docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers=EXCEPTION_HANDLERS)
    app.state.models = {m.name: m for m in models}
    app.state.limits = limits
    app.state.metrics = Metrics()
    app.state.arena = arena.Arena(models, votes)
    app.add_middleware(Guard, api_key=api_key, limits=limits, metrics=app.state.metrics)
    app.include_router(openai.router)
    app.include_router(tokens.router)
    app.include_router(arena.router)
    app.mount("/static", StaticFiles(directory=arena.STATIC), name="static")
    return app

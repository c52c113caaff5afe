"""The FastAPI app: OpenAI-compatible endpoints over an ``AsyncEngine``.

>>> app = create_app(AsyncEngine.from_pretrained("default"), "default", api_key=None)
>>> uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from tunelab import __version__
from tunelab.serve.admission import Admission
from tunelab.serve.errors import APIError, install_handlers
from tunelab.serve.metrics import ServerMetrics
from tunelab.serve.openai_api import create_chat_completion, create_completion
from tunelab.serve.params import chat_prompt
from tunelab.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    message_dicts,
)

DEFAULT_MAX_QUEUE = 256


@dataclass
class ServerState:
    engine: Any  # AsyncEngine
    served_model_name: str
    api_key: str | None
    admission: Admission
    metrics: ServerMetrics

    def adapter_names(self) -> list[str]:
        """The LoRA adapters loaded in the engine (each served as a model of its own)."""
        return list(self.engine.engine.adapters)

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's ``model`` selects: None for the base model."""
        if name is None or name == self.served_model_name:
            return None
        adapters = self.adapter_names()
        if name in adapters:
            return name
        served = ", ".join(f"'{n}'" for n in [self.served_model_name, *adapters])
        raise APIError(
            404,
            f"the model '{name}' does not exist on this server; it serves {served} "
            "(see GET /v1/models).",
            "model",
            "model_not_found",
        )


def create_app(
    engine: Any,
    served_model_name: str,
    api_key: str | None = None,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """An app serving ``engine`` (an ``AsyncEngine``) as ``served_model_name``.

    Every LoRA adapter loaded in the engine is served too, under its own name (a request's
    ``model`` picks it); requests for the base and for adapters share the engine's steps.

    ``api_key``: required as ``Authorization: Bearer KEY`` on /v1/*, /tokenize and
    /detokenize (health, version and metrics stay open for probes and scrapers).
    ``max_queue``: requests that may wait for a free engine slot before new ones get 429.
    """
    llm = engine.engine
    metrics = ServerMetrics(engine)
    reject = metrics.request_rejected.inc
    admission = Admission(llm.config.max_num_seqs, max_queue, on_reject=reject)
    metrics.admission = admission
    state = ServerState(engine, served_model_name, api_key, admission, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)  # aborts whatever is still running

    app = FastAPI(title="tunelab", version=__version__, lifespan=lifespan)
    app.state.tunelab = state
    install_handlers(app)

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # bytes: compare_digest refuses non-ASCII str (headers arrive decoded as latin-1)
        given = token.strip().encode("latin-1", "replace")  # the header's own bytes
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>' with the key "
                "the server was started with (--api-key).",
                code="invalid_api_key",
            )

    protected = [Depends(auth)]

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=protected)
    async def models() -> ModelList:
        cards = [ModelCard(id=served_model_name, root=served_model_name, max_model_len=llm.context)]
        for adapter in llm.adapters.values():  # as vLLM: root is the adapter's path
            cards.append(
                ModelCard(
                    id=adapter.name,
                    root=adapter.path,
                    parent=served_model_name,
                    max_model_len=llm.context,
                )
            )
        return ModelList(data=cards)

    @app.post("/v1/completions", dependencies=protected)
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(state, req, request, state.check_model(req.model))

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        lora = state.check_model(req.model)
        return await create_chat_completion(state, req, request, lora)

    @app.post("/tokenize", dependencies=protected)
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        lora = state.check_model(req.model)
        if llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer.")
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'.", "prompt")
        if req.messages is not None:
            messages = message_dicts(req.messages)
            ids = chat_prompt(llm, messages, req.add_generation_prompt, lora)
        else:
            ids = llm.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        return {"tokens": list(ids), "count": len(ids), "max_model_len": llm.context}

    @app.post("/detokenize", dependencies=protected)
    async def detokenize(req: DetokenizeRequest) -> dict[str, str]:
        state.check_model(req.model)
        vocab = llm.model.config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1}).")
        if llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer.")
        return {"prompt": llm.tokenizer.decode(req.tokens)}

    return app

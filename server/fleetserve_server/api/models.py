"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

from fastapi import APIRouter, Request

from fleetserve_server.api.context import get_context
from fleetserve_server.api.generation import require_serving
from fleetserve_server.api.protocol import ModelCard, ModelList
from fleetserve_server.api.sse import ERROR_RESPONSES

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses={k: ERROR_RESPONSES[k] for k in (401, 503)})
async def list_models(request: Request) -> ModelList:
    serving = require_serving(get_context(request).state)
    model = serving.model
    return ModelList(data=[ModelCard(id=model.served_name, created=model.created,
                                     max_model_len=model.max_model_len, root=model.source or None)])

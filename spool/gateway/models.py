"""/v1/models: the models behind the gateway, from live workers' heartbeats (or --served-model-name)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from spool.gateway.core import Gateway, gateway_of
from spool.gateway.errors import ApiError

router = APIRouter()


def model_objects(gw: Gateway) -> list[dict]:
    """OpenAI model objects; `root` is the model a live worker reports (its path), as vLLM's server shows it."""
    live = gw.deployment.models()
    if gw.settings.served_model_names:
        root = live[0] if live else None
        names = [(name, root) for name in gw.settings.served_model_names]
    else:
        names = [(model, model) for model in live]
    return [{"id": name, "object": "model", "created": gw.started, "owned_by": "spool", "root": root}
            for name, root in names]


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    """Every model a request may name."""
    return {"object": "list", "data": model_objects(gateway_of(request))}


@router.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict:
    """One model object; 404 for a model nobody serves."""
    for obj in model_objects(gateway_of(request)):
        if obj["id"] == model:
            return obj
    raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")

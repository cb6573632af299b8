"""The app factory: routes, auth on /v1, OpenAI-shaped errors, metrics, and the lifespan that owns connections."""
from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.concurrency import run_in_threadpool

from spool.gateway import batches, completions, errors, files, health, models
from spool.gateway.auth import KeyChecker
from spool.gateway.batch_runs import BatchManager
from spool.gateway.core import Gateway, now
from spool.gateway.deployment import Deployment
from spool.gateway.enqueuer import Enqueuer
from spool.gateway.filestore import FileStore
from spool.gateway.metrics import Metrics, MetricsMiddleware
from spool.gateway.settings import ENV_SETTINGS, GatewaySettings
from spool.producer import AsyncClient
from spool.protocol.connection import connect_async

log = logging.getLogger("spool.gateway")


def create_app(settings: GatewaySettings) -> FastAPI:
    """A FastAPI app serving the OpenAI API from the deployment `settings.redis_url` names."""
    metrics, auth = Metrics(), KeyChecker(settings.api_keys)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        redis = connect_async(settings.redis_url, max_connections=settings.max_redis_connections)
        # Shared reads: the requests waiting at once share one blocking XREAD (spool/producer/reads.py).
        client = AsyncClient(settings.redis_url, prefix=settings.prefix, connection=redis, durable=settings.durable,
                             shared_reads=True)
        deployment = Deployment(redis, client.keys, settings.poll_s)
        store = FileStore(settings.files_path())
        manager = BatchManager(settings, store, metrics)
        enqueuer = Enqueuer(redis, client.keys, client.ctx.defaults, durable=settings.durable)
        app.state.gateway = Gateway(settings, client, deployment, metrics, store, manager, now(), enqueuer)
        if auth.open:
            log.warning("no API key configured (--api-key, SPOOL_API_KEYS): anyone who can reach %s:%d can use "
                        "the API", settings.host, settings.port)
        deployment.start()
        manager.start()
        try:
            yield
        finally:
            await deployment.stop()
            await run_in_threadpool(manager.stop)
            await enqueuer.aclose()
            await client.aclose()  # the shared reads' task, and the pool

    app = FastAPI(title="spool", summary="OpenAI-compatible API in front of spool's Redis queue",
                  lifespan=lifespan)
    errors.install(app)
    for module in (completions, models, files, batches):
        app.include_router(module.router, dependencies=[Depends(auth)])
    app.include_router(health.router)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """The app of one `spool serve --workers N` process (uvicorn's factory; settings in SPOOL_GATEWAY_SETTINGS)."""
    return create_app(GatewaySettings.from_json(os.environ[ENV_SETTINGS]))

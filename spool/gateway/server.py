"""Run the gateway under uvicorn: one process, or --workers N processes sharing the port."""
from __future__ import annotations

import os

from spool.gateway.settings import ENV_SETTINGS, GatewaySettings


def serve(settings: GatewaySettings, access_log: bool = True) -> None:
    """Serve until SIGINT/SIGTERM (in-flight requests get 30 s to finish)."""
    import uvicorn

    common = dict(host=settings.host, port=settings.port, log_level=settings.log_level, access_log=access_log,
                  timeout_graceful_shutdown=30, backlog=4096, proxy_headers=True)
    if settings.workers > 1:
        os.environ[ENV_SETTINGS] = settings.to_json().decode()  # inherited by the worker processes
        uvicorn.run("spool.gateway.app:app_from_env", factory=True, workers=settings.workers, **common)
    else:
        from spool.gateway.app import create_app

        uvicorn.run(create_app(settings), **common)

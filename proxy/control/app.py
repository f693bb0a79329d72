"""FastAPI application for the control listener."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from proxy import __version__


def create_app(is_ready: Callable[[], bool]) -> FastAPI:
    """Build the control app; `is_ready` says whether the proxy listener is up."""
    app = FastAPI(title="egress-warden control API", version=__version__)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if not is_ready():
            return JSONResponse({"status": "starting"}, status_code=503)
        return JSONResponse({"status": "ok"})

    return app

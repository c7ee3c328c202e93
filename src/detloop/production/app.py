"""``detloop serve``: the Starlette web app (``/invocations``, ``/report``, ``/health``, ``/ping``,
``/version``, ``/registry-webhook``) around the service, and ``serve()``, which runs it under uvicorn."""

from __future__ import annotations

import logging
import time

from omegaconf import DictConfig

from detloop.production import predlog
from detloop.production.service import Answer, Service, build_service, refuse_body

log = logging.getLogger(__name__)


def create_app(service: Service):
    """The ASGI application (Starlette) around ``service``; prediction work runs in the thread pool."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def reply(answer: Answer) -> JSONResponse:
        version = answer.payload.get("model_version") or service.watcher.current.version
        return JSONResponse(answer.payload, status_code=answer.status, headers={"X-Model-Version": str(version)})

    async def health(request) -> JSONResponse:
        return JSONResponse(service.health())

    async def version(request) -> JSONResponse:
        return JSONResponse(service.versions())

    async def invocations(request) -> JSONResponse:
        arrived = time.time()
        body, too_large = await read_body(request, service.limits.max_body_bytes)
        if too_large is not None:
            return reply(await run_in_threadpool(refuse_body, service, too_large, "invocations"))
        content_type = request.headers.get("content-type")
        return reply(await run_in_threadpool(service.invocations, body, content_type, arrived))

    async def report(request) -> JSONResponse:
        body, too_large = await read_body(request, service.limits.max_body_bytes)
        if too_large is not None:
            return reply(await run_in_threadpool(refuse_body, service, too_large, "report"))
        content_type, note = request.headers.get("content-type"), request.query_params.get("note")
        return reply(await run_in_threadpool(service.report, body, content_type, note))

    async def registry_webhook(request) -> JSONResponse:
        from detloop.tracking import oversight

        body, too_large = await read_body(request, service.limits.max_body_bytes)
        if too_large is not None:
            return JSONResponse({"error": too_large}, status_code=413)
        try:
            status, answer = await run_in_threadpool(
                oversight.handle_delivery, service.cfg, dict(request.headers), body
            )
            if status == 200 and answer.get("alias") == service.watcher.alias:
                await run_in_threadpool(
                    service.watcher.check
                )  # swap now, not at the next poll (never to a refused one)
        except Exception as err:  # the registry is unreachable: MLflow retries the delivery, the poll still runs
            log.exception("registry webhook failed")
            return JSONResponse({"error": f"{type(err).__name__}: {err}"}, status_code=503)
        return JSONResponse(answer, status_code=status)

    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/ping", health, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/invocations", invocations, methods=["POST"]),
            Route("/report", report, methods=["POST"]),
            Route("/registry-webhook", registry_webhook, methods=["POST"]),
        ]
    )


async def read_body(request, limit: int) -> tuple[bytes, str | None]:
    """The body, read up to ``limit`` bytes; (b"", message) when it is larger.

    The rest of an oversized body is read and dropped, so the client gets the 413 instead of a reset
    connection.
    """
    declared = request.headers.get("content-length")
    chunks, size = [], 0
    too_large = None
    if declared and declared.isdigit() and int(declared) > limit:
        too_large = f"request body of {declared} bytes is larger than serve.limits.max_body_bytes={limit}"
    async for chunk in request.stream():
        size += len(chunk)
        if too_large is None and size > limit:
            too_large = f"request body larger than serve.limits.max_body_bytes={limit} bytes"
        if too_large is None:
            chunks.append(chunk)
    return (b"", too_large) if too_large else (b"".join(chunks), None)


def serve(cfg: DictConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the server until interrupted (``detloop serve``); returns the exit code."""
    import uvicorn

    service = build_service(cfg)
    host = host or str(cfg.serve.host)
    port = int(port if port is not None else cfg.serve.port)
    service.watcher.start()
    log.info(
        "serving %s v%s ('%s') on http://%s:%d; prediction log %s",
        service.watcher.name,
        service.watcher.current.version,
        service.watcher.alias,
        host,
        port,
        predlog.shown_uri(service.predlog.uri),
    )
    try:
        uvicorn.run(
            create_app(service),
            host=host,
            port=port,
            workers=1,
            access_log=False,
            log_level="warning",
            timeout_graceful_shutdown=10,
        )
    finally:
        service.watcher.stop()
        service.predlog.close()
    return 0

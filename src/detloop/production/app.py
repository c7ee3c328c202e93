"""``detloop serve``: the Starlette web app (``/invocations``, ``/report``, ``/health``, ``/ping``,
``/version``, ``/registry-webhook``) around the service, and ``serve()``, which runs it under uvicorn:
in this process (``serve.workers: 1``), or in ``serve.workers`` processes sharing the port, each with its
own model, batcher, alias watcher and listening socket (a worker that dies is replaced)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from detloop.core.errors import BadInput
from detloop.production import predlog
from detloop.production.service import (
    Answer,
    Service,
    build_service,
    check_servable,
    refuse_body,
    serve_workers,
)

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


STARTUP_FAILURE = 3  # exit code of a worker process that could not start serving
RESTART_PAUSE_S = 1.0  # before a worker that died while serving is replaced


def serve(cfg: DictConfig, host: str | None = None, port: int | None = None) -> int:
    """Run the server until interrupted (``detloop serve``); returns the exit code."""
    host = host or str(cfg.serve.host)
    port = int(port if port is not None else cfg.serve.port)
    workers = serve_workers(cfg)
    if workers > 1:
        return _serve_workers(cfg, host, port, workers)
    import uvicorn

    service = build_service(cfg)
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
        uvicorn.run(create_app(service), workers=1, **_uvicorn_options(host, port))
    finally:
        _close(service)
    return 0


def _uvicorn_options(host: str, port: int) -> dict:
    return {
        "host": host,
        "port": port,
        "access_log": False,
        "log_level": "warning",
        "timeout_graceful_shutdown": 10,
    }


def _close(service: Service) -> None:
    service.watcher.stop()
    service.predlog.close()


def _serve_workers(cfg: DictConfig, host: str, port: int, workers: int) -> int:
    """``workers`` (``serve.workers``) processes on one port, each with its own service and its own listening socket
    (``SO_REUSEPORT``: the kernel spreads the connections over them; one shared socket would leave most
    connections to whichever process accepts first). What would stop them all is checked here first
    (settings, a version to serve, the prediction log); a worker that still cannot start (its model does
    not load, the port is taken) stops the others, and its reason is this command's error. A worker that
    dies while serving is replaced; SIGTERM or SIGINT stops them all, each finishing its requests."""
    import multiprocessing
    import signal
    import threading

    if port == 0:
        raise BadInput("serve.port: 0 (any free port) gives each worker another port; name one with serve.workers > 1")
    version = check_servable(cfg)
    config = json.dumps(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    failed = Path(tempfile.mkdtemp(prefix="detloop-serve-"))
    spawn = multiprocessing.get_context("spawn")
    stop = threading.Event()

    def start():
        process = spawn.Process(target=_worker_main, args=(config, host, port, str(failed)), daemon=False)
        process.start()
        return process

    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info(
        "serving %s v%s ('%s') on http://%s:%d in %d worker processes; prediction log %s",
        cfg.mlflow.registered_model,
        version,
        cfg.serve.alias,
        host,
        port,
        workers,
        predlog.shown_uri(predlog.log_uri(cfg)),
    )
    processes = []
    try:
        processes = [start() for _ in range(workers)]
        while not stop.wait(0.2):
            for i, process in enumerate(processes):
                if process.exitcode is None:
                    continue
                if process.exitcode == STARTUP_FAILURE or any(failed.glob("*.json")):
                    stop.set()
                    break
                log.warning("server worker %d exited (%s); starting another", process.pid, process.exitcode)
                time.sleep(RESTART_PAUSE_S)
                processes[i] = start()
    finally:
        for process in processes:  # each finishes its requests first (uvicorn's graceful shutdown)
            if process.exitcode is None:
                process.terminate()
        for process in processes:
            process.join(timeout=30)
            if process.exitcode is None:
                process.kill()
                process.join()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        reasons = [json.loads(f.read_text()) for f in sorted(failed.glob("*.json"))]
        shutil.rmtree(failed, ignore_errors=True)
    if reasons:
        print(f"error: a server worker could not start: {reasons[0]['message']}", file=sys.stderr)
        return int(reasons[0]["code"])
    return 0


def _worker_main(config: str, host: str, port: int, failed: str) -> None:
    """One worker process: its own service, a listening socket of its own on the shared port, uvicorn. It
    stops (finishing its requests) when the parent goes away, so no worker outlives ``detloop serve``."""
    import socket
    import threading

    import uvicorn

    parent = os.getppid()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        service = build_service(OmegaConf.create(json.loads(config)))
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        except OSError as err:
            raise BadInput(f"serve: cannot listen on {host}:{port}: {err.strerror or err}") from err
        service.watcher.start()
    except Exception as err:
        _worker_failed(failed, err)
    log.info("server worker %d serves v%s", os.getpid(), service.watcher.current.version)
    server = uvicorn.Server(uvicorn.Config(create_app(service), workers=1, **_uvicorn_options(host, port)))

    def orphaned() -> None:
        while not server.should_exit:
            if os.getppid() != parent:
                log.warning("server worker %d: detloop serve is gone; stopping", os.getpid())
                server.should_exit = True
            time.sleep(1.0)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        _close(service)
    if not server.started:
        _worker_failed(failed, RuntimeError(f"uvicorn did not start on {host}:{port} (see the log above)"))


def _worker_failed(failed: str, err: BaseException) -> None:
    """Record why this worker could not start (for the parent's error) and exit with STARTUP_FAILURE."""
    from detloop.core.failures import report

    lines: list[str] = []
    code = report(err, lambda fmt, text: lines.append(text))
    if code is None:
        log.error("server worker %d could not start", os.getpid(), exc_info=err)
        code, lines = 1, [f"{type(err).__name__}: {err}"]
    message = "\n".join(lines)
    log.error("server worker %d could not start: %s", os.getpid(), message)
    (Path(failed) / f"{os.getpid()}.json").write_text(json.dumps({"code": code, "message": message}))
    sys.exit(STARTUP_FAILURE)

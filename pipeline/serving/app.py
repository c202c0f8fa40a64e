"""The Ray Serve application: one `CiterServer` replica per engine, behind a FastAPI ingress.

Routes: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
(streamed as server-sent events with `"stream": true`). The routes only check a request, hand it
to the replica's `Service` and write what comes back; errors are OpenAI's error JSON.

Three ways in: `citer serve CONFIG --run RUN` (`serve_until_interrupted`), `serve run
pipeline.serving.app:build_app config=CONFIG run=RUN`, and a Serve config file such as
jobs/serve/demo.yaml for `serve run` / `serve deploy` (and KubeRay's RayService).
"""


import json
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from pipeline import CiterError
from pipeline.config import Config, load_config
from pipeline.serving.protocol import SSE_DONE, APIError, Reply, api_error, models_list, parse_request, sse
from pipeline.storage import StoragePath

log = logging.getLogger(__name__)

APP_NAME = "citer"
# Requests a replica takes beyond its slots and queue before Serve holds them back: health checks
# and model lists answered while the engine is full.
HEADROOM = 16

api = FastAPI(title="citer", description="CITER token-level routing behind OpenAI's API")


@serve.deployment
@serve.ingress(api)
class CiterServer:
    """One replica: the pair, the router and the engine, driven by the replica's event loop."""

    def __init__(self, cfg: Config, router_path: str, threshold: float | None = None):
        import torch

        from pipeline.serving.service import Service

        if not torch.cuda.is_available():  # Ray starts workers with one thread; the replica has its CPUs
            torch.set_num_threads(max(1, int(cfg.serve.num_cpus_per_replica)))
        self.service = Service(cfg, router_path, threshold)
        self.created = int(time.time())

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        return {"status": "ok", **self.service.status()}

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        return models_list(self.service.name, self.created)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, chat=False)

    async def _complete(self, http: Request, chat: bool):
        try:
            body = json.loads(await http.body())
        except ValueError as e:
            return self._error(APIError(400, f"the request body is not valid JSON: {e}"))
        try:
            request = parse_request(body, chat=chat, served_model=self.service.name)
            job = self.service.submit(request)
        except Exception as e:  # every refusal becomes OpenAI's error JSON
            return self._error(api_error(e))
        reply = Reply(request)
        pieces = self.service.generate(request, job)
        if request.stream:
            return StreamingResponse(self._events(reply, pieces), media_type="text/event-stream")
        text = []
        try:
            async for piece in pieces:
                text.append(piece.text)
        except Exception as e:
            return self._error(api_error(e))
        return JSONResponse(reply.completion("".join(text), piece.finish_reason, piece.usage))

    @staticmethod
    def _error(e: APIError) -> JSONResponse:
        return JSONResponse(status_code=e.status, content=e.body())

    async def _events(self, reply: Reply, pieces: AsyncIterator) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish reason, the usage when asked
        for, then `[DONE]`."""
        try:
            if reply.chat:  # the assistant's role comes first, as OpenAI's streams do
                yield sse(reply.chunk("", first=True))
            async for piece in pieces:
                if piece.text:
                    yield sse(reply.chunk(piece.text))
                if piece.finish_reason is not None:
                    yield sse(reply.chunk("", piece.finish_reason))
                    if reply.include_usage:
                        yield sse(reply.usage_chunk(piece.usage))
        except Exception as e:  # the status line has gone: the error travels as an event
            yield sse(api_error(e).body())
        finally:
            await pieces.aclose()
        yield SSE_DONE


# ---------------------------------------------------------------------------------------------
# Building the application


def replica_options(cfg: Config) -> dict[str, Any]:
    """Serve options of the deployment: replicas, the requests a replica takes at once (its slots,
    queue and headroom: Serve's default of 5 would starve the batch), its CPUs and GPUs."""
    s = cfg.serve
    gpus = cfg.collect.num_gpus_per_actor if s.num_gpus_per_replica is None else s.num_gpus_per_replica
    if cfg.models.device == "cuda" and gpus == 0:
        raise CiterError("models.device is cuda but a replica would reserve no GPU: set serve.num_gpus_per_replica "
                         "(or collect.num_gpus_per_actor)")
    return {"num_replicas": s.num_replicas, "max_ongoing_requests": s.max_batch + s.max_queue + HEADROOM,
            "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": gpus},
            "logging_config": {"enable_access_log": False}}


def application(cfg: Config, router_path: str | StoragePath, threshold: float | None = None) -> Application:
    """The Serve application of a config and a router directory."""
    from pipeline.decoding import check_threshold

    if threshold is not None:
        check_threshold(threshold, "--threshold")
    return CiterServer.options(**replica_options(cfg)).bind(cfg, str(router_path), threshold)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's app builder: `config` (a YAML config) and `run` (a run directory), optionally
    `iteration`, `threshold` and `overrides` (KEY=VALUE items, a list or a space-separated string)."""
    from pipeline.serving.service import served_router

    unknown = set(args) - {"config", "run", "iteration", "threshold", "overrides"}
    if unknown or "config" not in args or "run" not in args:
        raise CiterError(f"build_app takes config=CONFIG run=RUN [iteration=N] [threshold=T] [overrides=...]; got "
                         f"{sorted(args)}")
    overrides = args.get("overrides") or []
    cfg = load_config(args["config"], overrides.split() if isinstance(overrides, str) else list(overrides))
    iteration = None if args.get("iteration") is None else int(args["iteration"])
    threshold = None if args.get("threshold") is None else float(args["threshold"])
    return application(cfg, served_router(args["run"], iteration), threshold)


# ---------------------------------------------------------------------------------------------
# `citer serve`


def serve_until_interrupted(cfg: Config, router_path: StoragePath, *, threshold: float | None, host: str,
                            port: int, ready: Any = print) -> None:
    """Start the app on the embedded local Ray (or RAY_ADDRESS's cluster), tell `ready` where it
    listens, and block until SIGINT or SIGTERM; then take it down: Serve and the embedded Ray, or on
    a cluster only this application."""
    import ray

    from pipeline.raysession import ensure_ray
    from pipeline.serving.service import served_name

    app = application(cfg, router_path, threshold)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    ensure_ray()
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"enable_access_log": False})
        serve.run(app, name=APP_NAME, route_prefix="/")
        if not stop.is_set():
            ready(f"serving {served_name(cfg)!r} (router {router_path}) at http://{host}:{port}/v1 "
                  "- Ctrl-C stops it")
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down")
        if on_cluster:
            serve.delete(APP_NAME)
        else:  # the embedded Ray takes Serve down with it (serve.shutdown first only adds a raylet error line)
            ray.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_port(host: str, port: int) -> None:
    """Refuse a port something already listens on, before starting Ray for nothing."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise CiterError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port") from None

"""``cxr-edge serve``: the classifier behind a REST API and a web page (extra ``pip install "cxr-edge[serve]"``).

    cxr-edge serve [--host 127.0.0.1] [--port 8000] [--model BUNDLE] [--backend tflite|onnx] [--threads N]
                   [--workers N] [--token TOKEN | --insecure-no-auth] [--max-upload-mb 64] [--no-ood]
                   [--max-concurrency 32] [--request-timeout 30]   (limits: cxr_edge/serve_limits.py)

Endpoints (OpenAPI schema at ``/openapi.json``, its docs page at ``/docs``; every asset is served from the
installed packages, nothing from a CDN):

- ``GET /`` the web page (``cxr_edge/web/``): drop scans, see label, probabilities and heatmap, download CSV.
- ``GET /healthz`` 200 ``{"status": "ready", ...}`` once the model is loaded; 503 ``loading`` / ``failed`` before.
- ``POST /v1/classify[?heatmap=true]`` one or more files as multipart field ``file`` (repeatable) or one file
  as the raw body (``?name=`` names it); answers ``{"results": [record, ...]}`` with the records of
  ``cxr-edge classify --json`` (``path`` is the uploaded file name). With ``heatmap=true`` each classified
  record also has ``"heatmap": "data:image/png;base64,..."``. Status 200 when at least one file was classified
  or rejected, 422 with a one-line ``detail`` when every file was unreadable, 400 for a malformed request,
  413 past the upload limit, 401 without the bearer token when one is set, 503 while the model loads.
- ``POST /v1/heatmap`` one file in the same way; answers the overlay as ``image/png`` (label in ``X-Label``).
- ``GET /v1/model`` the model card.

Everything goes through :class:`cxr_edge.Classifier` (``classify_many``) and ``Result.to_dict()``; uploads are
decoded from memory (``load_gray`` takes bytes) and never written to disk: the multipart parser's spool file
never rolls over, and the request body is refused past the limit before it is all read
(``cxr_edge/serve_uploads.py``). The model loads once, in the background after the socket is bound;
``--workers`` model instances (default 1) serve requests, each used by one request at a time, so concurrent
requests never share an interpreter (``cxr_edge/serve_pool.py``).
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import socket
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable, Optional

import click
from fastapi import Depends, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from cxr_edge import __version__
from cxr_edge.classifier import one_line
from cxr_edge.labels import CLASS_NAMES
from cxr_edge.serve_limits import (DEFAULT_MAX_CONCURRENCY, DEFAULT_REQUEST_TIMEOUT, LocalHostOnly, RequestLimits,
                                  hold_work, is_loopback)
# the model pool (cxr_edge/serve_pool.py) and the uploads (cxr_edge/serve_uploads.py), importable from here
from cxr_edge.serve_pool import HEATMAP_SIDE, ModelPool, Slot, classify_uploads, heatmap_png  # noqa: F401
from cxr_edge.serve_uploads import (Upload, _bounded, _InMemoryParser, _too_large, _TooLarge,  # noqa: F401
                                    clean_name, read_uploads)

DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
WEB = Path(__file__).resolve().parent / "web"
NOTICE = ("Not a medical device: a research demonstration, not validated clinically, not cleared by any "
          "regulator; never use it to diagnose, treat or triage anyone.")
log = logging.getLogger("cxr_edge.serve")
NO_STORE = {"Cache-Control": "no-store"}  # results about a patient: no browser or proxy keeps a copy


_UPLOAD_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or more scans (JPEG, PNG, DICOM, ...): repeat the field"}}}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": "one scan as the raw body; ?name= gives its name"},
}}}
_EXAMPLE = {"results": [
    {"path": "scan.jpeg", "status": "ok", "label": "bacterial",
     "probabilities": {"normal": 0.03, "bacterial": 0.81, "viral": 0.16},
     "model": {"name": "cxr-edge-lite0", "version": "1.0.0", "sha256": "570b3b28..."}},
    {"path": "photo.jpg", "status": "rejected", "reason": "colour image (not a radiograph)",
     "model": {"name": "cxr-edge-lite0", "version": "1.0.0", "sha256": "570b3b28..."}},
    {"path": "broken.jpg", "error": "cannot decode image (OSError: image file is truncated)"}]}


def _err(what: str) -> dict:
    return {"description": what, "content": {"application/json": {"example": {"detail": "one-line reason"}}}}


# ------------------------------------------------------------------------------------------------ app


def create_app(loader: Callable[[], ModelPool], *, token: Optional[str] = None,
               max_upload: int = DEFAULT_MAX_UPLOAD,
               on_ready: Optional[Callable[[ModelPool], None]] = None,
               on_error: Optional[Callable[[str], None]] = None,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
               local_only: bool = False):
    """The ASGI app. ``loader`` builds the model pool; it runs once, in a background thread, when the app
    starts (``/healthz`` says ``loading`` until it returns). ``local_only``: answer only requests whose Host
    header names this machine (a server bound to loopback: ``LocalHostOnly``)."""
    state: dict = {"status": "loading", "pool": None, "error": None}
    local: dict = {}  # the in-browser page (cxr-edge export-web of the served bundle), written on first visit

    def load() -> None:
        try:
            pool = loader()
        except Exception as exc:
            state.update(status="failed", error=one_line(exc))
            if on_error:
                on_error(state["error"])
            else:
                log.error("cannot load the model: %s", state["error"])
            return
        state.update(status="ready", pool=pool)
        if on_ready:
            on_ready(pool)

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=load, name="cxr-edge-model-load", daemon=True).start()
        try:
            yield
        finally:
            if "tmp" in local:  # the in-browser page's folder (/local/), removed when the server stops
                local.pop("tmp").cleanup()

    app = FastAPIOffline(title="cxr-edge", version=__version__, lifespan=lifespan,
                         description="Pediatric chest X-ray classifier (normal / bacterial / viral pneumonia). "
                                     + NOTICE)
    app.state.model = state
    bearer = HTTPBearer(auto_error=False, description="Required when the server was started with --token.")

    async def authorized(creds: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        if token is None:
            return
        if creds is None or not hmac.compare_digest(creds.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token (send the header Authorization: Bearer TOKEN)",
                                headers={"WWW-Authenticate": "Bearer"})

    def ready_pool() -> ModelPool:
        if state["status"] == "failed":
            raise HTTPException(503, f"the model failed to load: {state['error']}")
        if state["pool"] is None:
            raise HTTPException(503, "the model is still loading; retry in a moment", headers={"Retry-After": "1"})
        return state["pool"]

    @app.get("/healthz", tags=["service"], summary="Readiness: 200 once the model is loaded, 503 before")
    async def healthz() -> JSONResponse:
        body = {"status": state["status"], "version": __version__, "auth": token is not None,
                "max_upload_bytes": max_upload, "notice": NOTICE, "limits": app.state.limits.to_dict()}
        if state["pool"] is not None:
            body.update(model=state["pool"].model, workers=state["pool"].size, classes=list(CLASS_NAMES))
        if state["error"]:
            body["error"] = state["error"]
        return JSONResponse(body, status_code=200 if state["status"] == "ready" else 503)

    @app.get("/v1/model", tags=["model"], summary="The model card", dependencies=[Depends(authorized)],
             responses={401: _err("bearer token missing or wrong"), 503: _err("model not loaded")})
    async def model_card() -> JSONResponse:
        return JSONResponse(ready_pool().card)

    @app.post("/v1/classify", tags=["classify"], summary="Classify one or more scans",
              dependencies=[Depends(authorized)], openapi_extra=_UPLOAD_BODY,
              responses={200: {"description": "one record per file, as `cxr-edge classify --json` prints them",
                               "content": {"application/json": {"example": _EXAMPLE}}},
                         400: _err("malformed request (no file, bad multipart)"),
                         401: _err("bearer token missing or wrong"),
                         413: _err("request body larger than the upload limit"),
                         422: _err("no file could be read (not an image, truncated, decompression bomb)"),
                         503: _err("model not loaded yet")})
    async def classify(request: Request,
                       heatmap: bool = Query(False, description="add the class-activation overlay of each "
                                                                "classified scan as a PNG data URL"),
                       name: Optional[str] = Query(None, description="file name of a raw-body upload")):
        pool = ready_pool()
        uploads = await read_uploads(request, max_upload, name)
        records = await hold_work(request.scope, classify_uploads, pool, uploads, heatmap)
        if all("error" in r for r in records):
            first = records[0]
            detail = f"{first['path']}: {first['error']}"
            if len(records) > 1:
                detail = f"none of {len(records)} files could be read; first: {detail}"
            return JSONResponse({"detail": detail, "results": records}, status_code=422, headers=NO_STORE)
        return JSONResponse({"results": records}, headers=NO_STORE)

    @app.post("/v1/heatmap", tags=["classify"], summary="The heatmap overlay of one scan, as a PNG",
              dependencies=[Depends(authorized)], openapi_extra=_UPLOAD_BODY,
              response_class=Response,
              responses={200: {"description": "PNG overlay; the label is in the X-Label header",
                               "content": {"image/png": {}}},
                         401: _err("bearer token missing or wrong"), 413: _err("too large"),
                         422: _err("unreadable or rejected file, or the model has no heatmap data")})
    async def heatmap_only(request: Request, name: Optional[str] = Query(None)):
        pool = ready_pool()
        uploads = await read_uploads(request, max_upload, name)
        if len(uploads) != 1:
            raise HTTPException(400, f"send exactly one file (got {len(uploads)})")
        record = (await hold_work(request.scope, classify_uploads, pool, uploads, True))[0]
        if "heatmap" not in record:
            reason = record.get("error") or record.get("heatmap_error") or f"rejected: {record.get('reason')}"
            raise HTTPException(422, f"{record['path']}: {reason}")
        png = base64.b64decode(record["heatmap"].split(",", 1)[1])
        return Response(png, media_type="image/png", headers={"X-Label": record["label"], **NO_STORE})

    local_lock = asyncio.Lock()

    @app.get("/local", include_in_schema=False)
    async def local_redirect() -> Response:
        return Response(status_code=307, headers={"Location": "/local/"})

    @app.get("/local/{name:path}", include_in_schema=False)
    async def local_page(name: str) -> FileResponse:
        """"Classify in this browser": the static folder of ``cxr-edge export-web`` for the served bundle; the
        scan never reaches this server (the page runs the ONNX model with onnxruntime-web). Off when the server
        requires a token: a browser does not send it for a page's files, and the page holds the model."""
        if token is not None:
            raise HTTPException(404, "the in-browser page is off on a server that requires a token; "
                                     "make it with cxr-edge export-web and open it from that folder")
        pool = ready_pool()
        async with local_lock:  # written once, by the first visit; the others wait for it
            if "root" not in local and "error" not in local:
                import tempfile

                from cxr_edge.webexport import WebExportError, export_web
                local["tmp"] = tempfile.TemporaryDirectory(prefix="cxr-edge-web-")
                try:
                    local["root"] = await run_in_threadpool(export_web, Path(local["tmp"].name) / "site",
                                                            pool.first.clf.bundle.root)
                except WebExportError as exc:
                    log.warning("no in-browser page for this model: %s", one_line(exc))
                    local["error"] = "no in-browser page for this model (the server's log says why)"
                    local.pop("tmp").cleanup()
                except BaseException:  # another failure (a full disk): nothing kept, the next visit tries again
                    local.pop("tmp").cleanup()
                    raise
        if "error" in local:
            raise HTTPException(404, local["error"])
        root = local["root"].resolve()
        path = (root / (name or "index.html")).resolve()
        if root not in path.parents or not path.is_file():
            raise HTTPException(404, "not found")
        return FileResponse(path, headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; "
                                       "img-src 'self' data: blob:; style-src 'self'; object-src 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                                       "script-src 'self'; connect-src 'self'; object-src 'none'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB), name="web")
    app.add_middleware(RequestLimits, max_concurrency=max_concurrency, timeout=request_timeout, state=app.state)
    if local_only:
        app.add_middleware(LocalHostOnly)
    app.state.limits = RequestLimits(None, max_concurrency, request_timeout)  # until the middleware is built
    return app


# ------------------------------------------------------------------------------------------ the command


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (``port`` 0: a free one)."""
    info = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class _Failed(click.ClickException):
    exit_code = 2


def serve_command(host: str, port: int, model, backend, threads, workers: int, token: Optional[str],
                  insecure_no_auth: bool, max_upload_mb: float, ood: bool, log_level: str = "info",
                  allow_adults: bool = False, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                  request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
    """What ``cxr-edge serve`` runs: checks, bind, load the model in the background, serve until Ctrl-C."""
    import uvicorn

    if token is not None and not token.strip():
        raise click.UsageError("--token must not be empty")
    if not is_loopback(host) and token is None and not insecure_no_auth:
        raise click.UsageError(f"binding to {host} exposes the service beyond this machine: pass --token TOKEN "
                               "(clients send Authorization: Bearer TOKEN) or, knowingly, --insecure-no-auth")
    from cxr_edge.bundle import BundleError, load_bundle

    try:  # a missing or unreadable bundle fails here, before the port opens (file checks run in the loader)
        load_bundle(model)
    except BundleError as exc:
        raise _Failed(f"cannot load the model: {one_line(exc)}") from None
    try:
        sock = bind(host, port)
    except OSError as exc:
        raise _Failed(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    url = url_of(sock)
    failure: list[str] = []
    server: Optional[uvicorn.Server] = None

    def ready(pool: ModelPool) -> None:
        m = pool.model
        click.echo(f"cxr-edge: serving {m['name']} {m['version']} ({m['backend']}) at {url}  "
                   f"(API docs {url}docs; Ctrl-C stops)", err=True)

    def failed(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: ModelPool.load(model, backend, threads, workers, ood, allow_adults), token=token,
                     max_upload=int(max_upload_mb * 2**20), on_ready=ready, on_error=failed,
                     max_concurrency=max_concurrency, request_timeout=request_timeout, local_only=is_loopback(host))
    click.echo(f"cxr-edge: loading the model; listening on {url} ({'bearer token required' if token else 'no auth'})",
               err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failure:
        raise _Failed(f"cannot load the model: {failure[0]}")

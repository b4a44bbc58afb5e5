"""The web service's resource limits (``cxr-edge serve``), as an ASGI middleware around the app of
``cxr_edge.serve``:

- ``--max-concurrency N`` (default 32): at most N requests to ``POST /v1/...`` in progress at once, from the
  first byte of the request to the end of its classification; one past it is answered at once with 503 and
  ``Retry-After: 1`` instead of waiting in a queue of unbounded length (so memory is bounded too: N uploads of
  at most ``--max-upload-mb`` each). Slots are freed when the work of a request ends, not when its answer is
  sent: a request answered 503 at the time limit keeps its slot until its classification has finished
  (``hold``), so requests that time out cannot pile work up behind the limit.
- ``--request-timeout S`` (default 30 s): a request must be read and answered within S seconds. An upload that
  has not all arrived by then (a client dribbling its bytes) gets 408 and its connection is closed; one whose
  classification is still waiting or running gets 503 with ``Retry-After`` (the classification finishes in the
  background: a decoder cannot be stopped part-way, and the pixel limit bounds its work).
- the pixel limit: Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, 89,478,485 pixels by
  default; DICOM rows x columns are held to the same): a larger image is an error record, decided from its
  header before its pixels are decoded.

``GET`` endpoints (the page, ``/healthz``, ``/v1/model``) are not limited.

``LocalHostOnly`` answers 400 to a request whose ``Host`` header is not this machine's (``localhost``, a
loopback address): a server bound to loopback without a token is then out of reach of a web page that points
its own domain name at 127.0.0.1 (DNS rebinding).
"""
from __future__ import annotations

import asyncio
import json

DEFAULT_MAX_CONCURRENCY = 32
DEFAULT_REQUEST_TIMEOUT = 30.0
HOLD = "cxr_edge.hold"  # the ASGI scope key of a request's ``hold(work)`` (``RequestLimits``)


def pixel_limit() -> int:
    from PIL import Image

    return int(Image.MAX_IMAGE_PIXELS or 0)


async def _answer(send, status: int, detail: str, headers: dict) -> None:
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware: ``max_concurrency`` requests to ``POST /v1/`` at once, each within ``timeout`` s."""

    def __init__(self, app, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
                 timeout: float = DEFAULT_REQUEST_TIMEOUT, state=None):
        self.app, self.max, self.timeout = app, int(max_concurrency), float(timeout)
        self.active = 0
        self.refused = 0  # 503s given for concurrency, since start (in /healthz)
        self.timed_out = 0
        if state is not None:  # the app's state: /healthz reports the limits and counts
            state.limits = self

    def _release(self, _task=None) -> None:
        self.active -= 1

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.active >= self.max:
            self.refused += 1
            return await _answer(send, 503, f"busy: {self.active} requests in progress, the most this server "
                                 f"takes at once (--max-concurrency {self.max}); retry shortly", {"Retry-After": "1"})
        self.active += 1
        state = {"started": False, "body_done": False, "closed": False, "held": False}

        def hold(work) -> None:
            """The request's work (a future the app awaits): its slot is freed when that ends, even if the
            request itself is answered or cancelled before (the time limit)."""
            state["held"] = True
            work.add_done_callback(lambda _w: self._release())

        def release_request(_task) -> None:
            if not state["held"]:
                self._release()

        async def receive_wrap():
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_wrap(message):
            if state["closed"]:  # answered already (the time limit): what the app sends now is dropped
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        scope[HOLD] = hold
        task = asyncio.ensure_future(self.app(scope, receive_wrap, send_wrap))
        task.add_done_callback(release_request)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if done:
            return task.result()
        self.timed_out += 1
        state["closed"] = True
        task.cancel()  # an upload being read stops now; a classification in its thread finishes first
        if state["started"]:
            return
        if not state["body_done"]:
            await _answer(send, 408, f"the upload did not arrive within the time limit ({self.timeout:g} s, "
                          "--request-timeout)", {"Connection": "close"})
        else:
            await _answer(send, 503, f"not answered within the time limit ({self.timeout:g} s, "
                          "--request-timeout); retry shortly", {"Retry-After": "1"})

    def to_dict(self) -> dict:
        return {"max_concurrency": self.max, "request_timeout_s": self.timeout, "max_pixels": pixel_limit(),
                "in_progress": self.active, "refused_busy": self.refused, "timed_out": self.timed_out}


async def hold_work(scope: dict, fn, *args):
    """``fn(*args)`` in the thread pool, its slot (``RequestLimits``) held until it returns: the request may be
    answered at the time limit and cancelled meanwhile, the work goes on and keeps the slot until it ends."""
    from starlette.concurrency import run_in_threadpool

    work = asyncio.ensure_future(run_in_threadpool(fn, *args))
    work.add_done_callback(lambda w: w.cancelled() or w.exception())  # a late failure: nobody to tell, no warning
    hold = scope.get(HOLD)
    if hold is not None:
        hold(work)
    return await asyncio.shield(work)


def host_of(header: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (``[::1]`` too): the bind check of ``cxr-edge serve`` and the Host
    check of ``LocalHostOnly``."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class LocalHostOnly:
    """ASGI middleware for a server bound to loopback: requests must name this machine in ``Host``. Not
    Starlette's ``TrustedHostMiddleware``: it matches a list of names, while loopback is an address range
    (127.0.0.0/8, ``[::1]``) that ``is_loopback`` tests, as the bind check does."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":  # the app has no websocket routes
            raw = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not is_loopback(host_of(raw)):
                return await _answer(send, 400, "this server answers requests to localhost only (Host header "
                                     f"{raw[:100]!r}); bind another address with --host and --token", {})
        return await self.app(scope, receive, send)

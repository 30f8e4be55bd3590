"""The FastAPI application of ``denseseg serve``: :func:`create_app`.

Routes: ``GET /`` (the web page), ``GET /healthz``, ``GET /v1/models``, ``GET /v1/samples``,
``GET /v1/samples/{name}.png``, ``POST /v1/segment``, ``POST /v1/segment/batch``,
``GET /metrics``, and FastAPI's ``/docs`` and ``/openapi.json``.

Every error is a JSON body ``{"error": {"code": ..., "message": ...}}`` with a 4xx status for
what the client sent (or 503/504 under load), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from importlib import resources
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from denseseg.data import sample_scenes as samples
from denseseg.data.io import read_image_bytes
from denseseg.errors import ConfigError, DensesegError, ImageTooLargeError, NotAnImageError
from denseseg.inference.segmenter import TTA, Segmenter
from denseseg.serve import encode
from denseseg.serve.batcher import Batcher, QueueFull
from denseseg.serve.metrics import CONTENT_TYPE, Metrics
from denseseg.serve.settings import ACCEPTED_FORMATS, ServeSettings

log = logging.getLogger("denseseg.serve")

_OPTIONS = ("format", "mode", "tta", "alpha")
_OPEN_PATHS = ("/", "/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


class ApiError(Exception):
    """A request the server refuses: status, a short code and a one-line message."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


class ServerState:
    """The model, its settings, the batcher and the metrics of one application."""

    def __init__(self, predictor: Segmenter, settings: ServeSettings) -> None:
        self.seg, self.settings = predictor, settings
        self.modes = predictor.supported_modes()
        self.in_flight = 0
        self._variants: dict[tuple[str, str], Segmenter] = {}
        self.metrics = Metrics(lambda: len(self.batcher), lambda: self.in_flight)
        max_batch = settings.max_batch or (4 if predictor.device.type == "cuda" else 1)
        self.batcher = Batcher(
            self._predict,
            max_batch=max_batch,
            wait_s=settings.batch_wait_ms / 1000,
            max_queue=settings.max_queue,
            on_batch=self.metrics.batch.observe,
        )

    def variant(self, mode: str, tta: str) -> Segmenter:
        """The Segmenter for these options (made once, sharing the model)."""
        key = (mode, tta)
        if key not in self._variants:
            self._variants[key] = self.seg.with_options(mode=mode, tta=tta)
        return self._variants[key]

    def _predict(
        self, key: Hashable, images: Sequence[torch.Tensor], stop: Callable[[], bool]
    ) -> list[torch.Tensor]:
        mode, tta, _shape = key  # type: ignore[misc]
        seg = self.variant(mode, tta)
        seg.should_stop = stop  # checked before each window, tile and pass: a timed-out
        try:  # request does not hold the model for the requests behind it
            return seg.predict_batch(list(images))[0]
        finally:
            seg.should_stop = None

    def model_info(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": s.model_name,
            "classes": list(self.seg.class_names),
            "palette": [list(c) for c in self.seg.palette],
            "in_channels": self.seg.in_channels,
            "defaults": {"mode": self.seg.mode, "tta": self.seg.tta},
            "modes": self.modes,
            "tta": list(TTA),
            "backend": self.seg.backend,
            "max_upload_bytes": s.max_upload_bytes,
            "max_pixels": s.max_pixels,
            "max_files": s.files_limit,
        }


def create_app(predictor: Segmenter, settings: ServeSettings | None = None) -> FastAPI:
    """The application serving ``predictor`` (a semantic :class:`Segmenter`, any backend).

    Raises:
        ConfigError: ``predictor`` is not a semantic Segmenter.
    """
    if not isinstance(predictor, Segmenter):
        raise ConfigError(
            "denseseg serve runs semantic segmentation models; this is an instance model "
            f"({type(predictor).__name__}), which the API does not serve"
        )
    settings = settings or ServeSettings()
    state = ServerState(predictor, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(state.batcher.close)  # waits for the batch running

    app = FastAPI(
        title="denseseg",
        summary=f"Semantic segmentation with {settings.model_name}",
        version="1",
        lifespan=lifespan,
    )
    app.state.denseseg = state
    _install_errors(app)
    _install_guards(app, state)
    _add_pages(app, state)
    _add_segment(app, state)
    return app


def _install_errors(app: FastAPI) -> None:
    """Every failure as ``{"error": {"code", "message"}}``."""

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_option", f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, "internal", f"internal error ({type(exc).__name__}); see the log")


def _install_guards(app: FastAPI, state: ServerState) -> None:
    """Cross-origin refusal, the token check, and the metrics of every request."""
    settings = state.settings

    @app.middleware("http")
    async def _guard(request: Request, call_next):  # type: ignore[no-untyped-def]
        start = time.monotonic()
        refused = _refusal(request, settings)
        response = refused if refused is not None else await call_next(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        state.metrics.observe(name, response.status_code, time.monotonic() - start)
        return response

    if settings.cors_origins:  # added last: it wraps the guard, so refusals carry its headers
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["X-Inference-Ms"],
        )


def _refusal(request: Request, settings: ServeSettings) -> JSONResponse | None:
    """A 403 for a cross-origin request from an origin not allowed, a 401 for a missing or
    wrong token on the API; None to go on."""
    host = request.headers.get("host", "")
    if settings.allowed_hosts and _hostname(host) not in settings.allowed_hosts:
        return _error(
            400,
            "invalid_host",
            f"Host {host!r} is not a name of this server (a guard against DNS rebinding); "
            "call it by one of: " + ", ".join(settings.allowed_hosts),
        )
    origin = request.headers.get("origin")
    if origin and not _same_host(origin, request) and origin not in settings.cors_origins:
        return _error(
            403,
            "cross_origin",
            f"cross-origin requests from {origin} are refused; start the server with "
            "--cors-origin to allow an origin",
        )
    path = request.url.path
    if settings.token is None or path in _OPEN_PATHS or request.method == "OPTIONS":
        return None
    if not (path.startswith("/v1/") or path == "/metrics"):
        return None
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.token.encode()
    ):
        what = "a wrong token" if given else "no token"
        return _error(
            401,
            "unauthorized",
            f"this server needs 'Authorization: Bearer <token>'; the request had {what}",
            {"WWW-Authenticate": "Bearer"},
        )
    return None


def _hostname(host: str) -> str:
    """``example.org`` of ``example.org:8000``, ``::1`` of ``[::1]:8000``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _same_host(origin: str, request: Request) -> bool:
    """Whether ``origin`` is the page's own host and port (the scheme is not compared: behind
    a proxy that ends TLS the page says https while the server sees http)."""
    host = request.headers.get("host", "")
    return bool(host) and origin.partition("://")[2] == host


def _add_pages(app: FastAPI, state: ServerState) -> None:
    """The web page, health, the model's description, samples and metrics."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        html = resources.files("denseseg.serve").joinpath("static/index.html")
        return HTMLResponse(html.read_text(encoding="utf-8"))

    @app.get("/healthz", summary="Liveness: the model is loaded and the queue answers")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": state.settings.model_name, "queue": len(state.batcher)}

    @app.get("/v1/models", summary="The served model: classes, palette, inference options")
    def models() -> dict[str, Any]:
        return {"models": [state.model_info()]}

    @app.get("/v1/samples", summary="Sample images the package generates")
    def sample_list() -> dict[str, Any]:
        names = samples.sample_names()
        return {"samples": [{"name": n, "url": f"/v1/samples/{n}.png"} for n in names]}

    @app.get("/v1/samples/{name}.png", summary="One sample image (PNG)")
    def sample(name: str) -> Response:
        try:
            data = samples.sample_png(name)
        except KeyError:
            raise ApiError(404, "not_found", f"no sample named {name!r}; see /v1/samples") from None
        return Response(data, media_type="image/png")

    @app.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(state.metrics.text(), media_type=CONTENT_TYPE)


def _add_segment(app: FastAPI, state: ServerState) -> None:
    """``POST /v1/segment`` and ``POST /v1/segment/batch``."""
    doc = {
        "format": Query("label", description="label (palette PNG), overlay (PNG) or json"),
        "mode": Query(None, description="whole, slide or overlap_tile, as /v1/models allows"),
        "tta": Query(None, description="none, hflip, d4 or ms"),
        "alpha": Query(0.5, description="overlay: weight of the label colours, 0-1"),
    }

    @app.post("/v1/segment", summary="Segment one image (multipart field 'file' or raw body)")
    async def segment(
        request: Request,
        format: str = doc["format"],  # noqa: A002 - the API's parameter name
        mode: str | None = doc["mode"],
        tta: str | None = doc["tta"],
        alpha: str = doc["alpha"],
    ) -> Response:
        opts = _options(request, state)
        async with _admitted(state):
            (name, data), *_ = await _received(request, state.settings, "file", single=True)
            image, labels, ms = await _segment_one(state, opts, name, data)
            return await run_in_threadpool(_respond, state, opts, image, labels, ms)

    @app.post("/v1/segment/batch", summary="Segment several images (multipart field 'files')")
    async def segment_batch(
        request: Request,
        format: str = doc["format"],  # noqa: A002
        mode: str | None = doc["mode"],
        tta: str | None = doc["tta"],
        alpha: str = doc["alpha"],
    ) -> dict[str, Any]:
        opts = _options(request, state)
        async with _admitted(state):
            files = await _received(request, state.settings, "files", single=False)
            done = await _segment_all(state, opts, files)
            items = []
            for (name, _), (image, labels, ms) in zip(files, done, strict=True):
                item = await run_in_threadpool(_batch_item, state, opts, image, labels)
                items.append({"name": name, "inference_ms": ms, **item})
            return {"results": items}


async def _segment_all(
    state: ServerState, opts: dict[str, Any], files: list[tuple[str, bytes]]
) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Every file of a batch request, submitted together (so that the batcher can put them in
    one forward pass); when one fails, the others are dropped, not computed for nobody."""
    tasks = [asyncio.ensure_future(_segment_one(state, opts, n, d)) for n, d in files]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


async def _received(
    request: Request, settings: ServeSettings, field: str, single: bool
) -> list[tuple[str, bytes]]:
    """:func:`_uploads` within the request's time: a client that sends its body slowly gets
    408 after ``timeout_s`` and frees its place."""
    try:
        async with asyncio.timeout(settings.timeout_s):
            return await _uploads(request, settings, field, single)
    except TimeoutError:
        raise ApiError(
            408, "request_timeout", f"the upload took over {settings.timeout_s:g} s; send it again"
        ) from None
    except ClientDisconnect:  # the client went away: nobody reads the answer
        raise ApiError(400, "client_disconnected", "the client closed the connection") from None


def _options(request: Request, state: ServerState) -> dict[str, Any]:
    """The query options, checked against what the model supports.

    Raises:
        ApiError: an unknown option or a value the model does not support (400).
    """
    unknown = sorted(set(request.query_params) - set(_OPTIONS))
    if unknown:
        raise ApiError(
            400, "unknown_option", f"unknown option {unknown[0]!r}; use {', '.join(_OPTIONS)}"
        )
    q = request.query_params
    fmt = q.get("format", "label")
    if fmt not in encode.FORMATS:
        raise ApiError(400, "invalid_option", f"format={fmt!r}; use {', '.join(encode.FORMATS)}")
    mode, tta = q.get("mode") or state.seg.mode, q.get("tta") or state.seg.tta
    if mode not in state.modes:
        raise ApiError(
            400, "invalid_option", f"mode={mode!r}; this model supports {', '.join(state.modes)}"
        )
    if tta not in TTA:
        raise ApiError(400, "invalid_option", f"tta={tta!r}; use {', '.join(TTA)}")
    try:
        alpha = float(q.get("alpha", "0.5"))
    except ValueError:
        alpha = -1.0
    if not 0.0 <= alpha <= 1.0:
        raise ApiError(400, "invalid_option", f"alpha={q.get('alpha')!r}; use a number in 0-1")
    return {"format": fmt, "mode": mode, "tta": tta, "alpha": alpha}


class _admitted:
    """Admission: at most ``max_queue`` segment requests in the server at once; more get 503
    with ``Retry-After`` at once, before their body is read."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def __aenter__(self) -> None:
        if self.state.in_flight >= self.state.settings.max_queue:
            raise _busy()
        self.state.in_flight += 1

    async def __aexit__(self, *exc: object) -> None:
        self.state.in_flight -= 1


def _busy() -> ApiError:
    return ApiError(503, "busy", "the server is busy; retry in a second", {"Retry-After": "1"})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_big(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_big(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the upload is over the server's limit of {limit:,} bytes")


async def _uploads(
    request: Request, settings: ServeSettings, field: str, single: bool
) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the uploaded images: the multipart field ``field``, or the raw body.

    Raises:
        ApiError: too large (413), no image, a wrong field or too many files (400).
    """
    body = await _read_body(request, settings.max_upload_bytes)
    ctype = request.headers.get("content-type", "").lower()
    if not ctype.startswith("multipart/form-data"):
        if not single:
            raise ApiError(400, "no_file", f"send the images as multipart form fields '{field}'")
        # Whatever the declared type (curl --data-binary says a form): the content decides.
        return [("upload", body)]
    files = await _form_files(request, body, settings, field)
    if single and len(files) != 1:
        raise ApiError(400, "no_file", f"send exactly one image in the form field '{field}'")
    return files


async def _form_files(
    request: Request, body: bytes, settings: ServeSettings, field: str
) -> list[tuple[str, bytes]]:
    """The files of form field ``field`` in a multipart ``body``."""

    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    limit = settings.files_limit
    try:
        form = await Request(request.scope, replay).form(max_files=limit, max_fields=limit)
    except StarletteHTTPException as exc:  # python-multipart's refusals
        if "Maximum number of" in str(exc.detail):
            raise _too_many(limit) from None
        raise ApiError(400, "bad_multipart", f"malformed multipart body: {exc.detail}") from None
    try:
        items = form.multi_items()
        others = sorted({k for k, _ in items if k != field})
        if others:
            raise ApiError(
                400,
                "wrong_field",
                f"unexpected form field {others[0]!r}; send the image in the field '{field}'",
            )
        files = [v for k, v in items if isinstance(v, UploadFile)]
        if not files:
            raise ApiError(400, "no_file", f"no file in the form field '{field}'")
        if len(files) > limit:
            raise _too_many(limit)
        return [(f.filename or "upload", await f.read()) for f in files]
    finally:
        await form.close()


def _too_many(limit: int) -> ApiError:
    return ApiError(400, "too_many_files", f"at most {limit} images a request on this server")


async def _segment_one(
    state: ServerState, opts: dict[str, Any], name: str, data: bytes
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Decode, queue and await one image: ``(image, labels, milliseconds in the queue and the
    model)``."""
    image = await run_in_threadpool(_decode, state.settings, name, data)
    key = (opts["mode"], opts["tta"], tuple(image.shape))
    start = time.monotonic()
    try:
        labels = await state.batcher.submit(key, image, state.settings.timeout_s)
    except QueueFull:
        raise _busy() from None
    except TimeoutError:
        raise ApiError(
            504, "timeout", f"no answer within {state.settings.timeout_s:g} s; retry later"
        ) from None
    except DensesegError as exc:
        raise ApiError(400, "cannot_segment", str(exc)) from None
    return image, labels, (time.monotonic() - start) * 1000


def _decode(settings: ServeSettings, name: str, data: bytes) -> torch.Tensor:
    """The upload as a uint8 image (the reader's conversions), or the 4xx saying why not."""
    try:
        return read_image_bytes(data, name, settings.max_pixels, ACCEPTED_FORMATS)
    except ImageTooLargeError as exc:
        raise ApiError(413, "too_many_pixels", str(exc)) from None
    except NotAnImageError as exc:
        raise ApiError(415, "not_an_image", str(exc)) from None
    except DensesegError as exc:
        raise ApiError(400, "bad_image", str(exc)) from None


def _respond(
    state: ServerState, opts: dict[str, Any], image: torch.Tensor, labels: torch.Tensor, ms: float
) -> Response:
    headers = {"X-Inference-Ms": f"{ms:.1f}"}
    seg = state.seg
    if opts["format"] == "json":
        body = {"model": state.settings.model_name, **_summary(state, labels)}
        return JSONResponse(body, headers=headers)
    if opts["format"] == "overlay":
        data = encode.overlay_png(image, labels, seg.palette, opts["alpha"])
    else:
        data = encode.label_png(labels, seg.palette)
    return Response(data, media_type="image/png", headers=headers)


def _summary(state: ServerState, labels: torch.Tensor) -> dict[str, Any]:
    return encode.summary(labels, state.seg.class_names, state.seg.palette, rle=True)


def _batch_item(
    state: ServerState, opts: dict[str, Any], image: torch.Tensor, labels: torch.Tensor
) -> dict[str, Any]:
    if opts["format"] == "json":
        return _summary(state, labels)
    if opts["format"] == "overlay":
        data = encode.overlay_png(image, labels, state.seg.palette, opts["alpha"])
    else:
        data = encode.label_png(labels, state.seg.palette)
    return {"png_base64": base64.b64encode(data).decode("ascii")}

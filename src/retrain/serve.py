"""``retrain serve``: classify images over HTTP with a retrained model.

    >>> from retrain.serve import create_app, serve
    >>> app = create_app("output_graph.onnx", max_batch=16)   # an ASGI app (Starlette)
    >>> serve("output_graph.onnx", port=8080)                  # runs it with uvicorn

Routes: ``POST /v1/classify`` (an image as the raw body, or multipart files; ``?top_k=``),
``GET /v1/model``, ``GET /v1/stats``, ``GET /healthz`` and a small page at ``/``.
Every error is JSON, ``{"error": "..."}``, with a 4xx status for a bad request.

Images from concurrent requests are run through the model together: a
:class:`MicroBatcher` queues decoded images and one worker takes up to
``max_batch`` of them, waiting at most ``max_wait_ms`` for a batch to fill.
Decoding runs in a thread pool and inference in its own thread, so the event
loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources

import numpy as np

from retrain.devices import cpu_cores
from retrain.errors import RetrainError
from retrain.images import ImageError, decode_image
from retrain.predict import Classifier, load

DEFAULT_PORT = 8080


@dataclass(frozen=True)
class Limits:
    """What one server accepts; the defaults suit photos from phones and cameras."""

    max_batch: int = 16  # images per model run
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for others
    max_body_bytes: int = 20 * 2**20  # request body, all files together
    max_pixels: int = 40_000_000  # per image, checked from its header before decoding
    max_images: int = 16  # files per request
    max_queue: int = 256  # images waiting for the model before new ones get 503
    default_top_k: int = 5
    # Classify requests being read, decoded or run at once; more get 503 before their body is read, so
    # memory stays below about max_in_flight x max_body_bytes (16 x 20 MiB) plus the decoders' buffers.
    max_in_flight: int = 16

    def __post_init__(self):
        for name in (
            "max_batch",
            "max_body_bytes",
            "max_pixels",
            "max_images",
            "max_queue",
            "default_top_k",
            "max_in_flight",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RetrainError(f"{name} must be a positive whole number, got {value!r}")
        if not 0 <= self.max_wait_ms <= 1000:
            raise RetrainError(f"max_wait_ms must be between 0 and 1000, got {self.max_wait_ms!r}")


class HTTPError(Exception):
    """A request the server refuses: its status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# -- batching ---------------------------------------------------------------------------------------
class MicroBatcher:
    """Collects single images from concurrent callers into batches for ``predict``.

    ``predict``: ``(N, H, W, 3)`` uint8 -> ``(N, n_classes)``; it runs in ``executor``
    (one thread: batches run one after another, each using all of ONNX Runtime's threads).
    The worker task starts on the first :meth:`submit` in a running event loop.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        executor: ThreadPoolExecutor | None = None,
    ):
        self.predict = predict
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self._executor = executor
        self._own_executor = executor is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._queue: asyncio.Queue | None = None
        self._full: asyncio.Event | None = None
        self.batches = 0
        self.images = 0
        self.largest_batch = 0
        self.batch_sizes: Counter[int] = Counter()
        self.rejected = 0
        self.busy_seconds = 0.0

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        # First use, or a new event loop (e.g. a test client opened again): start over in it.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="retrain-infer")
        self._loop, self._queue, self._full = loop, asyncio.Queue(), asyncio.Event()
        self._task = loop.create_task(self._work(), name="retrain-batcher")

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        """One ``(H, W, 3)`` image -> its row of probabilities."""
        self._ensure_worker()
        if self._queue.qsize() >= self.max_queue:
            self.rejected += 1
            raise HTTPError(
                503,
                f"server busy: {self._queue.qsize()} images are waiting; retry shortly",
                {"Retry-After": "1"},
            )
        future = self._loop.create_future()
        self._queue.put_nowait((pixels, future))
        if self._queue.qsize() >= self.max_batch:
            self._full.set()
        return await future

    async def _work(self) -> None:
        queue, loop = self._queue, self._loop
        while True:
            batch = [await queue.get()]
            if len(batch) + queue.qsize() < self.max_batch and self.max_wait > 0:
                self._full.clear()
                # asyncio.TimeoutError: the built-in TimeoutError only from Python 3.11 on (3.10 hung here).
                with contextlib.suppress(
                    asyncio.TimeoutError
                ):  # the batch waits at most max_wait for company
                    await asyncio.wait_for(self._full.wait(), self.max_wait)
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [(px, fut) for px, fut in batch if not fut.done()]  # callers that went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                probs = await loop.run_in_executor(
                    self._executor, self.predict, np.stack([px for px, _ in batch])
                )
            except Exception as exc:  # noqa: BLE001 - handed to every caller of this batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.busy_seconds += time.perf_counter() - t0
            self.batches += 1
            self.images += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            self.batch_sizes[len(batch)] += 1
            for (_, fut), row in zip(batch, probs):
                if not fut.done():
                    fut.set_result(row)

    @property
    def alive(self) -> bool:
        return self._task is None or not self._task.done() or self._task.cancelled()

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "images": self.images,
            "largest_batch": self.largest_batch,
            "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued": self._queue.qsize() if self._queue is not None else 0,
            "rejected_busy": self.rejected,
            "inference_seconds": round(self.busy_seconds, 3),
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000,
        }

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_executor and self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None


# -- the app ----------------------------------------------------------------------------------------
_RAW_TYPES = ("application/octet-stream",)


class _Service:
    """The state behind the routes: model, limits, batcher, decoding threads, counters."""

    def __init__(self, clf: Classifier, limits: Limits, decode_threads: int | None):
        self.clf, self.limits = clf, limits
        self.batcher = MicroBatcher(
            self._predict_rows,
            max_batch=limits.max_batch,
            max_wait_ms=limits.max_wait_ms,
            max_queue=limits.max_queue,
        )
        self.decode_threads = decode_threads or min(4, cpu_cores())
        self._decode_pool: ThreadPoolExecutor | None = None
        self.responses: Counter[int] = Counter()
        self.started = time.time()
        self.in_flight = 0  # classify requests admitted and not yet answered (one event loop: no lock needed)
        self.rejected_in_flight = 0

    def _predict_rows(self, pixels: np.ndarray) -> list[tuple[np.ndarray, float | None]]:
        """(N, H, W, 3) -> per image (probabilities, unknown score or None): both outputs of one model run."""
        probs, scores = self.clf.predict(pixels)
        return list(zip(probs, [None] * len(probs) if scores is None else scores))

    @property
    def decode_pool(self) -> ThreadPoolExecutor:
        if self._decode_pool is None:  # created on first use, again after a shutdown
            self._decode_pool = ThreadPoolExecutor(self.decode_threads, thread_name_prefix="retrain-decode")
        return self._decode_pool

    async def aclose(self) -> None:
        await self.batcher.aclose()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False)
            self._decode_pool = None

    def model_info(self) -> dict:
        m = self.clf.manifest
        return {
            "file": self.clf.path.name,
            "labels": list(self.clf.labels),
            "backbone": m.get("backbone"),
            "input": m.get("input"),
            "preprocessing": m.get("preprocessing"),
            "output": m.get("output"),
            "kind": m.get("kind") or "single_label",
            "thresholds": None if self.clf.thresholds is None else [float(t) for t in self.clf.thresholds],
            "quantization": m.get("quantization") or "float32",
            "fine_tuned": m.get("fine_tuned"),
            "calibration": m.get("calibration"),
            "unknown": None
            if not self.clf.has_unknown
            else {
                **(m.get("unknown") or {}),
                "threshold": self.clf.unknown_threshold if np.isfinite(self.clf.unknown_threshold) else None,
            },
            "metrics": {
                k: v
                for k, v in (m.get("metrics") or {}).items()
                if k in ("test_accuracy", "test_count", "validation_accuracy")
            },
            "created": m.get("created"),
            "retrain_version": m.get("retrain_version"),
            "limits": asdict(self.limits),
        }

    def decode(self, data: bytes) -> np.ndarray:
        prep = self.clf.preprocessing
        return decode_image(
            data, self.clf.input_size, resample=prep.resample, max_pixels=self.limits.max_pixels
        )


def create_app(
    model: Classifier | str | os.PathLike,
    *,
    max_batch: int = Limits.max_batch,
    max_wait_ms: float = Limits.max_wait_ms,
    max_body_bytes: int = Limits.max_body_bytes,
    max_pixels: int = Limits.max_pixels,
    max_images: int = Limits.max_images,
    max_queue: int = Limits.max_queue,
    default_top_k: int = Limits.default_top_k,
    max_in_flight: int = Limits.max_in_flight,
    threads: int | None = None,
    decode_threads: int | None = None,
    unknown_threshold: float | None = None,
):
    """The ASGI app (Starlette) serving ``model``: a loaded :class:`Classifier` or a model path.

    ``threads``: ONNX Runtime threads when ``model`` is a path. The app's state is in
    ``app.state.service`` (``.batcher.stats()`` shows how requests were batched).
    """
    try:
        from starlette.applications import Starlette
        from starlette.routing import Route
    except ImportError:
        raise RetrainError(
            "serving needs Starlette and uvicorn, which retrain depends on; this installation "
            "lacks them: reinstall retrain (pip install --force-reinstall retrain)"
        ) from None

    limits = Limits(
        max_batch,
        max_wait_ms,
        max_body_bytes,
        max_pixels,
        max_images,
        max_queue,
        default_top_k,
        max_in_flight,
    )
    clf = model if isinstance(model, Classifier) else load(model, threads=threads)
    if unknown_threshold is not None and clf.has_unknown:  # as label_image --unknown_threshold
        clf.unknown_threshold = float(unknown_threshold)
    service = _Service(clf, limits, decode_threads)
    page = resources.files("retrain").joinpath("serve_static/index.html").read_bytes()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await service.aclose()

    routes = [
        Route("/", _handler(service, lambda request: _page(page)), methods=["GET", "HEAD"]),
        Route("/index.html", _handler(service, lambda request: _page(page)), methods=["GET", "HEAD"]),
        Route("/favicon.ico", _handler(service, lambda request: _empty()), methods=["GET"]),
        Route("/healthz", _handler(service, lambda request: _health(service)), methods=["GET", "HEAD"]),
        Route("/v1/model", _handler(service, lambda request: _json(service.model_info())), methods=["GET"]),
        Route("/v1/stats", _handler(service, lambda request: _stats(service)), methods=["GET"]),
        Route(
            "/v1/classify", _handler(service, lambda request: _classify(service, request)), methods=["POST"]
        ),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal_error},
    )
    app.state.service = service
    return app


def _handler(service: _Service, fn):
    """Wrap a route: HTTPError -> its JSON answer; every response is counted by status."""

    async def endpoint(request):
        try:
            response = fn(request)
            if asyncio.iscoroutine(response):
                response = await response
        except HTTPError as exc:
            response = _error(exc.status, exc.message, exc.headers)
        service.responses[response.status_code] += 1
        return response

    return endpoint


def _json(obj, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(obj, status_code=status, headers=headers)


def _error(status: int, message: str, headers: dict | None = None):
    return _json({"error": message}, status, headers)


# The page has everything inline; nothing may come from another origin.
_PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _page(page: bytes):
    from starlette.responses import Response

    return Response(
        page,
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff"},
    )


def _empty():
    from starlette.responses import Response

    return Response(status_code=204)


def _health(service: _Service):
    if not service.batcher.alive:
        return _error(503, "the batching worker stopped; restart the server")
    return _json(
        {"status": "ok", "model": service.clf.path.name, "uptime_s": round(time.time() - service.started, 1)}
    )


def _stats(service: _Service):
    return _json(
        {
            "batching": service.batcher.stats(),
            "requests": {
                "in_flight": service.in_flight,
                "max_in_flight": service.limits.max_in_flight,
                "rejected_in_flight": service.rejected_in_flight,
            },
            "responses": {str(k): v for k, v in sorted(service.responses.items())},
        }
    )


async def _not_found(request, exc):
    return _error(404, f"no route {request.url.path!r}; see GET /v1/model, POST /v1/classify, GET /healthz")


async def _not_allowed(request, exc):
    return _error(405, f"{request.method} is not allowed on {request.url.path!r}")


async def _internal_error(request, exc):
    return _error(500, f"internal error ({type(exc).__name__}); please report it")


# -- POST /v1/classify ----------------------------------------------------------------------------------
async def _classify(service: _Service, request):
    """Admit the request if fewer than ``max_in_flight`` are being served, else 503 before reading its body."""
    limit = service.limits.max_in_flight
    if service.in_flight >= limit:
        service.rejected_in_flight += 1
        raise HTTPError(
            503,
            f"server busy: {limit} requests are in progress (--max_in_flight); retry shortly",
            {"Retry-After": "1"},
        )
    service.in_flight += 1
    try:
        return await _classify_admitted(service, request)
    finally:
        service.in_flight -= 1


async def _classify_admitted(service: _Service, request):
    top_k = _top_k(request.query_params.get("top_k"), service)
    kind, files = await _read_images(service, request)
    # (name, bytes) -> pixels, decoded in the thread pool, all files at once.
    loop = asyncio.get_running_loop()
    decoded = await asyncio.gather(
        *(loop.run_in_executor(service.decode_pool, _decode_or_reason, service, data) for _, data in files)
    )
    bad = [(name, reason) for (name, _), (px, reason) in zip(files, decoded) if px is None]
    if bad:
        name, reason = bad[0]
        status = (
            413 if reason.startswith("too large") else 422
        )  # images.py: "too large: WxH pixels (limit ...)"
        what = f"file {name!r}" if name else "the request body"
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        hint = (
            f"send an image of at most {service.limits.max_pixels / 1e6:g} megapixels"
            if status == 413
            else "send a JPEG, PNG, WebP, GIF, BMP or TIFF image"
        )
        raise HTTPError(status, f"{what} cannot be classified: {reason}{more}; {hint}")
    rows = await asyncio.gather(*(service.batcher.submit(px) for px, _ in decoded))
    results = []
    for (name, _), (probs, unknown_score) in zip(files, rows):
        preds = service.clf.rank(probs, top_k, unknown_score)
        result = {"filename": name, "predictions": [{"label": p.label, "score": p.score} for p in preds]}
        if preds.unknown_score is not None:  # absent for a model made before the unknown score
            result.update(unknown_score=preds.unknown_score, unknown=preds.unknown)
        if preds.labels is not None:  # a multi-label model: the labels at or above their threshold
            result["labels"] = preds.labels
        results.append(result)
    return _json({"results": results})


def _decode_or_reason(service: _Service, data: bytes) -> tuple[np.ndarray | None, str]:
    try:
        return service.decode(data), ""
    except ImageError as exc:
        return None, exc.reason


def _top_k(value: str | None, service: _Service) -> int:
    if value is None:
        return min(service.limits.default_top_k, len(service.clf.labels))
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise HTTPError(400, f"top_k must be a whole number of at least 1, got {value!r}")
    return min(k, len(service.clf.labels))


async def _read_images(service: _Service, request) -> tuple[str, list[tuple[str | None, bytes]]]:
    ctype = request.headers.get("content-type", "")
    media = ctype.split(";", 1)[0].strip().lower()
    if media.startswith("image/") or media in _RAW_TYPES:
        body = await _read_body(service, request)
        return "raw", [(None, body)]
    if media == "multipart/form-data":
        body = await _read_body(service, request)
        return "multipart", await _parse_multipart(service, request, body)
    shown = repr(ctype) if ctype else "none"
    raise HTTPError(
        415,
        f"unsupported Content-Type {shown}: send the image as the body with Content-Type image/jpeg (or "
        "another image/* type), or as files in a multipart/form-data form",
    )


async def _read_body(service: _Service, request) -> bytes:
    limit = service.limits.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = (
        f"request body is larger than the limit of {limit} bytes; send smaller images or fewer per request"
    )
    if declared is not None:
        try:
            if int(declared) > limit:
                raise HTTPError(413, too_big)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length header {declared!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds bodies sent without Content-Length
        size += len(chunk)
        if size > limit:
            raise HTTPError(413, too_big)
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise HTTPError(
            400, "empty request body: send the image bytes (or a multipart form with image files)"
        )
    return body


async def _parse_multipart(service: _Service, request, body: bytes) -> list[tuple[str | None, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    async def replay():
        yield body

    max_images = service.limits.max_images
    parser = MultiPartParser(
        request.headers, replay(), max_files=max_images, max_fields=32, max_part_size=64 * 1024
    )
    try:
        form = await parser.parse()
    except Exception as exc:  # noqa: BLE001 - MultiPartException, python-multipart's own errors, bad headers
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        if "maximum number of files" in message.lower():
            raise HTTPError(
                413, f"too many files in one request (limit {max_images}); split them over requests"
            ) from None
        raise HTTPError(
            400,
            f"malformed multipart/form-data body ({message}); send files as a browser form "
            "or `curl -F file=@photo.jpg` does",
        ) from None
    try:
        files: list[tuple[str | None, bytes]] = []
        for _, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename, await value.read()))
    finally:
        await form.close()
    if not files:
        raise HTTPError(
            400, "the multipart form has no files; attach images as file fields (curl -F file=@photo.jpg)"
        )
    empty = [name for name, data in files if not data]
    if empty:
        raise HTTPError(400, f"file {empty[0]!r} is empty (0 bytes)")
    return files


# -- running it -------------------------------------------------------------------------------------------
def bind_socket(host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> socket.socket:
    """A listening socket, or a RetrainError that says which address is taken or wrong."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise RetrainError(
            f"--host {host!r} cannot be resolved ({exc.strerror}); use e.g. 127.0.0.1 or 0.0.0.0"
        ) from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RetrainError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); another server may be using the port: "
            "pass another --port (0 picks a free one)"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(
    model: Classifier | str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    log_level: str = "info",
    ready: Callable[[str], None] | None = None,
    **app_options,
) -> None:
    """Run the service until interrupted. ``app_options`` go to :func:`create_app`.

    ``ready(url)`` is called once the socket listens (the default prints the address).
    """
    try:
        import uvicorn
    except ImportError:
        raise RetrainError(
            "serving needs Starlette and uvicorn, which retrain depends on; this installation "
            "lacks them: reinstall retrain (pip install --force-reinstall retrain)"
        ) from None
    app = create_app(model, **app_options)
    if app.state.service.clf.unknown_note:
        print(f"note: {app.state.service.clf.unknown_note}", flush=True)
    sock = bind_socket(host, port)
    bound = sock.getsockname()
    shown_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    url = f"http://{shown_host}:{bound[1]}/"
    config = uvicorn.Config(
        app, log_level=log_level, access_log=log_level == "debug", timeout_keep_alive=5, server_header=False
    )
    server = uvicorn.Server(config)
    (ready or (lambda u: print(f"Serving {app.state.service.clf.path} at {u} (Ctrl+C to stop)", flush=True)))(
        url
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()

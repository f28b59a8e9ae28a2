"""retrain serve: the HTTP API on a real model trained on the sample photos (Starlette TestClient, httpx)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from retrain.errors import RetrainError
from retrain.serve import HTTPError, MicroBatcher, bind_socket, create_app
from trained_models import running_server, sample_model, sample_photo

LABELS = ["animals", "fish", "landmarks", "tools"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return sample_model(tmp_path_factory)


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model.output_graph)) as c:
        yield c


def _jpeg(label: str, index: int = 0) -> bytes:
    return sample_photo(label, index).read_bytes()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def _error(response: httpx.Response, status: int, match: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert match.lower() in body["error"].lower(), body["error"]
    return body["error"]


# -- the happy paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("label", LABELS)
def test_raw_body_gives_ranked_labels(client, label):
    r = client.post("/v1/classify", content=_jpeg(label), headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    preds = result["predictions"]
    assert result["filename"] is None
    assert preds[0]["label"] == label
    assert [p["label"] for p in preds] != [] and sorted(
        p["label"] for p in preds
    ) == LABELS  # top_k 5 > 4 labels
    scores = [p["score"] for p in preds]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_octet_stream_and_webp_png_bodies(client):
    img = Image.open(io.BytesIO(_jpeg("fish")))
    for fmt, ctype in (("WEBP", "image/webp"), ("PNG", "application/octet-stream")):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        r = client.post("/v1/classify", content=buf.getvalue(), headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["predictions"][0]["label"] == "fish"


def test_multipart_several_images_in_order_with_top_k(client):
    files = [
        ("file", (f"{label}.jpg", _jpeg(label, 1), "image/jpeg"))
        for label in ("tools", "animals", "landmarks")
    ]
    files.append(("other", ("ünïcode fish.jpg", _jpeg("fish", 1), "application/octet-stream")))
    r = client.post("/v1/classify?top_k=2", files=files, data={"note": "form fields are ignored"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [
        "tools.jpg",
        "animals.jpg",
        "landmarks.jpg",
        "ünïcode fish.jpg",
    ]
    assert [x["predictions"][0]["label"] for x in results] == ["tools", "animals", "landmarks", "fish"]
    assert all(len(x["predictions"]) == 2 for x in results)


def test_same_scores_as_the_python_api(client, model):
    import retrain

    expected = retrain.load(model.output_graph).classify(str(sample_photo("landmarks", 2)), top_k=3)[0]
    r = client.post(
        "/v1/classify?top_k=3", content=_jpeg("landmarks", 2), headers={"Content-Type": "image/jpeg"}
    )
    got = r.json()["results"][0]["predictions"]
    assert [p["label"] for p in got] == [p.label for p in expected]
    assert np.allclose([p["score"] for p in got], [p.score for p in expected], atol=1e-6)


def test_model_info(client, model):
    info = client.get("/v1/model").json()
    manifest = json.loads(json.dumps(__import__("retrain").load(model.output_graph).manifest))
    assert info["labels"] == LABELS
    assert info["backbone"]["name"] == "efficientnet_lite0"
    assert info["input"] == manifest["input"] and info["input"]["height"] == 224
    assert info["preprocessing"]["mean"] == [127.0, 127.0, 127.0]
    assert info["quantization"] == "float32"
    assert info["kind"] == "single_label" and info["thresholds"] is None  # a multi-label model has both
    assert info["limits"]["max_batch"] == 16


def test_healthz_and_stats_count_exactly_this_apps_requests(model):
    # Its own app, so the counts cannot come from other tests' requests (in any order, or alone).
    with TestClient(create_app(model.output_graph, max_wait_ms=0)) as c:
        fresh = c.get("/v1/stats").json()
        assert fresh["batching"]["images"] == fresh["batching"]["batches"] == 0 and fresh["responses"] == {}
        assert c.get("/healthz").json()["status"] == "ok"
        for label in ("fish", "tools", "animals"):
            assert (
                c.post(
                    "/v1/classify", content=_jpeg(label), headers={"Content-Type": "image/jpeg"}
                ).status_code
                == 200
            )
        files = [("file", (f"{label}.jpg", _jpeg(label, 1), "image/jpeg")) for label in ("fish", "tools")]
        assert c.post("/v1/classify", files=files).status_code == 200
        assert (
            c.post("/v1/classify", content=b"nope", headers={"Content-Type": "image/jpeg"}).status_code == 422
        )
        stats = c.get("/v1/stats").json()
    assert (
        stats["batching"]["images"] == 5
    )  # 3 single images + a form of 2; the bad one never reaches the model
    assert stats["batching"]["batches"] in (4, 5) and stats["batching"]["rejected_busy"] == 0
    assert stats["responses"] == {"200": 6, "422": 1}  # stats, healthz and 4 classify requests; the bad one
    assert stats["requests"] == {"in_flight": 0, "max_in_flight": 16, "rejected_in_flight": 0}


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert 'type="file"' in html and "v1/classify" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html  # nothing from elsewhere
    assert "default-src 'none'" in r.headers["content-security-policy"]


# -- bad requests: always a 4xx JSON error, never a 500 ---------------------------------------------------------
def test_not_an_image(client):
    _error(
        client.post("/v1/classify", content=b"hello world", headers={"Content-Type": "image/jpeg"}),
        422,
        "not an image",
    )


def test_truncated_jpeg(client):
    data = _jpeg("fish")
    _error(
        client.post("/v1/classify", content=data[: len(data) // 3], headers={"Content-Type": "image/jpeg"}),
        422,
        "cannot be classified",
    )


@pytest.mark.parametrize(
    "ctype", ["text/plain", "application/json", "application/x-www-form-urlencoded", None]
)
def test_wrong_content_type(client, ctype):
    headers = {"Content-Type": ctype} if ctype else {}
    content = _jpeg("fish")
    request = client.build_request("POST", "/v1/classify", content=content, headers=headers)
    if ctype is None:
        request.headers.pop("Content-Type", None)
    _error(client.send(request), 415, "Content-Type")


def test_empty_body(client):
    _error(client.post("/v1/classify", content=b"", headers={"Content-Type": "image/png"}), 400, "empty")


@pytest.mark.parametrize("top_k", ["0", "-3", "two", "1.5", ""])
def test_bad_top_k(client, top_k):
    _error(
        client.post(
            f"/v1/classify?top_k={top_k}", content=_jpeg("fish"), headers={"Content-Type": "image/jpeg"}
        ),
        400,
        "top_k",
    )


def test_malformed_multipart(client):
    _error(
        client.post(
            "/v1/classify", content=b"--x\r\nnot really", headers={"Content-Type": "multipart/form-data"}
        ),
        400,
        "malformed multipart",
    )
    _error(
        client.post(
            "/v1/classify",
            content=b"\x00\x01garbage",
            headers={"Content-Type": "multipart/form-data; boundary=zz"},
        ),
        400,
        "multipart",
    )


def test_multipart_without_files_or_with_an_empty_file(client):
    body = b'--zz\r\nContent-Disposition: form-data; name="a"\r\n\r\nhello\r\n--zz--\r\n'
    _error(
        client.post(
            "/v1/classify", content=body, headers={"Content-Type": "multipart/form-data; boundary=zz"}
        ),
        400,
        "no files",
    )
    _error(client.post("/v1/classify", files=[("file", ("empty.jpg", b"", "image/jpeg"))]), 400, "empty")


def test_one_bad_file_among_good_ones_names_it(client):
    files = [
        ("file", ("good.jpg", _jpeg("fish"), "image/jpeg")),
        ("file", ("notes.txt", b"just text", "text/plain")),
    ]
    message = _error(client.post("/v1/classify", files=files), 422, "notes.txt")
    assert "not an image" in message


def test_unknown_route_and_method(client):
    _error(client.get("/v2/classify"), 404, "no route")
    _error(client.get("/v1/classify"), 405, "not allowed")


@pytest.fixture(scope="module")
def strict_client(model):
    app = create_app(model.output_graph, max_body_bytes=50_000, max_pixels=100_000, max_images=2)
    with TestClient(app) as c:
        yield c


def test_body_too_large(strict_client):
    big = _png(700, 700) + b"\0" * 60_000
    _error(
        strict_client.post("/v1/classify", content=big, headers={"Content-Type": "image/png"}), 413, "larger"
    )

    def chunks():  # no Content-Length: the limit holds while streaming
        for _ in range(20):
            yield b"\xff" * 4096

    _error(
        strict_client.post("/v1/classify", content=chunks(), headers={"Content-Type": "image/jpeg"}),
        413,
        "larger",
    )


def test_too_many_pixels(strict_client):
    data = _png(400, 400)  # 160,000 pixels, a small file
    assert len(data) < 50_000
    _error(
        strict_client.post("/v1/classify", content=data, headers={"Content-Type": "image/png"}), 413, "pixels"
    )


def test_too_many_files(strict_client):
    files = [("file", (f"{i}.png", _png(20, 20), "image/png")) for i in range(3)]
    _error(strict_client.post("/v1/classify", files=files), 413, "too many files")


def test_app_can_be_started_again(model):
    app = create_app(model.output_graph)
    for _ in range(
        2
    ):  # each `with` runs the lifespan in a new event loop; shutdown must not break the next one
        with TestClient(app) as c:
            r = c.post("/v1/classify", content=_jpeg("animals"), headers={"Content-Type": "image/jpeg"})
            assert r.status_code == 200 and r.json()["results"][0]["predictions"][0]["label"] == "animals"


def test_bad_limits_are_refused(model):
    with pytest.raises(RetrainError, match="max_batch must be a positive whole number, got 0"):
        create_app(model.output_graph, max_batch=0)
    with pytest.raises(RetrainError, match="max_wait_ms"):
        create_app(model.output_graph, max_wait_ms=-1)


# -- batching ---------------------------------------------------------------------------------------------
def test_concurrent_requests_are_batched(model):
    app = create_app(model.output_graph, max_batch=8, max_wait_ms=250)
    photos = [(label, _jpeg(label, i)) for i in range(3) for label in LABELS]  # 12 requests

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            responses = await asyncio.gather(
                *(
                    c.post("/v1/classify?top_k=1", content=data, headers={"Content-Type": "image/jpeg"})
                    for _, data in photos
                )
            )
            stats = (await c.get("/v1/stats")).json()["batching"]
        await app.state.service.aclose()
        return responses, stats

    responses, stats = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * len(photos)
    assert [r.json()["results"][0]["predictions"][0]["label"] for r in responses] == [
        label for label, _ in photos
    ]
    assert stats["images"] == len(photos)
    assert stats["largest_batch"] > 1 and stats["batches"] < len(photos), stats
    assert stats["largest_batch"] <= 8


def test_batcher_splits_at_max_batch_and_keeps_order():
    seen: list[int] = []

    def predict(x):  # (N, 2, 2, 3) -> (N, 1): each row answers with its own input value
        seen.append(len(x))
        return x[:, 0, 0, :1].astype(np.float32)

    async def go():
        b = MicroBatcher(predict, max_batch=4, max_wait_ms=50)
        rows = await asyncio.gather(*(b.submit(np.full((2, 2, 3), i, np.uint8)) for i in range(10)))
        await b.aclose()
        return rows, b.stats()

    rows, stats = asyncio.run(go())
    assert [int(r[0]) for r in rows] == list(range(10))
    assert max(seen) == 4 and sum(seen) == 10 and stats["batches"] == len(seen) == 3


def test_batcher_passes_errors_on_and_keeps_running():
    calls = []

    def predict(x):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(x), 1), np.float32)

    async def go():
        b = MicroBatcher(predict, max_batch=4, max_wait_ms=20)
        first = await asyncio.gather(
            *(b.submit(np.zeros((1, 1, 3), np.uint8)) for _ in range(2)), return_exceptions=True
        )
        second = await b.submit(np.zeros((1, 1, 3), np.uint8))
        await b.aclose()
        return first, second

    first, second = asyncio.run(go())
    assert all(isinstance(e, RuntimeError) for e in first)
    assert second.shape == (1,)


def test_batcher_answers_busy_when_the_queue_is_full():
    async def go():
        b = MicroBatcher(lambda x: np.zeros((len(x), 1), np.float32), max_batch=1, max_wait_ms=0, max_queue=2)
        b._ensure_worker()
        # Occupy the worker: fill the queue faster than it can drain, without yielding to it.
        pending = [asyncio.ensure_future(b.submit(np.zeros((1, 1, 3), np.uint8))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(HTTPError) as info:
            await b.submit(np.zeros((1, 1, 3), np.uint8))
        await asyncio.gather(*pending)
        await b.aclose()
        return info.value

    err = asyncio.run(go())
    assert err.status == 503 and err.headers == {"Retry-After": "1"}


# -- the real server -----------------------------------------------------------------------------------------
def test_cli_server_over_a_real_socket(model):
    with running_server(model.output_graph, "--max_batch", "4") as url:
        ok = httpx.post(f"{url}/v1/classify", content=_jpeg("tools"), headers={"Content-Type": "image/jpeg"})
        assert ok.json()["results"][0]["predictions"][0]["label"] == "tools"
        bad = httpx.post(
            f"{url}/v1/classify", content=b"GIF89a broken", headers={"Content-Type": "image/gif"}
        )
        assert bad.status_code == 422 and "error" in bad.json()
        assert httpx.get(f"{url}/v1/model").json()["limits"]["max_batch"] == 4
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_port_in_use_is_a_clear_error():
    with bind_socket("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(RetrainError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
            bind_socket("127.0.0.1", port)


def test_serve_command_errors(tmp_path, capsys):
    from retrain.cli import retrain_main

    assert retrain_main(["serve", "--graph", str(tmp_path / "missing.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_and_label_image_agree_without_graph(tmp_path, monkeypatch, capsys, model):
    """Both fall back to retrain_runs/latest, and both say the same when there is none."""
    import retrain.serve
    from retrain.cli import label_image_main, retrain_main

    monkeypatch.chdir(tmp_path)
    assert retrain_main(["serve"]) == 2
    serve_err = capsys.readouterr().err
    assert label_image_main(["--image", str(sample_photo("fish"))]) == 2
    assert capsys.readouterr().err == serve_err and "retrain_runs/latest/output_graph.onnx" in serve_err

    latest = tmp_path / "retrain_runs" / "latest"
    latest.mkdir(parents=True)
    (latest / "output_graph.onnx").write_bytes(model.output_graph.read_bytes())
    served = {}
    monkeypatch.setattr(retrain.serve, "serve", lambda graph, **kw: served.update(graph=graph, **kw))
    assert retrain_main(["serve", "--port", "0", "--max_in_flight", "3"]) == 0
    assert served["graph"] == str(Path("retrain_runs") / "latest" / "output_graph.onnx")
    assert served["max_in_flight"] == 3 and served["port"] == 0
    assert label_image_main(["--image", str(sample_photo("fish"))]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("fish ")


def test_serve_and_export_are_library_code_without_argparse():
    """Every parser lives in cli.py; serve.py and convert.py import neither argparse nor the CLI."""
    import ast

    import retrain.cli
    import retrain.convert
    import retrain.serve

    for module in (retrain.serve, retrain.convert):
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not imported & {"argparse", "retrain.cli"}, (module.__name__, imported)
        assert not hasattr(module, "main") and not hasattr(module, "_parser")
    for name in ("training_parser", "serve_parser", "export_parser", "label_image_parser"):
        assert getattr(retrain.cli, name)().prog.startswith(("retrain", "label_image"))


# -- Python 3.10's asyncio.TimeoutError ---------------------------------------------------------------------
def test_batcher_survives_asyncio_timeout_error_that_is_not_the_builtin(monkeypatch):
    """On Python 3.10 asyncio.wait_for raises asyncio.TimeoutError, a class apart from the built-in TimeoutError:
    the batcher must treat it as "the batch did not fill", not die (the request then hung forever)."""

    class AsyncioTimeoutError(Exception):  # Python 3.10's asyncio.exceptions.TimeoutError(Exception)
        pass

    real_wait_for = asyncio.wait_for

    async def wait_for_310(aw, timeout):
        try:
            return await real_wait_for(aw, timeout)
        except TimeoutError:
            raise AsyncioTimeoutError from None

    monkeypatch.setattr(asyncio, "TimeoutError", AsyncioTimeoutError)
    monkeypatch.setattr(asyncio, "wait_for", wait_for_310)

    async def go():
        b = MicroBatcher(lambda x: np.ones((len(x), 1), np.float32), max_batch=8, max_wait_ms=5)
        rows = [await asyncio.wait_for(b.submit(np.zeros((1, 1, 3), np.uint8)), 5) for _ in range(2)]
        alive = b.alive
        await b.aclose()
        return rows, alive

    rows, alive = asyncio.run(go())
    assert [r.tolist() for r in rows] == [[1.0], [1.0]] and alive


# -- requests in flight -------------------------------------------------------------------------------------
def test_requests_past_max_in_flight_get_503_with_retry_after(model):
    import threading

    from retrain.predict import load

    clf = load(model.output_graph)
    release, entered = threading.Event(), threading.Event()
    real = clf.predict  # what the server calls: probabilities and unknown scores in one run

    def slow_predict(x):  # holds the first requests in flight until the test lets them go
        entered.set()
        release.wait(30)
        return real(x)

    clf.predict = slow_predict
    app = create_app(clf, max_in_flight=2, max_wait_ms=0)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:

            def post():
                return c.post("/v1/classify", content=_jpeg("fish"), headers={"Content-Type": "image/jpeg"})

            held = [asyncio.ensure_future(post()) for _ in range(2)]
            while app.state.service.in_flight < 2:
                await asyncio.sleep(0.01)
            refused = await asyncio.gather(*(post() for _ in range(5)))
            during = (await c.get("/v1/stats")).json()["requests"]
            release.set()
            done = await asyncio.gather(*held)
            after = await post()  # a slot is free again
        await app.state.service.aclose()
        return refused, during, done, after

    refused, during, done, after = asyncio.run(go())
    for r in refused:
        _error(r, 503, "requests are in progress")
        assert r.headers["Retry-After"] == "1"
    assert during == {"in_flight": 2, "max_in_flight": 2, "rejected_in_flight": 5}
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200
    assert after.json()["results"][0]["predictions"][0]["label"] == "fish"
    with pytest.raises(RetrainError, match="max_in_flight must be a positive whole number, got 0"):
        create_app(clf, max_in_flight=0)

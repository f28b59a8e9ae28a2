"""`retrain ui`'s API with Starlette's TestClient on a tiny generated folder and the tiny test backbone."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, make_image_folder

TESTS = Path(__file__).resolve().parent
starlette_testclient = pytest.importorskip("starlette.testclient")


def _jpeg(colour=(200, 30, 30), size=40) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, "JPEG")
    return out.getvalue()


def _app(project: Path, **kwargs):
    from retrain.ui import create_ui_app

    defaults = dict(
        architecture=TINY,
        model_dir=str(project.parent / "models"),
        how_many_training_steps=60,
        eval_step_interval=20,
        seed=1,
    )
    env = {
        "RETRAIN_UI_PRELOAD": "conftest",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return create_ui_app(project, train_defaults=defaults, worker_env=env, **kwargs)


@pytest.fixture
def client(tmp_path):
    from starlette.testclient import TestClient

    app = _app(tmp_path / "project")
    with TestClient(app) as c:
        c.headers["X-CSRF-Token"] = app.state.ui.csrf
        c.app_state = app.state.ui
        yield c


def _wait(client, run, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"/api/runs/{run}/events").json()["status"]
        if status != "running":
            return status
        time.sleep(0.2)
    raise AssertionError(f"run {run} still running after {timeout} s")


def test_page_and_assets_are_small_and_local(client):
    page = client.get("/")
    assert page.status_code == 200 and client.app_state.csrf in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    total = len(page.content)
    for name in ("app.js", "app.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200
        total += len(r.content)
    assert total < 300_000
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside


def test_state_changes_need_the_page_token_and_same_origin(client):
    assert (
        client.post("/api/classes", json={"name": "x"}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    )
    r = client.post("/api/classes", json={"name": "x"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "another site" in r.json()["error"]
    r = client.post("/api/classes", json={"name": "x"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert (
        client.post("/api/classes", json={"name": "x"}, headers={"Origin": "http://testserver"}).status_code
        == 200
    )


def test_access_token_and_host_check(tmp_path):
    from starlette.testclient import TestClient

    app = _app(tmp_path / "p", access_token="s3cret", allowed_hosts=["testserver"])
    with TestClient(app) as c:
        assert c.get("/api/state").status_code == 401
        assert c.get("/?token=nope").status_code == 401
        assert c.get("/?token=s3cret").status_code == 200  # sets the cookie
        assert c.get("/api/state").status_code == 200
        r = c.get("/api/state", headers={"Host": "evil.example"})
        assert r.status_code == 403 and "Host" in r.json()["error"]


def test_create_class_upload_and_browse(client):
    assert client.post("/api/classes", json={"name": "red"}).json() == {"name": "red", "created": True}
    files = [("file", (f"r{i}.jpg", _jpeg(), "image/jpeg")) for i in range(3)]
    r = client.post("/api/classes/red/photos", files=files).json()
    assert r["saved"] == ["r0.jpg", "r1.jpg", "r2.jpg"] and r["rejected"] == []
    # the same name again is kept beside, never over
    r = client.post(
        "/api/classes/red/photos", files=[("file", ("r0.jpg", _jpeg((10, 10, 10)), "image/jpeg"))]
    ).json()
    assert r["saved"] == ["r0-2.jpg"]
    state = client.get("/api/state").json()
    assert state["classes"] == [{"name": "red", "count": 4}] and state["own_photos"]
    page = client.get("/api/images", params={"class": "red"}).json()
    assert page["total"] == 4 and page["images"][0] == "red/r0-2.jpg"
    thumb = client.get("/api/thumb", params={"path": "red/r0.jpg"})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] <= 160


def test_path_traversal_names_stay_inside_the_class(client, tmp_path):
    client.post("/api/classes", json={"name": "red"})
    names = ["../../x.jpg", "..\\..\\y.jpg", "/etc/z.jpg", ".hidden.jpg"]
    r = client.post(
        "/api/classes/red/photos", files=[("file", (n, _jpeg(), "image/jpeg")) for n in names]
    ).json()
    assert sorted(r["saved"]) == ["hidden.jpg", "x.jpg", "y.jpg", "z.jpg"]
    folder = client.app_state.project.photos / "red"
    assert sorted(os.listdir(folder)) == ["hidden.jpg", "x.jpg", "y.jpg", "z.jpg"]
    assert not (tmp_path / "x.jpg").exists() and not (client.app_state.project.root / "x.jpg").exists()
    for bad in ("../../etc/passwd", "red/../../ui.json", "/etc/passwd", ""):
        assert client.get("/api/thumb", params={"path": bad}).status_code == 400
    assert client.get("/api/runs/..%2F..%2Fetc/files/passwd").status_code in (400, 404)
    assert client.post("/api/classes", json={"name": "../evil"}).status_code == 400
    assert client.post(
        "/api/classes/..%2Fevil/photos", files=[("file", ("a.jpg", _jpeg(), "image/jpeg"))]
    ).status_code in (400, 404)


def test_non_image_and_oversize_uploads(tmp_path):
    from starlette.testclient import TestClient

    app = _app(tmp_path / "p", max_upload_bytes=100_000)
    with TestClient(app) as c:
        c.headers["X-CSRF-Token"] = app.state.ui.csrf
        c.post("/api/classes", json={"name": "red"})
        r = c.post(
            "/api/classes/red/photos",
            files=[
                ("file", ("notes.jpg", b"hello, not a photo", "image/jpeg")),
                ("file", ("empty.png", b"", "image/png")),
            ],
        ).json()
        assert r["saved"] == [] and [x["file"] for x in r["rejected"]] == ["notes.jpg", "empty.png"]
        assert "not an image" in r["rejected"][0]["reason"]
        big = os.urandom(200_000)
        r = c.post("/api/classes/red/photos", files=[("file", ("big.jpg", big, "image/jpeg"))])
        assert r.status_code == 413 and "limit" in r.json()["error"]
        assert os.listdir(app.state.ui.project.photos / "red") == []


def _post_stream(app, path: str, headers: list[tuple[bytes, bytes]], total: int, chunk: int = 2**20):
    """POST ``total`` bytes to the ASGI app as the server would hand them over, ``chunk`` at a time, without
    ever holding them: returns (status, JSON body, bytes the app asked for)."""
    import asyncio

    asked = 0

    async def receive():
        nonlocal asked
        n = min(chunk, total - asked)
        asked += n
        return {"type": "http.request", "body": b"\0" * n, "more_body": asked < total}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8765"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8765),
    }
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), asked


def test_a_1_gb_upload_is_refused_early_and_never_held(tmp_path):
    """By its Content-Length before a byte is read; sent without one (chunked), as soon as the bytes read pass
    the cap: the app never asks for the rest of the gigabyte."""
    from retrain.ui import MAX_UPLOAD_BYTES

    app = _app(tmp_path / "p")
    state = app.state.ui
    (state.project.photos / "red").mkdir()
    gb = 2**30
    common = [
        (b"x-csrf-token", state.csrf.encode()),
        (b"content-type", b"multipart/form-data; boundary=xyz"),
    ]
    status, body, asked = _post_stream(
        app, "/api/classes/red/photos", [*common, (b"content-length", str(gb).encode())], gb
    )
    assert status == 413 and asked == 0
    assert "1024 MB is over the limit of 64 MB" in body["error"]
    status, body, asked = _post_stream(
        app, "/api/classes/red/photos", [*common, (b"transfer-encoding", b"chunked")], gb
    )
    assert status == 413 and "over the limit of 64 MB" in body["error"]
    assert MAX_UPLOAD_BYTES < asked <= MAX_UPLOAD_BYTES + 2**20  # one chunk past the cap, not 1 GB
    # the same for a photo sent to Try (25 MB at most); nothing was written anywhere
    run = state.project.runs / "20260101-000000"
    run.mkdir()
    (run / "output_graph.onnx").write_bytes(b"")
    status, body, asked = _post_stream(
        app, f"/api/runs/{run.name}/classify", [*common, (b"content-length", str(gb).encode())], gb
    )
    assert status == 413 and asked == 0 and "over the limit of 25 MB" in body["error"]
    assert os.listdir(state.project.photos / "red") == [] and os.listdir(run) == ["output_graph.onnx"]


def test_html_in_class_names_is_kept_as_text(client):
    name = '<img src=x onerror="alert(1)">'
    assert client.post("/api/classes", json={"name": name}).status_code == 200
    assert client.get("/api/state").json()["classes"][0]["name"] == name  # JSON, shown with textContent
    js = client.get("/static/app.js").text
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js


def test_a_user_folder_is_only_read(client, tmp_path):
    photos = make_image_folder(tmp_path / "mine", per_class=3)
    (photos / "red" / "broken.jpg").write_bytes(b"not a jpeg")
    before = sorted(str(p) for p in photos.rglob("*"))
    assert client.post("/api/source", json={"image_dir": str(photos)}).status_code == 200
    check = client.get("/api/check").json()
    assert {c["name"]: c["count"] for c in check["classes"]} == {"blue": 3, "green": 3, "red": 3}
    assert check["skipped"] == [
        {"path": "red/broken.jpg", "reason": "not a readable image (UnidentifiedImageError)"}
    ]
    r = client.post("/api/classes", json={"name": "new"})
    assert r.status_code == 409 and "never writes" in r.json()["error"]
    assert sorted(str(p) for p in photos.rglob("*")) == before
    assert client.post("/api/source", json={"image_dir": "relative/path"}).status_code == 400
    assert client.post("/api/source", json={"image_dir": str(tmp_path / "nope")}).status_code == 400


def test_train_follow_classify_download(client, tmp_path):
    photos = make_image_folder(tmp_path / "mine", per_class=10)
    client.post("/api/source", json={"image_dir": str(photos)})
    # final_fit "train" makes the step count exact; by default the cross-fit chooses it (and on these
    # well separated colours stops at its first checkpoint).
    settings = {"how_many_training_steps": 60, "final_fit": "train"}
    run = client.post("/api/train", json={"settings": settings}).json()["run"]
    assert _wait(client, run) == "finished", (client.app_state.project.runs / run / "worker.log").read_text()
    events = client.get(f"/api/runs/{run}/events").json()["events"]
    kinds = {e["kind"] for e in events}
    assert {"phase", "extract", "step", "log", "done"} <= kinds
    assert [e["step"] for e in events if e["kind"] == "step"] == [20, 40, 60]
    info = client.get(f"/api/runs/{run}").json()
    assert info["status"] == "finished" and info["metrics"]["test_accuracy"] is not None
    c = info["confusion"]
    assert c["labels"] == ["blue", "green", "red"]
    assert sum(map(sum, c["matrix"])) == info["metrics"]["test_count"]
    some = next(iter(c["cells"].values()))[0]
    assert client.get("/api/thumb", params={"path": some, "run": run}).status_code == 200
    r = client.post(
        f"/api/runs/{run}/classify",
        files=[("file", ("x.jpg", (photos / "red" / "img_000.jpg").read_bytes(), "image/jpeg"))],
    ).json()
    assert r["predictions"][0]["label"] == "red" and len(r["predictions"]) == 3
    bad = client.post(f"/api/runs/{run}/classify", files=[("file", ("x.jpg", b"nope", "image/jpeg"))])
    assert bad.status_code == 422 and "cannot be classified" in bad.json()["error"]
    model = client.get(f"/api/runs/{run}/files/output_graph.onnx")
    assert model.status_code == 200 and "attachment" in model.headers["content-disposition"]
    assert client.get(f"/api/runs/{run}/files/ui_run.json").status_code == 404
    from retrain.predict import load

    path = tmp_path / "downloaded.onnx"
    path.write_bytes(model.content)
    assert load(path).classify(str(photos / "green" / "img_001.jpg"))[0][0].label == "green"


def test_bad_settings_and_too_few_photos(client):
    r = client.post("/api/train", json={"settings": {"how_many_training_steps": 10}})
    assert r.status_code == 400 and "cannot train yet" in r.json()["error"]
    r = client.post("/api/train", json={"settings": {"rm_rf": 1}})
    assert r.status_code == 400 and "unknown setting" in r.json()["error"]
    r = client.post("/api/train", json={"settings": {"learning_rate": "fast"}})
    assert r.status_code == 400 and "learning_rate" in r.json()["error"]


def test_two_trainings_at_once_and_cancel_then_resume(client, tmp_path):
    photos = make_image_folder(tmp_path / "mine", per_class=10)
    client.post("/api/source", json={"image_dir": str(photos)})
    slow = {
        "how_many_training_steps": 400000,
        "eval_step_interval": 1000,
        "final_fit": "train",
    }  # exact steps
    run = client.post("/api/train", json={"settings": slow}).json()["run"]
    second = client.post("/api/train", json={"settings": slow})  # e.g. from another tab
    assert second.status_code == 409 and "already running" in second.json()["error"]
    assert client.get("/api/state").json()["training"] == run
    run_dir = client.app_state.project.runs / run
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoint.npz").exists():  # the head is being trained
        assert time.monotonic() < deadline, (run_dir / "worker.log").read_text()
        time.sleep(0.2)
    assert client.post("/api/train/cancel").json() == {"cancelled": run}
    info = client.get(f"/api/runs/{run}").json()
    assert info["status"] == "cancelled" and info["resumable"]
    assert client.get("/api/state").json()["training"] is None
    # resume: the same run continues from its checkpoint (settings shortened here so the test ends)
    saved = json.loads((run_dir / "ui_run.json").read_text())
    saved["settings"]["how_many_training_steps"] = 2000
    (run_dir / "ui_run.json").write_text(json.dumps(saved))
    assert client.post("/api/train", json={"resume": run}).json() == {"run": run}
    assert _wait(client, run) == "finished", (run_dir / "worker.log").read_text()
    logs = [
        e["message"] for e in client.get(f"/api/runs/{run}/events").json()["events"] if e["kind"] == "log"
    ]
    assert any("continuing from step" in m for m in logs)


def test_a_killed_worker_shows_as_interrupted(client, tmp_path):
    """The server killed mid-training kills its worker (PR_SET_PDEATHSIG); the next start sees the run."""
    import signal

    photos = make_image_folder(tmp_path / "mine", per_class=10)
    client.post("/api/source", json={"image_dir": str(photos)})
    run = client.post(
        "/api/train",
        json={
            "settings": {"how_many_training_steps": 400000, "eval_step_interval": 1000, "final_fit": "train"}
        },
    ).json()["run"]
    run_dir = client.app_state.project.runs / run
    deadline = time.monotonic() + 60
    while not (run_dir / "checkpoint.npz").exists():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    pid = json.loads((run_dir / "ui_run.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # as if the machine lost power: nothing could be written
    client.app_state.jobs.proc.wait(10)
    from starlette.testclient import TestClient

    fresh = _app(client.app_state.project.root)  # the next start of the app on this project
    with TestClient(fresh) as c2:
        state = c2.get("/api/state").json()
        assert state["training"] is None
        (summary,) = state["runs"]
        assert summary["id"] == run and summary["status"] == "interrupted" and summary["resumable"]


def _start_cli(project: Path, photos: Path, env: dict):
    """`retrain ui` as a user starts it; returns (process, url, seconds until the page answered)."""
    import re
    import subprocess
    import sys
    import urllib.request

    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "retrain",
            "ui",
            "--project",
            str(project),
            "--image_dir",
            str(photos),
            "--port",
            "0",
            "--no_browser",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    url = None
    for line in proc.stdout:
        m = re.search(r"Open (http://\S+/)", line)
        if m:
            url = m[1]
            break
    assert url, "no URL printed"
    page = urllib.request.urlopen(url, timeout=10).read().decode()
    return proc, url, time.monotonic() - t0, re.search(r'name="csrf-token" content="([^"]+)"', page)[1]


def _call(url: str, path: str, csrf: str, body: dict | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-CSRF-Token": csrf, "Content-Type": "application/json", "Origin": url.rstrip("/")},
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_cli_start_up_kill_mid_training_and_resume(tmp_path):
    """`retrain ui` starts and answers; killed mid-training, its worker stops too, and the next start resumes.

    (How fast it starts is measured by benchmarks/ui_bench.py, not here: a timed test fails on a busy machine.)"""
    import signal

    photos = make_image_folder(tmp_path / "mine", per_class=10)
    before = sorted(p.relative_to(tmp_path) for p in photos.rglob("*"))
    project = tmp_path / "project"
    env = {
        **os.environ,
        "RETRAIN_UI_PRELOAD": "conftest",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc, url, seconds, csrf = _start_cli(project, photos, env)
    try:
        assert url.startswith("http://127.0.0.1:")
        run = _call(
            url,
            "/api/train",
            csrf,
            {
                "settings": {
                    "architecture": TINY,
                    "how_many_training_steps": 400000,
                    "final_fit": "train",  # exactly that many steps: the cross-fit would stop far sooner
                    "eval_step_interval": 1000,
                }
            },
        )["run"]
        run_dir = project / "runs" / run
        deadline = time.monotonic() + 180  # a loaded 2-core machine starts a worker slowly
        while not (run_dir / "checkpoint.npz").exists():
            assert time.monotonic() < deadline, (run_dir / "worker.log").read_text()
            time.sleep(0.2)
        worker = json.loads((run_dir / "ui_run.json").read_text())["pid"]
        events_before = (run_dir / "events.jsonl").read_bytes()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 15
    while Path(f"/proc/{worker}").exists() and b"retrain.ui" in Path(f"/proc/{worker}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the worker outlived the killed server"
        time.sleep(0.2)
    saved = json.loads((run_dir / "ui_run.json").read_text())
    saved["settings"]["how_many_training_steps"] = 2000  # so that the resumed run ends soon
    (run_dir / "ui_run.json").write_text(json.dumps(saved))
    proc, url, _, csrf = _start_cli(project, photos, env)
    try:
        (summary,) = _call(url, "/api/state", csrf)["runs"]
        assert summary["status"] == "interrupted" and summary["resumable"]
        assert _call(url, "/api/train", csrf, {"resume": run}) == {"run": run}
        deadline = time.monotonic() + 120
        while (status := _call(url, f"/api/runs/{run}", csrf)["status"]) == "running":
            assert time.monotonic() < deadline
            time.sleep(0.3)
        assert status == "finished", (run_dir / "worker.log").read_text()
        assert (run_dir / "output_graph.onnx").exists()
        # nothing lost: the progress before the kill is still there, the photos are as they were, and
        # nothing was written outside the project
        assert (run_dir / "events.jsonl").read_bytes().startswith(events_before)
        assert sorted(p.relative_to(tmp_path) for p in photos.rglob("*")) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "project"]
    finally:
        proc.terminate()
        proc.wait(10)


def _run_with_issues(client, photos: Path) -> tuple[str, Path]:
    """A finished run folder whose audit (the report's label_issues.csv / duplicates.csv format) names two photos."""
    run_dir = client.app_state.project.runs / "20260101-000000"
    run_dir.mkdir()
    (run_dir / "ui_run.json").write_text(
        json.dumps({"status": "finished", "image_dir": str(photos), "settings": {}})
    )
    (run_dir / "metrics.json").write_text(json.dumps({"test_accuracy": 0.9}))
    red0, red1 = photos / "red" / "img_000.jpg", photos / "red" / "img_001.jpg"
    (run_dir / "label_issues.csv").write_text(
        "path,given_label,suggested_label,score,rank,split,action\n"
        f"{red0},red,green,0.9,1,training,\n{red1},red,blue,0.5,2,training,\n"
    )
    (run_dir / "duplicates.csv").write_text(
        "path_a,path_b,kind,similarity,label_a,label_b,split_a,split_b\n"
        f"{red1},{photos / 'blue' / 'img_001.jpg'},near,0.99,red,blue,training,testing\n"
    )
    return run_dir.name, run_dir


def test_fix_move_set_aside_and_undo(client, tmp_path):
    pytest.importorskip("retrain.relabel", reason="the relabel module (report work) is not in this version")
    photos = make_image_folder(tmp_path / "mine", per_class=4)
    run, run_dir = _run_with_issues(client, photos)
    r = client.get(f"/api/runs/{run}/issues").json()  # the suspects (score >= 2/3) only
    assert r["available"] and r["has_audit"] and r["total"] == 2 and r["suspects"] == 1
    assert [(i["path"], i["suggested"], i["suspect"]) for i in r["issues"]] == [
        ("red/img_000.jpg", "green", True)
    ]
    r = client.get(f"/api/runs/{run}/issues", params={"all": 1}).json()  # every photo
    assert [(i["path"], i["suggested"], i["suspect"]) for i in r["issues"]] == [
        ("red/img_000.jpg", "green", True),
        ("red/img_001.jpg", "blue", False),
    ]
    assert r["duplicates"][0]["b"] == "blue/img_001.jpg"
    moved = client.post(
        f"/api/runs/{run}/fix", json={"path": "red/img_000.jpg", "action": "move", "to": "green"}
    )
    assert moved.status_code == 200, moved.text
    (to,) = moved.json()["moved_to"]  # green has its own img_000.jpg: kept, the newcomer is renamed
    assert (
        Path(to).parent == photos / "green"
        and Path(to).exists()
        and not (photos / "red" / "img_000.jpg").exists()
    )
    aside = client.post(
        f"/api/runs/{run}/fix", json={"path": "red/img_001.jpg", "action": "set_aside"}
    ).json()
    assert not (photos / "red" / "img_001.jpg").exists() and Path(aside["moved_to"][0]).exists()
    decided = {
        i["path"]: (i["decision"] or {}).get("action")
        for i in client.get(f"/api/runs/{run}/issues", params={"all": 1}).json()["issues"]
    }
    assert decided == {"red/img_000.jpg": "move", "red/img_001.jpg": "set_aside"}
    assert client.post(f"/api/runs/{run}/undo").json()["undone"]["action"] == "set_aside"
    assert (photos / "red" / "img_001.jpg").exists()
    assert client.post(f"/api/runs/{run}/undo").json()["undone"]["action"] == "move"
    assert (photos / "red" / "img_000.jpg").exists() and not Path(to).exists()
    assert (photos / "green" / "img_000.jpg").exists()
    assert client.post(f"/api/runs/{run}/undo").status_code == 409
    for bad in (
        {"path": "../../x.jpg", "action": "keep"},
        {"path": "red/img_002.jpg", "action": "delete"},
        {"path": "red/img_002.jpg", "action": "move", "to": "../elsewhere"},
    ):
        assert client.post(f"/api/runs/{run}/fix", json=bad).status_code == 400


def test_fix_without_the_relabel_module_says_so(client, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_relabel(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "retrain" and fromlist and "relabel" in fromlist:
            raise ImportError("no relabel")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", no_relabel)
    photos = make_image_folder(tmp_path / "mine", per_class=4)
    run, _ = _run_with_issues(client, photos)
    r = client.post(f"/api/runs/{run}/fix", json={"path": "red/img_000.jpg", "action": "move", "to": "green"})
    assert r.status_code == 501 and "not available in this version" in r.json()["error"]
    assert (photos / "red" / "img_000.jpg").exists()


def test_the_worker_turns_the_c_path_log_line_into_chart_points(tmp_path, caplog):
    """The page's validation chart for the solved layer comes from fit.py's log line: the two must agree."""
    import json
    import logging

    import numpy as np

    from retrain.crossfit import CrossFit
    from retrain.fit import FitPlan, _log_l2_plan
    from retrain.ui import _EventWriter

    cross = CrossFit(
        logits=np.zeros((4, 2)),
        fold=np.array([0, 1, 0, 1]),
        curve_steps=np.zeros(0, np.int64),
        curve_accuracy=np.array([0.5, 0.75, 1.0]),
        curve_loss=np.array([0.69, 0.4, 0.2]),
        best_steps=0,
        seconds=0.1,
        curve_c=np.array([0.001, 0.00316, 0.01]),
        c=0.01,
    )
    writer = _EventWriter(tmp_path / "events.jsonl")
    log = logging.getLogger("retrain")
    log.addHandler(writer)
    try:
        with caplog.at_level(logging.INFO, logger="retrain"):
            _log_l2_plan(FitPlan("all", 0, True, cross, 25.0, 0.01), 4)
    finally:
        log.removeHandler(writer)
        writer.close()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    (chart,) = [e for e in events if e["kind"] == "crossfit"]
    assert chart["axis"] == "C" and chart["n"] == 4 and chart["folds"] == 2
    assert chart["points"] == [[0.001, 0.5], [0.00316, 0.75], [0.01, 1.0]]

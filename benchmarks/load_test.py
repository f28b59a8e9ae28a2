#!/usr/bin/env python3
"""Load test for ``retrain serve``, on this machine's loopback only; stops by itself.

    python benchmarks/load_test.py                          # trains a sample model, starts a server, 600 requests
    python benchmarks/load_test.py --graph MODEL.onnx       # that model
    python benchmarks/load_test.py --url http://127.0.0.1:8080 --requests 2000   # a server already running here

``--concurrency`` clients send ``--requests`` requests in all (or stop after ``--duration``
seconds, whichever comes first): sample photos as raw JPEG bodies and as multipart forms
of several photos, with one request in ``--bad_every`` malformed (not an image, a wrong
content type, an empty or truncated body, broken multipart, a body over the size limit,
a pixel flood, a bad ``top_k``). Every answer is checked: photos must get 200 and their
own label, malformed requests their 4xx; anything else (a 5xx, a dropped connection,
a timeout) is a failure, and the server must still answer ``/healthz`` at the end.

Prints requests/s, images/s and p50/p90/p99 latency of good and bad requests, the
server's batching counters, and exits 1 if anything failed.

    python benchmarks/load_test.py --flood 64 --max_in_flight 4    # a flood of large uploads

``--flood N``: N clients at once each send large photos (``--flood_mb`` MB JPEGs) back to
back. Every answer must be 200 with the photo's label or 503 with ``Retry-After`` (the
server's ``--max_in_flight`` cap); the server's peak memory (VmHWM) is printed, so runs
with different caps show that memory stays bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_PHOTOS = ROOT / "src" / "retrain" / "sample_data" / "photos"

# The server started here gets small limits so that the malformed requests stay cheap to send.
SERVER_LIMITS = {"max_body_bytes": 2_000_000, "max_pixels": 20_000_000, "max_images": 8}


@dataclass
class Case:
    kind: str  # "raw", "multipart" or the name of a malformed request
    expect: int  # HTTP status
    labels: list[str]  # true labels of the photos sent (good requests)
    kwargs: dict  # for httpx.AsyncClient.post


@dataclass
class Outcome:
    kind: str
    expect: int
    status: int | None  # None: no answer (connection error or timeout)
    seconds: float
    images: int = 0
    wrong_labels: int = 0
    error: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    server_stats: dict = field(default_factory=dict)
    healthy_after: bool = False

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status != o.expect]

    def summary(self) -> dict:
        good = [o for o in self.outcomes if o.expect == 200]
        bad = [o for o in self.outcomes if o.expect != 200]

        def lat(items):
            ms = np.array([o.seconds * 1000 for o in items if o.status is not None])
            if not len(ms):
                return {}
            return {f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 90, 99)} | {
                "max_ms": round(float(ms.max()), 1)
            }

        statuses: dict[str, int] = {}
        for o in self.outcomes:
            key = str(o.status) if o.status is not None else "no answer"
            statuses[key] = statuses.get(key, 0) + 1
        return {
            "requests": len(self.outcomes),
            "seconds": round(self.seconds, 2),
            "requests_per_s": round(len(self.outcomes) / self.seconds, 1) if self.seconds else 0.0,
            "good_requests": len(good),
            "images_per_s": round(sum(o.images for o in good if o.status == 200) / self.seconds, 1)
            if self.seconds
            else 0,
            "good_latency": lat(good),
            "malformed_requests": len(bad),
            "malformed_latency": lat(bad),
            "statuses": dict(sorted(statuses.items())),
            "failures": len(self.failures()),
            "wrong_labels": sum(o.wrong_labels for o in good),
            "healthy_after": self.healthy_after,
            "server_batching": self.server_stats.get("batching", {}),
            "server_requests": self.server_stats.get("requests", {}),
            "server_peak_rss_mb": self.server_stats.get("peak_rss_mb"),
        }


# -- the requests -----------------------------------------------------------------------------------
def sample_photos() -> list[tuple[str, bytes]]:
    return [(p.parent.name, p.read_bytes()) for p in sorted(SAMPLE_PHOTOS.glob("*/*.jpg"))]


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")  # compresses to a few kB: a pixel flood
    return buf.getvalue()


def malformed_cases(photo: bytes, max_body_bytes: int, max_pixels: int) -> list[Case]:
    side = int(max_pixels**0.5) + 64
    flood = _png(side, side)
    return [
        Case(
            "not_an_image",
            422,
            [],
            {"content": b"<html>not a photo</html>", "headers": {"Content-Type": "image/jpeg"}},
        ),
        Case("wrong_content_type", 415, [], {"content": photo, "headers": {"Content-Type": "text/plain"}}),
        Case("empty_body", 400, [], {"content": b"", "headers": {"Content-Type": "image/jpeg"}}),
        Case(
            "truncated_jpeg",
            422,
            [],
            {"content": photo[: len(photo) // 4], "headers": {"Content-Type": "image/jpeg"}},
        ),
        Case(
            "broken_multipart",
            400,
            [],
            {"content": b"--b\r\nno headers", "headers": {"Content-Type": "multipart/form-data"}},
        ),
        Case(
            "body_too_large",
            413,
            [],
            {"content": b"\xff" * (max_body_bytes + 1), "headers": {"Content-Type": "image/jpeg"}},
        ),
        Case("pixel_flood", 413, [], {"content": flood, "headers": {"Content-Type": "image/png"}}),
        Case(
            "bad_top_k",
            400,
            [],
            {"content": photo, "headers": {"Content-Type": "image/jpeg"}, "params": {"top_k": "x"}},
        ),
    ]


def make_cases(n: int, bad_every: int, limits: dict, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    photos = sample_photos()
    bad = malformed_cases(photos[0][1], limits["max_body_bytes"], limits["max_pixels"])
    cases = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            cases.append(bad[(i // bad_every) % len(bad)])
        elif i % 5 == 4:  # every fifth good request is a form of 2-4 photos
            chosen = rng.sample(photos, rng.randint(2, 4))
            files = [
                ("file", (f"{label}_{j}.jpg", data, "image/jpeg")) for j, (label, data) in enumerate(chosen)
            ]
            cases.append(Case("multipart", 200, [label for label, _ in chosen], {"files": files}))
        else:
            label, data = photos[rng.randrange(len(photos))]
            cases.append(
                Case("raw", 200, [label], {"content": data, "headers": {"Content-Type": "image/jpeg"}})
            )
    return cases


# -- running it -------------------------------------------------------------------------------------
def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(
            f"--url {url!r}: this load test only targets this machine (127.0.0.1, ::1 or localhost)"
        )


async def _one(client: httpx.AsyncClient, case: Case) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/classify", **case.kwargs)
    except httpx.HTTPError as exc:
        return Outcome(
            case.kind, case.expect, None, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}"
        )
    seconds = time.perf_counter() - t0
    out = Outcome(case.kind, case.expect, r.status_code, seconds)
    try:
        body = r.json()
    except ValueError:
        out.error = f"not JSON: {r.text[:80]!r}"
        out.status = -r.status_code  # counted as a failure
        return out
    if r.status_code == 200 and case.expect == 200:
        tops = [res["predictions"][0]["label"] for res in body["results"]]
        out.images = len(tops)
        out.wrong_labels = sum(t != label for t, label in zip(tops, case.labels))
    elif r.status_code != 200 and "error" not in body:
        out.error = "error answer without an 'error' field"
        out.status = -r.status_code
    elif r.status_code != case.expect:
        out.error = body.get("error", "")[:200]
    return out


async def run_load(
    url: str, cases: list[Case], *, concurrency: int, duration: float, timeout: float = 60
) -> Report:
    """Send ``cases`` with ``concurrency`` clients until all are sent or ``duration`` seconds have passed."""
    report = Report()
    queue = list(reversed(cases))
    deadline = time.monotonic() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker():
            while queue and time.monotonic() < deadline:
                report.outcomes.append(await _one(client, queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = time.perf_counter() - t0
        try:
            report.healthy_after = (await client.get("/healthz")).status_code == 200
            report.server_stats = (await client.get("/v1/stats")).json()
        except httpx.HTTPError:
            report.healthy_after = False
    return report


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(graph: str, port: int, extra: list[str]) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "retrain",
        "serve",
        "--graph",
        graph,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log_level",
        "warning",
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"retrain serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("retrain serve did not start within 120 s")


def train_sample_model(out_dir: str) -> str:
    sys.path.insert(0, str(ROOT / "src"))
    import retrain

    print("No --graph: training a model on the sample photos (about 20 s the first time) ...", flush=True)
    return str(
        retrain.train(
            SAMPLE_PHOTOS,
            output_dir=out_dir,
            how_many_training_steps=300,
            seed=0,
            quiet=True,
            logging_verbosity="WARN",
        ).output_graph
    )


# -- a flood of large uploads ------------------------------------------------------------------------
def large_photo(megabytes: float, seed: int = 0) -> bytes:
    """A real, decodable JPEG of about ``megabytes`` (noise compresses badly): an honest large upload."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def encode(side: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=90
        )
        return buf.getvalue()

    target = megabytes * 2**20
    probe = encode(256)
    side = max(64, int(256 * (target / len(probe)) ** 0.5))  # noise: bytes grow with the pixel count
    data = encode(side)
    return encode(max(64, int(side * (target / len(data)) ** 0.5 * 0.99)))


async def run_flood(url: str, body: bytes, *, clients: int, per_client: int, timeout: float = 120) -> Report:
    """``clients`` at once, each sending ``per_client`` uploads of ``body`` back to back, never retrying.

    Expected: 200, or 503 with ``Retry-After`` once ``max_in_flight`` requests are in progress.
    """
    report = Report()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one(client: httpx.AsyncClient) -> Outcome:
        t0 = time.perf_counter()
        try:
            r = await client.post("/v1/classify", content=body, headers={"Content-Type": "image/jpeg"})
        except httpx.HTTPError as exc:
            return Outcome("flood", 200, None, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        out = Outcome("flood", 200, r.status_code, time.perf_counter() - t0)
        if r.status_code == 503 and r.headers.get("retry-after") and "error" in r.json():
            out.expect = 503  # refused as promised: not a failure
        elif r.status_code == 200:
            out.images = 1
        else:
            out.error = r.text[:200]
        return out

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def worker():
            for _ in range(per_client):
                report.outcomes.append(await one(client))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        report.seconds = time.perf_counter() - t0
        try:
            report.healthy_after = (await client.get("/healthz")).status_code == 200
            report.server_stats = (await client.get("/v1/stats")).json()
        except httpx.HTTPError:
            report.healthy_after = False
    return report


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident memory so far (Linux VmHWM), in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--graph", help="model to serve (default: train one on the sample photos)")
    p.add_argument("--url", help="a server already running on this machine (default: start one)")
    p.add_argument("--requests", type=int, default=600, help="requests to send in all")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at the same time")
    p.add_argument("--duration", type=float, default=120, help="stop after this many seconds anyway")
    p.add_argument(
        "--bad_every", type=int, default=10, help="one request in this many is malformed (0: none)"
    )
    p.add_argument("--max_batch", type=int, default=16, help="--max_batch of the server started here")
    p.add_argument(
        "--max_in_flight",
        type=int,
        default=None,
        help="--max_in_flight of the server started here (default: the server's own)",
    )
    p.add_argument(
        "--flood",
        type=int,
        default=0,
        help="instead of the mixed load: this many clients at once sending large uploads (see above)",
    )
    p.add_argument("--flood_mb", type=float, default=1.5, help="size of each flood upload, MB")
    p.add_argument("--flood_rounds", type=int, default=3, help="uploads per flood client")
    p.add_argument("--json", help="also write the summary to this file")
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    if ns.requests < 1 or ns.concurrency < 1 or ns.duration <= 0 or ns.flood < 0 or ns.flood_rounds < 1:
        raise SystemExit("--requests, --concurrency, --duration and --flood_rounds must be positive")
    if ns.flood and ns.flood_mb * 2**20 > 0.95 * SERVER_LIMITS["max_body_bytes"] and not ns.url:
        raise SystemExit(
            f"--flood_mb must stay below the started server's body limit "
            f"({SERVER_LIMITS['max_body_bytes'] / 2**20:.2f} MiB)"
        )
    proc = None
    tmp = tempfile.TemporaryDirectory(prefix="retrain-load-")
    try:
        if ns.url:
            check_loopback(ns.url)
            url = ns.url.rstrip("/")
            limits = httpx.get(f"{url}/v1/model", timeout=10).json()["limits"]
        else:
            graph = ns.graph or train_sample_model(tmp.name)
            port = _free_port()
            extra = [f"--{k}={v}" for k, v in SERVER_LIMITS.items()] + [f"--max_batch={ns.max_batch}"]
            if ns.max_in_flight is not None:
                extra.append(f"--max_in_flight={ns.max_in_flight}")
            proc = start_server(graph, port, extra)
            url, limits = f"http://127.0.0.1:{port}", SERVER_LIMITS
        if ns.flood:
            body = large_photo(ns.flood_mb, ns.seed)
            before = peak_rss_mb(proc.pid) if proc else None
            print(
                f"Flooding {url} with {ns.flood} clients x {ns.flood_rounds} uploads of {len(body) / 2**20:.1f} MiB "
                "...",
                flush=True,
            )
            report = asyncio.run(run_flood(url, body, clients=ns.flood, per_client=ns.flood_rounds))
            peak = peak_rss_mb(proc.pid) if proc else None
            report.server_stats["peak_rss_mb"] = {"before": before, "after_flood": peak}
        else:
            cases = make_cases(ns.requests, ns.bad_every, limits, ns.seed)
            print(
                f"Sending {len(cases)} requests to {url} with {ns.concurrency} clients (at most {ns.duration:g} s)"
                " ...",
                flush=True,
            )
            report = asyncio.run(run_load(url, cases, concurrency=ns.concurrency, duration=ns.duration))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        tmp.cleanup()
    summary = report.summary()
    print(json.dumps(summary, indent=2))
    for o in report.failures()[:10]:
        print(f"FAILED {o.kind}: expected {o.expect}, got {o.status} {o.error}", file=sys.stderr)
    if ns.json:
        Path(ns.json).write_text(json.dumps(summary, indent=2) + "\n")
    ok = not report.failures() and report.healthy_after
    print("OK: every request answered as expected and the server is healthy" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

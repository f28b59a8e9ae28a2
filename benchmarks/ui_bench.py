"""`retrain ui` on a large folder: how long the calls behind the Data step take with 10,000 photos.

    python benchmarks/ui_bench.py [--images 10000] [--classes 10]

Makes noisy 96 px JPEGs in a temporary folder (or uses --image_dir), then times, through Starlette's
TestClient: the state (class counts), one page of a class listing, the photo check (cold, then warm:
headers are remembered by path, size and mtime), one thumbnail (cold, then cached) and the page's assets.
It also starts `retrain ui` as a user does (a new process) and times it until the page is usable (the
page, its script and style, and the state it shows first answered; issue 17's bar: under 3 s), best and
worst of ``--starts`` starts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, images: int, classes: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        px = rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)
        Image.fromarray(px).save(folder / f"img_{i:05d}.jpg", quality=80)
    return root


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def start_up_seconds(project: Path, photos: Path) -> float:
    """`python -m retrain ui` in a new process, until the page is usable: the page, its script and style
    and the state it shows first (class counts) all answered; seconds."""
    import re
    import subprocess
    import sys
    import urllib.request

    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "retrain", "ui", "--project", str(project), "--image_dir", str(photos)]
    cmd += ["--port", "0", "--no_browser"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            m = re.search(r"Open (http://\S+/)", line)
            if m:
                for path in ("", "static/app.js", "static/app.css", "api/state"):
                    with urllib.request.urlopen(m.group(1) + path, timeout=30) as r:
                        r.read()
                return time.perf_counter() - t0
        raise RuntimeError("retrain ui exited without printing its URL")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    from starlette.testclient import TestClient

    from retrain.ui import create_ui_app

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--image_dir", default=None)
    ap.add_argument(
        "--starts", type=int, default=3, help="times `retrain ui` is started for the start-up row"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t_make, photos = timed(
            lambda: (
                Path(args.image_dir)
                if args.image_dir
                else make_folder(Path(tmp) / "photos", args.images, args.classes)
            )
        )
        app = create_ui_app(Path(tmp) / "project", image_dir=photos)
        with TestClient(app) as c:
            rows = []
            t, r = timed(lambda: c.get("/"))
            assets = len(r.content) + sum(len(c.get(f"/static/{n}").content) for n in ("app.js", "app.css"))
            rows.append(("page + assets", t, f"{assets / 1024:.1f} KB"))
            t, r = timed(lambda: c.get("/api/state").json())
            rows.append(("state (class counts)", t, f"{sum(x['count'] for x in r['classes'])} photos"))
            first = r["classes"][0]["name"]
            t, r = timed(lambda: c.get("/api/images", params={"class": first, "page": 3}).json())
            rows.append(("one page of a class", t, f"{len(r['images'])} of {r['total']}"))
            t, r = timed(lambda: c.get("/api/check").json())
            rows.append(("check, cold", t, f"{sum(x['count'] for x in r['classes'])} usable"))
            t, r = timed(lambda: c.get("/api/check").json())
            rows.append(("check, warm", t, ""))
            path = c.get("/api/images", params={"class": first}).json()["images"][0]
            t, _ = timed(lambda: c.get("/api/thumb", params={"path": path}))
            rows.append(("thumbnail, cold", t, ""))
            t, _ = timed(lambda: c.get("/api/thumb", params={"path": path}))
            rows.append(("thumbnail, cached", t, ""))
        starts = sorted(start_up_seconds(Path(tmp) / "project-start", photos) for _ in range(args.starts))
        rows.append(
            ("`retrain ui` start-up", starts[0], f"best of {len(starts)}; worst {1000 * starts[-1]:.0f} ms")
        )
    print(f"{args.images} images in {args.classes} classes (made in {t_make:.1f} s)")
    for name, seconds, note in rows:
        print(f"{name:24s} {1000 * seconds:9.1f} ms  {note}")


if __name__ == "__main__":
    main()

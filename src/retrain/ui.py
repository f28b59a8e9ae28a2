"""``retrain ui``: the whole loop (data, train, understand, fix, try, export) behind one local web page.

    >>> from retrain.ui import create_ui_app, run_ui
    >>> app = create_ui_app("my_project", image_dir="flower_photos")   # an ASGI app (Starlette)
    >>> run_ui("my_project", port=8765)                                # runs it with uvicorn

A *project* folder holds everything the app writes: ``photos/<class>/`` (uploaded photos), ``runs/<id>/``
(one training run each: the files ``retrain`` writes plus ``ui_run.json`` and ``events.jsonl``),
``cache/`` (bottlenecks), ``thumbs/`` and ``ui.json`` (which photo folder is in use). Nothing is written
outside it; a user's own photo folder is only read.

Training runs in a subprocess (``python -m retrain.ui worker RUN_DIR``): the server stays responsive, a
cancel is a signal, and a server killed mid-training leaves a run folder with a checkpoint that the next
start shows as interrupted and can resume (``retrain --resume``'s checkpoint).

Safety: loopback by default; another ``host`` needs the access token printed at start. Every request that
changes something must carry the per-start CSRF token (a custom header a cross-site page cannot set
without a CORS preflight, which this app never grants) and, when the browser sends one, an ``Origin``
equal to the app's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from retrain.errors import RetrainError

log = logging.getLogger("retrain")

DEFAULT_PORT = 8765
MAX_UPLOAD_BYTES = 64 * 2**20  # one upload request, all files together
MAX_FILES_PER_UPLOAD = 500
PAGE_SIZE = 60  # images per page of a class listing
THUMB_PX = 160
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_DOWNLOADABLE = (".onnx", ".txt", ".json", ".csv", ".html", ".tflite", ".mlmodel", ".pt", ".zip")
# Settings the page may send, with their type; everything else in TrainConfig keeps its default.
TRAIN_SETTINGS = {
    "architecture": str,
    "how_many_training_steps": int,
    "learning_rate": float,
    "train_batch_size": int,
    "validation_percentage": float,
    "testing_percentage": float,
    "eval_step_interval": int,
    "seed": int,
    "flip_left_right": bool,
    "class_balance": str,
    "quantize": str,
    "fine_tune": bool,
    "final_fit": str,  # train | train+val | all (retrain.fit); "train" makes the step count exact
    "head_solver": str,  # lbfgs | steps (retrain.fit): steps gives the page a curve by step
}
RUN_FILE, EVENTS_FILE, CONFUSION_FILE = "ui_run.json", "events.jsonl", "confusion.json"


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- names and paths --------------------------------------------------------------------------------------
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_class_name(name: object) -> str:
    """A class name that is safe as one folder name, or a 400 saying what is wrong. HTML is allowed (escaped
    on display): a class is named exactly as its folder."""
    if not isinstance(name, str) or not name.strip():
        raise HTTPError(400, "a class needs a name: type one, e.g. 'roses'")
    name = name.strip()
    if len(name) > 100:
        raise HTTPError(400, f"class name is {len(name)} characters long; use at most 100")
    if "/" in name or "\\" in name or _CONTROL.search(name) or name in (".", "..") or name.startswith("."):
        raise HTTPError(
            400,
            f"class name {name!r} cannot be a folder name: leave out '/', '\\', control characters "
            "and a leading '.'",
        )
    return name


def safe_file_name(name: str | None, fallback: str = "photo") -> str:
    """The last component of an uploaded file's name, without control characters or leading dots
    (``../../x.jpg`` -> ``x.jpg``): an upload can never name a place outside its class folder."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = _CONTROL.sub("", base).strip().lstrip(".").strip()
    if not base:
        base = fallback
    if len(base) > 120:
        stem, dot, ext = base.rpartition(".")
        base = (stem[:110] + dot + ext[:9]) if dot else base[:120]
    return base


def _inside(root: Path, rel: str) -> Path:
    """``root/rel`` for a ``/``-separated relative path without ``..``, absolute or hidden parts, else 400."""
    parts = rel.split("/") if rel else []
    if not parts or any(p in ("", ".", "..") or p.startswith(".") or "\\" in p or "\x00" in p for p in parts):
        raise HTTPError(400, f"bad image path {rel!r}: expected class/file.jpg inside the photo folder")
    return root.joinpath(*parts)


def _write_new(folder: Path, name: str, data: bytes) -> Path:
    """Write ``data`` as a new file in ``folder``, never over an existing one (``x.jpg``, ``x-2.jpg``...)."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        stem, ext = name, ""
    for n in range(1, 10_000):
        candidate = folder / (name if n == 1 else f"{stem}-{n}{'.' + ext if ext else ''}")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return candidate
    raise HTTPError(409, f"too many files named like {name!r} in {folder.name!r}; rename the upload")


def _image_format(data: bytes) -> str:
    """Pillow's format name of ``data`` ("JPEG", "PNG"...), or ""."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
            return img.format or ""
    except Exception:  # noqa: BLE001 - Pillow raises many types for a non-image
        return ""


# -- the project folder -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Project:
    """The folder the app owns, and the photo folder in use (the project's own ``photos/`` or a user's)."""

    root: Path
    train_defaults: dict

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        for sub in ("photos", "runs", "cache", "thumbs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def photos(self) -> Path:
        return self.root / "photos"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def settings(self) -> dict:
        with contextlib.suppress(OSError, ValueError):
            return json.loads((self.root / "ui.json").read_text())
        return {}

    def save_settings(self, **values) -> None:
        data = {**self.settings(), **values}
        _atomic_json(self.root / "ui.json", data)

    @property
    def image_dir(self) -> Path:
        chosen = self.settings().get("image_dir")
        return Path(chosen) if chosen else self.photos

    @property
    def own_photos(self) -> bool:
        return self.image_dir.resolve() == self.photos.resolve()


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


# -- the data check ----------------------------------------------------------------------------------------
class DataChecker:
    """Per-class counts, files that cannot be used (with the reason), duplicates and class imbalance.

    Each file's header is read once and remembered by (path, size, mtime), so a second check of a
    10,000-photo folder only lists it."""

    def __init__(self):
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def _reason(self, path: str, st: os.stat_result) -> str:
        key = (path, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        if st.st_size == 0:
            reason = "empty file (0 bytes)"
        else:
            from PIL import Image

            try:
                with Image.open(path) as img:
                    img.size  # noqa: B018 - reads the header only
                reason = ""
            except Exception as exc:  # noqa: BLE001
                reason = f"not a readable image ({type(exc).__name__})"
        with self._lock:
            self._memo[key] = reason
        return reason

    def check(self, image_dir: Path) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        from retrain.data import discover
        from retrain.errors import DatasetError

        try:
            dataset = discover(image_dir)
        except DatasetError as exc:
            return {
                "classes": [],
                "skipped": [],
                "notices": [str(exc)],
                "duplicates": [],
                "imbalance": None,
                "ready": False,
                "problem": str(exc),
            }
        stats = {}
        for r in dataset.records:
            with contextlib.suppress(OSError):
                stats[r.path] = os.stat(r.path)
        with ThreadPoolExecutor(8) as pool:
            reasons = dict(zip(stats, pool.map(lambda p: self._reason(p, stats[p]), stats)))
        counts = {label: 0 for label in dataset.labels}
        skipped = []
        for r in dataset.records:
            reason = reasons.get(r.path, "cannot be read")
            if reason:
                skipped.append({"path": r.rel_path, "reason": reason})
            else:
                counts[dataset.labels[r.label_index]] += 1
        usable = [n for n in counts.values() if n]
        imbalance = round(max(usable) / min(usable), 2) if usable else None
        return {
            "classes": [{"name": k, "count": v} for k, v in counts.items()],
            "skipped": skipped[:500],
            "skipped_total": len(skipped),
            "notices": dataset.notices,
            "duplicates": _duplicates(dataset, stats)[:200],
            "imbalance": imbalance,
            "ready": sum(1 for n in usable if n >= 2) >= 2,
            "problem": ""
            if sum(1 for n in usable if n >= 2) >= 2
            else "training needs at least 2 classes with 2 or more usable photos each",
        }


def _duplicates(dataset, stats: dict) -> list[dict]:
    """Groups of byte-identical files: same size first (no read), then sha1 of those only."""
    by_size: dict[int, list] = {}
    for r in dataset.records:
        if r.path in stats:
            by_size.setdefault(stats[r.path].st_size, []).append(r)
    groups: dict[str, list[str]] = {}
    for same in by_size.values():
        if len(same) < 2:
            continue
        for r in same:
            with contextlib.suppress(OSError):
                digest = hashlib.sha1(Path(r.path).read_bytes()).hexdigest()
                groups.setdefault(digest, []).append(r.rel_path)
    return [{"paths": paths} for paths in groups.values() if len(paths) > 1]


# -- training jobs -----------------------------------------------------------------------------------------
def _pid_alive(pid: int | None, run_dir: Path) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a reused pid is not our worker
        with contextlib.suppress(OSError):
            return str(run_dir).encode() in cmdline.read_bytes()
    return True


def run_status(run_dir: Path) -> dict:
    """A run's ``ui_run.json`` with its status made true: "running" whose worker is gone is "interrupted"."""
    info = _read_json(run_dir / RUN_FILE)
    if not info:
        info = {"status": "finished" if (run_dir / "metrics.json").exists() else "unknown", "settings": {}}
    if info.get("status") == "running" and not _pid_alive(info.get("pid"), run_dir):
        info["status"] = "interrupted"
    # A run that wrote its metrics but whose worker is gone (killed after them) counts as finished; while
    # its worker still writes the confusion matrix and the last events, it is running.
    if info.get("status") not in ("finished", "running") and (run_dir / "metrics.json").exists():
        info["status"] = "finished"
    info["id"] = run_dir.name
    info["resumable"] = info["status"] in ("interrupted", "cancelled", "failed") and (
        (run_dir / "checkpoint.npz").exists() or not (run_dir / "metrics.json").exists()
    )
    return info


class Jobs:
    """One training at a time per project, across tabs, windows and servers (a lock file with the pid)."""

    def __init__(self, project: Project, worker_env: dict | None = None):
        self.project = project
        self.worker_env = worker_env or {}
        self.proc: subprocess.Popen | None = None
        self.cancelled: set[str] = set()
        self._lock = threading.Lock()

    @property
    def lock_path(self) -> Path:
        return self.project.root / "training.lock"

    def current(self) -> dict | None:
        """The run being trained now (by this server or another), else None; a stale lock is removed."""
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None
        info = _read_json(self.lock_path)
        if not info:
            return None
        run_dir = self.project.runs / info.get("run", "")
        if not _pid_alive(info.get("pid"), run_dir):
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            return None
        if _read_json(run_dir / RUN_FILE).get("status", "running") != "running":
            return None  # its worker wrote its end and is exiting: the run is over
        return info

    def start(self, settings: dict, resume_run: str | None = None) -> str:
        with self._lock:
            busy = self.current()
            if busy:
                raise HTTPError(
                    409,
                    f"a training is already running in this project (run {busy['run']}, maybe "
                    "from another tab or window): wait for it to finish or cancel it on the Train "
                    "step first",
                )
            if resume_run:
                run_dir = _inside(self.project.runs, resume_run)
                info = run_status(run_dir) if run_dir.is_dir() else {}
                if not info.get("resumable"):
                    raise HTTPError(
                        409,
                        f"run {resume_run!r} cannot be resumed (status: "
                        f"{info.get('status', 'no such run')}); start a new training instead",
                    )
                settings, image_dir = info["settings"], info["image_dir"]
            else:
                image_dir = str(self.project.image_dir)
                run_dir = self._new_run_dir()
            record = {
                "status": "running",
                "settings": settings,
                "image_dir": image_dir,
                "started": time.time(),
                "resumed": bool(resume_run),
                "pid": None,
            }
            _atomic_json(run_dir / RUN_FILE, record)
            env = {**os.environ, **self.worker_env}
            kwargs = {}
            if sys.platform.startswith("linux"):
                kwargs["preexec_fn"] = _die_with_parent
            log_file = open(run_dir / "worker.log", "ab")  # noqa: SIM115 - handed to the child
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "retrain.ui", "worker", str(run_dir)],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    cwd=str(self.project.root),
                    **kwargs,
                )
            finally:
                log_file.close()
            record["pid"] = self.proc.pid
            _atomic_json(run_dir / RUN_FILE, record)
            _atomic_json(self.lock_path, {"run": run_dir.name, "pid": self.proc.pid, "started": time.time()})
            return run_dir.name

    def _new_run_dir(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 1000):
            run_dir = self.project.runs / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue
        raise HTTPError(500, "cannot create a run folder")

    def cancel(self) -> str:
        busy = self.current()
        if not busy:
            raise HTTPError(409, "no training is running")
        self.cancelled.add(busy["run"])
        run_dir = self.project.runs / busy["run"]
        info = _read_json(run_dir / RUN_FILE)
        info["status"] = "cancelled"
        info["cancel_requested"] = True
        _atomic_json(run_dir / RUN_FILE, info)
        with contextlib.suppress(ProcessLookupError):
            os.kill(busy["pid"], signal.SIGTERM)
        if self.proc is not None and self.proc.pid == busy["pid"]:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            self.lock_path.unlink()
        return busy["run"]

    def stop(self) -> None:
        """At server shutdown: the worker stops too (its checkpoint stays, so the run can be resumed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the server dies, however it dies (Linux prctl)."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def read_events(run_dir: Path, since: int = 0, limit: int = 2000) -> tuple[list[dict], int]:
    """Events of a run from byte offset ``since``: (events, next offset). Only whole lines are read."""
    path = run_dir / EVENTS_FILE
    try:
        with open(path, "rb") as f:
            f.seek(since)
            chunk = f.read(4 * 2**20)
    except OSError:
        return [], since
    end = chunk.rfind(b"\n") + 1
    events = []
    for line in chunk[:end].splitlines()[:limit]:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    consumed = sum(len(x) + 1 for x in chunk[:end].splitlines()[:limit])
    return events, since + consumed


# -- the worker (a subprocess) --------------------------------------------------------------------------
_STEP = re.compile(
    r"Step (\d+): Train accuracy = ([\d.]+)%, Cross entropy = ([\d.e+-]+)"
    r"(?:, Validation accuracy = ([\d.]+)%)?"
)
# retrain.fit's cross-fit: held-out accuracy for each number of steps it tried (the validation curve)
_CROSSFIT = re.compile(r"Out-of-fold accuracy by number of steps \(N=(\d+), (\d+) folds\): (.*)")
_CROSSFIT_C = re.compile(
    r"Out-of-fold accuracy / cross entropy by regularisation C \(N=(\d+), (\d+) folds\): (.*)"
)


class _EventWriter(logging.Handler):
    """The training log as JSON lines: every message, plus parsed steps and phases for the page's chart."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the worker's life
        self.lock_ = threading.Lock()

    def write(self, **event) -> None:
        event["t"] = round(time.time(), 3)
        with self.lock_:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = _STEP.match(msg)
        if m:
            self.write(
                kind="step",
                step=int(m[1]),
                train_accuracy=float(m[2]) / 100,
                cross_entropy=float(m[3]),
                validation_accuracy=float(m[4]) / 100 if m[4] else None,
            )
            return
        m = _CROSSFIT.match(msg)
        if m:
            points = [(int(a), float(b) / 100) for a, b in re.findall(r"(\d+): ([\d.]+)%", m[3])]
            self.write(kind="crossfit", n=int(m[1]), folds=int(m[2]), points=points, axis="steps")
        m = _CROSSFIT_C.match(msg)
        if m:  # the L-BFGS layer: out-of-fold accuracy by its regularisation, not by step
            points = [(float(a), float(b) / 100) for a, b in re.findall(r"([\d.e+-]+): ([\d.]+)%", m[3])]
            self.write(kind="crossfit", n=int(m[1]), folds=int(m[2]), points=points, axis="C")
        if msg.startswith("Bottlenecks:"):
            self.write(kind="phase", phase="train")
        elif msg.startswith("Kept the weights") or msg.startswith("Final test accuracy"):
            self.write(kind="phase", phase="export")
        self.write(kind="log", level=record.levelname, message=msg)


class _ProgressEvents:
    """Stands in for the extraction progress bar: count, rate and ETA as events, at most 4 a second."""

    def __init__(self, events: _EventWriter, total: int):
        self.events, self.total, self.done = events, total, 0
        self.t0 = self.last = time.monotonic()
        self.lock = threading.Lock()
        events.write(kind="phase", phase="extract")
        self._send()

    def _send(self) -> None:
        elapsed = time.monotonic() - self.t0
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        eta = (self.total - self.done) / rate if rate else None
        self.events.write(
            kind="extract",
            done=self.done,
            total=self.total,
            rate=round(rate, 1),
            eta=round(eta, 1) if eta is not None else None,
        )

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            now = time.monotonic()
            if now - self.last >= 0.25 or self.done >= self.total:
                self.last = now
                self._send()

    def close(self) -> None:
        with self.lock:
            self._send()


def _preload() -> None:
    """Import the modules named in RETRAIN_UI_PRELOAD (comma-separated): plug-in backbones a user registers."""
    for name in filter(None, os.environ.get("RETRAIN_UI_PRELOAD", "").split(",")):
        __import__(name.strip())


def worker_main(run_dir: str) -> int:
    """Train the run described by ``run_dir/ui_run.json``; write its events, status and confusion matrix."""
    run = Path(run_dir)
    info = _read_json(run / RUN_FILE)
    events = _EventWriter(run / EVENTS_FILE)
    root = logging.getLogger("retrain")
    root.handlers[:] = [events]
    root.setLevel(logging.INFO)
    root.propagate = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    _preload()
    import retrain.features as features_module
    from retrain.config import TrainConfig

    features_module.progress_bar = lambda total, enabled, desc="": _ProgressEvents(events, total)
    settings = dict(info.get("settings") or {})
    cfg = TrainConfig(**{k: v for k, v in settings.items() if k in TrainConfig.field_names()})
    cfg.image_dir, cfg.output_dir, cfg.resume, cfg.quiet = (
        info["image_dir"],
        str(run),
        bool(info.get("resumed")),
        False,
    )
    events.write(kind="phase", phase="discover")
    status, error = "finished", ""
    try:
        from retrain.train import train

        result = train(config=cfg)
        events.write(kind="phase", phase="report")
        _write_confusion(run, cfg, result)
        events.write(kind="done", test_accuracy=result.test_accuracy)
    except KeyboardInterrupt:
        status = "cancelled" if _read_json(run / RUN_FILE).get("cancel_requested") else "interrupted"
        error = "stopped before the end; the checkpoint is kept, so the run can be resumed"
    except RetrainError as exc:
        status, error = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - reported on the page, with the log kept in worker.log
        status, error = (
            "failed",
            f"internal error: {type(exc).__name__}: {exc} (see worker.log; please report it)",
        )
    if error:
        events.write(kind="error", status=status, message=error)
    info = _read_json(run / RUN_FILE)
    info.update(status=status, error=error, ended=time.time())
    _atomic_json(run / RUN_FILE, info)
    return 0 if status == "finished" else 1


def _write_confusion(run: Path, cfg, result) -> None:
    """The test split's confusion matrix with the image of every cell (features from the warm cache)."""
    from retrain.data import discover
    from retrain.features import extract_features
    from retrain.splits import split_features
    from retrain.train import resolve_backbone

    dataset = discover(cfg.image_dir)
    table = extract_features(
        dataset,
        architecture=resolve_backbone(cfg),
        bottleneck_dir=cfg.bottleneck_dir,
        model_dir=cfg.model_dir or None,
        device=cfg.device,
        progress=False,
    )
    splits = split_features(
        dataset,
        table,
        validation_percentage=cfg.validation_percentage,
        testing_percentage=cfg.testing_percentage,
    )
    labels = splits.labels
    index = {label: i for i, label in enumerate(labels)}
    wrong = dict(result.misclassified)
    root = str(Path(cfg.image_dir)) + os.sep
    n = len(labels)
    matrix = [[0] * n for _ in range(n)]
    cells: dict[str, list[str]] = {}
    for path, y in zip(splits.test.paths, splits.test.y):
        pred = index[wrong[path]] if path in wrong else int(y)
        matrix[int(y)][pred] += 1
        rel = path[len(root) :] if path.startswith(root) else os.path.relpath(path, cfg.image_dir)
        cells.setdefault(f"{int(y)},{pred}", []).append(rel.replace(os.sep, "/"))
    _atomic_json(run / CONFUSION_FILE, {"labels": labels, "matrix": matrix, "cells": cells})


# -- the app ---------------------------------------------------------------------------------------------
def create_ui_app(
    project_dir: str | os.PathLike,
    *,
    image_dir: str | os.PathLike | None = None,
    access_token: str | None = None,
    allowed_hosts: list[str] | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    train_defaults: dict | None = None,
    worker_env: dict | None = None,
):
    """The ASGI app (Starlette) for ``project_dir``; ``image_dir`` picks a photo folder to start with.

    ``access_token``: required on every request (``?token=`` once, then a cookie) when set.
    ``allowed_hosts``: ``Host`` header values accepted (None: any; :func:`run_ui` passes the bound names,
    which stops DNS-rebinding pages). ``train_defaults``: TrainConfig values for every run (e.g.
    ``bottleneck_dir``, ``model_dir``); ``worker_env``: extra environment for the training subprocess.
    """
    from starlette.applications import Starlette
    from starlette.routing import Route

    _preload()
    project = Project(
        Path(project_dir),
        {"bottleneck_dir": str(Path(project_dir).resolve() / "cache"), **(train_defaults or {})},
    )
    if image_dir is not None:
        chosen = Path(image_dir).expanduser().resolve()
        if not chosen.is_dir():
            raise RetrainError(
                f"--image_dir {str(image_dir)!r} is not a folder; pass a folder of class folders"
            )
        project.save_settings(image_dir=str(chosen))
    state = _State(
        project,
        Jobs(project, worker_env),
        secrets.token_urlsafe(24),
        access_token,
        allowed_hosts,
        max_upload_bytes,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        state.jobs.stop()

    def r(path, fn, methods=("GET",)):
        return Route(path, _endpoint(state, fn), methods=list(methods))

    routes = [
        r("/", _page),
        r("/static/{name}", _static),
        r("/api/state", _api_state),
        r("/api/check", _api_check),
        r("/api/source", _api_source, ["POST"]),
        r("/api/classes", _api_create_class, ["POST"]),
        r("/api/classes/{name}/photos", _api_upload, ["POST"]),
        r("/api/images", _api_images),
        r("/api/thumb", _api_thumb),
        r("/api/train", _api_train, ["POST"]),
        r("/api/train/cancel", _api_cancel, ["POST"]),
        r("/api/runs/{run}/events", _api_events),
        r("/api/runs/{run}", _api_run),
        r("/api/runs/{run}/classify", _api_classify, ["POST"]),
        r("/api/runs/{run}/files/{name}", _api_file),
        r("/api/runs/{run}/issues", _api_issues),
        r("/api/runs/{run}/fix", _api_fix, ["POST"]),
        r("/api/runs/{run}/undo", _api_undo, ["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ui = state
    return app


@dataclasses.dataclass
class _State:
    project: Project
    jobs: Jobs
    csrf: str
    access_token: str | None
    allowed_hosts: list[str] | None
    max_upload_bytes: int
    checker: DataChecker = dataclasses.field(default_factory=DataChecker)
    models: dict = dataclasses.field(default_factory=dict)


def _endpoint(state: _State, fn):
    import asyncio

    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    async def endpoint(request):
        try:
            _guard(state, request)
            if asyncio.iscoroutinefunction(fn):
                result = await fn(state, request)
            else:  # file-system work runs in a thread: the event loop keeps answering other tabs
                result = await run_in_threadpool(fn, state, request)
            if isinstance(result, dict):
                result = JSONResponse(result)
        except HTTPError as exc:
            result = JSONResponse({"error": exc.message}, status_code=exc.status)
        except RetrainError as exc:
            result = JSONResponse({"error": str(exc)}, status_code=400)
        result.headers.setdefault("X-Content-Type-Options", "nosniff")
        result.headers.setdefault("Cache-Control", "no-store")
        return result

    return endpoint


def _guard(state: _State, request) -> None:
    """Host (DNS rebinding), access token, and for anything that changes state: Origin + CSRF token."""
    host = request.headers.get("host", "")
    if state.allowed_hosts is not None and host not in state.allowed_hosts:
        raise HTTPError(403, f"unexpected Host {host!r}: open the app at the address printed when it started")
    if state.access_token:
        given = request.cookies.get("retrain_ui_token") or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), state.access_token.encode()):
            raise HTTPError(
                401, "this app needs its access token: open the full URL printed when it started (…/?token=…)"
            )
    if request.method in ("GET", "HEAD"):
        return
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise HTTPError(403, "cross-site request refused")
    origin = request.headers.get("origin")
    if origin is not None and origin not in (f"http://{host}", f"https://{host}"):
        raise HTTPError(403, f"request from another site ({origin!r}) refused")
    token = request.headers.get("x-csrf-token", "")
    if not hmac.compare_digest(token.encode(), state.csrf.encode()):
        raise HTTPError(403, "missing or stale page token: reload the page")


def _page(state: _State, request):
    from starlette.responses import HTMLResponse

    html = resources.files("retrain").joinpath("ui_static/index.html").read_text(encoding="utf-8")
    html = html.replace("__CSRF_TOKEN__", state.csrf)
    response = HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: "
            "data:; media-src blob:; connect-src 'self'; frame-src 'self'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'",
            "Referrer-Policy": "no-referrer",
        },
    )
    if state.access_token and request.query_params.get("token"):
        response.set_cookie("retrain_ui_token", state.access_token, httponly=True, samesite="strict")
    return response


def _static(state: _State, request):
    from starlette.responses import Response

    name = request.path_params["name"]
    if name not in _STATIC:
        raise HTTPError(404, f"no file {name!r}")
    data = resources.files("retrain").joinpath(f"ui_static/{name}").read_bytes()
    return Response(data, media_type=_STATIC[name], headers={"Cache-Control": "no-cache"})


def _api_state(state: _State, request) -> dict:
    project = state.project
    runs = sorted((d for d in project.runs.iterdir() if d.is_dir()), key=lambda d: d.name, reverse=True)
    busy = state.jobs.current()
    return {
        "project": str(project.root),
        "image_dir": str(project.image_dir),
        "own_photos": project.own_photos,
        "classes": _class_counts(project.image_dir),
        "training": busy["run"] if busy else None,
        "runs": [_run_summary(d) for d in runs[:50]],
        "backbones": _backbones(),
        "defaults": {k: v for k, v in _defaults().items() if k in TRAIN_SETTINGS},
        "features": _features_available(),
        "max_upload_bytes": state.max_upload_bytes,
    }


def _class_counts(image_dir: Path) -> list[dict]:
    """Class folders and their image-named files, from a directory listing only (fast on large folders)."""
    from retrain.images import is_image_file_name

    out = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                n = sum(1 for _, _, files in os.walk(entry.path) for f in files if is_image_file_name(f))
                out.append({"name": entry.name, "count": n})
    return out


def _backbones() -> list[str]:
    from retrain.backbones import available_backbones

    return list(available_backbones())


def _defaults() -> dict:
    from retrain.config import TrainConfig

    return dataclasses.asdict(TrainConfig())


def _features_available() -> dict:
    """Which of the other parts of retrain this installation has (the page hides or marks the rest)."""
    import importlib.util

    return {
        name: importlib.util.find_spec(f"retrain.{name}") is not None
        for name in ("relabel", "report", "calibration")
    }


def _run_summary(run_dir: Path) -> dict:
    info = run_status(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    return {
        "id": run_dir.name,
        "status": info["status"],
        "resumable": info["resumable"],
        "test_accuracy": metrics.get("test_accuracy"),
        "started": info.get("started"),
        "architecture": (info.get("settings") or {}).get("architecture"),
    }


def _api_check(state: _State, request) -> dict:
    return {"image_dir": str(state.project.image_dir), **state.checker.check(state.project.image_dir)}


async def _api_source(state: _State, request) -> dict:
    body = await _json_body(request)
    if body.get("own"):
        state.project.save_settings(image_dir="")
        return {"image_dir": str(state.project.photos)}
    folder = Path(str(body.get("image_dir") or "")).expanduser()
    if not str(folder) or not folder.is_absolute():
        raise HTTPError(
            400,
            f"folder {str(folder)!r}: give the full path of a folder of class folders, e.g. "
            "/home/me/flower_photos",
        )
    if not folder.is_dir():
        raise HTTPError(400, f"folder {str(folder)!r} does not exist or is not a folder")
    state.project.save_settings(image_dir=str(folder.resolve()))
    return {"image_dir": str(folder.resolve())}


async def _json_body(request) -> dict:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise HTTPError(413, "request too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise HTTPError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    return body


def _need_own_photos(state: _State) -> None:
    if not state.project.own_photos:
        raise HTTPError(
            409,
            f"the photo folder in use is your own ({state.project.image_dir}), which this app "
            "never writes to; switch to the project's photos on the Data step to add classes",
        )


async def _api_create_class(state: _State, request) -> dict:
    _need_own_photos(state)
    name = check_class_name((await _json_body(request)).get("name"))
    folder = state.project.photos / name
    existed = folder.exists()
    folder.mkdir(exist_ok=True)
    return {"name": name, "created": not existed}


async def _api_upload(state: _State, request) -> dict:
    """Photos into a class of the project: each checked to be an image; names sanitised; nothing overwritten."""
    _need_own_photos(state)
    name = check_class_name(request.path_params["name"])
    folder = state.project.photos / name
    if not folder.is_dir():
        raise HTTPError(404, f"no class {name!r}: create it first")
    files = await _read_files(request, state.max_upload_bytes)
    saved, rejected = [], []
    for filename, data in files:
        clean = safe_file_name(filename)
        fmt = _image_format(data) if data else ""
        if not fmt:
            rejected.append(
                {
                    "file": filename,
                    "reason": "not an image (JPEG, PNG, WebP, BMP, GIF or TIFF expected)"
                    if data
                    else "empty file",
                }
            )
            continue
        from retrain.images import is_image_file_name

        if not is_image_file_name(clean):
            clean += {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}.get(
                fmt, ".img"
            )
        path = _write_new(folder, clean, data)
        saved.append(path.name)
    return {"class": name, "saved": saved, "rejected": rejected}


async def _read_files(request, limit: int) -> list[tuple[str | None, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartParser

    mb = f"{limit / 2**20:g} MB"
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPError(
            413,
            f"upload of {int(declared) / 2**20:.0f} MB is over the limit of {mb} per upload; "
            "send fewer or smaller photos at a time",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPError(
                413, f"upload is over the limit of {mb} per upload; send fewer or smaller photos at a time"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise HTTPError(415, "send the photos as a multipart/form-data form (as the page does)")

    async def replay():
        yield body

    try:
        form = await MultiPartParser(
            request.headers, replay(), max_files=MAX_FILES_PER_UPLOAD, max_fields=16, max_part_size=64 * 1024
        ).parse()
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors
        raise HTTPError(
            400,
            f"malformed upload ({getattr(exc, 'message', None) or exc}); at most "
            f"{MAX_FILES_PER_UPLOAD} files per upload",
        ) from None
    try:
        return [(v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)]
    finally:
        await form.close()


def _root_for(state: _State, request) -> Path:
    run = request.query_params.get("run")
    if run:
        info = _read_json(_inside(state.project.runs, run) / RUN_FILE)
        if info.get("image_dir"):
            return Path(info["image_dir"])
    return state.project.image_dir


def _api_images(state: _State, request) -> dict:
    """One page of a class's images (sorted names), so a 10,000-photo class never reaches the page at once."""
    from retrain.images import is_image_file_name

    name = check_class_name(request.query_params.get("class", ""))
    root = _root_for(state, request)
    folder = _inside(root, name)
    try:
        page = max(0, int(request.query_params.get("page", "0")))
    except ValueError:
        page = 0
    names = []
    for top, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_top = os.path.relpath(top, root).replace(os.sep, "/")
        names.extend(f"{rel_top}/{f}" for f in files if is_image_file_name(f) and not f.startswith("."))
    names.sort()
    return {
        "class": name,
        "page": page,
        "pages": max(1, -(-len(names) // PAGE_SIZE)),
        "total": len(names),
        "images": names[page * PAGE_SIZE : (page + 1) * PAGE_SIZE],
    }


def _api_thumb(state: _State, request):
    """A small JPEG of one image, made on first request and cached under the project by path, size and mtime."""
    from starlette.responses import Response

    from retrain.images import is_image_file_name

    root = _root_for(state, request)
    rel = request.query_params.get("path", "")
    path = _inside(root, rel)
    if not is_image_file_name(path.name) or not path.is_file():
        raise HTTPError(404, f"no image {rel!r}")
    st = path.stat()
    key = hashlib.sha1(
        f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape")
    ).hexdigest()
    cached = state.project.root / "thumbs" / key[:2] / f"{key}.jpg"
    if not cached.exists():
        data = _make_thumb(path)
        cached.parent.mkdir(exist_ok=True)
        tmp = cached.with_name(f".{key}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, cached)
    return Response(
        cached.read_bytes(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"}
    )


def _make_thumb(path: Path) -> bytes:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))  # JPEG: decode at a fraction of the size
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((THUMB_PX, THUMB_PX))
            out = io.BytesIO()
            img.save(out, "JPEG", quality=80)
            return out.getvalue()
    except Exception:  # noqa: BLE001 - a file that cannot be shown gets a grey square
        out = io.BytesIO()
        Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200)).save(out, "JPEG")
        return out.getvalue()


async def _api_train(state: _State, request) -> dict:
    body = await _json_body(request)
    if body.get("resume"):
        return {"run": state.jobs.start({}, resume_run=str(body["resume"]))}
    settings = {**state.project.train_defaults}
    for key, value in (body.get("settings") or {}).items():
        kind = TRAIN_SETTINGS.get(key)
        if kind is None:
            raise HTTPError(400, f"unknown setting {key!r}; known: {', '.join(TRAIN_SETTINGS)}")
        try:
            settings[key] = (value in (True, "true", "on", 1)) if kind is bool else kind(value)
        except (TypeError, ValueError):
            raise HTTPError(400, f"setting {key} must be a {kind.__name__}, got {value!r}") from None
    from retrain.config import TrainConfig

    try:
        TrainConfig(
            **{k: v for k, v in settings.items() if k in TrainConfig.field_names()},
            image_dir=str(state.project.image_dir),
        ).validate()
    except RetrainError as exc:
        raise HTTPError(400, str(exc)) from None
    check = state.checker.check(state.project.image_dir)
    if not check["ready"]:
        raise HTTPError(400, f"cannot train yet: {check['problem']}")
    return {"run": state.jobs.start(settings)}


def _api_cancel(state: _State, request) -> dict:
    return {"cancelled": state.jobs.cancel()}


def _run_dir(state: _State, request) -> Path:
    run_dir = _inside(state.project.runs, request.path_params["run"])
    if not run_dir.is_dir():
        raise HTTPError(404, f"no run {request.path_params['run']!r}")
    return run_dir


def _api_events(state: _State, request) -> dict:
    run_dir = _run_dir(state, request)
    try:
        since = max(0, int(request.query_params.get("since", "0")))
    except ValueError:
        since = 0
    status = run_status(run_dir)["status"]  # before the events: a run seen ended has written all of them
    events, offset = read_events(run_dir, since)
    return {"run": run_dir.name, "status": status, "events": events, "next": offset}


def _api_run(state: _State, request) -> dict:
    run_dir = _run_dir(state, request)
    info = run_status(run_dir)
    files = sorted(
        p.name
        for p in run_dir.iterdir()
        if p.is_file() and p.suffix in _DOWNLOADABLE and not p.name.startswith(".") and p.name != RUN_FILE
    )
    return {
        "id": run_dir.name,
        "status": info["status"],
        "resumable": info["resumable"],
        "error": info.get("error", ""),
        "settings": info.get("settings", {}),
        "image_dir": info.get("image_dir"),
        "metrics": _read_json(run_dir / "metrics.json") or None,
        "confusion": _read_json(run_dir / CONFUSION_FILE) or None,
        "has_report": (run_dir / "report.html").exists(),
        "files": files,
        "model": "output_graph.onnx" if (run_dir / "output_graph.onnx").exists() else None,
    }


async def _api_classify(state: _State, request) -> dict:
    run_dir = _run_dir(state, request)
    model = run_dir / "output_graph.onnx"
    if not model.exists():
        raise HTTPError(409, f"run {run_dir.name} has no model yet: train it to the end first")
    files = await _read_files(request, 25 * 2**20)
    if len(files) != 1:
        raise HTTPError(400, "send exactly one photo")
    import asyncio

    result = await asyncio.get_running_loop().run_in_executor(None, _classify, state, model, files[0])
    return _with_label_set(state, model, result)


def _with_label_set(state: _State, model: Path, result: dict) -> dict:
    """A multi-label model's answer also has ``labels`` (those at or above their threshold, best first,
    as :class:`retrain.predict.Ranked` chooses them) and each label's ``thresholds``."""
    clf = state.models.get((str(model), model.stat().st_mtime_ns))
    if clf is None or not getattr(clf, "multi_label", False):
        return result
    thresholds = dict(zip(clf.labels, (float(t) for t in clf.thresholds)))
    result["labels"] = [p["label"] for p in result["predictions"] if p["score"] >= thresholds[p["label"]]]
    result["thresholds"] = thresholds
    return result


def _classify(state: _State, model: Path, file: tuple[str | None, bytes]) -> dict:
    from retrain.images import ImageError
    from retrain.predict import load

    key = (str(model), model.stat().st_mtime_ns)
    if key not in state.models:
        state.models.clear()
        state.models[key] = load(model)
    clf = state.models[key]
    try:
        (preds,) = clf.classify(file[1], top_k=None)
    except ImageError as exc:
        raise HTTPError(
            422,
            f"{file[0]!r} cannot be classified: {exc.reason}; send a JPEG, PNG, WebP, BMP, GIF or TIFF photo",
        ) from None
    out = [
        {k: v for k, v in dataclasses.asdict(p).items() if isinstance(v, (str, int, float, bool, type(None)))}
        for p in preds
    ]
    # Models with an open-world output (retrain's calibration work) say whether the photo fits no class.
    threshold = getattr(clf, "unknown_threshold", None)
    return {
        "file": file[0],
        "predictions": out,
        "unknown": getattr(preds, "unknown", None),
        "unknown_score": getattr(preds, "unknown_score", None),
        "unknown_threshold": threshold if threshold is not None and math.isfinite(threshold) else None,
    }


def _api_file(state: _State, request):
    from starlette.responses import FileResponse

    run_dir = _run_dir(state, request)
    name = request.path_params["name"]
    path = run_dir / name
    if (
        "/" in name
        or name.startswith(".")
        or path.suffix not in _DOWNLOADABLE
        or not path.is_file()
        or name == RUN_FILE
    ):
        raise HTTPError(404, f"run {run_dir.name} has no file {name!r}")
    if path.suffix == ".html":  # the run's report: shown in a sandboxed frame, never with this app's rights
        return FileResponse(
            path,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": "sandbox; default-src 'none'; img-src data: 'self'; "
                "style-src 'unsafe-inline'"
            },
        )
    return FileResponse(path, filename=name, content_disposition_type="attachment")


# -- fix: suspected label errors and duplicates, through retrain.relabel ---------------------------------
FIXES_FILE = "ui_fixes.jsonl"


def _relabel_module():
    try:
        from retrain import relabel
    except ImportError:
        raise HTTPError(
            501, "not available in this version: reviewing label errors needs retrain's relabel module"
        ) from None
    return relabel


def _rel_to(root: Path, path: str) -> str | None:
    with contextlib.suppress(ValueError):
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    return None


def _fixes(run_dir: Path) -> list[dict]:
    out = []
    with contextlib.suppress(OSError):
        for line in (run_dir / FIXES_FILE).read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _api_issues(state: _State, request) -> dict:
    """One page of the run's suspected label errors (label_issues.csv, most suspect first; ``all=1``: every
    photo of the run, the least believed label first) and its duplicates."""
    import csv

    run_dir = _run_dir(state, request)
    root = Path(run_status(run_dir).get("image_dir") or state.project.image_dir)
    available = _features_available()["relabel"]
    decided = {}
    for fix in _fixes(run_dir):  # the latest decision per file; an undone one no longer counts
        decided[fix["path"]] = None if fix.get("undone") else fix
    try:
        page = max(0, int(request.query_params.get("page", "0")))
    except ValueError:
        page = 0

    def read(name: str) -> list[dict]:
        with contextlib.suppress(OSError), open(run_dir / name, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
        return []

    from retrain.runaudit import SUSPECT_SCORE

    issues = []
    for row in read("label_issues.csv"):  # every photo of the run, the least believed label first
        rel = _rel_to(root, row.get("path", ""))
        if rel:
            try:
                suspect = float(row.get("score", "")) >= SUSPECT_SCORE
            except ValueError:
                suspect = False
            issues.append(
                {
                    "path": rel,
                    "given": row.get("given_label", ""),
                    "suggested": row.get("suggested_label", ""),
                    "score": row.get("score", ""),
                    "suspect": suspect,
                    "decision": decided.get(rel),
                }
            )
    dups = []
    for row in read("duplicates.csv"):
        a, b = _rel_to(root, row.get("path_a", "")), _rel_to(root, row.get("path_b", ""))
        if a and b:
            dups.append(
                {
                    "a": a,
                    "b": b,
                    "kind": row.get("kind", ""),
                    "similarity": row.get("similarity", ""),
                    "label_a": row.get("label_a", ""),
                    "label_b": row.get("label_b", ""),
                    "decision_a": decided.get(a),
                    "decision_b": decided.get(b),
                }
            )
    per = 24
    everyone = request.query_params.get("all") == "1"  # else the suspects only
    shown = issues if everyone else [i for i in issues if i["suspect"]]
    return {
        "available": available,
        "has_audit": (run_dir / "label_issues.csv").exists(),
        "own_photos": root.resolve() == state.project.photos.resolve(),
        "image_dir": str(root),
        "classes": [c["name"] for c in _class_counts(root)],
        "page": page,
        "pages": max(1, -(-len(shown) // per)),
        "total": len(issues),
        "suspects": sum(1 for i in issues if i["suspect"]),
        "suspect_score": round(SUSPECT_SCORE, 4),
        "all": everyone,
        "issues": shown[page * per : (page + 1) * per],
        "duplicates": dups[:200],
    }


async def _api_fix(state: _State, request) -> dict:
    """keep / move to a class / set aside one image; the move is relabel's, with its undo log."""
    body = await _json_body(request)
    return await _in_thread(_fix, state, _run_dir(state, request), body)


async def _in_thread(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _fix(state: _State, run_dir: Path, body: dict) -> dict:
    import csv

    relabel = _relabel_module()
    root = Path(run_status(run_dir).get("image_dir") or state.project.image_dir)
    rel, action = str(body.get("path", "")), body.get("action")
    src = _inside(root, rel)
    if not src.is_file():
        raise HTTPError(404, f"no image {rel!r} (moved already?)")
    record = {"path": rel, "action": action, "t": time.time()}
    if action == "move":
        target = check_class_name(body.get("to"))
        if not (root / target).is_dir():
            raise HTTPError(400, f"no class folder {target!r} to move {rel!r} into")
        record["to"] = target
    elif action not in ("keep", "set_aside"):
        raise HTTPError(400, f"action {action!r}: use keep, move or set_aside")
    if action != "keep":
        # One folder per decision: relabel names its undo log by the second, beside the CSV it is given.
        folder = run_dir / "fixes" / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True)
        plan = folder / "decision.csv"
        with open(plan, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "suggested_label", "action"])
            w.writerow([str(src), record.get("to", ""), "move" if action == "move" else "remove"])
        result = relabel.relabel(plan, image_dir=root)
        record["log"] = str(result.log_path)
        record["moved_to"] = [b for _, b in result.moved]
    with open(run_dir / FIXES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    return record


async def _api_undo(state: _State, request) -> dict:
    """Undo the newest decision not undone yet (a move is put back by relabel.undo)."""
    run_dir = _run_dir(state, request)
    return await _in_thread(_undo, run_dir)


def _undo(run_dir: Path) -> dict:
    fixes = _fixes(run_dir)
    undone = {f["t"] for f in fixes if f.get("undone")}
    todo = [f for f in fixes if not f.get("undone") and f["t"] not in undone]
    if not todo:
        raise HTTPError(409, "nothing to undo")
    last = todo[-1]
    problems: list[str] = []
    if last.get("log"):
        _, problems = _relabel_module().undo(last["log"])
    with open(run_dir / FIXES_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps({"path": last["path"], "undone": True, "t": last["t"]}) + "\n")
    return {"undone": last, "problems": problems}


# -- running it -------------------------------------------------------------------------------------------
def run_ui(
    project_dir: str | os.PathLike = "retrain_project",
    *,
    image_dir: str | os.PathLike | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    open_browser: bool | None = None,
    ready=None,
    log_level: str = "warning",
) -> None:
    """Run the app until interrupted; print its URL (with the access token when not on loopback) and, on a
    desktop, open it in the browser."""
    import uvicorn

    from retrain.serve import bind_socket

    token = None if host in _LOOPBACK else secrets.token_urlsafe(18)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    hosts = None
    if token is None:
        hosts = [f"{h}:{bound_port}" for h in ("127.0.0.1", "localhost", "[::1]")]
    app = create_ui_app(project_dir, image_dir=image_dir, access_token=token, allowed_hosts=hosts)
    shown = f"[{host}]" if ":" in host else ("127.0.0.1" if host in _LOOPBACK else host)
    url = f"http://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, server_header=False))
    print(f"retrain ui: project {app.state.ui.project.root}", flush=True)
    print(f"Open {url} (Ctrl+C to stop)", flush=True)
    if token:
        print(
            "Not on loopback: the address above carries this start's access token; share it only with people "
            "who may use this app.",
            flush=True,
        )
    if ready:
        ready(url)
    if open_browser is None:
        open_browser = bool(
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        ) and not os.environ.get("CI")
    if open_browser:
        import webbrowser

        threading.Timer(0.5, lambda: webbrowser.open(url)).start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m retrain.ui worker RUN_DIR (started by `retrain ui`)")

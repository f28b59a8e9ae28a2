"""Failures a run must survive: kill -9 mid-extraction, two runs sharing a cache, a full disk or a crash while
writing, an output location that cannot be written. Nothing half-written is ever left behind or read back.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import retrain
import retrain.cache
import retrain.features
from conftest import TINY, make_image_folder
from retrain.cache import BottleneckStore, content_key
from retrain.cli import retrain_main
from retrain.errors import RetrainError

TESTS = Path(__file__).resolve().parent
RUNNER = (
    f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest; "
    "from retrain.cli import retrain_main; sys.exit(retrain_main())"
)


# The clock every run reads its folder name from, stopped at one second: runs started together then
# always want the same ./retrain_runs/<time> (without it they collide only when they start in one second).
FROZEN_STAMP = "20260101-000000"
FROZEN_CLOCK = (
    "import time; _strftime = time.strftime; "
    f"time.strftime = lambda f, *a: {FROZEN_STAMP!r} if f == '%Y%m%d-%H%M%S' else _strftime(f, *a); "
)


def start(*args: str, cwd: Path, frozen_clock: bool = False) -> subprocess.Popen:
    """``retrain ARGS`` in a fresh interpreter (the tiny test backbone is registered there too)."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    code = (FROZEN_CLOCK if frozen_clock else "") + RUNNER
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=600)
    assert "Traceback" not in out + err, out + err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def bottleneck_counts(stdout: str) -> tuple[int, int]:
    """(computed, reused) from the "Bottlenecks: ..." line."""
    m = re.search(r"^Bottlenecks: (\d+) computed\b.*?, (\d+) reused", stdout, re.M)
    if m:
        return int(m[1]), int(m[2])
    m = re.search(r"^Bottlenecks: all (\d+) reused", stdout, re.M)
    assert m, stdout
    return 0, int(m[1])


def final_accuracy(stdout: str) -> float:
    return float(re.search(r"^Final test accuracy = ([\d.]+)%", stdout, re.M)[1])


def head_weights(model_path: Path) -> np.ndarray:
    model = onnx.load(str(model_path))
    return next(
        numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "final_retrain_ops/weights"
    )


def shards(bottleneck_dir: Path) -> list[Path]:
    return sorted(bottleneck_dir.glob("*/shard-*.npz"))


def all_load(paths: list[Path]) -> bool:
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            z["keys"], z["features"]
    return True


# -- kill -9 and resume -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_during_extraction_then_the_same_command_resumes_to_the_same_model(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", per_class=100, size=32)  # 300 images
    common = [
        "--image_dir",
        str(images),
        "--how_many_training_steps",
        "200",
        "--seed",
        "5",
        "--batch_size",
        "8",
        "--quiet",
    ]
    reference = finish(
        start(
            *common,
            "--bottleneck_dir",
            str(tmp_path / "bn_ref"),
            "--output_dir",
            str(tmp_path / "out_ref"),
            cwd=tmp_path,
        )
    )
    assert reference.returncode == 0, reference.stderr
    assert bottleneck_counts(reference.stdout) == (300, 0)

    args = [*common, "--bottleneck_dir", str(tmp_path / "bn"), "--output_dir", str(tmp_path / "out")]
    victim = start(*args, cwd=tmp_path)
    deadline = time.monotonic() + 300
    while not shards(tmp_path / "bn") and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "out" / "output_graph.onnx").exists()
    left = shards(tmp_path / "bn")
    assert left and all_load(left)  # whole shards only; a write cut short stays a hidden .tmp file

    resumed = finish(start(*args, cwd=tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    computed, reused = bottleneck_counts(resumed.stdout)
    assert reused > 0 and computed + reused == 300 and computed < 300
    assert "ignoring" not in resumed.stdout  # no shard was unreadable
    assert final_accuracy(resumed.stdout) == final_accuracy(reference.stdout)
    assert (tmp_path / "out" / "output_labels.txt").read_text() == (
        tmp_path / "out_ref" / "output_labels.txt"
    ).read_text()
    # Resumed batches line up with the uninterrupted run's, so even the floating point is the same.
    np.testing.assert_array_equal(
        head_weights(tmp_path / "out" / "output_graph.onnx"),
        head_weights(tmp_path / "out_ref" / "output_graph.onnx"),
    )
    probe = sorted(images.rglob("*.jpg"))[::25]
    got = [p.score for r in retrain.load(tmp_path / "out" / "output_graph.onnx").classify(probe) for p in r]
    want = [
        p.score for r in retrain.load(tmp_path / "out_ref" / "output_graph.onnx").classify(probe) for p in r
    ]
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_ctrl_c_during_extraction_keeps_finished_entries(tmp_path: Path):
    """SIGINT: exit 130 with a one-line message, finished batches are kept, the same command resumes."""
    images = make_image_folder(tmp_path / "images", per_class=40, size=32)  # 120 images
    args = [
        "--image_dir",
        str(images),
        "--architecture",
        TINY,
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--model_dir",
        str(tmp_path / "m"),
        "--output_dir",
        str(tmp_path / "out"),
        "--batch_size",
        "4",
        "--num_workers",
        "1",
        "--how_many_training_steps",
        "50",
        "--quiet",
    ]
    # Each batch takes 50 ms longer, and the first one leaves a mark: time to interrupt, and a moment to do it.
    slow = (
        "import time, pathlib, retrain.engines as f; run = f.OnnxEngine.__call__; "
        "f.OnnxEngine.__call__ = lambda self, x: (pathlib.Path('started').touch(), time.sleep(0.05), "
        "run(self, x))[2]; "
    )
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    # SIGINT back to its default in the child: a shell's background job (`cmd &`) ignores it, and Python
    # then installs no KeyboardInterrupt handler, so the test would pass or fail by how it was launched.
    proc = subprocess.Popen(
        [sys.executable, "-c", slow + RUNNER, *args],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # not earlier: a SIGINT that lands inside some C extension's import can be lost
    proc.send_signal(signal.SIGINT)
    run = finish(proc)
    assert run.returncode == 130, run.stdout + run.stderr
    assert "interrupted; finished cache entries are kept" in run.stderr
    resumed = finish(start(*args, cwd=tmp_path))
    computed, reused = bottleneck_counts(resumed.stdout)
    assert resumed.returncode == 0 and reused > 0 and computed > 0 and computed + reused == 120


def test_torn_or_bit_flipped_cache_shards_are_never_read(
    tmp_path: Path, colour_dir: Path, fast_config, caplog
):
    first = retrain.train(colour_dir, **fast_config)
    (shard,) = shards(tmp_path / "bottlenecks")
    data = shard.read_bytes()
    (shard.parent / "shard-torn.npz").write_bytes(data[: len(data) // 2])  # what a non-atomic writer leaves
    with np.load(shard) as z:
        row = z["features"][3].tobytes()
    flipped = bytearray(data)
    flipped[data.index(row) + 5] ^= 0x10  # a bit rotted on disk, inside a feature row
    shard.write_bytes(bytes(flipped))
    again = retrain.train(colour_dir, **fast_config)
    assert "ignoring unreadable cache shard" in caplog.text and "shard-torn.npz" in caplog.text
    assert "Bad CRC-32" in caplog.text
    assert again.test_accuracy == first.test_accuracy
    assert np.array_equal(head_weights(again.output_graph), head_weights(first.output_graph))


def test_file_edited_mid_run_is_never_cached_under_its_old_content(
    colour_dir, fast_config, monkeypatch, caplog
):
    """A file rewritten between two runs (a scraper still writing) is keyed by the bytes that were decoded:
    each file is read once, hashed and decoded from the same bytes, so old and new content never mix."""
    victim = colour_dir / "red" / "img_003.jpg"
    other = (colour_dir / "blue" / "img_003.jpg").read_bytes()
    real_read, reads = retrain.features.read_image_bytes, []

    def read(path, *args, **kwargs):
        reads.append(os.fspath(path))
        return other if os.fspath(path) == str(victim) else real_read(path, *args, **kwargs)

    monkeypatch.setattr(retrain.features, "read_image_bytes", read)
    caplog.set_level("INFO", logger="retrain")
    first = retrain.train(colour_dir, **fast_config)
    assert reads.count(str(victim)) == 1 and not first.skipped
    monkeypatch.undo()
    caplog.clear()
    retrain.train(colour_dir, **fast_config)
    assert "Bottlenecks: 1 computed" in caplog.text  # its real content was not in the cache


# -- two runs at once -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_runs_at_once_share_a_bottleneck_dir_and_never_share_an_output_folder(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", per_class=30, size=32)  # 90 images
    args = [
        "--image_dir",
        str(images),
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--how_many_training_steps",
        "200",
        "--seed",
        "7",
        "--batch_size",
        "8",
        "--quiet",
    ]
    # No --output_dir, and a clock stopped at one second: both want ./retrain_runs/20260101-000000.
    runs = [
        finish(p)
        for p in [
            start(*args, cwd=tmp_path, frozen_clock=True),
            start(*args, cwd=tmp_path, frozen_clock=True),
        ]
    ]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
        assert sum(bottleneck_counts(run.stdout)) == 90
        assert final_accuracy(run.stdout) == 100.0
    run_dirs = sorted(
        p for p in (tmp_path / "retrain_runs").iterdir() if p.name != "latest" and p.name[0] != "."
    )
    assert [d.name for d in run_dirs] == [
        FROZEN_STAMP,
        f"{FROZEN_STAMP}-2",
    ]  # the collision happened, and was avoided
    written = sorted(
        str(Path(line.split("Wrote the model to ", 1)[1].split(" and its labels")[0]).parent)
        for run in runs
        for line in run.stdout.splitlines()
        if line.startswith("Wrote the model to ")
    )
    assert written == [
        str(Path("retrain_runs") / d.name) for d in run_dirs
    ]  # each run reports its own folder
    for d in run_dirs:
        assert (d / "output_labels.txt").read_text().split() == ["blue", "green", "red"]
        assert json.loads((d / "metrics.json").read_text())["test_accuracy"] == 1.0
    assert np.array_equal(
        head_weights(run_dirs[0] / "output_graph.onnx"), head_weights(run_dirs[1] / "output_graph.onnx")
    )
    # The shared cache is whole: a third run computes nothing.
    assert all_load(shards(tmp_path / "bn"))
    third = finish(start(*args, "--output_dir", str(tmp_path / "third"), cwd=tmp_path))
    assert bottleneck_counts(third.stdout) == (0, 90)


def _writer(directory: str, worker: int, n: int) -> None:
    store = BottleneckStore(directory, 4, flush_every=3)
    for i in range(n):
        key = content_key(f"{worker}-{i}".encode())
        store.put_many([key], np.full((1, 4), worker * 1000 + i, np.float32))
        if i % 7 == 0:
            store.compact(min_shards=2)  # merges and deletes shards other writers just wrote
            store.refresh()
    store.compact(min_shards=2)


def test_cache_stays_whole_when_writers_compact_each_other(tmp_path: Path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = BottleneckStore(tmp_path, 4)
    store.refresh()
    for w in range(4):
        keys = [content_key(f"{w}-{i}".encode()) for i in range(60)]
        assert np.array_equal(store.get_many(keys)[:, 0], w * 1000 + np.arange(60))


# -- a crash or a full disk while writing -----------------------------------------------------------------


class _HalfWriter:
    """A file whose write() stores half the bytes and then fails, as on a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _fail_writes_to(monkeypatch, name: str | None, how: str) -> None:
    """Make atomic writes of files called ``name`` (None: any) fail half-way through the data, or at the rename."""
    real_fdopen, real_replace = os.fdopen, os.replace

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        temporary = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))  # ".NAME.RANDOM.tmp"
        hit = name is None or temporary.startswith(f".{name}.")
        return _HalfWriter(f) if how == "write" and hit else f

    def replace(src, dst, *args, **kwargs):
        if how == "replace" and os.path.basename(os.fsdecode(dst)) in (name, None):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(retrain.cache.os, "fdopen", fdopen)
    monkeypatch.setattr(retrain.cache.os, "replace", replace)


def _temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.tmp"))


@pytest.mark.parametrize("how", ["write", "replace"])
@pytest.mark.parametrize("name", ["output_graph.onnx", "output_labels.txt"])
def test_failed_output_write_keeps_the_previous_file_whole(
    tmp_path, colour_dir, fast_config, monkeypatch, how, name
):
    out = Path(fast_config["output_dir"])
    retrain.train(colour_dir, **fast_config)
    before = {p.name: p.read_bytes() for p in (out / "output_graph.onnx", out / "output_labels.txt")}
    make_image_folder(colour_dir, classes={"purple": (150, 40, 160)}, seed=3)  # next model: new bytes in both
    _fail_writes_to(monkeypatch, name, how)
    with pytest.raises(OSError):
        retrain.train(colour_dir, **fast_config)
    assert (out / name).read_bytes() == before[name]  # the old file, whole
    assert _temporaries(out) == []  # and no half-written leftovers
    assert retrain.load(out / "output_graph.onnx").labels in (
        ["blue", "green", "red"],
        ["blue", "green", "purple", "red"],
    )


def test_full_disk_while_caching_leaves_no_partial_entry_and_a_clear_error(
    tmp_path, colour_dir, fast_config, monkeypatch, capsys
):
    _fail_writes_to(monkeypatch, None, "write")  # every atomic write: the first is a cache shard
    args = [f"--{k}={v}" for k, v in fast_config.items() if not isinstance(v, bool)] + ["--quiet"]
    code = retrain_main(["--image_dir", str(colour_dir), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "No space left on device" in err and "Traceback" not in err and "internal error" not in err
    bn = Path(fast_config["bottleneck_dir"])
    assert shards(bn) == [] and _temporaries(bn) == []
    monkeypatch.undo()
    again = retrain.train(colour_dir, **fast_config)  # space freed: the same command works
    assert again.test_accuracy is not None and len(shards(bn)) >= 1


def test_resume_from_a_damaged_checkpoint_is_a_clear_error(colour_dir, fast_config):
    fast_config = {**fast_config, "head_solver": "steps"}  # the step-trained layer's checkpoint
    retrain.train(colour_dir, **fast_config)
    checkpoint = Path(fast_config["output_dir"]) / "checkpoint.npz"
    for damage in (b"garbage\n", checkpoint.read_bytes()[:100]):
        checkpoint.write_bytes(damage)
        with pytest.raises(RetrainError, match="checkpoint .* is damaged or not a retrain checkpoint"):
            retrain.train(colour_dir, resume=True, **fast_config)


# -- an output location that cannot be written --------------------------------------------------------------


@pytest.mark.slow
def test_unwritable_output_fails_before_extraction(tmp_path: Path):
    images = make_image_folder(tmp_path / "images", per_class=4, size=32)
    (tmp_path / "a_file").write_text("not a folder")
    base = ["--image_dir", str(images), "--architecture", TINY, "--model_dir", str(tmp_path / "m"), "--quiet"]
    cases = {
        "output_dir": ["--output_dir", str(tmp_path / "a_file" / "run")],
        "output_graph": [
            "--output_dir",
            str(tmp_path / "ok"),
            "--output_graph",
            "/proc/retrain-test/model.onnx",
        ],
        "output_labels": [
            "--output_dir",
            str(tmp_path / "ok"),
            "--output_labels",
            str(tmp_path / "a_file" / "l.txt"),
        ],
        "summaries_dir": [
            "--output_dir",
            str(tmp_path / "ok"),
            "--summaries_dir",
            str(tmp_path / "a_file" / "s"),
        ],
    }
    procs = {
        name: start(*base, "--bottleneck_dir", str(tmp_path / f"bn_{name}"), *extra, cwd=tmp_path)
        for name, extra in cases.items()
    }
    for name, proc in procs.items():
        run = finish(proc)
        assert run.returncode == 2, (name, run.stdout, run.stderr)
        assert re.search(r"^error: cannot write to '.*' \(.+\)\. Choose a writable location", run.stderr), (
            run.stderr
        )
        assert "Bottlenecks:" not in run.stdout  # it stopped before the long work
        assert not (tmp_path / f"bn_{name}").exists()

"""Feature extraction plumbing with a stand-in engine: the stat memo, parallel workers, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import retrain.engines as engines
import retrain.features as features
from conftest import TINY, make_image_folder
from retrain.backbones import get_backbone
from retrain.cache import BottleneckStore, content_key, namespace_for
from retrain.feature_cache import cache_namespace
from retrain.images import DECODE_VERSION
from retrain.keymemo import FileKeyMemo


def _engine(pixels: np.ndarray) -> np.ndarray:
    return np.repeat(pixels.mean(axis=(1, 2)), 16 // 3 + 1, axis=1)[:, :16].astype(np.float32)  # (N, 16)


class _Parallel:
    concurrency = 2

    def __call__(self, pixels):
        return _engine(pixels)


def _run(paths, store, factory=lambda: _engine, **kw):
    return features.compute_features(
        paths, get_backbone(TINY), store, engine_factory=factory, progress=False, **kw
    )


@pytest.fixture
def counted_hashing(monkeypatch):
    """Paths whose bytes extraction reads (each read is hashed)."""
    calls: list[str] = []
    real = features.read_image_bytes
    monkeypatch.setattr(
        features, "read_image_bytes", lambda p, *a, **k: (calls.append(p), real(p, *a, **k))[1]
    )
    monkeypatch.setattr(FileKeyMemo, "RACY_SECONDS", -60.0)  # trust files written just now
    return calls


def test_warm_run_reads_no_image_and_an_edit_is_noticed(tmp_path: Path, counted_hashing):
    paths = sorted(str(p) for p in make_image_folder(tmp_path / "img", per_class=4).rglob("*.jpg"))
    store = BottleneckStore(tmp_path / "bn", 16)
    first = _run(paths, store, _Parallel, batch_size=5)
    assert first.computed == 12 and len(counted_hashing) == 12
    counted_hashing.clear()
    second = _run(paths, BottleneckStore(tmp_path / "bn", 16))
    assert (second.computed, second.cached, counted_hashing) == (0, 12, [])
    assert second.keys == first.keys and list(second.keys) == paths
    edited = Path(paths[3])
    edited.write_bytes(Path(paths[0]).read_bytes())
    third = _run(paths, BottleneckStore(tmp_path / "bn", 16))
    assert counted_hashing == [paths[3]]
    assert third.keys[paths[3]] == content_key(edited.read_bytes()) == first.keys[paths[0]]


def test_damaged_memo_is_ignored(tmp_path: Path, counted_hashing):
    paths = sorted(str(p) for p in make_image_folder(tmp_path / "img", per_class=2).rglob("*.jpg"))
    _run(paths, BottleneckStore(tmp_path / "bn", 16))
    memo = tmp_path / "bn" / FileKeyMemo.FILE_NAME
    memo.write_bytes(memo.read_bytes()[:-7] + b"garbage")
    counted_hashing.clear()
    again = _run(paths, BottleneckStore(tmp_path / "bn", 16))
    assert again.cached == 6 and len(counted_hashing) == 6


def test_parallel_workers_match_one_worker_and_report_bad_files(tmp_path: Path):
    folder = make_image_folder(tmp_path / "img", per_class=7)
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    one = _run(paths, BottleneckStore(tmp_path / "a", 16), batch_size=4, workers=1)
    many = _run(paths, BottleneckStore(tmp_path / "b", 16), _Parallel, batch_size=3)
    assert one.computed == many.computed == 21
    assert set(one.skipped) == set(many.skipped) == {str(folder / "red" / "broken.jpg")}
    a, b = BottleneckStore(tmp_path / "a", 16), BottleneckStore(tmp_path / "b", 16)
    a.refresh()
    b.refresh()
    keys = list(one.keys.values())
    assert np.array_equal(a.get_many(keys), b.get_many(keys))


def test_engine_error_stops_the_run_and_keeps_finished_batches(tmp_path: Path):
    paths = sorted(str(p) for p in make_image_folder(tmp_path / "img", per_class=6).rglob("*.jpg"))
    calls = []

    def flaky(pixels):
        calls.append(len(pixels))
        if len(calls) == 3:
            raise RuntimeError("engine broke")
        return _engine(pixels)

    with pytest.raises(RuntimeError, match="engine broke"):
        _run(paths, BottleneckStore(tmp_path / "bn", 16), lambda: flaky, batch_size=2, workers=1)
    kept = BottleneckStore(tmp_path / "bn", 16)
    kept.refresh()
    assert len(kept) == 4  # the two batches before the failure were flushed


def test_cold_run_reads_each_file_once_and_duplicates_are_computed_once(tmp_path: Path, counted_hashing):
    folder = make_image_folder(tmp_path / "img", per_class=4)
    copy = folder / "red" / "copy_of_first.jpg"
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    copy.write_bytes(Path(paths[0]).read_bytes())
    paths.append(str(copy))
    calls = []
    table = _run(
        paths,
        BottleneckStore(tmp_path / "bn", 16),
        lambda: lambda px: (calls.append(len(px)), _engine(px))[1],
        batch_size=4,
        workers=1,
    )
    assert sorted(counted_hashing) == sorted(paths)  # one read per file: hashing and decoding share it
    assert table.computed == 12 and sum(calls) == 12  # the copy's content was computed once
    assert table.keys[str(copy)] == table.keys[paths[0]] and list(table.keys) == paths


def test_stale_memo_key_is_replaced_by_the_key_of_what_was_decoded(
    tmp_path: Path, counted_hashing, monkeypatch
):
    """If the memo ever names the wrong content, the features still go under the key of the bytes decoded."""
    paths = sorted(str(p) for p in make_image_folder(tmp_path / "img", per_class=2).rglob("*.jpg"))
    stale = b"\x01" * 20
    real_lookup = FileKeyMemo.lookup
    monkeypatch.setattr(
        FileKeyMemo,
        "lookup",
        lambda self, name, sig: stale if name.endswith(b"red/img_000.jpg") else real_lookup(self, name, sig),
    )
    store = BottleneckStore(tmp_path / "bn", 16)
    table = _run(paths, store)
    victims = [p for p in paths if p.endswith("red/img_000.jpg")]
    assert victims and table.computed == 6 and not table.skipped
    for path in victims:
        assert table.keys[path] == content_key(Path(path).read_bytes())
    store.refresh()
    assert stale not in store and all(key in store for key in table.keys.values())


def test_one_core_cpu_gets_the_cpu_batch_plan(tmp_path: Path, monkeypatch):
    """A CPU engine that runs one call at a time (one core) is still a CPU engine: CPU batches, one worker.
    (It used to be taken for a GPU, because the device was guessed from the engine's concurrency.)"""
    monkeypatch.setattr(engines, "cpu_cores", lambda: 1)
    paths = sorted(
        str(p) for p in make_image_folder(tmp_path / "img", per_class=10).rglob("*.jpg")
    )  # 30 files
    engine = engines.make_engine(get_backbone(TINY), device="cpu", model_dir=tmp_path / "models")
    assert (engine.device, engine.concurrency, engine.batch_size) == ("cpu", 1, engines.AUTO_BATCH["cpu"])
    batches, threads = [], set()
    real_call = type(engine).__call__

    def spy(self, pixels):
        import threading

        batches.append(len(pixels))
        threads.add(threading.current_thread().name)
        return real_call(self, pixels)

    monkeypatch.setattr(type(engine), "__call__", spy)
    table = _run(paths, BottleneckStore(tmp_path / "bn", 16), lambda: engine)
    assert table.computed == 30 and max(batches) == engines.AUTO_BATCH["cpu"] and len(threads) == 1


def test_engines_keep_their_features_apart_in_the_cache(tmp_path: Path, monkeypatch, colour_dir: Path):
    """ONNX Runtime on the CPU and PyTorch on a GPU differ by ~1e-5: a GPU run must not reuse CPU features."""
    spec = get_backbone(TINY)
    # The CPU engine keeps the namespace caches have always had (existing caches stay valid).
    assert cache_namespace(spec) == cache_namespace(spec, "onnxruntime-cpu")
    # Its identity is exactly these four facts (no engine key), so a new engine never renames old caches;
    # the decoder's version string moves with the installed Pillow/simplejpeg/OpenCV, so no literal hash here.
    lite0 = get_backbone("efficientnet_lite0")
    identity = dict(
        backbone=lite0.name, weights=lite0.weights_id, preprocessing=lite0.preprocessing.to_dict()
    )
    assert cache_namespace(lite0) == namespace_for(**identity, decoder=DECODE_VERSION)
    assert cache_namespace(spec, "torch-cuda") != cache_namespace(spec)
    kw = dict(architecture=TINY, bottleneck_dir=tmp_path / "bn", model_dir=tmp_path / "models")
    cpu = features.extract_features(colour_dir, **kw)  # a folder of class folders
    # A "GPU" run: PyTorch's engine (on the CPU here), as make_engine builds it for --device cuda.
    monkeypatch.setattr(features, "engine_kind", lambda device: "torch-cuda")
    monkeypatch.setattr(features, "make_engine", lambda spec, **_: engines.TorchEngine(spec, "cpu"))
    gpu = features.extract_features(sorted(str(p) for p in colour_dir.rglob("*.jpg")), **kw)
    assert cpu.computed == gpu.computed == 36 and gpu.cached == 0
    assert gpu.store.directory != cpu.store.directory
    paths = sorted(cpu.keys)
    a, b = cpu.matrix(paths), gpu.matrix(paths)
    np.testing.assert_allclose(a, b, atol=1e-4)  # close, yet computed and kept separately

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from retrain.backbones import get_backbone
from retrain.cache import BottleneckStore, content_key, namespace_for
from retrain.cli import retrain_main
from retrain.feature_cache import cache_namespace


def test_keys_depend_on_content_not_name():
    assert content_key(b"abc") == content_key(b"abc")
    assert content_key(b"abc") != content_key(b"abd")
    assert len(content_key(b"")) == 20


def test_namespace_changes_with_everything_that_decides_features():
    base = dict(backbone="b", weights="w1", preprocessing={"input_size": 224}, decoder="1")
    ns = namespace_for(**base)
    assert ns.startswith("b-")
    for field, other in (("weights", "w2"), ("preprocessing", {"input_size": 240}), ("decoder", "2")):
        assert namespace_for(**{**base, field: other}) != ns
    lite0, lite1 = get_backbone("efficientnet_lite0"), get_backbone("efficientnet_lite1")
    assert cache_namespace(lite0) != cache_namespace(lite1)


def test_store_round_trip_across_instances_and_compaction(tmp_path: Path):
    rng = np.random.default_rng(0)
    keys = [content_key(bytes([i])) for i in range(50)]
    feats = rng.random((50, 8), dtype=np.float32)
    a = BottleneckStore(tmp_path, 8, flush_every=10)
    for i in range(0, 50, 10):
        a.put_many(keys[i : i + 10], feats[i : i + 10])
    assert len(list(tmp_path.glob("shard-*.npz"))) == 5
    b = BottleneckStore(tmp_path, 8)
    b.refresh()
    assert np.array_equal(b.get_many(keys), feats)
    b.compact(min_shards=2)
    assert len(list(tmp_path.glob("shard-*.npz"))) == 1
    c = BottleneckStore(tmp_path, 8)
    c.refresh()
    assert np.array_equal(c.get_many(keys[::-1]), feats[::-1])


def test_corrupt_or_foreign_shards_are_ignored(tmp_path: Path):
    good = BottleneckStore(tmp_path, 4)
    good.put_many([content_key(b"x")], np.ones((1, 4), np.float32))
    good.flush()
    (tmp_path / "shard-broken.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    np.savez(tmp_path / "shard-wrongwidth.npz", keys=np.zeros((1, 20), np.uint8), features=np.ones((1, 7)))
    (tmp_path / ".shard-x.npz.123.tmp").write_bytes(b"half")  # a write interrupted by a crash
    fresh = BottleneckStore(tmp_path, 4)
    fresh.refresh()
    assert len(fresh) == 1 and content_key(b"x") in fresh


# -- read-only and shared caches --------------------------------------------------------------------------
TESTS = Path(__file__).resolve().parent
NOBODY = 65534


def _shared_folder() -> Path:
    """A folder outside pytest's root-only tmp tree, so that another user can reach what is inside."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="retrain-shared-cache-"))
    folder.chmod(0o755)
    return folder


def _as_a_reader_only(
    script: str, *args: str, cache: Path, writable: list[Path]
) -> subprocess.CompletedProcess:
    """Run ``script`` where ``cache`` really cannot be written: as another user when we are root (root ignores
    permission bits; the cache then belongs to root like a shared cache another user made), else after chmod."""
    import os
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    env["HOME"] = env["XDG_CACHE_HOME"] = str(writable[0])
    prefix: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv (util-linux): cannot make a folder truly read-only")
        for folder in writable:
            os.chown(folder, NOBODY, NOBODY)
        prefix = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    else:
        for folder in [cache, *cache.rglob("*")]:
            if folder.is_dir():
                folder.chmod(0o555)
    return subprocess.run(
        [*prefix, sys.executable, "-c", script, *args],
        env=env,
        cwd=writable[0],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _write_shards(directory: Path, n: int, dim: int, seed: int = 0) -> dict[bytes, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = {}
    store = BottleneckStore(directory, dim)
    for i in range(n):
        keys = [content_key(f"{seed}-{i}-{j}".encode()) for j in range(3)]
        feats = rng.random((3, dim), dtype=np.float32)
        store.put_many(keys, feats)
        store.flush()
        rows.update(zip(keys, feats))
    return rows


def test_read_only_store_reads_keeps_new_rows_in_memory_and_deletes_nothing():
    root = _shared_folder()
    try:
        cache, home = root / "cache", root / "home"
        home.mkdir()
        rows = _write_shards(cache, 9, 4)  # more than compaction's 8
        before = sorted(p.name for p in cache.iterdir())
        script = (
            "import sys, logging, numpy as np\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "from retrain.cache import BottleneckStore, content_key\n"
            "s = BottleneckStore(sys.argv[1], 4, flush_every=1)\n"
            "s.refresh(); print('read', len(s))\n"
            "s.put_many([content_key(b'new')], np.full((1, 4), 7, np.float32))\n"  # flush_every=1: writes now
            "s.flush(); s.compact(min_shards=2)\n"
            "print('new', s.get_many([content_key(b'new')])[0].tolist(), 'writable', s.writable)\n"
        )
        run = _as_a_reader_only(script, str(cache), cache=cache, writable=[home])
        assert run.returncode == 0, run.stderr
        assert f"read {len(rows)}" in run.stdout and "new [7.0, 7.0, 7.0, 7.0] writable False" in run.stdout
        assert run.stderr.count("cannot be written") == 1 and "kept in memory" in run.stderr
        assert sorted(p.name for p in cache.iterdir()) == before  # no shard merged away, none added
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_a_training_run_on_a_shared_cache_it_cannot_write(tmp_path: Path):
    """retrain with --bottleneck_dir on someone else's cache (enough shards for compaction): it trains,
    using the cached features and computing the new ones in memory."""
    from conftest import TINY, make_image_folder

    root = _shared_folder()
    try:
        images = make_image_folder(root / "images", per_class=6)
        cache, work = root / "cache", root / "work"
        work.mkdir()
        base = [
            "--architecture",
            TINY,
            "--bottleneck_dir",
            str(cache),
            "--how_many_training_steps",
            "20",
            "--quiet",
            "--model_dir",
            str(work / "models"),
        ]
        assert retrain_main([*base, "--image_dir", str(images), "--output_dir", str(tmp_path / "first")]) == 0
        (namespace,) = cache.iterdir()
        _write_shards(namespace, 8, get_backbone(TINY).feature_dim)  # an owner's cache of many runs
        make_image_folder(images, per_class=3, classes={"yellow": (220, 220, 30)}, seed=5)  # not cached yet
        before = sorted(p.name for p in namespace.iterdir())
        script = (
            "import sys, conftest\nfrom retrain.cli import retrain_main\nsys.exit(retrain_main(sys.argv[1:]))"
        )
        run = _as_a_reader_only(
            script,
            *base,
            "--image_dir",
            str(images),
            "--output_dir",
            str(work / "out"),
            cache=cache,
            writable=[work],
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Bottlenecks: 3 computed" in run.stdout and "18 reused" in run.stdout, run.stdout
        assert "cannot be written" in run.stdout and "Traceback" not in run.stdout + run.stderr
        assert (work / "out" / "output_graph.onnx").exists()
        assert sorted(p.name for p in namespace.iterdir()) == before
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_compaction_never_deletes_a_shard_that_failed_to_load(tmp_path: Path, monkeypatch):
    import errno

    import retrain.cache

    rows = _write_shards(tmp_path, 9, 4)
    victim = sorted(tmp_path.glob("shard-*.npz"))[3]
    real_load = np.load
    failures = {"left": 1}

    def flaky_load(path, *args, **kwargs):  # one transient failure, as with EMFILE or EIO
        if Path(path) == victim and failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(retrain.cache.np, "load", flaky_load)
    store = BottleneckStore(tmp_path, 4)
    store.refresh()
    assert len(store) == len(rows) - 3  # the victim's 3 rows are missing for now
    monkeypatch.setattr(
        retrain.cache.BottleneckStore, "refresh", lambda self: None
    )  # no second chance inside
    store.compact(min_shards=2)
    monkeypatch.undo()
    assert victim.exists()  # kept: its rows exist nowhere else
    assert len(list(tmp_path.glob("shard-*.npz"))) == 2  # the merged shard + the victim
    later = BottleneckStore(tmp_path, 4)
    later.refresh()
    assert len(later) == len(rows) and np.array_equal(
        later.get_many(list(rows)), np.stack(list(rows.values()))
    )


def test_damaged_and_foreign_shards_are_not_deleted_by_compaction(tmp_path: Path):
    _write_shards(tmp_path, 8, 4)
    broken = tmp_path / "shard-broken.npz"
    broken.write_bytes(b"PK\x03\x04 definitely not a zip")
    foreign = tmp_path / "shard-wrongwidth.npz"
    np.savez(foreign, keys=np.zeros((1, 20), np.uint8), features=np.ones((1, 7)))
    store = BottleneckStore(tmp_path, 4)
    store.refresh()
    store.compact(min_shards=2)
    assert broken.exists() and foreign.exists() and len(list(tmp_path.glob("shard-*.npz"))) == 3

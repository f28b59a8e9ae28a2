"""Extraction on a Ray cluster (two `ray start` nodes on this machine): same features, resumable, kill-safe."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'retrain[ray]')")
pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'retrain[ray]')")

import retrain  # noqa: E402
from conftest import TINY, make_image_folder  # noqa: E402
from raycluster import LocalCluster  # noqa: E402
from retrain import distributed, shards  # noqa: E402
from retrain.backbones import get_backbone  # noqa: E402
from retrain.cache import BottleneckStore  # noqa: E402
from retrain.engines import make_engine  # noqa: E402
from retrain.feature_cache import cache_namespace  # noqa: E402
from retrain.features import compute_features  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    import ray

    c = LocalCluster(nodes=2, cpus_per_node=2).start()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield c
    finally:
        ray.shutdown()
        c.stop()


def _local(paths, spec, bottleneck_dir, model_dir):
    store = BottleneckStore(Path(bottleneck_dir) / cache_namespace(spec), spec.feature_dim)
    table = compute_features(
        paths,
        spec,
        store,
        progress=False,
        engine_factory=lambda: make_engine(spec, device="cpu", model_dir=model_dir),
    )
    return table, store


def _all_rows(directory: str, dim: int):
    fs, inner = shards.filesystem(directory)
    rows = []
    for shard in shards.iter_shards(fs, inner, feature_dim=dim):
        rows += list(zip(shard.paths, shard.keys, shard.features, shard.reasons))
    return rows


def _folder(tmp_path: Path, per_class: int = 10) -> list[str]:
    folder = make_image_folder(tmp_path / "img", per_class=per_class)
    (folder / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "blue" / "copy.jpg").write_bytes(
        (folder / "green" / "img_000.jpg").read_bytes()
    )  # same content
    return sorted(str(p) for p in folder.rglob("*.jpg"))


def test_cluster_features_are_bitwise_the_local_ones_and_a_rerun_skips_everything(tmp_path: Path, cluster):
    spec, models = get_backbone(TINY), str(tmp_path / "models")
    paths = _folder(tmp_path)
    report = distributed.extract_on_ray(
        distributed.local_files(paths),
        spec,
        str(tmp_path / "ray"),
        model_dir=models,
        address=cluster.address,
        workers=2,
        chunk_size=8,
        progress=False,
    )
    assert (report.files, report.chunks, report.chunks_done_before) == (32, 4, 0)
    assert report.computed == 31  # 32 files: one broken; a copy in another chunk is computed there again
    assert report.skipped == {
        str(tmp_path / "img" / "red" / "broken.jpg"): "not an image file (unrecognised content)"
    }

    table, store = _local(paths, spec, tmp_path / "local", models)
    rows = _all_rows(report.directory, spec.feature_dim)
    assert sorted(p for p, *_ in rows) == paths  # every file once
    for path, key, feats, reason in rows:
        if reason is None:
            assert key == table.keys[path]
            assert np.array_equal(feats, store.get_many([key])[0])  # bitwise
        else:
            assert path in table.skipped

    again = distributed.extract_on_ray(
        distributed.local_files(paths),
        spec,
        str(tmp_path / "ray"),
        model_dir=models,
        address=cluster.address,
        workers=2,
        chunk_size=8,
        progress=False,
    )
    assert (again.chunks_done_before, again.computed) == (4, 0)

    # A local run on the same folder and bottleneck dir reads the shards: nothing to compute.
    warm, _ = _local(paths, spec, tmp_path / "ray", models)
    assert (warm.computed, warm.cached) == (0, 31)

    # An edited file changes its chunk's identity: that chunk alone is redone.
    Path(paths[0]).write_bytes(Path(paths[5]).read_bytes())
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    third = distributed.extract_on_ray(
        distributed.local_files(paths),
        spec,
        str(tmp_path / "ray"),
        model_dir=models,
        address=cluster.address,
        workers=2,
        chunk_size=8,
        progress=False,
    )
    assert (third.chunks_done_before, third.chunks) == (3, 4)


@pytest.mark.slow  # two full training runs: about 40 s here
def test_train_with_engine_ray_gives_the_local_model(tmp_path: Path, cluster, fast_config):
    import onnx
    from onnx import numpy_helper

    make_image_folder(tmp_path / "img", per_class=12)
    local = retrain.train(tmp_path / "img", **fast_config)
    cfg = {**fast_config, "bottleneck_dir": str(tmp_path / "ray-bn"), "output_dir": str(tmp_path / "ray-out")}
    on_ray = retrain.train(tmp_path / "img", engine="ray", ray_address=cluster.address, **cfg)
    assert (
        on_ray.test_accuracy == local.test_accuracy
        and on_ray.metrics["train_count"] == local.metrics["train_count"]
    )

    def weights(path):
        return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}

    a, b = weights(local.output_graph), weights(on_ray.output_graph)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # the same layer, bit for bit


def test_head_reads_shard_features_through_a_memory_map(tmp_path: Path, cluster):
    spec, models = get_backbone(TINY), str(tmp_path / "models")
    paths = _folder(tmp_path, per_class=4)
    report = distributed.extract_on_ray(
        distributed.local_files(paths),
        spec,
        str(tmp_path / "ray"),
        model_dir=models,
        address=cluster.address,
        workers=1,
        chunk_size=5,
        progress=False,
    )
    table, store = _local(paths, spec, tmp_path / "local", models)
    keys = [table.keys[p] for p in reversed(paths) if p in table.keys]
    X = shards.ShardFeatures(
        report.directory, spec.feature_dim, report.chunk_ids, scratch=str(tmp_path)
    ).get_many(keys)
    assert isinstance(X, np.memmap) and np.array_equal(np.asarray(X), store.get_many(keys))
    assert not list(tmp_path.glob(".retrain-features-*"))  # the backing file is unlinked at once


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # registers the tiny test backbone
from retrain.distributed import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a 90-chunk run in a second driver: about 60 s here
def test_killing_a_worker_mid_run_loses_and_duplicates_nothing(tmp_path: Path, cluster):
    spec, models = get_backbone(TINY), str(tmp_path / "models")
    folder = make_image_folder(tmp_path / "img", per_class=60, size=256)
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    out = tmp_path / "ray"
    cmd = [
        sys.executable,
        "-c",
        _DRIVER.format(tests=str(Path(__file__).parent)),
        "--image_dir",
        str(folder),
        "--bottleneck_dir",
        str(out),
        "--architecture",
        TINY,
        "--model_dir",
        models,
        "--ray_address",
        cluster.address,
        "--num_workers",
        "2",
        "--chunk_size",
        "2",
        "--quiet",
    ]
    _local(paths[:1], spec, tmp_path / "warmup", models)  # export the backbone first: not part of the race
    driver = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and driver.poll() is None and time.monotonic() < deadline:
        done = list(out.glob("*/part-*.parquet"))
        workers = cluster.worker_pids("ChunkEmbedder")
        if len(done) >= 5 and workers:
            killed = workers[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    output = driver.communicate(timeout=300)[0]
    assert killed is not None, f"the run ended before a worker could be killed:\n{output}"
    assert driver.returncode == 0, output
    assert killed not in cluster.worker_pids("ChunkEmbedder")
    rows = _all_rows(str(next(out.iterdir())), spec.feature_dim)
    assert len(list(out.glob("*/part-*.parquet"))) == len(paths) // 2
    assert sorted(p for p, *_ in rows) == paths  # none lost, none twice
    table, store = _local(paths, spec, tmp_path / "local", models)
    assert all(np.array_equal(f, store.get_many([table.keys[p]])[0]) for p, _, f, _ in rows)

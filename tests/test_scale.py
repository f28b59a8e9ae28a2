"""Pieces of distributed extraction that need no cluster: the install hint, shards, chunk identities, int8."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_image_folder
from retrain.cli import retrain_main


@pytest.mark.parametrize("argv", [["extract", "--engine", "ray"], ["--engine", "ray"]])
def test_engine_ray_without_ray_says_how_to_install_it(
    tmp_path: Path, monkeypatch, capsys, argv, fast_config
):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    folder = make_image_folder(tmp_path / "img", per_class=3)
    flags = [
        "--image_dir",
        str(folder),
        "--bottleneck_dir",
        str(tmp_path / "bn"),
        "--architecture",
        TINY,
        "--model_dir",
        fast_config["model_dir"],
    ]
    if argv[0] != "extract":
        flags += ["--output_dir", str(tmp_path / "out"), "--quiet"]
    assert retrain_main(argv + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --engine ray needs Ray, which is not installed: pip install 'retrain[ray]'"]


def test_extract_local_engine_warms_the_cache(tmp_path: Path, fast_config):
    import retrain
    from retrain.distributed import extract

    folder = make_image_folder(tmp_path / "img", per_class=4)
    report = extract(
        str(folder),
        str(tmp_path / "bn"),
        architecture=TINY,
        engine="local",
        model_dir=fast_config["model_dir"],
        progress=False,
    )
    assert (report.files, report.computed) == (12, 12)
    result = retrain.train(folder, **{**fast_config, "bottleneck_dir": str(tmp_path / "bn")})
    assert result.metrics["seconds"]["features"] < 5


def test_int8_precision_has_its_own_namespace_and_engine(tmp_path: Path, fast_config):
    from retrain.backbones import get_backbone
    from retrain.errors import RetrainError
    from retrain.precision import backbone_model_path, feature_namespace, make_extraction_engine

    spec, models = get_backbone(TINY), fast_config["model_dir"]
    assert feature_namespace(spec, "int8", models) != feature_namespace(spec, "float32", models)
    assert feature_namespace(spec, "int8", models) == feature_namespace(spec, "int8", models)
    assert backbone_model_path(spec, "int8", models).name.endswith("-int8r1.onnx")
    engine = make_extraction_engine(spec, precision="int8", device="cpu", model_dir=models)
    assert engine(np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 16)
    with pytest.raises(RetrainError, match="must be one of float32, int8"):
        feature_namespace(spec, "int4", models)


def test_chunk_identity_follows_content_changes():
    from retrain.distributed import plan_chunks

    files = [(f"/p/{i}.jpg", 100, "1") for i in range(5)]
    a = plan_chunks(files, "ns", 2)
    assert [len(p) for _, p in a] == [2, 2, 1] and plan_chunks(list(reversed(files)), "ns", 2) == a
    touched = [files[0], ("/p/1.jpg", 100, "2"), *files[2:]]
    b = plan_chunks(touched, "ns", 2)
    assert b[0][0] != a[0][0] and b[1:] == a[1:]
    assert plan_chunks(files, "other", 2)[0][0] != a[0][0]


class TestShards:
    @pytest.fixture(autouse=True)
    def _pyarrow(self):
        pytest.importorskip("pyarrow", reason="pyarrow is not installed (pip install 'retrain[ray]')")

    def test_round_trip_and_the_local_store_reads_them(self, tmp_path: Path):
        from retrain import shards
        from retrain.cache import BottleneckStore

        rng = np.random.default_rng(0)
        feats = rng.random((3, 16), dtype=np.float32)
        keys = [b"a" * 20, None, b"c" * 20]
        table = shards.shard_table(
            ["x.jpg", "bad.jpg", "z.jpg"], keys, feats, [None, "empty file (0 bytes)", None], namespace="ns"
        )
        fs, _ = shards.filesystem(str(tmp_path))
        shards.write_shard(fs, str(tmp_path / shards.shard_name("abc")), table)
        got = shards.read_shard(fs, str(tmp_path / "part-abc.parquet"), feature_dim=16)
        assert (
            got.keys == keys
            and got.reasons[1] == "empty file (0 bytes)"
            and np.array_equal(got.features, feats)
        )
        assert shards.finished_chunks(fs, str(tmp_path)) == {"abc"}
        store = BottleneckStore(tmp_path, 16)
        store.refresh()
        assert len(store) == 2 and np.array_equal(store.get_many([b"c" * 20])[0], feats[2])
        with pytest.raises(Exception, match="not a retrain feature shard of width 8"):
            shards.read_shard(fs, str(tmp_path / "part-abc.parquet"), feature_dim=8)
        X = shards.ShardFeatures(str(tmp_path), 16, ["abc"], scratch=str(tmp_path)).get_many(
            [b"c" * 20, b"a" * 20]
        )
        assert np.array_equal(X, feats[[2, 0]])
        with pytest.raises(Exception, match="1 feature.s. are missing"):
            shards.ShardFeatures(str(tmp_path), 16, ["abc"]).get_many([b"q" * 20])


def test_train_with_int8_extraction_exports_the_int8_backbone(tmp_path: Path, fast_config):
    import retrain
    from retrain.export import get_manifest

    make_image_folder(tmp_path / "img", per_class=8)
    result = retrain.train(tmp_path / "img", extraction_precision="int8", **fast_config)
    import onnx

    manifest = get_manifest(onnx.load(str(result.output_graph)))
    assert manifest["extraction_precision"] == "int8" and manifest["fine_tuned"] is False
    from retrain.backbones import get_backbone
    from retrain.feature_cache import cache_namespace
    from retrain.precision import feature_namespace

    spec, bn = get_backbone(TINY), Path(fast_config["bottleneck_dir"])
    assert (bn / feature_namespace(spec, "int8", fast_config["model_dir"])).is_dir()
    assert not (bn / cache_namespace(spec)).exists()  # never mixed with float32 features


def test_int8_with_distortions_is_refused(tmp_path: Path, fast_config):
    import retrain
    from retrain.errors import RetrainError

    make_image_folder(tmp_path / "img", per_class=4)
    with pytest.raises(RetrainError, match="does not combine with distortions"):
        retrain.train(tmp_path / "img", extraction_precision="int8", flip_left_right=True, **fast_config)

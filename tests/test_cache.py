from __future__ import annotations

from pathlib import Path

import numpy as np

from retrain.backbones import get_backbone
from retrain.cache import BottleneckStore, content_key, namespace_for
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

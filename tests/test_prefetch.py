"""The one decode-ahead pool (fine-tuning and distortions): order, batches, errors, affinity-aware size."""

from __future__ import annotations

import threading

import pytest

import retrain.devices as devices
import retrain.prefetch as prefetch


def test_batches_come_in_order_with_their_items():
    out = list(prefetch.decode_ahead(list(range(10)), lambda i: i * i, batch_size=4, workers=3))
    assert [(start, items) for start, items, _ in out] == [(0, [0, 1, 2, 3]), (4, [4, 5, 6, 7]), (8, [8, 9])]
    assert [v for _, _, values in out for v in values] == [i * i for i in range(10)]


def test_a_decoding_error_comes_out_of_the_iteration():
    def decode(i):
        if i == 5:
            raise ValueError("bad image 5")
        return i

    with pytest.raises(ValueError, match="bad image 5"):
        list(prefetch.decode_ahead(list(range(8)), decode, batch_size=2))


def test_the_pool_follows_the_cores_this_process_may_use(monkeypatch):
    """``os.cpu_count()`` counts the machine; under taskset or a cgroup only ``cpu_cores()`` are ours."""
    monkeypatch.setattr(devices, "cpu_cores", lambda: 1)
    assert devices.decode_workers() == 3 and devices.decode_workers(5) == 5
    names = set()
    list(prefetch.decode_ahead(list(range(40)), lambda i: names.add(threading.current_thread().name), 20))
    assert 1 <= len(names) <= 3

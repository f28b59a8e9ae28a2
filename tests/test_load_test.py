"""benchmarks/load_test.py against a real `retrain serve`, briefly: every kind of request, no timing assertions."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import pytest

from trained_models import running_server, sample_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
load_test = importlib.util.module_from_spec(_spec)
sys.modules["load_test"] = load_test  # dataclasses look their module up while the file runs
_spec.loader.exec_module(load_test)


@pytest.mark.slow
def test_mixed_load_is_answered_and_the_server_stays_healthy(tmp_path_factory):
    model = sample_model(tmp_path_factory)
    limits = load_test.SERVER_LIMITS
    args = [f"--{k}={v}" for k, v in limits.items()] + ["--max_batch=8", "--max_wait_ms=20"]
    cases = load_test.make_cases(48, 3, limits)  # every third request malformed: each malformed kind twice
    assert {c.kind for c in cases if c.expect != 200} == {
        c.kind for c in load_test.malformed_cases(b"x", 1, 100)
    }
    with running_server(model.output_graph, *args) as url:
        report = asyncio.run(load_test.run_load(url, cases, concurrency=6, duration=120))
    summary = report.summary()
    assert summary["requests"] == 48 and summary["failures"] == 0, report.failures()
    assert summary["healthy_after"] and summary["wrong_labels"] <= 1
    assert summary["server_batching"]["largest_batch"] > 1  # concurrent clients were batched
    assert summary["good_latency"]["p50_ms"] > 0


@pytest.mark.parametrize("url", ["http://example.com:8080", "http://10.0.0.5:8080", "http://0.0.0.0:1"])
def test_only_loopback_is_targeted(url):
    with pytest.raises(SystemExit, match="only targets this machine"):
        load_test.check_loopback(url)
    load_test.check_loopback("http://127.0.0.1:8080")
    load_test.check_loopback("http://[::1]:8080")


@pytest.mark.slow
def test_a_flood_of_large_uploads_gets_503_with_retry_after_past_max_in_flight(tmp_path_factory):
    """More concurrent large uploads than --max_in_flight: each is classified or refused with 503 +
    Retry-After, never dropped, and the server stays healthy (loopback only, a few MB in all)."""
    model = sample_model(tmp_path_factory)
    body = load_test.large_photo(0.5)
    assert 0.3 * 2**20 < len(body) < 1.5 * 2**20
    with running_server(model.output_graph, "--max_in_flight=2", "--max_batch=4") as url:
        report = asyncio.run(load_test.run_flood(url, body, clients=10, per_client=2))
    summary = report.summary()
    assert summary["requests"] == 20 and summary["failures"] == 0, report.failures()
    statuses = summary["statuses"]
    assert set(statuses) <= {"200", "503"} and statuses.get("503", 0) >= 1 and statuses.get("200", 0) >= 2, (
        statuses
    )
    assert summary["server_requests"]["rejected_in_flight"] == statuses["503"]
    assert summary["server_requests"]["max_in_flight"] == 2 and summary["server_requests"]["in_flight"] == 0
    assert summary["healthy_after"]

"""Real models trained once per test session on the bundled sample photos (shared by several test files).

A session-scoped fixture runs before the function-scoped ``_isolated_cache`` one, so every
cache location is passed explicitly, inside pytest's temporary folder.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import retrain
from conftest import SAMPLE_PHOTOS

_RUNS: dict[str, retrain.TrainResult] = {}


def sample_model(tmp_path_factory, quantize: str = "") -> retrain.TrainResult:
    """EfficientNet-Lite0 + a new layer trained on the sample photos (a few seconds once features are cached)."""
    if quantize not in _RUNS:
        cache = Path(tmp_path_factory.getbasetemp()) / "xdg-cache" / "retrain"
        _RUNS[quantize] = retrain.train(
            SAMPLE_PHOTOS,
            bottleneck_dir=str(cache / "bottlenecks"),
            model_dir=str(cache / "models"),
            output_dir=str(tmp_path_factory.mktemp(f"sample-model{'-' + quantize if quantize else ''}")),
            how_many_training_steps=200,
            eval_step_interval=100,
            seed=0,
            quiet=True,
            quantize=quantize,
        )
    return _RUNS[quantize]


def sample_photo(label: str, index: int = 0) -> Path:
    return sorted((SAMPLE_PHOTOS / label).glob("*.jpg"))[index]


@contextlib.contextmanager
def running_server(graph: str | Path, *extra_args: str, timeout: float = 90.0) -> Iterator[str]:
    """``retrain serve --graph GRAPH`` in a subprocess on 127.0.0.1 and a free port; yields its base URL."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-c",
        "import sys; from retrain.cli import retrain_main; sys.exit(retrain_main())",
        "serve",
        "--graph",
        str(graph),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log_level",
        "warning",
        *extra_args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"retrain serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"retrain serve did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

"""TensorBoard event files, written without TensorFlow or PyTorch.

An event file is a sequence of TFRecords (length, masked CRC32C, payload, masked
CRC32C) whose payloads are ``tensorflow.Event`` protocol buffers. We only need
scalars and histograms, so the few protobuf fields are encoded by hand; keeping this
small avoids importing a 3-second framework on every warm retrain.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

import numpy as np


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# -- minimal protobuf encoding -------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _double(field: int, value: float) -> bytes:
    return _key(field, 1) + struct.pack("<d", value)


def _packed_doubles(field: int, values: np.ndarray) -> bytes:
    return _bytes_field(field, np.asarray(values, dtype="<f8").tobytes())


def _event(step: int, *, summary: bytes = b"", file_version: str = "") -> bytes:
    body = _double(1, time.time()) + _key(2, 0) + _varint(step)
    if file_version:
        body += _bytes_field(3, file_version.encode())
    if summary:
        body += _bytes_field(5, summary)
    return body


def _histogram(values: np.ndarray, bins: int = 30) -> bytes:
    v = np.asarray(values, dtype=np.float64).ravel()
    counts, edges = np.histogram(v, bins=bins)
    return (
        _double(1, float(v.min()))
        + _double(2, float(v.max()))
        + _double(3, float(v.size))
        + _double(4, float(v.sum()))
        + _double(5, float(np.dot(v, v)))
        + _packed_doubles(6, edges[1:])
        + _packed_doubles(7, counts)
    )


class EventWriter:
    """Appends scalars and histograms to one new event file in ``logdir``.

    Events reach the file at most ``flush_seconds`` after the previous flush (checked at each
    write), so a TensorBoard opened during training shows the curves growing.
    """

    def __init__(self, logdir: str | os.PathLike, *, flush_seconds: float = 2.0):
        self.flush_seconds = flush_seconds
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.retrain"
        self.path = self.logdir / name
        self._f = open(self.path, "ab")
        self._headers: dict[int, bytes] = {}
        self._last_flush = time.monotonic()
        self._write(_event(0, file_version="brain.Event:2"))
        self.flush()  # TensorBoard lists the run as soon as it starts

    def _write(self, payload: bytes) -> None:
        header = self._headers.get(len(payload))
        if header is None:  # records of one kind have one length: their framed header is computed once
            header = struct.pack("<Q", len(payload))
            header = self._headers[len(payload)] = header + struct.pack("<I", _masked_crc(header))
        self._f.write(header + payload + struct.pack("<I", _masked_crc(payload)))
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars({tag: value}, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Several scalars of one step in one event (TensorBoard reads each as its own series)."""
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _key(2, 5) + struct.pack("<f", float(value)))
            for tag, value in values.items()
        )
        self._write(_event(step, summary=summary))

    def histogram(self, tag: str, values: np.ndarray, step: int) -> None:
        value_msg = _bytes_field(1, tag.encode()) + _bytes_field(5, _histogram(values))
        self._write(_event(step, summary=_bytes_field(1, value_msg)))

    def flush(self) -> None:
        self._f.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._f.close()


def new_run_dirs(summaries_dir: str | os.PathLike) -> tuple[Path, Path]:
    """``train`` and ``validation`` folders for a new run, never touching earlier runs' files.

    The first run writes to ``summaries_dir/train`` and ``/validation`` as retrain.py did;
    if those already hold events, this run goes to ``summaries_dir/run-<time>/...`` instead.
    """
    root = Path(summaries_dir)
    train, val = root / "train", root / "validation"
    if any(train.glob("events.*")) or any(val.glob("events.*")):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = root / f"run-{stamp}"
        n = 1
        while base.exists():
            n += 1
            base = root / f"run-{stamp}-{n}"
        train, val = base / "train", base / "validation"
    return train, val


def histogram_interval(eval_step_interval: int, steps: int) -> int:
    """Steps between weight histograms of the new layer: about 100 per run (TensorBoard shows no more, and
    each costs a few ms), on evaluation steps."""
    every = max(1, eval_step_interval)
    return every * max(1, steps // (100 * every))


def head_histograms(writer: EventWriter, head, step: int) -> None:
    """The new layer's weights and biases (``head.coef_``, ``head.intercept_``), under retrain.py's names."""
    writer.histogram("final_retrain_ops/weights", head.coef_, step)
    writer.histogram("final_retrain_ops/biases", head.intercept_, step)

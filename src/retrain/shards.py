"""Parquet feature shards: what distributed extraction writes, and how the head reads it back.

A cluster run (``retrain extract --engine ray``) cuts the sorted file list into chunks and
writes one shard per chunk, ``<bottleneck_dir>/<namespace>/part-<chunk id>.parquet``, next
to the local store's ``shard-*.npz`` files (same namespace, same content keys). Columns:

* ``path``     the file as the workers read it (absolute path or fsspec URL)
* ``key``      SHA-1 of the file's bytes (null when the file could not be used)
* ``features`` ``feature_dim`` float32 values (zeros when the file could not be used)
* ``reason``   why a file could not be used, else null

The chunk id is a hash of the namespace and of every file's (path, size, mtime), so a
rerun over unchanged files finds each finished chunk's shard and skips it, and a retried
task (a killed worker) writes the same name again: a shard is whole or absent (written to
a temporary name and renamed on a local disk; object stores make a PUT visible whole),
and never present twice. The store is reached through fsspec: a local path or any URL
fsspec knows (``s3://``, ``gs://``, ... with their fsspec package installed).

Needs pyarrow and fsspec (``pip install 'retrain[ray]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrain.cache import KEY_BYTES
from retrain.errors import RetrainError

log = logging.getLogger("retrain")

SHARD_FORMAT = 1
PREFIX, SUFFIX = "part-", ".parquet"
INSTALL_HINT = "pip install 'retrain[ray]'"


def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise RetrainError(f"Parquet feature shards need pyarrow and fsspec: {INSTALL_HINT}") from None
    return pyarrow


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a local path or a URL."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise RetrainError(f"URLs and Parquet shards need fsspec: {INSTALL_HINT}") from None
    try:
        return url_to_fs(os.fspath(url))
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs installed
        raise RetrainError(f"cannot open {url!r}: {exc}") from None


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def chunk_id(namespace: str, files: Sequence[tuple[str, int, str]]) -> str:
    """Identity of one chunk of work: the namespace and each (path, size, mtime) in it."""
    h = hashlib.sha1(f"retrain-chunk {SHARD_FORMAT}\0{namespace}\0".encode())
    for path, size, mtime in files:
        h.update(f"{path}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


def shard_name(cid: str) -> str:
    return f"{PREFIX}{cid}{SUFFIX}"


def finished_chunks(fs, directory: str) -> set[str]:
    """Chunk ids whose shard exists under ``directory``."""
    try:
        names = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(PREFIX) and base.endswith(SUFFIX):
            out.add(base[len(PREFIX) : -len(SUFFIX)])
    return out


# -- writing --------------------------------------------------------------------------------------
def shard_table(
    paths: Sequence[str],
    keys: Sequence[bytes | None],
    features: np.ndarray,
    reasons: Sequence[str | None],
    *,
    namespace: str,
):
    """One shard as a pyarrow Table (rows aligned with ``paths``; ``features`` is (N, D) float32)."""
    pa = require_pyarrow()
    features = np.ascontiguousarray(features, dtype=np.float32)
    n, dim = features.shape
    feats = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), type=pa.float32()), dim)
    table = pa.table(
        {
            "path": pa.array(list(paths), type=pa.string()),
            "key": pa.array(list(keys), type=pa.binary(KEY_BYTES)),
            "features": feats,
            "reason": pa.array(list(reasons), type=pa.string()),
        }
    )
    meta = {
        b"retrain.shard_format": str(SHARD_FORMAT).encode(),
        b"retrain.namespace": namespace.encode(),
        b"retrain.feature_dim": str(dim).encode(),
    }
    return table.replace_schema_metadata(meta)


def write_shard(fs, url: str, table) -> None:
    """Write ``table`` to ``url`` so that readers see the whole shard or none of it."""
    import pyarrow.parquet as pq

    parent = url.rsplit("/", 1)[0]
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".part-", suffix=".tmp", dir=parent)
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression="zstd")
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, url)  # a retried chunk replaces its own shard: same name, same rows
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    # Object stores make an object visible only once its upload has completed.
    with fs.open(url, "wb") as f:
        pq.write_table(table, f, compression="zstd")


# -- reading --------------------------------------------------------------------------------------
@dataclass
class Shard:
    paths: list[str]
    keys: list[bytes | None]
    features: np.ndarray | None  # (N, D) float32, None when not asked for
    reasons: list[str | None]


def read_shard(fs, url: str, *, feature_dim: int, with_features: bool = True) -> Shard:
    """One shard's rows; RetrainError naming the file if it is not a shard of this width."""
    import pyarrow.parquet as pq

    columns = ["path", "key", "reason"] + (["features"] if with_features else [])
    try:
        with fs.open(url, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            if int(meta.get(b"retrain.feature_dim", b"-1")) != feature_dim:
                raise RetrainError(
                    f"{url} is not a retrain feature shard of width {feature_dim}; remove it or "
                    "use another --bottleneck_dir"
                )
            table = pf.read(columns=columns)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise RetrainError(
            f"cannot read feature shard {url}: {exc}; remove it and run again to recompute its chunk"
        ) from None
    feats = None
    if with_features:
        col = table.column("features").combine_chunks()
        feats = col.values.to_numpy(zero_copy_only=False).reshape(len(table), feature_dim)
    return Shard(
        table.column("path").to_pylist(),
        table.column("key").to_pylist(),
        feats,
        table.column("reason").to_pylist(),
    )


def iter_shards(fs, directory: str, cids: Iterable[str] | None = None, **kw) -> Iterator[Shard]:
    """Every shard under ``directory`` (or only those of ``cids``), one at a time: memory holds one."""
    for cid in sorted(finished_chunks(fs, directory) if cids is None else cids):
        yield read_shard(fs, join(directory, shard_name(cid)), **kw)


def load_into_index(directory: Path, index: dict, feature_dim: int, seen: set[str]) -> None:
    """Add the rows of the not yet ``seen`` Parquet shards in a local ``directory`` to a store's index.

    Used by :class:`retrain.cache.BottleneckStore` so that a local run after a cluster run is warm.
    Without pyarrow the shards are reported once and left alone (those images are recomputed).
    """
    names = sorted(p.name for p in directory.glob(f"{PREFIX}*{SUFFIX}") if p.name not in seen)
    if not names:
        return
    try:
        require_pyarrow()
    except RetrainError:
        log.warning(
            "%d Parquet feature shard(s) in %s are ignored: reading them needs pyarrow (%s)",
            len(names),
            directory,
            INSTALL_HINT,
        )
        seen.update(names)
        return
    fs, _ = filesystem(str(directory))
    for name in names:
        try:
            shard = read_shard(fs, str(directory / name), feature_dim=feature_dim)
        except RetrainError as exc:
            log.warning("ignoring feature shard: %s", exc)
        else:
            for key, row in zip(shard.keys, shard.features):
                if key is not None:
                    index[key] = row
        seen.add(name)


class ShardFeatures:
    """Features of given content keys gathered from shards into a memory-mapped matrix.

    The head trains on the result as on an in-memory array (same values, same arithmetic), while
    memory holds one shard at a time; the matrix lives in an unlinked temporary file that the
    operating system pages in and out.
    """

    def __init__(self, url: str, feature_dim: int, cids: Iterable[str], *, scratch: str | None = None):
        self.fs, self.directory = filesystem(url)
        self.url = url
        self.feature_dim, self.cids = feature_dim, sorted(set(cids))
        self.scratch = scratch

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """(N, feature_dim) float32 memory map, rows in the order of ``keys`` (all must be present)."""
        rows: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):
            rows.setdefault(k, []).append(i)
        out = self._matrix(len(keys))
        missing = set(rows)
        for shard in iter_shards(self.fs, self.directory, self.cids, feature_dim=self.feature_dim):
            for j, k in enumerate(shard.keys):
                if k is not None and k in missing:
                    out[rows[k]] = shard.features[j]
                    missing.discard(k)
            if not missing:
                break
        if missing:
            raise RetrainError(
                f"{len(missing)} feature(s) are missing from the shards in {self.directory}; run the "
                "extraction again (finished chunks are skipped)"
            )
        out.flush()
        return out

    def _matrix(self, n: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, self.feature_dim), np.float32)
        directory = self.scratch or tempfile.gettempdir()
        path = Path(directory) / f".retrain-features-{uuid.uuid4().hex}.f32"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, self.feature_dim))
        with contextlib.suppress(OSError):
            path.unlink()  # the mapping keeps the data; nothing is left behind when the run ends
        return out

    def compact(self) -> None:
        """Nothing to merge: shards are per chunk, and a rerun looks them up by name."""

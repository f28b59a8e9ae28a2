"""The bottleneck cache: one feature vector per image content, in a few binary shards.

Layout: ``<bottleneck_dir>/<namespace>/shard-*.npz``, where the namespace is derived
from everything that decides a feature's value (backbone, weights, preprocessing,
decoder version, format version). Entries are keyed by the SHA-1 of the image file's
bytes, so a renamed or moved image is still a hit and an edited image is a miss.

Safe to interrupt and to share: every shard is written to a temporary name and
renamed into place, so a reader sees whole shards or nothing; concurrent writers
write different shards; compaction merges shards under a lock and tolerates shards
that vanish underneath a reader. Compaction deletes only shards whose every row it
has read and rewritten: a shard that could not be read (EMFILE, EIO, damaged, foreign)
stays where it is.

A cache folder this process may not write to (read-only, or another user's shared
cache) still works: its features are read, and new features are kept in memory for
this run only, with one warning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
KEY_BYTES = 20  # SHA-1 digest
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a crashed writer

log = logging.getLogger("retrain")

# OSErrors that mean "this folder may not be written here": the cache is then used read-only.
_READ_ONLY_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS}


def content_key(data: bytes) -> bytes:
    return hashlib.sha1(data).digest()


def namespace_for(**identity: object) -> str:
    """A folder name for one feature definition, e.g. ``efficientnet_lite0-3f9a1c2b7d10``."""
    blob = json.dumps({"format": FORMAT_VERSION, **identity}, sort_keys=True, default=str)
    name = str(identity.get("backbone", "features"))
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; done once, at import (one thread)
    os.umask(mask)
    return mask


# Permissions of a file written here: what open() would give (0o666 minus the umask), not mkstemp's 0o600,
# so that a cache shared between users (or the outputs of a run) can be read by the others.
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with contextlib.suppress(OSError):  # e.g. a file system without permissions
            os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class BottleneckStore:
    """Maps content keys (20-byte SHA-1 digests) to float32 feature vectors of one width."""

    def __init__(
        self,
        directory: str | os.PathLike,
        feature_dim: int,
        *,
        flush_every: int = 256,
        flush_seconds: float = 5.0,
    ):
        self.directory = Path(directory)
        self.feature_dim = feature_dim
        # A shard is written every flush_every entries or flush_seconds, whichever comes first,
        # so a crash or kill -9 loses at most a few seconds of extraction.
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._last_flush = time.monotonic()
        self._index: dict[bytes, np.ndarray] = {}
        self._pending_keys: list[bytes] = []
        self._pending_rows: list[np.ndarray] = []
        self._loaded_shards: set[str] = set()  # every row of these is in _index (read, or written here)
        self._unreadable: set[str] = set()  # damaged or foreign shards: never read again, never deleted
        self._warned: set[str] = set()
        self.writable = True  # False once the folder turned out read-only: new rows stay in memory
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            self._read_only(exc)

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Load shards written since the last look (by this or another process)."""
        for shard in sorted(self.directory.glob("shard-*.npz")):
            if shard.name in self._loaded_shards or shard.name in self._unreadable:
                continue
            try:
                with np.load(shard, allow_pickle=False) as z:
                    keys, feats = z["keys"], z["features"]
            except FileNotFoundError:  # compacted away by another process; its rows live on elsewhere
                continue
            except (
                OSError
            ) as exc:  # EMFILE, EIO, EACCES...: perhaps transient; tried again at the next refresh
                self._warn_once(
                    shard,
                    f"cannot read cache shard {shard} now ({exc.strerror or exc}); its images "
                    "are recomputed for this run, the shard is kept",
                )
                continue
            except (ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
                self._warn_once(
                    shard, f"ignoring unreadable cache shard {shard} ({exc}); its images will be recomputed"
                )
                self._unreadable.add(shard.name)
                continue
            if (
                feats.ndim != 2
                or feats.shape[1] != self.feature_dim
                or keys.shape != (len(feats), KEY_BYTES)
                or keys.dtype != np.uint8
            ):
                self._warn_once(shard, f"ignoring cache shard {shard} with unexpected shape {feats.shape}")
                self._unreadable.add(shard.name)
                continue
            for k, row in zip(keys, feats):
                self._index[bytes(k)] = row
            self._loaded_shards.add(shard.name)
        # Parquet shards written by a cluster run (retrain extract --engine ray), same keys and namespace.
        from retrain.shards import load_into_index

        load_into_index(self.directory, self._index, self.feature_dim, self._loaded_shards)

    def _warn_once(self, shard: Path, message: str) -> None:
        if shard.name not in self._warned:
            self._warned.add(shard.name)
            log.warning("%s", message)

    def _read_only(self, exc: OSError) -> None:
        """Switch to read-only use: cached features are still read; new ones live in memory for this run."""
        if self.writable:
            log.warning(
                "the bottleneck cache %s cannot be written (%s): features cached there are used, new "
                "ones are kept in memory for this run only (choose a writable --bottleneck_dir to cache "
                "them)",
                self.directory,
                exc.strerror or exc,
            )
        self.writable = False

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def get_many(self, keys: Sequence[bytes]) -> np.ndarray:
        """(N, feature_dim) float32 for keys that are all present."""
        out = np.empty((len(keys), self.feature_dim), dtype=np.float32)
        for i, k in enumerate(keys):
            out[i] = self._index[k]
        return out

    # -- writing ---------------------------------------------------------------------------
    def put_many(self, keys: Iterable[bytes], features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float32)
        for k, row in zip(keys, features):
            self._index[k] = row
            self._pending_keys.append(k)
            self._pending_rows.append(row)
        if (
            len(self._pending_keys) >= self.flush_every
            or time.monotonic() - self._last_flush >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Persist pending entries as one new shard (atomic)."""
        self._last_flush = time.monotonic()
        if not self._pending_keys:
            return
        keys = np.frombuffer(b"".join(self._pending_keys), dtype=np.uint8).reshape(-1, KEY_BYTES)
        feats = np.stack(self._pending_rows)
        self._pending_keys, self._pending_rows = [], []  # in _index either way
        if not self.writable:
            return
        name = f"shard-{uuid.uuid4().hex}.npz"
        try:
            self._write_shard(self.directory / name, keys, feats)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise  # a full disk is the user's to fix (the CLI says so); finished shards are kept
            self._read_only(exc)
            return
        self._loaded_shards.add(name)

    @staticmethod
    def _write_shard(path: Path, keys: np.ndarray, feats: np.ndarray) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, keys=keys, features=feats)
        atomic_write_bytes(path, buf.getvalue())

    def compact(self, min_shards: int = 8) -> None:
        """Merge many small shards into one, so a later run loads the cache in one read."""
        self.flush()
        if not self.writable:
            return
        self._remove_stale_temporaries()
        shards = sorted(self.directory.glob("shard-*.npz"))
        if len(shards) < min_shards:
            return
        try:
            import fcntl
        except ImportError:  # Windows: skip compaction, many shards still work
            return
        try:
            lock = open(self.directory / ".compact.lock", "a")  # held for the whole block below
        except OSError as exc:  # a shared cache that only its owner may write: merging is theirs to do
            if exc.errno in _READ_ONLY_ERRNOS:
                return
            raise
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process is compacting; leave it to them
                return
            self._merge_loaded_shards(min_shards)

    def _merge_loaded_shards(self, min_shards: int) -> None:
        """Rewrite every row read so far as one shard, then delete the shards it came from (and only those)."""
        self.refresh()
        # Only shards read in full: one that failed to load (EMFILE, EIO, damaged) has rows nowhere else.
        merged_from = [s for s in sorted(self.directory.glob("shard-*.npz")) if s.name in self._loaded_shards]
        if len(merged_from) < min_shards:
            return
        keys = np.frombuffer(b"".join(self._index), dtype=np.uint8).reshape(-1, KEY_BYTES)
        feats = np.stack(list(self._index.values())) if self._index else np.empty((0, self.feature_dim))
        name = f"shard-{uuid.uuid4().hex}.npz"
        try:
            self._write_shard(self.directory / name, keys, feats.astype(np.float32))
        except OSError as exc:  # nothing deleted: the small shards stay usable
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise
            self._read_only(exc)
            return
        self._loaded_shards.add(name)
        for s in merged_from:
            with contextlib.suppress(OSError):
                s.unlink()

    def _remove_stale_temporaries(self) -> None:
        """Delete half-written shards left by a crashed or killed writer (never read; only disk space)."""
        cutoff = time.time() - STALE_TEMP_SECONDS
        for tmp in self.directory.glob(".shard-*.tmp"):
            with contextlib.suppress(OSError):  # another process may remove or finish it first
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

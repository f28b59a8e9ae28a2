"""The stat memo: each file's content key remembered by its stat signature, so a warm run reads no image.

File format (``file-keys.bin`` in the cache namespace folder): the magic line, then one record per
file (``<QQQqqH20s>``: device, inode, size, mtime_ns, ctime_ns, length of the name, content key)
followed by the absolute path's bytes, and last the SHA-1 of everything before it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import time
from pathlib import Path

from retrain.cache import atomic_write_bytes


class FileKeyMemo:
    """Remembers each file's content key by its stat signature, so unchanged files are not read again.

    The signature is (absolute path, device, inode, size, mtime_ns, ctime_ns). ctime changes on every
    write and cannot be set back by a user (``touch -d`` and ``cp -p`` set mtime only), so an edited
    file always misses. A file changed within the filesystem's timestamp granularity of being hashed
    could keep its signature, so files modified less than ``RACY_SECONDS`` before the scan started are
    not remembered (git's "racily clean" rule). The memo is only ever a shortcut to a key: a damaged
    or foreign memo file is ignored, and a file that has changed is re-read.
    """

    FILE_NAME = "file-keys.bin"
    MAGIC = b"retrain-file-keys 1\n"
    RACY_SECONDS = 2.0  # FAT's mtime resolution; ext4/xfs/btrfs/APFS/NTFS are far finer
    MAX_ENTRIES = 1_000_000
    _RECORD = struct.Struct("<QQQqqH20s")  # dev, ino, size, mtime_ns, ctime_ns, len(path), key

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.FILE_NAME
        self._entries: dict[bytes, tuple[tuple[int, ...], bytes]] = self._load()
        self._added: dict[bytes, tuple[tuple[int, ...], bytes]] = {}
        self._horizon_ns = time.time_ns() - int(self.RACY_SECONDS * 1e9)

    @staticmethod
    def signature(st: os.stat_result) -> tuple[int, ...]:
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def lookup(self, name: bytes, sig: tuple[int, ...]) -> bytes | None:
        entry = self._entries.get(name)
        return entry[1] if entry is not None and entry[0] == sig else None

    def remember(self, name: bytes, sig: tuple[int, ...], key: bytes) -> None:
        if max(sig[3], sig[4]) < self._horizon_ns:
            self._added[name] = (sig, key)

    def save(self) -> None:
        """Write the memo if anything was added (atomic; concurrent runs: the last writer wins)."""
        if not self._added:
            return
        # Older entries first, this run's last, so trimming drops the oldest.
        merged = {name: e for name, e in self._entries.items() if name not in self._added}
        merged.update(self._added)
        if len(merged) > self.MAX_ENTRIES:
            merged = dict(list(merged.items())[-self.MAX_ENTRIES :])
        parts = [self.MAGIC]
        for name, (sig, key) in merged.items():
            parts += (self._RECORD.pack(*sig, len(name), key), name)
        body = b"".join(parts)
        with contextlib.suppress(OSError):  # a read-only cache still works, just without the shortcut
            atomic_write_bytes(self.path, body + hashlib.sha1(body).digest())
        self._entries, self._added = merged, {}

    def _load(self) -> dict[bytes, tuple[tuple[int, ...], bytes]]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return {}
        body, digest = data[:-20], data[-20:]
        if not body.startswith(self.MAGIC) or hashlib.sha1(body).digest() != digest:
            return {}
        entries, pos, rec = {}, len(self.MAGIC), self._RECORD
        try:
            while pos < len(body):
                dev, ino, size, mtime, ctime, n, key = rec.unpack_from(body, pos)
                pos += rec.size
                entries[body[pos : pos + n]] = ((dev, ino, size, mtime, ctime), key)
                pos += n
        except struct.error:
            return {}
        return entries

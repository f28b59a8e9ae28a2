#!/usr/bin/env python3
"""Extract the files stored in a Qt binary resource bundle (``.rcc``).

GCompris (and other Qt applications) ship their data as binary resource
files produced by ``rcc -binary``.  Qt's ``rcc`` tool can only *create* these
bundles, so this small, dependency-free parser reads them back.

Format (see qtbase ``src/corelib/io/qresource.cpp``), all integers big-endian:

header
    ``b"qres"``, version (u32, 1..3), tree offset (u32), data offset (u32),
    names offset (u32) and, for version >= 3, format flags (u32).
tree
    array of nodes; node 0 is the root directory.  Each node is
    ``name_offset u32, flags u16`` followed by either
    ``child_count u32, first_child u32`` (directory, flag 0x02) or
    ``territory u16, language u16, data_offset u32`` (file).
    Version >= 2 appends a u64 last-modified timestamp (22 bytes per node,
    14 bytes for version 1).
names
    ``length u16, hash u32`` then ``length`` UTF-16BE code units.
data
    ``size u32`` then ``size`` bytes.  With flag 0x01 the payload is
    ``qCompress`` output: a u32 uncompressed length followed by a zlib
    stream.  With flag 0x04 (version 3) it is a zstd frame; that needs the
    optional ``zstandard`` module and is reported clearly if it is missing.

Usage::

    python tools/extract_gcompris_rcc.py BUNDLE.rcc OUTPUT_DIR [--list]
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

FLAG_COMPRESSED = 0x01
FLAG_DIRECTORY = 0x02
FLAG_COMPRESSED_ZSTD = 0x04


class RccError(ValueError):
    """Raised for malformed or unsupported bundles."""


class RccBundle:
    def __init__(self, blob: bytes) -> None:
        if blob[:4] != b"qres":
            raise RccError("not a Qt resource bundle (missing 'qres' magic)")
        self.blob = blob
        self.version, self.tree, self.data, self.names = struct.unpack_from(">4I", blob, 4)
        if not 1 <= self.version <= 3:
            raise RccError(f"unsupported rcc format version {self.version}")
        self.node_size = 14 if self.version == 1 else 22

    def _u16(self, off: int) -> int:
        return struct.unpack_from(">H", self.blob, off)[0]

    def _u32(self, off: int) -> int:
        return struct.unpack_from(">I", self.blob, off)[0]

    def _name(self, name_offset: int) -> str:
        off = self.names + name_offset
        length = self._u16(off)
        raw = self.blob[off + 6 : off + 6 + 2 * length]
        return raw.decode("utf-16-be")

    def _node(self, index: int) -> tuple[str, int, int, int]:
        off = self.tree + index * self.node_size
        name_off = self._u32(off)
        flags = self._u16(off + 4)
        name = "" if index == 0 else self._name(name_off)
        if flags & FLAG_DIRECTORY:
            return name, flags, self._u32(off + 6), self._u32(off + 10)
        return name, flags, 0, self._u32(off + 10)

    def _payload(self, flags: int, data_offset: int) -> bytes:
        off = self.data + data_offset
        size = self._u32(off)
        raw = self.blob[off + 4 : off + 4 + size]
        if flags & FLAG_COMPRESSED_ZSTD:
            try:
                import zstandard  # type: ignore
            except ImportError as exc:  # pragma: no cover - not used by GCompris 3.1
                raise RccError("zstd-compressed entry; install 'zstandard'") from exc
            return zstandard.ZstdDecompressor().decompress(raw, max_output_size=1 << 31)
        if flags & FLAG_COMPRESSED:
            expected = struct.unpack_from(">I", raw, 0)[0]
            out = zlib.decompress(raw[4:])
            if len(out) != expected:
                raise RccError(f"size mismatch: {len(out)} != {expected}")
            return out
        return raw

    def files(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``(relative_path, content)`` for every file in the bundle."""
        stack = [(0, "")]
        while stack:
            index, prefix = stack.pop()
            name, flags, count, first = self._node(index)
            path = f"{prefix}/{name}" if prefix else name
            if flags & FLAG_DIRECTORY:
                for child in range(first, first + count):
                    stack.append((child, path))
            else:
                yield path, self._payload(flags, first)


def extract(bundle: Path, out_dir: Path, list_only: bool = False) -> int:
    rcc = RccBundle(bundle.read_bytes())
    n = 0
    root = out_dir.resolve()
    for rel, content in rcc.files():
        n += 1
        if list_only:
            print(f"{len(content):>10}  {rel}")
            continue
        target = (root / rel).resolve()
        if root not in target.parents:
            raise RccError(f"refusing to write outside {root}: {rel}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out_dir", type=Path, nargs="?", default=Path("."))
    ap.add_argument("--list", action="store_true", help="only list the contents")
    args = ap.parse_args(argv)
    n = extract(args.bundle, args.out_dir, args.list)
    print(f"{n} files {'listed' if args.list else 'extracted'} from {args.bundle}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

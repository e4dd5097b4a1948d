"""Byte encodings used in every hash (00-core 1.1).

``UER(s) = LE32(len(utf8)) || utf8``; u64 -> ``LE64``; indices -> ``LE32``; ISO -> UER of upper-case code.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_CHUNK = 1 << 20


def le64(x: int) -> bytes:
    if not 0 <= int(x) < (1 << 64):
        raise ValueError(f"LE64 out of range: {x}")
    return struct.pack("<Q", int(x))


def le32(x: int) -> bytes:
    if not 0 <= int(x) < (1 << 32):
        raise ValueError(f"LE32 out of range: {x}")
    return struct.pack("<I", int(x))


def uer(s: str) -> bytes:
    b = s.encode("utf-8")
    return le32(len(b)) + b


def iso_bytes(code: str) -> bytes:
    return uer(code.upper())


def sha256(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def sha256_hex(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def file_sha256(path: str | Path) -> bytes:
    """SHA-256 of the exact bytes on disk, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.digest()


def file_sha256_hex(path: str | Path) -> str:
    return file_sha256(path).hex()


def low64(h: bytes) -> int:
    """LOW64(H): bytes 24..31 read little-endian."""
    return struct.unpack("<Q", h[24:32])[0]


def be64(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]

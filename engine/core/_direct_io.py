"""Sequential file writing with ``O_DIRECT`` (page cache bypassed), falling back to buffered I/O.

Why: the RNG logs are GBs per state at 10^6 merchants. A buffered ``write`` copies every byte into the page
cache, allocating (and later reclaiming) a page per 4 KiB; on the benchmark VM that costs 0.4-4.8 s of system
time per 1.6 GB, while ``O_DIRECT`` writes go from user memory to the device (~0.2 s system time, and the final
``fsync`` has little left to flush). Nothing in the engine re-reads a log right after writing it (validators
trust a mirror by the file's stat, see :mod:`engine.core.rnglog`), so losing the cached copy costs nothing.

:class:`SeqWriter` writes a byte stream from a file offset on with ``os.pwrite``. ``O_DIRECT`` needs the file
offset, the length and the memory address of every write aligned to the device's logical block (4096 covers
every device in use): whole blocks are written directly from the caller's memory when it is suitably aligned
(the renderer places each chunk at the file offset's phase inside page-aligned buffers: see
:meth:`SeqWriter.phase` and :func:`aligned_empty`), other data goes through a page-aligned staging buffer; the
partial block between two chunks is carried in a one-block buffer; the last partial block is written after
clearing ``O_DIRECT`` (``fcntl``) so the file gets its exact size without padding. Appending at an unaligned
offset first reads the file's partial last block into the carry, so the block is rewritten with the same bytes
followed by the new ones.

Fallbacks: a file system refusing ``O_DIRECT`` at ``open`` (``EINVAL``, e.g. tmpfs on older kernels) gives a
plain buffered descriptor; one refusing it at the first write (``EINVAL``) gets ``O_DIRECT`` cleared and the
same write retried buffered. Either way the bytes and their offsets are the same. ``ENGINE_DIRECT_IO=0``
disables ``O_DIRECT`` altogether.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import Any

import numpy as np

BLOCK = 4096
O_DIRECT = getattr(os, "O_DIRECT", 0)
_STAGE_BYTES = 8 << 20  # staging buffer for data that is not block-aligned in memory


def enabled() -> bool:
    return bool(O_DIRECT) and os.environ.get("ENGINE_DIRECT_IO", "1") != "0"


def aligned_empty(n: int) -> np.ndarray:
    """Uninitialised uint8 array of ``n`` bytes starting on a page boundary (an anonymous mmap)."""
    return np.frombuffer(mmap.mmap(-1, max(int(n), 1)), dtype=np.uint8, count=int(n))


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def open_fd(path: Any, append: bool = False, direct: bool = True) -> tuple[int, bool]:
    """``(fd, direct)``: ``path`` opened for writing (created/truncated; ``append``: existing, read-write so the
    partial last block can be read), with ``O_DIRECT`` when asked, enabled and accepted by the file system."""
    flags = (os.O_RDWR if append else os.O_WRONLY | os.O_CREAT | os.O_TRUNC) | getattr(os, "O_CLOEXEC", 0)
    if direct and enabled():
        try:
            return os.open(path, flags | O_DIRECT, 0o644), True
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644), False


def _clear_direct(fd: int) -> None:
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    if fl & O_DIRECT:
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~O_DIRECT)


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    mv = memoryview(data).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


class SeqWriter:
    """Writes a byte stream to ``fd`` from file offset ``start`` on (see the module docstring). ``write``
    calls come from one thread at a time, in stream order; :meth:`finish` writes the carried partial block.
    ``fallbacks`` counts writes retried buffered after ``EINVAL``."""

    def __init__(self, fd: int, start: int, direct: bool):
        self.fd = fd
        self.direct = direct
        self.pos = start  # file offset of the next stream byte
        self.fallbacks = 0
        if direct:
            self._blk = aligned_empty(BLOCK)
            self._stage: np.ndarray | None = None
            self._base = start - start % BLOCK  # file offset of _blk[0]
            self._carry = start - self._base
            if self._carry:  # appending inside a block: carry its existing bytes (rewritten unchanged)
                try:  # an O_DIRECT read, too, must be a whole aligned block into aligned memory
                    got = os.preadv(fd, [memoryview(self._blk)], self._base)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    _clear_direct(fd)
                    self.fallbacks += 1
                    got = os.preadv(fd, [memoryview(self._blk)], self._base)
                if got < self._carry:
                    raise OSError(errno.EIO, f"short read of the partial block at {self._base}")

    def phase(self, offset: int | None = None) -> int:
        """Position inside its block of the stream byte at file offset ``offset`` (default: the next one): a
        producer placing a chunk at this offset of a page-aligned buffer lets it be written without a copy."""
        return (self.pos if offset is None else offset) % BLOCK if self.direct else 0

    def _pwrite_blocks(self, a: np.ndarray, offset: int) -> None:
        try:
            _pwrite_all(self.fd, a, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _clear_direct(self.fd)  # the file system refuses O_DIRECT after all: same bytes, buffered
            self.fallbacks += 1
            _pwrite_all(self.fd, a, offset)

    def write(self, data: Any) -> None:
        a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        n = a.shape[0]
        if n == 0:
            return
        if not self.direct:
            _pwrite_all(self.fd, a, self.pos)
            self.pos += n
            return
        i = 0
        if self._carry:
            take = min(BLOCK - self._carry, n)
            self._blk[self._carry:self._carry + take] = a[:take]
            self._carry += take
            i = take
            if self._carry < BLOCK:
                self.pos += n
                return
            self._pwrite_blocks(self._blk, self._base)
            self._base += BLOCK
            self._carry = 0
        m = (n - i) // BLOCK * BLOCK
        if m:
            seg = a[i:i + m]
            if _address(seg) % BLOCK == 0:
                self._pwrite_blocks(seg, self._base)  # straight from the caller's memory
            else:
                if self._stage is None:
                    self._stage = aligned_empty(_STAGE_BYTES)
                for s in range(0, m, _STAGE_BYTES):
                    k = min(_STAGE_BYTES, m - s)
                    self._stage[:k] = seg[s:s + k]
                    self._pwrite_blocks(self._stage[:k], self._base + s)
            self._base += m
            i += m
        rest = n - i
        if rest:
            self._blk[:rest] = a[i:]
            self._carry = rest
        self.pos += n

    def finish(self) -> None:
        """Write the carried partial last block (``O_DIRECT`` cleared: the file ends at the exact byte)."""
        if self.direct and self._carry:
            _clear_direct(self.fd)
            _pwrite_all(self.fd, self._blk[:self._carry], self._base)
            self._base += self._carry
            self._carry = 0

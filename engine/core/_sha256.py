"""SHA-256 of many short records in native code (the hot path of ``rng.substreams_vec`` / ``merchant_u64_vec``).

Every keyed substream is ``SHA256(prefix || record)`` of a message of 70-90 bytes. Through ``hashlib`` each
costs ~0.6-1.5 us, almost all of it Python call overhead (object copy, update, digest, join). Here a numba loop
calls the SHA-256 of the very OpenSSL library ``hashlib`` itself is linked with (``SHA256_Init`` /
``SHA256_Update`` / ``SHA256_Final``): ~0.15 us per record, GIL released, so a large batch is split over two
threads. The digest function is the same code, so the bytes are the same; a known-answer check against
``hashlib`` runs on load, and ``tests/test_rng.py`` compares the two on random records of every width in use.

:func:`sha256_records` returns ``None`` when the native path is unavailable (no libcrypto found in the process,
symbols missing, the check failed, or ``ENGINE_SHA256_NATIVE=0``); :mod:`engine.core.rng` then hashes with
``hashlib``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba.core import types

_SYMBOLS = ("SHA256_Init", "SHA256_Update", "SHA256_Final")
_THREADS_FROM = 200_000  # records; below this one thread is faster than handing work to a second one
_state: dict = {}


def _libcrypto_path() -> str | None:
    """The libcrypto ``hashlib`` uses (found in this process's mappings), else the system's by name."""
    import _hashlib  # noqa: F401  (maps hashlib's OpenSSL into the process)

    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith("libcrypto.so") and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return ctypes.util.find_library("crypto")


def _load():
    """Compile/load the kernel once per process; returns it, or None when the native path is unavailable."""
    if "kernel" in _state:
        return _state["kernel"]
    kernel = None
    if os.environ.get("ENGINE_SHA256_NATIVE", "1") != "0":
        try:
            path = _libcrypto_path()
            if path:
                lib = ctypes.CDLL(path)
                if all(hasattr(lib, s) for s in _SYMBOLS):
                    import llvmlite.binding as llb

                    llb.load_library_permanently(path)  # numba links the symbols below by name
                    kernel = _records
                    if not _known_answer(kernel):
                        kernel = None
        except (OSError, ImportError, RuntimeError, AttributeError):
            kernel = None
    _state["kernel"] = kernel
    return kernel


# Resolved by name when the kernel is compiled or loaded from numba's cache, i.e. after _load() has loaded the
# library into the process (``load_library_permanently``); never called before that.
_INIT = types.ExternalFunction("SHA256_Init", types.intc(types.voidptr))
_UPDATE = types.ExternalFunction("SHA256_Update", types.intc(types.voidptr, types.voidptr, types.uintp))
_FINAL = types.ExternalFunction("SHA256_Final", types.intc(types.voidptr, types.voidptr))


@numba.njit(cache=True, nogil=True)
def _records(prefix, recs, width, start, stop, out):  # pragma: no cover - numba
    ctx = np.empty(256, np.uint8)  # SHA256_CTX (112 bytes in OpenSSL 1.1 / 3.x), generously sized
    cp = ctx.ctypes.data
    pp = prefix.ctypes.data
    plen = prefix.shape[0]
    rp = recs.ctypes.data
    op = out.ctypes.data
    for i in range(start, stop):
        _INIT(cp)
        if plen:
            _UPDATE(cp, pp, plen)
        _UPDATE(cp, rp + i * width, width)
        _FINAL(op + i * 32, cp)


def _known_answer(kernel) -> bool:
    rng = np.random.Generator(np.random.Philox(20251127))  # fixed test vectors (not engine randomness)
    for plen, width in ((0, 8), (62, 14), (62, 22), (55, 9), (64, 64), (3, 200)):
        prefix = rng.integers(0, 256, plen, dtype=np.uint8)
        recs = rng.integers(0, 256, 3 * width, dtype=np.uint8)
        out = np.zeros(3 * 32, np.uint8)
        kernel(prefix, recs, width, 0, 3, out)
        want = b"".join(hashlib.sha256(prefix.tobytes() + recs[i * width:(i + 1) * width].tobytes()).digest()
                        for i in range(3))
        if out.tobytes() != want:
            return False
    return True


def available() -> bool:
    return _load() is not None


def sha256_records(prefix: bytes, records: np.ndarray, n: int, width: int) -> bytes | None:
    """``SHA256(prefix || records[i*width:(i+1)*width])`` for i < n, concatenated (32 bytes each); None when the
    native path is unavailable."""
    kernel = _load()
    if kernel is None:
        return None
    pre = np.frombuffer(bytes(prefix), dtype=np.uint8) if prefix else np.zeros(0, np.uint8)
    recs = np.ascontiguousarray(np.frombuffer(records, dtype=np.uint8) if isinstance(records, (bytes, bytearray,
                                                                                              memoryview))
                                else np.asarray(records, dtype=np.uint8).ravel())
    if recs.shape[0] < n * width:
        raise ValueError("records shorter than n * width")
    out = np.empty(n * 32, np.uint8)
    if n >= _THREADS_FROM and (os.cpu_count() or 1) > 1:
        half = n // 2
        with ThreadPoolExecutor(max_workers=2) as ex:  # kernel releases the GIL; slots are disjoint
            futs = [ex.submit(kernel, pre, recs, width, 0, half, out),
                    ex.submit(kernel, pre, recs, width, half, n, out)]
            for f in futs:
                f.result()
    elif n:
        kernel(pre, recs, width, 0, n, out)
    return out.tobytes()

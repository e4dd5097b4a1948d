"""Philox2x64-10, ``u01``, master material and keyed substreams (00-core section 3; decisions 14, 16).

Two implementations of every primitive:

* scalar references on Python ints (``philox2x64_10``, ``u01``, ``add128``, ``substream``): the
  oracle, written exactly as 00-core 3.1-3.4 (with decision 14's ``u01``);
* vectorised versions over ``uint64`` numpy arrays (``philox_vec``, ``u01_vec``, ``add128_vec``,
  ``substreams_vec``, ``merchant_u64_vec``) used on hot paths; tests prove they give the same bits.

Counters are 128-bit, carried as two uint64 words ``(hi, lo)``. A substream is
``(key, hi, lo)``; drawing a block uses counter ``(hi, lo)`` and then moves it to ``+1``.

Encodings (00-core 1.1, 3.3; decision 16): ``SER`` of a merchant is ``LE64(merchant_u64)``, of an
ISO code ``UER(upper-case code)``, of an index ``LE32``, of a 1B ``site_order`` ``LE64``.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from engine.core.hashing import le32, le64, uer

# --- constants (00-core 3.1, 3.4; decision 14) -----------------------------------------------
ALGORITHM = "philox2x64-10"
MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1
PHILOX_M0 = 0xD2B74407B1CE6E93
PHILOX_W0 = 0x9E3779B97F4A7C15
PHILOX_ROUNDS = 10
TWO_M64 = float.fromhex("0x1p-64")
U01_MAX = float.fromhex("0x1.fffffffffffffp-1")  # the largest value u01 returns

_kernels = None


def _k():
    """Import the numba kernels on first use (keeps ``import engine.core.rng`` cheap)."""
    global _kernels
    if _kernels is None:
        from engine.core import _kernels as k

        _kernels = k
    return _kernels


def _u64(a) -> np.ndarray:
    """A contiguous uint64 array; refuses negative or non-integer inputs (u64 never via signed or float).

    Python ints and lists of them are converted exactly (numpy would infer float64 for a list
    mixing values above and below 2^63).
    """
    if isinstance(a, np.ndarray) and a.dtype == np.uint64:
        return np.ascontiguousarray(a)
    if not isinstance(a, np.ndarray):
        obj = np.asarray(a, dtype=object)
        if any(not isinstance(v, (int, np.integer)) or isinstance(v, bool) for v in obj.ravel().tolist()):
            raise TypeError("expected unsigned 64-bit integers")
        a = obj
    if a.dtype.kind == "O":
        vals = [int(v) for v in a.ravel().tolist()]
        if any(v < 0 or v > MASK64 for v in vals):
            raise ValueError("value outside [0, 2^64) where a u64 is required")
        return np.array(vals, dtype=np.uint64).reshape(a.shape)
    if a.dtype.kind == "i":
        if a.size and int(a.min()) < 0:
            raise ValueError("negative value where a u64 is required")
    elif a.dtype.kind != "u":
        raise TypeError(f"expected unsigned 64-bit integers, got {a.dtype}")
    return np.ascontiguousarray(a.astype(np.uint64))


# --- Philox2x64-10 ---------------------------------------------------------------------------
def philox2x64_10(key: int, hi: int, lo: int) -> tuple[int, int]:
    """Scalar oracle (00-core 3.1): one block for counter ``(hi, lo)``; returns ``(x0, x1)``.

    word0 = counter LOW word, word1 = counter HIGH word; round r uses key0 + r*W0.
    """
    a, b, k = lo & MASK64, hi & MASK64, key & MASK64
    for _ in range(PHILOX_ROUNDS):
        p = PHILOX_M0 * a  # full 128-bit product of M0 and word0
        a, b = ((p >> 64) ^ k ^ b) & MASK64, p & MASK64
        k = (k + PHILOX_W0) & MASK64
    return a, b


def philox_vec(key, hi, lo) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised Philox2x64-10 over equal-length uint64 arrays; returns ``(x0, x1)`` uint64 arrays.

    Scalars broadcast. Equal, bit for bit, to :func:`philox2x64_10` on every element.
    """
    key, hi, lo = (np.require(v.ravel(), np.uint64, ["C", "W"])
                   for v in np.broadcast_arrays(_u64(key), _u64(hi), _u64(lo)))
    x0 = np.empty(key.shape[0], np.uint64)
    x1 = np.empty(key.shape[0], np.uint64)
    _k().philox_kernel(key, hi, lo, x0, x1)
    return x0, x1


# --- 128-bit counters --------------------------------------------------------------------------
def add128(hi: int, lo: int, n: int = 1) -> tuple[int, int]:
    """``(hi, lo) + n`` modulo 2^128 (carry lo -> hi)."""
    c = (((hi & MASK64) << 64) | (lo & MASK64)) + int(n)
    c &= MASK128
    return c >> 64, c & MASK64


def add128_vec(hi, lo, n) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`add128`; ``n`` is a uint64 scalar or array."""
    hi, lo, n = (np.ascontiguousarray(v) for v in np.broadcast_arrays(
        np.atleast_1d(_u64(hi)), np.atleast_1d(_u64(lo)), np.atleast_1d(_u64(n))))
    lo2 = lo + n  # uint64 wraps modulo 2^64
    carry = (lo2 < lo).astype(np.uint64)
    return hi + carry, lo2


def sub128_vec(hi_after, lo_after, hi_before, lo_before) -> np.ndarray:
    """``u128(after) - u128(before)`` as uint64 (the envelope's ``blocks``).

    Raises ``ValueError`` when after < before or the difference does not fit in 64 bits.
    """
    ha, la, hb, lb = np.broadcast_arrays(*(np.atleast_1d(_u64(v)) for v in (hi_after, lo_after, hi_before, lo_before)))
    borrow = (la < lb).astype(np.uint64)
    dlo = la - lb
    dhi = ha - hb - borrow
    if np.any((ha < hb) | ((ha == hb) & (la < lb))) or np.any(dhi != 0):
        raise ValueError("counter difference negative or >= 2^64")
    return dlo


# --- u01 (decision 14) -----------------------------------------------------------------------
def u01(x: int) -> float:
    """``RNE_binary64(x + 1) * 2^-64`` with the sum exact; a result of 1.0 becomes 0x1.fffffffffffffp-1.

    Decision 14 (replaces 00-core 3.4): ``u01(0) = 2^-64``, ``u01(2^64-1) = 0x1.fffffffffffffp-1``,
    ``u01(9223372036854778879) = 0x1.0000000000002p-1``. Python ``float(int)`` rounds to nearest even.
    """
    u = float(int(x) + 1) * TWO_M64
    return U01_MAX if u == 1.0 else u


def u01_vec(x) -> np.ndarray:
    """Vectorised :func:`u01` (numpy; equal to the scalar on every input)."""
    x = np.atleast_1d(_u64(x))
    f = (x + np.uint64(1)).astype(np.float64)  # exact integer sum, then one RNE conversion
    f[x == np.uint64(MASK64)] = 18446744073709551616.0  # the sum wrapped to 0: it is 2^64
    u = f * TWO_M64
    u[u == 1.0] = U01_MAX
    return u


# --- master material, root, merchant_u64 -----------------------------------------------------
def _fp_bytes(fingerprint_bytes) -> bytes:
    if isinstance(fingerprint_bytes, str):
        fingerprint_bytes = bytes.fromhex(fingerprint_bytes)
    fingerprint_bytes = bytes(fingerprint_bytes)
    if len(fingerprint_bytes) != 32:
        raise ValueError(f"manifest_fingerprint must be 32 bytes, got {len(fingerprint_bytes)}")
    return fingerprint_bytes


def master_material(segment: str, fingerprint_bytes, seed: int) -> bytes:
    """``M = SHA256(UER("mlr:<segment>.master") || fingerprint bytes || LE64(seed))`` (00-core 3.2; decision 16).

    ``fingerprint_bytes`` may also be given as its 64-hex string.
    """
    return hashlib.sha256(uer(f"mlr:{segment}.master") + _fp_bytes(fingerprint_bytes) + le64(seed)).digest()


def _key_counter(h: bytes) -> tuple[int, int, int]:
    """``k = LOW64(H)`` (bytes 24..31 little-endian), ``C = (BE64(H[16:24]), BE64(H[24:32]))``."""
    key = struct.unpack_from("<Q", h, 24)[0]
    hi, lo = struct.unpack_from(">QQ", h, 16)
    return key, hi, lo


def root(M: bytes) -> tuple[int, int, int]:
    """Root key and counter ``(k_root, hi, lo)`` of master material ``M`` (audit only; no event draws from it)."""
    return _key_counter(M)


def merchant_u64(merchant_id: int) -> int:
    """``LOW64(SHA256(LE64(merchant_id)))`` — the only merchant -> u64 map (00-core 3.3)."""
    return struct.unpack_from("<Q", hashlib.sha256(le64(merchant_id)).digest(), 24)[0]


def _digests_to_u64(digests: bytes, n: int, start: int, fmt: str) -> np.ndarray:
    a = np.frombuffer(digests, dtype=np.uint8).reshape(n, 32)[:, start:start + 8]
    return np.ascontiguousarray(a).view(np.dtype(fmt)).ravel().astype(np.uint64)


def _sha256_records(prefix: bytes, buf, n: int, width: int) -> bytes:
    """SHA-256 of ``prefix || buf[i*width:(i+1)*width]`` for every i, concatenated (32 bytes each).

    Native loop over OpenSSL's SHA-256 when available (:mod:`engine.core._sha256`, ~0.15 us per record, two
    threads for large batches); otherwise hashlib, one OpenSSL object absorbing the constant prefix once and
    each record only copying it (about 2x faster than hashing ``prefix + record`` afresh). Same bytes either way.
    """
    from engine.core import _sha256

    got = _sha256.sha256_records(prefix, buf, n, width)
    if got is not None:
        return got
    return _sha256_records_hashlib(prefix, buf, n, width)


def _sha256_records_hashlib(prefix: bytes, buf, n: int, width: int) -> bytes:
    """The hashlib statement of :func:`_sha256_records` (the fallback, and the tests' reference)."""
    copy = hashlib.sha256(prefix).copy
    out = []
    append = out.append
    mv = memoryview(buf).cast("B")
    for off in range(0, n * width, width):
        h = copy()
        h.update(mv[off:off + width])
        append(h.digest())
    return b"".join(out)


def merchant_u64_vec(merchant_ids) -> np.ndarray:
    """Vectorised :func:`merchant_u64` over uint64 merchant ids (~0.15 us per distinct id natively).

    Each distinct id is hashed once: callers pass per-row ids (one per site or candidate) as they are."""
    ids = _u64(merchant_ids).ravel()
    n = ids.shape[0]
    if n == 0:
        return np.empty(0, np.uint64)
    if n > 1 and bool((ids[1:] >= ids[:-1]).all()):
        # sorted ids (the usual per-row columns in writer order): the same unique/inverse without a sort
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(ids[1:], ids[:-1], out=new[1:])
        uniq, inv = ids[new], np.cumsum(new) - 1
    else:
        uniq, inv = np.unique(ids, return_inverse=True)
    if uniq.shape[0] < n:
        return merchant_u64_vec(uniq)[inv.ravel()]
    d = _sha256_records(b"", np.ascontiguousarray(ids.astype("<u8")).view(np.uint8), n, 8)
    return _digests_to_u64(d, n, 24, "<u8")


# --- SER ---------------------------------------------------------------------------------------
def ser_u64(x: int) -> bytes:
    """SER of a u64 id (``merchant_u64``, 1B ``site_order``): LE64."""
    return le64(x)


def ser_u32(i: int) -> bytes:
    """SER of an index: LE32 (0 <= i < 2^32)."""
    return le32(i)


def ser_iso(code: str) -> bytes:
    """SER of an ISO code: UER of the upper-cased code."""
    return uer(str(code).upper())


# --- keyed substreams (00-core 3.3; decision 16) -----------------------------------------------
def _prefix(M: bytes, segment: str, label: str) -> bytes:
    if len(M) != 32:
        raise ValueError("master material must be 32 bytes")
    return bytes(M) + uer(f"mlr:{segment}") + uer(label)


def substream(M: bytes, segment: str, label: str, id_bytes: bytes) -> tuple[int, int, int]:
    """``H = SHA256(M || UER("mlr:<segment>") || UER(label) || SER(ids))`` -> ``(key, hi, lo)``.

    ``id_bytes`` is the already serialised id tuple (e.g. ``ser_u64(merchant_u64(m)) + ser_iso("GB")``).
    """
    return _key_counter(hashlib.sha256(_prefix(M, segment, label) + bytes(id_bytes)).digest())


def _iso_bytes(iso) -> tuple[np.ndarray, np.ndarray]:
    """Upper-cased UTF-8 bytes of ISO codes as an (n, width) uint8 matrix (zero padded) and their lengths."""
    arr = np.asarray(iso)
    if arr.dtype.kind not in "UO" or arr.ndim != 1:
        raise TypeError("iso must be a 1-d sequence of strings")
    if arr.dtype.kind == "O":
        if any(not isinstance(c, str) for c in arr.tolist()):
            raise TypeError("iso codes must be strings")
        arr = arr.astype(str)
    n = arr.shape[0]
    width = max(1, arr.dtype.itemsize // 4)
    cp = np.ascontiguousarray(arr).view(np.uint32).reshape(n, width) if arr.dtype.itemsize else None
    if cp is not None and bool((cp < 128).all()):
        # ASCII fast path: str.upper() on ASCII only maps a-z to A-Z
        lower = (cp >= 97) & (cp <= 122)
        mat = (cp - lower.astype(np.uint32) * np.uint32(32)).astype(np.uint8)
        lens = np.strings.str_len(arr).astype(np.int64)
        return mat, lens
    # general path: Python's str.upper (full case mapping, e.g. "ß" -> "SS"), then UTF-8
    enc = [c.upper().encode("utf-8") for c in arr.tolist()]
    b = np.array(enc, dtype="S%d" % max([1] + [len(e) for e in enc]))
    width = max(1, b.dtype.itemsize)
    mat = np.frombuffer(b.tobytes(), np.uint8).reshape(n, width) if n else np.zeros((0, width), np.uint8)
    lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=n)
    return mat, lens


def substreams_vec(M: bytes, segment: str, label: str, merchant_u64, iso=None, site_order=None):
    """Substreams ``(key, hi, lo)`` (uint64 arrays) for many id tuples at once.

    ids per row = ``LE64(merchant_u64[i])`` then, if given, ``UER(upper(iso[i]))`` then, if given,
    ``LE64(site_order[i])`` (decision 16). ``merchant_u64`` holds already mapped values
    (:func:`merchant_u64_vec`), not raw merchant ids.
    """
    mu = _u64(merchant_u64).ravel()
    n = mu.shape[0]
    prefix = _prefix(M, segment, label)
    if n == 0:
        e = np.empty(0, np.uint64)
        return e, e.copy(), e.copy()
    cols = mu.astype("<u8").view(np.uint8).reshape(n, 8)
    if iso is not None:
        iso_b, lens = _iso_bytes(iso)
        if iso_b.shape[0] != n:
            raise ValueError("iso must have one code per merchant_u64")
        groups = np.unique(lens)
    if site_order is not None:
        so = _u64(site_order).ravel()
        if so.shape[0] != n:
            raise ValueError("site_order must have one value per merchant_u64")
    if iso is None or len(groups) == 1:
        idx_sets = [None]
    else:  # ISO codes of different byte lengths: hash each length group as fixed-width records
        idx_sets = [np.flatnonzero(lens == g) for g in groups]
    digests = bytearray(32 * n)
    for idx in idx_sets:
        sel = slice(None) if idx is None else idx
        parts = [cols[sel]]
        m = parts[0].shape[0]
        if iso is not None:
            L = int(lens[0] if idx is None else lens[idx[0]])
            parts.append(np.broadcast_to(np.frombuffer(le32(L), np.uint8), (m, 4)))
            parts.append(iso_b[sel, :L])
        if site_order is not None:
            parts.append(so[sel].astype("<u8").view(np.uint8).reshape(m, 8))
        rec = np.ascontiguousarray(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        d = _sha256_records(prefix, rec.ravel(), m, rec.shape[1])
        if idx is None:
            digests = d
        else:
            np.frombuffer(digests, np.uint8).reshape(n, 32)[idx] = np.frombuffer(d, np.uint8).reshape(m, 32)
    digests = bytes(digests)
    key = _digests_to_u64(digests, n, 24, "<u8")
    hi = _digests_to_u64(digests, n, 16, ">u8")
    lo = _digests_to_u64(digests, n, 24, ">u8")
    return key, hi, lo

"""Philox2x64-10, u01, master material, merchant_u64 and keyed substreams (00-core 3.1-3.4; decisions 14, 16)."""

from __future__ import annotations

import hashlib
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.core import rng
from engine.core.hashing import le64

DATA = Path(__file__).parent / "data" / "rng"
FP_1A = bytes.fromhex("991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709")
FP_UPSTREAM = bytes.fromhex("4fbffd996b4cd94eaf42e074c814ee68029492672f8bfb2acf98f33d6e3d8a3b")
SEED = 9248923
MASK = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# An independent Philox2x64 on numpy uint64 arrays with 32-bit limbs (any round count), used to
# check the numba kernel on 10^6 pairs without 10^6 slow Python-int calls.
# ---------------------------------------------------------------------------------------------
_M32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)


def _mulhilo_limbs(a: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    b_lo, b_hi = np.uint64(b & 0xFFFFFFFF), np.uint64(b >> 32)
    a_lo, a_hi = a & _M32, a >> _S32
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi  # each < 2^64: exact
    mid = (ll >> _S32) + (lh & _M32) + (hl & _M32)  # < 3 * 2^32: exact
    lo = (mid << _S32) | (ll & _M32)
    hi = hh + (lh >> _S32) + (hl >> _S32) + (mid >> _S32)
    return hi, lo


def philox_limbs(key, hi, lo, rounds=10):
    a, b, k = lo.copy(), hi.copy(), key.copy()
    w = np.uint64(0x9E3779B97F4A7C15)
    for _ in range(rounds):
        p_hi, p_lo = _mulhilo_limbs(a, 0xD2B74407B1CE6E93)
        a, b = p_hi ^ k ^ b, p_lo
        k = k + w
    return a, b


def _kat_lines():
    out = []
    for line in (DATA / "random123_kat_philox2x64.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, rounds, c0, c1, key, x0, x1 = line.split()
        assert name == "philox2x64"
        out.append((int(rounds), int(c0, 16), int(c1, 16), int(key, 16), int(x0, 16), int(x1, 16)))
    return out


def _rand_u64(gen, n):
    return gen.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False)


# --- Philox -----------------------------------------------------------------------------------
def test_random123_kat_scalar_and_vectorised():
    kats = _kat_lines()
    assert len([k for k in kats if k[0] == 10]) == 3
    for rounds, c0, c1, key, x0, x1 in kats:
        # ctr word0 = counter LOW word, word1 = HIGH word
        a, b = philox_limbs(np.array([key], np.uint64), np.array([c1], np.uint64), np.array([c0], np.uint64), rounds)
        assert (int(a[0]), int(b[0])) == (x0, x1)
        if rounds == 10:
            assert rng.philox2x64_10(key, c1, c0) == (x0, x1)
            v0, v1 = rng.philox_vec(np.array([key], np.uint64), np.array([c1], np.uint64), np.array([c0], np.uint64))
            assert (int(v0[0]), int(v1[0])) == (x0, x1)


def test_spec_kat_literal():
    # 00-core 3.1, written out
    assert rng.philox2x64_10(0, 0, 0) == (0xCA00A0459843D731, 0x66C24222C9A845B5)
    assert rng.philox2x64_10(MASK, MASK, MASK) == (0x65B021D60CD8310F, 0x4D02F3222F86DF20)
    assert rng.philox2x64_10(0xA4093822299F31D0, 0x13198A2E03707344, 0x243F6A8885A308D3) == (
        0x0A5E742C2997341C, 0xB0F883D38000DE5D)


def test_philox_vec_matches_limbs_and_scalar_oracle_on_a_million_pairs():
    gen = np.random.default_rng(20251127)
    n = 1_000_000
    key, hi, lo = _rand_u64(gen, n), _rand_u64(gen, n), _rand_u64(gen, n)
    # edge words: zeros, all-ones, carries
    key[:4] = [0, MASK, 0, MASK]
    hi[:4] = [0, MASK, MASK, 0]
    lo[:4] = [0, MASK, MASK, 0]
    k0, h0, l0 = key.copy(), hi.copy(), lo.copy()
    x0, x1 = rng.philox_vec(key, hi, lo)
    assert x0.dtype == np.uint64 and x1.dtype == np.uint64
    assert np.array_equal(key, k0) and np.array_equal(hi, h0) and np.array_equal(lo, l0)  # inputs untouched
    r0, r1 = philox_limbs(key, hi, lo)
    assert np.array_equal(x0, r0) and np.array_equal(x1, r1)
    # the scalar Python-int oracle on every one of the 10^6 pairs (issue acceptance; ~4 s)
    f = rng.philox2x64_10
    got = list(map(f, key.tolist(), hi.tolist(), lo.tolist()))
    assert got == list(zip(x0.tolist(), x1.tolist()))


def test_philox_vec_broadcast_and_empty():
    x0, x1 = rng.philox_vec(0, 0, np.arange(3, dtype=np.uint64))
    for i in range(3):
        assert (int(x0[i]), int(x1[i])) == rng.philox2x64_10(0, 0, i)
    e0, e1 = rng.philox_vec(np.empty(0, np.uint64), np.empty(0, np.uint64), np.empty(0, np.uint64))
    assert e0.shape == (0,) and e1.shape == (0,)
    with pytest.raises(ValueError):
        rng.philox_vec(np.array([-1]), 0, 0)  # u64 never through signed: negative refused


# --- counters ---------------------------------------------------------------------------------
def test_add128_carries():
    assert rng.add128(0, MASK, 1) == (1, 0)
    assert rng.add128(5, 7, 3) == (5, 10)
    assert rng.add128(MASK, MASK, 1) == (0, 0)  # modulo 2^128
    hi = np.array([0, 5, 7, 3], np.uint64)
    lo = np.array([MASK, 7, MASK, MASK - 1], np.uint64)
    n = np.array([1, 3, 1, 5], np.uint64)
    h2, l2 = rng.add128_vec(hi, lo, n)
    for i in range(4):
        assert (int(h2[i]), int(l2[i])) == rng.add128(int(hi[i]), int(lo[i]), int(n[i]))
    assert np.array_equal(rng.sub128_vec(h2, l2, hi, lo), n)
    with pytest.raises(ValueError):
        rng.sub128_vec(hi, lo, h2, l2)  # after < before


# --- u01 (decision 14) ------------------------------------------------------------------------
def _u01_exact(x: int) -> float:
    """Independent reference: float(Fraction) rounds (x + 1) / 2^64 to nearest even."""
    u = float(Fraction(x + 1, 1 << 64))
    return float.fromhex("0x1.fffffffffffffp-1") if u == 1.0 else u


def test_u01_decision_14_vectors():
    assert rng.u01(0) == 2.0**-64 == 5.421010862427522e-20
    assert rng.u01(MASK) == float.fromhex("0x1.fffffffffffffp-1")
    assert rng.u01(9223372036854778879).hex() == "0x1.0000000000002p-1"
    # the superseded 00-core 3.4 rule (convert, then add 1.0) gives ...0001p-1 here: make sure we are not it
    assert ((float(9223372036854778879) + 1.0) * 2.0**-64).hex() == "0x1.0000000000001p-1"
    v = rng.u01_vec(np.array([0, MASK, 9223372036854778879], np.uint64))
    assert [x.hex() for x in v.tolist()] == ["0x1.0000000000000p-64", "0x1.fffffffffffffp-1", "0x1.0000000000002p-1"]


def test_u01_scalar_vec_and_kernel_agree_with_exact_reference():
    gen = np.random.default_rng(7)
    edge = []
    for e in (52, 53, 54, 63):
        for d in range(-3, 4):
            edge.append(((1 << e) + d) & MASK)
    edge += [MASK - d for d in range(0, 2100, 97)] + [9223372036854778879, 9223372036854777855, 1, 2]
    # ties around 2^63: x + 1 = 2^63 + (2m+1) * 1024 ...
    edge += [((1 << 63) + (2 * m + 1) * 1024 - 1) for m in range(50)]
    x = np.concatenate([np.array(edge, np.uint64), _rand_u64(gen, 200_000)])
    ref = np.array([_u01_exact(v) for v in x.tolist()])
    vec = rng.u01_vec(x)
    ker = np.empty(x.shape[0])
    rng._k().u01_kernel(x, ker)
    assert np.array_equal(vec.view(np.uint64), ref.view(np.uint64))
    assert np.array_equal(ker.view(np.uint64), ref.view(np.uint64))
    xs = x[:2000].tolist()
    assert [rng.u01(v) for v in xs] == ref[:2000].tolist()
    assert (vec > 0).all() and (vec < 1).all()


# --- master material, root, merchant_u64 ------------------------------------------------------
def test_master_material_and_root_kat():
    M = rng.master_material("1A", FP_1A, SEED)
    assert M.hex() == "860c399faf532143537d40a546ac855595cb159ddd8b0498376d18fb1ff820df"
    assert rng.root(M) == (16078123485953027383, 10793744699694449816, 3993875911399710943)
    assert rng.master_material("1A", FP_1A.hex(), SEED) == M  # hex string accepted
    with pytest.raises(ValueError):
        rng.master_material("1A", FP_1A[:31], SEED)


def test_merchant_u64_kats_and_vec():
    assert rng.merchant_u64(1) == 13327312485616700317
    assert rng.merchant_u64(10766668736889901) == 10375941481412673527
    gen = np.random.default_rng(3)
    ids = np.concatenate([np.array([0, 1, 10766668736889901, MASK, 1 << 63], np.uint64), _rand_u64(gen, 3000)])
    got = rng.merchant_u64_vec(ids)
    assert got.dtype == np.uint64
    assert got.tolist() == [rng.merchant_u64(v) for v in ids.tolist()]
    # LOW64 = bytes 24..31 of SHA256(LE64(id)) read little-endian
    assert int(got[3]) == struct.unpack("<Q", hashlib.sha256(le64(MASK)).digest()[24:])[0]
    assert rng.merchant_u64_vec(np.empty(0, np.uint64)).shape == (0,)


# --- substreams -------------------------------------------------------------------------------
def test_substream_kat_hurdle_bernoulli_first_block():
    M = rng.master_material("1A", FP_1A, SEED)
    key, hi, lo = rng.substream(M, "1A", "hurdle_bernoulli", rng.ser_u64(rng.merchant_u64(1)))
    assert (key, hi, lo) == (17687007987406937577, 11483541641549172096, 16797831791730783477)
    x0, x1 = rng.philox2x64_10(key, hi, lo)
    assert (x0, x1) == (17210409597036809027, 2918714665569798422)
    assert rng.u01(x0) == 0.9329781737236341 and rng.u01(x1) == 0.1582238390638039
    k, h, l = rng.substreams_vec(M, "1A", "hurdle_bernoulli", np.array([rng.merchant_u64(1)], np.uint64))
    assert (int(k[0]), int(h[0]), int(l[0])) == (key, hi, lo)


def test_substream_kat_upstream_raw_merchant_id():
    # runbook-era run keyed merchants by raw LE64(merchant_id) (00-core section 8 #2)
    M = rng.master_material("1A", FP_UPSTREAM, 123456789)
    ids = le64(10766668736889901)
    assert rng.substream(M, "1A", "gamma_nb", ids) == (16373892148355269555, 8842850766326215308, 12899230745691700195)
    assert rng.substream(M, "1A", "poisson_nb", ids) == (17388856195869972290, 10409869197225488670, 4762326247866913265)


def test_decision_16_kats_1b_s5_s6():
    M = rng.master_material("1B", FP_1A, SEED)
    mu = rng.merchant_u64(1)
    # S5 site_tile_assign: ids (merchant_u64, ISO)
    k, h, l = rng.substream(M, "1B", "site_tile_assign", rng.ser_u64(mu) + rng.ser_iso("GB"))
    assert (k, h, l) == (18130705828445966095, 12837100559783722750, 1103277385898565115)
    x0, _ = rng.philox2x64_10(k, h, l)
    assert x0 == 15045956122258289606 and rng.u01(x0) == 0.8156429157437006
    kv, hv, lv = rng.substreams_vec(M, "1B", "site_tile_assign", np.array([mu], np.uint64), iso=["gb"])
    assert (int(kv[0]), int(hv[0]), int(lv[0])) == (k, h, l)  # ISO upper-cased first
    # S6 in_cell_jitter: ids (merchant_u64, ISO, LE64(site_order))
    k, h, l = rng.substream(M, "1B", "in_cell_jitter", rng.ser_u64(mu) + rng.ser_iso("GB") + rng.ser_u64(1))
    assert (k, h, l) == (6410871261205765322, 847789589503225099, 14563777118144952152)
    x0, x1 = rng.philox2x64_10(k, h, l)
    assert (x0, x1) == (3952594046648440702, 8468988188280209507)
    assert (rng.u01(x0), rng.u01(x1)) == (0.21427055261647554, 0.45910476962437397)
    kv, hv, lv = rng.substreams_vec(M, "1B", "in_cell_jitter", [mu], iso=np.array(["GB"]), site_order=[1])
    assert (int(kv[0]), int(hv[0]), int(lv[0])) == (k, h, l)


def test_substreams_vec_equals_scalar():
    gen = np.random.default_rng(11)
    n = 2000
    M = rng.master_material("1B", FP_1A, 42)
    mu = _rand_u64(gen, n)
    mu[0] = MASK
    codes = np.array(["GB", "de", "Fr", "US", "NA", "cH"])[gen.integers(0, 6, n)]
    so = gen.integers(1, 10**6, n).astype(np.uint64)
    k, h, l = rng.substreams_vec(M, "1B", "in_cell_jitter", mu, iso=codes, site_order=so)
    for i in range(0, n, 7):
        ids = rng.ser_u64(int(mu[i])) + rng.ser_iso(str(codes[i])) + rng.ser_u64(int(so[i]))
        assert rng.substream(M, "1B", "in_cell_jitter", ids) == (int(k[i]), int(h[i]), int(l[i]))
    k2, h2, l2 = rng.substreams_vec(M, "1B", "site_tile_assign", mu, iso=codes.astype(object))
    for i in range(0, n, 11):
        ids = rng.ser_u64(int(mu[i])) + rng.ser_iso(str(codes[i]))
        assert rng.substream(M, "1B", "site_tile_assign", ids) == (int(k2[i]), int(h2[i]), int(l2[i]))
    # ISO codes of different byte lengths (grouped hashing path) and non-ASCII upper-casing
    odd = ["gb", "USA", "", "é", "ß", "de"]
    k3, h3, l3 = rng.substreams_vec(M, "1A", "gumbel_key", mu[:6], iso=odd)
    for i, c in enumerate(odd):
        assert rng.substream(M, "1A", "gumbel_key", rng.ser_u64(int(mu[i])) + rng.ser_iso(c)) == (
            int(k3[i]), int(h3[i]), int(l3[i]))
    assert rng.ser_iso("ß") == le64(0)[:0] + struct.pack("<I", 2) + b"SS"


def test_substream_separation_and_encodings():
    M = rng.master_material("1A", FP_1A, SEED)
    mu = rng.merchant_u64(1)
    a = rng.substream(M, "1A", "gamma_nb", rng.ser_u64(mu))
    assert a != rng.substream(M, "1A", "poisson_nb", rng.ser_u64(mu))  # label separates
    assert a != rng.substream(rng.master_material("1A", FP_1A, SEED + 1), "1A", "gamma_nb", rng.ser_u64(mu))
    assert a != rng.substream(M, "1B", "gamma_nb", rng.ser_u64(mu))  # segment prefix separates
    assert rng.ser_u32(7) == b"\x07\x00\x00\x00" and rng.ser_u64(7) == b"\x07" + b"\x00" * 7
    with pytest.raises(ValueError):
        rng.ser_u32(1 << 32)
    with pytest.raises(ValueError):
        rng.substreams_vec(M, "1A", "x", [1, 2], iso=["GB"])


# --- native SHA-256 of records (engine.core._sha256) ------------------------------------------
def test_native_sha256_records_equal_hashlib_on_every_width_in_use():
    from engine.core import _sha256

    gen = np.random.default_rng(29)
    M = rng.master_material("1B", FP_1A, SEED)
    cases = [(b"", 8)]  # merchant_u64: LE64(id), no prefix
    for seg, label in (("1A", "hurdle_bernoulli"), ("1A", "gumbel_key"), ("1B", "site_tile_assign"),
                       ("1B", "in_cell_jitter")):
        pre = rng._prefix(M, seg, label)
        cases += [(pre, 8), (pre, 14), (pre, 22), (pre, 1), (pre, 200)]
    for prefix, width in cases:
        n = 257
        recs = gen.integers(0, 256, n * width, dtype=np.uint8)
        want = b"".join(hashlib.sha256(prefix + recs[i * width:(i + 1) * width].tobytes()).digest()
                        for i in range(n))
        assert rng._sha256_records_hashlib(prefix, recs, n, width) == want
        assert rng._sha256_records(prefix, recs, n, width) == want
        got = _sha256.sha256_records(prefix, recs, n, width)
        if _sha256.available():
            assert got == want
        else:  # no libcrypto in this process: the engine hashes with hashlib (same bytes)
            assert got is None


def test_native_sha256_two_thread_split_and_fallback(monkeypatch):
    from engine.core import _sha256

    gen = np.random.default_rng(31)
    n, width = _sha256._THREADS_FROM + 3, 22  # large enough for the two-thread split
    prefix = rng._prefix(rng.master_material("1B", FP_1A, SEED), "1B", "in_cell_jitter")
    recs = gen.integers(0, 256, n * width, dtype=np.uint8)
    got = rng._sha256_records(prefix, recs, n, width)
    for i in (0, n // 2 - 1, n // 2, n - 1):  # the seam between the two halves and both ends
        assert got[32 * i:32 * (i + 1)] == hashlib.sha256(prefix + recs[i * width:(i + 1) * width].tobytes()).digest()
    # forced fallback (ENGINE_SHA256_NATIVE=0): hashlib, same substreams
    mu = _rand_u64(gen, 500)
    codes = np.array(["GB", "DE", "USA"])[gen.integers(0, 3, 500)]
    so = gen.integers(1, 10**6, 500).astype(np.uint64)
    M = rng.master_material("1B", FP_1A, 7)
    a = rng.substreams_vec(M, "1B", "in_cell_jitter", mu, iso=codes, site_order=so)
    ma = rng.merchant_u64_vec(mu)
    monkeypatch.setattr(_sha256, "_state", {})
    monkeypatch.setenv("ENGINE_SHA256_NATIVE", "0")
    assert not _sha256.available()
    assert _sha256.sha256_records(b"", recs, 3, 8) is None
    b = rng.substreams_vec(M, "1B", "in_cell_jitter", mu, iso=codes, site_order=so)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert np.array_equal(ma, rng.merchant_u64_vec(mu))


def test_merchant_u64_vec_sorted_and_unsorted_repeats_agree():
    gen = np.random.default_rng(37)
    ids = np.sort(np.concatenate([_rand_u64(gen, 300), np.array([0, MASK, MASK, 5, 5, 5], np.uint64)]))
    ids = np.repeat(ids, gen.integers(1, 4, ids.shape[0]))  # per-row ids in writer order: runs of repeats
    got = rng.merchant_u64_vec(ids)
    assert got.tolist() == [rng.merchant_u64(v) for v in ids.tolist()]
    perm = gen.permutation(ids.shape[0])
    assert np.array_equal(rng.merchant_u64_vec(ids[perm]), got[perm])
    assert rng.merchant_u64_vec(ids[:1]).tolist() == [rng.merchant_u64(int(ids[0]))]

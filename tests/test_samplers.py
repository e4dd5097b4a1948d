"""Samplers: known answers (00-core 3.5, decision 7), replay of the original engine's real logs
(decision 14), scalar == vectorised bit for bit, budgets, caps and parameter errors (decision 8),
and libm agreement between numba kernels and CPython ``math``."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.core import _kernels as K
from engine.core import rng
from engine.core import samplers as S
from engine.core.errors import ModelError
from engine.core.hashing import le64

DATA = Path(__file__).parent / "data" / "rng"
FP_1A = bytes.fromhex("991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709")
UPSTREAM_ROOT = Path("/work/shared/upstream-data")
MASK = (1 << 64) - 1


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).view(np.uint64)


def _hurdle_stream() -> tuple[int, int, int]:
    """00-core 3.3: seed 9248923, fp 991c57a3..., label hurdle_bernoulli, ids (merchant_u64(1))."""
    M = rng.master_material("1A", FP_1A, 9248923)
    return rng.substream(M, "1A", "hurdle_bernoulli", rng.ser_u64(rng.merchant_u64(1)))


def _rand_streams(seed: int, n: int):
    gen = np.random.default_rng(seed)
    return tuple(gen.integers(0, 2**64, size=n, dtype=np.uint64, endpoint=False) for _ in range(3))


def _one(v):
    return np.array([v], dtype=np.uint64)


# --- known answers ------------------------------------------------------------------------------
def test_derived_kats_from_hurdle_stream():
    k, h, l = _hurdle_stream()
    s = S.Stream(k, h, l)
    assert S.normal(s) == 0.20308610803669028 and (s.blocks, s.draws) == (1, 2)
    s = S.Stream(k, h, l)
    assert S.gamma(s, 0.5) == 0.12268054897412552 and (s.blocks, s.draws) == (3, 4)
    s = S.Stream(k, h, l)
    assert S.poisson(s, 3.5) == 3 and (s.blocks, s.draws) == (4, 4)
    # decision 7: textbook PTRS, Poisson(25) = 34 with 1 block, 2 draws (replaces "28")
    s = S.Stream(k, h, l)
    assert S.poisson(s, 25.0) == 34 and (s.blocks, s.draws) == (1, 2)
    assert s.counter == rng.add128(h, l, 1)
    # hurdle Bernoulli: u = u01(x0) of the first block
    s = S.Stream(k, h, l)
    assert S.bernoulli(s, 0.95) == (True, 0.9329781737236341, False) and (s.blocks, s.draws) == (1, 1)
    s = S.Stream(k, h, l)
    assert S.bernoulli(s, 0.9) == (False, 0.9329781737236341, False)
    for pi in (0.0, 1.0):  # no draw, deterministic
        s = S.Stream(k, h, l)
        assert S.bernoulli(s, pi) == (pi == 1.0, None, True) and (s.blocks, s.draws) == (0, 0)


def test_derived_kats_vectorised():
    k, h, l = (_one(v) for v in _hurdle_stream())
    z, ha, la, nb, nd = S.normal_vec(k, h, l)
    assert z[0] == 0.20308610803669028 and (nb[0], nd[0]) == (1, 2)
    g, ha, la, nb, nd = S.gamma_vec(k, h, l, 0.5)
    assert g[0] == 0.12268054897412552 and (nb[0], nd[0]) == (3, 4)
    assert int(la[0]) - int(l[0]) == 3
    kk, ha, la, nb, nd = S.poisson_vec(np.repeat(k, 2), np.repeat(h, 2), np.repeat(l, 2), [3.5, 25.0])
    assert kk.tolist() == [3, 34] and nb.tolist() == [4, 1] and nd.tolist() == [4, 2]
    assert kk.dtype == np.int64 and nb.dtype == np.uint64 and nd.dtype == np.uint64
    u, ha, la = S.uniform1_vec(k, h, l)
    assert u[0] == 0.9329781737236341 and int(la[0]) == int(l[0]) + 1
    u0, u1, ha, la = S.uniform2_vec(k, h, l)
    assert (u0[0], u1[0]) == (0.9329781737236341, 0.1582238390638039)


def test_upstream_sampler_kats():
    # 00-core 3.5, reproduced from the original engine's logs (run seed 123456789)
    s = S.Stream(16373892148355269555, 8842850766326215308, 12899230745691700195)
    assert S.gamma(s, 4.518874925123018) == 2.4227801742781474
    assert (s.blocks, s.draws, s.counter) == (2, 3, (8842850766326215308, 12899230745691700197))
    s = S.Stream(17388856195869972290, 10409869197225488670, 4762326247866913265)
    assert S.poisson(s, 1.9704226141913166) == 2 and (s.blocks, s.draws) == (3, 3)
    assert s.lo == 4762326247866913268
    s = S.Stream(4807927927242279690, 16821984954160665164, 777984676461590850)
    assert S.gamma(s, 5.223878294128515) == 9.531644616913255 and (s.blocks, s.draws) == (2, 3)
    s = S.Stream(1040274540473282881, 6771040610400675492, 4751802098814578446)
    assert S.poisson(s, 6.280903811701213) == 4 and (s.blocks, s.draws) == (5, 5)
    g, ha, la, nb, nd = S.gamma_vec(
        [16373892148355269555, 4807927927242279690], [8842850766326215308, 16821984954160665164],
        [12899230745691700195, 777984676461590850], [4.518874925123018, 5.223878294128515])
    assert g.tolist() == [2.4227801742781474, 9.531644616913255] and nb.tolist() == [2, 2] and nd.tolist() == [3, 3]
    assert la[0] == 12899230745691700197


# --- replay of the original engine's real logs (decision 14) ----------------------------------
def _replay(events: dict, fam: str, label: str, M: bytes) -> int:
    """Check stream keying + counter chain, then replay every event scalar and vectorised."""
    c = events
    n = len(c["merchant_id"])
    last = {}
    keys = []
    for i in range(n):
        m = c["merchant_id"][i]
        key, h0, l0 = rng.substream(M, "1A", label, le64(m))  # upstream keyed by raw LE64(merchant_id)
        keys.append(key)
        before = (c["before_hi"][i], c["before_lo"][i])
        assert before == last.get(m, (h0, l0)), f"{fam} row {i}: counter chain broken"
        last[m] = (c["after_hi"][i], c["after_lo"][i])
        assert rng.add128(*before, c["blocks"][i]) == last[m]
    rows = [i for i in range(n) if fam == "gamma_component" or c["param"][i] < 10.0]
    for i in rows:
        s = S.Stream(keys[i], c["before_hi"][i], c["before_lo"][i])
        v = S.gamma(s, c["param"][i]) if fam == "gamma_component" else S.poisson(s, c["param"][i])
        assert v == c["value"][i], (fam, i)
        assert (s.blocks, str(s.draws)) == (c["blocks"][i], c["draws"][i]), (fam, i)
        assert s.counter == (c["after_hi"][i], c["after_lo"][i])
    kk = np.array([keys[i] for i in rows], np.uint64)
    hh = np.array([c["before_hi"][i] for i in rows], np.uint64)
    ll = np.array([c["before_lo"][i] for i in rows], np.uint64)
    pp = np.array([c["param"][i] for i in rows])
    fn = S.gamma_vec if fam == "gamma_component" else S.poisson_vec
    v, ha, la, nb, nd = fn(kk, hh, ll, pp)
    if fam == "gamma_component":
        assert np.array_equal(_bits(v), _bits([c["value"][i] for i in rows]))
    else:
        assert v.tolist() == [c["value"][i] for i in rows]
    assert nb.tolist() == [c["blocks"][i] for i in rows]
    assert [str(x) for x in nd.tolist()] == [c["draws"][i] for i in rows]
    assert ha.tolist() == [c["after_hi"][i] for i in rows] and la.tolist() == [c["after_lo"][i] for i in rows]
    return len(rows)


def test_upstream_log_replay_extracted_vectors():
    d = json.loads((DATA / "upstream_nb_events.json").read_text())
    M = rng.master_material("1A", bytes.fromhex(d["manifest_fingerprint"]), d["seed"])
    g = _replay(d["families"]["gamma_component"]["columns"], "gamma_component", "gamma_nb", M)
    p = _replay(d["families"]["poisson_component"]["columns"], "poisson_component", "poisson_nb", M)
    assert g == 400 and p >= 350  # all gamma events; Poisson events with lambda < 10
    assert max(d["families"]["gamma_component"]["columns"]["blocks"]) >= 4  # includes MT rejections


def _load_full(fam: str) -> dict:
    src = json.loads((DATA / "upstream_nb_events.json").read_text())["families"][fam]
    path = UPSTREAM_ROOT / src["source"]
    if not path.exists():
        pytest.skip(f"upstream logs not present: {path}")
    import hashlib

    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == src["sha256"]
    rows = [json.loads(x) for x in gzip.decompress(raw).decode().splitlines() if x.strip()]
    pname, vname = src["param"], src["value"]
    return {
        "merchant_id": [r["merchant_id"] for r in rows], "param": [r[pname] for r in rows],
        "value": [r[vname] for r in rows], "before_hi": [r["rng_counter_before_hi"] for r in rows],
        "before_lo": [r["rng_counter_before_lo"] for r in rows], "after_hi": [r["rng_counter_after_hi"] for r in rows],
        "after_lo": [r["rng_counter_after_lo"] for r in rows], "blocks": [r["blocks"] for r in rows],
        "draws": [r["draws"] for r in rows],
    }


def test_upstream_log_replay_every_event():
    """Decision 14: every gamma event and every Poisson event with lambda < 10 replays bit for bit."""
    M = rng.master_material("1A", bytes.fromhex("4fbffd996b4cd94eaf42e074c814ee68029492672f8bfb2acf98f33d6e3d8a3b"),
                            123456789)
    assert _replay(_load_full("gamma_component"), "gamma_component", "gamma_nb", M) == 5816
    assert _replay(_load_full("poisson_component"), "poisson_component", "poisson_nb", M) == 5780


def test_superseded_u01_rule_does_not_replay(monkeypatch):
    """Negative control: with 00-core 3.4's convert-then-add u01, some upstream gamma events change."""
    c = _load_full("gamma_component")
    M = rng.master_material("1A", bytes.fromhex("4fbffd996b4cd94eaf42e074c814ee68029492672f8bfb2acf98f33d6e3d8a3b"),
                            123456789)
    monkeypatch.setattr(rng, "u01", lambda x: min((float(x) + 1.0) * 2.0**-64, rng.U01_MAX))
    bad = 0
    for i in range(len(c["merchant_id"])):
        key = rng.substream(M, "1A", "gamma_nb", le64(c["merchant_id"][i]))[0]
        s = S.Stream(key, c["before_hi"][i], c["before_lo"][i])
        bad += S.gamma(s, c["param"][i]) != c["value"][i]
    assert bad > 0


# --- scalar == vectorised on random streams -----------------------------------------------------
def test_gamma_vec_equals_scalar_both_regimes():
    n = 3000
    k, h, l = _rand_streams(1, n)
    gen = np.random.default_rng(2)
    alpha = np.where(np.arange(n) % 2 == 0, gen.uniform(0.02, 1.0, n), gen.uniform(1.0, 40.0, n))
    alpha[:4] = [1.0, 0.999999, 1e-3, 1000.0]
    v, ha, la, nb, nd = S.gamma_vec(k, h, l, alpha)
    for i in range(n):
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        g = S.gamma(s, float(alpha[i]))
        assert _bits([g])[0] == _bits(v[i:i + 1])[0], i
        assert (s.blocks, s.draws) == (int(nb[i]), int(nd[i]))
        assert s.counter == (int(ha[i]), int(la[i]))
    # budget law: blocks = J + A (+1 boost), draws = 2J + A (+1); so draws - blocks = J >= 1
    j = nd.astype(np.int64) - nb.astype(np.int64)
    assert (j >= 1).all()
    assert (nb.astype(np.int64) >= j + (alpha < 1)).all()
    assert (nb[alpha < 1] >= 3).all() and (nb[alpha >= 1] >= 2).all()


def test_poisson_vec_equals_scalar_both_regimes():
    n = 4000
    k, h, l = _rand_streams(3, n)
    gen = np.random.default_rng(4)
    lam = np.concatenate([gen.uniform(0.0, 10.0, n // 2), 10.0 + gen.exponential(60.0, n // 2 - 6),
                          [0.0, 9.999999999999998, 10.0, 1e5, 1e9, 3e12]])
    kk, ha, la, nb, nd = S.poisson_vec(k, h, l, lam)
    for i in range(n):
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        assert S.poisson(s, float(lam[i])) == int(kk[i]), (i, lam[i])
        assert (s.blocks, s.draws, s.counter) == (int(nb[i]), int(nd[i]), (int(ha[i]), int(la[i])))
    inv = lam < 10.0
    assert np.array_equal(nb[inv], nd[inv]) and np.array_equal(nb[inv].astype(np.int64), kk[inv] + 1)
    assert np.array_equal(nd[~inv], 2 * nb[~inv])
    assert (nb[~inv] >= 1).all() and (kk >= 0).all()


def test_bernoulli_normal_uniform_gumbel_vec_equal_scalar():
    n = 3000
    k, h, l = _rand_streams(5, n)
    gen = np.random.default_rng(6)
    pi = gen.uniform(0, 1, n)
    pi[:6] = [0.0, 1.0, 0.5, 1e-300, 1 - 2**-53, 0.0]
    b = S.bernoulli_vec(k, h, l, pi)
    w = gen.exponential(1.0, n)
    w[:3] = [0.0, 1e-300, 1e300]
    g, gu, gha, gla = S.gumbel_key_vec(k, h, l, w)
    z, zha, zla, zb, zd = S.normal_vec(k, h, l)
    for i in range(n):
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        is_multi, u, det = S.bernoulli(s, float(pi[i]))
        assert (is_multi, det) == (bool(b["is_multi"][i]), bool(b["deterministic"][i]))
        assert (u is None and math.isnan(b["u"][i])) or u == b["u"][i]
        assert (s.blocks, s.draws) == (int(b["blocks"][i]), int(b["draws"][i]))
        assert s.counter == (int(b["hi_after"][i]), int(b["lo_after"][i]))
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        gk, uu = S.gumbel_key(s, float(w[i]))
        assert (gk, uu) == (g[i], gu[i]) and s.counter == (int(gha[i]), int(gla[i])) and s.draws == 1
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        assert S.normal(s) == z[i] and s.counter == (int(zha[i]), int(zla[i]))
    assert b["deterministic"][[0, 1, 5]].all() and not b["is_multi"][0] and b["is_multi"][1]
    assert b["blocks"][[0, 1, 5]].tolist() == [0, 0, 0] and b["lo_after"][0] == l[0]  # no draw, counter unmoved
    assert g[0] == -np.inf and gha[0] == h[0] and gla[0] == l[0] + np.uint64(1)  # w == 0 still consumes one uniform
    assert (zb == 1).all() and (zd == 2).all()


def test_ztp_vec_equals_scalar_and_reports_exhaustion():
    n = 600
    k, h, l = _rand_streams(7, n)
    gen = np.random.default_rng(8)
    lam = np.concatenate([gen.uniform(1e-3, 0.05, n // 3), gen.uniform(0.05, 12.0, n - n // 3)])
    out = S.ztp_vec(k, h, l, lam, max_zero_attempts=8)
    assert out["exhausted"].any() and (~out["exhausted"]).any()
    pos = 0
    for i in range(n):
        s = S.Stream(int(k[i]), int(h[i]), int(l[i]))
        kf, recs, ex = S.ztp(s, float(lam[i]), max_zero_attempts=8)
        assert (kf, len(recs), ex) == (int(out["k_final"][i]), int(out["attempts"][i]), bool(out["exhausted"][i]))
        assert s.counter == (int(out["hi_after"][i]), int(out["lo_after"][i]))
        for r in recs:
            assert int(out["att_row"][pos]) == i and int(out["att_attempt"][pos]) == r["attempt"]
            assert int(out["att_k"][pos]) == r["k"]
            assert (int(out["att_before_hi"][pos]), int(out["att_before_lo"][pos])) == (r["before_hi"], r["before_lo"])
            assert (int(out["att_after_hi"][pos]), int(out["att_after_lo"][pos])) == (r["after_hi"], r["after_lo"])
            assert (int(out["att_blocks"][pos]), int(out["att_draws"][pos])) == (r["blocks"], r["draws"])
            pos += 1
        if ex:
            assert kf == 0 and len(recs) == 8 and all(r["k"] == 0 for r in recs)
        else:
            assert kf >= 1 and all(r["k"] == 0 for r in recs[:-1])
    assert pos == out["att_row"].shape[0]
    # counters chain: each attempt starts where the previous one ended
    same = out["att_row"][1:] == out["att_row"][:-1]
    assert np.array_equal(out["att_before_lo"][1:][same], out["att_after_lo"][:-1][same])


# --- caps and parameter errors (decision 8) -----------------------------------------------------
def test_gamma_cap_raises_named_error_with_row():
    n = 400
    k, h, l = _rand_streams(9, n)
    alpha = np.full(n, 1.0)  # d = 2/3: Marsaglia-Tsang rejects a few percent of first attempts
    _, _, _, nb, nd = S.gamma_vec(k, h, l, alpha)
    rejecting = np.flatnonzero(nd - nb > 1)  # J > 1 attempts
    assert rejecting.size > 0
    with pytest.raises(ModelError) as ei:
        S.gamma_vec(k, h, l, alpha, max_attempts=1)
    assert ei.value.code == "E_SAMPLER_ATTEMPTS_EXHAUSTED" and ei.value.rows[0] == int(rejecting[0])
    r = int(rejecting[0])
    with pytest.raises(ModelError) as ei:
        S.gamma(S.Stream(int(k[r]), int(h[r]), int(l[r])), 1.0, max_attempts=1, row=r)
    assert ei.value.code == "E_SAMPLER_ATTEMPTS_EXHAUSTED" and ei.value.rows == [r]


def test_poisson_caps_raise_named_error():
    n = 200
    k, h, l = _rand_streams(10, n)
    kk, _, _, nb, _ = S.poisson_vec(k, h, l, 5.0)
    with pytest.raises(ModelError) as ei:  # inversion: k >= 1 needs >= 2 draws
        S.poisson_vec(k, h, l, 5.0, max_attempts=1)
    assert ei.value.code == "E_SAMPLER_ATTEMPTS_EXHAUSTED" and ei.value.rows[0] == int(np.flatnonzero(kk >= 1)[0])
    _, _, _, nb, _ = S.poisson_vec(k, h, l, 30.0)
    with pytest.raises(ModelError) as ei:  # PTRS: streams whose first attempt rejects
        S.poisson_vec(k, h, l, 30.0, max_attempts=1)
    assert ei.value.rows[0] == int(np.flatnonzero(nb > 1)[0])
    r = int(np.flatnonzero(kk >= 1)[0])
    with pytest.raises(ModelError) as ei:
        S.poisson(S.Stream(int(k[r]), int(h[r]), int(l[r])), 5.0, max_attempts=1, row=r)
    assert ei.value.code == "E_SAMPLER_ATTEMPTS_EXHAUSTED" and ei.value.rows == [r]


@pytest.mark.parametrize("fn,bad", [
    (lambda k, h, l, p: S.gamma_vec(k, h, l, p), [1.0, np.nan, 2.0]),
    (lambda k, h, l, p: S.gamma_vec(k, h, l, p), [1.0, 0.0, 2.0]),
    (lambda k, h, l, p: S.gamma_vec(k, h, l, p), [1.0, np.inf, 2.0]),
    (lambda k, h, l, p: S.poisson_vec(k, h, l, p), [1.0, -0.5, 2.0]),
    (lambda k, h, l, p: S.poisson_vec(k, h, l, p), [1.0, np.nan, 2.0]),
    (lambda k, h, l, p: S.poisson_vec(k, h, l, p), [1.0, 1e300, 2.0]),
    (lambda k, h, l, p: S.bernoulli_vec(k, h, l, p), [0.5, 1.5, 0.5]),
    (lambda k, h, l, p: S.bernoulli_vec(k, h, l, p), [0.5, np.nan, 0.5]),
    (lambda k, h, l, p: S.gumbel_key_vec(k, h, l, p), [0.5, -1.0, 0.5]),
    (lambda k, h, l, p: S.gumbel_key_vec(k, h, l, p), [0.5, np.inf, 0.5]),
    (lambda k, h, l, p: S.ztp_vec(k, h, l, p), [0.5, np.nan, 0.5]),
])
def test_invalid_parameters_raise_named_error_with_row(fn, bad):
    k, h, l = _rand_streams(11, 3)
    with pytest.raises(ModelError) as ei:
        fn(k, h, l, np.array(bad))
    assert ei.value.code == "E_SAMPLER_PARAM_INVALID" and ei.value.rows == [1]


def test_scalar_invalid_parameters():
    s = S.Stream(1, 2, 3)
    for call in (lambda: S.gamma(s, float("nan"), row=4), lambda: S.gamma(s, -1.0, row=4),
                 lambda: S.poisson(s, float("inf"), row=4), lambda: S.bernoulli(s, -0.1, row=4),
                 lambda: S.gumbel_key(s, float("nan"), row=4)):
        with pytest.raises(ModelError) as ei:
            call()
        assert ei.value.code == "E_SAMPLER_PARAM_INVALID" and ei.value.rows == [4]
    assert (s.blocks, s.draws) == (0, 0)


# --- libm agreement between numba and CPython math --------------------------------------------
def _kernel_math(which: int, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(x.shape[0])
    K.mathcheck_kernel(which, np.ascontiguousarray(x, np.float64),
                       np.ascontiguousarray(x if y is None else y, np.float64), out)
    return out


def test_numba_libm_matches_python_math():
    gen = np.random.default_rng(12)
    pos = np.concatenate([
        gen.uniform(0, 1, 40_000), 2.0 ** gen.uniform(-64, 0, 40_000), 1 - 2.0 ** gen.uniform(-53, -1, 10_000),
        gen.uniform(1, 1e6, 20_000), np.array([5.421010862427522e-20, float.fromhex("0x1.fffffffffffffp-1"),
                                               1.0, 2.0, 0.5]),
    ])
    checks = {
        0: (pos, math.log),
        1: (np.concatenate([-gen.uniform(0, 745, 40_000), gen.uniform(-10, 10, 20_000)]), math.exp),
        2: (K.TAU * np.concatenate([gen.uniform(0, 1, 60_000), [5.421010862427522e-20, 0.25, 0.5, 0.75]]), math.cos),
        3: (np.concatenate([gen.uniform(0, 100, 30_000), -2.0 * np.log(pos[:30_000])]), math.sqrt),
    }
    for which, (x, f) in checks.items():
        got = _kernel_math(which, x)
        ref = np.array([f(v) for v in x.tolist()])
        assert np.array_equal(_bits(got), _bits(ref)), which
    # pow: u ** (1/alpha) of the gamma boost
    u = gen.uniform(0, 1, 30_000)
    e = 1.0 / gen.uniform(0.001, 1.0, 30_000)
    got = _kernel_math(5, u, e)
    assert np.array_equal(_bits(got), _bits([a ** b for a, b in zip(u.tolist(), e.tolist())]))


def test_lgamma_port_matches_cpython_math_lgamma():
    """numba's math.lgamma is glibc's; the kernels use a port of CPython's algorithm instead."""
    ints = np.arange(1, 300_001, dtype=np.float64)
    gen = np.random.default_rng(13)
    reals = np.concatenate([gen.uniform(0, 5, 20_000), gen.uniform(5, 1e4, 20_000), 10.0 ** gen.uniform(-25, 15, 5000),
                            [1.0, 2.0, 3.0, 4.999999999999999, 5.0, 1e-20, 0.5]])
    x = np.concatenate([ints, reals])
    got = _kernel_math(4, x)
    ref = np.array([math.lgamma(v) for v in x.tolist()])
    assert np.array_equal(_bits(got), _bits(ref))


# --- distribution sanity (decision 7: PTRS tail is not heavy) ----------------------------------
def test_poisson_and_gamma_moments():
    n = 200_000
    k, h, l = _rand_streams(14, n)
    for lam in (3.5, 25.0, 400.0):
        kk = S.poisson_vec(k, h, l, lam)[0].astype(np.float64)
        se = math.sqrt(lam / n)
        assert abs(kk.mean() - lam) < 5 * se
        assert abs(kk.var() / lam - 1.0) < 0.03
        assert kk.max() < lam + 12 * math.sqrt(lam)  # the spec-variant fast path was heavy-tailed
    for alpha in (0.3, 1.0, 4.5):
        g = S.gamma_vec(k, h, l, alpha)[0]
        assert abs(g.mean() - alpha) < 5 * math.sqrt(alpha / n)
        assert abs(g.var() / alpha - 1.0) < 0.05
    z = S.normal_vec(k, h, l)[0]
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01

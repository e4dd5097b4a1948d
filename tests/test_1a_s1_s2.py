"""1A S1 (hurdle) and S2 (NB outlet count): budgets, replay, rejection accounting, caps, corridors, statistics.

Spec: 1A-S1-S4 sections 1, 2, 5; 00-core 3.5-3.7; decisions 6, 7, 8, 14, 19.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from engine.core import rng, samplers
from engine.core.context import SegmentIds
from engine.core.errors import EngineError
from engine.segment1a import inputs as inp
from engine.segment1a import s0_foundations as s0
from engine.segment1a import s1_hurdle as s1
from engine.segment1a import s2_nb_outlets as s2

REPO = Path(__file__).resolve().parents[1]
FP = bytes.fromhex("991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709")
SEED = 9248923
M = rng.master_material("1A", FP, SEED)


def u128(hi, lo) -> int:
    return (int(hi) << 64) | int(lo)


# ============================================================================================ S1


def test_hurdle_deterministic_shortcut_and_replay():
    mid = np.array([1, 2, 3, 4, 5, 2**64 - 1], dtype=np.uint64)
    pi = np.array([0.0, 1.0, 0.5, s0.logistic(-40.0), s0.logistic(36.0), 0.25])
    ev = s1.hurdle_draws(M, mid, pi)
    det = ev["deterministic"]
    assert det.tolist() == [True, True, False, False, False, False]
    assert ev["blocks"].tolist() == [0, 0, 1, 1, 1, 1] and ev["draws"].tolist() == [0, 0, 1, 1, 1, 1]
    # no draw: counters unchanged, u null, is_multi = (pi == 1)
    assert np.array_equal(ev["after_hi"][det], ev["before_hi"][det])
    assert np.array_equal(ev["after_lo"][det], ev["before_lo"][det])
    assert np.isnan(ev["u"][det]).all()
    assert ev["is_multi"][:2].tolist() == [False, True]
    for i in range(mid.size):
        key, hi, lo = rng.substream(M, "1A", "hurdle_bernoulli", rng.ser_u64(rng.merchant_u64(int(mid[i]))))
        assert (int(ev["before_hi"][i]), int(ev["before_lo"][i])) == (hi, lo)  # the merchant's base counter
        if det[i]:
            continue
        s = samplers.Stream(key, hi, lo)
        u = s.uniform()  # replay from the base counter: low lane of one block
        assert ev["u"][i] == u and 0.0 < u < 1.0
        assert bool(ev["is_multi"][i]) == (u < pi[i])
        assert (int(ev["after_hi"][i]), int(ev["after_lo"][i])) == s.counter
    # KAT (00-core 3.3): merchant 1's hurdle substream
    key, hi, lo = rng.substream(M, "1A", "hurdle_bernoulli", rng.ser_u64(rng.merchant_u64(1)))
    assert (key, hi, lo) == (17687007987406937577, 11483541641549172096, 16797831791730783477)


def test_hurdle_nonfinite_eta_is_named_error():
    hc = inp.HurdleCoefficients(np.array([1000, 2000], np.int32), ("CP", "CNP"), (1, 2, 3, 4, 5),
                                np.array([1e308, 1e308, 1e308, 0, 0, 0, 0, 0, 0, 0], float), np.zeros(5), "h.yaml")
    with pytest.raises(EngineError) as ei:
        s1.hurdle_pi(hc, np.array([1000, 2000]), np.array(["CP", "CP"], dtype=object), np.array([1, 1]),
                     merchant_id=np.array([10, 11], np.uint64))
    assert ei.value.code == s1.ETA_CODE == "hurdle_nonfinite_eta"
    with pytest.raises(EngineError) as ei:
        s1.hurdle_pi(hc, np.array([1000, 3000]), np.array(["CP", "CP"], dtype=object), np.array([1, 1]))
    assert ei.value.code == "E_DSGN_UNKNOWN_MCC"


# ============================================================================================ S2 sampling


def _nb_case(n=240):
    mid = (np.arange(n, dtype=np.uint64) * np.uint64(7919) + np.uint64(3)) ** np.uint64(3)  # spread, incl. > 2^63
    mid = np.sort(np.unique(mid))
    n = mid.size
    mu = np.array([0.6, 1.5, 3.0, 14.0])[np.arange(n) % 4]      # small mu: many rejections; 14: PTRS regime
    phi = np.array([0.7, 2.0, 40.0])[np.arange(n) % 3]          # 0.7 < 1: gamma boost uniform
    return mid, mu, phi


def test_nb_rejection_accounting_replays():
    mid, mu, phi = _nb_case()
    res = s2.nb_sample(M, mid, mu, phi)
    N, R = res["n_outlets"], res["nb_rejections"]
    g, p, f = res["gamma"], res["poisson"], res["final"]
    assert (N >= 2).all() and R.sum() > 50  # the case really exercises rejections
    assert g["merchant_id"].size == p["merchant_id"].size == int((R + 1).sum())
    assert np.all(np.diff(g["merchant_id"].astype(object)) >= 0)  # writer order: merchant, then attempt
    gi = 0
    for i in range(mid.size):
        m = int(mid[i])
        a = int(R[i]) + 1
        gsl, psl = slice(gi, gi + a), slice(gi, gi + a)
        gi += a
        assert (g["merchant_id"][gsl] == mid[i]).all() and (p["merchant_id"][psl] == mid[i]).all()
        assert p["attempt"][psl].tolist() == list(range(1, a + 1))
        ks = p["k"][psl]
        assert (ks[:-1] < 2).all() and ks[-1] == N[i] >= 2
        mu64 = rng.ser_u64(rng.merchant_u64(m))
        for lab, ev, sl in (("gamma_nb", g, gsl), ("poisson_nb", p, psl)):
            key, hi, lo = rng.substream(M, "1A", lab, mu64)
            st = samplers.Stream(key, hi, lo)
            base = u128(hi, lo)
            for j in range(sl.start, sl.stop):
                # chaining: each event starts where the previous one of the same substream ended
                assert (int(ev["before_hi"][j]), int(ev["before_lo"][j])) == st.counter
                b0, d0 = st.blocks, st.draws
                if lab == "gamma_nb":
                    val = samplers.gamma(st, phi[i])
                    assert ev["gamma_value"][j] == val and ev["alpha"][j] == phi[i]
                    assert ev["context"][j] == "nb" and ev["index"][j] == 0
                    lam = (mu[i] / phi[i]) * val
                    assert p["lambda"][j] == lam  # exact composition (2.7 decision)
                else:
                    assert ev["k"][j] == samplers.poisson(st, ev["lambda"][j])
                assert (int(ev["after_hi"][j]), int(ev["after_lo"][j])) == st.counter
                assert int(ev["blocks"][j]) == st.blocks - b0 == u128(ev["after_hi"][j], ev["after_lo"][j]) - \
                    u128(ev["before_hi"][j], ev["before_lo"][j])
                assert int(ev["draws"][j]) == st.draws - d0
                if lab == "gamma_nb":
                    # draws = 2J + A (+1 boost when phi < 1), blocks = J + A (+1): draws - blocks = J >= 1
                    assert int(ev["draws"][j]) - int(ev["blocks"][j]) >= 1
                    assert int(ev["blocks"][j]) >= (3 if phi[i] < 1.0 else 2)
            # sum of blocks over the merchant's events == after(last) - base of its substream
            assert int(ev["blocks"][sl].astype(object).sum()) == u128(ev["after_hi"][sl.stop - 1],
                                                                      ev["after_lo"][sl.stop - 1]) - base
        key, hi, lo = rng.substream(M, "1A", "nb_final", mu64)
        assert (int(f["before_hi"][i]), int(f["before_lo"][i]), int(f["after_hi"][i]), int(f["after_lo"][i])) == \
            (hi, lo, hi, lo)
        assert f["blocks"][i] == 0 and f["draws"][i] == 0
        assert f["n_outlets"][i] == N[i] and f["nb_rejections"][i] == R[i]
        assert f["mu"][i] == mu[i] and f["dispersion_k"][i] == phi[i]
    # PTRS regime (lambda >= 10) and inversion both occurred; PTRS: blocks = attempts, draws = 2 blocks
    big = p["lambda"] >= 10.0
    assert big.any() and (~big).any()
    assert np.array_equal(p["draws"][big], 2 * p["blocks"][big])
    assert np.array_equal(p["draws"][~big], p["blocks"][~big])
    assert np.array_equal(p["draws"][~big], p["k"][~big].astype(np.uint64) + np.uint64(1))  # inversion K+1


def test_nb_events_reconcile_with_trace(tmp_path):
    from engine.core import identities, rnglog
    from engine.core.rnglog import RngLogs

    fp, ph = FP.hex(), "ab" * 32
    ids = SegmentIds("1A", SEED, ph, fp, identities.run_id("1A", fp, ph, SEED))
    mid, mu, phi = _nb_case(60)
    res = s2.nb_sample(M, mid, mu, phi)
    hev = s1.hurdle_draws(M, mid, np.r_[[0.0, 1.0], np.full(mid.size - 2, 0.5)])
    logs = RngLogs(tmp_path, "1A", ids)
    logs.write_audit(build_commit="cd" * 32)
    logs.add_events("hurdle_bernoulli", s1.MODULE, s1.LABEL, hev)
    logs.add_events(s2.GAMMA_FAMILY, s2.GAMMA_MODULE, s2.GAMMA_LABEL, res["gamma"])
    logs.add_events(s2.POISSON_FAMILY, s2.POISSON_MODULE, s2.POISSON_LABEL, res["poisson"], part=s2.POISSON_PART)
    logs.add_events(s2.FINAL_FAMILY, s2.FINAL_MODULE, s2.FINAL_LABEL, res["final"])
    logs.close()
    assert rnglog.reconcile(tmp_path, ids, chain=True) == []
    tr = rnglog.read_trace(tmp_path, ids).to_pylist()
    last = {}
    for r in tr:
        last[(r["module"], r["substream_label"])] = r
    for mod, lab, ev in ((s2.GAMMA_MODULE, s2.GAMMA_LABEL, res["gamma"]), (s2.POISSON_MODULE, s2.POISSON_LABEL,
                                                                            res["poisson"])):
        assert last[(mod, lab)]["blocks_total"] == int(ev["blocks"].astype(object).sum())
        assert int(last[(mod, lab)]["draws_total"]) == int(ev["draws"].astype(object).sum())
        assert last[(mod, lab)]["events_total"] == ev["merchant_id"].size
    assert last[(s2.FINAL_MODULE, s2.FINAL_LABEL)]["blocks_total"] == 0
    h = rnglog.read_events(tmp_path, ids, "hurdle_bernoulli").to_pylist()
    assert [(r["draws"], r["blocks"], r["u"]) for r in h[:2]] == [("0", 0, None), ("0", 0, None)]
    assert h[0]["rng_counter_before_lo"] == h[0]["rng_counter_after_lo"]
    assert "eta" not in h[0]
    pe = rnglog.read_events(tmp_path, ids, "poisson_component", with_source=True)
    assert set(pe.column("_part").to_pylist()) == {"part-00000.jsonl"}


def test_nb_attempt_cap_and_numeric_guards():
    mid = np.array([5, 9], dtype=np.uint64)
    with pytest.raises(EngineError) as ei:
        s2.nb_sample(M, mid, np.array([0.01, 0.01]), np.array([1.0, 1.0]), max_attempts=3)
    assert ei.value.code == "ERR_S2_ATTEMPT_CAP" and "merchant_id=5" in str(ei.value)

    with pytest.raises(EngineError) as ei:  # N above the 6-digit site_order limit (decision 8)
        s2.nb_sample(M, mid, np.array([3.0, 5e6]), np.array([2.0, 1e4]))
    assert ei.value.code == "ERR_S2_FINAL_INVALID_N" and "merchant_id=9" in str(ei.value)

    hc = inp.HurdleCoefficients(np.array([1000, 2000], np.int32), ("CP", "CNP"), (1, 2, 3, 4, 5),
                                np.zeros(10), np.array([1.0, 800.0, 0.0, 0.0, 0.0]), "h.yaml")
    dc = inp.DispersionCoefficients(np.array([1000, 2000], np.int32), ("CP", "CNP"), np.full(6, 0.1), "d.yaml")
    mu, phi = s2.nb_links(hc, dc, np.array([1, 1]), np.array([0, 1]), np.array([9.0, 10.0]))
    assert mu.tolist() == [math.exp(s0.neumaier_scalar([1.0, 0.0, 0.0]))] * 2
    assert phi[0] == math.exp(s0.neumaier_scalar([0.1, 0.1, 0.1, 0.1 * 9.0]))
    with pytest.raises(EngineError) as ei:  # exp overflow -> inf mu
        s2.nb_links(hc, dc, np.array([0, 1]), np.array([0, 0]), np.array([9.0, 9.0]), merchant_id=np.array([3, 4]))
    assert ei.value.code == "ERR_S2_NUMERIC_INVALID" and "merchant_id=3" in str(ei.value)
    with pytest.raises(EngineError) as ei:  # NaN phi
        s2.nb_links(hc, dc, np.array([1]), np.array([0]), np.array([np.nan]))
    assert ei.value.code == "ERR_S2_NUMERIC_INVALID"


# ============================================================================================ corridors

POL = {"rho_reject_max": 0.06, "p99_max": 3, "cusum_k": 0.5, "cusum_h": 16.0, "alpha_cap": 1.0}


def test_corridor_alpha_kat():
    a = s2.nb_acceptance(np.array([7.0]), np.array([2.25]))[0]
    assert abs(a - 0.8876973) < 5e-8
    assert abs((1 - a) / a - 0.12651) < 5e-6


def test_corridor_metrics_gates():
    n = 100
    mid = np.arange(1, n + 1, dtype=np.uint64)
    mu, phi = np.full(n, 7.0), np.full(n, 2.25)
    ok = s2.corridor_metrics(mu, phi, np.zeros(n, int), POL, merchant_id=mid)
    assert ok["breaches"] == [] and ok["rho_hat"] == 0.0 and ok["p99"] == 0 and ok["Smax"] == 0.0
    assert (ok["M"], ok["R"], ok["A"]) == (100, 0, 100)
    assert s2.corridor_metrics(mu, phi, np.ones(n, int), POL)["breaches"] == ["rho", "cusum"]
    r = np.zeros(n, int)
    r[[10]] = 4  # 1 %: nearest rank ceil(0.99 * 100) = 99 is still 0
    assert s2.corridor_metrics(mu, phi, r, {**POL, "rho_reject_max": 1.0, "cusum_h": 1e9})["p99"] == 0
    r[[10, 50]] = 4  # 2 %: rank 99 hits 4 > 3
    met = s2.corridor_metrics(mu, phi, r, {**POL, "rho_reject_max": 1.0, "cusum_h": 1e9})
    assert met["p99"] == 4 and met["breaches"] == ["p99"]
    # late drift trips the CUSUM only (rho stays under a loose gate)
    r = np.zeros(n, int)
    r[-4:] = 3
    met = s2.corridor_metrics(mu, phi, r, {**POL, "rho_reject_max": 0.5, "p99_max": 10})
    assert met["breaches"] == ["cusum"] and met["Smax"] >= 16.0
    # shuffled rows give identical metrics when merchant ids are supplied
    perm = np.random.default_rng(3).permutation(n)
    a = s2.corridor_metrics(mu, phi, r, POL, merchant_id=mid)
    b = s2.corridor_metrics(mu[perm], phi[perm], r[perm], POL, merchant_id=mid[perm])
    assert {k: v for k, v in a.items() if k != "alpha_invalid"} == {k: v for k, v in b.items() if k != "alpha_invalid"}
    # nested (S9) policy form gives the same result
    nested = {"rho_reject_max": 0.06, "p99_max": 3, "cusum": {"reference_k": 0.5, "threshold_h": 16.0}}
    assert s2.corridor_metrics(mu, phi, r, nested, merchant_id=mid)["Smax"] == a["Smax"]
    # invalid alpha excluded and reported; empty population
    bad = s2.corridor_metrics(np.array([7.0, np.nan]), np.array([2.25, 1.0]), np.array([0, 0]), POL)
    assert bad["alpha_invalid"] == [1] and bad["M"] == 1
    assert s2.corridor_metrics(np.zeros(0), np.zeros(0), np.zeros(0, int), POL)["M"] == 0


def test_s2_validation_policy_loader(tmp_path):
    emb = inp.load_s2_validation_policy(REPO / "config/policy/s2_validation_policy.yaml")
    assert set(emb) == {"rho_reject_max", "p99_max", "cusum_k", "cusum_h", "alpha_cap"}
    p = tmp_path / "p.yaml"
    p.write_text("cusum: {reference_k: 0.45, threshold_h: 90.0, alpha_cap: 0.999}\n")
    assert inp.load_s2_validation_policy(p) == {"rho_reject_max": 0.06, "p99_max": 3, "cusum_k": 0.45,
                                                "cusum_h": 90.0, "alpha_cap": 0.999}
    p.write_text("cusum: {reference_k: 0.45}\n")
    with pytest.raises(EngineError) as ei:
        inp.load_s2_validation_policy(p)
    assert ei.value.code == "ERR_S2_CORRIDOR_POLICY_MISSING"


# ============================================================================================ statistics


def _nb_pmf01(mu, phi):
    p = phi / (mu + phi)
    P0 = np.exp(phi * np.log(p))
    P1 = P0 * phi * (1 - p)
    return P0, P1


def test_embedded_default_statistics():
    """S0-S2 compute on the embedded default: multi-site share ~ mean(pi), mean N | N >= 2 ~ its model mean."""
    from engine.core import config

    t0 = time.perf_counter()
    cfg = config.load()
    si = s0.load_s0_inputs(cfg)
    out = s0.compute_s0(si, "0" * 64, FP.hex())
    mid = np.asarray(out.design.column("merchant_id").to_numpy(), dtype=np.uint64)
    n = mid.size
    assert 18000 <= n <= 20000  # decision 11: ~18,560 after the pseudo-country filter
    ev = s1.hurdle_draws(M, mid, out.pi_f64)
    multi = ev["is_multi"]
    pi = out.pi_f64
    share, exp_share = multi.mean(), pi.mean()
    se = math.sqrt(float((pi * (1 - pi)).sum())) / n
    assert abs(exp_share - 0.216) < 0.01
    assert abs(share - exp_share) < 3 * se, (share, exp_share, se)

    sel = np.flatnonzero(multi)
    mu, phi = s2.nb_links(si.hurdle, si.dispersion, out.mcc_idx[sel], out.ch_idx[sel], out.ln_g[sel])
    res = s2.nb_sample(M, mid[sel], mu, phi)
    N = res["n_outlets"].astype(float)
    P0, P1 = _nb_pmf01(mu, phi)
    alpha = 1 - P0 - P1
    EN = (mu - P1) / alpha                         # E[N | N >= 2]
    EN2 = (mu + mu * mu / phi + mu * mu - P1) / alpha  # E[N^2 | N >= 2]
    var = EN2 - EN * EN
    se_n = math.sqrt(float(var.sum())) / sel.size
    assert abs(N.mean() - EN.mean()) < 3 * se_n, (N.mean(), EN.mean(), se_n)
    # rejections: attempts are geometric with success alpha
    assert abs(res["nb_rejections"].mean() - ((1 - alpha) / alpha).mean()) < 3 * math.sqrt(
        float(((1 - alpha) / alpha ** 2).sum())) / sel.size
    assert time.perf_counter() - t0 < 30


# ============================================================================================ run(ctx)


def test_s1_s2_run_end_to_end(tmp_path):
    from test_1a_s0 import BETA, data_files, hurdle_doc, make_case, make_ctx

    from engine.core import rnglog

    h = hurdle_doc()
    h["beta"] = [2.0] + BETA[1:]  # most merchants multi-site
    h["beta"][1] = 40.0           # mcc 3000: eta >= 36.8 -> pi == 1.0 exactly (no draw)
    cfg = make_case(tmp_path, hurdle=h)
    root = tmp_path / "root"
    ctx = make_ctx(cfg, root)
    with pytest.raises(EngineError):  # S1 before S0: no design matrix, nothing written
        s1.run(ctx)
    assert not (root / "logs").exists()
    s0.run(ctx)
    with pytest.raises(EngineError) as ei:  # S1 before the audit row exists (00-core 3.7)
        s1.run(ctx)
    assert ei.value.code == "E_RNG_AUDIT_MISSING"
    s0.run_rng_anchor(ctx)
    with pytest.raises(EngineError) as ei:  # S2 before S1: every merchant lacks its hurdle event
        s2.run(ctx)
    assert ei.value.code == "ERR_S2_ENTRY_MISSING_HURDLE"
    before = data_files(root)
    s1.run(ctx)
    s2.run(ctx)
    assert data_files(root) == before  # S1/S2 write logs only
    hb = rnglog.read_events(root, ctx.ids, "hurdle_bernoulli").to_pylist()
    assert [r["merchant_id"] for r in hb] == [1, 7, 8, 42, 2**63, 2**64 - 1]
    det = [r for r in hb if r["merchant_id"] == 2**63][0]  # mcc 3000
    assert (det["pi"], det["deterministic"], det["u"], det["draws"], det["is_multi"]) == (1.0, True, None, "0", True)
    multi = [r["merchant_id"] for r in hb if r["is_multi"]]
    fin = rnglog.read_events(root, ctx.ids, "nb_final").to_pylist()
    assert [r["merchant_id"] for r in fin] == multi and all(r["n_outlets"] >= 2 for r in fin)
    g = rnglog.read_events(root, ctx.ids, "gamma_component")
    assert g.num_rows == sum(r["nb_rejections"] + 1 for r in fin)
    assert rnglog.reconcile(root, ctx.ids, chain=True) == []
    # a re-run replaces its own rows: trace totals do not double
    s1.run(ctx)
    s2.run(ctx)
    assert rnglog.reconcile(root, ctx.ids, chain=True) == []
    assert rnglog.read_events(root, ctx.ids, "gamma_component").num_rows == g.num_rows

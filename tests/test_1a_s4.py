"""1A S4: ZTP link, attempt accounting, A = 0 short-circuit, exhaustion under both policies.

Spec: 1A-S1-S4 §4, decisions 7, 8, 18, 23. The scalar ``samplers.ztp`` on a ``Stream`` is the oracle
for the vectorised event assembly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.core import rng, samplers
from engine.core.errors import EngineError
from engine.segment1a import s4_ztp as s4

FP = bytes.fromhex("991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709")
SEED = 9248923
HEAD_ZTP = {"theta_order": ["theta0_intercept", "theta1_log_n_sites", "theta2_openness"],
            "theta": {"theta0_intercept": -0.45, "theta1_log_n_sites": 0.78, "theta2_openness": 0.90},
            "x_default": 0.25, "max_zero_attempts": 64, "exhaustion_policy": "downgrade_domestic"}


def policy(**kw):
    z = dict(HEAD_ZTP)
    z.update(kw)
    return s4.ztp_policy(z, "crossborder_hyperparams.yaml")


def streams(mids):
    M = rng.master_material("1A", FP, SEED)
    return rng.substreams_vec(M, "1A", s4.LABEL, rng.merchant_u64_vec(np.asarray(mids, np.uint64)))


def u128(hi, lo):
    return (int(hi) << 64) | int(lo)


# ------------------------------------------------------------------------------------------ lambda


def test_lambda_link_and_theta_order():
    p = policy()
    N = np.array([2, 7, 7, 40])
    X = np.array([0.25, 0.0, 0.3199999928474426, 1.0])  # a float32 openness widened exactly
    lam = s4.ztp_lambda(p, N, X)
    for n, x, got in zip(N, X, lam):
        eta = s4._neumaier([-0.45 * 1.0, 0.78 * math.log(int(n)), 0.90 * float(x)])
        assert got == math.exp(eta)
    assert lam[0] == pytest.approx(math.exp(-0.45 + 0.78 * math.log(2) + 0.9 * 0.25), rel=1e-15)
    # the evaluation order is the file's theta_order (Neumaier in that order)
    q = policy(theta_order=["theta2_openness", "theta0_intercept", "theta1_log_n_sites"])
    assert q.theta_order[0] == "theta2_openness"
    assert s4.lambda_scalar(q, 7, 0.3) == math.exp(s4._neumaier([0.9 * 0.3, -0.45, 0.78 * math.log(7)]))


@pytest.mark.parametrize("bad", [
    {"theta_order": ["theta0_intercept", "theta1_log_n_sites"]},
    {"theta_order": ["theta0_intercept", "theta1_log_n_sites", "theta9_mystery"]},
    {"theta": {"theta0_intercept": float("nan"), "theta1_log_n_sites": 0.78, "theta2_openness": 0.9}},
    {"x_default": 1.5},
    {"max_zero_attempts": 0},
    {"exhaustion_policy": "retry_forever"},
])
def test_policy_invalid(bad):
    with pytest.raises(EngineError) as e:
        policy(**bad)
    assert e.value.code == "POLICY_INVALID"


def test_numeric_invalid_lambda_stops_before_any_event():
    p = policy(theta={"theta0_intercept": 800.0, "theta1_log_n_sites": 0.78, "theta2_openness": 0.9})
    lam = s4.ztp_lambda(p, np.array([3]), np.array([0.1]))
    assert math.isinf(lam[0])
    k, h, l = streams([1])
    with pytest.raises(EngineError) as e:
        s4.simulate(p, np.array([1], np.uint64), lam, np.array([2]), k, h, l)
    assert e.value.code == "NUMERIC_INVALID"


# ------------------------------------------------------------------------------------------ accounting


def test_ztp_accounting_matches_scalar_oracle():
    p = policy()
    mids = np.array([1, 2, 3, 5, 8, 13, 2**64 - 2], np.uint64)
    lam = np.array([0.3, 1.7, 0.05, 9.999999, 10.0, 25.0, 0.9])
    A = np.array([3, 1, 2, 4, 5, 2, 0])
    key, hi, lo = streams(mids)
    out = s4.simulate(p, mids, lam, A, key, hi, lo)
    ev = out.events
    assert out.regime.tolist() == ["inversion"] * 4 + ["ptrs"] * 2 + ["inversion"]
    pc_mid = ev["poisson_component"]["merchant_id"]
    assert np.all(np.diff(pc_mid.astype(object)) >= 0)  # writer order: merchant_id, then attempt
    for i, m in enumerate(mids.tolist()):
        sel = np.nonzero(pc_mid == np.uint64(m))[0]
        rej = np.nonzero(ev["ztp_rejection"]["merchant_id"] == np.uint64(m))[0]
        fin = np.nonzero(ev["ztp_final"]["merchant_id"] == np.uint64(m))[0]
        assert fin.size == 1
        f = {k: v[fin[0]] for k, v in ev["ztp_final"].items()}
        if A[i] == 0:  # short-circuit: no draw, final at the base counter, attempts 0
            assert sel.size == 0 and rej.size == 0
            assert (int(f["before_hi"]), int(f["before_lo"])) == (int(hi[i]), int(lo[i]))
            assert f["attempts"] == 0 and f["K_target"] == 0 and f["exhausted"] == False  # noqa: E712
            continue
        s = samplers.Stream(int(key[i]), int(hi[i]), int(lo[i]))
        k_ref, recs, exh = samplers.ztp(s, float(lam[i]))
        assert not exh and out.k_target[i] == k_ref >= 1 and out.attempts[i] == len(recs)
        pcc = {k: v[sel] for k, v in ev["poisson_component"].items()}
        assert pcc["attempt"].tolist() == list(range(1, len(recs) + 1))  # contiguous 1..a
        assert pcc["k"].tolist() == [r["k"] for r in recs]
        assert pcc["k"][-1] >= 1 and all(k == 0 for k in pcc["k"][:-1])
        prev = (int(hi[i]), int(lo[i]))
        for j, r in enumerate(recs):
            b = (int(pcc["before_hi"][j]), int(pcc["before_lo"][j]))
            a = (int(pcc["after_hi"][j]), int(pcc["after_lo"][j]))
            assert b == prev  # counters chain, never overlap
            assert int(pcc["blocks"][j]) == u128(*a) - u128(*b) == r["blocks"] > 0
            assert int(pcc["draws"][j]) == r["draws"]
            # budgets: inversion blocks = draws = K + 1; PTRS draws = 2 * blocks
            if lam[i] < 10:
                assert r["draws"] == r["blocks"] == r["k"] + 1
            else:
                assert r["draws"] == 2 * r["blocks"]
            prev = a
        assert pcc["context"].tolist() == ["ztp"] * len(recs)
        assert set(pcc["lambda"].tolist()) == {lam[i]}
        # one rejection per zero, non-consuming, at the counter reached by its draw
        assert ev["ztp_rejection"]["attempt"][rej].tolist() == list(range(1, len(recs)))
        for j, rj in enumerate(rej):
            assert ev["ztp_rejection"]["before_hi"][rj] == ev["ztp_rejection"]["after_hi"][rj] == pcc["after_hi"][j]
            assert ev["ztp_rejection"]["before_lo"][rj] == ev["ztp_rejection"]["after_lo"][rj] == pcc["after_lo"][j]
            assert ev["ztp_rejection"]["blocks"][rj] == 0 and ev["ztp_rejection"]["draws"][rj] == 0
        assert (int(f["before_hi"]), int(f["before_lo"])) == prev == (int(f["after_hi"]), int(f["after_lo"]))
        assert f["K_target"] == k_ref and f["attempts"] == len(recs) and f["blocks"] == 0 and f["draws"] == 0
        assert f["regime"] == ("inversion" if lam[i] < 10 else "ptrs") and f["lambda_extra"] == lam[i]
    assert ev["ztp_retry_exhausted"]["merchant_id"].size == 0
    # totals that a trace must reproduce
    m = s4.metrics(out, A, {"single_site": 4, "ineligible": 1})
    assert m["s4.events.poisson_component"] == int(out.attempts.sum()) == m["s4.attempts_total"]
    assert m["s4.rejections_total"] == int(out.attempts.sum()) - int(np.count_nonzero(A > 0))
    assert m["s4.short_circuit_no_admissible"] == 1 and m["s4.events.ztp_final"] == 7
    assert m["s4.not_in_scope.single_site"] == 4


def test_k_target_not_capped_at_A():
    p = policy()
    mids = np.arange(1, 201, dtype=np.uint64)
    key, hi, lo = streams(mids)
    out = s4.simulate(p, mids, np.full(200, 30.0), np.ones(200, np.int64), key, hi, lo)
    assert (out.k_target > 1).all()  # Poisson(30) | >= 1 with A = 1: S4 records K_target as drawn


# ------------------------------------------------------------------------------------------ exhaustion


@pytest.mark.parametrize("pol", ["downgrade_domestic", "abort"])
def test_exhaustion_writes_marker_and_applies_policy(pol):
    p = policy(exhaustion_policy=pol)
    mids = np.array([3, 4], np.uint64)
    lam = np.array([1e-12, 2.0])  # merchant 3 draws 64 zeros (P(k >= 1) ~ 1e-12 per attempt)
    key, hi, lo = streams(mids)
    out = s4.simulate(p, mids, lam, np.array([2, 2]), key, hi, lo)
    ev = out.events
    sel = ev["poisson_component"]["merchant_id"] == np.uint64(3)
    assert sel.sum() == 64 and (ev["poisson_component"]["k"][sel] == 0).all()
    assert ev["poisson_component"]["attempt"][sel].tolist() == list(range(1, 65))
    rej = ev["ztp_rejection"]["merchant_id"] == np.uint64(3)
    assert rej.sum() == 64 and ev["ztp_rejection"]["attempt"][rej].tolist() == list(range(1, 65))
    # decision 18: the non-consuming marker is written whatever the policy
    ex = ev["ztp_retry_exhausted"]
    assert ex["merchant_id"].tolist() == [3] and ex["attempts"].tolist() == [64]
    assert ex["aborted"].tolist() == [pol == "abort"]
    last = np.nonzero(sel)[0][-1]
    assert (ex["before_hi"][0], ex["before_lo"][0]) == (ev["poisson_component"]["after_hi"][last],
                                                      ev["poisson_component"]["after_lo"][last])
    assert ex["blocks"][0] == 0 and ex["draws"][0] == 0
    fin = ev["ztp_final"]
    if pol == "downgrade_domestic":  # merchant stays domestic: K_target = 0, exhausted = true
        i = fin["merchant_id"].tolist().index(3)
        assert (fin["K_target"][i], fin["attempts"][i], fin["exhausted"][i]) == (0, 64, True)
        assert not out.aborted.any()
    else:  # abort: no final for the merchant; run() raises ZTP_EXHAUSTED_ABORT after logging
        assert 3 not in fin["merchant_id"].tolist() and out.aborted.tolist() == [True, False]
    assert 4 in fin["merchant_id"].tolist()
    m = s4.metrics(out, np.array([2, 2]), {})
    assert m["s4.exhausted"] == 1
    assert m["s4.downgrade_domestic"] == (1 if pol == "downgrade_domestic" else 0)
    assert m["s4.aborted"] == (1 if pol == "abort" else 0)


def test_custom_cap_from_policy():
    p = policy(max_zero_attempts=3)
    mids = np.array([9], np.uint64)
    key, hi, lo = streams(mids)
    out = s4.simulate(p, mids, np.array([1e-9]), np.array([1]), key, hi, lo)
    assert out.events["poisson_component"]["attempt"].tolist() == [1, 2, 3]
    assert out.events["ztp_retry_exhausted"]["attempts"].tolist() == [3]


# ------------------------------------------------------------------------------------------ run (files)


def _run_fixture(tmp_path, xb_overrides=None):
    import copy as _copy

    from test_1a_s3 import FIX_MERCHANTS, XB_DOC, build_run

    from engine.segment1a import s3_crossborder as s3

    xb = _copy.deepcopy(XB_DOC)
    for k, v in (xb_overrides or {}).items():
        xb["ztp"][k] = v
    # 10, 40, 60: multi + eligible with foreign candidates; 30: sanctioned (A = 0); 2^64-1: S0-ineligible;
    # 50: single-site
    ctx = build_run(tmp_path / "run", FIX_MERCHANTS, {10: True, 30: True, 40: True, 60: True, 2**64 - 1: True},
                    {10: 7, 30: 4, 40: 40, 60: 3, 2**64 - 1: 2}, eligible={2**64 - 1: False},
                    openness={10: 0.5, 40: 0.75}, xb_doc=xb)
    s3.run_candidates(ctx)
    return ctx


def test_run_writes_events_for_in_scope_merchants_only(tmp_path):
    from engine.core import rnglog

    ctx = _run_fixture(tmp_path)
    s4.run(ctx)
    fin = rnglog.read_events(ctx.data_root, ctx.ids, "ztp_final").to_pylist()
    by = {r["merchant_id"]: r for r in fin}
    assert sorted(by) == [10, 30, 40, 60]  # no rows for single-site 50 or S0-ineligible 2^64-1
    assert by[30]["attempts"] == 0 and by[30]["K_target"] == 0  # sanctioned home: A = 0 short-circuit
    # lambda from N and openness (feature row) or x_default (no feature row for 60)
    p = policy()
    assert by[10]["lambda_extra"] == s4.lambda_scalar(p, 7, float(np.float32(0.5)))
    assert by[60]["lambda_extra"] == s4.lambda_scalar(p, 3, 0.25)
    assert by[40]["regime"] == ("ptrs" if s4.lambda_scalar(p, 40, 0.75) >= 10 else "inversion")
    pcs = rnglog.read_events(ctx.data_root, ctx.ids, "poisson_component", with_source=True)
    assert set(pcs["_part"].to_pylist()) == {"part-00001.jsonl"}  # S4's part; S2 writes part 0
    assert set(pcs["context"].to_pylist()) == {"ztp"} and set(pcs["module"].to_pylist()) == {"1A.ztp_sampler"}
    for m in (10, 40, 60):
        rows = [r for r in pcs.to_pylist() if r["merchant_id"] == m]
        assert len(rows) == by[m]["attempts"] and rows[-1]["k"] == by[m]["K_target"] >= 1
    fails = rnglog.reconcile(ctx.data_root, ctx.ids, families=["poisson_component", "ztp_rejection", "ztp_final"],
                             chain=True)
    assert fails == []
    metrics = [__import__("json").loads(x) for x in open(ctx.path("s4_metrics_log")).read().splitlines()]
    mm = {r["metric"]: r["value"] for r in metrics}
    assert mm["s4.merchants_in_scope"] == 4 and mm["s4.short_circuit_no_admissible"] == 1
    assert mm["s4.not_in_scope.single_site"] == 1 and mm["s4.not_in_scope.ineligible"] == 1
    # a re-run replaces its own parts and trace rows: same event lines (ts_utc aside), totals not doubled
    before = open(ctx.path("rng_event", family="ztp_final") / "part-00000.jsonl").read()
    s4.run(ctx)
    after = open(ctx.path("rng_event", family="ztp_final") / "part-00000.jsonl").read()
    strip = lambda t: [__import__("re").sub(r',?"ts_utc":"[^"]*"', "", x) for x in t.splitlines()]  # noqa: E731
    assert strip(before) == strip(after)
    assert rnglog.reconcile(ctx.data_root, ctx.ids, families=["poisson_component", "ztp_final"]) == []


def test_run_exhaustion_downgrade_and_abort(tmp_path):
    from engine.core import rnglog

    tiny = {"theta": {"theta0_intercept": -40.0, "theta1_log_n_sites": 0.0, "theta2_openness": 0.0}}
    ctx = _run_fixture(tmp_path / "down", tiny)
    s4.run(ctx)
    ex = rnglog.read_events(ctx.data_root, ctx.ids, "ztp_retry_exhausted").to_pylist()
    assert sorted(r["merchant_id"] for r in ex) == [10, 40, 60] and {r["aborted"] for r in ex} == {False}
    fin = {r["merchant_id"]: r for r in rnglog.read_events(ctx.data_root, ctx.ids, "ztp_final").to_pylist()}
    assert all(fin[m]["K_target"] == 0 and fin[m]["exhausted"] and fin[m]["attempts"] == 64 for m in (10, 40, 60))
    assert rnglog.reconcile(ctx.data_root, ctx.ids, families=["poisson_component", "ztp_rejection",
                                                              "ztp_retry_exhausted", "ztp_final"]) == []

    ctx = _run_fixture(tmp_path / "abort", {**tiny, "ztp_exhaustion_policy": "abort"})
    with pytest.raises(EngineError) as e:
        s4.run(ctx)
    assert e.value.code == "ZTP_EXHAUSTED_ABORT" and e.value.rows == [10, 40, 60]
    ex = rnglog.read_events(ctx.data_root, ctx.ids, "ztp_retry_exhausted").to_pylist()
    assert {r["aborted"] for r in ex} == {True}  # the evidence is written before the run stops
    fin = rnglog.read_events(ctx.data_root, ctx.ids, "ztp_final").to_pylist()
    assert [r["merchant_id"] for r in fin] == [30]  # only the A = 0 merchant is resolved


def test_run_openness_out_of_range_fails_closed(tmp_path):
    from test_1a_s3 import FIX_MERCHANTS, build_run

    from engine.segment1a import s3_crossborder as s3

    ctx = build_run(tmp_path / "run", FIX_MERCHANTS[:2], {10: True, 40: True}, {10: 3, 40: 4},
                    openness={10: float("nan"), 40: 0.5})
    s3.run_candidates(ctx)
    with pytest.raises(EngineError) as e:  # §4.3.1: no clamping
        s4.run(ctx)
    assert e.value.code == "POLICY_INVALID" and "merchant 10" in e.value.rows[0]

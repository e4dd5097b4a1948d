"""1A S7 (integer allocation) and S8 (outlet_catalogue) behaviour tests.

Known answers from 1A-S5-S9 §4.2 (worked check) and §5; decisions 6, 8.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.core.errors import EngineError
from engine.segment1a import s6_foreign_selection as s6
from engine.segment1a import s7_allocation as s7
from engine.segment1a import s8_outlet_catalogue as s8

REPO = Path(__file__).resolve().parents[1]
HEAD_TIERS = {"enabled": True, "tiers": [
    {"max_n_outlets": 10, "home_share_min": 0.92}, {"max_n_outlets": 20, "home_share_min": 0.85},
    {"max_n_outlets": 40, "home_share_min": 0.75}, {"max_n_outlets": 1000000, "home_share_min": 0.609}]}


def pol(**lanes):
    doc = {"policy_semver": "0.1.0", "policy_version": "2025-10-16", "dp_resid": 8}
    doc.update(lanes)
    return s7.parse_integerisation_policy(doc, "s7.yaml")


def codes(*isos):
    return s6.iso_codes(list(isos)).astype(np.int64)


def code_of(fn, *a, **k):
    with pytest.raises(EngineError) as ei:
        fn(*a, **k)
    return ei.value.code


# ------------------------------------------------------------------------------------------------
# S7 allocation
# ------------------------------------------------------------------------------------------------


def test_allocation_worked_example():
    # §4.2 worked check: N = 7, D = (GB home, US, DE), s = (.60, .25, .15)
    # a = (4.2, 1.75, 1.05) -> f = (4, 1, 1), d = 1; residuals (.2, .75, .05) -> ranks GB 2, US 1, DE 3
    g = np.zeros(3, np.int64)
    a = s7.allocate(g, np.array([7]), np.array([0.60, 0.25, 0.15]), np.array([True, False, False]),
                    codes("GB", "US", "DE"), np.array([0, 1, 2]), pol())
    assert a.count.tolist() == [4, 2, 1]
    assert a.residual_rank.tolist() == [2, 1, 3]
    assert a.residual.tolist() == [0.2, 0.75, 0.05]
    # with the HEAD home-bias tiers (N <= 10 -> h* = .92): s = (.92, .05, .03) -> c = (7, 0, 0)
    b = s7.allocate(g, np.array([7]), np.array([0.60, 0.25, 0.15]), np.array([True, False, False]),
                    codes("GB", "US", "DE"), np.array([0, 1, 2]), pol(home_bias_lane=HEAD_TIERS))
    assert b.count.tolist() == [7, 0, 0]
    assert np.allclose(b.share, [0.92, 0.05, 0.03], atol=1e-15)
    assert sorted(b.residual_rank.tolist()) == [1, 2, 3]  # every country of D still ranked


def test_allocation_ties_residual_then_iso():
    # N = 2 over three equal weights: a = 2/3 each, f = 0, d = 2, equal residuals -> ISO A-Z gets the bumps
    g = np.zeros(3, np.int64)
    a = s7.allocate(g, np.array([2]), np.array([1.0, 1.0, 1.0]), np.array([True, False, False]),
                    codes("US", "DE", "FR"), np.array([0, 1, 2]), pol())
    assert a.count.tolist() == [0, 1, 1]  # DE, FR before US
    assert a.residual_rank.tolist() == [3, 1, 2]
    assert a.residual.tolist() == [0.66666667] * 3


def test_allocation_property_random_cases():
    rnd = random.Random(11)
    groups, N, w, home, iso, rank = [], [], [], [], [], []
    for m in range(400):
        k = rnd.randint(1, 12)
        N.append(rnd.choice([1, 2, 3, 7, 10, 50, 999, rnd.randint(2, 5000)]))
        cs = rnd.sample(range(676), k)
        for j in range(k):
            groups.append(m)
            w.append(rnd.choice([0.0, rnd.random(), rnd.random() ** 4, 1e-7]) if j else rnd.random() + 1e-9)
            home.append(j == 0)
            iso.append(cs[j])
            rank.append(j)
    g = np.array(groups)
    NN = np.array(N)
    a = s7.allocate(g, NN, np.array(w), np.array(home), np.array(iso), np.array(rank), pol())
    assert np.array_equal(np.bincount(g, weights=a.count).astype(np.int64), NN)  # Σ = N
    assert np.all(a.count >= 0) and np.all(np.abs(a.count - a.target) <= 1.0)  # within 1 of a_i
    assert np.all(a.count - np.floor(a.target) >= 0)
    for m in range(len(N)):
        rows = np.nonzero(g == m)[0]
        assert sorted(a.residual_rank[rows].tolist()) == list(range(1, rows.size + 1))
        # bumps go to the best ranks: every bumped row outranks every unbumped row
        bumped = a.count[rows] - np.floor(a.target[rows]).astype(np.int64) == 1
        if bumped.any() and (~bumped).any():
            assert a.residual_rank[rows][bumped].max() < a.residual_rank[rows][~bumped].min()
    # the bounds lane with multipliers 1.0/1.0 is a no-op guard (HEAD config)
    b = s7.allocate(g, NN, np.array(w), np.array(home), np.array(iso), np.array(rank),
                    pol(bounds_lane={"enabled": True, "lower_multiplier": 1.0, "upper_multiplier": 1.0}))
    assert np.array_equal(a.count, b.count) and np.array_equal(a.residual_rank, b.residual_rank)


def test_residual_quantisation_edges():
    q = s7.quantise_residual(np.array([0.0, 0.123456785, 0.123456775, 0.999999996, 0.5]))
    assert q.tolist() == [0.0, 0.12345678, 0.12345678, 0.99999999, 0.5]  # half-even, top clamp
    with pytest.raises(EngineError) as ei:
        s7.quantise_residual(np.array([1.5]))
    assert ei.value.code == "E_RESIDUAL_QUANTISATION"


def test_zero_support_is_an_error():
    g = np.zeros(2, np.int64)
    assert code_of(s7.allocate, g, np.array([5]), np.array([0.0, 0.0]), np.array([True, False]),
                   codes("GB", "US"), np.array([0, 1]), pol()) == "E_ZERO_SUPPORT"


def test_integerisation_policy_validation_and_dirichlet_refusal():
    assert code_of(pol, dp_resid_extra=1) == "E_POLICY_SCHEMA"
    assert code_of(s7.parse_integerisation_policy, {"policy_semver": "x", "policy_version": "y", "dp_resid": 7},
                   "p") == "E_POLICY_SCHEMA"
    assert code_of(pol, home_bias_lane={"enabled": True, "tiers": [
        {"max_n_outlets": 10, "home_share_min": 0.9}, {"max_n_outlets": 5, "home_share_min": 0.8}]}) == "E_POLICY_SCHEMA"
    p = pol(dirichlet_lane={"enabled": True, "alpha0": 24.0})
    assert p.dirichlet_enabled and p.alpha0 == 24.0
    assert code_of(pol, dirichlet_lane={"enabled": True}) == "E_POLICY_SCHEMA"  # alpha0 required
    default = REPO / "config" / "allocation" / "s7_integerisation_policy.yaml"
    if default.is_file():
        from engine.segment1a.s5_currency_weights import load_strict_yaml

        d = s7.parse_integerisation_policy(load_strict_yaml(default, "E_POLICY_SCHEMA"), str(default))
        assert not (d.dirichlet_enabled or d.bounds_enabled or d.home_bias_enabled)  # decision 10


def test_dirichlet_lane_matches_scalar_gamma_chain():
    rng = pytest.importorskip("engine.core.rng")
    samplers = pytest.importorskip("engine.core.samplers")
    M = rng.master_material("1A", bytes(range(32)), 9248923)
    # m 7: D = (GB home .5, DE .3, FR .2); m 8: D = (US) alone; m 9: a zero share -> no event
    group = np.array([0, 0, 0, 1, 2, 2])
    merchants = np.array([7, 8, 2**63 + 1], np.uint64)
    share = np.array([0.5, 0.3, 0.2, 1.0, 1.0, 0.0])
    iso = codes("GB", "DE", "FR", "US", "IT", "FR")
    home = np.array([True, False, False, True, True, False])
    ev = s7.dirichlet_lane(group, merchants, np.array([9, 4, 3]), share, iso, home, 0.8, M)
    assert ev["merchant_id"].tolist() == [7, 8]
    assert ev["country_isos"].to_pylist() == [["GB", "DE", "FR"], ["US"]]
    assert ev["home_country_iso"].to_pylist() == ["GB", "US"]
    for k, (m, sh) in enumerate([(7, [0.5, 0.3, 0.2]), (8, [1.0])]):
        key, hi, lo = rng.substream(M, "1A", "dirichlet_gamma_vector", rng.ser_u64(rng.merchant_u64(m)))
        st = samplers.Stream(key, hi, lo)
        gs = [samplers.gamma(st, 0.8 * x) for x in sh]  # one stream, counters continue (alpha < 1 boosts)
        assert ev["gamma_raw"].to_pylist()[k] == gs
        assert ev["alpha"].to_pylist()[k] == [0.8 * x for x in sh]
        assert (int(ev["before_hi"][k]), int(ev["before_lo"][k])) == (hi, lo)
        assert (int(ev["after_hi"][k]), int(ev["after_lo"][k])) == st.counter
        assert (int(ev["blocks"][k]), int(ev["draws"][k])) == (st.blocks, st.draws)
        assert abs(sum(ev["weights"].to_pylist()[k]) - 1.0) <= 1e-12


# ------------------------------------------------------------------------------------------------
# S7 hand-off assembly
# ------------------------------------------------------------------------------------------------


def handoff_fixture(members=(("13", "FR"), ("13", "DE"))):
    """Merchants: 10 single (GB), 11 multi ineligible (US, N 5), 12 multi K=0 (DE, N 3),
    13 multi K=2 (GB, N 9; candidates DE, FR, IT), 14 multi aborted by S4."""
    merchants = np.array([10, 11, 12, 13, 14], np.uint64)
    home = s6.iso_codes(["GB", "US", "DE", "GB", "FR"])
    is_multi = np.array([False, True, True, True, True])
    nb_mid = np.array([11, 12, 13, 14], np.uint64)
    nb_N = np.array([5, 3, 9, 4])
    z_mid = np.array([12, 13], np.uint64)
    z_K = np.array([0, 2])
    aborted = np.array([14], np.uint64)
    cand = (np.array([11, 12, 13, 13, 13, 13, 14], np.uint64), s6.iso_codes(["US", "DE", "GB", "DE", "FR", "IT", "FR"]),
            np.array([0, 0, 0, 1, 2, 3, 0]), np.array([True, True, True, False, False, False, True]))
    mm = np.array([int(m) for m, _ in members], np.uint64)
    mi = s6.iso_codes([i for _, i in members]) if members else np.empty(0, np.int16)
    o = np.lexsort((mi, mm))
    weights = {"GB": 0.5, "DE": 0.3, "FR": 0.2, "IT": 0.0}

    def kappa_of(g):
        return np.zeros(len(g), np.int64)

    def weight_of(kap, iso):
        w = np.array([weights[x] for x in s6.iso_list(iso)])
        return w, np.ones(len(iso), bool)

    return (merchants, home, is_multi, nb_mid, nb_N, z_mid, z_K, aborted, cand, (mm[o], mi[o]), kappa_of,
            weight_of, pol())


def test_handoff_scopes():
    hand, ev, _ = s7.compute_handoff(*handoff_fixture())
    rows = list(zip(hand.merchant_id.tolist(), s6.iso_list(hand.iso), hand.count.tolist(),
                    hand.residual_rank.tolist(), hand.is_home.tolist()))
    # 13: D = GB, DE, FR with w .5 .3 .2 -> a = 4.5, 2.7, 1.8 -> f 4 2 1, d = 2 -> FR (.8), DE (.7)
    assert rows == [
        (10, "GB", 1, 1, True),  # single-site: N = 1 at home (decision 6)
        (11, "US", 5, 1, True),  # multi, no ztp_final: all N at home
        (12, "DE", 3, 1, True),  # K = 0: D = {home}
        (13, "DE", 3, 2, False),
        (13, "FR", 2, 1, False),
        (13, "GB", 4, 3, True),
    ]  # 14 (aborted by S4) has no rows
    # residual_rank events only for ztp_final merchants, one per country of D, in candidate_rank order
    assert ev["merchant_id"].tolist() == [12, 13, 13, 13]
    assert s6.iso_list(ev["iso"]) == ["DE", "GB", "DE", "FR"]
    assert ev["residual_rank"].tolist() == [1, 3, 2, 1]


def test_handoff_gates():
    bad_subset = handoff_fixture(members=(("13", "US"),))
    assert code_of(s7.compute_handoff, *bad_subset) == "E_S6_NOT_SUBSET_S3"
    too_many = handoff_fixture(members=(("13", "DE"), ("13", "FR"), ("13", "IT")))
    assert code_of(s7.compute_handoff, *too_many) == "E_UPSTREAM_GATE"
    k_zero = handoff_fixture(members=(("12", "FR"),))
    assert code_of(s7.compute_handoff, *k_zero) == "E_UPSTREAM_GATE"


# ------------------------------------------------------------------------------------------------
# S8 catalogue
# ------------------------------------------------------------------------------------------------

FP = "ab" * 32


def catalogue_fixture(counts=None):
    hand, _, _ = s7.compute_handoff(*handoff_fixture())
    if counts is not None:
        hand.count = np.array(counts, np.int64)
    merchants = np.array([10, 11, 12, 13, 14], np.uint64)
    home = s6.iso_codes(["GB", "US", "DE", "GB", "FR"])
    is_multi = np.array([False, True, True, True, True])
    N_of = np.array([1, 5, 3, 9, 4])
    mi_all = np.arange(5)
    s3_key = np.sort(np.array([3 * 676 + c for c in codes("DE", "FR", "IT")]))
    mem_key = np.sort(np.array([3 * 676 + c for c in codes("DE", "FR")]))
    args = (hand.merchant_id, hand.iso, hand.count, hand.is_home, merchants, home, is_multi, N_of,
            mem_key, s3_key, np.array([14], np.uint64))
    return hand, args, (merchants, home, is_multi, N_of, mi_all)


def test_catalogue_rows_columns_sort_and_single_site():
    hand, args, (merchants, home, is_multi, N_of, _) = catalogue_fixture()
    mi = s8.check_handoff(*args)
    tbl, (b_mid, b_iso, b_n) = s8.build_catalogue(hand.merchant_id, hand.iso, hand.count, mi, home, is_multi, N_of,
                                                  FP, 9248923)
    schema = json.loads((REPO / "contracts/schemas/1A/outlet_catalogue.schema.json").read_text())
    assert tbl.column_names == schema["x-column-order"] == [
        "manifest_fingerprint", "merchant_id", "site_id", "home_country_iso", "legal_country_iso",
        "single_vs_multi_flag", "raw_nb_outlet_draw", "final_country_outlet_count", "site_order", "global_seed"]
    types = {f.name: str(f.type) for f in tbl.schema}
    assert types == {"manifest_fingerprint": "string", "merchant_id": "uint64", "site_id": "string",
                     "home_country_iso": "string", "legal_country_iso": "string", "single_vs_multi_flag": "bool",
                     "raw_nb_outlet_draw": "int32", "final_country_outlet_count": "int32", "site_order": "int32",
                     "global_seed": "uint64"}
    assert tbl.num_rows == 1 + 5 + 3 + 9  # Σ N over catalogued merchants (aborted 14 absent)
    keys = list(zip(tbl.column("merchant_id").to_pylist(), tbl.column("legal_country_iso").to_pylist(),
                    tbl.column("site_order").to_pylist()))
    assert keys == sorted(keys)  # already in writer sort
    single = tbl.filter(pa.compute.equal(tbl.column("merchant_id"), 10)).to_pylist()
    assert single == [{"manifest_fingerprint": FP, "merchant_id": 10, "site_id": "000001", "home_country_iso": "GB",
                       "legal_country_iso": "GB", "single_vs_multi_flag": False, "raw_nb_outlet_draw": 1,
                       "final_country_outlet_count": 1, "site_order": 1, "global_seed": 9248923}]
    m13 = tbl.filter(pa.compute.equal(tbl.column("merchant_id"), 13)).to_pylist()
    assert [(r["legal_country_iso"], r["site_id"], r["final_country_outlet_count"]) for r in m13] == [
        ("DE", "000001", 3), ("DE", "000002", 3), ("DE", "000003", 3), ("FR", "000001", 2), ("FR", "000002", 2),
        ("GB", "000001", 4), ("GB", "000002", 4), ("GB", "000003", 4), ("GB", "000004", 4)]
    assert {r["home_country_iso"] for r in m13} == {"GB"} and {r["raw_nb_outlet_draw"] for r in m13} == {9}
    assert all(r["single_vs_multi_flag"] for r in m13)
    # one block per (merchant, country) with n >= 1 -> one sequence_finalize each
    assert list(zip(b_mid.tolist(), s6.iso_list(b_iso), b_n.tolist())) == [
        (10, "GB", 1), (11, "US", 5), (12, "DE", 3), (13, "DE", 3), (13, "FR", 2), (13, "GB", 4)]
    try:
        from engine.core.schema import validate_table
    except ImportError:  # pragma: no cover
        return
    assert validate_table(tbl, REPO / "contracts/schemas/1A/outlet_catalogue.schema.json") == []


def test_catalogue_zero_count_country_has_no_rows():
    # 13 gets (DE 0, FR 5, GB 4): DE stays in the hand-off but produces no rows / no block
    hand, args, (merchants, home, is_multi, N_of, _) = catalogue_fixture(counts=[1, 5, 3, 0, 5, 4])
    mi = s8.check_handoff(*args)
    tbl, (b_mid, b_iso, _) = s8.build_catalogue(hand.merchant_id, hand.iso, hand.count, mi, home, is_multi, N_of,
                                                FP, 1)
    assert "DE" not in tbl.filter(pa.compute.equal(tbl.column("merchant_id"), 13)).column("legal_country_iso").to_pylist()
    assert (13, "DE") not in list(zip(b_mid.tolist(), s6.iso_list(b_iso)))


def test_catalogue_gates():
    _, args, _ = catalogue_fixture(counts=[1, 5, 3, 3, 2, 5])  # 13 sums to 10 != 9
    assert code_of(s8.check_handoff, *args) == "E_SUM_MISMATCH"
    _, args, _ = catalogue_fixture()
    args = list(args)
    args[8] = args[8][:1]  # FR no longer a member
    assert code_of(s8.check_handoff, *args) == "E_S3_MEMBERSHIP_MISSING"
    _, args, _ = catalogue_fixture()
    args = list(args)
    args[10] = np.empty(0, np.uint64)  # 14 not aborted but has no counts
    assert code_of(s8.check_handoff, *args) == "E_COUNTS_SOURCE_MISSING"


def test_site_id_overflow_stops_the_run():
    big = s8.MAX_SEQ + 1
    hand, args, _ = catalogue_fixture(counts=[1, big, 3, 3, 2, 4])
    args = list(args)
    args[7] = np.array([1, big, 3, 9, 4])
    with pytest.raises(EngineError) as ei:
        s8.check_handoff(*args)
    assert ei.value.code == "E_SITE_ID_OVERFLOW" and "11:US" in str(ei.value)


def test_fixed_width_strings():
    assert s6.fixed_strings(np.array([1, 10, 999999]), 6).to_pylist() == ["000001", "000010", "999999"]
    with pytest.raises(ValueError):
        s6.fixed_strings(np.array([1000000]), 6)
    assert s6.constant_strings("ab", 3).to_pylist() == ["ab"] * 3
    assert s6.iso_strings(s6.iso_codes(["NA", "ZW", "AD"])).to_pylist() == ["NA", "ZW", "AD"]


# ------------------------------------------------------------------------------------------------
# S5 -> S8 end to end on a synthetic upstream (real dictionary paths, RNG logs, publish)
# ------------------------------------------------------------------------------------------------

BIG = 2**63 + 5  # u64 id above 2^63 - 1 (decision 12)
SHARES = ("currency,country_iso,share,obs_count\n"
          "EUR,DE,0.4,400\nEUR,FR,0.3,300\nEUR,IT,0.2,200\nEUR,NL,0.1,100\n"
          "GBP,GB,0.9,900\nGBP,GG,0.1,100\nJPY,JP,1.0,50\nUSD,US,1.0,1000\n")
# merchant: (home, multi, N, eligible, K or None, foreign candidates in rank order)
MERCHANTS = {
    1: ("DE", False, None, False, None, []),  # single-site
    2: ("US", True, 5, False, None, []),  # multi, ineligible: all N at home
    3: ("DE", True, 7, True, 2, ["FR", "JP", "IT", "NL"]),  # JP: no EUR weight -> no event
    4: ("FR", True, 3, True, 0, []),  # A = 0 -> K = 0
    5: ("GB", True, 12, True, 3, ["DE", "FR"]),  # GBP has no DE/FR weight: ZERO_WEIGHT_DOMAIN
    BIG: ("IT", True, 20, True, 1, ["DE", "FR"]),
}


def _ctx(root: Path, tmp: Path, s7_policy: str | None = None):
    from engine.core import config as cfgmod
    from engine.core.context import RunContext, SegmentIds

    raw = json.loads(json.dumps(__import__("yaml").safe_load((REPO / "config.yaml").read_text())))
    (tmp / "shares.csv").write_text(SHARES)
    raw["segment1a"]["parameters"]["settlement_shares.csv"] = str(tmp / "shares.csv")
    raw["segment1a"]["parameters"]["ccy_country_shares.csv"] = str(tmp / "shares.csv")
    if s7_policy is not None:
        (tmp / "s7.yaml").write_text(s7_policy)
        raw["segment1a"]["parameters"]["s7_integerisation_policy.yaml"] = str(tmp / "s7.yaml")
    cfg = cfgmod.resolve(raw, REPO)
    ids = SegmentIds("1A", 9248923, "1" * 64, "2" * 64, "3" * 32)
    return RunContext(root, REPO, cfg, ids)


def _upstream(ctx, MERCHANTS=MERCHANTS) -> None:
    from engine.core import publish, rnglog

    ph, fp = ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint
    mids = sorted(MERCHANTS)
    code = "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL"
    with publish.staged(ctx.path("hurdle_design_matrix"), code) as t:
        publish.write_parquet(pa.table({
            "merchant_id": pa.array(mids, pa.uint64()),
            "home_country_iso": [MERCHANTS[m][0] for m in mids],
            "parameter_hash": [ph] * len(mids)}), t / "part-00000.parquet")
    with publish.staged(ctx.path("crossborder_eligibility_flags"), code) as t:
        publish.write_parquet(pa.table({
            "merchant_id": pa.array(mids, pa.uint64()), "is_eligible": [MERCHANTS[m][3] for m in mids],
            "parameter_hash": [ph] * len(mids)}), t / "part-00000.parquet")
    cm, ci, cr, chm = [], [], [], []
    for m in mids:
        home, multi, *_rest, cands = MERCHANTS[m]
        if not multi:
            continue
        for r, c in enumerate([home] + cands):
            cm.append(m), ci.append(c), cr.append(r), chm.append(r == 0)
    with publish.staged(ctx.path("s3_candidate_set"), code) as t:
        publish.write_parquet(pa.table({
            "merchant_id": pa.array(cm, pa.uint64()), "country_iso": ci, "candidate_rank": pa.array(cr, pa.int32()),
            "is_home": chm, "parameter_hash": [ph] * len(cm)}), t / "part-00000.parquet")
    logs = rnglog.RngLogs(ctx.data_root, "1A", ctx.ids)
    logs.write_audit(build_commit="0" * 64)
    n = len(mids)
    z = np.zeros(n, np.uint64)
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", {
        "merchant_id": np.array(mids, np.uint64), "before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z,
        "blocks": z, "draws": z, "pi": np.array([1.0 if MERCHANTS[m][1] else 0.0 for m in mids]),
        "is_multi": np.array([MERCHANTS[m][1] for m in mids]), "deterministic": np.ones(n, bool),
        "u": np.full(n, np.nan)})
    multi = [m for m in mids if MERCHANTS[m][1]]
    z = np.zeros(len(multi), np.uint64)
    logs.add_events("nb_final", "1A.nb_sampler", "nb_final", {
        "merchant_id": np.array(multi, np.uint64), "before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z,
        "blocks": z, "draws": z, "mu": np.full(len(multi), 5.0), "dispersion_k": np.full(len(multi), 2.0),
        "n_outlets": np.array([MERCHANTS[m][2] for m in multi]), "nb_rejections": np.zeros(len(multi), np.int64)})
    zm = [m for m in mids if MERCHANTS[m][4] is not None]
    z = np.zeros(len(zm), np.uint64)
    logs.add_events("ztp_final", "1A.ztp_sampler", "poisson_component", {
        "merchant_id": np.array(zm, np.uint64), "before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z,
        "blocks": z, "draws": z, "context": "ztp", "K_target": np.array([MERCHANTS[m][4] for m in zm]),
        "lambda_extra": np.full(len(zm), 1.5), "attempts": np.array([1 if MERCHANTS[m][4] else 0 for m in zm]),
        "regime": "inversion"})
    logs.close()


def _run_s5_s8(ctx) -> None:
    from engine.segment1a import s5_currency_weights as s5

    for mod in (s5, s6, s7, s8):
        mod.run(ctx)


def _data_digest(root: Path) -> dict:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "data").rglob("*")) if p.is_file()}


def test_s5_to_s8_end_to_end(tmp_path):
    pytest.importorskip("engine.core.rnglog")
    from engine.core import publish, rnglog

    ctx = _ctx(tmp_path / "a", tmp_path)
    _upstream(ctx)
    before = _data_digest(ctx.data_root)
    _run_s5_s8(ctx)
    digest = _data_digest(ctx.data_root)

    cat = publish.read_parquet_dir(ctx.path("outlet_catalogue"))
    rows = cat.to_pylist()
    by_m: dict[int, list[dict]] = {}
    for r in rows:
        by_m.setdefault(r["merchant_id"], []).append(r)
    assert sorted(by_m) == sorted(MERCHANTS)  # every merchant, single-site included (decision 6)
    for m, (home, multi, N, _el, K, cands) in MERCHANTS.items():
        rs = by_m[m]
        assert len(rs) == (N or 1)  # Σ counts = N
        assert {r["home_country_iso"] for r in rs} == {home}
        assert {r["single_vs_multi_flag"] for r in rs} == {multi}
        assert {r["raw_nb_outlet_draw"] for r in rs} == {N or 1}
        assert {r["global_seed"] for r in rs} == {9248923} and {r["manifest_fingerprint"] for r in rs} == {"2" * 64}
        for c in {r["legal_country_iso"] for r in rs}:
            block = [r for r in rs if r["legal_country_iso"] == c]
            assert [r["site_order"] for r in block] == list(range(1, len(block) + 1))
            assert [r["site_id"] for r in block] == [f"{i:06d}" for i in range(1, len(block) + 1)]
            assert {r["final_country_outlet_count"] for r in block} == {len(block)}
    for m in (1, 2, 4, 5):  # domestic only
        assert {r["legal_country_iso"] for r in by_m[m]} == {MERCHANTS[m][0]}
    keys = [(r["merchant_id"], r["legal_country_iso"], r["site_order"]) for r in rows]
    assert keys == sorted(keys)

    # S6: gumbel events for considered candidates only; membership = selected events
    g = rnglog.read_events(ctx.data_root, ctx.ids, "gumbel_key").to_pylist()
    assert [(e["merchant_id"], e["country_iso"]) for e in g] == [(3, "FR"), (3, "IT"), (3, "NL"), (BIG, "DE"), (BIG, "FR")]
    assert sum(e["selected"] for e in g if e["merchant_id"] == 3) == 2
    assert sum(e["selected"] for e in g if e["merchant_id"] == BIG) == 1
    memb = publish.read_parquet_dir(ctx.path("s6_membership"))
    assert sorted(zip(memb.column("merchant_id").to_pylist(), memb.column("country_iso").to_pylist())) == \
        sorted((e["merchant_id"], e["country_iso"]) for e in g if e["selected"])
    assert set(memb.column("seed").to_pylist()) == {9248923}
    members = {(e["merchant_id"], e["country_iso"]) for e in g if e["selected"]}
    for m in (3, BIG):  # foreign outlets only in members
        assert {(m, r["legal_country_iso"]) for r in by_m[m]} - {(m, MERCHANTS[m][0])} <= members
    rec = json.loads((ctx.path("s6_receipt") / "S6_VALIDATION.json").read_text())
    assert rec["reason_code_counts"]["ZERO_WEIGHT_DOMAIN"] == 1 and rec["reason_code_counts"]["NO_CANDIDATES"] == 1
    assert rec["events_written"] == 5 and rec["re_derivation_ok"]

    # S7: one residual_rank per country of D for the ztp_final merchants only
    rr = rnglog.read_events(ctx.data_root, ctx.ids, "residual_rank").to_pylist()
    assert sorted({e["merchant_id"] for e in rr}) == [3, 4, 5, BIG]
    assert len([e for e in rr if e["merchant_id"] == 3]) == 3 and len([e for e in rr if e["merchant_id"] == BIG]) == 2
    # S8: one sequence_finalize per catalogue block, site_count = block size
    sf = rnglog.read_events(ctx.data_root, ctx.ids, "sequence_finalize").to_pylist()
    blocks = {}
    for r in rows:
        blocks[(r["merchant_id"], r["legal_country_iso"])] = blocks.get((r["merchant_id"], r["legal_country_iso"]), 0) + 1
    assert {(e["merchant_id"], e["country_iso"]): e["site_count"] for e in sf} == blocks and len(sf) == len(blocks)
    assert rnglog.reconcile(ctx.data_root, ctx.ids, families=["gumbel_key", "residual_rank", "sequence_finalize"]) == []

    # re-run in place: identical bytes are a no-op; a fresh data root gives the same bytes
    _run_s5_s8(ctx)
    assert _data_digest(ctx.data_root) == digest
    ctx2 = _ctx(tmp_path / "b", tmp_path)
    _upstream(ctx2)
    _run_s5_s8(ctx2)
    assert _data_digest(ctx2.data_root) == digest
    assert set(digest) - set(before)  # S5-S8 wrote something

    # no PASS -> no read: a tampered S5 receipt stops S6
    rec5 = ctx.path("ccy_country_weights_cache") / "S5_VALIDATION.json"
    rec5.write_bytes(rec5.read_bytes().replace(b'"dp":6', b'"dp":7'))
    with pytest.raises(EngineError) as ei:
        s6.run(ctx)
    assert ei.value.code == "E_FLAG_HASH_MISMATCH" and str(ei.value).startswith("No PASS -> no read:")


def test_dirichlet_lane_end_to_end_does_not_change_counts(tmp_path):
    pytest.importorskip("engine.core.rnglog")
    from engine.core import publish, rnglog
    from engine.segment1a import s5_currency_weights as s5

    base = _ctx(tmp_path / "a", tmp_path)
    _upstream(base)
    for mod in (s5, s6, s7):
        mod.run(base)
    lane = _ctx(tmp_path / "b", tmp_path, "policy_semver: '0.1.0'\npolicy_version: '2025-10-16'\ndp_resid: 8\n"
                "dirichlet_lane: {enabled: true, alpha0: 24.0}\nbounds_lane: {enabled: false}\n")
    _upstream(lane)
    for mod in (s5, s6, s7):
        mod.run(lane)
    a = publish.read_parquet_dir(base.path("s7_integer_allocation"))
    b = publish.read_parquet_dir(lane.path("s7_integer_allocation"))
    assert a.equals(b)  # audit lane only (§4.2 step 12)
    dg = rnglog.read_events(lane.data_root, lane.ids, "dirichlet_gamma_vector").to_pylist()
    assert [e["merchant_id"] for e in dg] == [3, 4, 5, BIG]  # one per ztp_final merchant (all shares > 0)
    assert all(abs(sum(e["weights"]) - 1.0) <= 1e-6 and e["country_isos"][0] == e["home_country_iso"] for e in dg)
    assert rnglog.reconcile(lane.data_root, lane.ids, families=["dirichlet_gamma_vector", "residual_rank"]) == []


def test_run_without_any_cross_border_merchant(tmp_path):
    """No ztp_final at all: S6 draws nothing, S7/S8 put every merchant at home."""
    pytest.importorskip("engine.core.rnglog")
    from engine.core import publish

    domestic = {1: MERCHANTS[1], 2: MERCHANTS[2], BIG: ("IT", True, 4, False, None, [])}
    ctx = _ctx(tmp_path / "a", tmp_path)
    _upstream(ctx, domestic)
    _run_s5_s8(ctx)
    cat = publish.read_parquet_dir(ctx.path("outlet_catalogue"))
    assert cat.num_rows == 1 + 5 + 4
    assert cat.column("legal_country_iso").to_pylist() == cat.column("home_country_iso").to_pylist()
    rec = json.loads((ctx.path("s6_receipt") / "S6_VALIDATION.json").read_text())
    assert rec["events_written"] == 0 and rec["merchants_processed"] == 0 and rec["trace_reconciled"]
    assert publish.read_parquet_dir(ctx.path("s6_membership"), schema="schemas/1A/s6_membership.schema.json").num_rows == 0

"""1A S3: rule ladder + candidate ranking, priors, bounded integerisation, sequencing, policy validation.

Spec: 1A-S1-S4 §3 (worked example §3.7), decisions 13 and 28. Tiny fixtures built here.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from engine.core.errors import EngineError
from engine.segment1a import s3_crossborder as s3

ISO = ["CA", "DE", "FR", "GB", "IR", "JP", "KP", "US"]
MCC_VOCAB = [4829, 5411, 5812, 6011, 7995]


def ladder_doc() -> dict:
    """Two ALLOW rules with overlapping admits, a non-decision-bearing CLASS admit, a DENY, a DEFAULT."""
    return {
        "semver": "1.0.0",
        "version": "2025-12-31",
        "precedence_order": ["DENY", "ALLOW", "CLASS", "LEGAL", "THRESHOLD", "DEFAULT"],
        "reason_codes": ["ALLOW_A", "ALLOW_B", "CLASS_C", "DEFAULT_DENY", "DENY_SANCTIONED_HOME"],
        "filter_tags": ["ADMISSIBLE", "CORE", "EXTRA", "HOME", "SANCTIONED"],
        "country_sets": {"SANCTIONED": ["IR", "KP"], "CORE": ["DE", "FR", "JP"], "WIDE": ["FR", "US"]},
        "reason_code_to_rule_id": {"ALLOW_A": "RL_ALLOW_A", "ALLOW_B": "RL_ALLOW_B", "CLASS_C": "RL_CLASS_C",
                                   "DEFAULT_DENY": "RL_DEFAULT", "DENY_SANCTIONED_HOME": "RL_DENY"},
        "rules": [
            # listed out of order on purpose: the ladder sorts by (precedence_rank, priority, rule_id)
            {"rule_id": "RL_ALLOW_A", "precedence": "ALLOW", "priority": 50, "is_decision_bearing": True,
             "predicate": {"op": "CHANNEL_IN", "values": ["CP"]},
             "outcome": {"reason_code": "ALLOW_A", "tags": ["ADMISSIBLE"]}, "admit_sets": ["WIDE"],
             "row_tags": ["ADMISSIBLE"]},
            {"rule_id": "RL_ALLOW_B", "precedence": "ALLOW", "priority": 20, "is_decision_bearing": True,
             "predicate": {"op": "AND", "args": [{"op": "CHANNEL_IN", "values": ["CP"]},
                                                  {"op": "NOT", "arg": {"op": "MCC_IN", "codes": ["6011"],
                                                                        "ranges": ["7800-7999"]}}]},
             "outcome": {"reason_code": "ALLOW_B", "tags": ["ADMISSIBLE"]}, "admit_sets": ["CORE"],
             "deny_countries": ["JP"], "row_tags": ["CORE"]},
            {"rule_id": "RL_CLASS_C", "precedence": "CLASS", "priority": 5, "is_decision_bearing": False,
             "predicate": {"op": "OR", "args": [{"op": "MCC_IN", "codes": ["5411"]},
                                                 {"op": "IN_SET", "field": "home_country_iso", "set": "WIDE"}]},
             "outcome": {"reason_code": "CLASS_C", "tags": []}, "admit_countries": ["CA"], "row_tags": ["EXTRA"]},
            {"rule_id": "RL_DENY", "precedence": "DENY", "priority": 1000, "is_decision_bearing": True,
             "predicate": {"op": "IN_SET", "field": "home_country_iso", "set": "SANCTIONED"},
             "outcome": {"reason_code": "DENY_SANCTIONED_HOME", "tags": ["SANCTIONED"]}},
            {"rule_id": "RL_DEFAULT", "precedence": "DEFAULT", "priority": 999999, "is_decision_bearing": True,
             "predicate": {"op": "TRUE"}, "outcome": {"reason_code": "DEFAULT_DENY", "tags": []}},
        ],
    }


def ladder():
    return s3.parse_rule_ladder(ladder_doc(), ISO, MCC_VOCAB)


def rows_of(cs, mid):
    t = cs.table("a" * 64, "b" * 64).to_pylist()
    return [(r["country_iso"], r["candidate_rank"], r["is_home"], r["reason_codes"], r["filter_tags"])
            for r in t if r["merchant_id"] == mid]


# ------------------------------------------------------------------------------------------ ranking


def test_candidate_ranking_worked_example():
    lad = ladder()
    assert [r.rule_id for r in lad.rules] == ["RL_DENY", "RL_ALLOW_B", "RL_ALLOW_A", "RL_CLASS_C", "RL_DEFAULT"]
    mids = np.array([40, 10, 20, 30, 50, 2**64 - 1], dtype=np.uint64)
    home = ["GB", "GB", "FR", "IR", "GB", "DE"]
    chan = ["CP", "CP", "CP", "CP", "CNP", "CP"]
    mcc = np.array([5812, 5411, 6011, 5411, 5411, 5812])
    cs = s3.build_candidate_set(lad, mids, home, chan, mcc, ISO)
    # rows sorted by merchant_id (unsigned), home first
    assert cs.merchants.tolist() == [10, 20, 30, 40, 50, 2**64 - 1]

    # merchant 10 (GB, CP, 5411): ALLOW_B (prio 20) admits DE, FR (JP denied); ALLOW_A (prio 50) admits FR, US;
    # non-decision-bearing CLASS admits CA. Key1(FR) = ALLOW_B. Order DE, FR | US | CA.
    assert rows_of(cs, 10) == [
        ("GB", 0, True, ["ALLOW_A", "ALLOW_B", "CLASS_C", "DEFAULT_DENY"], ["ADMISSIBLE", "HOME"]),
        ("DE", 1, False, ["ALLOW_B"], ["ADMISSIBLE", "CORE"]),
        ("FR", 2, False, ["ALLOW_A", "ALLOW_B"], ["ADMISSIBLE", "CORE"]),
        ("US", 3, False, ["ALLOW_A"], ["ADMISSIBLE"]),
        ("CA", 4, False, ["CLASS_C"], ["ADMISSIBLE", "EXTRA"]),
    ]
    # merchant 20 (FR home, MCC 6011 => ALLOW_B does not fire, JP no longer denied but not admitted):
    # ALLOW_A admits FR (home, dropped) and US; CLASS fires via home in WIDE -> CA
    assert [r[:2] for r in rows_of(cs, 20)] == [("FR", 0), ("US", 1), ("CA", 2)]
    # merchant 30: sanctioned home. DENY (priority 1000) beats ALLOW (priority 20/50): home only
    assert [r[:3] for r in rows_of(cs, 30)] == [("IR", 0, True)]
    assert rows_of(cs, 30)[0][4] == ["ADMISSIBLE", "HOME", "SANCTIONED"]
    # merchant 40 (GB, CP, 5812): CLASS does not fire; ALLOW_B then ALLOW_A
    assert [r[:2] for r in rows_of(cs, 40)] == [("GB", 0), ("DE", 1), ("FR", 2), ("US", 3)]
    # merchant 50 (CNP): only CLASS (not decision-bearing) and DEFAULT fire -> DEFAULT decides: domestic
    assert [r[:2] for r in rows_of(cs, 50)] == [("GB", 0)]
    # merchant 2^64-1 (DE home): DE dropped from the ALLOW_B group; ranks stay contiguous
    assert [r[:2] for r in rows_of(cs, 2**64 - 1)] == [("DE", 0), ("FR", 1), ("US", 2)]
    assert cs.n_foreign.tolist() == [4, 2, 0, 3, 0, 2]
    assert cs.eligible.tolist() == [True, True, False, True, False, True]


def test_key1_ties_broken_by_iso():
    doc = ladder_doc()
    doc["rules"][0]["admit_sets"] = []
    doc["rules"][0]["admit_countries"] = ["US", "CA", "FR"]  # one rule admits all three: ISO A->Z decides
    lad = s3.parse_rule_ladder(doc, ISO, MCC_VOCAB)
    cs = s3.build_candidate_set(lad, np.array([7], np.uint64), ["GB"], ["CP"], np.array([6011]), ISO)
    assert [r[:2] for r in rows_of(cs, 7)] == [("GB", 0), ("CA", 1), ("FR", 2), ("US", 3)]


def _reference_candidates(lad, home, chan, mcc):
    """Per-merchant scalar re-implementation of S3.1-S3.3 (the oracle for the vectorised build)."""
    def ev(p):
        op = p[0]
        if op == "TRUE":
            return True
        if op == "IN_SET":
            return home in p[1]
        if op == "CHANNEL_IN":
            return chan in p[1]
        if op == "MCC_IN":
            return mcc in p[1] or any(lo <= mcc <= hi for lo, hi in p[2])
        if op == "AND":
            return all(ev(a) for a in p[1])
        if op == "OR":
            return any(ev(a) for a in p[1])
        return not ev(p[1])

    fired = [r for r in lad.rules if ev(r.predicate)]
    db = [r for r in fired if r.is_decision_bearing]
    deny = [r for r in db if r.precedence == "DENY"]
    allow = [r for r in db if r.precedence == "ALLOW"]
    elig = False if deny else True if allow else (db[0].admit_bearing and db[0].precedence != "DEFAULT")
    out = [home]
    if elig:
        admits = {}
        for i, r in enumerate(lad.rules):
            if r in fired:
                for c in r.admit:
                    admits.setdefault(c, i)
        denies = {c for r in fired for c in r.deny}
        out += sorted((c for c in admits if c not in denies and c != home), key=lambda c: (admits[c], c))
    return out


def test_vectorised_build_matches_per_merchant_reference():
    lad = ladder()
    rng = np.random.default_rng(7)
    n = 400
    mids = rng.choice(np.arange(1, 10**6, dtype=np.uint64), size=n, replace=False)
    home = rng.choice(ISO, size=n).tolist()
    chan = rng.choice(["CP", "CNP"], size=n).tolist()
    mcc = rng.choice(MCC_VOCAB, size=n)
    cs = s3.build_candidate_set(lad, mids, home, chan, mcc, ISO)
    t = cs.table("a" * 64, None)
    got = {}
    for r in t.to_pylist():
        got.setdefault(r["merchant_id"], []).append((r["candidate_rank"], r["country_iso"]))
    for m, h, c, k in zip(mids.tolist(), home, chan, mcc.tolist()):
        want = _reference_candidates(lad, h, c, k)
        assert [iso for _, iso in got[m]] == want, (m, h, c, k)
        assert [rk for rk, _ in got[m]] == list(range(len(want)))
    assert t.column("produced_by_fingerprint").null_count == n + int(cs.n_foreign.sum())


def test_candidate_set_vocabulary_errors():
    lad = ladder()
    with pytest.raises(EngineError) as e:
        s3.build_candidate_set(lad, np.array([1], np.uint64), ["ZZ"], ["CP"], np.array([5411]), ISO)
    assert e.value.code == "ERR_S3_COUNTRY_CODE_INVALID"
    with pytest.raises(EngineError) as e:
        s3.build_candidate_set(lad, np.array([1], np.uint64), ["GB"], ["card_present"], np.array([5411]), ISO)
    assert e.value.code == "ERR_S3_VOCAB_INVALID"
    with pytest.raises(EngineError) as e:
        s3.build_candidate_set(lad, np.array([1, 1], np.uint64), ["GB", "GB"], ["CP", "CP"], np.array([1, 1]), ISO)
    assert e.value.code == "ERR_S3_DUPLICATE_ROW"


# ------------------------------------------------------------------------------------------ priors

HEAD_BW = {"version": "1.2.0", "dp": 7,
           "model": {"kind": "loglinear_rank_home", "coeffs": {"beta0": 0.0, "beta_home": 1.25, "beta_rank": -0.10}},
           "bounds": {"log_w_min": -50.0, "log_w_max": 50.0, "w_min": 1.0e-7, "w_max": 1.0e12}}


def test_priors_worked_example_quantised_to_dp():
    bw = s3.parse_base_weight(HEAD_BW)
    w, s = s3.base_weight_priors(bw, np.array([True, False, False]), np.array([0, 1, 2], np.int32))
    assert s.to_pylist() == ["3.4903430", "0.9048374", "0.8187308"]  # §3.7
    assert w.tolist() == [3.490343, 0.9048374, 0.8187308]
    assert all(len(x.split(".")[1]) == 7 for x in s.to_pylist())
    # dp = 0 and clamping: a very negative rank coefficient hits w_min, which quantises to 1 at dp 0
    doc = copy.deepcopy(HEAD_BW)
    doc["dp"] = 0
    doc["model"]["coeffs"]["beta_rank"] = -5.0
    doc["bounds"]["w_min"] = 1.0
    w0, s0 = s3.base_weight_priors(s3.parse_base_weight(doc), np.array([True, False, False]), np.array([0, 1, 9], np.int32))
    assert s0.to_pylist() == ["3", "1", "1"]
    # clamps then half-even quantisation on exact binary ties: w_min 0.25 -> 2.5 ticks -> 2; w_max 0.75 -> 7.5 -> 8
    doc2 = copy.deepcopy(HEAD_BW)
    doc2["dp"] = 1
    doc2["model"]["coeffs"] = {"beta0": -60.0, "beta_home": 120.0, "beta_rank": 0.0}
    doc2["bounds"].update(w_min=0.25, w_max=0.75)
    pol = s3.parse_base_weight(doc2)
    assert s3.prior_value(pol, False, 3) == (0.2, "0.2")
    assert s3.prior_value(pol, True, 0) == (0.8, "0.8")


# ------------------------------------------------------------------------------------------ integerisation

HEAD_TH = s3.parse_thresholds({"semver": "1.1.0", "version": "2025-12-31", "enabled": True, "home_min": 1,
                               "force_at_least_one_foreign_if_foreign_present": True,
                               "min_one_per_country_when_feasible": False, "foreign_cap_mode": "n_minus_home_min",
                               "on_infeasible": "fail"})


def _example():
    bw = s3.parse_base_weight(HEAD_BW)
    w, _ = s3.base_weight_priors(bw, np.array([True, False, False]), np.array([0, 1, 2], np.int32))
    iso_code = np.array([ISO.index("GB"), ISO.index("DE"), ISO.index("FR")], np.int32)
    return np.array([0, 3]), w, np.array([True, False, False]), iso_code, np.array([0, 1, 2], np.int32)


def test_integerisation_worked_example_unbounded_and_bounded():
    off, w, home, code, rank = _example()
    c, rr, st = s3.integerise(off, np.array([7]), w, home, code, rank)  # thresholds off
    assert c.tolist() == [5, 1, 1] and rr.tolist() == [1, 2, 3] and st.tolist() == [0]
    c, rr, st = s3.integerise(off, np.array([7]), w, home, code, rank, HEAD_TH)
    assert c.tolist() == [5, 1, 1] and rr.tolist() == [3, 2, 1] and st.tolist() == [0]  # FR bumped


def _bounds(N, M, th, caps):
    Lh = min(th.home_min, N) if th.enabled else 0
    L, U = [], []
    for i in range(M):
        if not th.enabled:
            lo, hi = 0, N
        elif i == 0:
            lo, hi = Lh, (N - 1 if th.force_foreign and M > 1 and N >= 2 else N)
        else:
            lo = 1 if th.min_one_per_country and N >= M and N >= 2 else 0
            hi = max(lo, N - Lh) if th.foreign_cap_mode == "n_minus_home_min" else N
        L.append(lo)
        U.append(min(hi, caps[i]))
    return L, U


def test_integerisation_invariants_random():
    rng = np.random.default_rng(11)
    variants = [s3.UNBOUNDED, HEAD_TH,
                s3.ThresholdsPolicy(True, 2, False, True, "none"),
                s3.ThresholdsPolicy(True, 0, True, True, "n_minus_home_min")]
    for th in variants:
        nm = 300
        M = rng.integers(1, 7, size=nm)
        N = rng.integers(2, 40, size=nm)
        off = np.zeros(nm + 1, np.int64)
        off[1:] = np.cumsum(M)
        rows = int(off[-1])
        home = np.zeros(rows, bool)
        home[off[:-1]] = True
        rank = (np.arange(rows) - np.repeat(off[:-1], M)).astype(np.int32)
        code = np.concatenate([rng.permutation(len(ISO))[:m] for m in M]).astype(np.int32)
        w = rng.uniform(0.1, 5.0, size=rows)
        caps = rng.choice([3, 5, 10**6], size=rows)
        c, rr, st = s3.integerise(off, N, w, home, code, rank, th, caps)
        for i in range(nm):
            a, b = off[i], off[i + 1]
            L, U = _bounds(int(N[i]), int(M[i]), th, caps[a:b].tolist())
            feasible = sum(L) <= N[i] <= sum(U) and all(lo <= hi for lo, hi in zip(L, U))
            assert st[i] == (0 if feasible else 1)
            if not feasible:
                continue
            assert c[a:b].sum() == N[i]
            assert all(lo <= x <= hi for lo, x, hi in zip(L, c[a:b], U))
            assert sorted(rr[a:b].tolist()) == list(range(1, M[i] + 1))
        s3.check_integerisation(off[: 1], N[:0], c[:0])  # empty is fine


def test_integerisation_edge_cases():
    # DENY / home only: count(home) = N, residual_rank 1
    c, rr, st = s3.integerise(np.array([0, 1]), np.array([9]), None, np.array([True]), np.array([3], np.int32),
                              np.array([0], np.int32), HEAD_TH)
    assert (c.tolist(), rr.tolist(), st.tolist()) == ([9], [1], [0])
    # N = 2, home_min 1 + force-foreign: exactly one foreign outlet
    c, rr, st = s3.integerise(np.array([0, 4]), np.array([2]), None, np.array([True, False, False, False]),
                              np.array([3, 0, 1, 2], np.int32), np.arange(4, dtype=np.int32), HEAD_TH)
    assert c[0] == 1 and c[1:].sum() == 1 and st[0] == 0
    # a per-country cap that makes the split infeasible -> status 1 (run raises ERR_S3_INTEGER_FEASIBILITY)
    c, rr, st = s3.integerise(np.array([0, 2]), np.array([10]), None, np.array([True, False]), np.array([3, 1], np.int32),
                              np.array([0, 1], np.int32), HEAD_TH, caps=np.array([3, 4]))
    assert st.tolist() == [1]
    # caps binding below floor(a'): the leftover d exceeds the rows with capacity -> bumps cycle through S
    c, rr, st = s3.integerise(np.array([0, 3]), np.array([100]), np.array([100.0, 1.0, 1.0]),
                              np.array([True, False, False]), np.array([3, 1, 2], np.int32), np.arange(3, dtype=np.int32),
                              s3.UNBOUNDED, caps=np.array([5, 60, 60]))
    assert st.tolist() == [0] and c.tolist() == [5, 48, 47] and rr.tolist() == [3, 1, 2]
    with pytest.raises(EngineError) as e:
        s3.check_integerisation(np.array([0, 2]), np.array([5]), np.array([2, 2]))
    assert e.value.code == "ERR_S3_INTEGER_SUM_MISMATCH"


# ------------------------------------------------------------------------------------------ sequencing


def test_site_sequence_numbering_and_overflow():
    mid = np.array([5, 5, 5, 9], np.uint64)
    code = np.array([3, 1, 2, 0], np.int32)
    m, c, so = s3.site_sequence(mid, code, np.array([3, 0, 2, 1]))
    assert m.tolist() == [5, 5, 5, 5, 5, 9]
    assert c.tolist() == [3, 3, 3, 2, 2, 0]
    assert so.tolist() == [1, 2, 3, 1, 2, 1]
    assert s3.site_id_strings(so).to_pylist() == ["000001", "000002", "000003", "000001", "000002", "000001"]
    with pytest.raises(EngineError) as e:
        s3.site_sequence(mid[:1], code[:1], np.array([1_000_000]))
    assert e.value.code == "ERR_S3_SITE_SEQUENCE_OVERFLOW"


def test_compute_lanes_end_to_end_pure():
    """Candidates -> priors -> counts -> sequence, only for merchants with an N, tables sorted by ISO later."""
    import pyarrow as pa

    lad = ladder()
    cs = s3.build_candidate_set(lad, np.array([10, 40, 50], np.uint64), ["GB", "GB", "GB"], ["CP", "CP", "CNP"],
                                np.array([5411, 5812, 5411]), ISO)
    cand = cs.table("a" * 64, None)
    w, _ = s3.base_weight_priors(s3.parse_base_weight(HEAD_BW), cs.is_home, cs.candidate_rank)
    res = s3.compute_lanes(cand, np.array([10, 50], np.uint64), np.array([7, 3]), ISO, w, HEAD_TH, None, True)
    iso = np.asarray(res["iso_list"], dtype=object)
    got = list(zip(res["merchant_id"].tolist(), iso[res["country_code"]].tolist(), res["count"].tolist()))
    assert [g for g in got if g[0] == 50] == [(50, "GB", 3)]
    m10 = [g for g in got if g[0] == 10]
    assert [g[1] for g in m10] == ["CA", "DE", "FR", "GB", "US"] and sum(g[2] for g in m10) == 7  # writer sort
    smid, scode, sorder = res["seq"]
    assert len(sorder) == 10 and sorder[smid == 50].tolist() == [1, 2, 3]
    with pytest.raises(EngineError) as e:  # a multi-site merchant missing from the candidate set
        s3.compute_lanes(cand, np.array([11], np.uint64), np.array([3]), ISO, None, HEAD_TH, None, False)
    assert e.value.code == "ERR_S3_AUTHORITY_MISSING"
    assert isinstance(cand.column("reason_codes").type, pa.ListType)


# ------------------------------------------------------------------------------------------ policy validation


def _mutate(fn):
    doc = ladder_doc()
    fn(doc)
    return doc


@pytest.mark.parametrize("mutate, code", [
    # decision 28: the upstream ladder's long channel names can never match the CP/CNP vocabulary
    (lambda d: d["rules"][0]["predicate"].update(values=["card_present"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["country_sets"].update(CORE=["DE", "XX"]), "ERR_S3_COUNTRY_CODE_INVALID"),
    (lambda d: d["rules"][1].update(deny_countries=["QQ"]), "ERR_S3_COUNTRY_CODE_INVALID"),
    (lambda d: d["rules"][1]["predicate"]["args"][1]["arg"].update(codes=["1234"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][1]["predicate"]["args"][1]["arg"].update(ranges=["1000-1999"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][1]["predicate"]["args"][1]["arg"].update(ranges=["7999-7800"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][1].update(rule_id="RL_ALLOW_A"), "ERR_S3_RULE_LADDER_INVALID"),  # duplicate id
    (lambda d: d["rules"][3]["predicate"].update(set="NOPE"), "ERR_S3_POLICY_REFERENCE_INVALID"),
    (lambda d: d["rules"][0].update(admit_sets=["NOPE"]), "ERR_S3_POLICY_REFERENCE_INVALID"),
    (lambda d: d["rules"][0].update(predicate={"op": "N_GE", "value": 35}), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][0].update(predicate={"op": "EVAL", "expr": "1"}), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][4].update(predicate={"op": "CHANNEL_IN", "values": ["CP"]}), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"].pop(4), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][0]["outcome"].update(tags=["UNKNOWN_TAG"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["rules"][0]["outcome"].update(reason_code="ALLOW_B"), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d["reason_code_to_rule_id"].update(ALLOW_A="RL_GHOST"), "ERR_S3_POLICY_REFERENCE_INVALID"),
    (lambda d: d["reason_code_to_rule_id"].pop("CLASS_C"), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d.update(precedence_order=["DENY", "ALLOW"]), "ERR_S3_RULE_LADDER_INVALID"),
    (lambda d: d.update(filter_tags=["ADMISSIBLE"]), "ERR_S3_RULE_LADDER_INVALID"),  # HOME missing
    (lambda d: d.update(surprise=1), "ERR_S3_RULE_LADDER_INVALID"),
])
def test_rule_ladder_validation_errors(tmp_path, mutate, code):
    p = tmp_path / "policy.s3.rule_ladder.yaml"
    p.write_text(yaml.safe_dump(_mutate(mutate)))
    with pytest.raises(EngineError) as e:
        s3.load_rule_ladder(p, ISO, MCC_VOCAB)
    assert e.value.code == code
    assert e.value.path == str(p)  # the error names the file


def test_rule_ladder_valid_file_loads(tmp_path):
    p = tmp_path / "policy.s3.rule_ladder.yaml"
    p.write_text(yaml.safe_dump(ladder_doc()))
    lad = s3.load_rule_ladder(p, ISO, MCC_VOCAB)
    assert lad.path == str(p) and len(lad.rules) == 5
    # without an MCC vocabulary only the syntax of MCC codes is checked
    d = _mutate(lambda d: d["rules"][1]["predicate"]["args"][1]["arg"].update(codes=["1234"]))
    assert s3.parse_rule_ladder(d, ISO, None)


@pytest.mark.parametrize("dp", [-1, 256, 2.5, True, "7", None])
def test_base_weight_bad_dp(tmp_path, dp):
    doc = copy.deepcopy(HEAD_BW)
    doc["dp"] = dp
    p = tmp_path / "policy.s3.base_weight.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(EngineError) as e:
        s3.load_base_weight(p)
    assert e.value.code == "ERR_S3_WEIGHT_CONFIG" and e.value.path == str(p)


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(extra=1),
    lambda d: d["model"].update(kind="rules"),
    lambda d: d["bounds"].update(w_min=1e-9),  # below 10^-dp: a prior could quantise to 0
    lambda d: d["bounds"].update(w_max=float("nan")),
    lambda d: d["model"]["coeffs"].pop("beta_rank"),
])
def test_base_weight_bad_config(mutate):
    doc = copy.deepcopy(HEAD_BW)
    mutate(doc)
    with pytest.raises(EngineError) as e:
        s3.parse_base_weight(doc)
    assert e.value.code == "ERR_S3_WEIGHT_CONFIG"


def test_thresholds_and_bounds_validation(tmp_path):
    good = {"enabled": True, "home_min": 1, "force_at_least_one_foreign_if_foreign_present": True,
            "min_one_per_country_when_feasible": False, "foreign_cap_mode": "n_minus_home_min", "on_infeasible": "fail"}
    assert s3.parse_thresholds(good).enabled
    for bad in ({**good, "floors": {"GB": 1}}, {**good, "home_min": -1}, {**good, "foreign_cap_mode": "x"},
                {**good, "on_infeasible": "clip"}, {k: v for k, v in good.items() if k != "enabled"}):
        with pytest.raises(EngineError) as e:
            s3.parse_thresholds(bad)
        assert e.value.code == "ERR_S3_POLICY_REFERENCE_INVALID"
    b = s3.parse_bounds({"semver": "1.0.0", "version": "x", "default_upper": 999999, "overrides": {"GB": 5}}, ISO)
    assert b.caps_for(["DE", "GB"]).tolist() == [999999, 5]
    p = tmp_path / "policy.s3.bounds.yaml"
    p.write_text(yaml.safe_dump({"default_upper": 10, "overrides": {"XK": 1}}))
    with pytest.raises(EngineError) as e:
        s3.load_bounds(p, ISO)
    assert e.value.code == "ERR_S3_COUNTRY_CODE_INVALID" and e.value.path == str(p)
    with pytest.raises(EngineError) as e:
        s3.parse_bounds({"default_upper": -3}, ISO)
    assert e.value.code == "ERR_S3_POLICY_REFERENCE_INVALID"


# ------------------------------------------------------------------------------------------ run (files)

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
PH = "a1" * 32
FPX = "f0" * 32
HEAD_THRESH_DOC = {"semver": "1.1.0", "version": "2025-12-31", "enabled": True, "home_min": 1,
                   "force_at_least_one_foreign_if_foreign_present": True, "min_one_per_country_when_feasible": False,
                   "foreign_cap_mode": "n_minus_home_min", "on_infeasible": "fail"}
XB_DOC = {"semver": "1.2.0", "version": "2025-12-31",
          "eligibility": {"rule_set_id": "t", "default_decision": "allow", "rules": []},
          "ztp": {"rule_set_id": "z", "theta_order": ["theta0_intercept", "theta1_log_n_sites", "theta2_openness"],
                  "theta": {"theta0_intercept": -0.45, "theta1_log_n_sites": 0.78, "theta2_openness": 0.90},
                  "feature_x": {"feature_id": "openness", "x_default": 0.25, "x_transform": {"kind": "clamp01"}},
                  "MAX_ZTP_ZERO_ATTEMPTS": 64, "ztp_exhaustion_policy": "downgrade_domestic"}}


def build_run(root, merchants, multi, n_outlets, eligible=None, openness=None, options=None, xb_doc=None, seed=7):
    """A data root with S0 tables and S1/S2 events for tiny fixtures, and its RunContext.

    ``merchants`` = [(merchant_id, home, channel, mcc)]; ``multi`` / ``n_outlets`` / ``eligible`` / ``openness``
    map merchant_id -> value (missing: single-site / eligible / no feature row)."""
    import pyarrow as pa

    from engine.core import publish, rnglog
    from engine.core.context import RunContext, SegmentIds

    root.mkdir(parents=True, exist_ok=True)
    pdir = root / "params"
    pdir.mkdir(exist_ok=True)
    (pdir / "iso.csv").write_text("country_iso\n" + "\n".join(ISO) + "\n")
    files = {"policy.s3.rule_ladder.yaml": ladder_doc(), "policy.s3.base_weight.yaml": HEAD_BW,
             "policy.s3.thresholds.yaml": HEAD_THRESH_DOC,
             "policy.s3.bounds.yaml": {"semver": "1.0.0", "version": "v", "default_upper": 999999, "overrides": {"JP": 1}},
             "crossborder_hyperparams.yaml": xb_doc or XB_DOC}
    for name, doc in files.items():
        (pdir / name).write_text(yaml.safe_dump(doc))
    cfg = {"seed": seed,
           "segment1a": {"inputs": {"iso_table": str(pdir / "iso.csv")},
                         "parameters": {k: str(pdir / k) for k in files},
                         "options": {"s3_priors": False, "s3_integerisation": False, "s3_sequencing": False,
                                     **(options or {})}},
           "segment1b": {"inputs": {}, "parameters": {}, "options": {"basis": "uniform", "dp": 2}}}
    ids = SegmentIds("1A", seed, PH, FPX, "0c" * 16)
    ctx = RunContext(data_root=root, repo_root=REPO, config=cfg, ids=ids)
    mids = np.array([m[0] for m in merchants], np.uint64)
    n = len(merchants)

    def put(ds, cols):
        with publish.staged(ctx.path(ds), "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL") as tmp:
            publish.write_parquet(pa.table(cols), tmp / "part-00000.parquet", sort_by=["merchant_id"])

    put("hurdle_design_matrix", {"merchant_id": pa.array(mids, pa.uint64()), "mcc": [m[3] for m in merchants],
                                 "channel": [m[2] for m in merchants], "home_country_iso": [m[1] for m in merchants],
                                 "parameter_hash": [PH] * n})
    put("crossborder_eligibility_flags", {"merchant_id": pa.array(mids, pa.uint64()),
                                          "is_eligible": [bool((eligible or {}).get(int(m), True)) for m in mids],
                                          "parameter_hash": [PH] * n})
    if openness is not None:
        ks = sorted(openness)
        put("crossborder_features", {"merchant_id": pa.array(np.array(ks, np.uint64), pa.uint64()),
                                     "openness": pa.array([openness[k] for k in ks], pa.float32()),
                                     "parameter_hash": [PH] * len(ks)})
    logs = rnglog.RngLogs(root, "1A", ids, cfg)
    logs.write_audit(build_commit="ab" * 32)
    order = np.argsort(mids)
    z = np.zeros(n, np.uint64)
    is_multi = np.array([bool(multi.get(int(m), False)) for m in mids[order]])
    logs.add_events("hurdle_bernoulli", "1A.hurdle_sampler", "hurdle_bernoulli", {
        "merchant_id": mids[order], "before_hi": z, "before_lo": z, "after_hi": z, "after_lo": z, "blocks": z, "draws": z,
        "pi": is_multi.astype(float), "is_multi": is_multi, "deterministic": np.ones(n, bool), "u": [None] * n})
    mm = np.sort(mids[order][is_multi])
    zz = np.zeros(mm.size, np.uint64)
    if mm.size:
        logs.add_events("nb_final", "1A.nb_sampler", "nb_final", {
            "merchant_id": mm, "before_hi": zz, "before_lo": zz, "after_hi": zz, "after_lo": zz, "blocks": zz,
            "draws": zz, "mu": np.full(mm.size, 5.0), "dispersion_k": np.full(mm.size, 2.0),
            "n_outlets": np.array([n_outlets[int(m)] for m in mm], np.int64), "nb_rejections": np.zeros(mm.size, np.int64)})
    logs.close()
    return ctx


FIX_MERCHANTS = [(10, "GB", "CP", 5411), (40, "GB", "CP", 5812), (50, "GB", "CNP", 5411), (30, "IR", "CP", 5411),
                 (2**64 - 1, "DE", "CP", 5812), (60, "FR", "CP", 6011)]


def test_run_candidates_and_lanes_publish(tmp_path):
    from engine.core import publish
    from engine.core.schema import validate_table

    ctx = build_run(tmp_path / "run", FIX_MERCHANTS, {10: True, 30: True, 2**64 - 1: True, 60: True},
                    {10: 7, 30: 4, 2**64 - 1: 2, 60: 3},
                    options={"s3_priors": True, "s3_integerisation": True, "s3_sequencing": True})
    s3.run_candidates(ctx)
    cand_dir = ctx.path("s3_candidate_set")
    assert "fingerprint=" + FPX in str(cand_dir) and "seed=" not in str(cand_dir)  # decision 13
    cand = publish.read_parquet_dir(cand_dir)
    assert validate_table(cand, s3._schema_path(ctx, "s3_candidate_set")) == []
    # single-site merchants (40, 50) have rows too: the set is seed-independent
    assert sorted(set(cand["merchant_id"].to_pylist())) == sorted(m[0] for m in FIX_MERCHANTS)
    assert cand["merchant_id"].to_pylist()[-1] == 2**64 - 1  # uint64 sort, no signed wrap
    bytes1 = (cand_dir / "part-00000.parquet").read_bytes()
    assert (cand_dir / "_manifest.json").exists()
    s3.run_candidates(ctx)  # identical re-run: a no-op, same bytes
    assert (cand_dir / "part-00000.parquet").read_bytes() == bytes1

    s3.run_lanes(ctx)
    counts = publish.read_parquet_dir(ctx.path("s3_integerised_counts"))
    assert "seed=7" in str(ctx.path("s3_integerised_counts"))
    assert validate_table(counts, s3._schema_path(ctx, "s3_integerised_counts")) == []
    got = {}
    for r in counts.to_pylist():
        got.setdefault(r["merchant_id"], {})[r["country_iso"]] = r["count"]
    assert set(got) == {10, 30, 60, 2**64 - 1}  # multi-site merchants only
    assert {m: sum(v.values()) for m, v in got.items()} == {10: 7, 30: 4, 60: 3, 2**64 - 1: 2}
    assert got[30] == {"IR": 4}  # DENY: home only
    assert got[2**64 - 1]["DE"] == 1  # N = 2, home_min 1 + force-foreign
    assert counts["country_iso"].to_pylist()[:5] == sorted(got[10])  # writer sort (merchant_id, country_iso)
    seq = publish.read_parquet_dir(ctx.path("s3_site_sequence"))
    assert validate_table(seq, s3._schema_path(ctx, "s3_site_sequence")) == []
    assert seq.num_rows == 7 + 4 + 3 + 2
    assert [r["site_id"] for r in seq.to_pylist() if r["merchant_id"] == 30] == ["000001", "000002", "000003", "000004"]
    pri = publish.read_parquet_dir(ctx.path("s3_base_weight_priors"))
    assert set(pri["dp"].to_pylist()) == {7} and pri.num_rows == cand.num_rows


def test_run_sequencing_requires_integerisation(tmp_path):
    ctx = build_run(tmp_path / "run", FIX_MERCHANTS[:1], {10: True}, {10: 3}, options={"s3_sequencing": True})
    with pytest.raises(EngineError) as e:
        s3.run_candidates(ctx)
    assert e.value.code == "ERR_S3_PRECONDITION"


def test_published_priors_parse_back_to_recomputed_weights(tmp_path):
    """run_lanes recomputes w⋄ from the sealed policy instead of joining the priors table: the published
    strings must parse back to exactly those floats."""
    from engine.core import publish

    ctx = build_run(tmp_path / "run", FIX_MERCHANTS, {10: True}, {10: 5}, options={"s3_priors": True})
    s3.run_candidates(ctx)
    pri = publish.read_parquet_dir(ctx.path("s3_base_weight_priors")).to_pylist()
    cand = {(r["merchant_id"], r["country_iso"]): r for r in publish.read_parquet_dir(ctx.path("s3_candidate_set")).to_pylist()}
    bw = s3.load_base_weight(ctx.config["segment1a"]["parameters"]["policy.s3.base_weight.yaml"])
    for r in pri:
        c = cand[(r["merchant_id"], r["country_iso"])]
        w, txt = s3.prior_value(bw, c["is_home"], c["candidate_rank"])
        assert float(r["base_weight_dp"]) == w and r["base_weight_dp"] == txt
    assert [(r["merchant_id"], r["country_iso"]) for r in pri] == sorted(cand)  # writer sort

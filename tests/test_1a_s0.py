"""1A S0 (foundations): ingress validation, design layout, eligibility, openness, numeric self-tests, publishing.

Spec: 00-core 6.2, 7; decisions 4, 5, 11, 12, 13, 15, 23, 28. Tiny fixtures are built here; ``make_case`` is
also used by ``test_1a_s1_s2.py``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engine.core.errors import EngineError
from engine.segment1a import inputs as inp
from engine.segment1a import s0_foundations as s0

REPO = Path(__file__).resolve().parents[1]
U64_MAX = 2**64 - 1

# ---------------------------------------------------------------------------------------------- fixture

DICT_MCC = [3000, 5411, 5812, 6011]
# hurdle beta: [b0 | mcc 3000, 5411, 5812, 6011 | CP, CNP | bucket 1..5]
BETA = [-1.0, 0.5, -0.25, 0.75, 1.5, 0.125, -0.375, -0.5, -0.25, 0.0, 0.25, 0.5]
BETA_MU = [0.5, 0.25, -0.125, 0.375, 0.0625, 0.1, 0.2]
BETA_PHI = [1.0, 0.2, -0.1, 0.3, 0.05, 0.4, 0.1, 0.15]

MERCHANTS = [  # merchant_id, mcc, channel, home
    ("1", "5411", "card_present", "GB"),
    (str(U64_MAX), "6011", "card_not_present", "NA"),  # u64 max and Namibia (decision 12)
    ("9223372036854775808", "3000", "card_not_present", "FR"),  # 2^63: not representable as int64
    ("42", "5812", "card_present", "DE"),
    ("7", "5411", "card_not_present", "US"),
    ("8", "6011", "card_present", "FR"),
]
ISO = ["DE", "FR", "GB", "NA", "US"]
GDP = {"DE": 48000.0, "FR": 40000.0, "GB": 45000.0, "NA": 4800.5, "US": 65000.0}
BUCKET = {"DE": 4, "FR": 4, "GB": 4, "NA": 1, "US": 5}


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> Path:
    path.write_text(",".join(header) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def hurdle_doc() -> dict:
    return {"semver": "1.0.0", "version": "test", "metadata": {"simulation_manifest": "test"},
            "dict_mcc": list(DICT_MCC), "dict_ch": ["CP", "CNP"], "dict_dev5": [1, 2, 3, 4, 5],
            "design": {"beta_order": ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])",
                                      "gdp_bucket_onehot([1,2,3,4,5])"]},
            "beta": list(BETA), "beta_mu": list(BETA_MU)}


def dispersion_doc() -> dict:  # runbook-era layout on purpose (both layouts are accepted, 1A-S1-S4 C7)
    return {"semver": "0.1.0", "version": "test", "dicts": {"mcc": list(DICT_MCC), "channel": ["CP", "CNP"]},
            "design_order": {"intercept": True, "mcc_one_hot": True, "channel_block": True,
                             "ln_gdp_pc_usd_2015": True},
            "beta_phi": list(BETA_PHI)}


def crossborder_doc() -> dict:
    return {
        "semver": "0.1.0", "version": "test",
        "eligibility": {
            "rule_set_id": "test_rules",
            "default_decision": "deny",
            "rules": [
                # allow FR at the best priority: a matching deny must still win (00-core 7.5)
                {"id": "allow_fr", "priority": 1, "decision": "allow", "mcc": ["*"], "channel": ["CP", "CNP"],
                 "iso": ["FR"]},
                {"id": "deny_travel_cnp", "priority": 20, "decision": "deny", "mcc": ["3000-3999", 5812],
                 "channel": ["CNP"], "iso": "*"},
                {"id": "deny_atm_cnp", "priority": 10, "decision": "deny", "mcc": ["6011"], "channel": ["CNP"],
                 "iso": ["*"]},
                {"id": "allow_cp", "priority": 50, "decision": "allow", "mcc": "*", "channel": ["CP"], "iso": "*"},
            ],
        },
        "ztp_link": {"theta0": -1.1, "theta1": 0.75, "theta2": 0.6},
        "ztp_controls": {"MAX_ZTP_ZERO_ATTEMPTS": 64, "ztp_exhaustion_policy": "abort"},
        "X_default": 0.2,
    }


def make_case(tmp: Path, *, merchants=None, iso=None, gdp=None, bucket=None, hurdle=None, dispersion=None,
              crossborder=None, options=None, merchant_parquet: pa.Table | None = None, raw: dict | None = None) -> dict:
    """Write a tiny, complete 1A input set under ``tmp/in`` and return a config (absolute paths)."""
    d = tmp / "in"
    d.mkdir(parents=True, exist_ok=True)
    if merchant_parquet is not None:
        mpath = d / "merchants.parquet"
        pq.write_table(merchant_parquet, mpath)
    else:
        mpath = _write_csv(d / "merchants.csv", ["merchant_id", "mcc", "channel", "home_country_iso"],
                           MERCHANTS if merchants is None else merchants)
    iso_rows = [(c, f"{c}X", f"Country {c}") for c in (ISO if iso is None else iso)]
    _write_csv(d / "iso.csv", ["country_iso", "alpha3", "name"], iso_rows)
    g = GDP if gdp is None else gdp
    _write_csv(d / "gdp.csv", ["country_iso", "observation_year", "gdp_pc_usd_2015"],
               [(c, 2024, repr(v)) for c, v in g.items()] + [("GB", 2023, "1.0")])  # other years are ignored
    b = BUCKET if bucket is None else bucket
    _write_csv(d / "bucket.csv", ["country_iso", "bucket_id"], list(b.items()))
    docs = {"hurdle_coefficients.yaml": hurdle_doc() if hurdle is None else hurdle,
            "nb_dispersion_coefficients.yaml": dispersion_doc() if dispersion is None else dispersion,
            "crossborder_hyperparams.yaml": crossborder_doc() if crossborder is None else crossborder}
    params = {}
    for name in yaml.safe_load((REPO / "config.yaml").read_text())["segment1a"]["parameters"]:
        p = d / name
        if name in docs:
            p.write_text(yaml.safe_dump(docs[name], sort_keys=False))
        else:
            p.write_text(f"# placeholder for {name}; S0 only hashes it\n")
        params[name] = str(p)
    for name, text in (raw or {}).items():
        Path(params[name]).write_text(text)
    (d / "numeric_policy.json").write_text(json.dumps({"version": "test", "fma_allowed": False}))
    (d / "math_profile.json").write_text(json.dumps({"math_profile_id": "test-profile", "functions": ["exp", "log"]}))
    base = yaml.safe_load((REPO / "config.yaml").read_text())
    return {
        "seed": 9248923,
        "segment1a": {
            "inputs": {"merchant_table": str(mpath), "iso_table": str(d / "iso.csv"), "gdp_table": str(d / "gdp.csv"),
                       "bucket_table": str(d / "bucket.csv"), "numeric_policy": str(d / "numeric_policy.json"),
                       "math_profile": str(d / "math_profile.json")},
            "parameters": params,
            "options": dict(options or {"s3_priors": False, "s3_integerisation": False, "s3_sequencing": False,
                                        "drop_unplaceable_merchants": False}),
        },
        "segment1b": base["segment1b"],
    }


def make_ctx(cfg: dict, data_root: Path, ids=None):
    from engine.core import identities
    from engine.core.context import RunContext

    if ids is None:
        ids = identities.resolve_1a(cfg, REPO, None).ids
    return RunContext(data_root=data_root, repo_root=REPO, config=cfg, ids=ids)


def data_files(root: Path) -> dict[str, bytes]:
    base = root / "data"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()} \
        if base.exists() else {}


def compute(cfg: dict) -> s0.S0Outputs:
    return s0.compute_s0(s0.load_s0_inputs(cfg), "a" * 64, "b" * 64)


# ---------------------------------------------------------------------------------------------- ingress


def test_merchant_table_csv_normalised(tmp_path):
    cfg = make_case(tmp_path)
    m = inp.load_merchant_table(cfg["segment1a"]["inputs"]["merchant_table"])
    assert m.schema.field("merchant_id").type == pa.uint64()
    # unsigned ascending order; ids above 2^63-1 kept exactly
    assert m.column("merchant_id").to_pylist() == [1, 7, 8, 42, 2**63, U64_MAX]
    assert m.column("channel").to_pylist() == ["CP", "CNP", "CP", "CP", "CNP", "CNP"]
    assert m.column("home_country_iso").to_pylist() == ["GB", "US", "FR", "DE", "FR", "NA"]  # "NA" is not null
    assert m.column("mcc").type == pa.int32()


def test_merchant_table_parquet_uint64(tmp_path):
    t = pa.table({"merchant_id": pa.array([U64_MAX, 5], pa.uint64()), "mcc": pa.array([5411, 3000], pa.int16()),
                  "channel": ["card_present", "CNP"], "home_country_iso": ["NA", "FR"]})
    cfg = make_case(tmp_path, merchant_parquet=t)
    m = inp.load_merchant_table(cfg["segment1a"]["inputs"]["merchant_table"])
    assert m.column("merchant_id").to_pylist() == [5, U64_MAX]
    assert m.column("channel").to_pylist() == ["CNP", "CP"]
    sorted_in = t.take(pa.array([1, 0]))  # already ascending input keeps its rows
    p = tmp_path / "sorted.parquet"
    pq.write_table(sorted_in, p)
    assert inp.load_merchant_table(p).to_pylist() == m.to_pylist()


def test_ingress_schema_matches_loader():
    sch = inp.ingress_schema()
    assert sch["required"] == ["merchant_id", "mcc", "channel", "home_country_iso"]
    assert sch["properties"]["merchant_id"]["x-arrow"] == "uint64"
    assert sch["properties"]["merchant_id"]["maximum"] == U64_MAX


BAD_INGRESS = [
    ("missing column", ["merchant_id", "mcc", "channel"], [("1", "5411", "card_present")], "E_INGRESS_SCHEMA", "home_country_iso"),
    ("extra column", ["merchant_id", "mcc", "channel", "home_country_iso", "colour"],
     [("1", "5411", "card_present", "GB", "red")], "E_INGRESS_SCHEMA", "colour"),
    ("unparsable id", None, [("12a", "5411", "card_present", "GB")], "E_INGRESS_SCHEMA", "12a"),
    ("id above u64", None, [("18446744073709551616", "5411", "card_present", "GB")], "E_INGRESS_SCHEMA",
     "18446744073709551616"),
    ("negative id", None, [("-3", "5411", "card_present", "GB")], "E_INGRESS_SCHEMA", "-3"),
    ("zero id", None, [("0", "5411", "card_present", "GB")], "E_INGRESS_SCHEMA", "row 0"),
    ("non-integer mcc", None, [("1", "54.1", "card_present", "GB")], "E_INGRESS_SCHEMA", "54.1"),
    ("mcc out of domain", None, [("1", "10000", "card_present", "GB")], "E_MCC_OUT_OF_DOMAIN", "mcc=10000"),
    ("channel", None, [("1", "5411", "card_present", "GB"), ("2", "5411", "online", "GB")], "E_CHANNEL_VALUE",
     "online"),
    ("lower-case iso", None, [("1", "5411", "card_present", "gb")], "E_INGRESS_SCHEMA", "'gb'"),
    ("empty iso", None, [("1", "5411", "card_present", "")], "E_INGRESS_SCHEMA", "home_country_iso=''"),
    ("duplicate id", None, [("5", "5411", "card_present", "GB"), ("5", "5812", "card_present", "FR")],
     "E_INGRESS_PK_DUPLICATE", "merchant_id=5"),
]


@pytest.mark.parametrize("name,header,rows,code,needle", BAD_INGRESS, ids=[b[0] for b in BAD_INGRESS])
def test_ingress_errors(tmp_path, name, header, rows, code, needle):
    p = _write_csv(tmp_path / "m.csv", header or ["merchant_id", "mcc", "channel", "home_country_iso"], rows)
    with pytest.raises(EngineError) as ei:
        inp.load_merchant_table(p)
    e = ei.value
    assert e.code == code
    assert e.path == str(p)
    assert needle in str(e)


def test_ingress_empty_table(tmp_path):
    p = _write_csv(tmp_path / "m.csv", ["merchant_id", "mcc", "channel", "home_country_iso"], [])
    with pytest.raises(EngineError) as ei:
        inp.load_merchant_table(p)
    assert ei.value.code == "E_INGRESS_SCHEMA"


def test_ingress_parquet_signed_negative(tmp_path):
    t = pa.table({"merchant_id": pa.array([3, -1], pa.int64()), "mcc": pa.array([5411, 5411], pa.int32()),
                  "channel": ["CP", "CP"], "home_country_iso": ["GB", "GB"]})
    p = tmp_path / "m.parquet"
    pq.write_table(t, p)
    with pytest.raises(EngineError) as ei:
        inp.load_merchant_table(p)
    assert ei.value.code == "E_INGRESS_SCHEMA" and "row 1" in str(ei.value)


def test_fk_home_iso_reject_or_drop(tmp_path):
    rows = MERCHANTS + [("99", "5411", "card_present", "EU"), ("100", "5812", "card_present", "EU")]
    cfg = make_case(tmp_path, merchants=rows)
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_FK_HOME_ISO"
    assert "EU" in ei.value.message and ei.value.detail["countries"] == {"EU": 2}
    cfg["segment1a"]["options"]["drop_unplaceable_merchants"] = True
    out = compute(cfg)
    assert out.counts["merchants_ingress"] == 8
    assert out.counts["merchants_in_run"] == 6
    assert out.counts["merchants_dropped_unplaceable"] == 2
    assert out.counts["dropped_by_home_country"] == {"EU": 2}
    assert out.abort_log.column("merchant_id").to_pylist() == [99, 100]
    assert set(out.abort_log.column("reason").to_pylist()) == {"home_country_not_in_iso_table"}
    assert 99 not in out.design.column("merchant_id").to_pylist()


# ---------------------------------------------------------------------------------------------- reference tables


def test_gdp_and_bucket_errors(tmp_path):
    cfg = make_case(tmp_path, gdp={k: v for k, v in GDP.items() if k != "US"})
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_GDP_MISSING" and "US" in ei.value.message and "merchant_id=7" in str(ei.value)

    cfg = make_case(tmp_path / "b", gdp={**GDP, "FR": 0.0})
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_GDP_NONPOS"

    cfg = make_case(tmp_path / "c", bucket={**BUCKET, "DE": 6})
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_BUCKET_RANGE"

    cfg = make_case(tmp_path / "d", bucket={k: v for k, v in BUCKET.items() if k != "GB"})
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_BUCKET_MISSING"


# ---------------------------------------------------------------------------------------------- design


def test_design_layout_against_dictionaries(tmp_path):
    cfg = make_case(tmp_path)
    si = s0.load_s0_inputs(cfg)
    out = s0.compute_s0(si, "a" * 64, "b" * 64)
    names = s0.design_column_names(si.hurdle)
    assert names["hurdle"] == ["intercept", "mcc_3000", "mcc_5411", "mcc_5812", "mcc_6011", "ch_CP", "ch_CNP",
                               "gdp_bucket_1", "gdp_bucket_2", "gdp_bucket_3", "gdp_bucket_4", "gdp_bucket_5"]
    assert names["nb_mean"] == names["hurdle"][:7]
    assert names["nb_dispersion"] == names["hurdle"][:7] + ["ln_gdp_pc_usd_2015"]
    assert len(names["hurdle"]) == si.hurdle.beta.size and len(names["nb_dispersion"]) == si.dispersion.beta_phi.size

    d = out.design.to_pylist()
    assert [r["merchant_id"] for r in d] == [1, 7, 8, 42, 2**63, U64_MAX]
    X = s0.design_vectors(4, out.mcc_idx, out.ch_idx, out.bucket, out.ln_g)
    for i, r in enumerate(d):
        xh = X["hurdle"][i]
        on = [names["hurdle"][j] for j in np.flatnonzero(xh)]
        ch = {"CP": "ch_CP", "CNP": "ch_CNP"}[r["channel"]]
        assert on == ["intercept", f"mcc_{r['mcc']}", ch, f"gdp_bucket_{BUCKET[r['home_country_iso']]}"]
        assert r["gdp_bucket_id"] == BUCKET[r["home_country_iso"]]
        assert r["gdp_pc_usd_2015"] == GDP[r["home_country_iso"]]
        assert r["log_gdp_pc_usd_2015"] == math.log(GDP[r["home_country_iso"]])
        assert X["nb_dispersion"][i][-1] == math.log(GDP[r["home_country_iso"]])
        assert np.array_equal(X["nb_mean"][i], xh[:7])
        # the sparse 4-term Neumaier equals the full fixed-order dot product over every column, bit for bit
        full = s0.neumaier_scalar(b * x for b, x in zip(BETA, xh))
        assert out.eta[i] == full
        assert out.eta[i] == s0.neumaier_scalar([BETA[0], BETA[1 + DICT_MCC.index(r["mcc"])],
                                                 BETA[5 + ("CP", "CNP").index(r["channel"])],
                                                 BETA[7 + r["gdp_bucket_id"] - 1]])
        assert out.pi_f64[i] == s0.logistic(full)
    pit = out.pi.to_pylist()
    assert [r["logit"] for r in pit] == out.eta.tolist()
    assert [r["pi"] for r in pit] == [float(np.float32(p)) for p in out.pi_f64]
    assert set(out.design.column("parameter_hash").to_pylist()) == {"a" * 64}
    assert set(out.design.column("produced_by_fingerprint").to_pylist()) == {"b" * 64}


def test_unknown_mcc(tmp_path):
    cfg = make_case(tmp_path, merchants=MERCHANTS + [("77", "7995", "card_present", "GB")])
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_DSGN_UNKNOWN_MCC" and "merchant_id=77 mcc=7995" in str(ei.value)


def test_shape_mismatch_and_malformed_yaml(tmp_path):
    h = hurdle_doc()
    h["beta"] = h["beta"][:-1]
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path / "a", hurdle=h))
    assert ei.value.code == "E_DSGN_SHAPE_MISMATCH" and ei.value.path.endswith("hurdle_coefficients.yaml")

    d = dispersion_doc()
    d["dicts"]["mcc"] = [3000, 5411, 6011, 5812]  # same codes, different order
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path / "b", dispersion=d))
    assert ei.value.code == "E_DSGN_SHAPE_MISMATCH" and "position 2" in str(ei.value)

    d = dispersion_doc()
    d["beta_phi"] = d["beta_phi"] + [0.0]
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path / "c", dispersion=d))
    assert ei.value.code == "E_DSGN_SHAPE_MISMATCH"

    h = hurdle_doc()
    h["dict_ch"] = ["card_present", "card_not_present"]
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path / "d", hurdle=h))
    assert ei.value.code == "E_DSGN_SHAPE_MISMATCH"

    cfg = make_case(tmp_path / "e", raw={"hurdle_coefficients.yaml": "beta: [1, 2\ndict_mcc: {"})
    with pytest.raises(EngineError) as ei:
        compute(cfg)
    assert ei.value.code == "E_POLICY_INVALID"

    h = hurdle_doc()
    h["beta"][3] = "abc"
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path / "f", hurdle=h))
    assert ei.value.code == "E_POLICY_INVALID" and "beta[3]" in str(ei.value)


def test_hurdle_saturation_and_nonfinite():
    # pi == 1.0 exactly from eta ~ 36.8 upwards; pi == 0.0 only below ~ -745 (1A-S1-S4 1.3)
    assert s0.logistic(36.0) < 1.0 and s0.logistic(37.0) == 1.0
    assert 0.0 < s0.logistic(-40.0) < 1e-17 and s0.logistic(-746.0) == 0.0
    hc = inp.HurdleCoefficients(np.array([1000, 2000], np.int32), ("CP", "CNP"), (1, 2, 3, 4, 5),
                                np.array([1e308, 1e308, 0, 0, 0, 0, 0, 0, 0, 0], float), np.zeros(5), "h.yaml")
    with pytest.raises(EngineError) as ei:
        s0.hurdle_eta_pi(hc, np.array([1, 0]), np.array([0, 0]), np.array([1, 1]), merchant_id=np.array([5, 6]))
    assert ei.value.code == "E_PI_NAN_OR_INF" and ei.value.rows == ["merchant_id=6"]


def test_neumaier_is_not_kahan_or_pairwise():
    xs = [1.0, 1e100, 1.0, -1e100]
    assert s0.neumaier_scalar(xs) == 2.0
    assert sum(xs) == 0.0
    rng = np.random.default_rng(5)
    terms = [rng.normal(size=200) * 10.0 ** rng.integers(-8, 8, size=200) for _ in range(4)]
    vec = s0.neumaier_rows(terms)
    assert [s0.neumaier_scalar(t[i] for t in terms) for i in range(200)] == vec.tolist()


# ---------------------------------------------------------------------------------------------- eligibility / openness


def test_eligibility_deny_beats_allow(tmp_path):
    out = compute(make_case(tmp_path))
    got = {r["merchant_id"]: (r["is_eligible"], r["reason"]) for r in out.flags.to_pylist()}
    assert got == {
        1: (True, "allow_cp"),                    # GB CP
        7: (False, "default_deny"),               # US CNP 5411: no rule matches
        8: (True, "allow_fr"),                    # FR CP: best allow by priority (1 < 50)
        42: (True, "allow_cp"),
        2**63: (False, "deny_travel_cnp"),        # FR CNP 3000: deny beats the priority-1 allow
        U64_MAX: (False, "deny_atm_cnp"),         # NA CNP 6011: best deny by priority (10 < 20)
    }
    assert set(out.flags.column("rule_set").to_pylist()) == {"test_rules"}


@pytest.mark.parametrize("mutate,code", [
    (lambda d: d["eligibility"]["rules"][0].__setitem__("channel", ["card_present"]), "E_ELIG_RULE_BAD_CHANNEL"),
    (lambda d: d["eligibility"]["rules"][0].__setitem__("iso", ["XK"]), "E_ELIG_RULE_BAD_ISO"),
    (lambda d: d["eligibility"]["rules"][2].__setitem__("mcc", ["6012"]), "E_ELIG_RULE_BAD_MCC"),
    (lambda d: d["eligibility"]["rules"][2].__setitem__("mcc", ["7000-7999"]), "E_ELIG_RULE_BAD_MCC"),
    (lambda d: d["eligibility"]["rules"][2].__setitem__("mcc", ["60x1"]), "E_ELIG_RULE_BAD_MCC"),
    (lambda d: d["eligibility"]["rules"][1].__setitem__("id", "allow_fr"), "E_ELIG_RULE_DUP_ID"),
    (lambda d: d["eligibility"].__setitem__("rule_set_id", ""), "E_ELIG_RULESET_ID_EMPTY"),
    (lambda d: d["eligibility"].__setitem__("default_decision", "maybe"), "E_ELIG_DEFAULT_INVALID"),
    (lambda d: d.__setitem__("ztp_controls", {"ztp_exhaustion_policy": "explode"}), "E_POLICY_INVALID"),
], ids=["channel", "iso", "mcc-code", "mcc-range", "mcc-syntax", "dup-id", "ruleset", "default", "ztp"])
def test_eligibility_policy_errors(tmp_path, mutate, code):
    doc = crossborder_doc()
    mutate(doc)
    with pytest.raises(EngineError) as ei:
        compute(make_case(tmp_path, crossborder=doc))
    assert ei.value.code == code
    assert ei.value.path.endswith("crossborder_hyperparams.yaml")


def test_crossborder_ztp_layouts_normalised(tmp_path):
    cfg = make_case(tmp_path)
    cb = inp.load_crossborder_hyperparams(cfg["segment1a"]["parameters"]["crossborder_hyperparams.yaml"])
    assert cb.ztp["theta_order"] == ["theta0_intercept", "theta1_log_n_sites", "theta2_openness"]
    assert cb.ztp["theta"] == {"theta0_intercept": -1.1, "theta1_log_n_sites": 0.75, "theta2_openness": 0.6}
    assert cb.ztp["x_default"] == 0.2 and cb.ztp["max_zero_attempts"] == 64
    assert cb.ztp["exhaustion_policy"] == "abort"
    emb = inp.load_crossborder_hyperparams(REPO / "config/policy/crossborder_hyperparams.yaml")
    assert emb.ztp["theta_order"] == cb.ztp["theta_order"]


def test_openness_heuristic():
    p = inp.OpennessParams()
    bucket = np.array([5, 1, 3, 2, 4, 5])
    ch = np.array([0, 0, 1, 1, 0, 1])  # CP, CP, CNP, CNP, CP, CNP
    mcc = np.array([5074, 4829, 3001, 5816, 4111, 9999])
    got = s0.openness(p, bucket, ch, mcc)
    want = [(0.35 + -0.04) + 0.03,   # retail
            (0.06 + -0.04) + 0.10,   # digital 4810-4899
            (0.20 + 0.08) + 0.06,    # travel range
            (0.12 + 0.08) + 0.10,    # digital 5815-5818 (before retail)
            (0.28 + -0.04) + 0.06,   # travel code
            (0.35 + 0.08) + 0.0]
    assert got.dtype == np.float32
    assert got.tolist() == [float(np.float32(w)) for w in want]
    assert s0.openness(inp.OpennessParams(base=(0.0,) * 5, channel_delta=(-0.5, 2.0)), np.array([1, 1]),
                       np.array([0, 1]), np.array([1, 1])).tolist() == [0.0, 1.0]  # clamp01


def test_numeric_self_tests_pass():
    res = s0.numeric_self_tests()
    assert res == {k: True for k in res} and "passed" in res
    s0.check_numeric(res)
    with pytest.raises(EngineError) as ei:
        s0.check_numeric({**res, "fma_off_ok": False, "passed": False})
    assert ei.value.code == "E_NUM_FMA_ON"


# ---------------------------------------------------------------------------------------------- run / publish


def test_run_publishes_everything_byte_stable(tmp_path):
    from engine.core import publish, rnglog

    cfg = make_case(tmp_path)
    root = tmp_path / "root"
    ctx = make_ctx(cfg, root)
    s0.run(ctx)
    assert not (root / "logs").exists()  # the seed-scoped logs are the anchor step's
    s0.run_rng_anchor(ctx)
    files = data_files(root)
    fp, ph = ctx.ids.manifest_fingerprint, ctx.ids.parameter_hash
    for ds in ("hurdle_design_matrix", "hurdle_pi_probs", "crossborder_eligibility_flags", "crossborder_features",
               "merchant_abort_log"):
        p = ctx.path(ds)
        assert (p / "part-00000.parquet").is_file(), ds
        assert f"parameter_hash={ph}" in str(p) and f"fingerprint={fp}" in str(p)
        t = publish.read_parquet_dir(p)
        assert t.num_rows == (0 if ds == "merchant_abort_log" else 6)
    rc = ctx.path("s0_gate_receipt_1A")
    assert "parameter_hash=" not in str(rc) and "seed=" not in str(rc)
    assert sorted(p.name for p in rc.iterdir()) == sorted(("s0_gate_receipt.json",) + s0.LINEAGE_FILES)
    receipt = json.loads((rc / "s0_gate_receipt.json").read_text())
    assert receipt["manifest_fingerprint"] == fp and receipt["parameter_hash"] == ph
    assert receipt["merchants"]["merchants_in_run"] == 6
    ph_res = json.loads((rc / "parameter_hash_resolved.json").read_text())
    assert ph_res["parameter_hash"] == ph and "options.1A.json" in ph_res["filenames_sorted"]
    sealed = json.loads((ctx.path("sealed_inputs_1A") / "sealed_inputs_1A.json").read_text())
    ids = [r["asset_id"] for r in sealed]
    assert ids == sorted(ids) and "merchant_table" in ids and "hurdle_coefficients.yaml" in ids
    # decisions 4/5/15: no time, host or filesystem location anywhere under data/
    blob = b"".join(v for k, v in files.items() if k.endswith((".json", ".jsonl")))
    for bad in (str(tmp_path).encode(), b"ts_utc", b"created_utc", b"hostname", b"platform", b"mtime_ns"):
        assert bad not in blob
    attest = json.loads((rc / "numeric_policy_attest.json").read_text())
    assert attest["passed"] is True and attest["math_profile_id"] == "test-profile"
    # RNG: audit row and a non-consuming anchor, and nothing else
    anchor = rnglog.read_events(root, ctx.ids, "anchor").to_pylist()
    assert len(anchor) == 1
    a = anchor[0]
    assert (a["module"], a["substream_label"], a["blocks"], a["draws"]) == ("1A.s0", "s0.anchor", 0, "0")
    assert a["rng_counter_before_lo"] == a["rng_counter_after_lo"] and a["rng_counter_before_hi"] == a["rng_counter_after_hi"]
    assert ctx.path("rng_audit_log").is_file()
    assert rnglog.read_audit(root, ctx.ids)[0]["build_commit"] == receipt["code_digest"]
    # re-run: byte-identical no-op; the anchor step is idempotent (one audit row, one anchor)
    s0.run(ctx)
    s0.run_rng_anchor(ctx)
    assert data_files(root) == files
    assert len(rnglog.read_audit(root, ctx.ids)) == 1 and rnglog.read_events(root, ctx.ids, "anchor").num_rows == 1
    assert rnglog.reconcile(root, ctx.ids) == []


def test_run_drop_option_counts_in_receipt(tmp_path):
    from engine.core import publish

    cfg = make_case(tmp_path, merchants=MERCHANTS + [("99", "5411", "card_present", "EU")],
                    options={"drop_unplaceable_merchants": True})
    root = tmp_path / "root"
    ctx = make_ctx(cfg, root)
    s0.run(ctx)
    receipt = json.loads((ctx.path("s0_gate_receipt_1A") / "s0_gate_receipt.json").read_text())
    assert receipt["merchants"]["merchants_dropped_unplaceable"] == 1
    assert receipt["merchants"]["dropped_by_home_country"] == {"EU": 1}
    assert receipt["options"]["drop_unplaceable_merchants"] is True
    log = publish.read_parquet_dir(ctx.path("merchant_abort_log")).to_pylist()
    assert [(r["merchant_id"], r["state"], r["module"]) for r in log] == [(99, "S0", "1A.s0")]
    assert inp.load_merchants(ctx).num_rows == 6  # later states see the S0 universe


FAILING_RUNS = [
    ("E_INGRESS_PK_DUPLICATE", dict(merchants=MERCHANTS + [("42", "5411", "card_present", "GB")])),
    ("E_INGRESS_SCHEMA", dict(merchants=[("x1", "5411", "card_present", "GB")])),
    ("E_CHANNEL_VALUE", dict(merchants=[("1", "5411", "web", "GB")])),
    ("E_MCC_OUT_OF_DOMAIN", dict(merchants=[("1", "12345", "card_present", "GB")])),
    ("E_DSGN_UNKNOWN_MCC", dict(merchants=[("1", "1234", "card_present", "GB")])),
    ("E_FK_HOME_ISO", dict(merchants=[("1", "5411", "card_present", "ZZ")])),
    ("E_DSGN_SHAPE_MISMATCH", dict(hurdle={**hurdle_doc(), "beta_mu": BETA_MU[:-1]})),
    ("E_POLICY_INVALID", dict(raw={"nb_dispersion_coefficients.yaml": "beta_phi: [1.0,\n  - oops"})),
    ("E_ELIG_RULE_BAD_CHANNEL", dict(crossborder={**crossborder_doc(), "eligibility": {
        **crossborder_doc()["eligibility"], "rules": [{"id": "r", "priority": 1, "decision": "deny", "mcc": "*",
                                                      "channel": ["card_not_present"], "iso": "*"}]}})),
]


@pytest.mark.parametrize("code,kw", FAILING_RUNS, ids=[f[0] for f in FAILING_RUNS])
def test_run_failure_publishes_nothing(tmp_path, code, kw):
    cfg = make_case(tmp_path, **kw)
    root = tmp_path / "root"
    with pytest.raises(EngineError) as ei:
        s0.run(make_ctx(cfg, root))
    assert ei.value.code == code
    assert data_files(root) == {}
    assert not (root / "logs").exists()


def test_anchor_needs_receipt(tmp_path):
    ctx = make_ctx(make_case(tmp_path), tmp_path / "root")
    with pytest.raises(EngineError) as ei:
        s0.run_rng_anchor(ctx)
    assert ei.value.code == "E_UPSTREAM_MISSING"
    assert not (tmp_path / "root" / "logs").exists()


def test_run_identity_race(tmp_path):
    """ctx.ids planned for other bytes than the files now hold -> E_ARTIFACT_RACE, nothing written."""
    from engine.core.context import SegmentIds

    cfg = make_case(tmp_path)
    ctx = make_ctx(cfg, tmp_path / "root")
    other = SegmentIds("1A", ctx.ids.seed, ctx.ids.parameter_hash, "0" * 64, ctx.ids.run_id)
    with pytest.raises(EngineError) as ei:
        s0.run(make_ctx(cfg, tmp_path / "root", ids=other))
    assert ei.value.code == "E_ARTIFACT_RACE"
    assert data_files(tmp_path / "root") == {}

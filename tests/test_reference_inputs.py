"""Embedded default 1A inputs (decisions 11, 12, 18, 20, 28): provenance, content invariants, rebuild byte identity."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO.parent / "shared" / "upstream-data"
CFG = yaml.safe_load((REPO / "config.yaml").read_text())
INPUTS = {k: REPO / v for k, v in CFG["segment1a"]["inputs"].items()}
PARAMS = {k: REPO / v for k, v in CFG["segment1a"]["parameters"].items()}
CHANNELS = {"CP", "CNP"}
U63 = (1 << 63) - 1

needs_upstream = pytest.mark.skipif(not (UPSTREAM / "MANIFEST.md").is_file(), reason="upstream-data not staged")


def _owned_provenances() -> list[Path]:
    out = []
    for base in ("reference", "config"):
        for p in sorted((REPO / base).rglob("*.provenance.json")):
            rel = p.relative_to(REPO).as_posix()
            if rel.startswith("reference/spatial/") or rel.startswith("config/policy/1b/"):
                continue  # built by the spatial helper
            out.append(p)
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _stem(p: Path) -> str:
    return p.name[: -len(p.suffix)]


@pytest.fixture(scope="module")
def merchants() -> pa.Table:
    return pq.read_table(INPUTS["merchant_table"])


@pytest.fixture(scope="module")
def iso() -> pa.Table:
    return pq.read_table(INPUTS["iso_table"])


def _shares(path: Path) -> list[tuple[str, str, float, int]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["currency", "country_iso", "share", "obs_count"]
    return [(r[0], r[1], float(r[2]), int(r[3])) for r in rows[1:]]


# ----------------------------------------------------------------------------------------------
# provenance
# ----------------------------------------------------------------------------------------------


def test_every_configured_file_exists_with_provenance():
    for key, p in list(INPUTS.items()) + list(PARAMS.items()):
        assert p.is_file(), f"{key}: {p} missing"
        prov = p.parent / f"{_stem(p)}.provenance.json"
        assert prov.is_file(), f"{key}: no provenance beside {p}"
        obj = json.loads(prov.read_text())
        assert p.name in obj["files"] and obj["files"][p.name]["role"].startswith("shipped")
        assert obj["sources"] and all(s["upstream_commit"] and s["sha256"] for s in obj["sources"])
        assert obj["licence"] and obj["transformation"]["kind"] in ("copy", "converted", "derived")


def test_shipped_files_match_their_provenance():
    provs = _owned_provenances()
    assert len(provs) >= 19
    for prov in provs:
        obj = json.loads(prov.read_text())
        for name, meta in obj["files"].items():
            f = prov.parent / name
            b = f.read_bytes()
            assert hashlib.sha256(b).hexdigest() == meta["sha256"], f"{f} differs from {prov.name}"
            assert len(b) == meta["size_bytes"]
        if obj["transformation"]["kind"] == "copy":
            # byte-for-byte copies: the shipped file has the source's digest
            shipped = [n for n, m in obj["files"].items() if m["role"].startswith("shipped")]
            assert [obj["files"][n]["sha256"] for n in shipped] == [obj["sources"][0]["sha256"]]
        for name, meta in obj["files"].items():
            if ".upstream." in name:  # decision 20: the upstream original kept beside, unchanged
                assert meta["sha256"] == obj["sources"][0]["sha256"]


@needs_upstream
def test_provenance_sources_match_upstream_data():
    for prov in _owned_provenances():
        for s in json.loads(prov.read_text())["sources"]:
            assert _sha(UPSTREAM / s["upstream_data_path"]) == s["sha256"]


# ----------------------------------------------------------------------------------------------
# merchants, ISO, GDP, buckets (decisions 11, 12)
# ----------------------------------------------------------------------------------------------


def test_merchant_table_schema_and_ids(merchants):
    assert merchants.schema.names == ["merchant_id", "mcc", "channel", "home_country_iso"]
    assert merchants.schema.field("merchant_id").type == pa.uint64()
    assert merchants.schema.field("mcc").type == pa.int32()
    assert merchants.schema.metadata is None or b"pandas" not in merchants.schema.metadata
    ids = merchants.column("merchant_id").to_numpy()
    assert merchants.num_rows == 18560  # 20,000 upstream less 1,440 pseudo-homed (decision 11)
    assert (ids[1:] > ids[:-1]).all()  # sorted ascending in unsigned order, unique
    assert int(ids[-1]) > U63 and int((ids > U63).sum()) > 1000  # ids above 2^63-1 survive as uint64
    assert int(ids[0]) >= 1
    assert set(merchants.column("channel").to_pylist()) == {"card_present", "card_not_present"}


def test_filtered_csv_is_the_parquet(merchants):
    import pandas as pd

    df = pd.read_csv(
        INPUTS["merchant_table"].with_suffix(".csv"),
        dtype={"merchant_id": "uint64", "mcc": "int32", "channel": str, "home_country_iso": str},
        keep_default_na=False,
    ).sort_values("merchant_id", kind="stable")
    assert df["merchant_id"].to_numpy().tolist() == merchants.column("merchant_id").to_pylist()
    assert df["home_country_iso"].tolist() == merchants.column("home_country_iso").to_pylist()
    assert df["mcc"].tolist() == merchants.column("mcc").to_pylist()
    assert df["channel"].tolist() == merchants.column("channel").to_pylist()


def test_no_pseudo_codes_and_namibia_survives(merchants, iso):
    codes = iso.column("country_iso").to_pylist()
    assert len(codes) == len(set(codes)) == 249
    assert "Synthetic" not in set(iso.column("region").to_pylist())
    prov = json.loads((INPUTS["iso_table"].parent / "iso_canonical.provenance.json").read_text())
    pseudo = set(prov["transformation"]["dropped_pseudo_codes"])
    assert len(pseudo) == 22 and not pseudo & set(codes)
    homes = set(merchants.column("home_country_iso").to_pylist())
    assert homes <= set(codes) and not homes & pseudo
    mprov = json.loads((INPUTS["merchant_table"].parent / "transaction_schema_merchant_ids.provenance.json").read_text())
    assert mprov["transformation"]["rows_dropped"] == 1440
    assert set(mprov["transformation"]["dropped_pseudo_codes"]) <= pseudo
    row = iso.filter(pa.compute.equal(iso.column("country_iso"), "NA")).to_pylist()
    assert row and row[0]["alpha3"] == "NAM" and row[0]["name"] == "Namibia" and row[0]["currency"] == "NAD"
    assert merchants.column("home_country_iso").to_pylist().count("NA") == 17
    assert iso.schema.field("numeric_code").type == pa.int16()


def test_every_home_has_gdp_and_bucket(merchants, iso):
    gdp = pq.read_table(INPUTS["gdp_table"]).to_pylist()
    bkt = pq.read_table(INPUTS["bucket_table"]).to_pylist()
    codes = set(iso.column("country_iso").to_pylist())
    g = {r["country_iso"]: r["gdp_pc_usd_2015"] for r in gdp if r["observation_year"] == 2024}
    b = {r["country_iso"]: r["bucket_id"] for r in bkt}
    assert len(g) == len(gdp) and set(g) <= codes and set(b) == set(g)
    assert all(r["source_series"] == "NY.GDP.PCAP.KD" for r in gdp)
    assert all(r["method"] == "jenks" and r["k"] == 5 and r["source_year"] == 2024 for r in bkt)
    homes = set(merchants.column("home_country_iso").to_pylist())
    assert homes <= set(g), "E_GDP_MISSING would fire"
    assert all(math.isfinite(g[h]) and g[h] > 0 for h in homes)
    assert all(b[h] in (1, 2, 3, 4, 5) for h in homes)
    # Jenks classes are contiguous, right-closed GDP intervals (00-core §7.1)
    srt = sorted(g, key=lambda c: (g[c], c))
    assert [b[c] for c in srt] == sorted(b[c] for c in srt)
    prov = json.loads((INPUTS["bucket_table"].parent / "gdp_bucket_map.provenance.json").read_text())
    maxima = prov["transformation"]["breaks"][1:]
    for c in g:
        assert b[c] == 1 + sum(1 for m in maxima[:4] if m < g[c])
    assert set(prov["transformation"]["differences_from_upstream_csv"]) == {"MX", "NO", "SI", "TC"}


# ----------------------------------------------------------------------------------------------
# currencies (decision 28)
# ----------------------------------------------------------------------------------------------


def test_currency_coverage(merchants, iso):
    codes = set(iso.column("country_iso").to_pylist())
    tender = dict(zip(iso.column("country_iso").to_pylist(), iso.column("currency").to_pylist()))
    assert all(isinstance(v, str) and re.fullmatch(r"[A-Z]{3}", v) for v in tender.values())
    tables = {}
    for key in ("settlement_shares.csv", "ccy_country_shares.csv"):
        rows = _shares(PARAMS[key])
        pk = [(c, i) for c, i, _, _ in rows]
        assert len(pk) == len(set(pk))
        by: dict[str, dict[str, float]] = {}
        for c, i, s, n in rows:
            assert re.fullmatch(r"[A-Z]{3}", c), f"{key}: bad currency {c!r}"
            assert i in codes, f"{key}: {i} not in the ISO table"
            assert 0.0 <= s <= 1.0 and n >= 0
            by.setdefault(c, {})[i] = s
        for c, m in by.items():
            assert abs(math.fsum(m.values()) - 1.0) <= 1e-6, f"{key}: {c} sums to {math.fsum(m.values())}"
        tables[key] = by
    homes = sorted(set(merchants.column("home_country_iso").to_pylist()))
    for h in homes:
        k = tender[h]
        for key, by in tables.items():
            assert k in by, f"{key}: currency {k} of home {h} missing"
            assert h in by[k], f"{key}: home {h} not in its currency {k}"
    # the default merchants can reach foreign countries with weight: EUR homes via DE/FR/IE/NL at least
    ladder = yaml.safe_load(PARAMS["policy.s3.rule_ladder.yaml"].read_text())
    preferred = set(ladder["country_sets"]["PREFERRED_FOREIGN"])
    assert len(preferred & set(tables["settlement_shares.csv"]["EUR"])) >= 3


# ----------------------------------------------------------------------------------------------
# policies (decisions 18, 20, 28)
# ----------------------------------------------------------------------------------------------


def _walk(obj, parent=None):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, (k, obj))
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, parent)
    else:
        yield parent, obj


def test_channel_words_in_policies_are_cp_cnp():
    shipped_yaml = [p for p in PARAMS.values() if p.suffix == ".yaml"]
    assert shipped_yaml
    seen = 0
    for p in shipped_yaml:
        text = p.read_text()
        body = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
        assert "card_present" not in body and "card_not_present" not in body, p
        for parent, leaf in _walk(yaml.safe_load(text)):
            if parent is None:
                continue
            key, holder = parent
            is_channel = key in ("channel", "dict_ch") or (key == "values" and holder.get("op") == "CHANNEL_IN")
            if is_channel and leaf != "*":
                assert leaf in CHANNELS, f"{p.name}: channel value {leaf!r}"
                seen += 1
    assert seen >= 8  # coefficient dicts, eligibility rules, the S3 ladder


def test_rule_ladder_allows_cp_cross_border():
    ladder = yaml.safe_load(PARAMS["policy.s3.rule_ladder.yaml"].read_text())
    allow = [r for r in ladder["rules"] if r["precedence"] == "ALLOW"]
    assert allow and allow[0]["predicate"] == {"op": "CHANNEL_IN", "values": ["CP"]}
    assert allow[0]["admit_sets"] == ["PREFERRED_FOREIGN"]


def test_crossborder_policy_defaults():
    cb = yaml.safe_load(PARAMS["crossborder_hyperparams.yaml"].read_text())
    assert cb["ztp"]["ztp_exhaustion_policy"] == "downgrade_domestic"  # decision 18
    assert cb["ztp"]["theta"] == {"theta0_intercept": -1.1, "theta1_log_n_sites": 0.75, "theta2_openness": 0.6}
    assert cb["ztp"]["MAX_ZTP_ZERO_ATTEMPTS"] == 64 and cb["ztp"]["feature_x"]["x_default"] == 0.2


def test_s6_policy_follows_schema():
    s6 = yaml.safe_load(PARAMS["s6_selection_policy.yaml"].read_text())
    assert set(s6) == {"defaults", "per_currency"}
    d = s6["defaults"]["emit_membership_dataset"]
    assert all(v.get("emit_membership_dataset", d) == d for v in s6["per_currency"].values())


def test_coefficients_are_bit_identical_to_upstream():
    h = yaml.safe_load(PARAMS["hurdle_coefficients.yaml"].read_text())
    hu = yaml.safe_load((PARAMS["hurdle_coefficients.yaml"].parent / "hurdle_coefficients.upstream.yaml").read_text())
    n = yaml.safe_load(PARAMS["nb_dispersion_coefficients.yaml"].read_text())
    nu = yaml.safe_load(
        (PARAMS["nb_dispersion_coefficients.yaml"].parent / "nb_dispersion_coefficients.upstream.yaml").read_text()
    )
    for new, old in ((h["beta"], hu["beta"]), (h["beta_mu"], hu["beta_mu"]), (n["beta_phi"], nu["beta_phi"])):
        assert [x.hex() for x in new] == [x.hex() for x in old]
    assert h["dict_mcc"] == hu["dicts"]["mcc"] == n["dict_mcc"]
    assert h["dict_ch"] == n["dict_ch"] == ["CP", "CNP"] and h["dict_dev5"] == [1, 2, 3, 4, 5]
    assert len(h["beta"]) == 1 + len(h["dict_mcc"]) + 2 + 5 and len(n["beta_phi"]) == 1 + len(h["dict_mcc"]) + 3


# ----------------------------------------------------------------------------------------------
# rebuild byte identity
# ----------------------------------------------------------------------------------------------


@needs_upstream
def test_build_script_reproduces_the_shipped_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("build_reference_1a", REPO / "scripts" / "build_reference_1a.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--upstream", str(UPSTREAM), "--out", str(tmp_path), "--quiet"]) == 0
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    shipped = set()
    for prov in _owned_provenances():
        rel = prov.parent.relative_to(REPO).as_posix()
        shipped.add(f"{rel}/{prov.name}")
        shipped.update(f"{rel}/{n}" for n in json.loads(prov.read_text())["files"])
    assert set(built) == shipped
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (REPO / rel).read_bytes(), f"{rel} not reproduced"


@needs_upstream
def test_build_refuses_a_tampered_source(tmp_path):
    import shutil

    spec = importlib.util.spec_from_file_location("build_reference_1a", REPO / "scripts" / "build_reference_1a.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    up = tmp_path / "up"
    for rel in ["MANIFEST.md", *mod.SRC.values()]:  # only what the build reads
        (up / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(UPSTREAM / rel, up / rel)
    assert mod.main(["--upstream", str(up), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    p = up / "config" / "allocation" / "s7_integerisation_policy.yaml"
    p.write_bytes(p.read_bytes().replace(b"dp_resid: 8", b"dp_resid: 7"))
    assert mod.main(["--upstream", str(up), "--out", str(tmp_path / "out"), "--quiet"]) == 1
    assert not (tmp_path / "out").exists()  # nothing written on failure

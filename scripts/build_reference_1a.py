#!/usr/bin/env python
"""Rebuild the embedded default 1A inputs from the staged upstream data, byte for byte.

    .venv/bin/python scripts/build_reference_1a.py [--upstream ../shared/upstream-data] [--out .]

Reads the upstream files listed in ``<upstream>/MANIFEST.md`` (each source's sha256 is checked against that
manifest), writes every file that ``config.yaml`` names under ``segment1a`` (paths taken from ``--config``,
default the repo's ``config.yaml``) below ``--out`` (default the repo root), each with a
``<stem>.provenance.json`` beside it. Converted policy files keep their upstream original beside them as
``<stem>.upstream.<ext>`` (decision 20). Output is deterministic: no timestamps, sorted rows, Parquet written
by pyarrow with zstd at a pinned level and no pandas metadata; running twice gives identical bytes.

What it does (spec: README decisions 11, 12, 18, 20, 28; 00-core §1, §7.1; 1A-S1-S4 §1.2, §2.2, §3.2, §4.2;
1A-S5-S9 §2.1, §3.1 and ⚑10):

* merchants: upstream v2025-10-09 CSV (uint64 ids, ``keep_default_na=False``) less the merchants whose home is
  one of the ISO table's ``region=Synthetic`` pseudo-codes (decision 11); Parquet + the filtered CSV;
* ISO: the v2025-10-09 canonical table without its pseudo rows (real ISO 3166-1 only);
* GDP: NY.GDP.PCAP.KD 2024 from the raw World Bank API JSON, real ISO countries with a value;
* bucket map: Jenks k=5 by exact 1-D DP over the shipped GDP values, right-closed classes (00-core §7.1, §7.8);
* share surfaces: the 2025-10-26 155-currency tables less pseudo-country rows, shares of the affected
  currencies renormalised (decision 28);
* policies: copied, or converted once to the layouts the spec fixes (HEAD names, CP/CNP channel words,
  decision 18's ``downgrade_domestic``), original kept beside;
* governance: numeric policy and math profile copied.

Checks that fail the build (exit 1): a source whose sha256 differs from MANIFEST.md; any merchant home without
ISO row, GDP row, bucket or a currency present in both share tables; a share-table country outside the ISO
table; a converted YAML whose numbers do not round-trip bit for bit.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_REPO = "EsosaOrumwese/fraud-detection-system"
SCRIPT = "scripts/build_reference_1a.py"
ZSTD_LEVEL = 9  # pinned: identical bytes need identical codec settings

PSEUDO_REGION = "Synthetic"
CHANNELS = ("CP", "CNP")

# upstream-data paths (see MANIFEST.md)
SRC = {
    "merchants": "reference/layer1/transaction_schema_merchant_ids/v2025-10-09/transaction_schema_merchant_ids.csv",
    "merchants_manifest": "reference/layer1/transaction_schema_merchant_ids/v2025-10-09/transaction_schema_merchant_ids.manifest.json",
    "iso": "reference/layer1/iso_canonical/v2025-10-09/iso_canonical.csv",
    "gdp_json": "artefacts/economic/world_bank_gdp_per_capita/2025-10-07/gdp_2024.json",
    "gdp_csv": "reference/economic/world_bank_gdp_per_capita/2025-10-07/world_bank_gdp_pc_2024.csv",
    "bucket_csv": "reference/economic/gdp_bucket_map/2025-10-08/gdp_bucket_map_2024.csv",
    "bucket_manifest": "reference/economic/gdp_bucket_map/2025-10-08/manifest.json",
    "numeric_policy": "reference/governance/numeric_policy/2025-10-07/numeric_policy.json",
    "math_profile": "reference/governance/math_profile/2025-10-08/math_profile_manifest.json",
    "settlement_shares": "reference/network/settlement_shares/2025-10-26/settlement_shares.csv",
    "ccy_country_shares": "reference/network/ccy_country_shares/2025-10-26/ccy_country_shares.csv",
    "hurdle": "config/models/hurdle/exports/version=2025-10-09/20251009T120000Z/hurdle_coefficients.yaml",
    "nb_dispersion": "config/models/hurdle/exports/version=2025-10-24/20251024T234923Z/nb_dispersion_coefficients.yaml",
    "hurdle_sim_manifest": "artefacts/training/1A/hurdle_sim/simulation_version=2025-10-09/seed=9248923/20251009T120000Z/manifest.json",
    "nb_sim_manifest": "artefacts/training/1A/hurdle_sim/simulation_version=2025-10-09/seed=9248923/20251024T234923Z/manifest.json",
    "crossborder": "config/policy/crossborder_hyperparams.yaml",
    "rule_ladder": "contracts/policies/l1/seg_1A/policy.s3.rule_ladder.yaml",
    "base_weight": "contracts/policies/l1/seg_1A/policy.s3.base_weight.yaml",
    "thresholds": "contracts/policies/l1/seg_1A/policy.s3.thresholds.yaml",
    "bounds": "contracts/policies/l1/seg_1A/policy.s3.bounds.yaml",
    "ccy_smoothing": "config/allocation/ccy_smoothing_params.yaml",
    "s6_selection": "config/allocation/s6_selection_policy.yaml",
    "s7_integerisation": "config/allocation/s7_integerisation_policy.yaml",
    "s2_validation": "contracts/policies/l1/seg_1A/s2_validation_policy.yaml",
    "list_one": "reference/iso/iso_legal_tender/2024/source/list-one.xml",
    "legal_tender": "config/policy/legal_tender_2024Q4.yaml",
}


class BuildError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# upstream access with provenance
# ------------------------------------------------------------------------------------------------


def sha256_hex(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def parse_manifest(upstream: Path) -> dict[str, dict]:
    """Rows of MANIFEST.md's file tables: path -> {bytes, sha256, commit, what, licence}."""
    rows: dict[str, dict] = {}
    prev_licence = ""
    for line in (upstream / "MANIFEST.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        path = cells[0].strip("`")
        if len(cells) >= 6:
            if cells[5] == "As above.":  # MANIFEST.md's shorthand for the previous row's licence text
                cells[5] = prev_licence
            prev_licence = cells[5]
            rows[path] = {
                "bytes": int(cells[1]),
                "sha256": cells[2].strip("`"),
                "commit": cells[3],
                "what": cells[4],
                "licence": cells[5],
            }
    return rows


class Upstream:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = parse_manifest(root)

    def read(self, key: str) -> tuple[bytes, dict]:
        rel = SRC[key]
        data = (self.root / rel).read_bytes()
        row = self.manifest.get(rel)
        if row is None:
            raise BuildError(f"{rel} is not listed in MANIFEST.md")
        if sha256_hex(data) != row["sha256"] or len(data) != row["bytes"]:
            raise BuildError(f"{rel}: sha256/size differ from MANIFEST.md")
        src = {
            "upstream_data_path": rel,
            "upstream_repo": UPSTREAM_REPO,
            "upstream_commit": row["commit"],
            "sha256": row["sha256"],
            "size_bytes": row["bytes"],
            "description": row["what"],
            "licence": row["licence"],
        }
        return data, src


# ------------------------------------------------------------------------------------------------
# deterministic writers
# ------------------------------------------------------------------------------------------------


class Out:
    """Collects output files (relative path -> bytes) and writes them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, bytes] = {}

    def add(self, rel: str, data: bytes) -> None:
        if rel in self.files:
            raise BuildError(f"output written twice: {rel}")
        self.files[rel] = data

    def write(self) -> None:
        for rel in sorted(self.files):
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_bytes(self.files[rel])
            tmp.replace(p)


def parquet_bytes(table: pa.Table, sort_by: list[str]) -> bytes:
    table = table.replace_schema_metadata(None)
    idx = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in sort_by])
    table = table.take(idx).combine_chunks()
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=False,
        write_statistics=True,
        row_group_size=1 << 20,
        version="2.6",
        data_page_version="1.0",
        store_schema=True,
    )
    return buf.getvalue()


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode("ascii")


def yaml_bytes(header: str, obj) -> bytes:
    body = yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, allow_unicode=False, width=100)
    return (header + body).encode("utf-8")


def provenance(
    out: Out,
    folder: str,
    stem: str,
    config_key: str,
    shipped: dict[str, str],
    sources: list[dict],
    transformation: dict,
    extra: dict | None = None,
) -> None:
    """Write ``<folder>/<stem>.provenance.json`` listing the shipped files (already added to ``out``)."""
    files = {}
    for name, role in shipped.items():
        data = out.files[f"{folder}/{name}"]
        files[name] = {"role": role, "sha256": sha256_hex(data), "size_bytes": len(data)}
    obj = {
        "config_key": config_key,
        "files": files,
        "sources": sources,
        # the primary (first) source's licence text as MANIFEST.md records it; every source's own in "sources"
        "licence": sources[0]["licence"],
        "attribution": f"Upstream data from {UPSTREAM_REPO} (repository licence MIT); see each source's licence.",
        "transformation": transformation,
        "build": {"script": SCRIPT, "pyarrow": pa.__version__, "pyyaml": yaml.__version__},
    }
    if extra:
        obj.update(extra)
    out.add(f"{folder}/{stem}.provenance.json", json_bytes(obj))


def split_path(rel: str) -> tuple[str, str, str, str]:
    """(folder, filename, stem, ext) of a repo-relative path ('a/b/policy.s3.bounds.yaml' -> stem 'policy.s3.bounds')."""
    p = Path(rel)
    return p.parent.as_posix(), p.name, p.name[: -len(p.suffix)] if p.suffix else p.name, p.suffix


# ------------------------------------------------------------------------------------------------
# reference tables
# ------------------------------------------------------------------------------------------------


def read_csv_rows(data: bytes) -> tuple[list[str], list[list[str]]]:
    rdr = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
    rows = list(rdr)
    return rows[0], rows[1:]


def resolve_compound(name: str, plain: set[str], codes4217: set[str]) -> str:
    """Currency for an upstream compound value such as ``"HTG,USD"`` (several tenders joined by the upstream
    builder; not an ISO 4217 code): the first code of the compound that is not already a plain currency of
    the table and is in ISO 4217 List One, i.e. the country's own currency (HTG, BTN, LSL, NAD, ...)."""
    parts = [p.strip() for p in name.split(",")]
    if len(parts) < 2 or not all(re.fullmatch(r"[A-Z]{3}", p) for p in parts):
        raise BuildError(f"not a compound of ISO 4217 codes: {name!r}")
    pick = next((p for p in parts if p not in plain and p in codes4217), None)
    if pick is None:
        raise BuildError(f"cannot resolve compound currency {name!r}")
    return pick


def legal_tender_map(up: Upstream, codes4217: set[str]) -> tuple[dict[str, str], dict, list[dict]]:
    """ISO2 -> primary legal-tender currency from ``legal_tender_2024Q4.yaml`` (the mapping the upstream share
    builders used), compounds resolved by :func:`resolve_compound`."""
    data, src = up.read("legal_tender")
    doc = yaml.safe_load(data)
    cur = doc["currencies"]
    plain = {c for c in cur if re.fullmatch(r"[A-Z]{3}", c)}
    out: dict[str, str] = {}
    fixes = []
    for c, v in cur.items():
        code = c if c in plain else resolve_compound(c, plain, codes4217)
        if code != c:
            fixes.extend({"upstream_currency": c, "country_iso": iso, "currency": code} for iso in v["iso"])
        for iso in v["iso"]:
            if iso in out:
                raise BuildError(f"legal tender: {iso} listed under two currencies")
            out[iso] = code
    return out, src, sorted(fixes, key=lambda d: d["country_iso"])


def build_iso(up: Upstream, out: Out, target: str, iso4217: tuple[set[str], dict]) -> tuple[set[str], dict]:
    data, src = up.read("iso")
    header, rows = read_csv_rows(data)
    expect = ["country_iso", "alpha3", "numeric_code", "name", "region", "subregion", "start_date", "end_date"]
    if header != expect:
        raise BuildError(f"unexpected ISO header {header}")
    real = [r for r in rows if r[4] != PSEUDO_REGION]
    pseudo = sorted(r[0] for r in rows if r[4] == PSEUDO_REGION)
    codes = [r[0] for r in real]
    if len(set(codes)) != len(codes) or not all(re.fullmatch(r"[A-Z]{2}", c) for c in codes):
        raise BuildError("ISO codes not unique / not ^[A-Z]{2}$")
    if "NA" not in codes:
        raise BuildError("Namibia (NA) lost")

    tender, lt_src, lt_fixes = legal_tender_map(up, iso4217[0])
    no_tender = sorted(set(codes) - set(tender))
    if no_tender:
        raise BuildError(f"real ISO countries without a legal tender: {no_tender}")

    def nul(s: str) -> str | None:
        return None if s in ("", "null") else s

    table = pa.table(
        {
            "country_iso": pa.array(codes, pa.string()),
            "alpha3": pa.array([r[1] for r in real], pa.string()),
            "numeric_code": pa.array([int(r[2]) for r in real], pa.int16()),
            "name": pa.array([r[3] for r in real], pa.string()),
            "region": pa.array([nul(r[4]) for r in real], pa.string()),
            "subregion": pa.array([nul(r[5]) for r in real], pa.string()),
            "start_date": pa.array([nul(r[6]) for r in real], pa.string()),
            "end_date": pa.array([nul(r[7]) for r in real], pa.string()),
            "currency": pa.array([tender[c] for c in codes], pa.string()),
        }
    )
    folder, name, stem, _ = split_path(target)
    out.add(target, parquet_bytes(table, ["country_iso"]))
    provenance(
        out,
        folder,
        stem,
        "segment1a.inputs.iso_table",
        {name: "shipped (sealed into manifest_fingerprint as role 'iso_table')"},
        [src, lt_src, iso4217[1]],
        {
            "kind": "derived",
            "summary": "Upstream ISO canonical CSV (read with keep_default_na=False so Namibia 'NA' survives) "
            "less its region=Synthetic pseudo rows (decision 11: real ISO 3166-1 countries only); empty "
            "region/subregion/start_date/end_date -> null; rows sorted by country_iso. Added column 'currency': "
            "the country's primary legal tender (ISO 4217) from legal_tender_2024Q4.yaml, the mapping the "
            "upstream share surfaces were built from (1A S5.0 takes the merchant currency kappa from it, "
            "1A-S5-S9 §2.4); compound entries such as 'HTG,USD' resolved to the country's own code as in the "
            "share tables.",
            "currency_compounds_resolved": lt_fixes,
            "rows_upstream": len(rows),
            "rows_shipped": len(real),
            "dropped_pseudo_codes": pseudo,
            "columns": {
                "country_iso": "string ^[A-Z]{2}$ (PK)",
                "alpha3": "string",
                "numeric_code": "int16",
                "name": "string",
                "region": "string nullable",
                "subregion": "string nullable",
                "start_date": "string nullable (all null)",
                "end_date": "string nullable (all null)",
                "currency": "string ^[A-Z]{3}$ (primary legal tender; every row non-null)",
            },
        },
    )
    return set(codes), {"pseudo": pseudo, "tender": tender}


def build_merchants(up: Upstream, out: Out, target: str, iso_real: set[str], pseudo: list[str]) -> set[str]:
    import pandas as pd

    data, src = up.read("merchants")
    _, msrc = up.read("merchants_manifest")
    # Decision 12: uint64 ids (values above 2^63-1 occur), keep_default_na=False (Namibia is "NA").
    df = pd.read_csv(
        io.BytesIO(data),
        dtype={"merchant_id": "uint64", "mcc": "int32", "channel": str, "home_country_iso": str},
        keep_default_na=False,
        na_filter=False,
    )
    if list(df.columns) != ["merchant_id", "mcc", "channel", "home_country_iso"]:
        raise BuildError(f"unexpected merchant columns {list(df.columns)}")
    lines = data.decode("utf-8").split("\n")
    header, body = lines[0], [ln for ln in lines[1:] if ln != ""]
    if len(body) != len(df):
        raise BuildError("merchant CSV line count differs from parsed rows")
    # the text rows and the parsed rows must agree exactly (ids as decimal text, no signed detour)
    ids_text = [ln.split(",", 1)[0] for ln in body]
    if ids_text != [str(int(x)) for x in df["merchant_id"].to_numpy().tolist()]:
        raise BuildError("merchant ids do not round-trip through uint64")
    if not df["merchant_id"].is_unique or (df["merchant_id"] == 0).any():
        raise BuildError("merchant ids not unique / zero")
    pseudo_set = set(pseudo)
    drop_mask = df["home_country_iso"].isin(pseudo_set).to_numpy()
    dropped_counts = {c: int(n) for c, n in sorted(df.loc[drop_mask, "home_country_iso"].value_counts().items())}
    keep = ~drop_mask
    kept = df.loc[keep]
    unknown = sorted(set(kept["home_country_iso"]) - iso_real)
    if unknown:
        raise BuildError(f"merchant homes outside the ISO table: {unknown}")
    if set(kept["channel"]) - {"card_present", "card_not_present"}:
        raise BuildError("unexpected channel values")

    folder, name, stem, _ = split_path(target)
    csv_name = stem + ".csv"
    kept_lines = [ln for ln, k in zip(body, keep.tolist()) if k]
    csv_bytes = ("\n".join([header] + kept_lines) + "\n").encode("utf-8")
    table = pa.table(
        {
            "merchant_id": pa.array(kept["merchant_id"].to_numpy(), pa.uint64()),
            "mcc": pa.array(kept["mcc"].to_numpy(), pa.int32()),
            "channel": pa.array(kept["channel"].tolist(), pa.string()),
            "home_country_iso": pa.array(kept["home_country_iso"].tolist(), pa.string()),
        }
    )
    out.add(target, parquet_bytes(table, ["merchant_id"]))
    out.add(f"{folder}/{csv_name}", csv_bytes)
    ids = kept["merchant_id"].to_numpy()
    provenance(
        out,
        folder,
        stem,
        "segment1a.inputs.merchant_table",
        {
            name: "shipped (sealed into manifest_fingerprint as role 'merchant_table')",
            csv_name: "filtered CSV the Parquet was built from (upstream rows byte-identical, upstream order)",
        },
        [src, msrc],
        {
            "kind": "derived",
            "summary": "Upstream v2025-10-09 merchant CSV read with dtype merchant_id=uint64, mcc=int32 and "
            "keep_default_na=False; merchants whose home_country_iso is one of the ISO table's region=Synthetic "
            "pseudo-codes (World Bank aggregate codes) removed once (decision 11); Parquet rows sorted by "
            "merchant_id. Channel values kept as upstream (card_present/card_not_present); 1A S0 maps them to "
            "CP/CNP at ingress (decision 28).",
            "raw_csv_sha256": src["sha256"],
            "rows_upstream": int(len(df)),
            "rows_dropped": int(drop_mask.sum()),
            "rows_shipped": int(keep.sum()),
            "dropped_by_home_country": dropped_counts,
            "dropped_pseudo_codes": sorted(dropped_counts),
            "ids_above_2^63-1": int((ids > (1 << 63) - 1).sum()),
            "distinct_home_countries": int(kept["home_country_iso"].nunique()),
            "namibia_NA_merchants": int((kept["home_country_iso"] == "NA").sum()),
            "channel_counts": {k: int(v) for k, v in sorted(kept["channel"].value_counts().items())},
            "columns": {
                "merchant_id": "uint64 (PK)",
                "mcc": "int32",
                "channel": "string card_present|card_not_present",
                "home_country_iso": "string ^[A-Z]{2}$",
            },
        },
    )
    return set(kept["home_country_iso"])


def build_gdp(up: Upstream, out: Out, target: str, iso_real: set[str], homes: set[str]) -> dict[str, float]:
    data, src = up.read("gdp_json")
    _, csv_src = up.read("gdp_csv")
    obj = json.loads(data)
    rows = obj[0][1]
    if any(r["date"] != "2024" or r["indicator"]["id"] != "NY.GDP.PCAP.KD" for r in rows):
        raise BuildError("GDP JSON holds other years or series")
    by_iso: dict[str, float] = {}
    dropped_not_iso_with_value = []
    null_value = []
    for r in rows:
        c = r["country"]["id"]
        v = r["value"]
        if c not in iso_real:
            if v is not None:
                dropped_not_iso_with_value.append(c)
            continue
        if v is None:
            null_value.append(c)
            continue
        v = float(v)
        if not (math.isfinite(v) and v > 0):
            raise BuildError(f"GDP for {c} not positive: {v}")
        if c in by_iso:
            raise BuildError(f"two 2024 GDP rows for {c}")
        by_iso[c] = v
    # cross-check against the upstream CSV twin of gdp.parquet
    _, csv_rows = read_csv_rows((up.root / SRC["gdp_csv"]).read_bytes())
    twin = {r[0]: float(r[1]) for r in csv_rows}
    mism = sorted(c for c in by_iso if c not in twin or twin[c] != by_iso[c])
    if mism:
        raise BuildError(f"GDP values differ from the upstream CSV twin: {mism}")
    missing_homes = sorted(homes - set(by_iso))
    if missing_homes:
        raise BuildError(f"merchant home countries without 2024 GDP: {missing_homes}")
    codes = sorted(by_iso)
    table = pa.table(
        {
            "country_iso": pa.array(codes, pa.string()),
            "observation_year": pa.array([2024] * len(codes), pa.int16()),
            "gdp_pc_usd_2015": pa.array([by_iso[c] for c in codes], pa.float64()),
            "source_series": pa.array(["NY.GDP.PCAP.KD"] * len(codes), pa.string()),
        }
    )
    folder, name, stem, _ = split_path(target)
    out.add(target, parquet_bytes(table, ["country_iso", "observation_year"]))
    without = sorted(iso_real - set(by_iso))
    provenance(
        out,
        folder,
        stem,
        "segment1a.inputs.gdp_table",
        {name: "shipped (sealed into manifest_fingerprint as role 'gdp_table')"},
        [src, csv_src],
        {
            "kind": "derived",
            "summary": "World Bank API response for NY.GDP.PCAP.KD (GDP per capita, constant 2015 US$), "
            "observation year 2024: one row per real ISO country (World Bank iso2 'country.id' in the shipped "
            "ISO table) with a non-null value; aggregates and pseudo-codes dropped; values exactly as in the "
            "JSON (identical to the upstream CSV twin world_bank_gdp_pc_2024.csv for every shipped row).",
            "rows_shipped": len(codes),
            "real_iso_countries": len(iso_real),
            "coverage": {
                "merchant_home_countries": len(homes),
                "merchant_home_countries_with_gdp": len(homes & set(by_iso)),
                "real_countries_without_2024_value": without,
                "decision": "No imputation. Only the 2024 vintage of NY.GDP.PCAP.KD is staged upstream, so a "
                "country without a 2024 value has no row; none of them is a home country of the default "
                "merchants. A user merchant table with such a home fails S0 with E_GDP_MISSING (00-core §6.2), "
                "as the spec requires.",
            },
            "world_bank_codes_dropped_with_value": sorted(dropped_not_iso_with_value),
            "real_countries_with_null_value": sorted(null_value),
            "columns": {
                "country_iso": "string (PK with observation_year)",
                "observation_year": "int16 = 2024",
                "gdp_pc_usd_2015": "float64 > 0",
                "source_series": "string = NY.GDP.PCAP.KD",
            },
        },
    )
    return by_iso


def jenks_exact(items: list[tuple[float, str]], k: int) -> list[int]:
    """Exact 1-D Jenks (Fisher) by dynamic programming over values sorted by (value, iso).

    Minimises the total within-class sum of squared deviations; on equal cost the smallest split index wins
    (strict ``<`` while scanning split points upwards). Returns the class (1..k) of each sorted item;
    classes are contiguous, so each class is right-closed at its maximum (00-core §7.1, §7.8).
    """
    xs = [v for v, _ in items]
    n = len(xs)
    if n < k:
        raise BuildError("fewer values than classes")
    mean = math.fsum(xs) / n
    c = [x - mean for x in xs]  # centring keeps the prefix-sum SSE well conditioned
    s1 = [0.0] * (n + 1)
    s2 = [0.0] * (n + 1)
    for i, x in enumerate(c):
        s1[i + 1] = s1[i] + x
        s2[i + 1] = s2[i] + x * x

    def sse(i: int, j: int) -> float:
        m = j - i
        s = s1[j] - s1[i]
        return (s2[j] - s2[i]) - s * s / m

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[-1] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for cls in range(1, k + 1):
        for j in range(cls, n + 1):
            best, arg = inf, -1
            for i in range(cls - 1, j):
                prev = cost[cls - 1][i]
                if prev == inf:
                    continue
                v = prev + sse(i, j)
                if v < best:
                    best, arg = v, i
            cost[cls][j], back[cls][j] = best, arg
    labels = [0] * n
    j = n
    for cls in range(k, 0, -1):
        i = back[cls][j]
        for t in range(i, j):
            labels[t] = cls
        j = i
    return labels


def build_buckets(up: Upstream, out: Out, target: str, gdp: dict[str, float], homes: set[str]) -> None:
    _, csv_src = up.read("bucket_csv")
    mdata, msrc = up.read("bucket_manifest")
    items = sorted(((v, c) for c, v in gdp.items()), key=lambda t: (t[0], t[1]))
    labels = jenks_exact(items, 5)
    bucket = {c: lab for (v, c), lab in zip(items, labels)}
    maxima = [max(v for (v, c), lab in zip(items, labels) if lab == k) for k in range(1, 6)]
    breaks = [items[0][0]] + maxima
    # right-closed: bucket = 1 + #{class maxima of classes 1..4 strictly below v}
    for v, c in items:
        if bucket[c] != 1 + sum(1 for m in maxima[:4] if m < v):
            raise BuildError("Jenks classes are not right-closed intervals")
    up_breaks = json.loads(mdata)["breaks"]
    _, brow = read_csv_rows((up.root / SRC["bucket_csv"]).read_bytes())
    up_bucket = {r[0]: int(r[1]) for r in brow}
    differ = {c: {"upstream": up_bucket[c], "shipped": bucket[c], "gdp_pc_usd_2015": gdp[c]} for c in sorted(bucket) if up_bucket.get(c) != bucket[c]}
    if sorted(set(homes) - set(bucket)):
        raise BuildError("merchant homes without bucket")
    codes = sorted(bucket)
    table = pa.table(
        {
            "country_iso": pa.array(codes, pa.string()),
            "bucket_id": pa.array([bucket[c] for c in codes], pa.int32()),
            "method": pa.array(["jenks"] * len(codes), pa.string()),
            "k": pa.array([5] * len(codes), pa.int32()),
            "source_year": pa.array([2024] * len(codes), pa.int16()),
        }
    )
    folder, name, stem, _ = split_path(target)
    out.add(target, parquet_bytes(table, ["country_iso"]))
    counts = {str(k): sum(1 for c in codes if bucket[c] == k) for k in range(1, 6)}
    provenance(
        out,
        folder,
        stem,
        "segment1a.inputs.bucket_table",
        {name: "shipped (sealed into manifest_fingerprint as role 'bucket_table')"},
        [csv_src, msrc],
        {
            "kind": "derived",
            "summary": "The upstream gdp_bucket_map.parquet is not staged (only its CSV twin and manifest), so the "
            "map is derived as the spec describes (00-core §7.1/§7.8): Jenks k=5 by exact 1-D dynamic "
            "programming (minimum within-class SSE; values stably sorted by (value, iso); smallest split index "
            "on ties) over the 2024 values of the shipped GDP table, right-closed classes.",
            "breaks": breaks,
            "breaks_equal_upstream_manifest": breaks == up_breaks,
            "class_sizes": counts,
            "differences_from_upstream_csv": differ,
            "differences_explained": "The class boundaries equal the upstream breaks exactly. Upstream assigned "
            "a value equal to a class maximum (the break itself) to the next class up, contradicting both the "
            "Jenks partition and the spec's right-closed rule; the countries sitting exactly on a break are "
            "listed above. The 22 pseudo-code rows of the upstream map are gone with the ISO table's pseudo "
            "rows (decision 11).",
            "columns": {
                "country_iso": "string (PK)",
                "bucket_id": "int32 1..5",
                "method": "string = jenks",
                "k": "int32 = 5",
                "source_year": "int16 = 2024",
            },
        },
    )


def iso4217_codes(up: Upstream) -> tuple[set[str], dict]:
    """Alphabetic codes of ISO 4217 List One (SIX, staged upstream) for validating currency codes."""
    import xml.etree.ElementTree as ET

    data, src = up.read("list_one")
    root = ET.fromstring(data)
    codes = {e.text.strip() for e in root.iter("Ccy") if e.text}
    return codes, src


def build_shares(
    up: Upstream, out: Out, key: str, target: str, iso_real: set[str], pseudo: list[str], iso4217: tuple[set[str], dict]
) -> dict[str, dict[str, float]]:
    data, src = up.read(key)
    codes4217, list_src = iso4217
    text = data.decode("utf-8")
    lines = text.split("\n")
    if lines[-1] != "":
        raise BuildError(f"{key}: no trailing newline")
    header, body = lines[0], lines[1:-1]
    if header != "currency,country_iso,share,obs_count":
        raise BuildError(f"{key}: unexpected header {header}")
    rows = [next(csv.reader([ln])) for ln in body]
    if any(len(r) != 4 for r in rows):
        raise BuildError(f"{key}: malformed row")
    currencies_upstream = sorted({r[0] for r in rows})
    plain = {r[0] for r in rows if re.fullmatch(r"[A-Z]{3}", r[0])}
    # Compound "currencies" such as "HTG,USD" would fail S5's pre-flight: same resolution as the ISO table's
    # currency column (resolve_compound), a single-country currency with the row's share 1.0.
    compound_fix = {(r[0], r[1]): resolve_compound(r[0], plain, codes4217) for r in rows if r[0] not in plain}
    if len(set(compound_fix.values())) != len(compound_fix) or set(compound_fix.values()) & plain:
        raise BuildError(f"{key}: compound resolution collides")
    pseudo_set = set(pseudo)
    dropped = [r for r in rows if r[1] in pseudo_set]
    kept = [r for r in rows if r[1] not in pseudo_set]
    outside = sorted({r[1] for r in kept} - iso_real)
    if outside:
        raise BuildError(f"{key}: countries outside the ISO table after dropping pseudo-codes: {outside}")
    affected = sorted({r[0] for r in dropped})
    totals = {cur: math.fsum(float(r[2]) for r in kept if r[0] == cur) for cur in affected}
    new_lines = [header]
    for ln, r in zip(body, rows):
        if r[1] in pseudo_set:
            continue
        if r[0] in totals:
            s = float(r[2]) / totals[r[0]]
            new_lines.append(f"{r[0]},{r[1]},{s!r},{r[3]}")
        elif (r[0], r[1]) in compound_fix:
            new_lines.append(f"{compound_fix[(r[0], r[1])]},{r[1]},{r[2]},{r[3]}")
        else:
            new_lines.append(ln)  # untouched rows stay byte-identical
    shipped = ("\n".join(new_lines) + "\n").encode("utf-8")
    # checks: codes, PK unique, shares in [0,1], per-currency sums 1 +- 1e-9
    table: dict[str, dict[str, float]] = {}
    for ln in new_lines[1:]:
        cur, iso, s, n = ln.split(",")
        if not re.fullmatch(r"[A-Z]{3}", cur):
            raise BuildError(f"{key}: currency {cur!r} is not ^[A-Z]{{3}}$")
        if iso in table.setdefault(cur, {}):
            raise BuildError(f"{key}: duplicate ({cur},{iso})")
        v = float(s)
        if not (0.0 <= v <= 1.0) or int(n) < 0:
            raise BuildError(f"{key}: bad share/obs_count in {ln}")
        table[cur][iso] = v
    for cur, m in table.items():
        if abs(math.fsum(m.values()) - 1.0) > 1e-9:
            raise BuildError(f"{key}: {cur} shares sum to {math.fsum(m.values())}")
    folder, name, stem, ext = split_path(target)
    up_name = f"{stem}.upstream{ext}"
    out.add(target, shipped)
    out.add(f"{folder}/{up_name}", data)
    provenance(
        out,
        folder,
        stem,
        f"segment1a.parameters.{name}",
        {name: "shipped (hashed into parameter_hash)", up_name: "upstream original, byte-identical (not read by the engine)"},
        [src, list_src],
        {
            "kind": "converted",
            "summary": "The 2025-10-26 155-'currency' surface with two repairs (decision 28: every currency a "
            "default merchant needs must be a valid code present in both share tables, every country a real ISO "
            "country). (1) Rows for the ISO table's pseudo-codes dropped; the shares of the currencies that lost "
            "rows renormalised (share / sum of the kept shares, written with Python repr, i.e. shortest "
            "round-trip binary64). (2) Compound currency values such as 'HTG,USD' (several tenders joined by the "
            "upstream builder; not ISO 4217 codes, so S5's pre-flight would reject the table and the countries "
            "would have no currency) replaced by the first code of the compound that is not already a currency "
            "of the table and is in ISO 4217 List One: the country's own currency, share 1.0 as for every other "
            "single-country currency. obs_count and every other row unchanged byte for byte.",
            "rows_upstream": len(rows),
            "rows_shipped": len(kept),
            "currencies_upstream": len(currencies_upstream),
            "rows_dropped": [{"currency": r[0], "country_iso": r[1], "share": r[2], "obs_count": int(r[3])} for r in dropped],
            "renormalised_currencies": {cur: {"kept_share_sum_before": totals[cur]} for cur in affected},
            "compound_currencies_resolved": [
                {"upstream_currency": k[0], "country_iso": k[1], "currency": v} for k, v in sorted(compound_fix.items())
            ],
            "currencies": len(table),
            "countries": len({iso for m in table.values() for iso in m}),
            "currencies_not_in_list_one_2026_01_01": sorted(c for c in table if c not in codes4217),
            "list_one_note": "The staged ISO 4217 List One is the 2026-01-01 edition; codes withdrawn since the "
            "2024Q4 vintage of the tables (e.g. BGN after Bulgaria joined the euro) are listed above and kept.",
        },
    )
    return table


# ------------------------------------------------------------------------------------------------
# parameter files
# ------------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    """Structural equality with floats compared bit for bit (and no int/float/str type drift)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex()
    return a == b


def emit_yaml(header: str, obj) -> bytes:
    data = yaml_bytes(header, obj)
    if not _same(yaml.safe_load(data), obj):
        raise BuildError("converted YAML does not round-trip exactly")
    return data


def header_for(name: str, up_name: str, lines: list[str]) -> str:
    h = [
        f"# {name}: embedded default of the Layer-1 engine, built by {SCRIPT}.",
        f"# Converted once from the upstream file kept beside it ({up_name}); see the .provenance.json.",
    ]
    h += [f"# {ln}" for ln in lines]
    return "\n".join(h) + "\n"


def copy_param(up: Upstream, out: Out, key: str, cfg_name: str, target: str, note: str) -> None:
    data, src = up.read(key)
    folder, name, stem, _ = split_path(target)
    out.add(target, data)
    provenance(
        out,
        folder,
        stem,
        f"segment1a.parameters.{cfg_name}",
        {name: "shipped (hashed into parameter_hash)"},
        [src],
        {"kind": "copy", "summary": "Byte-for-byte copy of the upstream file (LF line endings as staged). " + note},
    )


def converted_param(
    up: Upstream,
    out: Out,
    key: str,
    cfg_name: str,
    target: str,
    new_obj,
    header_lines: list[str],
    transformation: dict,
    extra_sources: list[str] = (),
) -> None:
    data, src = up.read(key)
    sources = [src] + [up.read(k)[1] for k in extra_sources]
    folder, name, stem, ext = split_path(target)
    up_name = f"{stem}.upstream{ext}"
    out.add(target, emit_yaml(header_for(name, up_name, header_lines), new_obj))
    out.add(f"{folder}/{up_name}", data)
    provenance(
        out,
        folder,
        stem,
        f"segment1a.parameters.{cfg_name}",
        {name: "shipped (hashed into parameter_hash)", up_name: "upstream original, byte-identical (not read by the engine)"},
        sources,
        {"kind": "converted", **transformation},
    )


def build_hurdle(up: Upstream, out: Out, target: str) -> dict:
    raw, _ = up.read("hurdle")
    h = yaml.safe_load(raw)
    d = h["dicts"]
    if d["channel"] != list(CHANNELS) or d["gdp_bucket"] != [1, 2, 3, 4, 5]:
        raise BuildError("hurdle dicts not CP/CNP, 1..5")
    C = len(d["mcc"])
    if len(h["beta"]) != 1 + C + 2 + 5 or len(h["beta_mu"]) != 1 + C + 2:
        raise BuildError("hurdle beta lengths")
    md = h["metadata"]
    new = {
        "semver": str(h["semver"]),
        "version": str(h["version"]),
        "metadata": {
            "simulation_manifest": SRC["hurdle_sim_manifest"],
            "seed": int(md["rng_seed"]),
            "created_utc": str(md["generated_at_utc"]),
            "inputs": {
                "logistic_iterations": md["logistic_iterations"],
                "logistic_converged": md["logistic_converged"],
                "logistic_final_step": md["logistic_final_step"],
            },
        },
        "dict_mcc": list(d["mcc"]),
        "dict_ch": list(CHANNELS),
        "dict_dev5": [1, 2, 3, 4, 5],
        "design": {
            "beta_order": ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])", "gdp_bucket_onehot([1,2,3,4,5])"],
            "beta_mu_order": ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])"],
        },
        "beta": list(h["beta"]),
        "beta_mu": list(h["beta_mu"]),
    }
    converted_param(
        up,
        out,
        "hurdle",
        "hurdle_coefficients.yaml",
        target,
        new,
        [
            "Runbook-era layout dicts{mcc,channel,gdp_bucket} renamed to the HEAD names dict_mcc/dict_ch/dict_dev5",
            "plus design.beta_order/beta_mu_order (1A-S1-S4 §1.2, decision 20). Every coefficient is bit-identical.",
        ],
        {
            "summary": "Key layout only (decision 20; 1A-S1-S4 §1.2 and §6 C7): dicts.mcc -> dict_mcc, "
            "dicts.channel -> dict_ch (already [CP, CNP]), dicts.gdp_bucket -> dict_dev5, added design.beta_order "
            "and design.beta_mu_order (the block order the runbook-era file implied); metadata: "
            "rng_seed -> seed, generated_at_utc -> created_utc, logistic_* -> inputs, the upstream absolute "
            "Windows path of the training-simulation manifest replaced by its upstream-relative path. beta "
            "(989) and beta_mu (984) values bit-identical (checked by a YAML round trip at build time).",
            "mcc_count": C,
            "note": "Upstream hashed this file as CRLF bytes (MANIFEST.md line-ending table); no digest of this "
            "project depends on that.",
        },
        extra_sources=["hurdle_sim_manifest"],
    )
    return new


def build_nb(up: Upstream, out: Out, target: str, hurdle: dict) -> None:
    raw, _ = up.read("nb_dispersion")
    n = yaml.safe_load(raw)
    d = n["dicts"]
    if d["channel"] != list(CHANNELS):
        raise BuildError("nb dicts.channel not CP/CNP")
    if list(d["mcc"]) != hurdle["dict_mcc"]:
        raise BuildError("nb dict_mcc differs from hurdle dict_mcc")
    if len(n["beta_phi"]) != 1 + len(d["mcc"]) + 2 + 1:
        raise BuildError("beta_phi length")
    if n["design_order"] != {"intercept": True, "mcc_one_hot": True, "channel_block": True, "ln_gdp_pc_usd_2015": True}:
        raise BuildError("unexpected design_order")
    md = n["metadata"]
    new = {
        "semver": str(n["semver"]),
        "version": str(n["version"]),
        "metadata": {
            "simulation_manifest": SRC["nb_sim_manifest"],
            "seed": int(md["rng_seed"]),
            "created_utc": str(md["generated_at_utc"]),
        },
        "dict_mcc": list(d["mcc"]),
        "dict_ch": list(CHANNELS),
        "design": {
            "beta_phi_order": ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])", "ln_gdp_pc_usd_2015"],
        },
        "beta_phi": list(n["beta_phi"]),
    }
    converted_param(
        up,
        out,
        "nb_dispersion",
        "nb_dispersion_coefficients.yaml",
        target,
        new,
        [
            "Runbook-era layout dicts{mcc,channel} + design_order renamed to the HEAD names dict_mcc/dict_ch +",
            "design.beta_phi_order (1A-S1-S4 §2.2, decision 20). Every coefficient is bit-identical.",
        ],
        {
            "summary": "Key layout only (decision 20; 1A-S1-S4 §2.2 and §6 C7): dicts.mcc -> dict_mcc (equal to "
            "the hurdle file's, values and order), dicts.channel -> dict_ch, design_order{intercept, mcc_one_hot, "
            "channel_block, ln_gdp_pc_usd_2015} -> design.beta_phi_order; metadata rng_seed -> seed, "
            "generated_at_utc -> created_utc, absolute simulation-manifest path -> upstream-relative path. "
            "beta_phi (985) bit-identical. This is the corridor-safe 2025-10-24 refit the runbook names.",
        },
        extra_sources=["nb_sim_manifest"],
    )


def _star_or_list(v):
    if isinstance(v, list) and v == ["*"]:
        return "*"
    return v


def build_crossborder(up: Upstream, out: Out, target: str, iso_real: set[str]) -> None:
    raw, _ = up.read("crossborder")
    c = yaml.safe_load(raw)
    elig = c["eligibility"]
    rules = []
    for r in elig["rules"]:
        ch = _star_or_list(r["channel"])
        if ch != "*" and not set(ch) <= set(CHANNELS):
            raise BuildError(f"eligibility rule {r['id']}: channel outside CP/CNP")
        iso = _star_or_list(r["iso"])
        if iso != "*" and not set(iso) <= iso_real:
            raise BuildError(f"eligibility rule {r['id']}: ISO outside the ISO table")
        mcc = _star_or_list(r["mcc"])
        if mcc != "*":
            mcc = [str(x) if isinstance(x, int) else x for x in mcc]
            mcc = [f"{int(x):04d}" if re.fullmatch(r"\d{1,4}", x) else x for x in mcc]
        rules.append(
            {"id": r["id"], "priority": r["priority"], "decision": r["decision"], "mcc": mcc, "channel": ch, "iso": iso}
        )
    t = c["ztp_link"]
    zc = c["ztp_controls"]
    new = {
        "semver": str(c["semver"]),
        "version": str(c["version"]),
        "eligibility": {
            "rule_set_id": elig["rule_set_id"],
            "default_decision": elig["default_decision"],
            "rules": rules,
        },
        "ztp": {
            "rule_set_id": "ztp_link." + str(c["version"]),
            "theta_order": ["theta0_intercept", "theta1_log_n_sites", "theta2_openness"],
            "theta": {"theta0_intercept": t["theta0"], "theta1_log_n_sites": t["theta1"], "theta2_openness": t["theta2"]},
            "feature_x": {"feature_id": "openness", "x_default": c["X_default"], "x_transform": {"kind": "clamp01"}},
            "MAX_ZTP_ZERO_ATTEMPTS": zc["MAX_ZTP_ZERO_ATTEMPTS"],
            "ztp_exhaustion_policy": "downgrade_domestic",
        },
    }
    converted_param(
        up,
        out,
        "crossborder",
        "crossborder_hyperparams.yaml",
        target,
        new,
        [
            "Runbook-era 0.1.0 layout (ztp_link, ztp_controls, X_default) moved to the HEAD ztp block",
            "(1A-S1-S4 §4.2); ztp_exhaustion_policy abort -> downgrade_domestic (decision 18).",
            "Eligibility rules unchanged in meaning; channels are CP/CNP (decision 28).",
        ],
        {
            "summary": "Layout (decision 20; 1A-S1-S4 §4.2 'accept both, normalise to HEAD'): ztp_link{theta0, "
            "theta1, theta2} -> ztp.theta{theta0_intercept, theta1_log_n_sites, theta2_openness} with "
            "ztp.theta_order; X_default -> ztp.feature_x.x_default (feature_id openness, x_transform clamp01); "
            "ztp_controls.MAX_ZTP_ZERO_ATTEMPTS -> ztp.MAX_ZTP_ZERO_ATTEMPTS; ztp.rule_set_id added as "
            "'ztp_link.<version>'. Eligibility rules: same ids, priorities, decisions and sets; ['*'] written as "
            "'*', MCC codes written as 4-digit strings (6011 -> '6011'); channel words already CP/CNP.",
            "semantic_change": "ztp_exhaustion_policy 'abort' -> 'downgrade_domestic' (README decision 18: the "
            "embedded default never aborts on ZTP exhaustion).",
        },
    )


def build_rule_ladder(up: Upstream, out: Out, target: str, iso_real: set[str]) -> dict:
    raw, _ = up.read("rule_ladder")
    r = yaml.safe_load(raw)
    sets = {k: list(v["countries"]) for k, v in r["named_sets"].items()}
    for k, v in sets.items():
        if not set(v) <= iso_real:
            raise BuildError(f"rule ladder set {k} has codes outside the ISO table")
    reason_to_rule = {}
    for code, ids in r["reason_code_map"].items():
        if len(ids) != 1:
            raise BuildError("reason_code_map must be one-to-one")
        reason_to_rule[code] = ids[0]

    def predicate(text: str):
        text = text.strip()
        if text == "true":
            return {"op": "TRUE"}
        m = re.fullmatch(r"home_country_iso in ([A-Z_]+)", text)
        if m:
            return {"op": "IN_SET", "field": "home_country_iso", "set": m.group(1)}
        m = re.fullmatch(r'channel == "(card_present|card_not_present)"', text)
        if m:
            # decision 28: one channel vocabulary, the coefficient files' CP/CNP
            return {"op": "CHANNEL_IN", "values": ["CP" if m.group(1) == "card_present" else "CNP"]}
        raise BuildError(f"rule ladder predicate not convertible: {text!r}")

    rules = []
    for rule in r["rules"]:
        o = rule["outcome"]
        new_rule = {
            "rule_id": rule["rule_id"],
            "precedence": rule["precedence"],
            "priority": rule["priority"],
            "is_decision_bearing": rule["is_decision_bearing"],
            "predicate": predicate(rule["predicate"]),
            "outcome": {"reason_code": o["reason_code"], "tags": list(o.get("tags", []))},
        }
        if o.get("admit_named_sets"):
            new_rule["admit_sets"] = list(o["admit_named_sets"])
        if o.get("deny_named_sets"):
            new_rule["deny_sets"] = list(o["deny_named_sets"])
        # runbook 'crossborder' flag: HEAD derives it (DENY -> false, ALLOW -> true, DEFAULT -> false); check
        implied = {"DENY": False, "ALLOW": True, "DEFAULT": False}.get(rule["precedence"])
        if implied is not None and o.get("crossborder") is not None and bool(o["crossborder"]) != implied:
            raise BuildError(f"rule {rule['rule_id']}: crossborder flag disagrees with its precedence class")
        rules.append(new_rule)
    new = {
        "semver": str(r["semver"]),
        "version": str(r["version"]),
        "precedence_order": list(r["precedence_order"]),
        "reason_codes": list(r["reason_codes"]),
        "filter_tags": list(r["filter_tags"]),
        "country_sets": sets,
        "reason_code_to_rule_id": reason_to_rule,
        "rules": rules,
    }
    converted_param(
        up,
        out,
        "rule_ladder",
        "policy.s3.rule_ladder.yaml",
        target,
        new,
        [
            "Runbook-era string predicates and named_sets converted to the HEAD predicate DSL (1A-S1-S4 §3.2);",
            "channel == \"card_present\" -> CHANNEL_IN [CP] (decision 28).",
        ],
        {
            "summary": "Layout (1A-S1-S4 §3.2 'HEAD DSL only; convert the old file once', decision 20): "
            "named_sets{NAME:{countries}} -> country_sets{NAME: [...]}; reason_code_map{code: [rule_id]} -> "
            "reason_code_to_rule_id{code: rule_id}; string predicates -> DSL ('true' -> TRUE, "
            "'home_country_iso in SET' -> IN_SET, 'channel == \"card_present\"' -> CHANNEL_IN{values: [CP]}); "
            "outcome.admit_named_sets / deny_named_sets -> rule admit_sets / deny_sets; outcome.crossborder "
            "dropped (HEAD derives it from the precedence class; checked equal).",
            "semantic_change": "Channel word card_present -> CP (decision 28: the upstream ladder tested the merchant "
            "table's word while the engine's vocabulary is CP/CNP, so the ALLOW rule could never fire).",
        },
    )
    return new


def build_base_weight(up: Upstream, out: Out, target: str) -> None:
    new = {
        "version": "1.2.0",
        "dp": 7,
        "model": {"kind": "loglinear_rank_home", "coeffs": {"beta0": 0.0, "beta_home": 1.25, "beta_rank": -0.1}},
        "bounds": {"log_w_min": -50.0, "log_w_max": 50.0, "w_min": 1.0e-7, "w_max": 1.0e12},
    }
    converted_param(
        up,
        out,
        "base_weight",
        "policy.s3.base_weight.yaml",
        target,
        new,
        [
            "Replaced by the HEAD log-linear model with the HEAD values given in 1A-S1-S4 §3.2 (spec decision:",
            "'HEAD only'; the runbook-era rule/constant scoring cannot be expressed in it). Used only with s3_priors.",
        ],
        {
            "summary": "Not convertible key by key: the runbook-era file scores candidates by rules and constants "
            "(home_anchor 1.0, base_score 0.25, core_bonus 0.15 for OECD_CORE, 0 for SANCTIONED, dp 6), while the "
            "spec adopts HEAD's model 'loglinear_rank_home' only (1A-S1-S4 §3.2 and §6 C9). The shipped file "
            "holds the HEAD values printed in the spec (version 1.2.0, dp 7, beta0 0.0, beta_home 1.25, "
            "beta_rank -0.10, bounds log_w in [-50, 50], w in [1e-7, 1e12]; w_min >= 10^-dp). It is read only "
            "when segment1a.options.s3_priors is true (default false).",
            "values_source": "spec 1A-S1-S4 §3.2 (HEAD values)",
        },
    )


def build_thresholds(up: Upstream, out: Out, target: str) -> None:
    new = {
        "semver": "1.1.0",
        "version": "2025-12-31",
        "enabled": True,
        "home_min": 1,
        "force_at_least_one_foreign_if_foreign_present": True,
        "min_one_per_country_when_feasible": False,
        "foreign_cap_mode": "n_minus_home_min",
        "on_infeasible": "fail",
    }
    converted_param(
        up,
        out,
        "thresholds",
        "policy.s3.thresholds.yaml",
        target,
        new,
        [
            "Replaced by the HEAD role-based thresholds with the values given in 1A-S1-S4 §3.2 (§6 C8);",
            "per-country caps stay in policy.s3.bounds.yaml. Used only with s3_integerisation.",
        ],
        {
            "summary": "Not convertible key by key: the runbook-era file holds per-country floors/ceilings "
            "(GB 1/999999, US 1/999999) and dp_resid 8; the spec adopts HEAD's role-based thresholds plus the "
            "optional runbook-era per-country caps of policy.s3.bounds.yaml (1A-S1-S4 §3.2, §3.4 and §6 C8; "
            "dp_resid stays 8 by the spec). The shipped file holds the HEAD values printed in the spec. It is "
            "read only when segment1a.options.s3_integerisation is true (default false).",
            "values_source": "spec 1A-S1-S4 §3.2 (HEAD values)",
        },
    )


def build_s6(up: Upstream, out: Out, target: str) -> None:
    raw, _ = up.read("s6_selection")
    s = yaml.safe_load(raw)
    d = dict(s["defaults"])
    per = {k: dict(v) for k, v in s.get("per_currency", {}).items()}
    was = {"default": d["emit_membership_dataset"], **{k: v.get("emit_membership_dataset") for k, v in per.items()}}
    d["emit_membership_dataset"] = True
    for v in per.values():
        if "emit_membership_dataset" in v:
            v["emit_membership_dataset"] = True
    new = {"defaults": d, "per_currency": per}
    converted_param(
        up,
        out,
        "s6_selection",
        "s6_selection_policy.yaml",
        target,
        new,
        [
            f"Upstream policy_semver {s['policy_semver']!s}, policy_version {s['policy_version']!s} dropped: the schema allows",
            "only defaults/per_currency (1A-S5-S9 §3.1, ⚑10). emit_membership_dataset is all-or-nothing: true.",
        ],
        {
            "summary": "Layout (1A-S5-S9 §3.1 and ⚑10 'follow the schema'): top-level policy_semver/policy_version "
            "removed (recorded in the header comment and here). All other values unchanged except "
            "emit_membership_dataset.",
            "semantic_change": "emit_membership_dataset: upstream default false with USD true, which HEAD rejects "
            "(per-currency value must equal the default; the dataset is all-or-nothing). Set true everywhere so "
            "s6_membership is always produced.",
            "upstream_emit_membership_dataset": was,
            "upstream_policy_semver": str(s["policy_semver"]),
            "upstream_policy_version": str(s["policy_version"]),
        },
    )


# CUSUM threshold of the embedded default (project decision, see the provenance record): the in-control
# maximum of the one-sided CUSUM grows with the number of multi-site merchants M, so a fixed h has a
# false-alarm rate that rises with the table size. Measured by simulating the model's own rejection
# counts (r_m ~ Geometric(alpha_m), alphas of the 10^6-merchant benchmark table, 400 replicates):
# h = 16 false-alarms on 12.5% of seeds at the default table's M ~ 3,900 and on 100% at M ~ 214,000;
# h = 24 on 0.5% / 13%; h = 32 on 0% / 0.75%, while a drop of 0.1 in acceptance over the last 5,000
# merchants still trips h = 32 in 100 of 100 replicates.
S2_CUSUM_H = 32.0


def build_s2_validation(up: Upstream, out: Out, target: str) -> None:
    raw, _ = up.read("s2_validation")
    s = yaml.safe_load(raw)
    new = {k: v for k, v in s.items()}
    new["cusum"] = dict(s["cusum"])
    was_h = float(s["cusum"]["threshold_h"])
    new["cusum"]["threshold_h"] = S2_CUSUM_H
    converted_param(
        up,
        out,
        "s2_validation",
        "s2_validation_policy.yaml",
        target,
        new,
        [
            "Runbook-era S2 corridor policy (1A-S1-S4 §2.2, §6 C5): corridors rho_reject_max 0.20, p99_max 3;",
            f"CUSUM k {s['cusum']['reference_k']}. threshold_h raised from {was_h} to {S2_CUSUM_H}: with h = 16 the",
            "correctly specified model false-alarms on 12.5% of seeds at the default table and on every seed at",
            "10^6 merchants (upstream itself raised h to 24.0, then to 90.0 with alpha_cap 0.999).",
        ],
        {
            "summary": "Layout unchanged. cusum.threshold_h raised from the runbook-era 16.0 to "
            f"{S2_CUSUM_H}; every other value unchanged.",
            "semantic_change": "The in-control maximum of the one-sided CUSUM grows with the number of multi-site "
            "merchants, so a fixed h false-alarms more often on larger tables. Simulating the model's own "
            "rejection counts (r ~ Geometric(alpha), the 10^6-merchant benchmark's alphas, 400 replicates): "
            "h=16 fails 12.5% of seeds at M~3,900 (default table) and 100% at M~214,000 (10^6 merchants); "
            "h=24 (upstream's next value) 0.5% / 13%; h=32 0% / 0.75%. A drift of -0.1 in acceptance over "
            "the last 5,000 merchants still trips h=32 in 100/100 replicates.",
            "upstream_threshold_h": was_h,
            "shipped_threshold_h": S2_CUSUM_H,
        },
    )


# ------------------------------------------------------------------------------------------------
# coverage (decision 28)
# ------------------------------------------------------------------------------------------------


def coverage_report(
    merchants_target_csv: bytes,
    iso_real: set[str],
    settlement: dict[str, dict[str, float]],
    ccy: dict[str, dict[str, float]],
    ladder: dict,
    smoothing: dict,
) -> dict:
    """Check decision 28 and describe which default merchants can reach a foreign country with weight."""
    home_ccy_s = {iso: cur for cur, m in settlement.items() for iso in m}
    home_ccy_c = {iso: cur for cur, m in ccy.items() for iso in m}
    rows = [ln.split(",") for ln in merchants_target_csv.decode().split("\n")[1:] if ln]
    homes = sorted({r[3] for r in rows})
    problems = []
    for h in homes:
        cs = {cur for cur, m in settlement.items() if h in m}
        cc = {cur for cur, m in ccy.items() if h in m}
        if not (cs & cc):
            problems.append(h)
    if problems:
        raise BuildError(f"home countries without a currency present in both share tables: {problems}")
    for tbl in (settlement, ccy):
        outside = sorted({iso for m in tbl.values() for iso in m} - iso_real)
        if outside:
            raise BuildError(f"share-table countries outside the ISO table: {outside}")
    # one currency per country in both tables (so a home's currency is well defined)
    multi = sorted(iso for iso in iso_real if sum(iso in m for m in settlement.values()) > 1)
    # reach under the shipped S3 ladder: CP merchants with a non-sanctioned home admit PREFERRED_FOREIGN
    sets = ladder["country_sets"]
    deny_home = set(sets.get("SANCTIONED", []))
    admit = set(sets.get("PREFERRED_FOREIGN", []))
    widen: dict[str, set[str]] = {}
    for blk in ("alpha_iso", "min_share_iso"):
        for cur, m in ((smoothing.get("overrides") or {}).get(blk) or {}).items():
            widen.setdefault(cur, set()).update(m)
    n_cp = n_reach = 0
    by_ccy: dict[str, int] = {}
    for r in rows:
        ch, home = r[2], r[3]
        if ch != "card_present" or home in deny_home:
            continue
        n_cp += 1
        cur = home_ccy_s.get(home)
        support = set(settlement.get(cur, {})) | set(ccy.get(cur, {})) | widen.get(cur, set())
        if (admit - {home}) & support:
            n_reach += 1
            by_ccy[cur] = by_ccy.get(cur, 0) + 1
    return {
        "merchant_home_countries": len(homes),
        "every_home_has_a_currency_in_both_tables": True,
        "every_share_country_in_iso_table": True,
        "countries_in_more_than_one_currency": multi,
        "home_currency_equal_in_both_tables": all(home_ccy_s.get(h) == home_ccy_c.get(h) for h in homes),
        "reach_note": "Merchants that could receive foreign outlets under the shipped S3 ladder (CP channel, home "
        "not SANCTIONED: candidates PREFERRED_FOREIGN) AND whose home currency's S5 support (share-table countries "
        "plus smoothing-override ISOs) contains at least one such candidate; the others get ZERO_WEIGHT_DOMAIN "
        "in S6 even if S4 asks for foreign countries. Counted over all merchants, before the hurdle.",
        "cp_non_sanctioned_merchants": n_cp,
        "merchants_with_weighted_foreign_candidate": n_reach,
        "by_home_currency": dict(sorted(by_ccy.items())),
    }


# ------------------------------------------------------------------------------------------------


def build(upstream: Path, out_root: Path, config_path: Path) -> dict:
    cfg = yaml.safe_load(config_path.read_bytes())
    inputs = cfg["segment1a"]["inputs"]
    params = cfg["segment1a"]["parameters"]
    up = Upstream(upstream)
    out = Out(out_root)

    iso4217 = iso4217_codes(up)
    iso_real, iso_info = build_iso(up, out, inputs["iso_table"], iso4217)
    pseudo = iso_info["pseudo"]
    homes = build_merchants(up, out, inputs["merchant_table"], iso_real, pseudo)
    gdp = build_gdp(up, out, inputs["gdp_table"], iso_real, homes)
    build_buckets(up, out, inputs["bucket_table"], gdp, homes)

    for key, role in (("numeric_policy", "numeric_policy"), ("math_profile", "math_profile")):
        data, src = up.read(key)
        folder, name, stem, _ = split_path(inputs[role])
        out.add(inputs[role], data)
        provenance(
            out,
            folder,
            stem,
            f"segment1a.inputs.{role}",
            {name: f"shipped (sealed into manifest_fingerprint as role '{role}')"},
            [src],
            {"kind": "copy", "summary": "Byte-for-byte copy of the upstream governance artefact (the LF bytes the "
             "2025-10-09 S0 reference run hashed)."},
        )

    settlement = build_shares(up, out, "settlement_shares", params["settlement_shares.csv"], iso_real, pseudo, iso4217)
    ccy = build_shares(up, out, "ccy_country_shares", params["ccy_country_shares.csv"], iso_real, pseudo, iso4217)

    hurdle = build_hurdle(up, out, params["hurdle_coefficients.yaml"])
    build_nb(up, out, params["nb_dispersion_coefficients.yaml"], hurdle)
    build_crossborder(up, out, params["crossborder_hyperparams.yaml"], iso_real)
    ladder = build_rule_ladder(up, out, params["policy.s3.rule_ladder.yaml"], iso_real)
    build_base_weight(up, out, params["policy.s3.base_weight.yaml"])
    build_thresholds(up, out, params["policy.s3.thresholds.yaml"])
    build_s6(up, out, params["s6_selection_policy.yaml"])

    bounds = yaml.safe_load((upstream / SRC["bounds"]).read_bytes())
    bad = sorted(set(bounds.get("overrides", {})) - iso_real)
    if bad:
        raise BuildError(f"bounds overrides outside the ISO table: {bad}")
    copy_param(up, out, "bounds", "policy.s3.bounds.yaml", params["policy.s3.bounds.yaml"],
               "Runbook-era per-country site caps, intersected into S3 upper bounds (1A-S1-S4 §3.5).")
    smoothing = yaml.safe_load((upstream / SRC["ccy_smoothing"]).read_bytes())
    for blk in ("alpha_iso", "min_share_iso"):
        for cur, m in ((smoothing.get("overrides") or {}).get(blk) or {}).items():
            if cur not in settlement or not set(m) <= iso_real:
                raise BuildError(f"ccy smoothing override {blk}.{cur} not in the share tables / ISO table")
    copy_param(up, out, "ccy_smoothing", "ccy_smoothing_params.yaml", params["ccy_smoothing_params.yaml"],
               "Already in the layout of 1A-S5-S9 §2.1 (semver, version, dp, defaults{5 keys}, per_currency, overrides).")
    copy_param(up, out, "s7_integerisation", "s7_integerisation_policy.yaml", params["s7_integerisation_policy.yaml"],
               "Already in the layout of 1A-S5-S9 §4.1; Dirichlet and bounds lanes off (decision 10).")
    build_s2_validation(up, out, params["s2_validation_policy.yaml"])

    merchant_csv = out.files[str(Path(inputs["merchant_table"]).with_suffix(".csv").as_posix())]
    cov = coverage_report(merchant_csv, iso_real, settlement, ccy, ladder, smoothing)
    share_map = {iso: cur for cur, m in settlement.items() for iso in m}
    if share_map != {c: iso_info["tender"][c] for c in iso_real}:
        raise BuildError("ISO table currency column differs from the share tables' country -> currency map")
    cov["iso_currency_column_equals_share_tables"] = True
    # attach the decision-28 coverage record to both share provenances (rewrite them deterministically)
    for key in ("settlement_shares.csv", "ccy_country_shares.csv"):
        folder, _, stem, _ = split_path(params[key])
        rel = f"{folder}/{stem}.provenance.json"
        obj = json.loads(out.files[rel])
        obj["coverage_decision_28"] = cov
        out.files[rel] = json_bytes(obj)

    expected = set(inputs.values()) | set(params.values())
    missing = sorted(expected - set(out.files))
    if missing:
        raise BuildError(f"config.yaml names files this build does not produce: {missing}")
    out.write()
    return {"files": sorted(out.files), "coverage": cov}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", type=Path, default=REPO_ROOT.parent / "shared" / "upstream-data")
    ap.add_argument("--out", type=Path, default=REPO_ROOT)
    ap.add_argument("--config", type=Path, default=REPO_ROOT / "config.yaml")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = build(a.upstream.resolve(), a.out.resolve(), a.config.resolve())
    except BuildError as e:
        print(f"build_reference_1a: {e}", file=sys.stderr)
        return 1
    if not a.quiet:
        print(json.dumps({"written": len(res["files"]), "coverage": res["coverage"]}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

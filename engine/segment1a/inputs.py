"""Shared loaders of segment 1A's inputs, each validated with named errors.

Every loader reads one file, checks it and returns a normalised object; a bad file raises an
:class:`~engine.core.errors.EngineError` subclass carrying the spec's code, the file and the first
offending rows (00-core 6.2, 7.1). Nothing here writes anything.

* :func:`load_merchant_table`  merchant ingress (CSV or Parquet) -> ``pa.Table`` sorted by ``merchant_id``
  (uint64; decision 12), channel normalised to ``CP``/``CNP`` (decision 28).
* :func:`split_by_home_iso`    FK of ``home_country_iso`` to the ISO table (drop option, decision 11).
* :func:`load_iso_table`, :func:`load_gdp_table`, :func:`load_bucket_table`  reference tables.
* :func:`load_hurdle_coefficients`, :func:`load_dispersion_coefficients`, :func:`check_coefficients_aligned`
  coefficient YAMLs in either upstream layout (1A-S1-S4 C7), normalised to the HEAD names.
* :func:`load_crossborder_hyperparams`, :func:`check_eligibility_vocabulary`  eligibility rules (00-core 7.5),
  ZTP link (1A-S1-S4 4.2) and the openness heuristic constants (00-core 7.6), either layout.
* :func:`load_s2_validation_policy`  S2 corridor policy (1A-S1-S4 2.2, 2.6, C5).
* :func:`read_design_matrix`    the published S0 merchant universe (what S1+ read instead of the raw table).

CSV files are read with every column as a string and no NA inference (decision 12: Namibia is ``NA``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.core.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]
INGRESS_SCHEMA_PATH = REPO_ROOT / "contracts" / "schemas" / "1A" / "merchant_ids.ingress.schema.json"

U64_MAX = (1 << 64) - 1
U64_MAX_STR = str(U64_MAX)

# Internal channel vocabulary (decision 28) and the ingress spellings mapped onto it.
CHANNELS = ("CP", "CNP")
CHANNEL_ALIASES = {"card_present": "CP", "card_not_present": "CNP", "CP": "CP", "CNP": "CNP"}
GDP_YEAR = 2024  # 00-core 7.1: S0 uses observation_year = 2024 (constant 2015 USD)
BUCKETS = (1, 2, 3, 4, 5)

_ISO_RE = "^[A-Z]{2}$"


# --------------------------------------------------------------------------------------------
# generic helpers
# --------------------------------------------------------------------------------------------


def _rows(idx: np.ndarray, fmt) -> list[str]:
    """First offending rows rendered by ``fmt(i)`` (row index 0-based in file order)."""
    return [fmt(int(i)) for i in np.asarray(idx)[:10]]


def read_table_any(path: str | Path, *, code_missing: str = "E_REF_MISSING") -> pa.Table:
    """Read a CSV (all columns as non-null strings) or a Parquet file into a ``pa.Table``."""
    p = Path(path)
    try:
        if p.suffix.lower() in (".csv", ".txt"):
            import pyarrow.csv as pcsv

            with open(p, "rb") as f:
                header = f.readline().decode("utf-8-sig").rstrip("\r\n")
            names = next(iter(__import__("csv").reader([header])), [])
            types = {n: pa.string() for n in names}
            return pcsv.read_csv(
                p,
                read_options=pcsv.ReadOptions(encoding="utf-8"),
                # decision 12: no NA inference; empty stays "" (then fails the column's pattern)
                convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                    quoted_strings_can_be_null=False),
            )
        import pyarrow.parquet as pq

        return pq.read_table(p)
    except FileNotFoundError as e:
        raise InputError(code_missing, f"file not found: {e}", path=p) from e
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as e:
        raise InputError(code_missing, f"cannot read table: {e}", path=p) from e


def _col(table: pa.Table, name: str) -> pa.Array:
    c = table.column(name)
    return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def parse_u64_column(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Parse an id column into uint64 without ever going through a signed type (decision 12).

    Returns ``(values uint64, bad_mask)``; bad rows (null, non-decimal, negative, > 2^64-1, floats)
    hold 0 in ``values``. Accepts unsigned/signed integer columns and decimal strings.
    """
    n = len(arr)
    if pa.types.is_unsigned_integer(arr.type):
        bad = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), dtype=bool)
        vals = np.asarray(pc.fill_null(pc.cast(arr, pa.uint64()), 0).to_numpy(zero_copy_only=False), dtype=np.uint64)
        return vals, bad
    if pa.types.is_signed_integer(arr.type):
        a64 = pc.cast(arr, pa.int64())
        neg = pc.fill_null(pc.less(a64, 0), True)
        bad = np.asarray(pc.or_(pc.is_null(a64), neg).to_numpy(zero_copy_only=False), dtype=bool)
        safe = pc.if_else(pa.array(bad), 0, pc.fill_null(a64, 0))
        vals = np.asarray(pc.cast(safe, pa.uint64()).to_numpy(zero_copy_only=False), dtype=np.uint64)
        return vals, bad
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        s = pc.fill_null(pc.cast(arr, pa.string()), "")
        ok = pc.match_substring_regex(s, r"^[0-9]{1,20}$")
        # 20-digit strings must not exceed 2^64-1 (same length -> lexicographic = numeric order)
        too_big = pc.and_(pc.equal(pc.utf8_length(s), 20), pc.greater(s, U64_MAX_STR))
        good = pc.and_(ok, pc.invert(too_big))
        bad = ~np.asarray(good.to_numpy(zero_copy_only=False), dtype=bool)
        safe = pc.if_else(good, s, "0")
        vals = np.asarray(pc.cast(safe, pa.uint64()).to_numpy(zero_copy_only=False), dtype=np.uint64)
        return vals, bad
    return np.zeros(n, dtype=np.uint64), np.ones(n, dtype=bool)


def _parse_int_column(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Integer-or-decimal-string column -> (int64 values, bad_mask). Values beyond int64 are bad."""
    n = len(arr)
    if _is_int(arr.type):
        if pa.types.is_uint64(arr.type):
            over = pc.fill_null(pc.greater(arr, (1 << 63) - 1), True)
            bad = np.asarray(pc.or_(pc.is_null(arr), over).to_numpy(zero_copy_only=False), dtype=bool)
            safe = pc.if_else(pa.array(bad), pa.scalar(0, pa.uint64()), pc.fill_null(arr, 0))
            return np.asarray(pc.cast(safe, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64), bad
        bad = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), dtype=bool)
        return np.asarray(pc.fill_null(pc.cast(arr, pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64), bad
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        s = pc.fill_null(pc.cast(arr, pa.string()), "")
        good = pc.match_substring_regex(s, r"^-?[0-9]{1,18}$")
        bad = ~np.asarray(good.to_numpy(zero_copy_only=False), dtype=bool)
        safe = pc.if_else(good, s, "0")
        return np.asarray(pc.cast(safe, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64), bad
    return np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)


def _parse_float_column(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Float-or-string column -> (float64 values, bad_mask). Strings parse with RNE (pyarrow's parser)."""
    n = len(arr)
    if pa.types.is_floating(arr.type) or _is_int(arr.type):
        bad = np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False), dtype=bool)
        vals = np.asarray(pc.fill_null(pc.cast(arr, pa.float64()), 0.0).to_numpy(zero_copy_only=False), dtype=np.float64)
        return vals, bad
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        vals = np.zeros(n, dtype=np.float64)
        bad = np.zeros(n, dtype=bool)
        for i, s in enumerate(arr.to_pylist()):  # reference tables are small (one row per country)
            try:
                vals[i] = float(s)
            except (TypeError, ValueError):
                bad[i] = True
        return vals, bad
    return np.zeros(n, dtype=np.float64), np.ones(n, dtype=bool)


def _string_column(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type) or pa.types.is_dictionary(arr.type):
        s = pc.cast(arr, pa.string()) if not pa.types.is_dictionary(arr.type) else pc.cast(arr.dictionary_decode(), pa.string())
        bad = np.asarray(pc.is_null(s).to_numpy(zero_copy_only=False), dtype=bool)
        return pc.fill_null(s, ""), bad
    return pa.array([""] * len(arr), pa.string()), np.ones(len(arr), dtype=bool)


def _check_columns(table: pa.Table, required: list[str], optional: list[str], path, code: str,
                   allow_extra: bool = False) -> None:
    names = list(table.column_names)
    missing = [c for c in required if c not in names]
    extra = [c for c in names if c not in required and c not in optional]
    dup = sorted({c for c in names if names.count(c) > 1})
    problems = [f"missing column {c!r}" for c in missing] + [f"duplicate column {c!r}" for c in dup]
    if not allow_extra:
        problems += [f"unexpected column {c!r}" for c in extra]
    if problems:
        raise InputError(code, "table columns do not match the schema", path=path, rows=problems,
                         detail={"required": required, "optional": optional, "found": names})


# --------------------------------------------------------------------------------------------
# merchant ingress
# --------------------------------------------------------------------------------------------


def ingress_schema() -> dict:
    """The merchant ingress row schema (contracts/schemas/1A/merchant_ids.ingress.schema.json)."""
    return json.loads(INGRESS_SCHEMA_PATH.read_text())


def load_merchant_table(path: str | Path) -> pa.Table:
    """Validate the merchant ingress table and return it normalised.

    Returns a table with columns ``merchant_id`` (uint64), ``mcc`` (int32), ``channel`` (``CP``/``CNP``),
    ``home_country_iso`` (string), sorted by ``merchant_id`` (unsigned order). Optional upstream columns
    (``settlement_currency``, ``settlement_currency_vector``) are accepted and dropped.

    Errors: ``E_INGRESS_SCHEMA`` (columns, types, unparsable ids, ids outside 1..2^64-1, empty table,
    ISO not ``^[A-Z]{2}$``), ``E_MCC_OUT_OF_DOMAIN`` (MCC outside 0..9999), ``E_CHANNEL_VALUE``,
    ``E_INGRESS_PK_DUPLICATE``.
    """
    sch = ingress_schema()
    required = list(sch["required"])
    optional = [c for c in sch["x-column-order"] if c not in required] + list(sch.get("x-optional-ignored", []))
    table = read_table_any(path, code_missing="E_INGRESS_SCHEMA")
    _check_columns(table, required, optional, path, "E_INGRESS_SCHEMA")
    n = table.num_rows
    if n == 0:
        raise InputError("E_INGRESS_SCHEMA", "merchant table is empty (00-core 7.8)", path=path)

    raw_id = _col(table, "merchant_id")
    ids, bad = parse_u64_column(raw_id)
    bad |= ids == 0  # 00-core 7.1: merchant_id >= 1
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError(
            "E_INGRESS_SCHEMA",
            f"{idx.size} merchant_id value(s) are not integers in 1..{U64_MAX} (type {raw_id.type})",
            path=path,
            rows=_rows(idx, lambda i: f"row {i}: merchant_id={raw_id[i].as_py()!r}"),
        )

    raw_mcc = _col(table, "mcc")
    mcc, bad = _parse_int_column(raw_mcc)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_INGRESS_SCHEMA", f"{idx.size} mcc value(s) are not integers (type {raw_mcc.type})",
                         path=path, rows=_rows(idx, lambda i: f"row {i}: mcc={raw_mcc[i].as_py()!r}"))
    oob = (mcc < 0) | (mcc > 9999)
    if oob.any():
        idx = np.flatnonzero(oob)
        raise InputError("E_MCC_OUT_OF_DOMAIN", f"{idx.size} mcc value(s) outside 0..9999", path=path,
                         rows=_rows(idx, lambda i: f"row {i}: merchant_id={int(ids[i])} mcc={int(mcc[i])}"))

    ch_raw, bad = _string_column(_col(table, "channel"))
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_INGRESS_SCHEMA", "channel must be a non-null string", path=path,
                         rows=_rows(idx, lambda i: f"row {i}: channel={_col(table, 'channel')[i].as_py()!r}"))
    keys = pa.array(list(CHANNEL_ALIASES.keys()))
    vals = pa.array(list(CHANNEL_ALIASES.values()))
    pos = pc.index_in(ch_raw, value_set=keys)
    unknown = np.asarray(pc.is_null(pos).to_numpy(zero_copy_only=False), dtype=bool)
    if unknown.any():
        idx = np.flatnonzero(unknown)
        raise InputError(
            "E_CHANNEL_VALUE",
            f"{idx.size} channel value(s) outside {{card_present, card_not_present}} (00-core 7.1)",
            path=path,
            rows=_rows(idx, lambda i: f"row {i}: merchant_id={int(ids[i])} channel={ch_raw[i].as_py()!r}"),
        )
    channel = pc.take(vals, pos)

    iso, bad = _string_column(_col(table, "home_country_iso"))
    bad |= ~np.asarray(pc.match_substring_regex(iso, _ISO_RE).to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_INGRESS_SCHEMA", f"{idx.size} home_country_iso value(s) do not match {_ISO_RE}",
                         path=path,
                         rows=_rows(idx, lambda i: f"row {i}: merchant_id={int(ids[i])} home_country_iso={iso[i].as_py()!r}"))

    if n > 1 and bool(np.all(ids[1:] > ids[:-1])):  # already ascending and unique: keep as is
        return pa.table({"merchant_id": pa.array(ids, pa.uint64()), "mcc": pa.array(mcc.astype(np.int32), pa.int32()),
                         "channel": channel, "home_country_iso": iso})
    order = np.argsort(ids, kind="stable")  # unsigned order (numpy sorts uint64 as unsigned)
    sid = ids[order]
    dup = np.flatnonzero(sid[1:] == sid[:-1])
    if dup.size:
        dup_ids = np.unique(sid[dup])
        raise InputError("E_INGRESS_PK_DUPLICATE", f"{dup_ids.size} merchant_id value(s) occur more than once",
                         path=path, rows=[f"merchant_id={int(v)}" for v in dup_ids[:10]])
    take = pa.array(order)
    return pa.table({
        "merchant_id": pa.array(sid, pa.uint64()),
        "mcc": pa.array(mcc[order].astype(np.int32), pa.int32()),
        "channel": pc.take(channel, take),
        "home_country_iso": pc.take(iso, take),
    })


def load_merchants(arg: Any) -> pa.Table:
    """Merchant table with ``merchant_id`` (uint64), ``mcc``, ``channel`` (CP/CNP), ``home_country_iso``, sorted.

    * ``arg`` a path: the validated ingress table (:func:`load_merchant_table`).
    * ``arg`` a ``RunContext``: the run's merchant universe, i.e. the merchants S0 accepted (its published
      ``hurdle_design_matrix``; after a decision-11 drop this differs from the raw table). When S0 has not
      published yet, the same universe is derived from the configured files exactly as S0 does.
    """
    cfg = getattr(arg, "config", None)
    if not isinstance(cfg, dict):
        return load_merchant_table(arg)
    from engine.core.errors import EngineError

    try:
        dm = read_design_matrix(arg)
        return dm.select(["merchant_id", "mcc", "channel", "home_country_iso"])
    except EngineError as e:
        if e.code != "E_PARTITION_MISSING":
            raise
    ins = cfg["segment1a"]["inputs"]
    m = load_merchant_table(ins["merchant_table"])
    kept, _ = split_by_home_iso(m, iso_codes(load_iso_table(ins["iso_table"])), path=ins["merchant_table"],
                                drop=bool((cfg["segment1a"].get("options") or {}).get("drop_unplaceable_merchants")))
    return kept


def split_by_home_iso(merchants: pa.Table, iso_codes: np.ndarray, *, path=None,
                      drop: bool = False) -> tuple[pa.Table, pa.Table]:
    """FK ``home_country_iso`` -> ISO table. Returns ``(kept, dropped)``.

    Without ``drop`` any merchant whose home country is not in the ISO table raises ``E_FK_HOME_ISO``
    listing the countries (decision 11); with ``drop`` they are returned in ``dropped`` for the receipt.
    """
    home = _col(merchants, "home_country_iso")
    inset = np.asarray(pc.is_in(home, value_set=pa.array(np.asarray(iso_codes, dtype=object), pa.string()))
                       .to_numpy(zero_copy_only=False), dtype=bool)
    if inset.all():
        return merchants, merchants.slice(0, 0)
    bad = np.flatnonzero(~inset)
    if not drop:
        counts: dict[str, int] = {}
        for c in pc.take(home, pa.array(bad)).to_pylist():
            counts[c] = counts.get(c, 0) + 1
        raise InputError(
            "E_FK_HOME_ISO",
            f"{bad.size} merchant(s) have a home country that is not in the ISO table "
            f"({len(counts)} countries: {', '.join(sorted(counts))}); fix the table or set "
            "segment1a.options.drop_unplaceable_merchants: true to drop and count them (decision 11)",
            path=path,
            rows=_rows(bad, lambda i: f"merchant_id={merchants['merchant_id'][i].as_py()} "
                                      f"home_country_iso={home[i].as_py()!r}"),
            detail={"countries": {k: counts[k] for k in sorted(counts)}},
        )
    return merchants.filter(pa.array(inset)), merchants.filter(pa.array(~inset))


# --------------------------------------------------------------------------------------------
# reference tables
# --------------------------------------------------------------------------------------------


def _cfg_path(arg: Any, role: str) -> Any:
    """A loader argument may be a path or a ``RunContext`` (then the configured ``segment1a.inputs.<role>``)."""
    cfg = getattr(arg, "config", None)
    return cfg["segment1a"]["inputs"][role] if isinstance(cfg, dict) else arg


def load_iso_table(path: Any) -> pa.Table:
    """ISO 3166 table: ``country_iso`` unique ``^[A-Z]{2}$`` (other columns kept). Sorted by country_iso.

    ``path`` may also be a ``RunContext`` (the configured ``iso_table``)."""
    path = _cfg_path(path, "iso_table")
    t = read_table_any(path)
    if "country_iso" not in t.column_names:
        raise InputError("E_REF_SCHEMA", "ISO table lacks column 'country_iso'", path=path,
                         detail={"found": t.column_names})
    iso, bad = _string_column(_col(t, "country_iso"))
    bad |= ~np.asarray(pc.match_substring_regex(iso, _ISO_RE).to_numpy(zero_copy_only=False), dtype=bool)
    if t.num_rows == 0:
        raise InputError("E_REF_SCHEMA", "ISO table is empty", path=path)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_REF_SCHEMA", f"country_iso must match {_ISO_RE}", path=path,
                         rows=_rows(idx, lambda i: f"row {i}: country_iso={_col(t, 'country_iso')[i].as_py()!r}"))
    codes = np.asarray(iso.to_pylist(), dtype=object)
    u, cnt = np.unique(codes, return_counts=True)
    if (cnt > 1).any():
        raise InputError("E_REF_SCHEMA", "duplicate country_iso in the ISO table", path=path,
                         rows=[str(c) for c in u[cnt > 1]])
    t = t.set_column(t.column_names.index("country_iso"), "country_iso", iso)
    return t.take(pc.sort_indices(t, [("country_iso", "ascending")]))


def iso_codes(iso_table: pa.Table) -> np.ndarray:
    return np.asarray(iso_table.column("country_iso").to_pylist(), dtype=object)


def load_gdp_table(path: str | Path) -> dict[str, float]:
    """GDP per capita, ``observation_year == 2024`` rows only -> ``{country_iso: gdp_pc_usd_2015}``.

    Rows of other years are ignored (00-core 7.8). Two 2024 rows for one ISO -> ``E_REF_SCHEMA``;
    a non-finite or non-positive value -> ``E_GDP_NONPOS``. Countries outside the ISO table are not an
    error here (the upstream GDP table carries aggregates that decision 11 removed from the ISO table);
    only merchants' home countries must be covered (``E_GDP_MISSING``, checked in S0).
    """
    t = read_table_any(path)
    _check_columns(t, ["country_iso", "observation_year", "gdp_pc_usd_2015"], [], path, "E_REF_SCHEMA",
                   allow_extra=True)
    iso, bad_iso = _string_column(_col(t, "country_iso"))
    year, bad_y = _parse_int_column(_col(t, "observation_year"))
    val, bad_v = _parse_float_column(_col(t, "gdp_pc_usd_2015"))
    bad = bad_iso | bad_y | ~np.asarray(pc.match_substring_regex(iso, _ISO_RE).to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_REF_SCHEMA", "GDP table rows with a bad country_iso or observation_year", path=path,
                         rows=_rows(idx, lambda i: f"row {i}: {t.slice(i, 1).to_pylist()[0]}"))
    sel = year == GDP_YEAR
    codes = np.asarray(iso.to_pylist(), dtype=object)[sel]
    vals = val[sel]
    bad_v = bad_v[sel]
    u, cnt = np.unique(codes, return_counts=True) if codes.size else (np.array([]), np.array([]))
    if (cnt > 1).any():
        raise InputError("E_REF_SCHEMA", f"two or more {GDP_YEAR} GDP rows for a country (00-core 7.8)", path=path,
                         rows=[str(c) for c in u[cnt > 1]])
    nonpos = bad_v | ~np.isfinite(vals) | (vals <= 0.0)
    if nonpos.any():
        idx = np.flatnonzero(nonpos)
        raise InputError("E_GDP_NONPOS", f"GDP per capita must be finite and > 0 ({GDP_YEAR} rows)", path=path,
                         rows=[f"country_iso={codes[i]} gdp_pc_usd_2015={vals[i]!r}" for i in idx[:10]])
    order = np.argsort(codes, kind="stable")
    return {str(codes[i]): float(vals[i]) for i in order}


def load_bucket_table(path: str | Path) -> dict[str, int]:
    """GDP bucket map -> ``{country_iso: bucket_id}`` (precomputed Jenks K=5; never recomputed, 00-core 7.1).

    Duplicate ISO -> ``E_REF_SCHEMA``; bucket outside 1..5 -> ``E_BUCKET_RANGE``.
    """
    t = read_table_any(path)
    _check_columns(t, ["country_iso", "bucket_id"], [], path, "E_REF_SCHEMA", allow_extra=True)
    iso, bad_iso = _string_column(_col(t, "country_iso"))
    b, bad_b = _parse_int_column(_col(t, "bucket_id"))
    bad = bad_iso | ~np.asarray(pc.match_substring_regex(iso, _ISO_RE).to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise InputError("E_REF_SCHEMA", "bucket map rows with a bad country_iso", path=path,
                         rows=_rows(idx, lambda i: f"row {i}: {t.slice(i, 1).to_pylist()[0]}"))
    codes = np.asarray(iso.to_pylist(), dtype=object)
    u, cnt = np.unique(codes, return_counts=True)
    if (cnt > 1).any():
        raise InputError("E_REF_SCHEMA", "duplicate country_iso in the bucket map", path=path,
                         rows=[str(c) for c in u[cnt > 1]])
    rng_bad = bad_b | (b < 1) | (b > 5)
    if rng_bad.any():
        idx = np.flatnonzero(rng_bad)
        raise InputError("E_BUCKET_RANGE", "bucket_id must be an integer in 1..5", path=path,
                         rows=[f"row {i}: country_iso={codes[i]} bucket_id={_col(t, 'bucket_id')[int(i)].as_py()!r}"
                               for i in idx[:10]])
    order = np.argsort(codes, kind="stable")
    return {str(codes[i]): int(b[i]) for i in order}


# --------------------------------------------------------------------------------------------
# YAML parameter files
# --------------------------------------------------------------------------------------------


def load_yaml_file(path: str | Path, *, what: str = "parameter file") -> Any:
    """Read a YAML file; unreadable -> ``E_PARAM_IO``, malformed -> ``E_POLICY_INVALID``."""
    import yaml

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError("E_PARAM_IO", f"cannot read {what}: {e}", path=path) from e
    try:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        return yaml.load(data, Loader=loader)  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        raise InputError("E_POLICY_INVALID", f"malformed YAML in {what}: {e}", path=path) from e


def _require_mapping(doc: Any, path, what: str) -> dict:
    if not isinstance(doc, dict):
        raise InputError("E_POLICY_INVALID", f"{what} must be a YAML mapping, got {type(doc).__name__}", path=path)
    return doc


def _float_vector(v: Any, key: str, path) -> np.ndarray:
    if not isinstance(v, list) or not v:
        raise InputError("E_POLICY_INVALID", f"{key!r} must be a non-empty list of numbers", path=path)
    out = np.empty(len(v), dtype=np.float64)
    bad = []
    for i, x in enumerate(v):
        if isinstance(x, bool):
            bad.append(i)
            continue
        try:
            # PyYAML (YAML 1.1) reads "1e-3" without a dot as a string; float() parses it with RNE.
            f = float(x) if isinstance(x, (int, float, str)) else float("nan")
        except ValueError:
            f = float("nan")
        if not math.isfinite(f):
            bad.append(i)
        out[i] = f if math.isfinite(f) else 0.0
    if bad:
        raise InputError("E_POLICY_INVALID", f"{key!r} holds non-numeric or non-finite entries", path=path,
                         rows=[f"{key}[{i}] = {v[i]!r}" for i in bad[:10]])
    return out


def _int_list(v: Any, key: str, path, lo: int | None = None, hi: int | None = None) -> list[int]:
    if not isinstance(v, list) or not v:
        raise InputError("E_POLICY_INVALID", f"{key!r} must be a non-empty list of integers", path=path)
    bad = [i for i, x in enumerate(v) if isinstance(x, bool) or not isinstance(x, int)
           or (lo is not None and x < lo) or (hi is not None and x > hi)]
    if bad:
        raise InputError("E_POLICY_INVALID", f"{key!r} must hold integers in {lo}..{hi}", path=path,
                         rows=[f"{key}[{i}] = {v[i]!r}" for i in bad[:10]])
    return [int(x) for x in v]


@dataclass(frozen=True)
class HurdleCoefficients:
    """``hurdle_coefficients.yaml`` normalised to HEAD names (1A-S1-S4 1.2).

    Hurdle design ``[1 | onehot(dict_mcc) | onehot(CP, CNP) | onehot(bucket 1..5)]``; NB mean design
    ``[1 | onehot(dict_mcc) | onehot(CP, CNP)]`` (00-core 7.3).
    """

    dict_mcc: np.ndarray  # int32, authoritative column order of the MCC block
    dict_ch: tuple[str, ...]
    dict_dev5: tuple[int, ...]
    beta: np.ndarray  # float64, len 1 + C + 2 + 5
    beta_mu: np.ndarray  # float64, len 1 + C + 2
    path: str = ""

    @property
    def n_mcc(self) -> int:
        return int(self.dict_mcc.size)


@dataclass(frozen=True)
class DispersionCoefficients:
    """``nb_dispersion_coefficients.yaml``: design ``[1 | onehot(dict_mcc) | onehot(CP, CNP) | ln g]``."""

    dict_mcc: np.ndarray
    dict_ch: tuple[str, ...]
    beta_phi: np.ndarray  # float64, len 1 + C + 2 + 1
    path: str = ""


_BETA_ORDER = ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])", "gdp_bucket_onehot([1,2,3,4,5])"]
_BETA_MU_ORDER = ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])"]
_BETA_PHI_ORDER = ["intercept", "mcc_onehot(dict_mcc)", "ch_onehot(['CP','CNP'])", "ln_gdp_pc_usd_2015"]


def _norm_order(lst) -> list[str]:
    return [re.sub(r"\s+", "", str(x)).replace('"', "'") for x in lst]


def _dicts(doc: dict, path, *, with_bucket: bool) -> tuple[list[int], list[str], list[int] | None]:
    """Read the MCC / channel / bucket dictionaries in either layout (1A-S1-S4 C7)."""
    if "dict_mcc" in doc:
        mcc, ch, dev = doc.get("dict_mcc"), doc.get("dict_ch"), doc.get("dict_dev5")
    elif isinstance(doc.get("dicts"), dict):
        d = doc["dicts"]
        mcc, ch, dev = d.get("mcc"), d.get("channel"), d.get("gdp_bucket")
    else:
        raise InputError("E_POLICY_INVALID", "coefficient file has neither 'dict_mcc' nor 'dicts.mcc'", path=path)
    mcc_l = _int_list(mcc, "dict_mcc", path, 0, 9999)
    if len(set(mcc_l)) != len(mcc_l):
        seen, dups = set(), []
        for x in mcc_l:
            if x in seen:
                dups.append(x)
            seen.add(x)
        raise InputError("E_DSGN_SHAPE_MISMATCH", "dict_mcc has duplicate codes", path=path,
                         rows=[f"mcc {x}" for x in dups[:10]])
    if ch is None or list(ch) != list(CHANNELS):
        raise InputError("E_DSGN_SHAPE_MISMATCH", f"dict_ch must be exactly {list(CHANNELS)}, got {ch!r}", path=path)
    dev_l = None
    if with_bucket:
        if dev is None or list(dev) != list(BUCKETS):
            raise InputError("E_DSGN_SHAPE_MISMATCH", f"dict_dev5 must be exactly {list(BUCKETS)}, got {dev!r}",
                             path=path)
        dev_l = list(BUCKETS)
    return mcc_l, list(ch), dev_l


def load_hurdle_coefficients(path: str | Path) -> HurdleCoefficients:
    doc = _require_mapping(load_yaml_file(path, what="hurdle_coefficients.yaml"), path, "hurdle_coefficients.yaml")
    mcc, ch, dev = _dicts(doc, path, with_bucket=True)
    for k in ("beta", "beta_mu"):
        if k not in doc:
            raise InputError("E_POLICY_INVALID", f"hurdle_coefficients.yaml lacks {k!r}", path=path)
    beta = _float_vector(doc["beta"], "beta", path)
    beta_mu = _float_vector(doc["beta_mu"], "beta_mu", path)
    C = len(mcc)
    if beta.size != 1 + C + 2 + 5:
        raise InputError("E_DSGN_SHAPE_MISMATCH",
                         f"len(beta) = {beta.size} but the design has 1 + {C} + 2 + 5 = {1 + C + 7} columns",
                         path=path)
    if beta_mu.size != 1 + C + 2:
        raise InputError("E_DSGN_SHAPE_MISMATCH",
                         f"len(beta_mu) = {beta_mu.size} but the design has 1 + {C} + 2 = {1 + C + 2} columns",
                         path=path)
    design = doc.get("design")
    if isinstance(design, dict):
        for key, want in (("beta_order", _BETA_ORDER), ("beta_mu_order", _BETA_MU_ORDER)):
            if key in design and _norm_order(design[key]) != _norm_order(want):
                raise InputError("E_DSGN_SHAPE_MISMATCH", f"design.{key} must be {want}", path=path,
                                 detail={"found": design[key]})
    return HurdleCoefficients(np.asarray(mcc, dtype=np.int32), tuple(ch), tuple(dev), beta, beta_mu, str(path))


def load_dispersion_coefficients(path: str | Path) -> DispersionCoefficients:
    doc = _require_mapping(load_yaml_file(path, what="nb_dispersion_coefficients.yaml"), path,
                           "nb_dispersion_coefficients.yaml")
    mcc, ch, _ = _dicts(doc, path, with_bucket=False)
    if "beta_phi" not in doc:
        raise InputError("E_POLICY_INVALID", "nb_dispersion_coefficients.yaml lacks 'beta_phi'", path=path)
    beta_phi = _float_vector(doc["beta_phi"], "beta_phi", path)
    C = len(mcc)
    if beta_phi.size != 1 + C + 2 + 1:
        raise InputError("E_DSGN_SHAPE_MISMATCH",
                         f"len(beta_phi) = {beta_phi.size} but the design has 1 + {C} + 2 + 1 = {C + 4} columns",
                         path=path)
    do = doc.get("design_order")  # runbook layout: every block must be switched on
    if do is not None:
        want = ("intercept", "mcc_one_hot", "channel_block", "ln_gdp_pc_usd_2015")
        if not isinstance(do, dict) or any(do.get(k) is not True for k in want) or set(do) - set(want):
            raise InputError("E_DSGN_SHAPE_MISMATCH", f"design_order must switch on exactly {list(want)}",
                             path=path, detail={"found": do})
    design = doc.get("design")
    if isinstance(design, dict) and "beta_phi_order" in design:
        if _norm_order(design["beta_phi_order"]) != _norm_order(_BETA_PHI_ORDER):
            raise InputError("E_DSGN_SHAPE_MISMATCH", f"design.beta_phi_order must be {_BETA_PHI_ORDER}", path=path,
                             detail={"found": design["beta_phi_order"]})
    return DispersionCoefficients(np.asarray(mcc, dtype=np.int32), tuple(ch), beta_phi, str(path))


def check_coefficients_aligned(h: HurdleCoefficients, d: DispersionCoefficients) -> None:
    """The two files must share ``dict_mcc`` (values and order) and ``dict_ch`` (00-core 7.3)."""
    if h.dict_mcc.size != d.dict_mcc.size or not np.array_equal(h.dict_mcc, d.dict_mcc) or h.dict_ch != d.dict_ch:
        diff = np.flatnonzero(h.dict_mcc[: min(h.n_mcc, d.dict_mcc.size)] != d.dict_mcc[: min(h.n_mcc, d.dict_mcc.size)])
        rows = [f"position {i}: hurdle {int(h.dict_mcc[i])} vs dispersion {int(d.dict_mcc[i])}" for i in diff[:10]]
        if h.n_mcc != d.dict_mcc.size:
            rows.insert(0, f"|dict_mcc| hurdle {h.n_mcc} vs dispersion {d.dict_mcc.size}")
        raise InputError("E_DSGN_SHAPE_MISMATCH", "hurdle and dispersion coefficient dictionaries differ",
                         path=d.path, rows=rows, detail={"hurdle_file": h.path})


# ---- cross-border hyperparameters ----------------------------------------------------------


@dataclass(frozen=True)
class EligibilityRule:
    id: str
    priority: int
    decision: str  # "allow" | "deny"
    mcc_any: bool
    mcc_codes: tuple[int, ...]
    mcc_ranges: tuple[tuple[int, int], ...]
    channels: tuple[str, ...] | None  # None = "*"
    isos: tuple[str, ...] | None  # None = "*"
    reason: str | None = None


@dataclass(frozen=True)
class OpennessParams:
    """Constants of the v1 openness heuristic (00-core 7.6); overridable in the hyperparams file."""

    base: tuple[float, ...] = (0.06, 0.12, 0.20, 0.28, 0.35)  # buckets 1..5
    channel_delta: tuple[float, float] = (-0.04, 0.08)  # CP, CNP
    # (name, value, codes, ranges) in first-match order
    tilts: tuple[tuple[str, float, tuple[int, ...], tuple[tuple[int, int], ...]], ...] = (
        ("digital", 0.10, (), ((4810, 4899), (5960, 5969), (5815, 5818))),
        ("travel", 0.06, (4111, 4121, 4131, 4411, 4511, 4722, 4789, 7011), ((3000, 3999),)),
        ("retail", 0.03, (), ((5000, 5999),)),
    )
    source: str = "heuristic_v1:gdp_bucket+channel+mcc"


@dataclass(frozen=True)
class CrossborderHyperparams:
    rule_set_id: str
    default_decision: str
    rules: tuple[EligibilityRule, ...]
    ztp: dict  # normalised HEAD shape, see _norm_ztp
    openness: OpennessParams = field(default_factory=OpennessParams)
    path: str = ""


def _mcc_set(v: Any, rule_id: str, path) -> tuple[bool, tuple[int, ...], tuple[tuple[int, int], ...]]:
    """MCC set: ``"*"`` or a list of 4-digit codes / ints 0..9999 / inclusive ``"NNNN-MMMM"`` ranges."""
    items = [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v
    if not isinstance(items, list) or not items:
        raise InputError("E_ELIG_RULE_BAD_MCC", f"rule {rule_id!r}: mcc must be '*' or a non-empty list", path=path)
    if any(x == "*" for x in items):
        if len(items) != 1:
            raise InputError("E_ELIG_RULE_BAD_MCC", f"rule {rule_id!r}: '*' must stand alone", path=path)
        return True, (), ()
    codes, ranges, bad = [], [], []
    for x in items:
        if isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= 9999:
            codes.append(int(x))
        elif isinstance(x, str) and re.fullmatch(r"[0-9]{4}", x):
            codes.append(int(x))
        elif isinstance(x, str) and re.fullmatch(r"[0-9]{4}-[0-9]{4}", x):
            lo, hi = int(x[:4]), int(x[5:])
            if lo > hi:
                bad.append(x)
            else:
                ranges.append((lo, hi))
        else:
            bad.append(x)
    if bad:
        raise InputError("E_ELIG_RULE_BAD_MCC", f"rule {rule_id!r}: invalid MCC entries", path=path,
                         rows=[repr(b) for b in bad])
    return False, tuple(codes), tuple(ranges)


def _str_set(v: Any, rule_id: str, key: str, code: str, path) -> tuple[str, ...] | None:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise InputError(code, f"rule {rule_id!r}: {key} must be '*' or a non-empty list of strings", path=path)
    if "*" in items:
        if len(items) != 1:
            raise InputError(code, f"rule {rule_id!r}: '*' must stand alone in {key}", path=path)
        return None
    return tuple(items)


def _num(v: Any, key: str, path, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)) \
            or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise InputError("E_POLICY_INVALID", f"{key} must be a finite number in [{lo}, {hi}], got {v!r}", path=path)
    return float(v)


def _norm_ztp(doc: dict, path) -> dict:
    """ZTP link in either layout -> ``{theta_order, theta, feature_id, x_default, max_zero_attempts,
    exhaustion_policy, rule_set_id}`` (1A-S1-S4 4.2; runbook 0.1.0 ``ztp_link``/``ztp_controls``/``X_default``)."""
    if isinstance(doc.get("ztp"), dict):
        z = doc["ztp"]
        order = z.get("theta_order")
        theta = z.get("theta")
        fx = z.get("feature_x") or {}
        x_default = fx.get("x_default", 0.0) if isinstance(fx, dict) else None
        feature_id = fx.get("feature_id", "openness") if isinstance(fx, dict) else None
        max_att = z.get("MAX_ZTP_ZERO_ATTEMPTS", 64)
        policy = z.get("ztp_exhaustion_policy", "abort")
        rsid = z.get("rule_set_id")
    elif isinstance(doc.get("ztp_link"), dict):
        zl = doc["ztp_link"]
        order = ["theta0_intercept", "theta1_log_n_sites", "theta2_openness"]
        theta = {"theta0_intercept": zl.get("theta0"), "theta1_log_n_sites": zl.get("theta1"),
                 "theta2_openness": zl.get("theta2")}
        zc = doc.get("ztp_controls") or {}
        max_att = zc.get("MAX_ZTP_ZERO_ATTEMPTS", 64)
        policy = zc.get("ztp_exhaustion_policy", "abort")
        x_default = doc.get("X_default", 0.0)
        feature_id = "openness"
        rsid = None
    else:
        raise InputError("E_POLICY_INVALID", "crossborder_hyperparams.yaml has neither 'ztp' nor 'ztp_link'",
                         path=path)
    if not isinstance(order, list) or not isinstance(theta, dict) or sorted(map(str, order)) != sorted(map(str, theta)):
        raise InputError("E_POLICY_INVALID", "ztp theta_order must list exactly the keys of theta", path=path,
                         detail={"theta_order": order, "theta": theta})
    known = {"theta0_intercept", "theta1_log_n_sites", "theta2_openness"}
    if set(order) - known:
        raise InputError("E_POLICY_INVALID", f"unknown ztp theta terms {sorted(set(order) - known)}", path=path)
    th = {str(k): _num(theta[k], f"ztp theta {k}", path) for k in order}
    xd = _num(x_default, "ztp x_default", path, 0.0, 1.0)
    if isinstance(max_att, bool) or not isinstance(max_att, int) or max_att < 1:
        raise InputError("E_POLICY_INVALID", f"MAX_ZTP_ZERO_ATTEMPTS must be an integer >= 1, got {max_att!r}",
                         path=path)
    if policy not in ("abort", "downgrade_domestic"):
        raise InputError("E_POLICY_INVALID", f"ztp_exhaustion_policy must be abort|downgrade_domestic, got {policy!r}",
                         path=path)
    return {"theta_order": [str(k) for k in order], "theta": th, "feature_id": str(feature_id), "x_default": xd,
            "max_zero_attempts": int(max_att), "exhaustion_policy": str(policy),
            "rule_set_id": None if rsid is None else str(rsid)}


def _norm_openness(doc: dict, path) -> OpennessParams:
    """Optional ``crossborder_features.openness`` block overriding the 00-core 7.6 constants."""
    block = (doc.get("crossborder_features") or {}).get("openness") if isinstance(doc.get("crossborder_features"), dict) \
        else None
    if block is None:
        return OpennessParams()
    if not isinstance(block, dict):
        raise InputError("E_POLICY_INVALID", "crossborder_features.openness must be a mapping", path=path)
    d = OpennessParams()
    base = block.get("base", {b: d.base[b - 1] for b in BUCKETS})
    if not isinstance(base, dict) or sorted(int(k) for k in base) != list(BUCKETS):
        raise InputError("E_POLICY_INVALID", "openness.base must map buckets 1..5 to numbers", path=path)
    base_t = tuple(_num(base[k], f"openness.base[{k}]", path) for k in sorted(base, key=int))
    cd = block.get("channel_delta", {"CP": d.channel_delta[0], "CNP": d.channel_delta[1]})
    if not isinstance(cd, dict) or sorted(cd) != sorted(CHANNELS):
        raise InputError("E_POLICY_INVALID", "openness.channel_delta must map exactly CP and CNP", path=path)
    tilts_in = block.get("mcc_tilts")
    tilts = d.tilts
    if tilts_in is not None:
        if not isinstance(tilts_in, list):
            raise InputError("E_POLICY_INVALID", "openness.mcc_tilts must be a list", path=path)
        tl = []
        for t in tilts_in:
            if not isinstance(t, dict) or "mcc" not in t or "value" not in t:
                raise InputError("E_POLICY_INVALID", "each openness.mcc_tilts entry needs mcc and value", path=path)
            name = str(t.get("name", f"tilt{len(tl)}"))
            anyv, codes, ranges = _mcc_set(t["mcc"], name, path)
            if anyv:
                ranges = ((0, 9999),)
            tl.append((name, _num(t["value"], f"openness.mcc_tilts[{name}].value", path), codes, ranges))
        tilts = tuple(tl)
    return OpennessParams(base=base_t,
                          channel_delta=(_num(cd["CP"], "openness.channel_delta.CP", path),
                                         _num(cd["CNP"], "openness.channel_delta.CNP", path)),
                          tilts=tilts, source=str(block.get("source", d.source)))


def load_crossborder_hyperparams(path: str | Path) -> CrossborderHyperparams:
    """Eligibility rule set (00-core 7.5; codes ``E_ELIG_*``) + ZTP link + openness constants.

    Structural checks only; the vocabularies (ISO set, ``dict_mcc``) are checked by
    :func:`check_eligibility_vocabulary` once they are loaded.
    """
    doc = _require_mapping(load_yaml_file(path, what="crossborder_hyperparams.yaml"), path,
                           "crossborder_hyperparams.yaml")
    el = doc.get("eligibility")
    if not isinstance(el, dict):
        raise InputError("E_POLICY_INVALID", "crossborder_hyperparams.yaml lacks the 'eligibility' mapping", path=path)
    rsid = el.get("rule_set_id")
    if not isinstance(rsid, str) or not rsid.strip():
        raise InputError("E_ELIG_RULESET_ID_EMPTY", "eligibility.rule_set_id must be a non-empty string", path=path)
    default = el.get("default_decision")
    if default not in ("allow", "deny"):
        raise InputError("E_ELIG_DEFAULT_INVALID", f"eligibility.default_decision must be allow|deny, got {default!r}",
                         path=path)
    rules_in = el.get("rules", [])
    if not isinstance(rules_in, list):
        raise InputError("E_POLICY_INVALID", "eligibility.rules must be a list", path=path)
    rules, seen = [], set()
    for i, r in enumerate(rules_in):
        if not isinstance(r, dict):
            raise InputError("E_POLICY_INVALID", f"eligibility.rules[{i}] must be a mapping", path=path)
        rid = r.get("id")
        if not isinstance(rid, str) or not rid or not rid.isascii():
            raise InputError("E_POLICY_INVALID", f"eligibility.rules[{i}].id must be a non-empty ASCII string",
                             path=path)
        if rid in seen:
            raise InputError("E_ELIG_RULE_DUP_ID", f"duplicate eligibility rule id {rid!r}", path=path, rows=[rid])
        seen.add(rid)
        pr = r.get("priority")
        if isinstance(pr, bool) or not isinstance(pr, int) or not 0 <= pr <= (1 << 31) - 1:
            raise InputError("E_POLICY_INVALID", f"rule {rid!r}: priority must be an integer in 0..2^31-1", path=path)
        dec = r.get("decision")
        if dec not in ("allow", "deny"):
            raise InputError("E_POLICY_INVALID", f"rule {rid!r}: decision must be allow|deny, got {dec!r}", path=path)
        for k in ("mcc", "channel", "iso"):
            if k not in r:
                raise InputError("E_POLICY_INVALID", f"rule {rid!r}: missing {k!r}", path=path)
        mcc_any, codes, ranges = _mcc_set(r["mcc"], rid, path)
        chans = _str_set(r["channel"], rid, "channel", "E_ELIG_RULE_BAD_CHANNEL", path)
        if chans is not None:
            badc = [c for c in chans if c not in CHANNELS]
            if badc:  # decision 28: a rule that can never match is an error
                raise InputError("E_ELIG_RULE_BAD_CHANNEL",
                                 f"rule {rid!r}: channel values outside {list(CHANNELS)} (decision 28)",
                                 path=path, rows=[repr(c) for c in badc])
        isos = _str_set(r["iso"], rid, "iso", "E_ELIG_RULE_BAD_ISO", path)
        if isos is not None:
            badi = [c for c in isos if not re.fullmatch(r"[A-Z]{2}", c)]
            if badi:
                raise InputError("E_ELIG_RULE_BAD_ISO", f"rule {rid!r}: iso values must be upper-case ISO2", path=path,
                                 rows=[repr(c) for c in badi])
        reason = r.get("reason")
        rules.append(EligibilityRule(rid, int(pr), dec, mcc_any, codes, ranges, chans, isos,
                                     None if reason is None else str(reason)))
    return CrossborderHyperparams(rsid, default, tuple(rules), _norm_ztp(doc, path), _norm_openness(doc, path),
                                  str(path))


def check_eligibility_vocabulary(cb: CrossborderHyperparams, iso_codes_: np.ndarray, dict_mcc: np.ndarray) -> None:
    """Decision 28: every ISO named by a rule is in the ISO table; every single MCC is in ``dict_mcc`` and every
    MCC range contains at least one of its codes (a rule part that can never match is an error)."""
    iso_set = set(map(str, iso_codes_))
    mcc_set = set(int(x) for x in np.asarray(dict_mcc))
    mcc_arr = np.asarray(dict_mcc)
    for r in cb.rules:
        if r.isos is not None:
            bad = [c for c in r.isos if c not in iso_set]
            if bad:
                raise InputError("E_ELIG_RULE_BAD_ISO", f"rule {r.id!r}: countries not in the ISO table",
                                 path=cb.path, rows=bad)
        bad_m = [c for c in r.mcc_codes if c not in mcc_set]
        bad_m += [f"{lo:04d}-{hi:04d}" for lo, hi in r.mcc_ranges if not ((mcc_arr >= lo) & (mcc_arr <= hi)).any()]
        if bad_m:
            raise InputError("E_ELIG_RULE_BAD_MCC",
                             f"rule {r.id!r}: MCC codes/ranges outside the coefficient dictionary (can never match)",
                             path=cb.path, rows=[str(x) for x in bad_m])


# ---- S2 validation policy -------------------------------------------------------------------

S2_SPEC_RHO_MAX = 0.06  # 1A-S1-S4 2.6 spec constants (C5: defaults, overridable by 'corridors')
S2_SPEC_P99_MAX = 3


def load_s2_validation_policy(path: str | Path) -> dict:
    """-> ``{rho_reject_max, p99_max, cusum_k, cusum_h, alpha_cap}``; k, h required > 0 (fail closed,
    ``ERR_S2_CORRIDOR_POLICY_MISSING``); ``alpha_cap`` in (0, 1], default 1.0."""
    doc = _require_mapping(load_yaml_file(path, what="s2_validation_policy.yaml"), path, "s2_validation_policy.yaml")
    cus = doc.get("cusum")
    if not isinstance(cus, dict) or "reference_k" not in cus or "threshold_h" not in cus:
        raise InputError("ERR_S2_CORRIDOR_POLICY_MISSING", "cusum.reference_k and cusum.threshold_h are required",
                         path=path)
    k = _num(cus["reference_k"], "cusum.reference_k", path)
    h = _num(cus["threshold_h"], "cusum.threshold_h", path)
    if k <= 0 or h <= 0:
        raise InputError("ERR_S2_CORRIDOR_POLICY_MISSING", "cusum k and h must be > 0", path=path)
    cap = _num(cus.get("alpha_cap", 1.0), "cusum.alpha_cap", path, 0.0, 1.0)
    if cap <= 0:
        raise InputError("E_POLICY_INVALID", "cusum.alpha_cap must be in (0, 1]", path=path)
    cor = doc.get("corridors") or {}
    if not isinstance(cor, dict):
        raise InputError("E_POLICY_INVALID", "corridors must be a mapping", path=path)
    rho = _num(cor.get("rho_reject_max", S2_SPEC_RHO_MAX), "corridors.rho_reject_max", path, 0.0, 1.0)
    p99 = cor.get("p99_max", S2_SPEC_P99_MAX)
    if isinstance(p99, bool) or not isinstance(p99, (int, float)) or p99 < 0:
        raise InputError("E_POLICY_INVALID", "corridors.p99_max must be a number >= 0", path=path)
    return {"rho_reject_max": rho, "p99_max": p99, "cusum_k": k, "cusum_h": h, "alpha_cap": cap}


# --------------------------------------------------------------------------------------------
# the published S0 universe
# --------------------------------------------------------------------------------------------


def read_design_matrix(ctx) -> pa.Table:
    """Read S0's ``hurdle_design_matrix`` for this run (the merchant universe every later 1A state uses).

    Checks path<->embed equality of ``parameter_hash`` (1A-S1-S4 0: read discipline) and returns the table
    sorted by ``merchant_id``.
    """
    from engine.core import publish

    p = ctx.path("hurdle_design_matrix")
    t = publish.read_parquet_dir(p)  # missing partition -> E_PARTITION_MISSING (run S0 first)
    if t.num_rows:
        ph = pc.unique(t.column("parameter_hash")).to_pylist()
        if ph != [ctx.ids.parameter_hash]:
            raise InputError("E_PARTITION_MISMATCH", "embedded parameter_hash differs from the path token", path=p,
                             rows=[str(x) for x in ph[:10]])
    return t.take(pc.sort_indices(t, [("merchant_id", "ascending")]))

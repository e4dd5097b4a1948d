"""1B S3 - ``s3_requirements``: sites required per (merchant, legal country) (spec 1B 5; decision 11).

No RNG. The only count source is 1A's ``outlet_catalogue``, read after the gate (the S0 receipt, and the
catalogue bytes S0 verified; :func:`engine.segment1b.s0_gate.read_catalogue`).

Per pair ``n_sites = count(rows)``; the pair's ``site_order`` values must be exactly ``1..n_sites``
(``E314_SITE_ORDER_INTEGRITY``) and agree with ``final_country_outlet_count`` (``E308_COUNTS_MISMATCH``);
the country must be an upper-case ISO code of the ISO table (``E302_FK_COUNTRY``) and must have tiles in
``tile_weights`` (``E303_MISSING_WEIGHTS``, decision 11: never dropped silently -- the error lists every such
country with the number of merchants and sites affected). ``n_sites = 0`` cannot be emitted (a pair exists
only through its rows).

Vectorised: one stable sort of the (merchant, country, site_order) keys in numpy, run boundaries, and
segment reductions; the output is already in writer order (merchant_id, legal_country_iso).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.core import publish
from engine.core.errors import InputError, ModelError

SEGMENT = "1B"
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"
MAX_ROWS = 10


# ============================================================================================
# pure compute
# ============================================================================================
def iso_codes_array(col) -> tuple[np.ndarray, np.ndarray]:
    """Dictionary-encode an ISO column: ``(codes int32, labels)``; labels sorted A-Z so code order = ISO order.

    A dictionary-typed column (as read with ``read_dictionary``) is used as is (no string materialisation)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.unify_dictionaries() if pa.types.is_dictionary(col.type) else col
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    else:
        arr = col
    if arr.null_count:
        raise InputError("E302_FK_COUNTRY", "legal_country_iso is null", rows=np.flatnonzero(
            np.asarray(pc.is_null(arr).to_numpy(zero_copy_only=False)))[:MAX_ROWS].tolist())
    enc = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr.cast(pa.string()))
    labels = np.asarray(enc.dictionary.cast(pa.string()).to_pylist(), dtype=object).astype(str)
    if len(set(labels.tolist())) != labels.shape[0]:  # a dictionary with repeated values: re-encode
        enc = pc.dictionary_encode(arr.cast(pa.string()))
        labels = np.asarray(enc.dictionary.to_pylist(), dtype=object).astype(str)
    order = np.argsort(labels, kind="stable")
    remap = np.empty(order.shape[0], np.int32)
    remap[order] = np.arange(order.shape[0], dtype=np.int32)
    codes = remap[np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)]
    return codes, labels[order]


def sorted_by(*keys: np.ndarray) -> bool:
    """True iff rows are strictly increasing by the key tuple (primary key first): writer order, no duplicates."""
    n = keys[0].shape[0]
    if n < 2:
        return True
    gt = np.zeros(n - 1, dtype=bool)
    eq = np.ones(n - 1, dtype=bool)
    for k in keys:
        a, b = k[1:], k[:-1]
        gt |= eq & (a > b)
        eq &= a == b
    return bool(gt.all())


def requirements(merchant_id: np.ndarray, iso_code: np.ndarray, iso_labels: np.ndarray, site_order: np.ndarray,
                 final_count: np.ndarray | None = None) -> dict:
    """Group catalogue rows into pairs. Inputs are parallel arrays (merchant_id uint64, iso_code int32 indexing
    ``iso_labels`` which is A-Z, site_order int). Returns ``{merchant_id, iso_code, n_sites}`` per pair in
    (merchant_id, ISO) order. Raises E314 / E308."""
    mid = np.ascontiguousarray(merchant_id, dtype=np.uint64)
    iso = np.ascontiguousarray(iso_code, dtype=np.int32)
    so = np.ascontiguousarray(site_order, dtype=np.int64)
    n = mid.shape[0]
    if n == 0:
        return {"merchant_id": mid, "iso_code": iso, "n_sites": np.zeros(0, np.int64)}
    # outlet_catalogue is written in (merchant, country, site_order) order: sort only if it is not
    order = np.arange(n) if sorted_by(mid, iso, so) else np.lexsort((so, iso, mid))
    m_s, i_s, s_s = mid[order], iso[order], so[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (m_s[1:] != m_s[:-1]) | (i_s[1:] != i_s[:-1])
    starts = np.flatnonzero(new)
    counts = np.diff(np.append(starts, n))
    pair = np.cumsum(new) - 1
    # site_order must be exactly 1..n in every pair: sorted, so position-in-pair + 1 == site_order
    pos = np.arange(n) - starts[pair]
    bad = s_s != pos + 1
    if bad.any():
        bp = np.unique(pair[bad])[:MAX_ROWS]
        rows = [f"merchant_id={int(m_s[starts[p]])} legal_country_iso={iso_labels[i_s[starts[p]]]}: site_order "
                f"{s_s[starts[p]:starts[p] + counts[p]][:12].tolist()} (rows {counts[p]})" for p in bp.tolist()]
        raise InputError("E314_SITE_ORDER_INTEGRITY",
                         "outlet_catalogue site_order is not exactly 1..n_sites within a (merchant, country)",
                         rows=rows, detail={"pairs_failed": int(np.unique(pair[bad]).size)})
    if final_count is not None:
        fc = np.asarray(final_count, dtype=np.int64)[order]
        badc = fc != counts[pair]
        if badc.any():
            bp = np.unique(pair[badc])[:MAX_ROWS]
            rows = [f"merchant_id={int(m_s[starts[p]])} legal_country_iso={iso_labels[i_s[starts[p]]]}: rows "
                    f"{int(counts[p])}, final_country_outlet_count {int(fc[starts[p]])}" for p in bp.tolist()]
            raise InputError("E308_COUNTS_MISMATCH",
                             "outlet_catalogue rows per (merchant, country) differ from final_country_outlet_count",
                             rows=rows, detail={"pairs_failed": int(np.unique(pair[badc]).size)})
    return {"merchant_id": m_s[starts], "iso_code": i_s[starts], "n_sites": counts.astype(np.int64)}


def check_countries(iso_labels: np.ndarray, req: dict, iso_table: set[str] | None, weight_countries: set[str]) -> None:
    """E302 (not an upper-case ISO code of the ISO table) and E303 (no tiles, decision 11) over the pairs."""
    used = np.flatnonzero(np.bincount(req["iso_code"], minlength=len(iso_labels)))  # = np.unique, no sort
    labels = [str(iso_labels[c]) for c in used.tolist()]

    def affected(bad_labels: list[str]) -> list[str]:
        out = []
        for lab in bad_labels:
            code = int(np.flatnonzero(iso_labels == lab)[0])
            sel = req["iso_code"] == code
            out.append(f"{lab}: {int(np.unique(req['merchant_id'][sel]).size)} merchants, "
                       f"{int(req['n_sites'][sel].sum())} sites")
        return out

    bad_fk = [c for c in labels if len(c) != 2 or not c.isascii() or not c.isalpha() or not c.isupper()
              or (iso_table is not None and c not in iso_table)]
    if bad_fk:
        raise InputError("E302_FK_COUNTRY", "outlet_catalogue legal_country_iso values are not ISO codes of the ISO "
                         "table", rows=affected(bad_fk), detail={"countries": bad_fk})
    missing = [c for c in labels if c not in weight_countries]
    if missing:
        rows = affected(missing)
        sel = np.isin(req["iso_code"], [int(np.flatnonzero(iso_labels == c)[0]) for c in missing])
        raise InputError(
            "E303_MISSING_WEIGHTS",
            f"{len(missing)} countries required by outlet_catalogue have no tiles in tile_weights (no polygon, or no "
            f"raster cell inside it): {', '.join(missing)}. Sites are never dropped silently (decision 11): fix the "
            "polygons / grid, or let 1A drop these merchants (segment1a.options.drop_unplaceable_merchants)",
            rows=rows,
            detail={"countries": missing, "merchants_affected": int(np.unique(req["merchant_id"][sel]).size),
                    "sites_affected": int(req["n_sites"][sel].sum())})


# ============================================================================================
# inputs
# ============================================================================================
def weight_countries(weights_dir: Path) -> set[str]:
    """Countries with at least one row in a ``tile_weights`` partition (per-country ``part-<ISO>.parquet``
    files; a partition written as generic part files is read for its ``country_iso`` column)."""
    from engine.segment1b import spatial

    d = Path(weights_dir)
    if not d.is_dir():
        raise InputError("E303_MISSING_WEIGHTS", "tile_weights partition not found (run 1B S2)", path=d)
    out: set[str] = set()
    per_country = spatial.partition_countries(d)
    if per_country:
        for iso in per_country:
            if pq.ParquetFile(d / spatial.country_part_name(iso)).metadata.num_rows > 0:
                out.add(iso)
        return out
    for p in sorted(d.glob("part-*.parquet")):
        col = publish.read_parquet_file(p, columns=["country_iso"])["country_iso"]
        out.update(str(v) for v in pc.unique(col).to_pylist() if v is not None)
    return out


def read_dataset(directory, schema_path, dict_cols=("legal_country_iso",)) -> pa.Table:
    """A 1B S3-S6 partition (``part-*.parquet`` in name order) with the schema's columns and types, the
    ``dict_cols`` kept dictionary-encoded as stored (cheap ISO codes; values unchanged)."""
    from engine.core.schema import arrow_schema

    schema = arrow_schema(schema_path)
    parts = publish.part_files(directory)
    dc = [c for c in dict_cols if c in schema.names]
    tables = []
    for p in parts:
        t = publish.read_parquet_file(p, columns=schema.names, read_dictionary=dc)
        cols = []
        for f in schema:
            c = t[f.name]
            cols.append(c if f.name in dc else c.cast(f.type))
        tables.append(pa.table(cols, names=schema.names))
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables([t.unify_dictionaries() for t in tables], promote_options="permissive")


def iso_table_codes(ctx) -> set[str] | None:
    p = ((ctx.config.get("segment1a") or {}).get("inputs") or {}).get("iso_table")
    if not p:
        return None
    from engine.segment1b.s0_gate import load_iso_codes

    return load_iso_codes(p)


def compute(ctx) -> pa.Table:
    from engine.segment1b import s0_gate

    receipt = s0_gate.require_receipt(ctx)
    cat = s0_gate.read_catalogue(ctx, ["merchant_id", "legal_country_iso", "site_order",
                                       "final_country_outlet_count"], receipt, dictionary=True)
    codes, labels = iso_codes_array(cat["legal_country_iso"])
    req = requirements(np.asarray(cat["merchant_id"].to_numpy(), dtype=np.uint64), codes, labels,
                       np.asarray(cat["site_order"].to_numpy(), dtype=np.int64),
                       np.asarray(cat["final_country_outlet_count"].to_numpy(), dtype=np.int64))
    check_countries(labels, req, iso_table_codes(ctx), weight_countries(Path(ctx.path("tile_weights"))))
    return to_table(req, labels)


def to_table(req: dict, labels: np.ndarray) -> pa.Table:
    iso = pa.DictionaryArray.from_arrays(pa.array(req["iso_code"], pa.int32()), pa.array(list(labels), pa.string()))
    return pa.table({"merchant_id": pa.array(req["merchant_id"], pa.uint64()),
                     "legal_country_iso": iso.cast(pa.string()),
                     "n_sites": pa.array(req["n_sites"], pa.int64())})


def run(ctx) -> None:
    from engine.core import publish
    from engine.core.schema import arrow_schema, validate_table

    t = compute(ctx)
    schema = ctx.schema_path("s3_requirements")
    problems = validate_table(t, schema)
    if problems:
        raise ModelError("E305_SCHEMA_INVALID", "s3_requirements does not match its schema", path=schema, rows=problems)
    with publish.staged(ctx.path("s3_requirements"), PUBLISH_CODE) as tmp:
        # rows are produced in writer order (merchant_id, legal_country_iso); no re-sort needed
        publish.write_parquet(t, Path(tmp) / "part-00000.parquet", schema=arrow_schema(schema))

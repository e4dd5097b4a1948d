"""1A S8 — materialise ``outlet_catalogue`` (1A-S5-S9 §1, §5, §7; decisions 6, 8, 19).

Input counts come from the S7 hand-off ``s7_integer_allocation`` (one authority per run, ⚑17).
For every (merchant, country) block with ``n >= 1``: rows ``site_order = 1..n``,
``site_id = zfill6(site_order)``, ``final_country_outlet_count = n``, ``raw_nb_outlet_draw = N``,
``single_vs_multi_flag`` = the S1 outcome, ``home_country_iso`` = the merchant's home,
``global_seed`` = seed, ``manifest_fingerprint`` = the run's fingerprint. Writer sort
``[merchant_id, legal_country_iso, site_order]``; no inter-country order is written.

Single-site merchants (decision 6): one row at home, ``site_order = 1``, flag false,
``raw_nb_outlet_draw = 1``.

Evidence: one non-consuming ``sequence_finalize`` event per egress block (every block, single-site
merchants included: S9's block-atomicity check counts one per block; decision 19 exempts single-site
merchants from S2-S7 events only). A count above 999999 stops the run with ``E_SITE_ID_OVERFLOW``
(decision 8) before anything is written.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from engine.core.errors import InputError, ModelError
from engine.segment1a.s5_currency_weights import schema_path
from engine.segment1a.s6_foreign_selection import (
    col_bool,
    col_i64,
    col_u64,
    constant_strings,
    fixed_strings,
    iso_codes,
    iso_list,
    iso_strings,
    load_candidate_set,
    load_nb_final,
    lookup,
    merchant_u64_rows,
    read_columns,
)

MODULE = "1A.site_id_allocator"
LABEL = "sequence_finalize"
FAMILY = "sequence_finalize"
MAX_SEQ = 999_999  # site_id is six digits (§5.2 step 3)
SORT = ["merchant_id", "legal_country_iso", "site_order"]


def check_handoff(h_mid, h_iso, h_cnt, h_home, merchants, home, is_multi, N_of, mem_key, s3_key, aborted):
    """§5.2 steps 1-3 as vectorised gates over the hand-off (sorted by merchant, ISO).

    ``N_of`` = N per merchant (1 for single-site); ``mem_key`` / ``s3_key`` = sorted
    ``merchant_idx*676 + iso`` of S6 members / S3 foreign candidates.
    """
    mi, known = lookup(merchants, h_mid)
    if not np.all(known):
        raise InputError("E_S3_MEMBERSHIP_MISSING", "hand-off merchant not in the merchant table",
                         rows=[int(x) for x in h_mid[~known][:10]])
    nm = merchants.shape[0]
    # coverage: every merchant not aborted by S4 has rows
    present = np.bincount(mi, minlength=nm) > 0
    _, ab = lookup(aborted, merchants)
    missing = ~present & ~ab
    if np.any(missing):
        raise InputError("E_COUNTS_SOURCE_MISSING", "merchants without S7 counts",
                         rows=[int(x) for x in merchants[missing][:10]])
    # home: exactly one home row, equal to the merchant's home (order authority)
    nh = np.bincount(mi[h_home], minlength=nm)
    bad_home = present & (nh != 1)
    wrong = h_home & (h_iso != home[mi])
    if np.any(bad_home) or np.any(wrong):
        rows = [int(x) for x in merchants[bad_home][:5]] + [int(x) for x in h_mid[wrong][:5]]
        raise InputError("E_ORDER_AUTHORITY_DRIFT", "home row missing, duplicated or not the merchant's home",
                         rows=rows)
    # sums
    tot = np.bincount(mi, weights=h_cnt, minlength=nm).astype(np.int64)
    bad_sum = present & (tot != N_of)
    if np.any(bad_sum):
        raise ModelError("E_SUM_MISMATCH", "sum of per-country counts differs from N",
                         rows=[f"{int(m)}: sum {int(t)} != N {int(n)}" for m, t, n in
                               zip(merchants[bad_sum][:10], tot[bad_sum][:10], N_of[bad_sum][:10])])
    # foreign rows: only for ztp_final merchants, only S6 members, only S3 candidates
    foreign = ~h_home
    fk = mi[foreign].astype(np.int64) * 676 + h_iso[foreign].astype(np.int64)
    _, in_s3 = lookup(s3_key, fk)
    _, in_mem = lookup(mem_key, fk)
    bad_f = ~(in_s3 & in_mem)
    if np.any(bad_f):
        fm = h_mid[foreign][bad_f][:10]
        fi = iso_list(h_iso[foreign][bad_f][:10])
        raise InputError("E_S3_MEMBERSHIP_MISSING", "count for a country outside home + S6 members / S3 candidates",
                         rows=[f"{int(m)}:{i}" for m, i in zip(fm, fi)])
    if np.any(h_cnt < 0):
        raise ModelError("E_SUM_MISMATCH", "negative count", rows=[int(x) for x in h_mid[h_cnt < 0][:10]])
    over = h_cnt > MAX_SEQ
    if np.any(over):
        raise ModelError(
            "E_SITE_ID_OVERFLOW",
            f"site count above {MAX_SEQ} (six-digit site_id) for a (merchant, country) block",
            rows=[f"{int(m)}:{i} count {int(c)}" for m, i, c in
                  zip(h_mid[over][:10], iso_list(h_iso[over][:10]), h_cnt[over][:10])],
        )
    return mi


def build_catalogue(h_mid, h_iso, h_cnt, mi, home, is_multi, N_of, fingerprint: str, seed: int):
    """Expand blocks with n >= 1 into rows (vectorised). Returns (table, block arrays)."""
    blk = h_cnt > 0
    b_mid, b_iso, b_n, b_mi = h_mid[blk], h_iso[blk], h_cnt[blk].astype(np.int64), mi[blk]
    total = int(b_n.sum())
    rep = np.repeat(np.arange(b_n.shape[0]), b_n)
    starts = np.cumsum(b_n) - b_n
    site_order = np.arange(total, dtype=np.int64) - np.repeat(starts, b_n) + 1
    r_mi = b_mi[rep]
    tbl = pa.table({
        "manifest_fingerprint": constant_strings(fingerprint, total),
        "merchant_id": pa.array(b_mid[rep], pa.uint64()),
        "site_id": fixed_strings(site_order, 6),
        "home_country_iso": iso_strings(home[r_mi]),
        "legal_country_iso": iso_strings(b_iso[rep]),
        "single_vs_multi_flag": pa.array(is_multi[r_mi], pa.bool_()),
        "raw_nb_outlet_draw": pa.array(N_of[r_mi].astype(np.int32), pa.int32()),
        "final_country_outlet_count": pa.array(b_n[rep].astype(np.int32), pa.int32()),
        "site_order": pa.array(site_order.astype(np.int32), pa.int32()),
        "global_seed": pa.array(np.full(total, seed, dtype=np.uint64), pa.uint64()),
    })
    return tbl, (b_mid, b_iso, b_n)


def run(ctx) -> None:
    from engine.core import publish, rng, rnglog
    from engine.core.schema import arrow_schema, validate_table
    from engine.segment1a.s6_foreign_selection import read_membership
    from engine.segment1a.s7_allocation import _merchant_homes, load_aborted, multi_site

    merchants, home = _merchant_homes(ctx)
    nb_mid, nb_N = load_nb_final(ctx)
    is_multi = multi_site(merchants, nb_mid)  # single_vs_multi_flag (S1 outcome)
    pos, _ = lookup(nb_mid, merchants)
    N_of = np.where(is_multi, nb_N[pos] if nb_N.shape[0] else 1, 1).astype(np.int64)
    aborted = load_aborted(ctx)
    c_mid, c_iso, _c_rank, c_home = load_candidate_set(ctx)
    m_mid, m_iso = read_membership(ctx)
    # merchant-index keys for the set checks
    ci, cf = lookup(merchants, c_mid)
    drift = cf & c_home & (home[ci] != c_iso)
    if np.any(drift):  # §5.2 step 1: home = the S3 row with candidate_rank 0
        raise InputError("E_ORDER_AUTHORITY_DRIFT", "S3 home (rank 0) differs from the merchant's home_country_iso",
                         rows=[int(x) for x in c_mid[drift][:10]])
    s3_key = np.sort(ci[cf & ~c_home].astype(np.int64) * 676 + c_iso[cf & ~c_home].astype(np.int64))
    mi_m, mf = lookup(merchants, m_mid)
    mem_key = np.sort(mi_m[mf].astype(np.int64) * 676 + m_iso[mf].astype(np.int64))

    path_h = ctx.path("s7_integer_allocation")
    h = read_columns(path_h, ["merchant_id", "country_iso", "count", "is_home"])
    h_mid = col_u64(h, "merchant_id")
    h_iso = iso_codes(h.column("country_iso"))
    h_cnt = col_i64(h, "count")
    h_home = col_bool(h, "is_home")
    o = np.lexsort((h_iso, h_mid))
    h_mid, h_iso, h_cnt, h_home = h_mid[o], h_iso[o], h_cnt[o], h_home[o]
    if h_mid.shape[0] > 1:
        dup = (h_mid[1:] == h_mid[:-1]) & (h_iso[1:] == h_iso[:-1])
        if np.any(dup):
            raise InputError("E_DUP_PK", "duplicate (merchant_id, country_iso) in the S7 hand-off", path=path_h,
                             rows=[int(x) for x in h_mid[1:][dup][:10]])
    mi = check_handoff(h_mid, h_iso, h_cnt, h_home, merchants, home, is_multi, N_of, mem_key, s3_key, aborted)
    tbl, (b_mid, b_iso, b_n) = build_catalogue(
        h_mid, h_iso, h_cnt, mi, home, is_multi, N_of, ctx.ids.manifest_fingerprint, ctx.ids.seed
    )
    schema_file = schema_path(ctx, "outlet_catalogue")
    probs = validate_table(tbl, schema_file)
    if probs:
        raise ModelError("E_SCHEMA_INVALID", "outlet_catalogue does not match its schema", rows=probs)

    # sequence_finalize: one per block, counters = base of the keyed (merchant, ISO) substream
    nb = b_mid.shape[0]
    M = rng.master_material("1A", ctx.ids.fingerprint_bytes, ctx.ids.seed)
    mu = merchant_u64_rows(b_mid)
    _key, hi, lo = rng.substreams_vec(M, "1A", LABEL, mu, iso=iso_list(b_iso))
    cols = {
        "merchant_id": b_mid,
        "before_hi": hi,
        "before_lo": lo,
        "after_hi": hi,
        "after_lo": lo,
        "blocks": np.zeros(nb, np.uint64),
        "draws": np.zeros(nb, np.uint64),
        "country_iso": iso_strings(b_iso),
        "site_count": b_n,
        "start_sequence": constant_strings("000001", nb),
        "end_sequence": fixed_strings(b_n, 6),
    }
    logs = rnglog.RngLogs(ctx.data_root, ctx.segment, ctx.ids)
    logs.add_events(FAMILY, MODULE, LABEL, cols)
    logs.close()

    with publish.staged(ctx.path("outlet_catalogue"), "E_IMMUTABLE_PARTITION_EXISTS_NONIDENTICAL") as tmp:
        publish.write_parquet(tbl, tmp / "part-00000.parquet", sort_by=SORT, schema=arrow_schema(schema_file))


__all__ = ["run", "check_handoff", "build_catalogue", "MAX_SEQ", "SORT"]

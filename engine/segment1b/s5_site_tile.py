"""1B S5 - ``s5_site_tile_assignment``: which site fills which tile quota (spec 1B 7; decision 16).

RNG family ``site_tile_assign`` (module ``1B.S5.assigner``, label ``site_tile_assign``), one substream per
(merchant, country): ``SHA256(M || UER("mlr:1B") || UER("site_tile_assign") || LE64(merchant_u64) ||
UER(ISO))`` with the 1B master material ``M`` (1B fingerprint, seed). Site k (1-based ``site_order``) of the
pair draws exactly one block at counter ``base + (k - 1)`` -- consecutive blocks of the pair's stream, site 1
on the base counter (decision 16's known answer) -- and uses lane ``x0``: ``u_k = u01(x0)`` (blocks 1,
draws "1").

Per pair (spec 1B 7): the plan's tiles in ascending ``tile_id``, each repeated ``n_sites_tile`` times, form
the sequence T; the sites sorted by ``(u_k, k)`` take T in order (``tile_of_site[order] = T``). So the
per-tile counts equal the S4 quotas exactly and sum to N (the pair's ``n_sites``); counts never change.

Vectorised over all pairs at once: one counter add, one Philox call, then a numba kernel that sorts each
pair's sites by ``u`` (stable: ties keep the smaller ``site_order``) and walks T; pairs planned on a single
tile need no sort. :func:`tiles_for_sites` is the plain-numpy statement of the same rule (tests compare). Exactly one event per site, in writer order
(merchant_id, legal_country_iso, site_order).

The site list is ``1..N`` with ``N = sum n_sites_tile`` (S3 guaranteed contiguity); S5 never reads
``outlet_catalogue`` (spec 1B 7).
"""

from __future__ import annotations

from pathlib import Path

import numba
import numpy as np
import pyarrow as pa

from engine.core import rng, samplers
from engine.core.errors import InputError, ModelError

SEGMENT = "1B"
FAMILY = "site_tile_assign"
MODULE = "1B.S5.assigner"
LABEL = "site_tile_assign"
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"


# ============================================================================================
# pure compute
# ============================================================================================
def pair_streams(M: bytes, merchant_id: np.ndarray, iso: np.ndarray):
    """``(key, hi, lo)`` of the per-(merchant, ISO) ``site_tile_assign`` substreams (merchant_u64 hashed once
    per distinct merchant)."""
    mid = np.asarray(merchant_id, dtype=np.uint64)
    mu = rng.merchant_u64_vec(mid)  # hashes each distinct merchant once
    return rng.substreams_vec(M, SEGMENT, LABEL, mu, iso=np.asarray(iso))


def tiles_for_sites(site_pair: np.ndarray, u: np.ndarray, plan_tile: np.ndarray, plan_quota: np.ndarray) -> np.ndarray:
    """Spec 1B 7 steps 1, 3, 4 over many pairs: sites (grouped by pair, ``site_order`` ascending within a pair)
    sorted by ``(pair, u, site_order)`` take the tile sequence T (plan tiles ascending, each repeated by its
    quota) in order. ``lexsort`` is stable, so equal ``u`` keep the smaller ``site_order`` first."""
    order = np.lexsort((np.asarray(u, dtype=np.float64), np.asarray(site_pair, dtype=np.int64)))
    T = np.repeat(np.asarray(plan_tile, dtype=np.uint64), np.asarray(plan_quota, dtype=np.int64))
    if T.shape[0] != order.shape[0]:
        raise InputError("E504_SUM_TO_N_MISMATCH", f"{T.shape[0]} planned slots for {order.shape[0]} sites")
    tile = np.empty(order.shape[0], np.uint64)
    tile[order] = T
    return tile


@numba.njit(cache=True)
def _fill_tiles(pair_start, pair_n, u, plan_start, plan_len, plan_tile, plan_q, out):  # pragma: no cover - numba
    for p in range(pair_start.shape[0]):
        s = pair_start[p]
        n = pair_n[p]
        ps = plan_start[p]
        pl = plan_len[p]
        if pl == 1:  # one tile: every site goes there, no permutation needed
            t = plan_tile[ps]
            for i in range(n):
                out[s + i] = t
            continue
        order = np.argsort(u[s:s + n], kind="mergesort")  # stable: equal u keep the smaller site_order
        j = 0
        for r in range(pl):
            t = plan_tile[ps + r]
            for _ in range(plan_q[ps + r]):
                out[s + order[j]] = t
                j += 1


def tiles_for_pairs(N: np.ndarray, u: np.ndarray, plan_pair: np.ndarray, plan_tile: np.ndarray,
                    plan_quota: np.ndarray) -> np.ndarray:
    """Same result as :func:`tiles_for_sites` (tests compare them), per pair in a numba kernel: O(n log n) per
    pair instead of one global sort. ``N``: sites per pair (sites grouped by pair in pair order)."""
    N = np.ascontiguousarray(N, dtype=np.int64)
    npairs = N.shape[0]
    pair_start = np.zeros(npairs, np.int64)
    pair_start[1:] = np.cumsum(N)[:-1]
    plan_len = np.bincount(np.asarray(plan_pair, dtype=np.int64), minlength=npairs).astype(np.int64)
    plan_start = np.zeros(npairs, np.int64)
    plan_start[1:] = np.cumsum(plan_len)[:-1]
    out = np.empty(int(N.sum()), np.uint64)
    _fill_tiles(pair_start, N, np.ascontiguousarray(u, dtype=np.float64), plan_start, plan_len,
                np.ascontiguousarray(plan_tile, dtype=np.uint64), np.ascontiguousarray(plan_quota, dtype=np.int64), out)
    return out


def assign(M: bytes, pair_merchant: np.ndarray, pair_iso: np.ndarray, plan_pair: np.ndarray,
           plan_tile: np.ndarray, plan_quota: np.ndarray) -> dict:
    """Assign sites to tiles for pairs given in writer order.

    ``pair_merchant`` (uint64) / ``pair_iso`` (str): one entry per pair; ``plan_pair`` (index of the pair),
    ``plan_tile``, ``plan_quota``: the S4 rows grouped by pair in pair order, ``tile_id`` ascending.
    Returns per-site arrays in writer order: ``pair``, ``site_order`` (int64, 1-based), ``tile_id``, ``u``,
    ``before_hi``, ``before_lo``, ``after_hi``, ``after_lo``.
    """
    npairs = pair_merchant.shape[0]
    pp = np.asarray(plan_pair, dtype=np.int64)
    q = np.asarray(plan_quota, dtype=np.int64)
    if (q < 1).any():
        raise InputError("E503_TILE_QUOTA_MISMATCH", "s4_alloc_plan holds a quota < 1",
                         rows=np.flatnonzero(q < 1)[:10].tolist())
    N = np.bincount(pp, weights=q, minlength=npairs).astype(np.int64)  # exact: sums << 2^53
    if (N < 1).any():
        raise InputError("E504_SUM_TO_N_MISMATCH", "a (merchant, country) has no planned site",
                         rows=np.flatnonzero(N < 1)[:10].tolist())
    key_p, hi_p, lo_p = pair_streams(M, pair_merchant, pair_iso)
    total = int(N.sum())
    site_pair = np.repeat(np.arange(npairs, dtype=np.int64), N)
    starts = np.zeros(npairs, np.int64)
    starts[1:] = np.cumsum(N)[:-1]
    k0 = (np.arange(total, dtype=np.int64) - starts[site_pair]).astype(np.uint64)  # k - 1
    hi_b, lo_b = rng.add128_vec(hi_p[site_pair], lo_p[site_pair], k0)
    u, hi_a, lo_a = samplers.uniform1_vec(key_p[site_pair], hi_b, lo_b)
    if not ((u > 0.0) & (u < 1.0)).all():  # u01 guarantees it; a violation would be an RNG defect
        raise ModelError("E507_RNG_EVENT_MISMATCH", "u outside (0, 1)")
    tile = tiles_for_pairs(N, u, pp, plan_tile, q)
    return {"pair": site_pair, "site_order": k0.astype(np.int64) + 1, "tile_id": tile, "u": u,
            "before_hi": hi_b, "before_lo": lo_b, "after_hi": hi_a, "after_lo": lo_a}


# ============================================================================================
# run
# ============================================================================================
def compute(ctx) -> tuple[pa.Table, dict, dict]:
    from engine.segment1b import s0_gate
    from engine.segment1b.s3_requirements import iso_codes_array, read_dataset, sorted_by

    s0_gate.require_receipt(ctx)
    plan = read_dataset(ctx.path("s4_alloc_plan"), ctx.schema_path("s4_alloc_plan"))
    if plan.num_rows == 0:
        raise InputError("E504_SUM_TO_N_MISMATCH", "s4_alloc_plan is empty", path=ctx.path("s4_alloc_plan"))
    codes, labels = iso_codes_array(plan["legal_country_iso"])
    mid = np.asarray(plan["merchant_id"].to_numpy(), dtype=np.uint64)
    tid = np.asarray(plan["tile_id"].to_numpy(), dtype=np.uint64)
    q = np.asarray(plan["n_sites_tile"].to_numpy(), dtype=np.int64)
    if not sorted_by(mid, codes, tid):  # writer order is the law; re-establish it rather than trust it
        o = np.lexsort((tid, codes, mid))
        mid, codes, tid, q = mid[o], codes[o], tid[o], q[o]
        if not sorted_by(mid, codes, tid):
            raise InputError("E407_PK_DUPLICATE", "s4_alloc_plan has duplicate (merchant, country, tile) rows",
                             path=ctx.path("s4_alloc_plan"))
    new = np.ones(mid.shape[0], bool)
    new[1:] = (mid[1:] != mid[:-1]) | (codes[1:] != codes[:-1])
    plan_pair = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    pm, pc_ = mid[starts], codes[starts]
    M = rng.master_material(SEGMENT, ctx.ids.fingerprint_bytes, ctx.ids.seed)
    out = assign(M, pm, labels[pc_], plan_pair, tid, q)
    site_code = pc_[out["pair"]]
    iso_arr = pa.DictionaryArray.from_arrays(pa.array(site_code.astype(np.int32), pa.int32()),
                                             pa.array(list(labels))).cast(pa.string())
    site_mid = pm[out["pair"]]
    table = pa.table({"merchant_id": pa.array(site_mid, pa.uint64()), "legal_country_iso": iso_arr,
                      "site_order": pa.array(out["site_order"], pa.int64()),
                      "tile_id": pa.array(out["tile_id"], pa.uint64())})
    n = table.num_rows
    one = np.ones(n, np.uint64)
    events = {"merchant_id": site_mid, "legal_country_iso": iso_arr, "site_order": out["site_order"],
              "tile_id": out["tile_id"], "u": out["u"],
              "before_hi": out["before_hi"], "before_lo": out["before_lo"],
              "after_hi": out["after_hi"], "after_lo": out["after_lo"], "blocks": one, "draws": one}
    report = {"rows_emitted": n, "pairs_total": int(pm.shape[0]), "rng_events_emitted": n}
    return table, events, report


def run(ctx) -> None:
    from engine.core import publish
    from engine.core.progress import Progress
    from engine.core.rnglog import RngLogs
    from engine.core.schema import arrow_schema, validate_table

    table, events, _ = compute(ctx)
    schema = ctx.schema_path("s5_site_tile_assignment")
    problems = validate_table(table, schema)
    if problems:
        raise ModelError("E506_SCHEMA_INVALID", "s5_site_tile_assignment does not match its schema", path=schema,
                         rows=problems)
    logs = RngLogs(ctx.data_root, SEGMENT, ctx.ids, ctx.config)
    n = logs.add_events(FAMILY, MODULE, LABEL, events)

    def publish_assignment() -> None:
        with publish.staged(ctx.path("s5_site_tile_assignment"), PUBLISH_CODE) as tmp:
            # sites are generated in writer order (merchant_id, legal_country_iso, site_order)
            publish.write_parquet(table, Path(tmp) / "part-00000.parquet", schema=arrow_schema(schema))

    # the dataset is published while the event and trace lines are written (once the logs' checks passed)
    logs.close(progress=Progress("1B.S5", total=2 * n, unit="rng log lines (events + trace)"),
               alongside=publish_assignment)

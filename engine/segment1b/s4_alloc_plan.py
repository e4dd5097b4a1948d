"""1B S4 - ``s4_alloc_plan``: exact integer tile quotas per (merchant, country) (spec 1B 6).

No RNG. For a pair (m, c, n) with the country's integer tile weights ``w_i`` (``sum w_i = K = 10^dp``,
from ``tile_weights``): ``p_i = w_i * n``, ``z_i = p_i // K``, ``r_i = p_i mod K``, shortfall
``S = n - sum z_i``; the S tiles with the largest ``r_i`` (ties: smaller ``tile_id``) get +1. Only tiles
with a quota >= 1 are written; quotas sum to n (``E404_ALLOCATION_MISMATCH``). Integer arithmetic only:
int64 when ``K * n < 2^63``, Python ints otherwise (spec's overflow rule; never float).

The plan depends only on (country, n) (spec 1B 6 performance note (i)), so it is computed once per
distinct key and gathered for every merchant (vectorised with offsets). Per key the work is O(n log n),
independent of the country's tile count, by an exact reduction:

* sort the country's tiles with ``w > 0`` once by (w desc, tile_id asc);
* "large" tiles (``w * n >= K``) are a prefix of that order, at most n of them (``sum w = K``);
* every other tile has ``z = 0`` and ``r = w * n``, so among them the order by (r desc, tile_id asc) IS
  the sorted order: only the first S of them can receive a +1;
* tiles with ``w = 0`` have ``r = 0`` and are never needed: ``sum r = S * K`` with every ``r < K`` means
  at least S + 1 tiles have ``r > 0`` whenever S > 0.

So the S bumps are the top S (by r desc, tile_id asc) of at most 2n candidates -- identical to ranking
all tiles of the country (tests compare with the brute-force definition).

Checks: weights of a required country present, one ``dp``, summing to K (``E402_MISSING_TILE_WEIGHTS``,
``E414_WEIGHT_TAMPER``); every emitted tile is in ``tile_index`` (``E413_TILE_NOT_IN_INDEX``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.core import publish
from engine.core.errors import InputError, ModelError

SEGMENT = "1B"
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"
I64_LIMIT = (1 << 63) - 1


# ============================================================================================
# pure compute
# ============================================================================================
class CountryWeights:
    """One country's weights prepared for planning: tiles with w > 0 sorted by (w desc, tile_id asc)."""

    def __init__(self, iso: str, tile_id: np.ndarray, weight: np.ndarray, K: int):
        tid = np.asarray(tile_id, dtype=np.uint64)
        w = np.asarray(weight, dtype=np.int64)
        pos = w > 0
        tid, w = tid[pos], w[pos]
        order = np.lexsort((tid, -w))
        self.iso = iso
        self.K = int(K)
        self.w = w[order]
        self.tid = tid[order]
        self.neg_w = -self.w  # ascending, for searchsorted

    def plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tile_id ascending uint64, quota int64 >= 1)`` for n sites (largest remainder, ties smaller id)."""
        n = int(n)
        K = self.K
        if n <= 0:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        # large tiles: w * n >= K  <=>  w >= ceil(K / n)
        thr = -(-K // n)
        nL = int(np.searchsorted(self.neg_w, -thr, side="right"))
        if K * n <= I64_LIMIT:
            wl = self.w[:nL]
            p = wl * np.int64(n)
            z = p // np.int64(K)
            rl = p - z * np.int64(K)
            S = n - int(z.sum())
            ws = self.w[nL:nL + S]
            r = np.concatenate([rl, ws * np.int64(n)])
            tids = self.tid[:nL + ws.shape[0]]
            q = np.concatenate([z, np.zeros(ws.shape[0], np.int64)])
            if S > r.shape[0]:
                raise ModelError("E404_ALLOCATION_MISMATCH", f"{self.iso}: shortfall {S} exceeds candidate tiles",
                                 detail={"n": n, "K": K})
            if S:
                top = np.lexsort((tids, -r))[:S]
                q[top] += 1
        else:  # K * n overflows int64: exact Python integers (spec 1B 6 overflow rule)
            wl = [int(v) for v in self.w[:nL].tolist()]
            z_l = [v * n // K for v in wl]
            r_l = [v * n % K for v in wl]
            S = n - sum(z_l)
            ws = [int(v) for v in self.w[nL:nL + S].tolist()]
            r = r_l + [v * n for v in ws]
            tids_l = self.tid[:nL + len(ws)]
            if S > len(r):
                raise ModelError("E404_ALLOCATION_MISMATCH", f"{self.iso}: shortfall {S} exceeds candidate tiles",
                                 detail={"n": n, "K": K})
            rank = sorted(range(len(r)), key=lambda i: (-r[i], int(tids_l[i])))
            qv = z_l + [0] * len(ws)
            for i in rank[:S]:
                qv[i] += 1
            q = np.asarray(qv, dtype=np.int64)
            tids = tids_l
        keep = q > 0
        tids, q = tids[keep], q[keep]
        o = np.argsort(tids, kind="stable")
        tids, q = tids[o], q[o]
        if int(q.sum()) != n:
            raise ModelError("E404_ALLOCATION_MISMATCH", f"{self.iso}: quotas sum to {int(q.sum())}, not {n}")
        return tids, q


def plan_reference(tile_id, weight, K: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force definition (spec 1B 6 steps 2-4) over ALL tiles, with Python integers; for tests."""
    tids = [int(t) for t in np.asarray(tile_id).tolist()]
    ws = [int(w) for w in np.asarray(weight).tolist()]
    p = [w * n for w in ws]
    z = [v // K for v in p]
    r = [v % K for v in p]
    S = n - sum(z)
    order = sorted(range(len(tids)), key=lambda i: (-r[i], tids[i]))
    for i in order[:S]:
        z[i] += 1
    out = sorted((tids[i], z[i]) for i in range(len(tids)) if z[i] > 0)
    return np.array([t for t, _ in out], np.uint64), np.array([q for _, q in out], np.int64)


def alloc_plan(pair_iso: np.ndarray, pair_n: np.ndarray, weights: dict[int, CountryWeights]) -> dict:
    """Plan rows for pairs given in writer order. ``pair_iso`` int codes (keys of ``weights``), ``pair_n``.

    Returns ``{pair (int64 index of the pair per row), tile_id (uint64), n_sites_tile (int64)}`` with rows grouped
    by pair in pair order and tile_id ascending within a pair; plus ``keys`` (distinct (iso, n) computed) and
    ``planned_tiles`` (iso code -> distinct planned tile ids, for the tile_index check)."""
    pi = np.asarray(pair_iso, dtype=np.int64)
    pn = np.asarray(pair_n, dtype=np.int64)
    npairs = pi.shape[0]
    if npairs == 0:
        return {"pair": np.zeros(0, np.int64), "tile_id": np.zeros(0, np.uint64),
                "n_sites_tile": np.zeros(0, np.int64), "keys": 0, "planned_tiles": {}}
    base = int(pn.max()) + 1
    key = pi * base + pn
    ukeys, inv = np.unique(key, return_inverse=True)
    tiles, quotas = [], []
    lens = np.empty(ukeys.shape[0], np.int64)
    for j, k in enumerate(ukeys.tolist()):
        t, q = weights[k // base].plan(k % base)
        tiles.append(t)
        quotas.append(q)
        lens[j] = t.shape[0]
    offs = np.zeros(ukeys.shape[0], np.int64)
    offs[1:] = np.cumsum(lens)[:-1]
    cat_t = np.concatenate(tiles)
    cat_q = np.concatenate(quotas)
    plen = lens[inv]
    total = int(plen.sum())
    pair = np.repeat(np.arange(npairs, dtype=np.int64), plen)
    starts = np.zeros(npairs, np.int64)
    starts[1:] = np.cumsum(plen)[:-1]
    j = np.arange(total, dtype=np.int64) - starts[pair]
    src = offs[inv][pair] + j
    key_iso = ukeys // base
    planned = {int(c): np.unique(np.concatenate([tiles[j] for j in np.flatnonzero(key_iso == c).tolist()]))
               for c in np.unique(key_iso).tolist()}
    return {"pair": pair, "tile_id": cat_t[src], "n_sites_tile": cat_q[src], "keys": int(ukeys.shape[0]),
            "planned_tiles": planned}


# ============================================================================================
# inputs
# ============================================================================================
_FULL_CACHE: dict[tuple[str, tuple[str, ...]], dict[str, pa.Table]] = {}


def read_country_table(partition_dir: Path, iso: str, columns: list[str]) -> pa.Table | None:
    """One country's rows of a per-country S1/S2 partition (``part-<ISO>.parquet``; tile_id order). A partition
    written as generic part files is read once and split by ``country_iso``. ``None`` if the country is absent."""
    from engine.segment1b import spatial

    d = Path(partition_dir)
    p = d / spatial.country_part_name(iso)
    if p.exists():
        return publish.read_parquet_file(p, columns=columns)
    if spatial.partition_countries(d):
        return None
    key = (str(d.resolve()), tuple(columns))
    if key not in _FULL_CACHE:
        parts = sorted(d.glob("part-*.parquet"))
        if not parts:
            return None
        cols = list(dict.fromkeys(["country_iso", *columns]))
        t = pa.concat_tables([publish.read_parquet_file(q, columns=cols) for q in parts])
        by: dict[str, pa.Table] = {}
        for c in sorted(set(t["country_iso"].to_pylist())):
            import pyarrow.compute as pc

            sub = t.filter(pc.equal(t["country_iso"], c)).select(columns)
            by[c] = sub.take(pc.sort_indices(sub, [("tile_id", "ascending")])) if "tile_id" in columns else sub
        _FULL_CACHE.clear()
        _FULL_CACHE[key] = by
    return _FULL_CACHE[key].get(iso)


def load_country_weights(weights_dir: Path, iso: str) -> CountryWeights:
    t = read_country_table(weights_dir, iso, ["tile_id", "weight_fp", "dp"])
    if t is None or t.num_rows == 0:
        raise InputError("E402_MISSING_TILE_WEIGHTS", f"tile_weights has no tiles for {iso}", path=weights_dir,
                         rows=[iso])
    dp_col = np.asarray(t["dp"].to_numpy(), dtype=np.int64)
    # one value per country: min == max decides it without hashing every row (the list only for the message)
    dps = dp_col[:1] if dp_col.min() == dp_col.max() else np.unique(dp_col)
    if dps.shape[0] != 1 or not 0 <= int(dps[0]) <= 18:
        raise InputError("E414_WEIGHT_TAMPER", f"tile_weights of {iso}: dp must be one value in 0..18, got "
                         f"{dps.tolist()[:5]}", path=weights_dir)
    dp = int(dps[0])
    K = 10 ** dp
    w = np.asarray(t["weight_fp"].to_numpy(), dtype=np.int64)
    if (w < 0).any() or int(w.sum()) != K:
        raise InputError("E414_WEIGHT_TAMPER", f"tile_weights of {iso}: weights must be >= 0 and sum to 10^{dp}",
                         path=weights_dir, detail={"sum": int(w.sum()), "K": K, "negative": int((w < 0).sum())})
    cw = CountryWeights(iso, np.asarray(t["tile_id"].to_numpy(), dtype=np.uint64), w, K)
    cw.dp = dp
    return cw


def check_tiles_in_index(index_dir: Path, iso: str, tiles: np.ndarray) -> None:
    """Every planned tile of ``iso`` is in ``tile_index`` (E413)."""
    u = np.asarray(tiles, dtype=np.uint64)
    if not bool((u[1:] > u[:-1]).all()):  # alloc_plan hands over sorted distinct tiles already
        u = np.unique(u)
    if u.size == 0:
        return
    t = read_country_table(index_dir, iso, ["tile_id"])
    idx = np.sort(np.asarray(t["tile_id"].to_numpy(), dtype=np.uint64)) if t is not None else np.zeros(0, np.uint64)
    pos = np.searchsorted(idx, u)
    ok = (pos < idx.shape[0]) & (idx[np.minimum(pos, max(idx.shape[0] - 1, 0))] == u) if idx.size else np.zeros(u.shape, bool)
    if not ok.all():
        raise InputError("E413_TILE_NOT_IN_INDEX", f"{iso}: planned tiles absent from tile_index",
                         path=index_dir, rows=u[~ok][:10].tolist())


def compute(ctx) -> tuple[pa.Table, dict]:
    from engine.segment1b import s0_gate
    from engine.segment1b.s3_requirements import iso_codes_array, read_dataset, sorted_by

    s0_gate.require_receipt(ctx)
    req = read_dataset(ctx.path("s3_requirements"), ctx.schema_path("s3_requirements"))
    if req.num_rows == 0:
        raise InputError("E401_NO_S3_REQUIREMENTS", "s3_requirements is empty", path=ctx.path("s3_requirements"))
    codes, labels = iso_codes_array(req["legal_country_iso"])
    mid = np.asarray(req["merchant_id"].to_numpy(), dtype=np.uint64)
    n = np.asarray(req["n_sites"].to_numpy(), dtype=np.int64)
    if not sorted_by(mid, codes):  # S3 writes writer order; re-establish it rather than trust it
        order = np.lexsort((codes, mid))
        mid, codes, n = mid[order], codes[order], n[order]
    if not sorted_by(mid, codes):
        raise InputError("E407_PK_DUPLICATE", "s3_requirements has duplicate (merchant_id, legal_country_iso)",
                         path=ctx.path("s3_requirements"))
    wdir = Path(ctx.path("tile_weights"))
    weights = {}
    dps = set()
    for c in np.flatnonzero(np.bincount(codes, minlength=len(labels))).tolist():  # = np.unique(codes), no sort
        cw = load_country_weights(wdir, str(labels[c]))
        weights[c] = cw
        dps.add(cw.dp)
    if len(dps) > 1:
        raise InputError("E414_WEIGHT_TAMPER", f"tile_weights carries several dp values {sorted(dps)}", path=wdir)
    out = alloc_plan(codes, n, weights)
    idir = Path(ctx.path("tile_index"))
    for c, tiles in out["planned_tiles"].items():
        check_tiles_in_index(idir, str(labels[c]), tiles)
    row_iso = codes[out["pair"]]
    iso = pa.DictionaryArray.from_arrays(pa.array(row_iso.astype(np.int32), pa.int32()), pa.array(list(labels)))
    t = pa.table({"merchant_id": pa.array(mid[out["pair"]], pa.uint64()), "legal_country_iso": iso.cast(pa.string()),
                  "tile_id": pa.array(out["tile_id"], pa.uint64()),
                  "n_sites_tile": pa.array(out["n_sites_tile"], pa.int64())})
    report = {"rows_emitted": t.num_rows, "pairs_total": int(mid.shape[0]),
              # mid is in writer order (non-decreasing): distinct merchants = 1 + changes
              "merchants_total": int(1 + np.count_nonzero(mid[1:] != mid[:-1])), "plans_computed": out["keys"],
              "sites_total": int(n.sum()), "dp": sorted(dps)[0]}
    return t, report


def run(ctx) -> None:
    from engine.core import publish
    from engine.core.schema import arrow_schema, validate_table

    t, _ = compute(ctx)
    schema = ctx.schema_path("s4_alloc_plan")
    problems = validate_table(t, schema)
    if problems:
        raise ModelError("E405_SCHEMA_INVALID", "s4_alloc_plan does not match its schema", path=schema, rows=problems)
    with publish.staged(ctx.path("s4_alloc_plan"), PUBLISH_CODE) as tmp:
        # rows are built in writer order (merchant_id, legal_country_iso, tile_id)
        publish.write_parquet(t, Path(tmp) / "part-00000.parquet", schema=arrow_schema(schema))

"""1B S7 - ``s7_site_synthesis``: absolute site coordinates and 1:1 coverage of ``outlet_catalogue`` (spec 1B 9).

No RNG. Inputs: the 1B S0 gate receipt (it gates the read of 1A's ``outlet_catalogue``, spec 1B 2),
``s5_site_tile_assignment`` and ``s6_site_jitter`` (seed / 1B parameter_hash / 1B fingerprint),
``tile_bounds`` (grid-scoped, decision 13) and ``outlet_catalogue`` (seed / 1A fingerprint).

Algorithm (spec 1B 9, vectorised instead of a streaming merge; every check collects the first offending keys):

0. ``outlet_catalogue`` is read only through the S0 gate (:func:`gated_catalogue`: receipt for these identities,
   catalogue bytes as verified by S0; ``E301_NO_PASS_FLAG``).
1. S5 and S6 have the same site keys, each once, with the same ``tile_id`` (``E703_DUP_KEY``, ``E701_ROW_MISSING``
   - also for a differing tile_id -, ``E702_ROW_EXTRA``); S6's embedded ``manifest_fingerprint`` equals the path
   token (``E705_PARTITION_OR_IDENTITY``).
2. Every (legal_country_iso, tile_id) is in ``tile_bounds`` (``E709_TILE_FK_VIOLATION``).
3. ``lon_deg = normalise(centroid_lon_deg + delta_lon_deg)``, ``lat_deg = centroid_lat_deg + delta_lat_deg``
   (:func:`synthesise_coordinates`; binary64, stored exactly; S9 recomputes the same expression).
4. The point lies in its pixel, bounds inclusive with ``EPS_DEG`` = 1e-9 degrees (``E707_POINT_OUTSIDE_PIXEL``).
5. Coverage parity with 1A: the key sets of S7 and ``outlet_catalogue`` are equal, one-to-one, and every pair's
   site count equals its ``final_country_outlet_count`` (``E708_1A_COVERAGE_FAIL``).

Output: ``merchant_id, legal_country_iso, site_order, tile_id, lon_deg, lat_deg`` in writer sort (schema
``contracts/schemas/1B/s7_site_synthesis.schema.json``; a violation is ``E704_SCHEMA_VIOLATION``), published
write-once (``E913_ATOMIC_PUBLISH_VIOLATION``, decision 21).

The helpers :func:`key_differences`, :func:`duplicate_keys`, :func:`lookup_tile_bounds`,
:func:`synthesise_coordinates` and :func:`inside_pixel` are shared with S8 and S9.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.core import publish
from engine.core.errors import EngineError, InputError
from engine.core.schema import arrow_schema, validate_table

KEY = ("merchant_id", "legal_country_iso", "site_order")
PAIR = ("merchant_id", "legal_country_iso")
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"  # decision 21 (the spec's E712 for S7)
EPS_DEG = 1e-9  # spec 1B 9 step 4: inclusive pixel bounds with this tolerance
BOUNDS_COLS = ("min_lon_deg", "max_lon_deg", "min_lat_deg", "max_lat_deg", "centroid_lon_deg", "centroid_lat_deg")
MAX_ROWS = 10

_KEY_TYPES = {"merchant_id": pa.uint64(), "legal_country_iso": pa.string(), "site_order": pa.int64(),
              "tile_id": pa.uint64()}


# ====================================================================== shared helpers
def cast_keys(table: pa.Table, columns: Sequence[str] = KEY) -> pa.Table:
    """Cast key columns to their canonical types (u64 ids never through signed types, decision 12)."""
    for c in columns:
        if c in table.column_names and c in _KEY_TYPES and table[c].type != _KEY_TYPES[c]:
            i = table.column_names.index(c)
            table = table.set_column(i, c, pc.cast(table[c], _KEY_TYPES[c]))
    return table


_RANKS: "OrderedDict[tuple, tuple[Any, np.ndarray | None]]" = OrderedDict()  # string column -> its ranks
_RANKS_MAX = 6
_RANKS_LOCK = threading.Lock()


def _column_identity(col: Any) -> tuple:
    """Identity of a column's physical data (type, and per chunk: offset, length, buffer addresses, the
    dictionary's too). Two columns with equal identity hold the same bytes while both are alive."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    key: list = [str(col.type), len(col)]
    for ch in chunks:
        key.append((ch.offset, len(ch), tuple(0 if b is None else b.address for b in ch.buffers())))
        if pa.types.is_dictionary(ch.type):
            d = ch.dictionary
            key.append((d.offset, len(d), tuple(0 if b is None else b.address for b in d.buffers())))
    return tuple(key)


def orderable(col: Any) -> np.ndarray | None:
    """Per-row numbers ordering ``col`` as Arrow's ascending sort does (strings by rank of value), or None when
    this cannot decide (nulls, a type other than integer / string / dictionary of strings).

    The ranks of a string column are remembered for the last few columns asked (keyed by the identity of the
    column's buffers, the column itself held so those buffers stay allocated and unchanged - Arrow data is
    immutable), since S7/S8/S9 ask for the key order of one table several times."""
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)):
        return _orderable(col)
    key = _column_identity(col)
    with _RANKS_LOCK:
        hit = _RANKS.get(key)
        if hit is not None:
            _RANKS.move_to_end(key)
            return hit[1]
    x = _orderable(col)
    if x is not None:
        x.setflags(write=False)
    with _RANKS_LOCK:
        _RANKS[key] = (col, x)
        while len(_RANKS) > _RANKS_MAX:
            _RANKS.popitem(last=False)
    return x


def _orderable(col: Any) -> np.ndarray | None:
    if isinstance(col, pa.ChunkedArray):
        if col.null_count:
            return None
        col = (col.unify_dictionaries() if pa.types.is_dictionary(col.type) else col).combine_chunks()
    if col.null_count:
        return None
    t = col.type
    if pa.types.is_integer(t):
        return np.asarray(col.to_numpy(zero_copy_only=False))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        enc = pc.dictionary_encode(col)
    elif pa.types.is_dictionary(t) and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
        enc = col
    else:
        return None
    vals = enc.dictionary
    if vals.null_count or len(pc.unique(vals)) != len(vals):
        return None  # a dictionary repeating a value would rank equal strings apart
    rank = np.empty(len(vals), np.int64)
    rank[np.asarray(pc.sort_indices(vals).to_numpy(zero_copy_only=False), np.int64)] = np.arange(len(vals))
    return rank[np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)]


def key_order(table: pa.Table, keys: Sequence[str] = KEY) -> tuple[bool, bool] | None:
    """(rows non-decreasing by ``keys``, rows strictly increasing by ``keys``) in one vectorised pass; None when
    a key column cannot be ordered here (see :func:`orderable`). Lets the helpers below skip a sort, a group-by
    or a join whose result the order already decides (same results: a stable sort of sorted rows is the
    identity; strictly increasing keys have no duplicate)."""
    n = table.num_rows
    if n < 2:
        return True, True
    eq = np.ones(n - 1, dtype=bool)
    for k in keys:
        x = orderable(table[k])
        if x is None:
            return None
        nxt, prev = x[1:], x[:-1]
        if (eq & (nxt < prev)).any():
            return False, False
        eq &= nxt == prev
    return True, not bool(eq.any())


def sort_by_key(table: pa.Table, keys: Sequence[str] = KEY) -> pa.Table:
    if table.num_rows < 2:
        return table
    order = key_order(table, keys)
    if order is not None and order[0]:
        return table  # already in key order: the stable sort would be the identity
    return table.take(pc.sort_indices(table, sort_keys=[(k, "ascending") for k in keys]))


def writer_sort(table: pa.Table, keys: Sequence[str] = KEY) -> list[str] | None:
    """``sort_by`` for :func:`engine.core.publish.write_parquet`: None when the rows are already in non-decreasing
    key order (its stable sort would be the identity: same bytes without sorting again), else ``keys``."""
    order = key_order(table, keys)
    return None if order is not None and order[0] else list(keys)


def first_rows(table: pa.Table, columns: Sequence[str] | None = None, n: int = MAX_ROWS) -> list[dict]:
    """The first ``n`` rows (selected columns) as plain dicts, for error messages and bundle evidence."""
    t = table.select(list(columns)) if columns else table
    return t.slice(0, n).to_pylist()


def _no_duplicates(table: pa.Table, keys: Sequence[str]) -> pa.Table:
    return pa.table({k: table[k].slice(0, 0) for k in keys}).append_column("count", pa.array([], pa.int64()))


def duplicate_keys(table: pa.Table, keys: Sequence[str] = KEY) -> pa.Table:
    """Keys occurring more than once, with their ``count``, sorted by key."""
    if table.num_rows == 0:
        return _no_duplicates(table, keys)
    order = key_order(table, keys)
    if order is not None and order[1]:
        return _no_duplicates(table, keys)  # strictly increasing keys: none repeats
    g = table.select(list(keys)).group_by(list(keys)).aggregate([([], "count_all")])
    g = g.rename_columns([*keys, "count"])
    return sort_by_key(g.filter(pc.greater(g["count"], 1)), keys)


def same_keys(left: pa.Table, right: pa.Table, keys: Sequence[str] = KEY) -> bool:
    """True when both tables hold the same keys row for row, each strictly increasing (so equal key sets)."""
    if left.num_rows != right.num_rows:
        return False
    for t in (left, right):
        order = key_order(t, keys)
        if order is None or not order[1]:
            return False
    for k in keys:
        a, b = left[k], right[k]
        if pa.types.is_dictionary(a.type):
            a = a.cast(a.type.value_type)
        if pa.types.is_dictionary(b.type):
            b = b.cast(b.type.value_type)
        if a.type != b.type:
            try:
                b = b.cast(a.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return False
        if not to_bool(pc.equal(a, b)).all():
            return False
    return True


def key_differences(left: pa.Table, right: pa.Table, keys: Sequence[str] = KEY) -> tuple[pa.Table, pa.Table]:
    """(keys of ``left`` absent from ``right``, keys of ``right`` absent from ``left``), distinct, sorted."""
    lk = left.select(list(keys))
    rk = right.select(list(keys))
    if lk.num_rows and same_keys(lk, rk, keys):
        return lk.slice(0, 0), rk.slice(0, 0)
    if lk.num_rows == 0 or rk.num_rows == 0:
        missing, extra = (lk if rk.num_rows == 0 else lk.slice(0, 0)), (rk if lk.num_rows == 0 else rk.slice(0, 0))
    else:
        missing = lk.join(rk, list(keys), join_type="left anti")
        extra = rk.join(lk, list(keys), join_type="left anti")
    dedup = lambda t: t.group_by(list(keys)).aggregate([]) if t.num_rows else t  # noqa: E731
    return sort_by_key(dedup(missing), keys), sort_by_key(dedup(extra), keys)


def _country_groups(iso: pa.Array | pa.ChunkedArray) -> list[tuple[str, np.ndarray]]:
    """(country, row indices) pairs, countries A-Z."""
    if isinstance(iso, pa.ChunkedArray):
        iso = iso.combine_chunks()
    if len(iso) == 0:
        return []
    enc = pc.dictionary_encode(iso)
    names = enc.dictionary.to_pylist()
    order, cuts = group_rows(enc.indices, len(names))
    groups = [(names[k], order[cuts[k]:cuts[k + 1]]) for k in range(len(names))]
    return sorted(groups, key=lambda g: g[0])


def group_rows(indices: pa.Array, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(row order grouping the rows by code, ascending rows within a code; cut points: code k's rows are
    ``order[cuts[k]:cuts[k + 1]]``) of a dictionary-indices array (nulls: no group). A stable radix sort on
    16-bit codes when they fit."""
    codes = np.asarray(pc.fill_null(indices, n_codes).to_numpy(zero_copy_only=False))
    codes = codes.astype(np.uint16 if n_codes < (1 << 16) - 1 else np.int64, copy=False)
    order = np.argsort(codes, kind="stable")
    cuts = np.zeros(n_codes + 2, dtype=np.int64)
    np.cumsum(np.bincount(codes, minlength=n_codes + 1), out=cuts[1:])
    return order, cuts[:n_codes + 1]


def _read_bounds_file(path: Path) -> pa.Table | None:
    """``tile_id`` and the bounds columns of one ``tile_bounds`` country file (all row groups, file order)."""
    try:
        return pq.ParquetFile(path).read(columns=["tile_id", *BOUNDS_COLS], use_threads=False)
    except FileNotFoundError:
        return None


def _read_ahead(wanted: list[tuple[int, Path]], depth: int = 3) -> Iterator[tuple[int, pa.Table | None]]:
    """(code, table) of each ``tile_bounds`` file in order, the next ``depth`` files being read meanwhile in two
    threads (Parquet decoding releases the GIL); at most ``depth`` + 1 tables are held at a time."""
    if len(wanted) < 2:
        for k, path in wanted:
            yield k, _read_bounds_file(path)
        return
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tile-bounds") as ex:
        pending: deque = deque()
        it = iter(wanted)
        for k, path in it:
            pending.append((k, ex.submit(_read_bounds_file, path)))
            if len(pending) > depth:
                break
        while pending:
            k, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], ex.submit(_read_bounds_file, nxt[1])))
            yield k, fut.result()


def lookup_tile_bounds(bounds_dir: str | Path, iso: Any, tile_id: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Pixel rectangle and centroid of each (iso[i], tile_id[i]) from a ``tile_bounds`` partition.

    S1 writes one file per country (``part-<ISO>.parquet``, rows in tile_id order); only the files of the
    countries asked for are read (whole, a few ahead in two threads: :func:`_read_ahead`). Per country the
    rows' tiles are binary-searched in the file's tile_id column (sorted first if a file is not in tile_id
    order; a tile listed twice resolves to its first row in file order) and the bounds gathered. Returns
    ``(found, {column: float64 array})`` aligned with the input rows (NaN where not found)."""
    from engine.segment1b import spatial

    iso_arr = iso if isinstance(iso, (pa.Array, pa.ChunkedArray)) else pa.array(iso, pa.string())
    if isinstance(iso_arr, pa.ChunkedArray):
        iso_arr = iso_arr.combine_chunks()
    tiles = np.asarray(tile_id, dtype=np.uint64)
    n = tiles.shape[0]
    if n == 0:
        return np.zeros(0, dtype=bool), {c: np.zeros(0, dtype=np.float64) for c in BOUNDS_COLS}
    enc = iso_arr if pa.types.is_dictionary(iso_arr.type) else pc.dictionary_encode(iso_arr)
    names = enc.dictionary.to_pylist()
    order, cuts = group_rows(enc.indices, len(names))
    bdir = Path(bounds_dir)
    wanted = [(k, bdir / spatial.country_part_name(names[k])) for k in range(len(names))
              if names[k] is not None and cuts[k + 1] > cuts[k]]
    if spatial.partition_countries(bdir):  # S1's layout: one file per country
        tables = _read_ahead([(k, path) for k, path in wanted if path.is_file()])
    else:  # a partition written as generic part files: split by country_iso once
        from engine.segment1b.s4_alloc_plan import read_country_table

        tables = ((k, read_country_table(bdir, names[k], ["tile_id", *BOUNDS_COLS])) for k, _ in wanted)
    found = np.zeros(n, dtype=bool)
    out = {c: np.empty(n, dtype=np.float64) for c in BOUNDS_COLS}  # every row is written: a value or NaN
    for k, t in tables:
        if t is None or t.num_rows == 0:
            continue
        rows = order[cuts[k]:cuts[k + 1]]
        tid = np.asarray(t["tile_id"].to_numpy(zero_copy_only=False), dtype=np.uint64)
        srt = None
        if tid.shape[0] > 1 and not bool(np.all(tid[1:] >= tid[:-1])):
            srt = np.argsort(tid, kind="stable")  # tolerate an unsorted file; S1 writes tile_id order
            tid = tid[srt]
        q = tiles[rows]
        pos = np.minimum(np.searchsorted(tid, q), tid.shape[0] - 1)
        hit = tid[pos] == q
        src = pos[hit] if srt is None else srt[pos[hit]]
        dst = rows[hit]
        found[dst] = True
        for c in BOUNDS_COLS:
            out[c][dst] = np.asarray(t[c].to_numpy(zero_copy_only=False), dtype=np.float64)[src]
    if not found.all():
        missing = ~found
        for c in BOUNDS_COLS:
            out[c][missing] = np.nan
    return found, out


def normalise_lon(lon: np.ndarray) -> np.ndarray:
    """Wrap a longitude that left [-180, 180] by one turn (dateline tiles, spec 1B 8 step 3); S6's function."""
    from engine.segment1b.s6_jitter import normalise_lon as _normalise

    return _normalise(lon)


def synthesise_coordinates(centroid_lon, centroid_lat, delta_lon, delta_lat) -> tuple[np.ndarray, np.ndarray]:
    """Spec 1B 9 step 3, the one expression S6 tests, S7 stores and S9 recomputes (binary64, no FMA):
    ``(normalise(centroid_lon + delta_lon), centroid_lat + delta_lat)`` -- S6's :func:`reconstruct` itself."""
    from engine.segment1b.s6_jitter import reconstruct

    return reconstruct(centroid_lon, centroid_lat, delta_lon, delta_lat)


def inside_pixel(lon, lat, bounds: dict[str, np.ndarray], eps: float = EPS_DEG) -> np.ndarray:
    """Point within its pixel rectangle, bounds inclusive with ``eps``; a longitude also matches one turn
    away (a stored, normalised longitude of a dateline tile). NaN bounds (unknown tile) give False."""
    lon = np.asarray(lon, np.float64)
    lat = np.asarray(lat, np.float64)
    lo, hi = bounds["min_lon_deg"] - eps, bounds["max_lon_deg"] + eps
    in_lon = (lon >= lo) & (lon <= hi)
    rest = np.flatnonzero(~in_lon)  # only these can match one turn away (same expressions, fewer rows)
    if rest.size:
        lr, lor, hir = lon[rest], lo[rest], hi[rest]
        in_lon[rest] = ((lr + 360.0 >= lor) & (lr + 360.0 <= hir)) | ((lr - 360.0 >= lor) & (lr - 360.0 <= hir))
    in_lon &= lat >= bounds["min_lat_deg"] - eps
    in_lon &= lat <= bounds["max_lat_deg"] + eps
    return in_lon


def keys_where(table: pa.Table, mask: np.ndarray, columns: Sequence[str] = KEY) -> list[dict]:
    idx = np.flatnonzero(mask)[:MAX_ROWS]
    return table.select([c for c in columns if c in table.column_names]).take(
        pa.array(idx, pa.int64())).to_pylist()


def _equals_const(col: Any, value: str) -> np.ndarray:
    """Row mask of ``col == value`` (a null is not equal) for a string column, plain or dictionary-encoded (the
    predicate is then evaluated once per dictionary value)."""
    if not pa.types.is_dictionary(col.type):
        return to_bool(pc.equal(col, value))
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    out = [np.zeros(0, dtype=bool)]
    for ch in chunks:
        per_value = np.array([v == value for v in ch.dictionary.to_pylist()] + [False], dtype=bool)
        idx = np.asarray(pc.fill_null(ch.indices, len(ch.dictionary)).to_numpy(zero_copy_only=False), np.int64)
        out.append(per_value[idx])
    return np.concatenate(out)


def to_bool(arr: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


# ====================================================================== inputs
def gated_catalogue(ctx, columns: Sequence[str]) -> pa.Table:
    """``outlet_catalogue`` behind the 1B S0 gate (spec 1B 2 "Downstream gate check"): the receipt must exist for
    exactly this run's 1B and 1A identities (``E301_NO_PASS_FLAG``), and the catalogue bytes must be those S0
    verified, with the 1A tokens embedded (:func:`engine.segment1b.s0_gate.read_catalogue`)."""
    from engine.segment1b import s0_gate

    receipt = s0_gate.require_receipt(ctx)
    return s0_gate.read_catalogue(ctx, list(columns), receipt)


def read_parts(path: str | Path, columns: Sequence[str], dictionary: Sequence[str] = ()) -> pa.Table:
    """The ``columns`` (those present; callers check for missing ones) of a partition's ``part-*.parquet``
    files, concatenated in file-name order -- :func:`engine.core.publish.read_parquet_dir` reading only what is
    used, combined into one chunk per column. ``dictionary`` columns stay dictionary-encoded as Parquet stores
    them. A missing directory or no part file raises ``EngineError("E_PARTITION_MISSING")``."""
    tables = []
    for p in publish.part_files(path):
        pf = pq.ParquetFile(p, read_dictionary=[c for c in dictionary if c in columns])
        names = set(pf.schema_arrow.names)
        tables.append(pf.read(columns=[c for c in columns if c in names]))
    # one chunk per column (a file holds several row groups): later per-column numpy views need no copy
    return (pa.concat_tables(tables) if len(tables) > 1 else tables[0]).combine_chunks()


def read_partition(path: Path, columns: Sequence[str], code: str, what: str) -> pa.Table:
    """Selected columns of a Parquet partition with canonical key types; a missing partition or column is
    ``code``."""
    try:
        t = read_parts(path, columns)
    except EngineError as exc:
        if exc.code != "E_PARTITION_MISSING":
            raise
        raise InputError(code, f"{what} partition not found (did its state run?)", path=path) from None
    missing = [c for c in columns if c not in t.column_names]
    if missing:
        raise InputError(code, f"{what} lacks columns {missing}", path=path, detail={"columns": t.column_names})
    try:
        return cast_keys(t.select(list(columns)))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise InputError(code, f"{what}: key columns of the wrong type ({exc})", path=path) from None


# ====================================================================== compute
def synthesise(s5: pa.Table, s6: pa.Table, catalogue: pa.Table, bounds_dir: str | Path,
               manifest_fingerprint: str | None = None) -> tuple[pa.Table, dict]:
    """Pure S7 (module docstring): returns the sorted ``s7_site_synthesis`` table and the run summary.
    Raises ``InputError`` with the spec's code on the first failing check (all offending keys counted)."""
    s5 = sort_by_key(cast_keys(s5.select([*KEY, "tile_id"]), [*KEY, "tile_id"]))
    s6cols = [*KEY, "tile_id", "delta_lat_deg", "delta_lon_deg"]
    if manifest_fingerprint is not None and "manifest_fingerprint" in s6.column_names:
        bad = ~_equals_const(s6["manifest_fingerprint"], manifest_fingerprint)
        if bad.any():
            raise InputError("E705_PARTITION_OR_IDENTITY", "s6_site_jitter rows embed another manifest_fingerprint "
                             "than their partition", rows=keys_where(s6, bad, [*KEY, "manifest_fingerprint"]),
                             detail={"count": int(bad.sum()), "expected": manifest_fingerprint})
    s6 = sort_by_key(cast_keys(s6.select(s6cols), [*KEY, "tile_id"]))

    # 1. S5 <-> S6: one row each per site, same tile
    for name, t in (("s5_site_tile_assignment", s5), ("s6_site_jitter", s6)):
        d = duplicate_keys(t)
        if d.num_rows:
            raise InputError("E703_DUP_KEY", f"{name} has duplicate site keys", rows=first_rows(d),
                             detail={"count": d.num_rows})
    missing, extra = key_differences(s5, s6)
    if missing.num_rows:
        raise InputError("E701_ROW_MISSING", "sites of s5_site_tile_assignment without an s6_site_jitter row",
                         rows=first_rows(missing), detail={"count": missing.num_rows})
    if extra.num_rows:
        raise InputError("E702_ROW_EXTRA", "s6_site_jitter rows for sites absent from s5_site_tile_assignment",
                         rows=first_rows(extra), detail={"count": extra.num_rows})
    t5 = np.asarray(s5["tile_id"].to_numpy(zero_copy_only=False), np.uint64)
    t6 = np.asarray(s6["tile_id"].to_numpy(zero_copy_only=False), np.uint64)
    diff = t5 != t6  # same sorted key sets -> rows aligned
    if diff.any():
        raise InputError("E701_ROW_MISSING", "no s6_site_jitter row with the site's S5 tile_id (tile differs)",
                         rows=keys_where(s5.append_column("s6_tile_id", pa.array(t6)), diff, [*KEY, "tile_id",
                                                                                            "s6_tile_id"]),
                         detail={"count": int(diff.sum())})

    # 2. tile foreign key
    found, b = lookup_tile_bounds(bounds_dir, s5["legal_country_iso"], t5)
    if not found.all():
        raise InputError("E709_TILE_FK_VIOLATION", "(legal_country_iso, tile_id) not in tile_bounds",
                         rows=keys_where(s5, ~found, [*KEY, "tile_id"]), path=bounds_dir,
                         detail={"count": int((~found).sum())})

    # 3. coordinates
    dlon = np.asarray(s6["delta_lon_deg"].to_numpy(zero_copy_only=False), np.float64)
    dlat = np.asarray(s6["delta_lat_deg"].to_numpy(zero_copy_only=False), np.float64)
    lon, lat = synthesise_coordinates(b["centroid_lon_deg"], b["centroid_lat_deg"], dlon, dlat)

    # 4. inside the pixel
    inside = inside_pixel(lon, lat, b)
    if not inside.all():
        t = s5.append_column("lon_deg", pa.array(lon)).append_column("lat_deg", pa.array(lat))
        raise InputError("E707_POINT_OUTSIDE_PIXEL", f"site outside its pixel (inclusive bounds, eps {EPS_DEG} deg)",
                         rows=keys_where(t, ~inside, [*KEY, "tile_id", "lon_deg", "lat_deg"]),
                         detail={"count": int((~inside).sum())})

    out = pa.table({
        "merchant_id": s5["merchant_id"],
        "legal_country_iso": s5["legal_country_iso"],
        "site_order": s5["site_order"],
        "tile_id": pa.array(t5, pa.uint64()),
        "lon_deg": pa.array(lon, pa.float64()),
        "lat_deg": pa.array(lat, pa.float64()),
    })

    # 5. coverage parity with 1A
    cat = cast_keys(catalogue.select([*KEY, "final_country_outlet_count"]))
    fast = _coverage_fast(cat, out)
    if fast is not None:  # every check of step 5 passes (proved in one pass over the sorted keys)
        return out, _summary(s5, s6, out, found, inside, cat, fast)
    d = duplicate_keys(cat)
    if d.num_rows:
        raise InputError("E708_1A_COVERAGE_FAIL", "outlet_catalogue has duplicate site keys", rows=first_rows(d),
                         detail={"count": d.num_rows})
    missing, extra = key_differences(cat, out)
    if missing.num_rows or extra.num_rows:
        raise InputError("E708_1A_COVERAGE_FAIL", "site keys of s7_site_synthesis and outlet_catalogue differ: "
                         f"{missing.num_rows} outlets without a site, {extra.num_rows} sites without an outlet",
                         rows=[{"missing_site": r} for r in first_rows(missing)]
                         + [{"site_without_outlet": r} for r in first_rows(extra)],
                         detail={"outlets_without_site": missing.num_rows, "sites_without_outlet": extra.num_rows})
    per_pair = out.group_by(list(PAIR)).aggregate([([], "count_all")]).rename_columns([*PAIR, "sites"])
    fcc = cat.group_by(list(PAIR)).aggregate([("final_country_outlet_count", "min"),
                                              ("final_country_outlet_count", "max")])
    j = sort_by_key(per_pair.join(fcc, list(PAIR)), PAIR)
    sites = np.asarray(j["sites"].to_numpy(zero_copy_only=False), np.int64)
    fmin = np.asarray(pc.cast(j["final_country_outlet_count_min"], pa.int64()).to_numpy(zero_copy_only=False))
    fmax = np.asarray(pc.cast(j["final_country_outlet_count_max"], pa.int64()).to_numpy(zero_copy_only=False))
    bad = (fmin != fmax) | (fmin != sites)
    if bad.any():
        raise InputError("E708_1A_COVERAGE_FAIL", "per (merchant, country) site count differs from "
                         "outlet_catalogue.final_country_outlet_count",
                         rows=keys_where(j, bad, [*PAIR, "sites", "final_country_outlet_count_min",
                                                  "final_country_outlet_count_max"]),
                         detail={"count": int(bad.sum())})

    by_country: dict[str, dict] = {}
    for code, rows in _country_groups(out["legal_country_iso"]):
        by_country[code] = {"sites": int(rows.shape[0]), "pairs": None}
    pc_counts = per_pair.group_by(["legal_country_iso"]).aggregate([([], "count_all")])
    for code, cnt in zip(pc_counts["legal_country_iso"].to_pylist(), pc_counts["count_all"].to_pylist()):
        by_country[code]["pairs"] = int(cnt)
    return out, _summary(s5, s6, out, found, inside, cat, by_country)


def _coverage_fast(cat: pa.Table, out: pa.Table) -> dict | None:
    """Step 5 without joins or group-bys when ``outlet_catalogue`` and the S7 rows hold the same site keys row
    for row (both strictly increasing): the per (merchant, country) site counts are then run lengths, compared
    with the runs' ``final_country_outlet_count`` min/max. Returns ``by_country`` when every check passes, None
    when anything is not proved (the join/group-by path then runs and reports)."""
    if out.num_rows == 0 or cat["final_country_outlet_count"].null_count or not same_keys(
            cat.select(list(KEY)), out.select(list(KEY)), KEY):
        return None
    m = np.asarray(out["merchant_id"].to_numpy(zero_copy_only=False), np.uint64)
    iso = orderable(out["legal_country_iso"])
    if iso is None:
        return None
    n = out.num_rows
    start = np.flatnonzero(np.concatenate([[True], (m[1:] != m[:-1]) | (iso[1:] != iso[:-1])]))
    sites = np.diff(np.append(start, n))
    fc = np.asarray(pc.cast(cat["final_country_outlet_count"], pa.int64()).to_numpy(zero_copy_only=False), np.int64)
    if ((np.minimum.reduceat(fc, start) != sites) | (np.maximum.reduceat(fc, start) != sites)).any():
        return None
    col = out["legal_country_iso"]
    enc = pc.dictionary_encode(col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col)
    idx = np.asarray(enc.indices.to_numpy(zero_copy_only=False), np.int64)
    names = enc.dictionary.to_pylist()
    n_sites = np.bincount(idx, minlength=len(names))
    n_pairs = np.bincount(idx[start], minlength=len(names))
    return {names[k]: {"sites": int(n_sites[k]), "pairs": int(n_pairs[k])}
            for k in sorted(range(len(names)), key=lambda k: names[k])}


def _summary(s5: pa.Table, s6: pa.Table, out: pa.Table, found: np.ndarray, inside: np.ndarray, cat: pa.Table,
             by_country: dict) -> dict:
    summary = {
        "sizes": {"sites_total_s5": s5.num_rows, "sites_total_s6": s6.num_rows, "sites_total_s7": out.num_rows,
                  "parity_s5_s6_ok": True, "parity_s5_s7_ok": True},
        "validation_counters": {"fk_tile_ok_count": int(found.sum()), "fk_tile_fail_count": 0,
                                "inside_pixel_ok_count": int(inside.sum()), "inside_pixel_fail_count": 0,
                                "path_embed_mismatches": 0, "coverage_1a_ok_count": cat.num_rows,
                                "coverage_1a_miss_count": 0},
        "by_country": dict(sorted(by_country.items())),
    }
    return summary


# ====================================================================== state entry points
def run_with_report(ctx) -> dict:
    """S7 for a RunContext: gate, load, synthesise, validate against the schema, publish; returns the summary."""
    if ctx.ids_1a is None:
        raise InputError("E705_PARTITION_OR_IDENTITY", "1B S7 needs the 1A identities (ctx.ids_1a)")
    cat = cast_keys(gated_catalogue(ctx, [*KEY, "final_country_outlet_count"]))  # the gate comes first
    s5 = read_partition(ctx.path("s5_site_tile_assignment"), [*KEY, "tile_id"], "E701_ROW_MISSING",
                        "s5_site_tile_assignment")
    s6_path = ctx.path("s6_site_jitter")
    want6 = [*KEY, "tile_id", "delta_lat_deg", "delta_lon_deg"]
    # the 64-hex fingerprint of every row stays dictionary-encoded as stored (checked once per distinct value)
    s6 = read_parts(s6_path, [*want6, "manifest_fingerprint"], dictionary=["manifest_fingerprint"]) \
        if Path(s6_path).is_dir() else None
    if s6 is None:
        raise InputError("E701_ROW_MISSING", "s6_site_jitter partition not found (did S6 run?)", path=s6_path)
    if any(c not in s6.column_names for c in want6):
        raise InputError("E704_SCHEMA_VIOLATION", "s6_site_jitter lacks columns",
                         path=s6_path, rows=[c for c in want6 if c not in s6.column_names])
    out, summary = synthesise(s5, s6, cat, ctx.path("tile_bounds"), ctx.ids.manifest_fingerprint)

    spath = ctx.schema_path("s7_site_synthesis")
    problems = validate_table(out, spath)
    if problems:
        raise EngineError("E704_SCHEMA_VIOLATION", "s7_site_synthesis does not match its schema", rows=problems)
    final = ctx.path("s7_site_synthesis")
    with publish.staged(final, PUBLISH_CODE) as tmp:
        publish.write_parquet(out, Path(tmp) / "part-00000.parquet", sort_by=writer_sort(out),
                              schema=arrow_schema(spath))
    summary = {"identity": {"seed": int(ctx.ids.seed), "parameter_hash": ctx.ids.parameter_hash,
                            "manifest_fingerprint": ctx.ids.manifest_fingerprint, "run_id": ctx.ids.run_id},
               **summary}
    return summary


def run(ctx) -> None:
    summary = run_with_report(ctx)
    # run summary = non-authoritative evidence (spec 1B 0.2): the job log, never a dataset partition
    print("s7_run_summary " + json.dumps({k: summary[k] for k in ("identity", "sizes", "validation_counters")},
                                         sort_keys=True), file=sys.stderr)

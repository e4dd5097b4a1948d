"""1B S1 - ``tile_index`` and ``tile_bounds``: the raster cells that belong to each country (spec §3).

No RNG. Inputs: the population raster's *grid* (never its values), the ``world_countries`` polygons and the
ISO table (foreign key). Output partitions ``tile_index`` and ``tile_bounds`` under ``grid={grid_hash}``
(decision 13), one file per country (``part-<ISO>.parquet``, countries A-Z, rows in ``tile_id`` order).

Inclusion rule ``center`` (spec §3, decision 24): a cell belongs to a country iff its centre lies in the
country - on a shell boundary counts inside, on a hole boundary outside, antimeridian-cut parts handled by
:mod:`engine.segment1b.spatial`. It is evaluated by an exact scanline rasterizer (:func:`_scan_parts`,
numba): for each raster row it intersects the row's centre latitude with every polygon edge using the
half-open rule ``(y1 > y) != (y2 > y)``, pairs the sorted crossings (even-odd within each polygon part)
into *closed* longitude intervals, adds the shell boundary points on that latitude (vertices, horizontal
edges), removes the hole boundary points (crossings, vertices, horizontal edges), and ORs the parts.
Cell centres are compared with ``searchsorted`` against the very float64 centres written to the output, so
a centre exactly on an edge is classified by the rule above, not by rounding. (GDAL's rasterizer has no
boundary rule and shapely's ``contains_xy`` excludes all boundaries; neither satisfies decision 24.)

Project decision (decision 11, documented in the reference provenance): a country whose polygons contain
no cell centre at all (a micro-state smaller than a cell, e.g. Monaco on a 5' grid) would otherwise have no
tile and every merchant there would be rejected. Such a country gets exactly one tile: the cell with the
largest overlap area with its polygons (ties: smaller ``tile_id``), marked ``inclusion_rule =
"largest_overlap"``. Every country with a non-empty polygon therefore has at least one tile.

Streaming: a country is processed in row strips of at most ``STRIP_CELLS`` cells of its bounding window;
each strip is written as one row group as soon as it is computed. Several processes may work on
different countries; each country's file depends only on that country, so bytes never depend on the
worker count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely

from engine.core import publish
from engine.core.errors import InputError
from engine.core.schema import arrow_schema
from engine.segment1b.s0_gate import load_iso_codes
from engine.segment1b import spatial
from engine.segment1b.spatial import CountryShape, Grid

INCLUSION_RULES = ("center",)
RULE_CENTER = "center"
RULE_FALLBACK = "largest_overlap"
STRIP_CELLS = 1 << 22  # cells of the country window per strip (memory bound per worker)
ZSTD_LEVEL = 1
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"

# column names, types and order come from the JSON row schemas (contracts/schemas/1B/); required
# columns are non-nullable, so Parquet stores no definition levels
TILE_INDEX_SCHEMA = arrow_schema("schemas/1B/tile_index.schema.json")
TILE_BOUNDS_SCHEMA = arrow_schema("schemas/1B/tile_bounds.schema.json")


# --------------------------------------------------------------------------------------------------
# Exact scanline rasterizer (numba)
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _x_at(xa, ya, xb, yb, y):
    # canonical orientation (lower endpoint first) so an edge gives the same x whichever way it runs;
    # exact at the endpoints.
    if ya > yb:
        xa, ya, xb, yb = xb, yb, xa, ya
    if y == ya:
        return xa
    if y == yb:
        return xb
    return xa + (y - ya) * (xb - xa) / (yb - ya)


@numba.njit(cache=True)
def _scan_parts(ex1, ey1, ex2, ey2, ehole, pstart, pend, cx, cy, mask):
    """OR the decision-24 membership of every part into ``mask[len(cy), len(cx)]`` (uint8).

    Edges of part p are ``pstart[p]:pend[p]``; ``cy`` strictly decreasing, ``cx`` strictly increasing.
    Returns -1 on success, else the index of a part with an odd crossing count (a ring not closed).
    """
    nr_all = cy.shape[0]
    ncy = -cy
    scratch = np.zeros(cx.shape[0], np.uint8)
    for p in range(pstart.shape[0]):
        s = pstart[p]
        t = pend[p]
        if t <= s:
            continue
        xmin = np.inf
        xmax = -np.inf
        ymin = np.inf
        ymax = -np.inf
        for k in range(s, t):
            xmin = min(xmin, ex1[k], ex2[k])
            xmax = max(xmax, ex1[k], ex2[k])
            ymin = min(ymin, ey1[k], ey2[k])
            ymax = max(ymax, ey1[k], ey2[k])
        r_lo = np.searchsorted(ncy, -ymax, side="left")
        r_hi = np.searchsorted(ncy, -ymin, side="right")
        if r_lo >= r_hi:
            continue
        k_lo = np.searchsorted(cx, xmin, side="left")
        k_hi = np.searchsorted(cx, xmax, side="right")
        if k_lo >= k_hi:
            continue
        nr = r_hi - r_lo
        ncross = np.zeros(nr + 1, np.int64)
        ntouch = np.zeros(nr + 1, np.int64)
        for k in range(s, t):
            ya = ey1[k]
            yb = ey2[k]
            lo = min(ya, yb)
            hi = max(ya, yb)
            i0 = max(np.searchsorted(ncy, -hi, side="left"), r_lo)
            i1 = min(np.searchsorted(ncy, -lo, side="right"), r_hi)
            for i in range(i0, i1):
                y = cy[i]
                ntouch[i - r_lo + 1] += 1
                if (ya > y) != (yb > y):
                    ncross[i - r_lo + 1] += 1
        for i in range(nr):
            ncross[i + 1] += ncross[i]
            ntouch[i + 1] += ntouch[i]
        cross_x = np.empty(ncross[nr], np.float64)
        touch_lo = np.empty(ntouch[nr], np.float64)
        touch_hi = np.empty(ntouch[nr], np.float64)
        touch_hole = np.empty(ntouch[nr], np.uint8)
        fc = ncross[:nr].copy()
        ft = ntouch[:nr].copy()
        for k in range(s, t):
            xa = ex1[k]
            ya = ey1[k]
            xb = ex2[k]
            yb = ey2[k]
            lo = min(ya, yb)
            hi = max(ya, yb)
            i0 = max(np.searchsorted(ncy, -hi, side="left"), r_lo)
            i1 = min(np.searchsorted(ncy, -lo, side="right"), r_hi)
            for i in range(i0, i1):
                y = cy[i]
                j = i - r_lo
                if ya == yb:
                    touch_lo[ft[j]] = min(xa, xb)
                    touch_hi[ft[j]] = max(xa, xb)
                else:
                    x = _x_at(xa, ya, xb, yb, y)
                    touch_lo[ft[j]] = x
                    touch_hi[ft[j]] = x
                    if (ya > y) != (yb > y):
                        cross_x[fc[j]] = x
                        fc[j] += 1
                touch_hole[ft[j]] = ehole[k]
                ft[j] += 1
        for j in range(nr):
            c0 = ncross[j]
            c1 = ncross[j + 1]
            if (c1 - c0) % 2 != 0:
                return p
            t0 = ntouch[j]
            t1 = ntouch[j + 1]
            if t1 == t0:
                continue
            scratch[k_lo:k_hi] = 0
            if c1 > c0:
                xs = np.sort(cross_x[c0:c1])
                for q in range(0, c1 - c0, 2):
                    a = np.searchsorted(cx, xs[q], side="left")
                    b = np.searchsorted(cx, xs[q + 1], side="right")
                    if b > a:
                        scratch[a:b] = 1
            # shell boundary points on this latitude count inside ...
            for q in range(t0, t1):
                if touch_hole[q] == 0:
                    a = np.searchsorted(cx, touch_lo[q], side="left")
                    b = np.searchsorted(cx, touch_hi[q], side="right")
                    if b > a:
                        scratch[a:b] = 1
            # ... hole boundary points outside (applied last: closed shell minus closed holes)
            for q in range(t0, t1):
                if touch_hole[q] == 1:
                    a = np.searchsorted(cx, touch_lo[q], side="left")
                    b = np.searchsorted(cx, touch_hi[q], side="right")
                    if b > a:
                        scratch[a:b] = 0
            row = r_lo + j
            for k in range(k_lo, k_hi):
                if scratch[k]:
                    mask[row, k] = 1
    return -1


@dataclass
class PartEdges:
    """Edge arrays of a set of polygon parts (rings split into segments, holes flagged)."""

    x1: np.ndarray
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    hole: np.ndarray
    start: np.ndarray
    end: np.ndarray
    bounds: np.ndarray  # (nparts, 4) minx, miny, maxx, maxy


def part_edges(parts) -> PartEdges:
    xs1, ys1, xs2, ys2, holes, starts, ends, bnds = [], [], [], [], [], [], [], []
    n = 0
    for part in parts:
        s = n
        for ri, ring in enumerate([part.exterior, *part.interiors]):
            c = np.asarray(ring.coords, dtype=np.float64)[:, :2]
            if c.shape[0] < 2:
                continue
            if not (c[0, 0] == c[-1, 0] and c[0, 1] == c[-1, 1]):
                c = np.vstack([c, c[:1]])
            xs1.append(c[:-1, 0])
            ys1.append(c[:-1, 1])
            xs2.append(c[1:, 0])
            ys2.append(c[1:, 1])
            holes.append(np.full(c.shape[0] - 1, 1 if ri > 0 else 0, np.uint8))
            n += c.shape[0] - 1
        starts.append(s)
        ends.append(n)
        bnds.append(part.bounds)

    def cat(a, dt):
        return np.concatenate(a).astype(dt, copy=False) if a else np.zeros(0, dt)

    return PartEdges(
        cat(xs1, np.float64), cat(ys1, np.float64), cat(xs2, np.float64), cat(ys2, np.float64),
        cat(holes, np.uint8), np.asarray(starts, np.int64), np.asarray(ends, np.int64),
        np.asarray(bnds, np.float64).reshape(-1, 4),
    )


def rasterize_center(parts, lon_centres: np.ndarray, lat_centres: np.ndarray) -> np.ndarray:
    """Decision-24 centre-rule mask (uint8 ``[len(lat_centres), len(lon_centres)]``) of polygon parts.

    ``lon_centres`` strictly increasing, ``lat_centres`` strictly decreasing (north-up grid rows).
    """
    pe = part_edges(parts)
    mask = np.zeros((lat_centres.shape[0], lon_centres.shape[0]), np.uint8)
    bad = _scan_parts(pe.x1, pe.y1, pe.x2, pe.y2, pe.hole, pe.start, pe.end,
                      np.ascontiguousarray(lon_centres, np.float64), np.ascontiguousarray(lat_centres, np.float64), mask)
    if bad >= 0:
        raise InputError("E001_GEO_INVALID", "polygon ring is not closed (odd number of crossings)",
                         rows=[f"part {bad}"])
    return mask


# --------------------------------------------------------------------------------------------------
# Per-country tiling
# --------------------------------------------------------------------------------------------------


@dataclass
class GridArrays:
    """Per-row / per-column values gathered per tile (computed once per grid, spec §3 performance)."""

    grid: Grid
    lon_c: np.ndarray
    lat_c: np.ndarray
    lon_min: np.ndarray
    lon_max: np.ndarray
    lat_min: np.ndarray
    lat_max: np.ndarray
    area: np.ndarray

    @classmethod
    def of(cls, grid: Grid) -> "GridArrays":
        ll, lr = grid.lon_left(), grid.lon_right()
        lt, lb = grid.lat_top(), grid.lat_bottom()
        # latitude edges clamped to the poles (a cell cannot extend beyond them); longitude edges kept
        lat_lo = np.clip(np.minimum(lt, lb), -90.0, 90.0)
        lat_hi = np.clip(np.maximum(lt, lb), -90.0, 90.0)
        return cls(grid, grid.lon_centres(), grid.lat_centres(), np.minimum(ll, lr), np.maximum(ll, lr),
                   lat_lo, lat_hi, grid.row_areas_m2())


def country_window(ga: GridArrays, bounds) -> tuple[int, int, int, int]:
    """Rows/cols ``[r0, r1) x [c0, c1)`` whose centres lie within the (closed) bounding box."""
    minx, miny, maxx, maxy = bounds
    ncy = -ga.lat_c
    r0 = int(np.searchsorted(ncy, -maxy, side="left"))
    r1 = int(np.searchsorted(ncy, -miny, side="right"))
    c0 = int(np.searchsorted(ga.lon_c, minx, side="left"))
    c1 = int(np.searchsorted(ga.lon_c, maxx, side="right"))
    return r0, max(r0, r1), c0, max(c0, c1)


class StripBuffers:
    """Reusable per-process buffers for one strip (first-touch page faults on fresh arrays cost more than
    the gathers themselves at 30 arc-seconds). Views handed out are valid until the next strip."""

    def __init__(self, cells: int = STRIP_CELLS):
        self.cells = cells
        self.mask = np.zeros(cells, np.uint8)
        self.rows = np.empty(cells, np.int64)
        self.cols = np.empty(cells, np.int64)
        self.tid = np.empty(cells, np.uint64)
        self.ru = np.empty(cells, np.uint64)
        self.cu = np.empty(cells, np.uint64)
        self.f = np.empty((7, cells), np.float64)


def country_strips(shape: CountryShape, ga: GridArrays, strip_cells: int = STRIP_CELLS,
                   bufs: StripBuffers | None = None):
    """Yield ``(rows, cols)`` int64 arrays of the country's centre-rule tiles, strip by strip, tile_id order.

    With ``bufs`` the arrays are views into the buffers, valid until the next strip is requested.
    """
    if not shape.parts:
        return
    r0, r1, c0, c1 = country_window(ga, shape.bounds)
    if r1 <= r0 or c1 <= c0:
        return
    w = c1 - c0
    step = max(1, strip_cells // w)
    pe = part_edges(shape.parts)
    cx = np.ascontiguousarray(ga.lon_c[c0:c1])
    for rs in range(r0, r1, step):
        re_ = min(r1, rs + step)
        ncell = (re_ - rs) * w
        use = bufs is not None and ncell <= bufs.cells
        if use:
            mask = bufs.mask[:ncell].reshape(re_ - rs, w)
            mask[:] = 0
        else:
            mask = np.zeros((re_ - rs, w), np.uint8)
        bad = _scan_parts(pe.x1, pe.y1, pe.x2, pe.y2, pe.hole, pe.start, pe.end, cx,
                          np.ascontiguousarray(ga.lat_c[rs:re_]), mask)
        if bad >= 0:
            raise InputError("E001_GEO_INVALID", f"{shape.iso}: polygon ring not closed", rows=[f"part {bad}"])
        if use:
            k = _mask_rc_into(mask, rs, c0, bufs.rows, bufs.cols)
            rows, cols = bufs.rows[:k], bufs.cols[:k]
        else:
            rows, cols = _mask_rc(mask, rs, c0)
        if rows.size:
            yield rows, cols


@numba.njit(cache=True)
def _mask_rc_into(mask, r0, c0, rows, cols):
    """Row/col of the set cells of a strip mask, row-major (= tile_id order); returns their count."""
    k = 0
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            if mask[i, j] != 0:
                rows[k] = r0 + i
                cols[k] = c0 + j
                k += 1
    return k


@numba.njit(cache=True)
def _mask_rc(mask, r0, c0):
    n = 0
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            n += mask[i, j] != 0
    rows = np.empty(n, np.int64)
    cols = np.empty(n, np.int64)
    _mask_rc_into(mask, r0, c0, rows, cols)
    return rows, cols


@numba.njit(cache=True)
def _gather_into(rows, cols, width, lon_c, lat_c, area, lat_min, lat_max, lon_min, lon_max, tid, ru, cu, out):
    """Every output column of a strip in one pass (per-row / per-column grid values gathered per tile)."""
    for i in range(rows.shape[0]):
        r = rows[i]
        c = cols[i]
        ru[i] = np.uint64(r)
        cu[i] = np.uint64(c)
        tid[i] = np.uint64(r) * np.uint64(width) + np.uint64(c)
        out[0, i] = lon_c[c]
        out[1, i] = lat_c[r]
        out[2, i] = area[r]
        out[3, i] = lat_min[r]
        out[4, i] = lat_max[r]
        out[5, i] = lon_min[c]
        out[6, i] = lon_max[c]


def largest_overlap_cell(shape: CountryShape, ga: GridArrays) -> tuple[int, int] | None:
    """Fallback tile of a country without any centre inside: the cell of largest overlap (ties: lower id).

    Overlap is measured in square degrees (all cells of a grid have the same size in degrees, and
    the candidates lie within a few cells of each other); overlaps of one cell with several parts add up.
    """
    g = ga.grid
    totals: dict[int, float] = {}
    for part in shape.parts:
        minx, miny, maxx, maxy = part.bounds
        cols = np.flatnonzero((ga.lon_max >= minx) & (ga.lon_min <= maxx))
        rows = np.flatnonzero((ga.lat_max >= miny) & (ga.lat_min <= maxy))
        if cols.size == 0 or rows.size == 0:
            continue
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        rr = rr.ravel()
        cc = cc.ravel()
        boxes = shapely.box(ga.lon_min[cc], ga.lat_min[rr], ga.lon_max[cc], ga.lat_max[rr])
        areas = shapely.area(shapely.intersection(boxes, part))
        for k in np.flatnonzero(areas > 0):
            tid = int(rr[k]) * g.width + int(cc[k])
            totals[tid] = totals.get(tid, 0.0) + float(areas[k])
    if not totals:
        return None
    tid = min(totals, key=lambda t: (-totals[t], t))
    return tid // g.width, tid % g.width


# --------------------------------------------------------------------------------------------------
# Writing (one file per country and dataset)
# --------------------------------------------------------------------------------------------------


_ZEROS = {"n": 0, "arr": None}


def _dict_const(value: str, n: int) -> pa.Array:
    """A constant string column as a dictionary array: written dictionary-encoded without hashing rows."""
    if _ZEROS["n"] < n:  # one shared all-zero index buffer, sliced (zero-copy)
        _ZEROS["n"] = max(n, 1 << 20)
        _ZEROS["arr"] = pa.array(np.zeros(_ZEROS["n"], np.int32))
    return pa.DictionaryArray.from_arrays(_ZEROS["arr"].slice(0, n), pa.array([value], pa.string()), safe=False)


def _write_schema(schema: pa.Schema) -> pa.Schema:
    # string columns go in as dictionary arrays; the Arrow schema is not stored, so readers see the
    # plain Parquet types of TILE_INDEX_SCHEMA / TILE_BOUNDS_SCHEMA (UTF-8 strings)
    return pa.schema([pa.field(f.name, pa.dictionary(pa.int32(), pa.string()) if f.type == pa.string() else f.type,
                               nullable=f.nullable) for f in schema])


_INDEX_WRITE = _write_schema(TILE_INDEX_SCHEMA)
_BOUNDS_WRITE = _write_schema(TILE_BOUNDS_SCHEMA)


def strip_tables(iso: str, rows: np.ndarray, cols: np.ndarray, ga: GridArrays, rule: str = RULE_CENTER,
                 bufs: StripBuffers | None = None) -> tuple[pa.Table, pa.Table]:
    """``tile_index`` and ``tile_bounds`` rows of one strip (the two tables share their arrays; with ``bufs``
    they are views into the buffers, to be written before the next strip)."""
    n = rows.shape[0]
    if bufs is None or n > bufs.cells:
        bufs = StripBuffers(max(n, 1))
    tid, ru, cu, f = bufs.tid[:n], bufs.ru[:n], bufs.cu[:n], bufs.f[:, :n]
    _gather_into(rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False), ga.grid.width, ga.lon_c,
                 ga.lat_c, ga.area, ga.lat_min, ga.lat_max, ga.lon_min, ga.lon_max, tid, ru, cu, f)
    a_iso = _dict_const(iso, n)
    a_tid = pa.array(tid, pa.uint64())
    lon_c, lat_c = pa.array(f[0]), pa.array(f[1])
    index = pa.table([a_iso, a_tid, pa.array(ru), pa.array(cu), lon_c, lat_c, pa.array(f[2]), _dict_const(rule, n)],
                     schema=_INDEX_WRITE)
    bounds = pa.table([a_iso, a_tid, pa.array(f[3]), pa.array(f[4]), pa.array(f[5]), pa.array(f[6]), lat_c, lon_c],
                      schema=_BOUNDS_WRITE)
    return index, bounds


# Parquet encodings (pinned: the bytes depend on them; measured on Russia at 30 arc-seconds).
# Integer keys are monotone within a country: DELTA_BINARY_PACKED stores them in almost nothing.
# Float columns are per-row or per-column functions of the grid: BYTE_STREAM_SPLIT + zstd compresses
# them ~40x at memcpy speed (dictionary encoding was 2x slower and 8x larger). Strings: dictionary.
def parquet_writer(path: Path, schema: pa.Schema) -> pq.ParquetWriter:
    strings = [f.name for f in schema if pa.types.is_dictionary(f.type) or f.type == pa.string()]
    enc = {}
    for f in schema:
        if f.name in strings:
            continue
        enc[f.name] = "DELTA_BINARY_PACKED" if pa.types.is_integer(f.type) else "BYTE_STREAM_SPLIT"
    return pq.ParquetWriter(
        str(path),
        schema,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=strings,
        column_encoding=enc,
        # min/max of raster_row/raster_col per row group: S2 sizes its raster window without a scan
        write_statistics=[c for c in ("raster_row", "raster_col") if c in schema.names],
        version="2.6",
        data_page_version="1.0",
        store_schema=False,
        write_page_index=False,
        write_page_checksum=False,
    )


class _Sink:
    """One Parquet file; every strip becomes one row group (strips are fixed by the grid and the country's
    window, so row-group boundaries never depend on scheduling)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = path
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self.writer is None:
            self.writer = parquet_writer(self.path, self.schema)
        self.writer.write_table(table, row_group_size=table.num_rows)
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


_BUFS: dict = {}


def _buffers(cells: int) -> StripBuffers:
    """One set of strip buffers per process, reused across countries."""
    b = _BUFS.get(cells)
    if b is None:
        _BUFS.clear()
        b = _BUFS[cells] = StripBuffers(cells)
    return b


def tile_country(iso: str, shape: CountryShape, ga: GridArrays, index_dir: Path, bounds_dir: Path,
                 strip_cells: int = STRIP_CELLS) -> dict:
    """Tile one country and write ``part-<ISO>.parquet`` into both partition dirs; returns its report row."""
    name = spatial.country_part_name(iso)
    si = _Sink(Path(index_dir) / name, _INDEX_WRITE)
    sb = _Sink(Path(bounds_dir) / name, _BOUNDS_WRITE)
    n = 0
    tmin = tmax = None
    rule = RULE_CENTER
    r0, r1, c0, c1 = country_window(ga, shape.bounds) if shape.parts else (0, 0, 0, 0)
    bufs = _buffers(strip_cells)
    for rows, cols in country_strips(shape, ga, strip_cells, bufs):
        ti, tb = strip_tables(iso, rows, cols, ga, RULE_CENTER, bufs)
        si.add(ti)
        sb.add(tb)
        del ti, tb
        if tmin is None:
            tmin = int(rows[0]) * ga.grid.width + int(cols[0])
        tmax = int(rows[-1]) * ga.grid.width + int(cols[-1])
        n += rows.shape[0]
    if n == 0 and shape.parts:
        cell = largest_overlap_cell(shape, ga)
        if cell is not None:
            rows = np.array([cell[0]], np.int64)
            cols = np.array([cell[1]], np.int64)
            rule = RULE_FALLBACK
            ti, tb = strip_tables(iso, rows, cols, ga, RULE_FALLBACK)
            si.add(ti)
            sb.add(tb)
            tmin = tmax = int(rows[0]) * ga.grid.width + int(cols[0])
            n = 1
    si.close()
    sb.close()
    return {
        "country_iso": iso,
        "cells_visited": int((r1 - r0) * (c1 - c0)),
        "cells_included": int(n),
        "inclusion_rule": rule,
        "tile_id_min": tmin,
        "tile_id_max": tmax,
    }


# --------------------------------------------------------------------------------------------------
# State entry point
# --------------------------------------------------------------------------------------------------


def _weight(shape: CountryShape, ga: GridArrays) -> int:
    if not shape.parts:
        return 0
    r0, r1, c0, c1 = country_window(ga, shape.bounds)
    return (r1 - r0) * (c1 - c0)


def tile_all(shapes: dict[str, CountryShape], grid: Grid, index_dir: Path, bounds_dir: Path,
             workers: int = 1, strip_cells: int = STRIP_CELLS) -> list[dict]:
    """Tile every country into ``index_dir`` / ``bounds_dir``; report rows A-Z (byte-identical for any ``workers``)."""
    ga = GridArrays.of(grid)
    isos = sorted(shapes)
    Path(index_dir).mkdir(parents=True, exist_ok=True)
    Path(bounds_dir).mkdir(parents=True, exist_ok=True)
    # heaviest first in a pool (RU, CA, US, AQ, CN dominate)
    return spatial.map_countries(
        "1B.S1", isos,
        lambda iso: tile_country(iso, shapes[iso], ga, index_dir, bounds_dir, strip_cells),
        workers, weight=lambda iso: _weight(shapes[iso], ga))


def _workers(ctx) -> int:
    w = ctx.extra.get("workers") or ctx.config.get("segment1b", {}).get("options", {}).get("workers")
    if w is None:
        w = os.environ.get("ENGINE_WORKERS", "1")
    return max(1, int(w))


def run_with_report(ctx) -> dict:
    """S1 for a RunContext; returns the run report (non-authoritative)."""
    from engine.core import publish

    cfg = ctx.config
    opts = cfg.get("segment1b", {}).get("options", {}) or {}
    rule = opts.get("inclusion_rule", RULE_CENTER)
    if rule not in INCLUSION_RULES:
        raise InputError("E008_INCLUSION_RULE", f"unsupported inclusion_rule {rule!r}; supported: {list(INCLUSION_RULES)}")
    raster = cfg["segment1b"]["inputs"]["population_raster"]
    polys = cfg["segment1b"]["inputs"]["world_countries"]
    iso_set = load_iso_codes(cfg["segment1a"]["inputs"]["iso_table"])
    grid = spatial.read_grid(raster)
    shapes = spatial.load_world_countries(polys, iso_set=iso_set)
    index_final = Path(ctx.path("tile_index"))
    bounds_final = Path(ctx.path("tile_bounds"))
    workers = _workers(ctx)
    with publish.staged(index_final, PUBLISH_CODE) as tmp_index, publish.staged(bounds_final, PUBLISH_CODE) as tmp_bounds:
        reports = tile_all(shapes, grid, Path(tmp_index), Path(tmp_bounds), workers=workers)
    empty = [r["country_iso"] for r in reports if r["cells_included"] == 0]
    return {
        "grid_hash": ctx.extra.get("grid_hash"),
        "predicate": rule,
        "grid_dims": {"nrows": grid.height, "ncols": grid.width},
        "countries_total": len(reports),
        "rows_emitted": int(sum(r["cells_included"] for r in reports)),
        "countries_without_tiles": empty,
        "countries_fallback": [r["country_iso"] for r in reports if r["inclusion_rule"] == RULE_FALLBACK],
        "iso_without_polygon": sorted(iso_set - set(shapes)),
        "per_country": reports,
    }


def run(ctx) -> dict:
    """S1 for a RunContext; returns the run report (``rows_emitted`` feeds run_state's final progress line)."""
    import sys

    r = run_with_report(ctx)
    # the job log is where a user looks: say which countries were special-cased or left out
    print(f"[1B.S1] {r['rows_emitted']} tiles for {r['countries_total']} countries on a "
          f"{r['grid_dims']['ncols']} x {r['grid_dims']['nrows']} grid; one-cell fallback (no centre inside): "
          f"{r['countries_fallback'] or 'none'}; ISO codes without a polygon (no tiles): "
          f"{r['iso_without_polygon'] or 'none'}", file=sys.stderr)
    return r

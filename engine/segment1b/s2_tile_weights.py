"""1B S2 - ``tile_weights``: integer weights per tile summing to exactly ``10^dp`` per country (spec §4).

No RNG. Inputs: ``tile_index`` (S1, same ``grid=``), ``basis`` and ``dp`` from ``config.segment1b.options``
(decision 9), and the population raster when ``basis = population``. Output ``tile_weights`` under
``grid={grid_hash}/weights={weights_hash}/`` (decision 13), one file per country (``part-<ISO>.parquet``,
rows in ``tile_id`` order): ``country_iso, tile_id, weight_fp, dp, basis``.

Mass per tile (spec §4): ``uniform`` 1; ``area_m2`` the tile's ``pixel_area_m2`` from ``tile_index``;
``population`` the raster value at (``raster_row``, ``raster_col``), NODATA and NaN counting 0. Negative or
non-finite mass -> ``E105_NORMALIZATION``. A country whose masses are all zero (e.g. an uninhabited island
under ``population``) falls back to uniform masses (spec §4 step 1, ``zero_mass_fallback`` in the report).

Quantisation, exact (spec §4): with ``T`` the exact sum of the country's masses and ``K = 10^dp``,
``z_i = floor(m_i K / T)``, residue ``rho_i = (m_i K) mod T``, shortfall ``S = K - sum z_i``; the ``S`` tiles
with the largest residues get +1, ties to the smaller ``tile_id``. Every binary64 mass is an integer times
a power of two, so ``T`` is summed exactly as an integer (mantissas split into 18-bit limbs, summed per
exponent). ``m K / T`` is evaluated in floating point with a proven error bound ``delta = K 2^-50``; only
tiles whose quotient lies within ``delta`` of an integer, and the cluster of residues within ``2 delta`` of
each other around the cut-off, are recomputed with Python integers. The result is exactly the rational
allocation (the tests compare it with ``fractions.Fraction``) at numpy speed. For ``dp`` so large that
``delta > 1e-3`` every distinct mass is computed exactly (slower, still exact).

Memory: a country is processed in chunks of ``CHUNK`` tiles over a mass array held in the raster's own
precision (float32 for a float32 raster), so the largest country of a 30 arc-second grid stays well below
1 GiB; several processes may work on different countries with identical bytes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from engine.core.errors import InputError, ModelError
from engine.segment1b import spatial
from engine.core.schema import arrow_schema
from engine.segment1b.s1_tile_index import _dict_const, _workers, _write_schema, parquet_writer

BASES = ("population", "area_m2", "uniform")
CHUNK = 1 << 21  # default chunk of Quantiser (S2 itself follows the row groups of tile_index)
RASTER_CHUNK_CELLS = 1 << 24  # raster cells per band read
HIST_BINS = 1 << 16
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"

TILE_WEIGHTS_SCHEMA = arrow_schema("schemas/1B/tile_weights.schema.json")


# --------------------------------------------------------------------------------------------------
# Exact quantisation
# --------------------------------------------------------------------------------------------------


def _exact_mass(v: float) -> tuple[int, int]:
    """``v = M * 2**E`` with the same (M, E) as :func:`_nb_exp_sums` (subnormals: E = -1074)."""
    bits = struct.unpack("<q", struct.pack("<d", float(v)))[0]
    eb = (bits >> 52) & 0x7FF
    frac = bits & 0xFFFFFFFFFFFFF
    return (frac | (1 << 52) if eb else frac), max(eb, 1) - 1075


@numba.njit(cache=True)
def _nb_exp_sums(bits, lo, hi):
    """Add every value's 53-bit integer mantissa into 128-bit (hi, lo) accumulators per biased exponent.

    ``bits`` are binary64 values (>= 0, finite) viewed as int64. A value with biased exponent ``eb`` is
    ``M * 2**(max(eb, 1) - 1075)``, ``M = fraction | (2^52 if eb > 0)``: exact, no rounding anywhere.
    """
    for i in range(bits.shape[0]):
        b = bits[i]
        if b == 0:
            continue
        eb = (b >> 52) & 0x7FF
        mant = np.uint64(b & 0xFFFFFFFFFFFFF)
        if eb > 0:
            mant = mant | np.uint64(1 << 52)
        old = lo[eb]
        new = old + mant
        lo[eb] = new
        if new < old:
            hi[eb] += np.uint64(1)


@numba.njit(cache=True)
def _nb_hist(r, hist):
    """Histogram of residues r in [0, 1) over len(hist) equal bins (scaling by a power of two is exact)."""
    nb = hist.shape[0]
    for i in range(r.shape[0]):
        b = np.int64(r[i] * nb)
        if b >= nb:
            b = nb - 1
        hist[b] += 1


@numba.njit(cache=True)
def _nb_select(v, r, lo, hi, closed_hi):
    """``v[i]`` for the i with ``lo <= r[i] < hi`` (``<= hi`` when ``closed_hi``)."""
    n = 0
    for i in range(r.shape[0]):
        x = r[i]
        if x >= lo and (x < hi or (closed_hi and x == hi)):
            n += 1
    out = np.empty(n, np.float64)
    k = 0
    for i in range(r.shape[0]):
        x = r[i]
        if x >= lo and (x < hi or (closed_hi and x == hi)):
            out[k] = v[i]
            k += 1
    return out


class _ExactSum:
    """Exact sum of finite non-negative binary64 values, accumulated chunk by chunk (numba kernel)."""

    def __init__(self):
        self.lo = np.zeros(2048, np.uint64)
        self.hi = np.zeros(2048, np.uint64)

    def add(self, m: np.ndarray) -> None:
        _nb_exp_sums(np.ascontiguousarray(m, dtype=np.float64).view(np.int64), self.lo, self.hi)

    def result(self) -> tuple[int, int]:
        """``(T, emin)`` with the exact sum ``= T * 2**emin`` (``(0, 0)`` when empty)."""
        used = np.flatnonzero((self.lo != 0) | (self.hi != 0))
        if used.size == 0:
            return 0, 0
        emin = max(int(used[0]), 1) - 1075
        T = 0
        for eb in used.tolist():
            T += ((int(self.hi[eb]) << 64) + int(self.lo[eb])) << (max(eb, 1) - 1075 - emin)
        return T, emin


@numba.njit(cache=True)
def _nb_zr(m, kf, tf, delta, z, r):
    """z = floor(m K / T), r = the fraction (float, |error| <= delta); r = -1 marks tiles to redo exactly."""
    n_unc = 0
    for i in range(m.shape[0]):
        x = np.float64(m[i])
        if x == 0.0:
            z[i] = 0
            r[i] = 0.0
            continue
        q = x * kf
        q = q / tf
        f = np.floor(q)
        rr = q - f
        z[i] = np.int64(f)
        if rr < delta or rr > 1.0 - delta:
            r[i] = -1.0
            n_unc += 1
        else:
            r[i] = rr
    return n_unc


@dataclass
class QuantInfo:
    tiles: int
    K: int
    mass_sum: float
    shortfall: int
    zero_mass_fallback: bool
    exact_all: bool
    exact_values: int
    cluster_values: int = 0


@dataclass
class _Exact:
    """Exactly computed (z, rho) for distinct mass values (sorted arrays + dict)."""

    T: int
    emin: int
    K: int
    table: dict = field(default_factory=dict)  # value -> (z, rho)

    def get(self, v: float) -> tuple[int, int]:
        hit = self.table.get(v)
        if hit is None:
            M, E = _exact_mass(v)
            N = (M * self.K) << (E - self.emin)
            hit = (N // self.T, N % self.T)
            self.table[v] = hit
        return hit


class Quantiser:
    """Largest-remainder quantisation of one country's masses (in ``tile_id`` order) to integers summing to 10^dp.

    ``mass`` is any float array (float32 or float64), finite and >= 0, ordered by ascending ``tile_id``
    (the order that breaks residue ties). Use :meth:`weights` (whole array) or :meth:`chunks`, which
    follows ``bounds`` (chunk start offsets; default: every ``chunk`` tiles).
    """

    def __init__(self, mass: np.ndarray, dp: int, chunk: int = CHUNK, bounds=None):
        if not (isinstance(dp, (int, np.integer)) and 0 <= int(dp) <= 18):
            raise InputError("E105_NORMALIZATION", f"dp must be an integer in 0..18, got {dp!r}")
        self.dp = int(dp)
        self.K = 10 ** self.dp
        self.chunk = int(chunk)
        n = int(mass.shape[0])
        if n == 0:
            raise InputError("E103_ZERO_COUNTRY", "a country without tiles cannot be weighted")
        self.n = n
        self.mass = mass
        starts = list(range(0, n, self.chunk)) if bounds is None else [int(b) for b in bounds if 0 <= int(b) < n]
        if not starts or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise ValueError("chunk bounds must start at 0 and increase")
        self.spans = list(zip(starts, starts[1:] + [n]))
        bad = np.flatnonzero(~np.isfinite(mass) | (mass < 0))
        if bad.size:
            raise InputError("E105_NORMALIZATION", "negative or non-finite tile mass",
                             rows=[f"tile #{int(i)}: {mass[i]!r}" for i in bad[:10]])
        acc = _ExactSum()
        for a, b in self.spans:
            acc.add(mass[a:b])
        T, emin = acc.result()
        self.zero_mass_fallback = T == 0
        if self.zero_mass_fallback:  # spec §4 step 1: all masses 0 -> every tile mass 1
            self.mass = np.ones(n, np.float32)
            acc = _ExactSum()
            acc.add(self.mass)
            T, emin = acc.result()
        self.T, self.emin = T, emin
        self.ex = _Exact(T, emin, self.K)
        self.Kf = float(self.K)
        self.Tf = math.ldexp(float(T), emin) if T.bit_length() < 1000 else math.inf
        # |q_float - q| <= 3.01 * 2^-53 * q <= K * 2^-51 (three roundings: m*K, T, division); margin x2
        self.delta = self.Kf * 2.0 ** -50
        self.exact_all = not (self.delta <= 1e-3 and math.isfinite(self.Tf) and self.Tf > 2.0 ** -900)
        # residues used for ordering: within delta of the exact value (exact mode: correctly rounded)
        self.sel_delta = 2.0 ** -50 if self.exact_all else self.delta
        self._memo = None
        self._buf = None
        self._select()

    # -- per chunk: exact z (int64) and residue fraction r (float64, within delta of the exact value)
    def _zr(self, m: np.ndarray, reuse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        n = m.shape[0]
        if reuse:  # chunk passes reuse two buffers (fresh arrays would page-fault on every chunk)
            if self._buf is None or self._buf[0].shape[0] < n:
                self._buf = (np.empty(n, np.int64), np.empty(n, np.float64))
            z, r = self._buf[0][:n], self._buf[1][:n]
            if self.exact_all:
                z[:] = 0
                r[:] = 0.0
        else:
            z = np.zeros(n, np.int64)
            r = np.zeros(n, np.float64)
        if self.exact_all:
            unc = np.flatnonzero(m > 0)
        else:
            n_unc = _nb_zr(m, self.Kf, self.Tf, self.delta, z, r)
            unc = np.flatnonzero(r < 0) if n_unc else np.zeros(0, np.intp)
        if unc.size:
            uv, inv = np.unique(m[unc].astype(np.float64), return_inverse=True)
            zz = np.empty(uv.size, np.int64)
            rr = np.empty(uv.size, np.float64)
            for k, v in enumerate(uv.tolist()):
                zv, rho = self.ex.get(v)
                zz[k] = zv
                rr[k] = rho / self.T  # correctly rounded
            z[unc] = zz[inv]
            r[unc] = rr[inv]
        return z, r

    def _iter(self):
        if len(self.spans) == 1:  # one chunk: compute once, reuse in every pass
            if self._memo is None:
                self._memo = self._zr(self.mass)
            yield 0, self.mass, self._memo[0], self._memo[1]
            return
        for a, b in self.spans:
            m = self.mass[a:b]
            z, r = self._zr(m, reuse=True)  # views valid until the next chunk
            yield a, m, z, r

    def _select(self) -> None:
        """Find which tiles get the +1 (spec §4 step 4) without sorting all residues."""
        zsum = 0
        hist = np.zeros(HIST_BINS, np.int64)
        for _, _, z, r in self._iter():
            zsum += int(z.sum())
            _nb_hist(r, hist)
        S = self.K - zsum
        if not 0 <= S < self.n:
            raise ModelError("E105_NORMALIZATION", "largest-remainder shortfall out of range",
                             detail={"K": self.K, "sum_floor": zsum, "tiles": self.n})
        self.S = S
        self.hi_c = math.inf  # tiles with r > hi_c get +1
        self.full_values = np.zeros(0, np.float64)  # cluster masses bumped on every tile
        self.edge_values = np.zeros(0, np.float64)  # cluster masses bumped on their first `edge_take` tiles
        self.edge_take = 0
        self.cluster_values = 0
        if S == 0:
            return
        # bin holding the S-th largest residue
        above = np.cumsum(hist[::-1])[::-1]  # above[b] = count(bin >= b)
        b_star = int(np.flatnonzero(above >= S)[-1])
        d2 = 2 * self.sel_delta
        w = int(math.ceil(2 * d2 * HIST_BINS)) + 1
        while True:
            lo_b, hi_b = max(0, b_star - w), min(HIST_BINS - 1, b_star + w)
            n_over = int(above[hi_b + 1]) if hi_b + 1 < HIST_BINS else 0
            vals, cnts = self._distinct_r_in_bins(lo_b, hi_b)
            order = np.argsort(-vals, kind="stable")
            vals, cnts = vals[order], cnts[order]
            cum = n_over + np.cumsum(cnts)
            k = int(np.searchsorted(cum, S, side="left"))  # vals[k] = the S-th largest residue
            # chain of residues closer than 2*delta around vals[k]: their order must be decided exactly
            top = k
            while top > 0 and vals[top - 1] - vals[top] <= d2:
                top -= 1
            bot = k
            while bot + 1 < vals.size and vals[bot] - vals[bot + 1] <= d2:
                bot += 1
            hi_c, lo_c = float(vals[top]), float(vals[bot])
            edge_hi = (hi_b + 1) / HIST_BINS if hi_b < HIST_BINS - 1 else math.inf
            edge_lo = lo_b / HIST_BINS if lo_b > 0 else -math.inf
            if hi_c + d2 < edge_hi and lo_c - d2 >= edge_lo:
                break
            if lo_b == 0 and hi_b == HIST_BINS - 1:
                break
            w *= 4
        self.hi_c = hi_c
        n_above = n_over + int(cnts[:top].sum())
        rem = S - n_above
        # exact order of the cluster: by residue (a function of the mass value), then tile_id
        cv, cc = self._distinct_mass_in_r(lo_c, hi_c)
        self.cluster_values = int(cv.size)
        rho = [self.ex.get(v)[1] for v in cv.tolist()]
        order = sorted(range(cv.size), key=lambda i: -rho[i])
        full, edge = [], []
        i = 0
        while i < len(order) and rem > 0:
            j = i
            group = []
            cnt = 0
            while j < len(order) and rho[order[j]] == rho[order[i]]:
                group.append(cv[order[j]])
                cnt += int(cc[order[j]])
                j += 1
            if cnt <= rem:
                full.extend(group)
                rem -= cnt
            else:
                edge.extend(group)
                self.edge_take = rem
                rem = 0
            i = j
        self.full_values = np.sort(np.asarray(full, np.float64))
        self.edge_values = np.sort(np.asarray(edge, np.float64))

    def _distinct_r_in_bins(self, lo_b: int, hi_b: int):
        vals, cnts = [], []
        lo, hi = lo_b / HIST_BINS, (hi_b + 1) / HIST_BINS  # exact: HIST_BINS is a power of two
        top = hi_b == HIST_BINS - 1  # the last bin also holds r == 1.0 (an exact residue rounded up)
        for _, _, _, r in self._iter():
            sel = _nb_select(r, r, lo, hi, top)
            if sel.size:
                u, c = np.unique(sel, return_counts=True)
                vals.append(u)
                cnts.append(c)
        if not vals:
            return np.zeros(0), np.zeros(0, np.int64)
        u, inv = np.unique(np.concatenate(vals), return_inverse=True)
        return u, np.bincount(inv, weights=np.concatenate(cnts)).astype(np.int64)

    def _distinct_mass_in_r(self, lo: float, hi: float):
        vals, cnts = [], []
        for _, m, _, r in self._iter():
            sel = _nb_select(m.astype(np.float64, copy=False), r, lo, hi, True)
            if sel.size:
                u, c = np.unique(sel, return_counts=True)
                vals.append(u)
                cnts.append(c)
        u, inv = np.unique(np.concatenate(vals), return_inverse=True)
        return u, np.bincount(inv, weights=np.concatenate(cnts)).astype(np.int64)

    def chunks(self):
        """Yield ``(start, weight_fp int64)`` chunk by chunk, in tile order."""
        taken = 0
        for s, m, z, r in self._iter():
            bump = r > self.hi_c
            if self.full_values.size:
                bump |= np.isin(m.astype(np.float64, copy=False), self.full_values)
            if self.edge_take:
                e = np.flatnonzero(np.isin(m.astype(np.float64, copy=False), self.edge_values))
                k = min(e.size, self.edge_take - taken)
                if k > 0:
                    bump[e[:k]] = True  # ties in tile_id order: the chunk is already in tile_id order
                    taken += k
            yield s, z + bump.astype(np.int64)

    def weights(self) -> np.ndarray:
        out = np.empty(self.n, np.int64)
        for s, w in self.chunks():
            out[s:s + w.shape[0]] = w
        if int(out.sum()) != self.K:
            raise ModelError("E105_NORMALIZATION", "weights do not sum to 10^dp",
                             detail={"sum": int(out.sum()), "K": self.K})
        return out

    def info(self) -> QuantInfo:
        return QuantInfo(self.n, self.K, float(self.Tf), int(self.S), bool(self.zero_mass_fallback),
                         bool(self.exact_all), len(self.ex.table), self.cluster_values)


def quantise(mass, tile_id, dp: int) -> np.ndarray:
    """Integer weights (int64) summing to 10^dp for masses keyed by ``tile_id`` (any order; ties by tile_id)."""
    mass = np.asarray(mass)
    if mass.dtype.kind != "f":
        mass = mass.astype(np.float64)
    tid = np.asarray(tile_id, dtype=np.uint64)
    order = np.argsort(tid, kind="stable")
    w = Quantiser(mass[order], dp).weights()
    out = np.empty_like(w)
    out[order] = w
    return out


# --------------------------------------------------------------------------------------------------
# Masses from tile_index (+ raster)
# --------------------------------------------------------------------------------------------------


@numba.njit(cache=True)
def _nb_gather(win, r0, c0, rows, cols, out, lo, hi):
    for i in range(lo, hi):
        out[i] = win[np.int64(rows[i]) - r0, np.int64(cols[i]) - c0]


class _BandReader:
    """Raster values at (row, col) pairs sorted by row, read in block-aligned row bands of one column range."""

    def __init__(self, raster: "spatial.RasterWindows", c0: int, c1: int):
        self.raster = raster
        self.c0, self.c1 = c0, c1
        bh = raster.block_height
        self.band = max(bh, (RASTER_CHUNK_CELLS // max(1, c1 - c0)) // bh * bh)
        self.r0 = self.r1 = -1
        self.win = None

    def values(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        n = rows.shape[0]
        out = None
        i = 0
        while i < n:
            r = int(rows[i])
            if not (self.r0 <= r < self.r1):
                self.win = None
                self.r0 = r // self.band * self.band
                self.r1 = min(self.raster.height, self.r0 + self.band)
                self.win = self.raster.read(self.r0, self.r1, self.c0, self.c1)
            j = int(np.searchsorted(rows, self.r1, side="left")) if int(rows[-1]) >= self.r1 else n
            if out is None:
                out = np.empty(n, self.win.dtype)
            _nb_gather(self.win, self.r0, self.c0, rows, cols, out, i, j)
            i = j
        return out if out is not None else np.zeros(0, np.float64)


def _row_groups(pf: pq.ParquetFile, columns: list[str]):
    for g in range(pf.metadata.num_row_groups):
        t = pf.read_row_group(g, columns=columns)
        yield {c: t.column(c).to_numpy() for c in columns}


def _col_range(pf: pq.ParquetFile) -> tuple[int, int, int]:
    """(min col, max col, max row) of a tile_index file: from the row-group statistics S1 writes, else a scan."""
    names = pf.schema_arrow.names
    ci, ri = names.index("raster_col"), names.index("raster_row")
    cmin = cmax = rmax = None
    md = pf.metadata
    for g in range(md.num_row_groups):
        sc = md.row_group(g).column(ci).statistics
        sr = md.row_group(g).column(ri).statistics
        if sc is None or sr is None or not sc.has_min_max or not sr.has_min_max:
            cmin = None
            break
        cmin = int(sc.min) if cmin is None else min(cmin, int(sc.min))
        cmax = int(sc.max) if cmax is None else max(cmax, int(sc.max))
        rmax = int(sr.max) if rmax is None else max(rmax, int(sr.max))
    if cmin is None:
        for ch in _row_groups(pf, ["raster_row", "raster_col"]):
            c = ch["raster_col"]
            if c.size:
                cmin = int(c.min()) if cmin is None else min(cmin, int(c.min()))
                cmax = int(c.max()) if cmax is None else max(cmax, int(c.max()))
                rmax = int(ch["raster_row"].max()) if rmax is None else max(rmax, int(ch["raster_row"].max()))
    return cmin or 0, cmax or 0, rmax or 0


def country_masses(index_file: Path, basis: str, raster: "spatial.RasterWindows | None") -> tuple[np.ndarray, list[int]]:
    """Mass of every tile of one ``tile_index`` country file, in file (= tile_id) order, streamed by row group.

    Returns ``(mass, row-group start offsets)``. Checks that ``tile_id`` strictly increases
    (``E106_MONOTONICITY``). Population masses keep the raster's dtype (float32 stays float32: exact, half the
    memory); NODATA and NaN become 0 (spec §4).
    """
    pf = pq.ParquetFile(index_file)
    need = ["tile_id"] + {"population": ["raster_row", "raster_col"], "area_m2": ["pixel_area_m2"]}.get(basis, [])
    missing = sorted(set(need) - set(pf.schema_arrow.names))
    if missing:
        raise InputError("E101_TILE_INDEX_MISSING", f"tile_index lacks columns {missing}", path=index_file)
    n = pf.metadata.num_rows
    reader = None
    if basis == "population" and n:
        cmin, cmax, rmax = _col_range(pf)
        if rmax >= raster.height or cmax >= raster.width:
            raise InputError("E002_RASTER_MISMATCH", "tile_index rows/cols outside the raster", path=index_file,
                             detail={"raster": [raster.height, raster.width], "max_row": rmax, "max_col": cmax})
        reader = _BandReader(raster, cmin, cmax + 1)
    mass = None
    last = None
    pos = 0
    starts = []
    for ch in _row_groups(pf, need):
        tid = ch["tile_id"]
        k = tid.shape[0]
        if k == 0:
            continue
        starts.append(pos)
        if tid.dtype != np.uint64:
            tid = tid.astype(np.uint64)
        if not (bool(np.all(tid[1:] > tid[:-1])) and (last is None or int(tid[0]) > last)):
            raise InputError("E106_MONOTONICITY", "tile_index rows not in strictly increasing tile_id order",
                             path=index_file, rows=[f"near row {pos}"])
        last = int(tid[-1])
        if basis == "uniform":
            m = np.ones(k, np.float32)
        elif basis == "area_m2":
            m = ch["pixel_area_m2"].astype(np.float64, copy=False)
        else:
            m = reader.values(ch["raster_row"], ch["raster_col"])
            if m.dtype.kind != "f":
                m = m.astype(np.float64)
            bad = np.isnan(m)
            if raster.nodata is not None:
                bad |= m == m.dtype.type(raster.nodata)
            m[bad] = 0
        if mass is None:
            mass = np.empty(n, m.dtype)
        mass[pos:pos + k] = m
        pos += k
    return (mass if mass is not None else np.zeros(0, np.float64)), starts


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


# constant strings go in as dictionary arrays (no per-row hashing); without the stored Arrow schema a
# reader sees plain strings, exactly TILE_WEIGHTS_SCHEMA
_WRITE_SCHEMA = _write_schema(TILE_WEIGHTS_SCHEMA)


def weights_writer(path: Path) -> pq.ParquetWriter:
    return parquet_writer(path, _WRITE_SCHEMA)  # DELTA integers, dictionary strings, zstd (as S1)


def weight_country(iso: str, index_file: Path, out_file: Path, basis: str, dp: int,
                   raster_path: str | None) -> dict:
    """Weights of one country (one file); returns the report row."""
    raster = spatial.RasterWindows(raster_path) if basis == "population" else None
    try:
        mass, starts = country_masses(index_file, basis, raster)
    finally:
        if raster is not None:
            raster.close()
    if mass.shape[0] == 0:
        raise InputError("E103_ZERO_COUNTRY", f"{iso}: tile_index file without tiles", path=index_file)
    # chunks = tile_index row groups, so each weights row group pairs with one tile_id row group
    q = Quantiser(mass, dp, bounds=starts)
    del mass
    total = 0
    w = weights_writer(out_file)
    try:
        tids = (ch["tile_id"] for ch in _row_groups(pq.ParquetFile(index_file), ["tile_id"]) if ch["tile_id"].size)
        for (s, wt), tid in zip(q.chunks(), tids):
            n = wt.shape[0]
            if tid.shape[0] != n:
                raise ModelError("E107_DETERMINISM", f"{iso}: tile_index changed while S2 was reading it", path=index_file)
            total += int(wt.sum())
            w.write_table(pa.table([
                _dict_const(iso, n),
                pa.array(tid.astype(np.uint64, copy=False), pa.uint64()),
                pa.array(wt, pa.int64()),
                pa.array(np.full(n, dp, np.int32), pa.int32()),
                _dict_const(basis, n),
            ], schema=_WRITE_SCHEMA), row_group_size=n)
    finally:
        w.close()
    if total != q.K:
        raise ModelError("E105_NORMALIZATION", f"{iso}: weights sum to {total}, not 10^{dp}", path=index_file)
    info = q.info()
    return {
        "country_iso": iso,
        "tiles": info.tiles,
        "mass_sum": info.mass_sum,
        "K": info.K,
        "postquant_sum_fp": total,
        "residue_allocations": info.shortfall,
        "zero_mass_fallback": info.zero_mass_fallback,
    }


def weight_all(index_dir: Path, out_dir: Path, basis: str, dp: int, raster_path: str | None,
               workers: int = 1) -> list[dict]:
    """Weights of every country of a ``tile_index`` partition; report rows A-Z (bytes independent of workers)."""
    if basis not in BASES:
        raise InputError("E105_NORMALIZATION", f"basis must be one of {list(BASES)}, got {basis!r}")
    index_dir = Path(index_dir)
    out_dir = Path(out_dir)
    if not index_dir.is_dir():
        raise InputError("E101_TILE_INDEX_MISSING", "tile_index partition not found (run S1 first)", path=index_dir)
    isos = spatial.partition_countries(index_dir)
    if not isos:
        raise InputError("E101_TILE_INDEX_MISSING", "tile_index partition holds no country file", path=index_dir)
    if basis == "population":
        grid = spatial.read_grid(raster_path)  # same checks as S1 (the grid is what grid_hash covers)
        del grid
    out_dir.mkdir(parents=True, exist_ok=True)
    return spatial.map_countries(
        "1B.S2", isos,
        lambda iso: weight_country(iso, index_dir / spatial.country_part_name(iso),
                                   out_dir / spatial.country_part_name(iso), basis, dp, raster_path),
        workers, weight=lambda iso: pq.ParquetFile(index_dir / spatial.country_part_name(iso)).metadata.num_rows)


def run_with_report(ctx) -> dict:
    from engine.core import publish

    opts = ctx.config["segment1b"]["options"]
    basis = opts["basis"]
    dp = opts["dp"]
    if basis not in BASES:
        raise InputError("E105_NORMALIZATION", f"segment1b.options.basis must be one of {list(BASES)}: {basis!r}")
    if isinstance(dp, bool) or not isinstance(dp, int) or not 0 <= dp <= 18:
        raise InputError("E105_NORMALIZATION", f"segment1b.options.dp must be an integer in 0..18: {dp!r}")
    raster = ctx.config["segment1b"]["inputs"]["population_raster"] if basis == "population" else None
    index_dir = Path(ctx.path("tile_index"))
    final = Path(ctx.path("tile_weights"))
    with publish.staged(final, PUBLISH_CODE) as tmp:
        reports = weight_all(index_dir, Path(tmp), basis, dp, raster, workers=_workers(ctx))
    return {
        "grid_hash": ctx.extra.get("grid_hash"),
        "weights_hash": ctx.extra.get("weights_hash"),
        "basis": basis,
        "dp": dp,
        "countries_total": len(reports),
        "rows_emitted": int(sum(r["tiles"] for r in reports)),
        "zero_mass_fallback": [r["country_iso"] for r in reports if r["zero_mass_fallback"]],
        "per_country": reports,
    }


def run(ctx) -> dict:
    """S2 for a RunContext; returns the run report (``rows_emitted`` feeds run_state's final progress line)."""
    import sys

    r = run_with_report(ctx)
    print(f"[1B.S2] {r['rows_emitted']} tile weights for {r['countries_total']} countries, basis {r['basis']}, "
          f"dp {r['dp']}; all-zero mass, weighted uniformly: {r['zero_mass_fallback'] or 'none'}", file=sys.stderr)
    return r

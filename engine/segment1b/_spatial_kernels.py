"""numba kernels behind the indexed lane of :meth:`engine.segment1b.spatial.CountryShape.contains_points`
(``indexed=True``; imported on first use, so loading :mod:`engine.segment1b.spatial` does not load numba).

:func:`bbox_pairs` lists, part by part, the points lying in the part's closed bounding box, through a uniform grid
over the country's bounding box (:func:`grid_index`): each cell lists the parts whose box overlaps it, a point looks
at its cell's list only. The cell of a coordinate is ``clip(floor((t - t0) / step), 0, cells - 1)``
(:func:`_cell`, the same function for the boxes and the points), non-decreasing in ``t`` under IEEE rounding, so a
point inside a part's box always lands in one of the cells the part is listed in; the pair is then kept by the
exact closed-box test. The result is exactly the per-part box filter of the loop lane.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _cell(t, t0, step, cells):  # pragma: no cover - numba
    c = np.floor((t - t0) / step)
    if c < 0.0:
        return 0
    if c > cells - 1:
        return cells - 1
    return int(c)


@njit(cache=True)
def _grid_scan(pminx, pminy, pmaxx, pmaxy, x0, y0, sx, sy, gx, gy, ctr, parts, write):  # pragma: no cover
    """Visit every (part, cell) with the cell overlapping the part's bounding box, parts ascending: ``ctr[k] += 1``
    and, when ``write``, ``parts[ctr[k]] = p`` first (counting pass, then filling pass of :func:`grid_index`)."""
    for p in range(pminx.shape[0]):
        cx0 = _cell(pminx[p], x0, sx, gx)
        cx1 = _cell(pmaxx[p], x0, sx, gx)
        cy0 = _cell(pminy[p], y0, sy, gy)
        cy1 = _cell(pmaxy[p], y0, sy, gy)
        for cy in range(cy0, cy1 + 1):
            for cx in range(cx0, cx1 + 1):
                k = cy * gx + cx
                if write:
                    parts[ctr[k]] = p
                ctr[k] += 1


@njit(cache=True)
def grid_index(pminx, pminy, pmaxx, pmaxy, x0, y0, sx, sy, gx, gy):  # pragma: no cover - numba
    """CSR ``(start, parts)`` of the parts overlapping each grid cell (cells row-major, parts ascending)."""
    counts = np.zeros(gx * gy, np.int64)
    _grid_scan(pminx, pminy, pmaxx, pmaxy, x0, y0, sx, sy, gx, gy, counts, np.empty(0, np.int64), False)
    start = np.zeros(gx * gy + 1, np.int64)
    start[1:] = np.cumsum(counts)
    fill = start[:-1].copy()
    parts = np.empty(start[-1], np.int64)
    _grid_scan(pminx, pminy, pmaxx, pmaxy, x0, y0, sx, sy, gx, gy, fill, parts, True)
    return start, parts


@njit(cache=True)
def _bbox_scan(x, y, pminx, pminy, pmaxx, pmaxy, start, parts, x0, y0, x1, y1, sx, sy, gx, gy, ctr, pts,
               write):  # pragma: no cover
    """Visit every (point, part) with the point in the part's closed bounding box, in point order: ``ctr[p] += 1``
    and, when ``write``, ``pts[ctr[p]] = i`` first (counting pass, then filling pass of :func:`bbox_pairs`)."""
    for i in range(x.shape[0]):
        xi = x[i]
        yi = y[i]
        if not (xi >= x0 and xi <= x1 and yi >= y0 and yi <= y1):
            continue
        k = _cell(yi, y0, sy, gy) * gx + _cell(xi, x0, sx, gx)
        for j in range(start[k], start[k + 1]):
            p = parts[j]
            if xi >= pminx[p] and xi <= pmaxx[p] and yi >= pminy[p] and yi <= pmaxy[p]:
                if write:
                    pts[ctr[p]] = i
                ctr[p] += 1


@njit(cache=True)
def bbox_pairs(x, y, pminx, pminy, pmaxx, pmaxy, start, parts, x0, y0, x1, y1, sx, sy, gx, gy):  # pragma: no cover
    """The points in each part's closed bounding box, part-major: ``(pstart, pts)`` with the points of part ``p``
    at ``pts[pstart[p]:pstart[p + 1]]`` (ascending)."""
    npart = pminx.shape[0]
    counts = np.zeros(npart, np.int64)
    none = np.empty(0, np.int64)
    _bbox_scan(x, y, pminx, pminy, pmaxx, pmaxy, start, parts, x0, y0, x1, y1, sx, sy, gx, gy, counts, none, False)
    pstart = np.zeros(npart + 1, np.int64)
    pstart[1:] = np.cumsum(counts)
    fill = pstart[:-1].copy()
    pts = np.empty(pstart[npart], np.int64)
    _bbox_scan(x, y, pminx, pminy, pmaxx, pmaxy, start, parts, x0, y0, x1, y1, sx, sy, gx, gy, fill, pts, True)
    return pstart, pts

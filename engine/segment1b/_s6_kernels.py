"""numba kernels of 1B S6 (:func:`engine.segment1b.s6_jitter.jitter`), imported on first use.

Uniform lane: one pass per attempt round over the sites still active (:func:`uniform_step`) -- the Philox block
and its two uniforms (:func:`engine.core._kernels.next_block`, :func:`engine.core._kernels.u01`, the very functions
behind ``samplers.uniform2_vec``), the point ``min + u * (max - min)``, the deltas to the centroid, the
reconstructed point (:func:`engine.segment1b.s6_jitter.reconstruct`) and the interior fast-path test -- and, once
the attempt counts are known, every event in (site, attempt) order (:func:`uniform_events`). These are the numpy
statements of the module, operation for operation (no ``fastmath``: numba emits plain ``fsub``/``fmul``/``fadd``
without contraction, so every value rounds exactly as numpy's does). Mixture lane: :func:`scatter_round` puts one
round's events into their slots.
"""

from __future__ import annotations

from numba import njit

from engine.core._kernels import next_block, u01


@njit(cache=True)
def scatter_round(off, r, sites, attempt, b_hi, b_lo, a_hi, a_lo, dlon, dlat, sigma,
                  e_site, e_attempt, e_b_hi, e_b_lo, e_a_hi, e_a_lo, e_dlon, e_dlat, e_sigma):  # pragma: no cover
    """Round ``r`` (0-based) of the events into their (site, attempt) slots: site ``s`` owns slots ``off[s] ..``,
    its attempt ``r + 1`` goes to ``off[s] + r``."""
    for j in range(sites.shape[0]):
        s = sites[j]
        p = off[s] + r
        e_site[p] = s
        e_attempt[p] = attempt
        e_b_hi[p] = b_hi[j]
        e_b_lo[p] = b_lo[j]
        e_a_hi[p] = a_hi[j]
        e_a_lo[p] = a_lo[j]
        e_dlon[p] = dlon[j]
        e_dlat[p] = dlat[j]
        e_sigma[p] = sigma[j]


@njit(cache=True)
def uniform_step(active, key, hi, lo, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat, interior,
                 dlon, dlat, qx, qy, ok):  # pragma: no cover - numba
    """Round over ``active`` (indices into the per-site arrays): the Philox block at each site's current
    counter ``hi``/``lo`` (advanced in place; the events' counters are rebuilt afterwards by
    :func:`uniform_events`), the deltas and the reconstructed point ``dlon, dlat, qx, qy``, and ``ok`` True iff
    the tile is interior and the point lies in its closed rectangle."""
    for j in range(active.shape[0]):
        i = active[j]
        x0, x1, h, l = next_block(key[i], hi[i], lo[i])
        hi[i] = h
        lo[i] = l
        lo_x = min_lon[i]
        lo_y = min_lat[i]
        hx = max_lon[i]
        hy = max_lat[i]
        px = lo_x + u01(x0) * (hx - lo_x)
        py = lo_y + u01(x1) * (hy - lo_y)
        dx = px - c_lon[i]
        dy = py - c_lat[i]
        dlon[j] = dx
        dlat[j] = dy
        x = c_lon[i] + dx
        if x > 180.0:
            x = x - 360.0
        elif x < -180.0:
            x = x + 360.0
        y = c_lat[i] + dy
        qx[j] = x
        qy[j] = y
        ok[j] = interior[i] and x >= lo_x and x <= hx and y >= lo_y and y <= hy


@njit(cache=True)
def uniform_events(made, key, hi, lo, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat,
                   e_site, e_attempt, e_b_hi, e_b_lo, e_a_hi, e_a_lo, e_dlon, e_dlat):  # pragma: no cover - numba
    """Every event of the uniform lane, written in (site, attempt) order: site ``s`` made ``made[s]`` attempts
    from its base counter ``(hi[s], lo[s])``; attempt ``a`` is the block at counter ``base + (a - 1)`` and the same
    arithmetic as :func:`uniform_step` (the draws are a function of the stream and the attempt only)."""
    p = 0
    for s in range(made.shape[0]):
        h = hi[s]
        l = lo[s]
        lo_x = min_lon[s]
        lo_y = min_lat[s]
        hx = max_lon[s]
        hy = max_lat[s]
        for a in range(made[s]):
            x0, x1, h2, l2 = next_block(key[s], h, l)
            e_site[p] = s
            e_attempt[p] = a + 1
            e_b_hi[p] = h
            e_b_lo[p] = l
            e_a_hi[p] = h2
            e_a_lo[p] = l2
            e_dlon[p] = (lo_x + u01(x0) * (hx - lo_x)) - c_lon[s]
            e_dlat[p] = (lo_y + u01(x1) * (hy - lo_y)) - c_lat[s]
            h = h2
            l = l2
            p += 1

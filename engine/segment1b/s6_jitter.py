"""1B S6 - ``s6_site_jitter``: one point per site inside its pixel and inside its country (spec 1B 8).

RNG family ``in_cell_jitter`` (module ``1B.S6.jitter``, label ``in_cell_jitter``; decision 16): one substream per
site, ``SHA256(M || UER("mlr:1B") || UER("in_cell_jitter") || LE64(merchant_u64) || UER(ISO) ||
LE64(site_order))``. Attempt a (1-based) draws one block at counter ``base + (a - 1)`` and uses both lanes,
``u_lon = u01(x0)``, ``u_lat = u01(x1)`` (blocks 1, draws "2"), one event per attempt.

Per attempt (policy ``mode: uniform_v1``, the default): ``lon* = min_lon + u_lon * (max_lon - min_lon)``,
``lat* = min_lat + u_lat * (max_lat - min_lat)`` over the tile's ``tile_bounds`` rectangle;
``delta = point - centroid``; the point tested is the reconstruction S7 publishes,
``lon = normalise(centroid_lon + delta_lon)``, ``lat = centroid_lat + delta_lat`` (:func:`reconstruct`), so
S6, S7 and S9 agree bit for bit. Accepted iff that point is inside the legal country under decision 24's
predicate (closed shells minus closed holes, :meth:`engine.segment1b.spatial.CountryShape.contains_points`).
The first accepted attempt's deltas are the row; every attempt's event carries its own deltas, so the last
event of a site equals its row (A613). ``sigma_*`` = 0.0 in the uniform lane (spec 1B 8).

Cap (decision 8): ``max_attempts`` from ``policy.s6.jitter.yaml`` (64). A site still rejected after the cap is
``E613_RESAMPLE_EXHAUSTED`` naming the sites (merchant, country, site_order, tile); nothing is published, the
events drawn so far are written as evidence (spec 1B 8 step 7).

Vectorised by attempt rounds: round a draws for every site not yet accepted. Point-in-polygon is skipped for
tiles whose closed cell rectangle lies in the interior of one country part (``contains_properly``, computed
once per distinct (country, tile) in use with an STRtree query) when the reconstructed point is inside that
rectangle; all other points are tested per country with the prepared decision-24 predicate.

Optional lane ``mode: mixture_v2`` (decision 10, off by default; HEAD math, spec 1B 8 MAY): selector
``s = (1 - beta) u_lon + beta u_lat`` picks the first component whose cumulative normalised weight exceeds s
(components in policy-file order); per axis ``frac(u) = clip01(0.5 + 0.5 sign(2u - 1) |2u - 1|^p f_max)`` and
``point = min + frac * span``; ``sigma_*`` carry the component's ``f_max``. Same substream (decision 16 pins
the label), same budget, same acceptance law.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

from engine.core import rng, samplers
from engine.core.errors import InputError, ModelError
from engine.core.progress import Progress

SEGMENT = "1B"
FAMILY = "in_cell_jitter"
MODULE = "1B.S6.jitter"
LABEL = "in_cell_jitter"
PUBLISH_CODE = "E913_ATOMIC_PUBLISH_VIOLATION"
POLICY_NAME = "policy.s6.jitter.yaml"
MODES = ("uniform_v1", "mixture_v2")
MAX_ATTEMPTS_RANGE = (1, 256)


# ============================================================================================
# policy
# ============================================================================================
@dataclass(frozen=True)
class JitterPolicy:
    mode: str = "uniform_v1"
    max_attempts: int = 64
    policy_version: str | None = None
    selection_blend: float = 0.5
    components: tuple = field(default_factory=tuple)  # ((name, weight, lat_exp, lon_exp, f_max), ...)


def _num(x, what, path, lo=None, hi=None, lo_open=False):
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
        raise InputError("E_POLICY_INVALID", f"{what} must be a finite number, got {x!r}", path=path)
    v = float(x)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise InputError("E_POLICY_INVALID", f"{what} must be {'>' if lo_open else '>='} {lo}, got {x!r}", path=path)
    if hi is not None and v > hi:
        raise InputError("E_POLICY_INVALID", f"{what} must be <= {hi}, got {x!r}", path=path)
    return v


def parse_policy(doc, path=None) -> JitterPolicy:
    """Validate a jitter policy document (keys: policy_version, mode, max_attempts, mixture_v2{...})."""
    if not isinstance(doc, dict):
        raise InputError("E_POLICY_INVALID", "jitter policy must be a mapping", path=path)
    unknown = sorted(set(doc) - {"policy_version", "mode", "max_attempts", "mixture_v2", "notes"})
    if unknown:
        raise InputError("E_POLICY_INVALID", f"unknown jitter policy keys {unknown}", path=path)
    mode = doc.get("mode", "uniform_v1")
    if mode not in MODES:
        raise InputError("E_POLICY_INVALID", f"mode must be one of {list(MODES)}, got {mode!r}", path=path)
    ma = doc.get("max_attempts")
    if isinstance(ma, bool) or not isinstance(ma, int) or not MAX_ATTEMPTS_RANGE[0] <= ma <= MAX_ATTEMPTS_RANGE[1]:
        raise InputError("E_POLICY_INVALID", f"max_attempts must be an integer in 1..256, got {ma!r}", path=path)
    comps: list = []
    beta = 0.5
    mix = doc.get("mixture_v2")
    if mix is not None or mode == "mixture_v2":
        if not isinstance(mix, dict):
            raise InputError("E_POLICY_INVALID", "mode mixture_v2 needs a mixture_v2 mapping", path=path)
        beta = _num(mix.get("selection_blend"), "mixture_v2.selection_blend", path, 0.0, 1.0)
        weights = mix.get("component_weights") or {}
        cdefs = mix.get("components") or {}
        if not isinstance(weights, dict) or not isinstance(cdefs, dict) or not weights or set(weights) != set(cdefs):
            raise InputError("E_POLICY_INVALID", "mixture_v2.component_weights and components must name the same "
                             "components", path=path)
        for name in cdefs:  # policy-file order (the file is hashed, so the order is part of the identity)
            c = cdefs[name] or {}
            if set(c) != {"lat_shape_exp", "lon_shape_exp", "max_abs_offset_fraction"}:
                raise InputError("E_POLICY_INVALID", f"mixture_v2.components.{name} needs exactly lat_shape_exp, "
                                 "lon_shape_exp, max_abs_offset_fraction", path=path)
            comps.append((str(name), _num(weights[name], f"component_weights.{name}", path, 0.0),
                          _num(c["lat_shape_exp"], f"{name}.lat_shape_exp", path, 0.0, lo_open=True),
                          _num(c["lon_shape_exp"], f"{name}.lon_shape_exp", path, 0.0, lo_open=True),
                          _num(c["max_abs_offset_fraction"], f"{name}.max_abs_offset_fraction", path, 0.0, 1.0,
                               lo_open=True)))
        if not sum(w for _, w, *_ in comps) > 0:
            raise InputError("E_POLICY_INVALID", "mixture_v2 component weights sum to 0", path=path)
    pv = doc.get("policy_version")
    return JitterPolicy(mode=mode, max_attempts=int(ma), policy_version=None if pv is None else str(pv),
                        selection_blend=beta, components=tuple(comps))


def load_policy(path) -> JitterPolicy:
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_bytes())
    except (OSError, yaml.YAMLError) as e:
        raise InputError("E_POLICY_INVALID", f"cannot read jitter policy: {e}", path=p) from None
    return parse_policy(doc, p)


# ============================================================================================
# geometry helpers
# ============================================================================================
def normalise_lon(lon: np.ndarray) -> np.ndarray:
    """Longitudes into [-180, 180] (one wrap; cells never span more than 360 degrees)."""
    x = np.asarray(lon, dtype=np.float64)
    return np.where(x > 180.0, x - 360.0, np.where(x < -180.0, x + 360.0, x))


def reconstruct(centroid_lon, centroid_lat, delta_lon, delta_lat) -> tuple[np.ndarray, np.ndarray]:
    """The published point of a site: ``(normalise(centroid_lon + delta_lon), centroid_lat + delta_lat)``
    (spec 1B 9 step 3). S6 tests exactly this point; S7/S9 must use this function."""
    c_lon = np.asarray(centroid_lon, dtype=np.float64)
    c_lat = np.asarray(centroid_lat, dtype=np.float64)
    return normalise_lon(c_lon + np.asarray(delta_lon, dtype=np.float64)), c_lat + np.asarray(delta_lat, np.float64)


def interior_tiles(shape, min_lon, min_lat, max_lon, max_lat) -> np.ndarray:
    """For cell rectangles of one country: True iff the closed rectangle lies in the interior of one of the
    country's (antimeridian-normalised) parts -- every point of it is then inside under decision 24."""
    n = np.asarray(min_lon).shape[0]
    out = np.zeros(n, dtype=bool)
    if n == 0 or not shape.parts:
        return out
    boxes = shapely.box(min_lon, min_lat, max_lon, max_lat)
    parts = np.array(shape.parts, dtype=object)
    shapely.prepare(parts)  # each part is tested against many rectangles
    hits = shapely.STRtree(boxes).query(parts, predicate="contains_properly")
    out[np.unique(hits[1])] = True
    return out


def mixture_points(u_lon, u_lat, lo_lon, span_lon, lo_lat, span_lat, pol: JitterPolicy):
    """HEAD mixture_v2 lane (module docstring): points and per-site sigma (= the component's f_max)."""
    w = np.array([c[1] for c in pol.components], dtype=np.float64)
    cum = np.cumsum(w / w.sum())
    cum[-1] = 1.0
    s = (1.0 - pol.selection_blend) * u_lon + pol.selection_blend * u_lat
    comp = np.minimum(np.searchsorted(cum, s, side="right"), len(pol.components) - 1)
    lat_p = np.array([c[2] for c in pol.components])[comp]
    lon_p = np.array([c[3] for c in pol.components])[comp]
    fmax = np.array([c[4] for c in pol.components])[comp]

    def frac(u, p):
        t = 2.0 * u - 1.0
        return np.clip(0.5 + 0.5 * np.sign(t) * np.abs(t) ** p * fmax, 0.0, 1.0)

    return lo_lon + frac(u_lon, lon_p) * span_lon, lo_lat + frac(u_lat, lat_p) * span_lat, fmax


def groups(codes: np.ndarray):
    """``[(code, indices ascending), ...]`` by code ascending -- one stable argsort instead of one full
    comparison per code."""
    codes = np.asarray(codes)
    if codes.shape[0] == 0:
        return []
    if codes.dtype.kind in "iu" and int(codes.min()) >= 0 and int(codes.max()) < 32768:
        order = np.argsort(codes.astype(np.int16), kind="stable")  # same order: numpy's radix sort for int16
    else:
        order = np.argsort(codes, kind="stable")
    cs = codes[order]
    cut = np.flatnonzero(cs[1:] != cs[:-1]) + 1
    bounds = np.concatenate([[0], cut, [cs.shape[0]]])
    return [(int(cs[bounds[i]]), order[bounds[i]:bounds[i + 1]]) for i in range(bounds.shape[0] - 1)]


# ============================================================================================
# pure compute
# ============================================================================================
def site_streams(M: bytes, merchant_id: np.ndarray, iso: np.ndarray, site_order: np.ndarray):
    """``(key, hi, lo)`` per site (merchant_u64 hashed once per distinct merchant)."""
    mid = np.asarray(merchant_id, dtype=np.uint64)
    mu = rng.merchant_u64_vec(mid)  # hashes each distinct merchant once
    return rng.substreams_vec(M, SEGMENT, LABEL, mu, iso=np.asarray(iso),
                              site_order=np.asarray(site_order, dtype=np.int64).astype(np.uint64))


def jitter(key, hi, lo, bounds: dict, site_country: np.ndarray, shapes: dict, interior: np.ndarray,
           policy: JitterPolicy, progress=None) -> dict:
    """Attempt rounds over all sites. ``bounds``: per-site float arrays ``min_lon, max_lon, min_lat, max_lat,
    c_lon, c_lat``; ``site_country``: int code per site, ``shapes[code]`` its :class:`CountryShape`;
    ``interior``: per-site bool (tile rectangle inside the country's interior).

    Returns per-site ``delta_lon, delta_lat, lon, lat, attempts`` (0 = exhausted) and the events
    (``site``, ``attempt``, counters, deltas, sigmas) ordered by (site, attempt). ``progress`` (optional
    :class:`engine.core.progress.Progress`) is advanced by the sites accepted in each round (logs only).

    The uniform lane runs each round in one numba pass (:func:`engine.segment1b._s6_kernels.uniform_step`),
    keeping no per-round event columns: once every site's attempt count is known, the events are rebuilt in
    (site, attempt) order in one sequential pass (:func:`engine.segment1b._s6_kernels.uniform_events`, same
    draws, same arithmetic). The mixture lane runs in numpy and its events land in their slots round by round
    (:func:`engine.segment1b._s6_kernels.scatter_round`). The points needing the polygon test are grouped by
    country (a stable radix sort of the small country codes) and tested country by country.
    """
    from engine.segment1b._s6_kernels import scatter_round, uniform_events, uniform_step

    n = np.asarray(key).shape[0]
    codes = np.asarray(site_country)
    small = n > 0 and 0 <= int(codes.min()) and int(codes.max()) < 32768
    codes = codes.astype(np.int16 if small else np.int64)  # int16: numpy's stable argsort is a radix sort
    key = np.ascontiguousarray(key, dtype=np.uint64)
    hi_cur = np.array(hi, dtype=np.uint64, copy=True)
    lo_cur = np.array(lo, dtype=np.uint64, copy=True)
    min_lon, max_lon, min_lat, max_lat, c_lon, c_lat = (
        np.ascontiguousarray(bounds[k], dtype=np.float64)
        for k in ("min_lon", "max_lon", "min_lat", "max_lat", "c_lon", "c_lat"))
    inter = np.ascontiguousarray(interior, dtype=bool)
    uniform = policy.mode == "uniform_v1"
    res = {"delta_lon": np.full(n, np.nan), "delta_lat": np.full(n, np.nan), "lon": np.full(n, np.nan),
           "lat": np.full(n, np.nan), "attempts": np.zeros(n, np.int32)}
    rounds: list = []
    active = np.arange(n, dtype=np.int64)
    for attempt in range(1, policy.max_attempts + 1):
        if active.size == 0:
            break
        m = active.size
        if uniform:  # counters advance in place; the events are rebuilt after the rounds
            dlon, dlat, qx, qy = np.empty(m), np.empty(m), np.empty(m), np.empty(m)
            ok = np.empty(m, dtype=bool)
            uniform_step(active, key, hi_cur, lo_cur, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat, inter,
                         dlon, dlat, qx, qy, ok)
        else:
            b_hi, b_lo = hi_cur[active], lo_cur[active]
            u_lon, u_lat, a_hi, a_lo = samplers.uniform2_vec(key[active], b_hi, b_lo)
            lo_x, lo_y = min_lon[active], min_lat[active]
            sx, sy = max_lon[active] - lo_x, max_lat[active] - lo_y
            px, py, sigma = mixture_points(u_lon, u_lat, lo_x, sx, lo_y, sy, policy)
            dlon = px - c_lon[active]
            dlat = py - c_lat[active]
            qx, qy = reconstruct(c_lon[active], c_lat[active], dlon, dlat)
            ok = inter[active] & (qx >= lo_x) & (qx <= max_lon[active]) & (qy >= lo_y) & (qy <= max_lat[active])
        need = np.flatnonzero(~ok)
        if need.size:
            cn = codes[active[need]]
            o = np.argsort(cn, kind="stable")
            need, cn = need[o], cn[o]
            edges = np.concatenate([[0], np.flatnonzero(cn[1:] != cn[:-1]) + 1, [need.size]])
            for j in range(edges.shape[0] - 1):
                sel = need[edges[j]:edges[j + 1]]
                ok[sel] = shapes[int(cn[edges[j]])].contains_points(qx[sel], qy[sel], indexed=True)
        if not uniform:
            rounds.append((active, b_hi, b_lo, a_hi, a_lo, dlon, dlat, np.ascontiguousarray(sigma, np.float64)))
        acc = active[ok]
        if progress is not None:
            progress.advance(acc.size)
        res["delta_lon"][acc] = dlon[ok]
        res["delta_lat"][acc] = dlat[ok]
        res["lon"][acc] = qx[ok]
        res["lat"][acc] = qy[ok]
        res["attempts"][acc] = attempt
        keep = ~ok
        active = active[keep]
        if not uniform:
            hi_cur[active] = a_hi[keep]
            lo_cur[active] = a_lo[keep]
    # events in (site, attempt) order without a sort: site s owns slots off[s] .. off[s] + attempts_s - 1
    # (every site draws at least once: max_attempts >= 1; exhausted sites drew max_attempts times)
    made = np.where(res["attempts"] > 0, res["attempts"], policy.max_attempts).astype(np.int64)
    off = np.zeros(n, np.int64)
    off[1:] = np.cumsum(made)[:-1]
    total = int(made.sum())
    dtypes = {"site": np.int64, "attempt": np.int32, "before_hi": np.uint64, "before_lo": np.uint64,
              "after_hi": np.uint64, "after_lo": np.uint64, "delta_lon": np.float64, "delta_lat": np.float64,
              "sigma": np.float64}
    events = {k: np.empty(total, dtype=dt) for k, dt in dtypes.items() if not (uniform and k == "sigma")}
    if uniform:
        base_hi, base_lo = np.ascontiguousarray(hi, dtype=np.uint64), np.ascontiguousarray(lo, dtype=np.uint64)
        uniform_events(made, key, base_hi, base_lo, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat,
                       *events.values())
        events["sigma"] = np.zeros(total)
    for r, (sites, *cols) in enumerate(rounds):
        # round r + 1 is attempt r + 1 of every site still active in it
        scatter_round(off, r, sites, np.int32(r + 1), *cols, *events.values())
    res["events"] = events
    return res


# ============================================================================================
# inputs
# ============================================================================================
def site_bounds(bounds_dir: Path, labels: np.ndarray, site_code: np.ndarray, site_tile: np.ndarray) -> dict:
    """Per-site rectangle and centroid from ``tile_bounds`` (the lookup S7 and S9 use,
    :func:`engine.segment1b.s7_synthesis.lookup_tile_bounds`); ``E606_FK_TILE_INDEX`` naming the first country
    (code order) with assigned tiles absent from ``tile_bounds``."""
    from engine.segment1b.s7_synthesis import lookup_tile_bounds

    iso = pa.DictionaryArray.from_arrays(pa.array(np.asarray(site_code, dtype=np.int32), pa.int32()),
                                         pa.array([str(x) for x in labels], pa.string()))
    found, cols = lookup_tile_bounds(bounds_dir, iso, site_tile)
    if not found.all():
        c = int(np.asarray(site_code)[~found].min())
        bad = ~found & (np.asarray(site_code) == c)
        raise InputError("E606_FK_TILE_INDEX", f"{labels[c]}: assigned tiles absent from tile_bounds",
                         path=bounds_dir, rows=np.unique(np.asarray(site_tile)[bad])[:10].tolist())
    return {k: cols[col] for k, col in (("min_lon", "min_lon_deg"), ("max_lon", "max_lon_deg"),
                                         ("min_lat", "min_lat_deg"), ("max_lat", "max_lat_deg"),
                                         ("c_lon", "centroid_lon_deg"), ("c_lat", "centroid_lat_deg"))}


def site_interior(shapes: dict, site_code: np.ndarray, site_tile: np.ndarray, b: dict,
                  grp: list | None = None) -> np.ndarray:
    """Interior flag per site, computed once per distinct (country, tile). ``grp``: :func:`groups` of
    ``site_code`` when the caller has it."""
    n = site_code.shape[0]
    out = np.zeros(n, dtype=bool)
    for c, sel in groups(site_code) if grp is None else grp:
        ut, first, inv = np.unique(site_tile[sel], return_index=True, return_inverse=True)
        f = sel[first]
        flags = interior_tiles(shapes[c], b["min_lon"][f], b["min_lat"][f], b["max_lon"][f], b["max_lat"][f])
        out[sel] = flags[inv]
    return out


def compute(ctx) -> tuple[pa.Table, dict, dict]:
    from engine.segment1b import s0_gate, spatial
    from engine.segment1b.s3_requirements import iso_codes_array, read_dataset, sorted_by

    s0_gate.require_receipt(ctx)
    policy = load_policy(ctx.config["segment1b"]["parameters"][POLICY_NAME])
    a = read_dataset(ctx.path("s5_site_tile_assignment"), ctx.schema_path("s5_site_tile_assignment"))
    if a.num_rows == 0:
        raise InputError("E601_ROW_MISSING", "s5_site_tile_assignment is empty", path=ctx.path("s5_site_tile_assignment"))
    codes, labels = iso_codes_array(a["legal_country_iso"])
    mid = np.asarray(a["merchant_id"].to_numpy(), dtype=np.uint64)
    so = np.asarray(a["site_order"].to_numpy(), dtype=np.int64)
    tile = np.asarray(a["tile_id"].to_numpy(), dtype=np.uint64)
    
    if not sorted_by(mid, codes, so):
        o = np.lexsort((so, codes, mid))
        mid, codes, so, tile = mid[o], codes[o], so[o], tile[o]
        if not sorted_by(mid, codes, so):
            raise InputError("E603_DUP_KEY", "s5_site_tile_assignment has duplicate site keys",
                             path=ctx.path("s5_site_tile_assignment"))
    used = [str(labels[c]) for c in np.flatnonzero(np.bincount(codes, minlength=len(labels))).tolist()]
    all_shapes = spatial.load_world_countries(ctx.config["segment1b"]["inputs"]["world_countries"])
    missing = [c for c in used if c not in all_shapes]
    if missing:
        raise InputError("E608_POINT_OUTSIDE_COUNTRY", "countries without polygons in world_countries",
                         rows=missing)
    shapes = {int(np.flatnonzero(labels == c)[0]): all_shapes[c] for c in used}
    grp = groups(codes)  # one stable sort by country, shared by the per-country steps
    b = site_bounds(Path(ctx.path("tile_bounds")), labels, codes, tile)
    interior = site_interior(shapes, codes, tile, b, grp)
    M = rng.master_material(SEGMENT, ctx.ids.fingerprint_bytes, ctx.ids.seed)
    key, hi, lo = site_streams(M, mid, labels[codes], so)
    prog = Progress("1B.S6", total=mid.shape[0], unit="sites placed")
    res = jitter(key, hi, lo, b, codes, shapes, interior, policy, progress=prog)
    prog.finish()
    ev = res["events"]
    s = ev["site"].astype(np.int64)
    iso_site = pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32), pa.int32()), pa.array(list(labels)))
    ones = np.ones(s.shape[0], np.uint64)
    sigma = ev["sigma"]
    bits = sigma.view(np.uint64)
    if sigma.size and bool((bits == bits[0]).all()):
        # one value for every event (0.0 in the uniform lane): a constant renders the same text as the column
        # would, without formatting millions of equal floats
        sigma = float(sigma[0])
    events = {"merchant_id": mid[s], "legal_country_iso": iso_site.take(pa.array(s)).cast(pa.string()),
              "site_order": so[s], "delta_lat_deg": ev["delta_lat"], "delta_lon_deg": ev["delta_lon"],
              "sigma_lat_deg": sigma, "sigma_lon_deg": sigma,
              "before_hi": ev["before_hi"], "before_lo": ev["before_lo"], "after_hi": ev["after_hi"],
              "after_lo": ev["after_lo"], "blocks": ones, "draws": ones * np.uint64(2)}
    att = res["attempts"]
    hist = np.bincount(att, minlength=policy.max_attempts + 1)
    report = {"sites_total": int(mid.shape[0]), "events_total": int(s.shape[0]),
              "interior_sites": int(interior.sum()), "exhausted": int((att == 0).sum()),
              "attempt_histogram": {str(i): int(hist[i]) for i in range(1, hist.shape[0]) if hist[i]}}
    exhausted = np.flatnonzero(att == 0)
    failure = None
    if exhausted.size:
        rows = [f"merchant_id={int(mid[i])} legal_country_iso={labels[codes[i]]} site_order={int(so[i])} "
                f"tile_id={int(tile[i])}" for i in exhausted[:10].tolist()]
        failure = ModelError(
            "E613_RESAMPLE_EXHAUSTED",
            f"{exhausted.size} sites found no point inside their country after {policy.max_attempts} attempts "
            "(the assigned cell barely overlaps the country polygon); nothing published, events kept as evidence",
            rows=rows, detail={"sites_exhausted": int(exhausted.size), "max_attempts": policy.max_attempts})
        return None, events, {**report, "failure": failure}
    table = pa.table({
        "merchant_id": pa.array(mid, pa.uint64()), "legal_country_iso": iso_site.cast(pa.string()),
        "site_order": pa.array(so, pa.int64()), "tile_id": pa.array(tile, pa.uint64()),
        "delta_lat_deg": pa.array(res["delta_lat"], pa.float64()),
        "delta_lon_deg": pa.array(res["delta_lon"], pa.float64()),
        "lon_deg": pa.array(res["lon"], pa.float64()), "lat_deg": pa.array(res["lat"], pa.float64()),
        "attempts": pa.array(att, pa.int32()),
        "manifest_fingerprint": pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(mid.shape[0], np.int32)), pa.array([ctx.ids.manifest_fingerprint])).cast(pa.string()),
    })
    return table, events, report


def run(ctx) -> None:
    from engine.core import publish
    from engine.core.rnglog import RngLogs
    from engine.core.schema import arrow_schema, validate_table

    table, events, report = compute(ctx)
    schema = ctx.schema_path("s6_site_jitter")
    problems = validate_table(table, schema) if table is not None else []
    logs = RngLogs(ctx.data_root, SEGMENT, ctx.ids, ctx.config)
    n = logs.add_events(FAMILY, MODULE, LABEL, events)

    def publish_jitter() -> None:
        with publish.staged(ctx.path("s6_site_jitter"), PUBLISH_CODE) as tmp:
            # rows in writer order (merchant_id, legal_country_iso, site_order)
            publish.write_parquet(table, Path(tmp) / "part-00000.parquet", schema=arrow_schema(schema))

    # on E613 / E612 too the logs are written: the attempts drawn stay as evidence (spec 1B 8 step 7); a valid
    # table is published while the lines are written (once the logs' checks passed)
    logs.close(progress=Progress("1B.S6", total=2 * n, unit="rng log lines (events + trace)"),
               alongside=publish_jitter if table is not None and not problems else None)
    if table is None:
        raise report["failure"]
    if problems:
        raise ModelError("E612_DICT_SCHEMA_MISMATCH", "s6_site_jitter does not match its schema", path=schema,
                         rows=problems)

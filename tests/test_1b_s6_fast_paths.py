"""The fast paths of 1B spatial loading and of S6 against their reference statements.

* GeoPackage bulk read (:func:`engine.segment1b.spatial._read_gpkg`) == the fiona read, geometry for geometry (WKB),
  and falls back to fiona whenever the file is not the plain case;
* :func:`engine.segment1b.spatial.normalise_parts` == :func:`normalise_part` part by part;
* :meth:`CountryShape.contains_points` (default and ``indexed=True``) == the per-part statement;
* S6's numba kernels (:mod:`engine.segment1b._s6_kernels`) == the numpy statements of the module docstring;
* S6's events stay in (site, attempt) order, chained counter to counter, the last one equal to the row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from engine.core import rng, samplers
from engine.core.errors import EngineError
from engine.segment1b import s6_jitter as s6
from engine.segment1b import spatial

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "reference" / "spatial" / "world_countries" / "world_countries.gpkg"


def _wkb(geoms) -> list:
    return [None if g is None else shapely.to_wkb(g) for g in geoms]


def _write_gpkg(path: Path, feats, crs_epsg=4326, geometry="MultiPolygon"):
    import fiona
    from fiona.crs import CRS
    from shapely.geometry import mapping

    schema = {"geometry": geometry, "properties": {"country_iso": "str:2", "name": "str:20"}}
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs=CRS.from_epsg(crs_epsg),
                    layer="world_countries") as dst:
        for iso, g in feats:
            dst.write({"geometry": None if g is None else mapping(g), "properties": {"country_iso": iso,
                                                                                   "name": "x"}})


def test_gpkg_bulk_read_equals_fiona_on_the_shipped_polygons():
    fast = spatial._read_gpkg(WORLD, None)
    assert fast is not None  # the shipped file is the plain case
    slow = spatial._read_fiona(str(WORLD), None)
    assert fast[0] == slow[0]
    assert _wkb(fast[1]) == _wkb(slow[1])


def test_gpkg_bulk_read_equals_fiona_on_holes_mixed_types_and_nulls(tmp_path):
    ring = [(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)]
    hole_cw = [(2, 2), (2, 4), (4, 4), (4, 2), (2, 2)]
    shell_cw = list(reversed(ring))  # orientation must be kept as stored
    feats = [("AA", Polygon(ring, [hole_cw])), ("BB", MultiPolygon([Polygon(shell_cw), box(20, 20, 21, 21)])),
             ("CC", box(170, -5, 180, 5)), (None, box(0, 0, 1, 1)), ("dd", box(1, 1, 2, 2))]
    p = tmp_path / "w.gpkg"
    _write_gpkg(p, feats, geometry="Unknown")
    fast = spatial._read_gpkg(p, None)
    assert fast is not None
    slow = spatial._read_fiona(str(p), None)
    assert fast[0] == slow[0] == ["AA", "BB", "CC", None, "dd"]
    assert _wkb(fast[1]) == _wkb(slow[1])
    assert fast[1][0].geom_type == "Polygon" and fast[1][1].geom_type == "MultiPolygon"
    # an explicit ISO column that is not there: left to fiona (all codes None -> E005 as before)
    assert spatial._read_gpkg(p, "ISO_A2") is None
    with pytest.raises(EngineError) as e:
        spatial.load_world_countries(p, iso_column="ISO_A2")
    assert e.value.code == "E005_ISO_FK"


def test_gpkg_not_plain_goes_through_fiona(tmp_path):
    # a projected CRS: the bulk path declines, fiona's path raises E007 as before
    p = tmp_path / "proj.gpkg"
    _write_gpkg(p, [("AA", box(0, 0, 1000, 1000))], crs_epsg=3857, geometry="Unknown")
    assert spatial._read_gpkg(p, None) is None
    with pytest.raises(EngineError) as e:
        spatial.load_world_countries(p)
    assert e.value.code == "E007_CRS_MISMATCH"
    # a line geometry: declined, then rejected by validation as before
    q = tmp_path / "line.gpkg"
    _write_gpkg(q, [("AA", shapely.LineString([(0, 0), (1, 1)]))], geometry="Unknown")
    assert spatial._read_gpkg(q, None) is None
    with pytest.raises(EngineError) as e:
        spatial.load_world_countries(q)
    assert e.value.code == "E001_GEO_INVALID"


def test_gpkg_blob_parsing():
    wkb = shapely.to_wkb(box(0, 0, 1, 1))
    for env, n in ((0, 0), (1, 32), (2, 48), (3, 48), (4, 64)):
        blob = b"GP\x00" + bytes([0x01 | (env << 1)]) + (4326).to_bytes(4, "little") + b"\x00" * n + wkb
        assert spatial._gpkg_wkb(blob) == wkb
    base = b"GP\x00\x01" + (4326).to_bytes(4, "little")
    assert spatial._gpkg_wkb(b"GP\x00\x11" + base[4:] + wkb) is None  # empty flag
    assert spatial._gpkg_wkb(b"GP\x00\x21" + base[4:] + wkb) is None  # extended type
    assert spatial._gpkg_wkb(b"GP\x00\x0b" + base[4:] + b"\x00" * 64 + wkb) is None  # envelope code 5
    assert spatial._gpkg_wkb(b"XX" + base[2:] + wkb) is None
    assert spatial._gpkg_wkb(base + shapely.to_wkb(shapely.Point(0, 0))) is None
    assert spatial._gpkg_wkb(base + shapely.to_wkb(box(0, 0, 1, 1), byte_order=0)) is not None  # big endian WKB


def test_normalise_parts_equals_part_by_part():
    shapes = spatial.load_world_countries(WORLD)
    raw = [p for s in shapes.values() for p in spatial._polygon_parts(s.geometry)]
    # plus wrapped and out-of-range parts (the slow branch)
    raw += [Polygon([(170, 0), (-170, 0), (-170, 5), (170, 5), (170, 0)]), box(175, 0, 185, 5), box(-185, 0, -175, 1)]
    want = [q for p in raw for q in spatial.normalise_part(p)]
    got = spatial.normalise_parts(raw)
    assert _wkb(got) == _wkb(want)
    assert spatial.normalise_parts([]) == []


def _loop_contains(shape, x, y):
    out = np.zeros(x.shape, bool)
    for p in shape.parts:
        holes = [Polygon(r.coords) for r in p.interiors]
        inside = shapely.intersects_xy(Polygon(p.exterior.coords), x, y)
        if holes:
            inside &= ~shapely.intersects_xy(shapely.union_all(holes), x, y)
        out |= inside
    return out


@pytest.mark.parametrize("iso", ["CA", "US", "MV", "FJ", "IT"])
def test_contains_points_pairs_equal_the_per_part_statement(iso):
    shape = spatial.load_world_countries(WORLD)[iso]
    parts = np.array(shape.parts, dtype=object)
    xy = shapely.get_coordinates(parts)
    g = np.random.Generator(np.random.Philox(5))  # test points only
    i = g.integers(0, xy.shape[0], 4000)
    # near vertices, exactly on vertices, on edge midpoints, and a NaN / far point
    x = np.concatenate([xy[i, 0] + g.normal(0, 0.05, i.size), xy[i[:500], 0], (xy[:-1, 0] + xy[1:, 0])[:3000] / 2,
                        [np.nan, 500.0]])
    y = np.concatenate([xy[i, 1] + g.normal(0, 0.05, i.size), xy[i[:500], 1], (xy[:-1, 1] + xy[1:, 1])[:3000] / 2,
                        [0.0, 0.0]])
    want = _loop_contains(shape, x, y)
    got = shape.contains_points(x, y)
    assert (got == want).all()
    assert got.any() and not got.all()
    assert (shape.contains_points(x, y, indexed=True) == want).all()
    if len(shape.parts) > spatial.PAIRS_FROM_PARTS:
        assert shape._pair_index() is not None  # the grid path was the one tested


def test_contains_points_hole_boundary_and_grid_path(monkeypatch):
    # a part with a hole, an island in the hole: hole boundary is outside, the island inside (decision 24)
    outer = Polygon([(0, 0), (10, 0), (10, 10), (0, 10)], [[(2, 2), (8, 2), (8, 8), (2, 8)]])
    island = box(4, 4, 6, 6)
    geom = MultiPolygon([outer, island] + [box(20 + k, 0, 20.5 + k, 0.5) for k in range(10)])
    shape = spatial.CountryShape("ZZ", geom)
    x = np.array([1.0, 2.0, 3.0, 5.0, 4.0, 0.0, 20.25, 29.5, 15.0, 8.0])
    y = np.array([1.0, 5.0, 3.0, 5.0, 4.0, 0.0, 0.25, 0.5, 0.0, 8.0])
    want = [True, False, False, True, True, True, True, True, False, False]
    monkeypatch.setattr(spatial, "PAIRS_FROM_PARTS", 1)
    assert shape.contains_points(x, y, indexed=True).tolist() == want
    assert shape._pair_index() is not None
    assert shape.contains_points(x, y).tolist() == want
    monkeypatch.setattr(spatial, "PAIRS_FROM_PARTS", 10**6)
    assert spatial.CountryShape("ZZ", geom).contains_points(x, y, indexed=True).tolist() == want


def test_uniform_kernels_equal_numpy_statement():
    from engine.segment1b._s6_kernels import uniform_events, uniform_step

    g = np.random.Generator(np.random.Philox(11))  # test inputs only
    n = 5000
    M = rng.master_material("1B", b"\x01" * 32, 7)
    key, hi, lo = s6.site_streams(M, np.arange(1, n + 1, dtype=np.uint64), np.array(["GB"] * n), np.ones(n))
    lo = lo.copy()
    lo[:5] = np.uint64(2**64 - 1)  # counter carry into hi
    min_lon = g.uniform(-180, 179, n)
    min_lon[:50] = 179.9  # cells at the antimeridian: reconstruction can wrap
    max_lon = np.minimum(min_lon + g.uniform(0.001, 1, n), 180.0)
    min_lat = g.uniform(-89, 88, n)
    max_lat = min_lat + g.uniform(0.001, 1, n)
    c_lon, c_lat = (min_lon + max_lon) * 0.5, (min_lat + max_lat) * 0.5
    inter = g.random(n) < 0.5
    active = np.sort(g.choice(n, 3000, replace=False)).astype(np.int64)
    m = active.size
    h, l = hi.copy(), lo.copy()
    dlon, dlat, qx, qy, ok = np.empty(m), np.empty(m), np.empty(m), np.empty(m), np.empty(m, bool)
    uniform_step(active, key, h, l, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat, inter, dlon, dlat, qx, qy, ok)
    u_lon, u_lat, w_hi, w_lo = samplers.uniform2_vec(key[active], hi[active], lo[active])
    lo_x, lo_y = min_lon[active], min_lat[active]
    px = lo_x + u_lon * (max_lon[active] - lo_x)
    py = lo_y + u_lat * (max_lat[active] - lo_y)
    wdlon, wdlat = px - c_lon[active], py - c_lat[active]
    wqx, wqy = s6.reconstruct(c_lon[active], c_lat[active], wdlon, wdlat)
    wok = inter[active] & (wqx >= lo_x) & (wqx <= max_lon[active]) & (wqy >= lo_y) & (wqy <= max_lat[active])
    assert (h[active] == w_hi).all() and (l[active] == w_lo).all()  # counters advanced in place
    idle = np.setdiff1d(np.arange(n), active)
    assert (h[idle] == hi[idle]).all() and (l[idle] == lo[idle]).all()
    for a, b in ((dlon, wdlon), (dlat, wdlat), (qx, wqx), (qy, wqy)):
        assert (a.view(np.uint64) == b.view(np.uint64)).all()
    assert (ok == wok).all() and ok.any() and not ok.all()
    # the rebuilt events: attempt a of site s is the block at base + (a - 1), with the same deltas
    made = g.integers(1, 4, n)
    tot = int(made.sum())
    ev = [np.empty(tot, np.int64), np.empty(tot, np.int32)] + [np.empty(tot, np.uint64) for _ in range(4)] \
        + [np.empty(tot), np.empty(tot)]
    uniform_events(made, key, hi, lo, min_lon, max_lon, min_lat, max_lat, c_lon, c_lat, *ev)
    site = np.repeat(np.arange(n), made)
    att = np.arange(tot) - np.repeat(np.cumsum(made) - made, made) + 1
    assert (ev[0] == site).all() and (ev[1] == att).all()
    cur_hi, cur_lo = hi[site].copy(), lo[site].copy()
    for k in range(1, int(made.max())):  # advance each event's counter by attempt - 1 blocks
        step = att > k
        _, _, cur_hi[step], cur_lo[step] = samplers.uniform2_vec(key[site[step]], cur_hi[step], cur_lo[step])
    u_lon, u_lat, a_hi, a_lo = samplers.uniform2_vec(key[site], cur_hi, cur_lo)
    assert (ev[2] == cur_hi).all() and (ev[3] == cur_lo).all() and (ev[4] == a_hi).all() and (ev[5] == a_lo).all()
    lo_x, lo_y = min_lon[site], min_lat[site]
    wd = (lo_x + u_lon * (max_lon[site] - lo_x)) - c_lon[site]
    assert (ev[6].view(np.uint64) == wd.view(np.uint64)).all()
    wd = (lo_y + u_lat * (max_lat[site] - lo_y)) - c_lat[site]
    assert (ev[7].view(np.uint64) == wd.view(np.uint64)).all()


def test_jitter_events_in_site_attempt_order_with_polygon_tests():
    # two countries, non-interior tiles straddling the border: several rounds, events ordered (site, attempt)
    shapes = {0: spatial.CountryShape("AA", box(0, 0, 5, 10)), 1: spatial.CountryShape("BB", box(5, 0, 10, 10))}
    n = 400
    M = rng.master_material("1B", b"\x02" * 32, 3)
    codes = np.tile(np.array([1, 0]), n // 2)
    key, hi, lo = s6.site_streams(M, np.arange(1, n + 1, dtype=np.uint64), np.where(codes == 0, "AA", "BB"),
                                  np.ones(n))
    b = {"min_lon": np.full(n, 4.0), "max_lon": np.full(n, 6.0), "min_lat": np.zeros(n), "max_lat": np.ones(n),
         "c_lon": np.full(n, 5.0), "c_lat": np.full(n, 0.5)}
    res = s6.jitter(key, hi, lo, b, codes, shapes, np.zeros(n, bool), s6.JitterPolicy(max_attempts=64))
    assert (res["attempts"] > 0).all() and res["attempts"].max() > 1
    inside_aa = res["lon"] <= 5.0
    assert (inside_aa[codes == 0]).all() and (res["lon"][codes == 1] >= 5.0).all()
    ev = res["events"]
    assert ev["site"].shape[0] == int(res["attempts"].sum())
    order = np.lexsort((ev["attempt"], ev["site"]))
    assert (order == np.arange(order.size)).all()
    last = np.r_[ev["site"][1:] != ev["site"][:-1], True]
    assert (ev["delta_lon"][last] == res["delta_lon"]).all()  # the last event of a site is its row
    first = np.r_[True, ev["site"][1:] != ev["site"][:-1]]
    assert (ev["before_lo"][first] == lo).all() and (ev["before_hi"][first] == hi).all()
    # each next attempt starts where the previous one ended
    cont = ~first
    assert (ev["before_lo"][cont] == ev["after_lo"][np.flatnonzero(cont) - 1]).all()

"""1B S1 (tile_index, tile_bounds) and S2 (tile_weights): spec 1B §3, §4, §12; decisions 9, 11, 13, 24."""

from __future__ import annotations

import copy
import hashlib
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shapely.geometry import MultiPolygon, Polygon, box

from engine.core.context import RunContext, SegmentIds
from engine.core.errors import EngineError
from engine.segment1b import s1_tile_index as s1
from engine.segment1b import s2_tile_weights as s2
from engine.segment1b import spatial
from engine.segment1b.spatial import CountryShape, Grid

REPO = Path(__file__).resolve().parents[1]
GH = "a" * 64
WH = "b" * 64


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def micro_grid() -> Grid:
    # decision 24: 3 rows x 4 cols, 1-degree cells, lon 0..4, lat 0..3
    return Grid(4, 3, (1.0, 0.0, 0.0, 0.0, -1.0, 3.0))


def tiles_of(geom, grid: Grid) -> list[int]:
    m = s1.rasterize_center(CountryShape("XX", geom).parts, grid.lon_centres(), grid.lat_centres())
    return np.flatnonzero(m).tolist()


def write_raster(path: Path, data: np.ndarray, transform, nodata=-1.0, crs="EPSG:4326"):
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype=str(data.dtype), crs=crs, transform=Affine(*transform), nodata=nodata,
                       compress="deflate", tiled=True, blockxsize=16, blockysize=16) as d:
        d.write(data, 1)


def write_polygons(path: Path, feats: list[tuple[str, object]]):
    import fiona
    from fiona.crs import CRS
    from shapely.geometry import mapping

    schema = {"geometry": "MultiPolygon", "properties": {"country_iso": "str:2"}}
    with fiona.open(path, "w", driver="GPKG", schema=schema, crs=CRS.from_epsg(4326), layer="world_countries") as dst:
        for iso, g in feats:
            g = MultiPolygon([g]) if isinstance(g, Polygon) else g
            dst.write({"geometry": mapping(g), "properties": {"country_iso": iso}})


def make_ctx(data_root: Path, raster: Path, polys: Path, iso_table: Path, basis="population", dp=6, workers=1,
             **opts) -> RunContext:
    from engine.core import config as cfgmod

    cfg = copy.deepcopy(cfgmod.load())
    cfg["segment1b"]["inputs"]["population_raster"] = str(raster)
    cfg["segment1b"]["inputs"]["world_countries"] = str(polys)
    cfg["segment1a"]["inputs"]["iso_table"] = str(iso_table)
    cfg["segment1b"]["options"].update({"basis": basis, "dp": dp, **opts})
    ids = SegmentIds("1B", 1, "0" * 64, "1" * 64, "2" * 32)
    return RunContext(data_root=data_root, repo_root=REPO, config=cfg, ids=ids,
                      extra={"grid_hash": GH, "weights_hash": WH, "workers": workers})


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# The spec §12 fixture: a 36 x 18 grid of 10-degree cells; a country with a hole (HL), one written
# wrapped across the antimeridian (DL), a micro-country with no centre inside (MC), an uninhabited one
# (ZZ: all NODATA/zero -> uniform fallback), and a full-width polar cap that must NOT be unwrapped (AQ).
FEATS = [
    ("HL", Polygon([(0, 0), (40, 0), (40, 40), (0, 40)], [[(12, 12), (28, 12), (28, 28), (12, 28)]])),
    ("DL", Polygon([(170, -30), (-170, -30), (-170, -10), (170, -10)])),
    ("MC", box(41, 41, 42, 42)),
    ("ZZ", box(-60, -60, -40, -40)),
    ("AQ", box(-180, -90, 180, -80)),
]


def tid(lon_c, lat_c):  # tile id of the 10-degree cell with this centre
    return int((90 - lat_c - 5) // 10) * 36 + int((lon_c + 180 - 5) // 10)


EXPECTED = {
    "HL": sorted(tid(x, y) for x in (5, 15, 25, 35) for y in (5, 15, 25, 35) if not (x in (15, 25) and y in (15, 25))),
    "DL": sorted(tid(x, y) for x in (175, -175) for y in (-15, -25)),
    "MC": [tid(45, 45)],
    "ZZ": sorted(tid(x, y) for x in (-55, -45) for y in (-55, -45)),
    "AQ": sorted(tid(-175 + 10 * k, -85) for k in range(36)),
}


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fixture")
    pop = np.full((18, 36), -1.0, np.float32)  # NODATA everywhere ...
    rng = np.random.default_rng(7)
    for iso, ids in EXPECTED.items():
        for t in ids:
            pop[t // 36, t % 36] = np.float32(rng.integers(1, 1000) / 7)
    for t in EXPECTED["ZZ"]:
        pop[t // 36, t % 36] = 0.0 if t % 2 else -1.0  # ... and ZZ has zero or NODATA only
    pop[EXPECTED["HL"][0] // 36, EXPECTED["HL"][0] % 36] = np.nan  # NaN counts 0
    write_raster(d / "pop.tif", pop, (10.0, 0.0, -180.0, 0.0, -10.0, 90.0))
    write_polygons(d / "countries.gpkg", FEATS)
    pq.write_table(pa.table({"country_iso": ["AQ", "DL", "HL", "MC", "ZZ", "QQ"]}), d / "iso.parquet")
    return d


def run_s1_s2(root: Path, files: Path, **kw):
    ctx = make_ctx(root, files / "pop.tif", files / "countries.gpkg", files / "iso.parquet", **kw)
    r1 = s1.run_with_report(ctx)
    r2 = s2.run_with_report(ctx)
    return ctx, r1, r2


# --------------------------------------------------------------------------------------------------
# S1: the centre rule (decision 24)
# --------------------------------------------------------------------------------------------------


def test_decision_24_micro_grid():
    g = micro_grid()
    shell = [(1, 1), (3, 1), (3, 3), (1, 3)]  # covers cells (0,1), (0,2), (1,1), (1,2)
    hole = [(1.25, 1.25), (1.75, 1.25), (1.75, 1.75), (1.25, 1.75)]  # covers the centre of (1,1)
    assert tiles_of(Polygon(shell, [hole]), g) == [1, 2, 6]
    assert tiles_of(Polygon(shell), g) == [1, 2, 5, 6]


def test_decision_24_boundary_rules():
    g = micro_grid()
    # centres (1.5, *) lie exactly on the shell's west edge: inside
    assert tiles_of(box(1.5, 1.0, 3.0, 2.5), g) == [1, 2, 5, 6]
    # ... and on a horizontal shell edge (lat 1.5) and a shell vertex (1.5, 1.5): inside
    assert tiles_of(box(1.5, 1.5, 2.5, 2.5), g) == [1, 2, 5, 6]
    # a hole whose corner is exactly the centre of (1,1): outside
    assert tiles_of(Polygon([(1, 1), (3, 1), (3, 3), (1, 3)], [[(1.5, 1.5), (1.75, 1.5), (1.75, 1.75), (1.5, 1.75)]]), g) == [1, 2, 6]
    # a hole whose edge passes through the centre of (1,1): outside
    assert tiles_of(Polygon([(1, 1), (3, 1), (3, 3), (1, 3)], [[(1.2, 1.2), (1.5, 1.2), (1.5, 1.8), (1.2, 1.8)]]), g) == [1, 2, 6]
    # the vectorised predicate offered to S6/S9 agrees
    shp = CountryShape("XX", Polygon([(1, 1), (3, 1), (3, 3), (1, 3)], [[(1.5, 1.5), (1.75, 1.5), (1.75, 1.75), (1.5, 1.75)]]))
    lon, lat = np.meshgrid(g.lon_centres(), g.lat_centres())
    assert np.flatnonzero(shp.contains_points(lon.ravel(), lat.ravel())).tolist() == [1, 2, 6]


def test_island_in_a_lake_is_inside():
    g = Grid(8, 8, (1.0, 0.0, 0.0, 0.0, -1.0, 8.0))
    lake = Polygon([(0, 0), (8, 0), (8, 8), (0, 8)], [[(2, 2), (6, 2), (6, 6), (2, 6)]])
    island = box(3, 3, 5, 5)
    got = tiles_of(MultiPolygon([lake, island]), g)
    lon, lat = np.meshgrid(g.lon_centres(), g.lat_centres())
    inside = ~((lon > 2) & (lon < 6) & (lat > 2) & (lat < 6)) | ((lon > 3) & (lon < 5) & (lat > 3) & (lat < 5))
    assert got == np.flatnonzero(inside.ravel()).tolist()


def test_dateline_parts():
    g = Grid(36, 18, (10.0, 0.0, -180.0, 0.0, -10.0, 90.0))
    want = EXPECTED["DL"]
    # written wrapped (an edge jumps across +-180) ...
    assert tiles_of(Polygon([(170, -30), (-170, -30), (-170, -10), (170, -10)]), g) == want
    # ... or with longitudes beyond 180 ...
    assert tiles_of(Polygon([(170, -30), (190, -30), (190, -10), (170, -10)]), g) == want
    # ... or already cut at the antimeridian (Natural Earth)
    assert tiles_of(MultiPolygon([box(170, -30, 180, -10), box(-180, -30, -170, -10)]), g) == want
    # tiles on both sides of the line
    assert {t % 36 for t in want} == {0, 35}
    # a full-width cap without a jump is not unwrapped
    assert tiles_of(box(-180, -90, 180, -80), g) == EXPECTED["AQ"]


def test_rasterizer_equals_point_predicate_on_real_coastlines():
    shapes = spatial.load_world_countries(REPO / "reference" / "spatial" / "world_countries" / "world_countries.gpkg")
    g = Grid(4320, 2160, (1 / 12, 0.0, -180.0, 0.0, -1 / 12, 90.0))
    ga = s1.GridArrays.of(g)
    for iso in ("IT", "NO", "FJ", "ID"):  # peninsulas, fjords, islands, the antimeridian (FJ: full width)
        got = np.concatenate([r * g.width + c for r, c in s1.country_strips(shapes[iso], ga)])
        r0, r1, c0, c1 = s1.country_window(ga, shapes[iso].bounds)
        lon, lat = np.meshgrid(ga.lon_c[c0:c1], ga.lat_c[r0:r1])
        inside = shapes[iso].contains_points(lon.ravel(), lat.ravel())
        rr, cc = np.divmod(np.flatnonzero(inside), c1 - c0)
        want = (rr + r0) * g.width + (cc + c0)
        assert got.size > 0 and np.array_equal(np.sort(got), np.sort(want)), iso
        assert np.all(np.diff(got) > 0)  # tile_id order within the country


# --------------------------------------------------------------------------------------------------
# S1: cell areas (WGS84 ellipsoid, exact zone formula)
# --------------------------------------------------------------------------------------------------


def _zone_area_quadrature(phi1_deg: float, phi2_deg: float) -> float:
    """Independent check: 2*pi * integral of M(phi) N(phi) cos(phi) dphi by 40-point Gauss-Legendre."""
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    x, w = np.polynomial.legendre.leggauss(40)
    p1, p2 = math.radians(phi1_deg), math.radians(phi2_deg)
    phi = 0.5 * (p2 - p1) * x + 0.5 * (p2 + p1)
    s = np.sin(phi)
    M = a * (1 - e2) / (1 - e2 * s * s) ** 1.5
    N = a / np.sqrt(1 - e2 * s * s)
    return float(2 * math.pi * 0.5 * (p2 - p1) * np.sum(w * M * N * np.cos(phi)))


@pytest.mark.parametrize("arcmin", [5, 0.5, 60])
def test_row_areas_sum_to_the_zone_area(arcmin):
    step = arcmin / 60
    g = Grid(int(round(360 / step)), int(round(180 / step)), (step, 0.0, -180.0, 0.0, -step, 90.0))
    areas = g.row_areas_m2()
    top, bot = g.lat_top(), g.lat_bottom()
    for r in (0, 1, g.height // 3, g.height // 2, g.height - 1):
        zone = _zone_area_quadrature(bot[r], top[r])
        assert abs(areas[r] * g.width - zone) <= 1e-9 * zone, (r, areas[r] * g.width, zone)
    # the whole grid is the WGS84 ellipsoid's surface (510,065,621.7 km^2)
    a, f = 6378137.0, 1 / 298.257223563
    e = math.sqrt(f * (2 - f))
    total = 2 * math.pi * a * a * (1 + (1 - e * e) / e * math.atanh(e))
    assert abs(areas.sum() * g.width - total) <= 1e-9 * total
    assert np.all(areas > 0)


# --------------------------------------------------------------------------------------------------
# S1 + S2 through run(ctx): the §12 fixture
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory, fixture_files):
    root = tmp_path_factory.mktemp("run1")
    return (root,) + run_s1_s2(root, fixture_files)


def test_fixture_tiles_and_bounds(fixture_run):
    root, ctx, r1, _ = fixture_run
    idx = Path(ctx.path("tile_index"))
    assert idx == root / f"data/layer1/1B/tile_index/grid={GH}"
    assert sorted(p.name for p in idx.iterdir()) == [f"part-{i}.parquet" for i in sorted(EXPECTED)]
    for iso, want in EXPECTED.items():
        t = spatial.read_country(idx, iso)
        assert t.column("tile_id").to_pylist() == want, iso
        assert set(t.column("country_iso").to_pylist()) == {iso}
        assert set(t.column("inclusion_rule").to_pylist()) == {"largest_overlap" if iso == "MC" else "center"}
        rows = np.array(t.column("raster_row").to_pylist())
        cols = np.array(t.column("raster_col").to_pylist())
        assert np.array_equal(rows * 36 + cols, np.array(want))
        assert np.allclose(t.column("centroid_lon").to_numpy(), -180 + 10 * cols + 5)
        assert np.allclose(t.column("centroid_lat").to_numpy(), 90 - 10 * rows - 5)
        b = spatial.read_country(Path(ctx.path("tile_bounds")), iso)
        assert b.column("tile_id").to_pylist() == want
        assert np.array_equal(b.column("centroid_lon_deg").to_numpy(), t.column("centroid_lon").to_numpy())
        assert np.allclose(b.column("min_lon_deg").to_numpy(), -180 + 10 * cols)
        assert np.allclose(b.column("max_lat_deg").to_numpy(), 90 - 10 * rows)
    assert r1["countries_fallback"] == ["MC"]
    assert r1["iso_without_polygon"] == ["QQ"]  # reported, never silently dropped


def test_fixture_schemas_and_types(fixture_run):
    from engine.core import publish
    from engine.core.schema import validate_table

    _, ctx, _, _ = fixture_run
    for ds, path in (("tile_index", ctx.path("tile_index")), ("tile_bounds", ctx.path("tile_bounds")),
                     ("tile_weights", ctx.path("tile_weights"))):
        t = publish.read_parquet_dir(path)
        assert validate_table(t, f"schemas/1B/{ds}.schema.json") == [], ds
        assert t.schema.field("tile_id").type == pa.uint64()


def test_fixture_weights_sum_to_10_pow_dp_for_every_basis(fixture_files, tmp_path):
    for basis in ("population", "area_m2", "uniform"):
        for dp in (0, 2, 6):
            root = tmp_path / f"{basis}{dp}"
            ctx, _, r2 = run_s1_s2(root, fixture_files, basis=basis, dp=dp)
            wdir = Path(ctx.path("tile_weights"))
            assert wdir == root / f"data/layer1/1B/tile_weights/grid={GH}/weights={WH}"
            for iso, want in EXPECTED.items():
                t = spatial.read_country(wdir, iso)
                assert t.column("tile_id").to_pylist() == want
                w = t.column("weight_fp").to_numpy()
                assert w.sum() == 10 ** dp and (w >= 0).all(), (basis, dp, iso)
                assert set(t.column("dp").to_pylist()) == {dp} and set(t.column("basis").to_pylist()) == {basis}
            fallback = ["ZZ"] if basis == "population" else []
            assert r2["zero_mass_fallback"] == fallback
            if basis == "uniform" and dp == 2:  # spec example: uniform, 4 tiles -> 25 each
                assert spatial.read_country(wdir, "ZZ").column("weight_fp").to_pylist() == [25, 25, 25, 25]


def test_fixture_population_weights_follow_the_raster(fixture_run, fixture_files):
    import rasterio

    _, ctx, _, _ = fixture_run
    with rasterio.open(fixture_files / "pop.tif") as ds:
        pop = ds.read(1).astype(np.float64)
    pop[~(pop >= 0)] = 0  # NODATA (-1) and NaN count 0
    for iso in ("HL", "DL", "AQ"):
        want = EXPECTED[iso]
        m = np.array([pop[t // 36, t % 36] for t in want])
        w = spatial.read_country(Path(ctx.path("tile_weights")), iso).column("weight_fp").to_numpy()
        assert np.array_equal(w, oracle(m, want, 6))
    zz = spatial.read_country(Path(ctx.path("tile_weights")), "ZZ").column("weight_fp").to_pylist()
    assert zz == [250000] * 4  # all-zero population -> uniform


def test_byte_identical_across_reruns_and_worker_counts(fixture_files, tmp_path, fixture_run):
    root1 = fixture_run[0]
    root2 = tmp_path / "w2"
    run_s1_s2(root2, fixture_files, workers=2)
    assert tree_digest(root1 / "data") == tree_digest(root2 / "data")
    before = tree_digest(root2 / "data")
    run_s1_s2(root2, fixture_files, workers=1)  # identical re-publish is a no-op
    assert tree_digest(root2 / "data") == before


def test_default_reference_run(tmp_path):
    """The shipped 5' grid and polygons: every ISO country gets tiles; weights sum to 10^6 everywhere."""
    from engine.core import config as cfgmod

    cfg = cfgmod.load()
    ctx = make_ctx(tmp_path, cfg["segment1b"]["inputs"]["population_raster"], cfg["segment1b"]["inputs"]["world_countries"],
                   cfg["segment1a"]["inputs"]["iso_table"], workers=2)
    r1 = s1.run_with_report(ctx)
    r2 = s2.run_with_report(ctx)
    iso = s1.load_iso_codes(cfg["segment1a"]["inputs"]["iso_table"])
    assert r1["iso_without_polygon"] == [] and r1["countries_without_tiles"] == []
    assert {r["country_iso"] for r in r1["per_country"] if r["cells_included"] > 0} == iso
    assert r1["rows_emitted"] == r2["rows_emitted"] == 3_085_519
    assert all(r["postquant_sum_fp"] == 10 ** 6 for r in r2["per_country"])
    assert sorted(r2["zero_mass_fallback"]) == ["BV", "HM"]  # uninhabited: uniform


# --------------------------------------------------------------------------------------------------
# S2: exact quantisation
# --------------------------------------------------------------------------------------------------


def oracle(mass, tile_ids, dp):
    """The spec §4 allocation in exact rational arithmetic."""
    K = 10 ** dp
    fr = [Fraction(float(m)) for m in mass]
    T = sum(fr)
    if T == 0:
        fr, T = [Fraction(1)] * len(fr), Fraction(len(fr))
    q = [f * K / T for f in fr]
    z = [x.numerator // x.denominator for x in q]
    rho = [x - zi for x, zi in zip(q, z)]
    S = K - sum(z)
    order = sorted(range(len(fr)), key=lambda i: (-rho[i], int(tile_ids[i])))
    w = list(z)
    for i in order[:S]:
        w[i] += 1
    return np.array(w, dtype=np.int64)


def test_spec_examples():
    assert s2.quantise([1] * 5, np.arange(5), 2).tolist() == [20] * 5
    # residues 0.667 on tiles 7, 11, 20 with K = 10 and S = 2 -> tiles 7 and 11 get the +1
    assert s2.quantise([8, 8, 8, 6], [7, 11, 20, 3], 1).tolist() == [3, 3, 2, 2]
    # float-hostile masses: the exact rational allocation of the binary64 values
    m = [0.1, 0.2, 0.3]
    for dp in (1, 2, 17, 18):
        assert s2.quantise(m, [1, 2, 3], dp).tolist() == oracle(m, [1, 2, 3], dp).tolist()


def test_quantise_equals_exact_rational_allocation():
    rng = np.random.default_rng(2024)
    for trial in range(250):
        n = int(rng.integers(1, 300))
        kind = trial % 6
        if kind == 0:
            m = rng.random(n)
        elif kind == 1:
            m = rng.choice([0.1, 0.2, 0.3, 0.0, 1e-300, 5e300, 2.0 ** -1074], n)
        elif kind == 2:
            m = rng.integers(0, 3, n).astype(float)
        elif kind == 3:
            m = (rng.random(n) * 1000).astype(np.float32)
        elif kind == 4:
            m = np.full(n, 1 / 3)
        else:  # near-ties: masses one ulp apart
            m = np.nextafter(np.full(n, 0.7), 1.0 * rng.integers(0, 2, n))
        tids = rng.choice(10 ** 7, size=n, replace=False).astype(np.uint64)
        dp = int(rng.integers(0, 19))
        got = s2.quantise(m, tids, dp)
        assert np.array_equal(got, oracle(m, tids, dp)), (trial, kind, dp)
        assert int(got.sum()) == 10 ** dp


def test_chunked_passes_equal_one_pass():
    rng = np.random.default_rng(3)
    m = (rng.random(20_000) * 100).astype(np.float32)
    m[::7] = m[3]  # many equal masses: ties resolved by tile order across chunks
    m[::11] = 0
    whole = s2.Quantiser(m, 6, chunk=1 << 21).weights()
    chunked = s2.Quantiser(m, 6, chunk=997).weights()
    uneven = s2.Quantiser(m, 6, bounds=[0, 5, 4000, 4001, 15000]).weights()
    assert np.array_equal(whole, chunked) and np.array_equal(whole, uneven)
    assert np.array_equal(whole, oracle(m, np.arange(m.size), 6))


def test_zero_mass_falls_back_to_uniform_and_bad_mass_fails():
    q = s2.Quantiser(np.zeros(3), 2)
    assert q.weights().tolist() == [34, 33, 33] and q.info().zero_mass_fallback
    with pytest.raises(EngineError) as e:
        s2.Quantiser(np.array([1.0, -1.0]), 2)
    assert e.value.code == "E105_NORMALIZATION"
    with pytest.raises(EngineError) as e:
        s2.Quantiser(np.array([1.0, np.inf]), 2)
    assert e.value.code == "E105_NORMALIZATION"


# --------------------------------------------------------------------------------------------------
# named failures
# --------------------------------------------------------------------------------------------------


def test_polygon_country_not_in_iso_table(fixture_files, tmp_path):
    pq.write_table(pa.table({"country_iso": ["AQ", "DL", "HL", "MC"]}), tmp_path / "iso.parquet")
    ctx = make_ctx(tmp_path / "r", fixture_files / "pop.tif", fixture_files / "countries.gpkg", tmp_path / "iso.parquet")
    with pytest.raises(EngineError) as e:
        s1.run(ctx)
    assert e.value.code == "E005_ISO_FK" and "ZZ" in e.value.rows
    assert not Path(ctx.path("tile_index")).exists()  # nothing published


def test_invalid_geometry_and_bad_codes(tmp_path):
    bow = Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])  # self-intersecting
    write_polygons(tmp_path / "bad.gpkg", [("HL", bow)])
    with pytest.raises(EngineError) as e:
        spatial.load_world_countries(tmp_path / "bad.gpkg")
    assert e.value.code == "E001_GEO_INVALID"
    write_polygons(tmp_path / "code.gpkg", [("-9", box(0, 0, 1, 1))])
    with pytest.raises(EngineError) as e:
        spatial.load_world_countries(tmp_path / "code.gpkg")
    assert e.value.code == "E005_ISO_FK"


def test_raster_grid_checks(tmp_path):
    data = np.zeros((4, 4), np.float32)
    write_raster(tmp_path / "proj.tif", data, (1000.0, 0, 0, 0, -1000.0, 0), crs="EPSG:3857")
    with pytest.raises(EngineError) as e:
        spatial.read_grid(tmp_path / "proj.tif")
    assert e.value.code == "E007_CRS_MISMATCH"
    write_raster(tmp_path / "east.tif", data, (90.0, 0, 0, 0, -45.0, 90.0))  # 0..360 longitudes
    with pytest.raises(EngineError) as e:
        spatial.read_grid(tmp_path / "east.tif")
    assert e.value.code == "E004_BOUNDS"
    with pytest.raises(EngineError) as e:
        Grid(4, 4, (1.0, 0.5, 0.0, 0.0, -1.0, 4.0)).validate()
    assert e.value.code == "E002_RASTER_MISMATCH"


def test_inclusion_rule_and_missing_tile_index(fixture_files, tmp_path):
    ctx = make_ctx(tmp_path, fixture_files / "pop.tif", fixture_files / "countries.gpkg",
                   fixture_files / "iso.parquet", inclusion_rule="any_overlap")
    with pytest.raises(EngineError) as e:
        s1.run(ctx)
    assert e.value.code == "E008_INCLUSION_RULE"
    with pytest.raises(EngineError) as e:
        s2.run(ctx)
    assert e.value.code == "E101_TILE_INDEX_MISSING"


def test_geoparquet_and_fiona_polygon_files_load_alike(fixture_files, tmp_path):
    import json

    import shapely

    wkb = [shapely.to_wkb(MultiPolygon([g]) if isinstance(g, Polygon) else g) for _, g in FEATS]
    meta = {"version": "1.0.0", "primary_column": "geometry",
            "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["MultiPolygon"]}}}
    t = pa.table({"country_iso": [i for i, _ in FEATS], "geometry": pa.array(wkb, pa.binary())})
    pq.write_table(t.replace_schema_metadata({"geo": json.dumps(meta)}), tmp_path / "countries.parquet")
    a = spatial.load_world_countries(tmp_path / "countries.parquet")
    b = spatial.load_world_countries(fixture_files / "countries.gpkg")
    assert sorted(a) == sorted(b) == sorted(i for i, _ in FEATS)
    for iso in a:
        assert shapely.equals(shapely.MultiPolygon(a[iso].parts), shapely.MultiPolygon(b[iso].parts)), iso
    assert spatial.polygon_isos(tmp_path / "countries.parquet") == sorted(a)

"""1B S3 requirements, S4 allocation plan, S5 site->tile, S6 in-cell jitter (spec 1B 5-8; decisions 8, 11, 16).

Pure-function tests (worked examples, brute-force definition, known answers) plus one small end-to-end run
S0 -> S6 on the fixture of ``test_1b_s0.py`` (hand-made 1A bundle, 10-degree grid, three polygons).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from engine.core import publish, rng, rnglog
from engine.core.errors import InputError, ModelError
from engine.segment1b import s4_alloc_plan as s4
from engine.segment1b import s5_site_tile as s5
from engine.segment1b import s6_jitter as s6
from test_1b_s0 import NCOLS, POLYGONS, build_env, frozen_code_digest  # noqa: F401 (autouse fixture)

FP_KAT = "991c57a380d81d7ab9ba4901efb0d0db3eb7a82af59249d7cc71017126622709"
SEED_KAT = 9248923

# fixture tiles (10-degree cells): AA = 6 interior cells, BB = 6 cells whose centre is in the triangle, SL = 1 cell
TILES = {
    "AA": [7 * NCOLS + c for c in (18, 19, 20)] + [8 * NCOLS + c for c in (18, 19, 20)],
    "BB": [5 * NCOLS + 21, 6 * NCOLS + 21, 6 * NCOLS + 22, 7 * NCOLS + 21, 7 * NCOLS + 22, 7 * NCOLS + 23],
    "SL": [4 * NCOLS + 28],
}
WEIGHTS = {
    "AA": [100000, 200000, 300000, 150000, 150000, 100000],
    "BB": [166667, 166667, 166667, 166667, 166666, 166666],
    "SL": [1000000],
}


def write_tiles(ctx, countries=("AA", "BB", "SL")) -> None:
    """tile_index / tile_bounds / tile_weights partitions, one part-<ISO>.parquet per country (S1/S2 layout)."""
    for ds in ("tile_index", "tile_bounds", "tile_weights"):
        d = Path(ctx.path(ds))
        d.mkdir(parents=True, exist_ok=True)
        for iso in countries:
            tid = np.array(TILES[iso], np.uint64)
            r, c = tid // NCOLS, tid % NCOLS
            lon0 = -180.0 + 10.0 * c.astype(np.float64)
            lat1 = 90.0 - 10.0 * r.astype(np.float64)
            if ds == "tile_index":
                t = pa.table({"country_iso": [iso] * len(tid), "tile_id": tid, "raster_row": r, "raster_col": c,
                              "centroid_lon": lon0 + 5.0, "centroid_lat": lat1 - 5.0,
                              "pixel_area_m2": np.full(len(tid), 1e12), "inclusion_rule": ["center"] * len(tid)})
            elif ds == "tile_bounds":
                t = pa.table({"country_iso": [iso] * len(tid), "tile_id": tid, "min_lat_deg": lat1 - 10.0,
                              "max_lat_deg": lat1, "min_lon_deg": lon0, "max_lon_deg": lon0 + 10.0,
                              "centroid_lat_deg": lat1 - 5.0, "centroid_lon_deg": lon0 + 5.0})
            else:
                t = pa.table({"country_iso": [iso] * len(tid), "tile_id": tid,
                              "weight_fp": pa.array(WEIGHTS[iso], pa.int64()),
                              "dp": pa.array([6] * len(tid), pa.int32()), "basis": ["uniform"] * len(tid)})
            pq.write_table(t, d / f"part-{iso}.parquet")


def run_pipeline(root: Path, counts=None):
    from engine.segment1b import s0_gate, s3_requirements

    ctx = build_env(root, counts)
    s0_gate.run(ctx)
    s0_gate.run_rng_anchor(ctx)
    write_tiles(ctx)
    s3_requirements.run(ctx)
    s4.run(ctx)
    s5.run(ctx)
    s6.run(ctx)
    return ctx


def read(ctx, ds):
    return publish.read_parquet_dir(ctx.path(ds))


def decision24_inside(iso, lon, lat):
    """Independent predicate: closed shell and not in a closed hole (decision 24)."""
    rings = POLYGONS[iso]
    shell = shapely.Polygon(rings[0])
    inside = shapely.intersects_xy(shell, lon, lat)
    for h in rings[1:]:
        inside &= ~shapely.intersects_xy(shapely.Polygon(h), lon, lat)
    return inside


# ============================================================================ S4 (pure)
def test_s4_spec_examples():
    t, q = s4.CountryWeights("X", np.array([1, 2], np.uint64), np.array([700, 300]), 1000).plan(5)
    assert t.tolist() == [1, 2] and q.tolist() == [4, 1]
    t, q = s4.CountryWeights("X", np.array([4, 5, 6], np.uint64), np.array([333, 333, 334]), 1000).plan(3)
    assert t.tolist() == [4, 5, 6] and q.tolist() == [1, 1, 1]
    # ties broken by the smaller tile_id; zero-quota tiles are not emitted
    t, q = s4.CountryWeights("X", np.array([9, 3, 7], np.uint64), np.array([250, 500, 250]), 1000).plan(1)
    assert t.tolist() == [3] and q.tolist() == [1]
    t, q = s4.CountryWeights("X", np.array([9, 3, 7], np.uint64), np.array([250, 500, 250]), 1000).plan(2)
    assert t.tolist() == [3, 7] and q.tolist() == [1, 1]  # residues 500, 0, 500 -> tie 7 vs 9 -> 7


@pytest.mark.parametrize("dp", [0, 2, 3, 6, 15, 18])
def test_s4_matches_bruteforce_definition(dp):
    gen = np.random.default_rng(dp)
    K = 10 ** dp
    for trial in range(150):
        nt = int(gen.integers(1, 25))
        if trial % 4 == 0:  # equal weights: every remainder ties
            w = np.full(nt, K // nt, np.int64)
            w[: K - int(w.sum())] += 1
        else:
            cuts = np.sort(gen.integers(0, K + 1, nt - 1)) if nt > 1 else np.zeros(0, np.int64)
            w = np.diff(np.concatenate([[0], cuts, [K]])).astype(np.int64)
        tid = np.sort(gen.choice(10_000, nt, replace=False)).astype(np.uint64)
        cw = s4.CountryWeights("X", tid, w, K)
        for n in (1, 2, 3, 7, int(gen.integers(1, 300)), 999_999):
            got = cw.plan(n)
            want = s4.plan_reference(tid, w, K, n)
            assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist(), (w, n)
            assert int(got[1].sum()) == n and (got[1] >= 1).all()


def test_s4_alloc_plan_vectorised_reuses_plans():
    w = {0: s4.CountryWeights("AA", np.array([1, 2], np.uint64), np.array([700, 300]), 1000),
         1: s4.CountryWeights("BB", np.array([5], np.uint64), np.array([1000]), 1000)}
    out = s4.alloc_plan(np.array([0, 1, 0, 0]), np.array([5, 2, 1, 5]), w)
    assert out["keys"] == 3  # (AA,5) computed once for two pairs
    assert out["pair"].tolist() == [0, 0, 1, 2, 3, 3]
    assert out["tile_id"].tolist() == [1, 2, 5, 1, 1, 2]
    assert out["n_sites_tile"].tolist() == [4, 1, 2, 1, 4, 1]


def test_s4_reads_per_country_and_generic_partitions(tmp_path):
    per = tmp_path / "per"
    per.mkdir()
    pq.write_table(pa.table({"country_iso": ["BB"], "tile_id": pa.array([7], pa.uint64())}), per / "part-BB.parquet")
    assert s4.read_country_table(per, "BB", ["tile_id"])["tile_id"].to_pylist() == [7]
    assert s4.read_country_table(per, "AA", ["tile_id"]) is None
    gen = tmp_path / "gen"
    gen.mkdir()
    pq.write_table(pa.table({"country_iso": ["BB", "AA", "BB"], "tile_id": pa.array([9, 4, 2], pa.uint64())}),
                   gen / "part-00000.parquet")
    assert s4.read_country_table(gen, "BB", ["tile_id"])["tile_id"].to_pylist() == [2, 9]
    assert s4.read_country_table(gen, "AA", ["tile_id"])["tile_id"].to_pylist() == [4]
    assert s4.read_country_table(gen, "CC", ["tile_id"]) is None


def test_s4_weight_checks(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    pq.write_table(pa.table({"country_iso": ["AA", "AA"], "tile_id": pa.array([1, 2], pa.uint64()),
                             "weight_fp": pa.array([60, 30], pa.int64()), "dp": pa.array([2, 2], pa.int32())}),
                   d / "part-AA.parquet")
    with pytest.raises(InputError) as ei:
        s4.load_country_weights(d, "AA")
    assert ei.value.code == "E414_WEIGHT_TAMPER"
    with pytest.raises(InputError) as ei:
        s4.load_country_weights(d, "BB")
    assert ei.value.code == "E402_MISSING_TILE_WEIGHTS"


# ============================================================================ S5 (pure)
def test_s5_spec_worked_example():
    u = np.array([0.37, 0.82, 0.37, 0.05, 0.41])
    tiles = s5.tiles_for_sites(np.zeros(5, np.int64), u, np.array([7001, 7002, 7005], np.uint64), np.array([2, 1, 2]))
    assert tiles.tolist() == [7001, 7005, 7002, 7001, 7005]


def test_s5_kernel_equals_numpy_statement():
    g = np.random.default_rng(3)
    for _ in range(100):
        npairs = int(g.integers(1, 40))
        rows, N = [], []
        for p in range(npairs):
            nt = int(g.integers(1, 5))
            q = g.integers(1, 4, nt)
            rows += [(p, t, k) for t, k in zip(np.sort(g.choice(100, nt, replace=False)), q)]
            N.append(int(q.sum()))
        pp, pt, pq_ = (np.array([r[i] for r in rows]) for i in range(3))
        N = np.array(N)
        u = g.integers(0, 4, N.sum()) / 4 + 0.1  # many ties: the smaller site_order goes first
        a = s5.tiles_for_sites(np.repeat(np.arange(npairs), N), u, pt.astype(np.uint64), pq_)
        b = s5.tiles_for_pairs(N, u, pp, pt.astype(np.uint64), pq_)
        assert a.tolist() == b.tolist()


def test_s5_known_answer_and_consecutive_blocks():
    M = rng.master_material("1B", bytes.fromhex(FP_KAT), SEED_KAT)
    out = s5.assign(M, np.array([1], np.uint64), np.array(["GB"]), np.array([0, 0]), np.array([10, 20], np.uint64),
                    np.array([2, 1]))
    # decision 16: site 1 draws on the pair's base counter
    assert (int(out["before_hi"][0]), int(out["before_lo"][0])) == (12837100559783722750, 1103277385898565115)
    assert out["u"][0] == 0.8156429157437006
    x0, _ = rng.philox2x64_10(18130705828445966095, 12837100559783722750, 1103277385898565115)
    assert x0 == 15045956122258289606
    # sites 2, 3 use the next blocks of the same stream
    assert out["before_lo"].tolist() == [1103277385898565115 + k for k in range(3)]
    assert out["after_lo"].tolist() == [1103277385898565116 + k for k in range(3)]
    for k in range(3):
        x0, _ = rng.philox2x64_10(18130705828445966095, 12837100559783722750, 1103277385898565115 + k)
        assert out["u"][k] == rng.u01(x0)
    assert sorted(out["tile_id"].tolist()) == [10, 10, 20]


# ============================================================================ S6 (pure)
def test_s6_known_answer_stream():
    M = rng.master_material("1B", bytes.fromhex(FP_KAT), SEED_KAT)
    key, hi, lo = s6.site_streams(M, np.array([1], np.uint64), np.array(["GB"]), np.array([1]))
    assert (int(key[0]), int(hi[0]), int(lo[0])) == (6410871261205765322, 847789589503225099, 14563777118144952152)
    b = {"min_lon": np.array([0.0]), "max_lon": np.array([10.0]), "min_lat": np.array([40.0]),
         "max_lat": np.array([50.0]), "c_lon": np.array([5.0]), "c_lat": np.array([45.0])}
    res = s6.jitter(key, hi, lo, b, np.array([0]), {}, np.array([True]), s6.JitterPolicy())
    assert res["attempts"].tolist() == [1]
    assert res["delta_lon"][0] == (0.0 + 0.21427055261647554 * 10.0) - 5.0
    assert res["delta_lat"][0] == (40.0 + 0.45910476962437397 * 10.0) - 45.0
    ev = res["events"]
    assert (int(ev["before_lo"][0]), int(ev["after_lo"][0])) == (14563777118144952152, 14563777118144952153)


def test_s6_policy_default_and_validation(tmp_path):
    pol = s6.load_policy(Path(__file__).resolve().parents[1] / "config/policy/1b/policy.s6.jitter.yaml")
    assert pol.mode == "uniform_v1" and pol.max_attempts == 256
    assert [c[0] for c in pol.components] == ["core_cluster", "secondary_cluster", "sparse_tail"]
    for bad in ({"mode": "uniform_v1", "max_attempts": 0}, {"mode": "uniform_v1", "max_attempts": 300},
                {"mode": "gaussian", "max_attempts": 64}, {"mode": "uniform_v1", "max_attempts": 64, "x": 1},
                {"mode": "mixture_v2", "max_attempts": 64}):
        with pytest.raises(InputError) as ei:
            s6.parse_policy(bad)
        assert ei.value.code == "E_POLICY_INVALID"


def test_s6_mixture_lane_stays_in_pixel():
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/policy/1b/policy.s6.jitter.yaml").read_text())
    doc["mode"] = "mixture_v2"
    pol = s6.parse_policy(doc)
    M = rng.master_material("1B", bytes.fromhex(FP_KAT), SEED_KAT)
    n = 2000
    key, hi, lo = s6.site_streams(M, np.arange(1, n + 1, dtype=np.uint64), np.array(["GB"] * n), np.ones(n))
    b = {"min_lon": np.zeros(n), "max_lon": np.full(n, 10.0), "min_lat": np.zeros(n), "max_lat": np.full(n, 10.0),
         "c_lon": np.full(n, 5.0), "c_lat": np.full(n, 5.0)}
    res = s6.jitter(key, hi, lo, b, np.zeros(n, np.int64), {}, np.ones(n, bool), pol)
    assert (np.abs(res["delta_lon"]) <= 5.0).all() and (np.abs(res["delta_lat"]) <= 5.0).all()
    assert set(np.unique(res["events"]["sigma"]).tolist()) <= {0.8, 1.0}
    # core_cluster (f_max 0.8) never reaches the outer 10% of the half-width
    core = res["events"]["sigma"] == 0.8
    assert core.any() and (np.abs(res["delta_lon"][core]) <= 4.0 + 1e-12).all()


def test_s6_interior_tiles():
    from engine.segment1b.spatial import CountryShape

    def boxes(iso):
        t = np.array(TILES[iso], np.int64)
        lon0, lat1 = -180.0 + 10.0 * (t % NCOLS), 90.0 - 10.0 * (t // NCOLS)
        return lon0, lat1 - 10.0, lon0 + 10.0, lat1

    aa = CountryShape("AA", shapely.Polygon(POLYGONS["AA"][0]))
    bb = CountryShape("BB", shapely.Polygon(POLYGONS["BB"][0], POLYGONS["BB"][1:]))
    assert s6.interior_tiles(aa, *boxes("AA")).all()
    assert not s6.interior_tiles(bb, *boxes("BB")).any()  # cut by the diagonal, touching it, or holding the hole
    # a rectangle touching the shell from inside is not interior (its edge is on the boundary)
    assert s6.interior_tiles(aa, np.array([0.0, -0.5]), np.array([0.0, 0.0]), np.array([10.0, 10.0]),
                             np.array([10.0, 10.0])).tolist() == [True, False]


def test_reconstruct_normalises_longitude():
    lon, lat = s6.reconstruct(np.array([179.5, -179.5]), np.array([1.0, 2.0]), np.array([1.0, -1.0]),
                              np.array([0.5, 0.5]))
    assert lon.tolist() == [-179.5, 179.5] and lat.tolist() == [1.5, 2.5]


# ============================================================================ end to end S0 -> S6
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("s3s6") / "run")


def test_s3_requirements(pipeline):
    t = read(pipeline, "s3_requirements")
    assert t.column_names == ["merchant_id", "legal_country_iso", "n_sites"]
    assert t.schema.field("merchant_id").type == pa.uint64()
    rows = list(zip(t["merchant_id"].to_pylist(), t["legal_country_iso"].to_pylist(), t["n_sites"].to_pylist()))
    assert rows == [(1, "AA", 3), (1, "BB", 2), (2, "AA", 5), (3, "BB", 7), (2**63 + 5, "AA", 1)]


def test_s4_plan_sums_and_largest_remainder(pipeline):
    t = read(pipeline, "s4_alloc_plan")
    df = t.to_pandas()
    assert (df["n_sites_tile"] >= 1).all()
    sums = df.groupby(["merchant_id", "legal_country_iso"])["n_sites_tile"].sum().to_dict()
    assert sums == {(1, "AA"): 3, (1, "BB"): 2, (2, "AA"): 5, (3, "BB"): 7, (2**63 + 5, "AA"): 1}
    # AA weights 0.1 0.2 0.3 0.15 0.15 0.1 with n=5 -> z=[0,1,1,0,0,0], S=3 -> residues .5 .0 .5 .75 .75 .5
    aa5 = df[(df.merchant_id == 2) & (df.legal_country_iso == "AA")]
    assert list(zip(aa5.tile_id, aa5.n_sites_tile)) == [(270, 1), (271, 1), (272, 1), (306, 1), (307, 1)]
    got = list(zip(t["merchant_id"].to_pylist(), t["legal_country_iso"].to_pylist(), t["tile_id"].to_pylist()))
    assert got == sorted(got)


def test_s5_quotas_honoured_and_one_event_per_site(pipeline):
    plan = read(pipeline, "s4_alloc_plan").to_pandas()
    a = read(pipeline, "s5_site_tile_assignment")
    df = a.to_pandas()
    counts = df.groupby(["merchant_id", "legal_country_iso", "tile_id"]).size().rename("n").reset_index()
    merged = plan.merge(counts, on=["merchant_id", "legal_country_iso", "tile_id"], how="outer")
    assert (merged["n"] == merged["n_sites_tile"]).all()
    keys = list(zip(df.merchant_id, df.legal_country_iso, df.site_order))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    ev = rnglog.read_events(pipeline.data_root, pipeline.ids, "site_tile_assign")
    assert ev.num_rows == a.num_rows
    e = ev.to_pandas()
    assert list(zip(e.merchant_id, e.legal_country_iso, e.site_order)) == keys
    assert (e.tile_id.to_numpy() == df.tile_id.to_numpy()).all()
    assert set(e.module) == {"1B.S5.assigner"} and set(e.substream_label) == {"site_tile_assign"}
    assert set(e.blocks) == {1} and set(e.draws) == {"1"}
    # replay: u = u01(x0) of the event's own counter, and the (merchant, ISO) stream's k-th block
    M = rng.master_material("1B", pipeline.ids.fingerprint_bytes, pipeline.ids.seed)
    for i in (0, 4, len(e) - 1):
        mu = rng.merchant_u64(int(e.merchant_id[i]))
        k, h, lo = rng.substream(M, "1B", "site_tile_assign", rng.ser_u64(mu) + rng.ser_iso(e.legal_country_iso[i]))
        assert (int(e.rng_counter_before_hi[i]), int(e.rng_counter_before_lo[i])) == rng.add128(h, lo, int(e.site_order[i]) - 1)
        assert e.u[i] == rng.u01(rng.philox2x64_10(k, int(e.rng_counter_before_hi[i]), int(e.rng_counter_before_lo[i]))[0])
    assert rnglog.reconcile(pipeline.data_root, pipeline.ids, families=["site_tile_assign", "in_cell_jitter"]) == []


def test_s6_points_inside_pixel_and_country(pipeline):
    a = read(pipeline, "s5_site_tile_assignment").to_pandas()
    j = read(pipeline, "s6_site_jitter").to_pandas()
    assert list(zip(j.merchant_id, j.legal_country_iso, j.site_order)) == list(zip(a.merchant_id, a.legal_country_iso,
                                                                                    a.site_order))
    assert (j.tile_id.to_numpy() == a.tile_id.to_numpy()).all()
    assert set(j.manifest_fingerprint) == {pipeline.ids.manifest_fingerprint}
    tid = j.tile_id.to_numpy().astype(np.int64)
    lon0 = -180.0 + 10.0 * (tid % NCOLS)
    lat1 = 90.0 - 10.0 * (tid // NCOLS)
    lon, lat = s6.reconstruct(lon0 + 5.0, lat1 - 5.0, j.delta_lon_deg.to_numpy(), j.delta_lat_deg.to_numpy())
    assert (lon == j.lon_deg.to_numpy()).all() and (lat == j.lat_deg.to_numpy()).all()
    assert ((lon >= lon0) & (lon <= lon0 + 10.0) & (lat >= lat1 - 10.0) & (lat <= lat1)).all()
    for iso in ("AA", "BB"):
        sel = (j.legal_country_iso == iso).to_numpy()
        assert decision24_inside(iso, lon[sel], lat[sel]).all()
    assert (j.attempts >= 1).all()
    # partially covered BB cells need resampling at times; AA cells are interior (one attempt)
    assert (j.attempts[j.legal_country_iso == "AA"] == 1).all()


def test_s6_event_accounting(pipeline):
    j = read(pipeline, "s6_site_jitter").to_pandas()
    ev = rnglog.read_events(pipeline.data_root, pipeline.ids, "in_cell_jitter").to_pandas()
    assert len(ev) == int(j.attempts.sum())
    assert set(ev.blocks) == {1} and set(ev.draws) == {"2"} and set(ev.module) == {"1B.S6.jitter"}
    assert (ev.sigma_lat_deg == 0.0).all() and (ev.sigma_lon_deg == 0.0).all()
    per_site = ev.groupby(["merchant_id", "legal_country_iso", "site_order"], sort=False)
    last = per_site.tail(1).reset_index(drop=True)
    assert (per_site.size().to_numpy() == j.attempts.to_numpy()).all()
    assert (last.delta_lon_deg.to_numpy() == j.delta_lon_deg.to_numpy()).all()
    assert (last.delta_lat_deg.to_numpy() == j.delta_lat_deg.to_numpy()).all()
    # rejected attempts (all but the last of a site) drew points outside the country
    rej = ev[~ev.index.isin(per_site.tail(1).index)].merge(
        j[["merchant_id", "legal_country_iso", "site_order", "tile_id"]], on=["merchant_id", "legal_country_iso",
                                                                            "site_order"])
    # whether any of the 9 BB sites needed a second attempt depends on the draws, hence on the code digest: only
    # the invariant is asserted here (test_1b_s6_fast_paths drives rejections with fixed keys)
    assert set(rej.legal_country_iso) <= {"BB"}
    tid = rej.tile_id.to_numpy().astype(np.int64)
    lon, lat = s6.reconstruct(-175.0 + 10.0 * (tid % NCOLS), 85.0 - 10.0 * (tid // NCOLS),
                              rej.delta_lon_deg.to_numpy(), rej.delta_lat_deg.to_numpy())
    assert not decision24_inside("BB", lon, lat).any()
    # consecutive blocks of the site's stream, the first on the site's base counter
    first = per_site.head(1)
    M = rng.master_material("1B", pipeline.ids.fingerprint_bytes, pipeline.ids.seed)
    for _, r in first.head(3).iterrows():
        mu = rng.merchant_u64(int(r.merchant_id))
        k, h, lo = rng.substream(M, "1B", "in_cell_jitter", rng.ser_u64(mu) + rng.ser_iso(r.legal_country_iso)
                                 + rng.ser_u64(int(r.site_order)))
        assert (int(r.rng_counter_before_hi), int(r.rng_counter_before_lo)) == (h, lo)
    trace = rnglog.read_trace(pipeline.data_root, pipeline.ids, pipeline.config).to_pandas()
    jt = trace[trace.substream_label == "in_cell_jitter"]
    assert int(jt.events_total.astype(np.int64).max()) == len(ev)
    assert int(jt.draws_total.astype(np.int64).max()) == 2 * len(ev)


def test_rerun_is_identical(pipeline, tmp_path):
    """Same inputs in another data root: byte-identical datasets and identical events (ts_utc aside)."""
    other = run_pipeline(tmp_path / "again")
    assert other.ids == pipeline.ids
    for ds in ("s3_requirements", "s4_alloc_plan", "s5_site_tile_assignment", "s6_site_jitter"):
        a = (Path(pipeline.path(ds)) / "part-00000.parquet").read_bytes()
        b = (Path(other.path(ds)) / "part-00000.parquet").read_bytes()
        assert a == b, ds
    for fam in ("site_tile_assign", "in_cell_jitter"):
        ea = rnglog.read_events(pipeline.data_root, pipeline.ids, fam).drop(["ts_utc"])
        eb = rnglog.read_events(other.data_root, other.ids, fam).drop(["ts_utc"])
        assert ea.equals(eb), fam
    # re-running a state over the same partition is a no-op, not a write-once violation
    s5.run(other)
    s6.run(other)
    assert rnglog.reconcile(other.data_root, other.ids, families=["site_tile_assign", "in_cell_jitter"]) == []


# ============================================================================ failures
def test_s3_missing_tiles_is_named_error(tmp_path):
    from engine.segment1b import s0_gate, s3_requirements

    ctx = build_env(tmp_path / "run", {(1, "AA"): 2, (4, "ZZ"): 3, (5, "ZZ"): 1})
    s0_gate.run(ctx)
    write_tiles(ctx)
    with pytest.raises(InputError) as ei:
        s3_requirements.run(ctx)
    e = ei.value
    assert e.code == "E303_MISSING_WEIGHTS" and "ZZ" in e.message
    assert e.detail["countries"] == ["ZZ"] and e.detail["merchants_affected"] == 2 and e.detail["sites_affected"] == 4
    assert not Path(ctx.path("s3_requirements")).exists()


def test_s3_site_order_integrity():
    from engine.segment1b.s3_requirements import requirements

    with pytest.raises(InputError) as ei:
        requirements(np.array([1, 1, 1], np.uint64), np.zeros(3, np.int32), np.array(["AA"]), np.array([1, 2, 4]))
    assert ei.value.code == "E314_SITE_ORDER_INTEGRITY"
    r = requirements(np.array([2, 1, 1, 2], np.uint64), np.array([0, 1, 0, 0], np.int32), np.array(["AA", "BB"]),
                     np.array([2, 1, 1, 1]), np.array([2, 1, 1, 2]))
    assert r["merchant_id"].tolist() == [1, 1, 2] and r["n_sites"].tolist() == [1, 1, 2]


def test_s6_sliver_reaches_cap_with_named_error(tmp_path):
    from engine.segment1b import s0_gate, s3_requirements

    ctx = build_env(tmp_path / "run", {(1, "AA"): 2, (9, "SL"): 1})
    s0_gate.run(ctx)
    s0_gate.run_rng_anchor(ctx)
    write_tiles(ctx)
    s3_requirements.run(ctx)
    s4.run(ctx)
    s5.run(ctx)
    with pytest.raises(ModelError) as ei:
        s6.run(ctx)
    e = ei.value
    assert e.code == "E613_RESAMPLE_EXHAUSTED"
    assert e.rows == [f"merchant_id=9 legal_country_iso=SL site_order=1 tile_id={TILES['SL'][0]}"]
    assert not Path(ctx.path("s6_site_jitter")).exists()
    ev = rnglog.read_events(ctx.data_root, ctx.ids, "in_cell_jitter").to_pandas()
    assert int((ev.merchant_id == 9).sum()) == 256  # every attempt (policy max_attempts) is logged as evidence
    assert int((ev.merchant_id == 1).sum()) == 2

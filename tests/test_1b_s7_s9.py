"""1B S7 (synthesis), S8 (site_locations egress), S9 (validation bundle, flag, stage log).

A tiny hand-built world (two square countries on a 1-degree grid, 10 sites of 3 merchants, one u64 id above
2^63) stands in for S0-S6: its S5/S6 partitions, tile_bounds, outlet_catalogue and RNG logs are written here
exactly as those states publish them, so S7-S9 run on real files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import box

from engine.core import bundle, identities, publish, rnglog
from engine.core.context import RunContext, SegmentIds
from engine.core.errors import EngineError, GateError, ValidationFailure
from engine.core.schema import arrow_schema
from engine.segment1b import s7_synthesis as s7
from engine.segment1b import s8_site_locations as s8
from engine.segment1b import s9_validation as s9

REPO = Path(__file__).resolve().parents[1]
SEED = 42
BIG = (1 << 64) - 5  # a merchant id above 2^63 - 1 (decision 12)
# grid: 1-degree cells, lon [-10, 10), lat (40, 60]; row 0 at the top; tile_id = row * 20 + col
W, LON0, LAT0 = 20, -10.0, 60.0
COUNTRIES = {"GB": box(0.0, 50.0, 3.0, 52.5), "FR": box(-5.0, 43.0, -1.0, 48.0)}
# (merchant, iso, site_order) -> (tile lon cell origin, tile lat cell origin, attempts as (fx, fy) in the cell)
SITES = {
    (1, "FR", 1): (-5, 43, [(0.25, 0.5)]),
    (1, "FR", 2): (-2, 47, [(0.75, 0.125)]),
    (1, "GB", 1): (0, 50, [(0.5, 0.5)]),
    (1, "GB", 2): (2, 52, [(0.5, 0.875), (0.5, 0.25)]),  # first attempt above the 52.5 border: rejected
    (1, "GB", 3): (1, 51, [(0.125, 0.375)]),
    (7, "FR", 1): (-4, 44, [(0.5, 0.5)]),
    (7, "FR", 2): (-4, 44, [(0.0625, 0.9375)]),
    (7, "FR", 3): (-3, 45, [(0.25, 0.75)]),
    (7, "FR", 4): (-2, 46, [(0.625, 0.5)]),
    (BIG, "GB", 1): (1, 52, [(0.5, 0.75), (0.5, 0.9), (0.5, 0.375)]),
}


def hx(s: str, n: int = 64) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:n]


def tile_of(lon0: float, lat0: float) -> int:
    row = int(LAT0 - (lat0 + 1))
    col = int(lon0 - LON0)
    return row * W + col


def make_ctx(root: Path, seed: int = SEED) -> RunContext:
    ids_1a = SegmentIds("1A", seed, hx("ph1a"), hx("fp1a"), identities.run_id("1A", hx("fp1a"), hx("ph1a"), seed))
    ph, fp = hx("ph1b"), hx("fp1b")
    ids = SegmentIds("1B", seed, ph, fp, identities.run_id("1B", fp, ph, seed))
    cfg = {
        "seed": seed,
        "segment1b": {"inputs": {"world_countries": str(root / "ref" / "countries.parquet")},
                      "parameters": {"policy.s6.jitter.yaml": str(root / "ref" / "jitter.yaml")},
                      "options": {"basis": "uniform", "dp": 2}},
    }
    extra = {"grid_hash": hx("grid"), "weights_hash": hx("weights"), "code_digest": hx("code")}
    return RunContext(root.resolve(), REPO, cfg, ids, ids_1a=ids_1a, extra=extra)


def write_parquet_dir(path: Path, table: pa.Table, name: str = "part-00000.parquet") -> None:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / name)


def build_world(ctx: RunContext, sites: dict = SITES, catalogue_extra: list | None = None) -> None:
    """Write everything S7-S9 read: polygons, tile_bounds, outlet_catalogue, S5, S6 and the RNG logs."""
    root = ctx.data_root
    (root / "ref").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"country_iso": list(COUNTRIES),
                             "geometry": [shapely.to_wkb(g) for g in COUNTRIES.values()]}),
                   root / "ref" / "countries.parquet")
    # tile_bounds: one file per country, every cell of the country's bounding box, tile_id order
    bdir = ctx.path("tile_bounds")
    for iso, g in COUNTRIES.items():
        minx, miny, maxx, maxy = g.bounds
        rows = []
        for lat0 in np.arange(np.floor(miny), np.ceil(maxy)):
            for lon0 in np.arange(np.floor(minx), np.ceil(maxx)):
                rows.append((tile_of(lon0, lat0), lon0, lat0))
        rows.sort()
        write_parquet_dir(bdir, pa.table({
            "country_iso": [iso] * len(rows),
            "tile_id": pa.array([r[0] for r in rows], pa.uint64()),
            "min_lat_deg": [float(r[2]) for r in rows], "max_lat_deg": [float(r[2] + 1) for r in rows],
            "min_lon_deg": [float(r[1]) for r in rows], "max_lon_deg": [float(r[1] + 1) for r in rows],
            "centroid_lat_deg": [float(r[2] + 0.5) for r in rows],
            "centroid_lon_deg": [float(r[1] + 0.5) for r in rows],
        }), f"part-{iso}.parquet")
    keys = sorted(sites)
    # outlet_catalogue (1A egress)
    cat_keys = keys + list(catalogue_extra or [])
    counts: dict = {}
    for m, iso, _ in cat_keys:
        counts[(m, iso)] = counts.get((m, iso), 0) + 1
    cat = pa.table({
        "manifest_fingerprint": [ctx.ids_1a.manifest_fingerprint] * len(cat_keys),
        "merchant_id": pa.array([k[0] for k in cat_keys], pa.uint64()),
        "site_id": [f"{k[2]:06d}" for k in cat_keys],
        "home_country_iso": ["GB"] * len(cat_keys),
        "legal_country_iso": [k[1] for k in cat_keys],
        "single_vs_multi_flag": [k[0] != BIG for k in cat_keys],
        "raw_nb_outlet_draw": pa.array([5] * len(cat_keys), pa.int32()),
        "final_country_outlet_count": pa.array([counts[(k[0], k[1])] for k in cat_keys], pa.int32()),
        "site_order": pa.array([k[2] for k in cat_keys], pa.int32()),
        "global_seed": pa.array([ctx.ids_1a.seed] * len(cat_keys), pa.uint64()),
    })
    with publish.staged(ctx.path("outlet_catalogue", segment="1A"), "X") as tmp:
        publish.write_parquet(cat, Path(tmp) / "part-00000.parquet",
                              sort_by=["merchant_id", "legal_country_iso", "site_order"],
                              schema=arrow_schema("schemas/1A/outlet_catalogue.schema.json"))
    # S5 / S6 and their events
    s5rows, s6rows = [], []
    e5 = {c: [] for c in ("merchant_id", "legal_country_iso", "site_order", "tile_id", "u", "before_hi", "before_lo",
                          "after_hi", "after_lo", "blocks", "draws")}
    e6 = {c: [] for c in ("merchant_id", "legal_country_iso", "site_order", "delta_lat_deg", "delta_lon_deg",
                          "sigma_lat_deg", "sigma_lon_deg", "before_hi", "before_lo", "after_hi", "after_lo",
                          "blocks", "draws")}
    pair_index: dict = {}
    for si, (m, iso, so) in enumerate(keys):
        lon0, lat0, attempts = sites[(m, iso, so)]
        tid = tile_of(lon0, lat0)
        pi = pair_index.setdefault((m, iso), len(pair_index) + 1)
        s5rows.append((m, iso, so, tid))
        for c, v in zip(("merchant_id", "legal_country_iso", "site_order", "tile_id", "u", "before_hi", "before_lo",
                         "after_hi", "after_lo", "blocks", "draws"),
                        (m, iso, so, tid, 0.5, pi, so - 1, pi, so, 1, 1)):
            e5[c].append(v)
        clon, clat = lon0 + 0.5, lat0 + 0.5
        for a, (fx, fy) in enumerate(attempts):
            dlon, dlat = (lon0 + fx) - clon, (lat0 + fy) - clat
            for c, v in zip(("merchant_id", "legal_country_iso", "site_order", "delta_lat_deg", "delta_lon_deg",
                             "sigma_lat_deg", "sigma_lon_deg", "before_hi", "before_lo", "after_hi", "after_lo",
                             "blocks", "draws"),
                            (m, iso, so, dlat, dlon, 0.0, 0.0, 1000 + si, a, 1000 + si, a + 1, 1, 2)):
                e6[c].append(v)
        s6rows.append((m, iso, so, tid, dlat, dlon, clon + dlon, clat + dlat, len(attempts)))
    s5t = pa.table({"merchant_id": pa.array([r[0] for r in s5rows], pa.uint64()),
                    "legal_country_iso": [r[1] for r in s5rows],
                    "site_order": pa.array([r[2] for r in s5rows], pa.int64()),
                    "tile_id": pa.array([r[3] for r in s5rows], pa.uint64())})
    write_parquet_dir(ctx.path("s5_site_tile_assignment"), s5t)
    s6t = pa.table({"merchant_id": pa.array([r[0] for r in s6rows], pa.uint64()),
                    "legal_country_iso": [r[1] for r in s6rows],
                    "site_order": pa.array([r[2] for r in s6rows], pa.int64()),
                    "tile_id": pa.array([r[3] for r in s6rows], pa.uint64()),
                    "delta_lat_deg": [r[4] for r in s6rows], "delta_lon_deg": [r[5] for r in s6rows],
                    "lon_deg": [r[6] for r in s6rows], "lat_deg": [r[7] for r in s6rows],
                    "attempts": pa.array([r[8] for r in s6rows], pa.int32()),
                    "manifest_fingerprint": [ctx.ids.manifest_fingerprint] * len(s6rows)})
    write_parquet_dir(ctx.path("s6_site_jitter"), s6t)
    logs = rnglog.RngLogs(root, "1B", ctx.ids, ctx.config)
    logs.write_audit(build_commit=hx("code"))
    e5["merchant_id"] = np.array(e5["merchant_id"], dtype=np.uint64)
    e6["merchant_id"] = np.array(e6["merchant_id"], dtype=np.uint64)
    logs.add_events("site_tile_assign", "1B.S5.assigner", "site_tile_assign", e5)
    logs.add_events("in_cell_jitter", "1B.S6.jitter", "in_cell_jitter", e6)
    logs.close()


def _ungated_catalogue(ctx, columns):
    """Stand-in for the S0 gate (tested with S0): the fixture's catalogue read directly."""
    return publish.read_parquet_dir(ctx.path("outlet_catalogue", segment="1A")).select(list(columns))


def no_gate(monkeypatch):
    monkeypatch.setattr(s7, "gated_catalogue", _ungated_catalogue)


@pytest.fixture
def world(tmp_path, monkeypatch):
    no_gate(monkeypatch)
    ctx = make_ctx(tmp_path / "root")
    build_world(ctx)
    return ctx


def run_s7_s8(ctx):
    s7.run(ctx)
    s8.run(ctx)


def egress_file(ctx) -> Path:
    return Path(ctx.path("site_locations")) / "part-00000.parquet"


def stage_lines(ctx) -> list[dict]:
    p = Path(ctx.path("s9_stage_log"))
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


# ====================================================================== S7
def test_s7_synthesises_exact_coordinates(world):
    ctx = world
    s7.run(ctx)
    t = publish.read_parquet_dir(ctx.path("s7_site_synthesis"))
    assert t.column_names == ["merchant_id", "legal_country_iso", "site_order", "tile_id", "lon_deg", "lat_deg"]
    assert t.schema.field("merchant_id").type == pa.uint64()
    rows = t.to_pylist()
    assert [(r["merchant_id"], r["legal_country_iso"], r["site_order"]) for r in rows] == sorted(SITES)
    for r in rows:
        lon0, lat0, attempts = SITES[(r["merchant_id"], r["legal_country_iso"], r["site_order"])]
        fx, fy = attempts[-1]  # the accepted attempt
        clon, clat = lon0 + 0.5, lat0 + 0.5
        assert r["tile_id"] == tile_of(lon0, lat0)
        assert r["lon_deg"] == clon + ((lon0 + fx) - clon)  # centroid + delta, bit for bit
        assert r["lat_deg"] == clat + ((lat0 + fy) - clat)
    assert rows[-1]["merchant_id"] == BIG


def test_s7_publish_is_idempotent_and_write_once(world):
    ctx = world
    s7.run(ctx)
    part = Path(ctx.path("s7_site_synthesis")) / "part-00000.parquet"
    before = part.read_bytes()
    s7.run(ctx)  # identical bytes: no-op
    assert part.read_bytes() == before
    # different S6 deltas with the same identities -> E913, original intact
    p6 = Path(ctx.path("s6_site_jitter")) / "part-00000.parquet"
    t = pq.read_table(p6)
    d = t["delta_lat_deg"].to_numpy().copy()
    d[0] += 0.001
    pq.write_table(t.set_column(t.column_names.index("delta_lat_deg"), "delta_lat_deg", pa.array(d)), p6)
    with pytest.raises(EngineError) as e:
        s7.run(ctx)
    assert e.value.code == "E913_ATOMIC_PUBLISH_VIOLATION"
    assert part.read_bytes() == before


def _drop_s6_row(ctx, i=0):
    p6 = Path(ctx.path("s6_site_jitter")) / "part-00000.parquet"
    t = pq.read_table(p6)
    keep = np.ones(t.num_rows, bool)
    keep[i] = False
    pq.write_table(t.filter(pa.array(keep)), p6)


@pytest.mark.parametrize("mutate,code", [
    ("catalogue_extra", "E708_1A_COVERAGE_FAIL"),
    ("s6_missing", "E701_ROW_MISSING"),
    ("s6_dup", "E703_DUP_KEY"),
    ("s6_tile", "E701_ROW_MISSING"),
    ("tile_unknown", "E709_TILE_FK_VIOLATION"),
    ("outside_pixel", "E707_POINT_OUTSIDE_PIXEL"),
    ("s6_fingerprint", "E705_PARTITION_OR_IDENTITY"),
])
def test_s7_parity_and_geometry_errors(tmp_path, monkeypatch, mutate, code):
    no_gate(monkeypatch)
    ctx = make_ctx(tmp_path / "root")
    build_world(ctx, catalogue_extra=[(7, "FR", 5)] if mutate == "catalogue_extra" else None)
    p6 = Path(ctx.path("s6_site_jitter")) / "part-00000.parquet"
    t = pq.read_table(p6)
    if mutate == "s6_missing":
        _drop_s6_row(ctx, 3)
    elif mutate == "s6_dup":
        pq.write_table(pa.concat_tables([t, t.slice(2, 1)]), p6)
    elif mutate in ("s6_tile", "tile_unknown"):
        tid = t["tile_id"].to_numpy().copy()
        tid[1] = 5 if mutate == "s6_tile" else tid[1]
        pq.write_table(t.set_column(3, "tile_id", pa.array(tid, pa.uint64())), p6)
        if mutate == "tile_unknown":
            p5 = Path(ctx.path("s5_site_tile_assignment")) / "part-00000.parquet"
            t5 = pq.read_table(p5)
            t5t = t5["tile_id"].to_numpy().copy()
            t5t[1] = tid[1] = 399  # the bottom-right cell: in no country's tile_bounds
            pq.write_table(t5.set_column(3, "tile_id", pa.array(t5t, pa.uint64())), p5)
            pq.write_table(t.set_column(3, "tile_id", pa.array(tid, pa.uint64())), p6)
    elif mutate == "outside_pixel":
        d = t["delta_lon_deg"].to_numpy().copy()
        d[0] = 0.5 + 1e-6  # just beyond the cell edge (eps is 1e-9)
        pq.write_table(t.set_column(t.column_names.index("delta_lon_deg"), "delta_lon_deg", pa.array(d)), p6)
    elif mutate == "s6_fingerprint":
        fp = t["manifest_fingerprint"].to_pylist()
        fp[4] = hx("other")
        pq.write_table(t.set_column(t.column_names.index("manifest_fingerprint"), "manifest_fingerprint",
                                    pa.array(fp)), p6)
    with pytest.raises(EngineError) as e:
        s7.run(ctx)
    assert e.value.code == code
    assert e.value.rows, "the error names the offending keys"
    assert not Path(ctx.path("s7_site_synthesis")).exists(), "nothing published on failure"


def test_s7_pixel_edge_is_inclusive(world):
    ctx = world
    p6 = Path(ctx.path("s6_site_jitter")) / "part-00000.parquet"
    t = pq.read_table(p6)
    d = t["delta_lon_deg"].to_numpy().copy()
    d[0] = 0.5  # exactly on the east edge of the cell
    pq.write_table(t.set_column(t.column_names.index("delta_lon_deg"), "delta_lon_deg", pa.array(d)), p6)
    s7.run(ctx)


def test_s7_reads_the_catalogue_only_through_the_s0_gate(tmp_path):
    ctx = make_ctx(tmp_path / "root")
    build_world(ctx)  # S5, S6 and outlet_catalogue exist, but no S0 receipt
    with pytest.raises(GateError) as e:
        s7.run(ctx)
    assert e.value.code == "E301_NO_PASS_FLAG"
    assert str(e.value).startswith("No PASS -> no read:")
    assert not Path(ctx.path("s7_site_synthesis")).exists()


def test_normalise_and_inside_pixel_dateline():
    lon, lat = s7.synthesise_coordinates([179.5], [0.5], [0.75], [0.0])
    assert lon[0] == 179.5 + 0.75 - 360.0 and lat[0] == 0.5
    b = {"min_lon_deg": np.array([179.0]), "max_lon_deg": np.array([180.25]), "min_lat_deg": np.array([0.0]),
         "max_lat_deg": np.array([1.0])}
    assert s7.inside_pixel(lon, lat, b)[0]
    assert not s7.inside_pixel(np.array([178.9]), lat, b)[0]


# ====================================================================== S8
def test_s8_writes_exactly_the_egress_columns(world):
    ctx = world
    run_s7_s8(ctx)
    out = Path(ctx.path("site_locations"))
    assert "parameter_hash=" not in str(out) and f"seed={SEED}" in str(out)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet"]
    t = pq.read_table(out / "part-00000.parquet")
    assert t.schema == arrow_schema("schemas/1B/site_locations.schema.json")
    s7t = publish.read_parquet_dir(ctx.path("s7_site_synthesis"))
    assert t.equals(s7t.select(list(s8.EGRESS_COLUMNS)))


def test_s8_refuses_duplicate_s7_keys(world):
    ctx = world
    s7.run(ctx)
    p = Path(ctx.path("s7_site_synthesis")) / "part-00000.parquet"
    t = pq.read_table(p)
    pq.write_table(pa.concat_tables([t, t.slice(0, 1)]), p)
    with pytest.raises(EngineError) as e:
        s8.run(ctx)
    assert e.value.code == "E803_DUP_KEY"
    assert not Path(ctx.path("site_locations")).exists()


# ====================================================================== S9
def test_s9_pass_writes_flag_bundle_and_8_stage_lines(world):
    ctx = world
    run_s7_s8(ctx)
    s9.run(ctx)
    b = Path(ctx.path("validation_bundle_1B"))
    assert f"seed={SEED}" in str(b) and f"fingerprint={ctx.ids.manifest_fingerprint}" in str(b)
    digest = bundle.verify_bundle(b)  # flag = recomputed digest
    assert (b / "_passed.flag").read_text() == f"sha256_hex = {digest}\n"
    idx = json.loads((b / "index.json").read_text())
    assert sorted(e["path"] for e in idx) == sorted([*s9.REQUIRED_FILES, "index.json"])
    summary = json.loads((b / "s9_summary.json").read_text())
    assert summary["passed"] is True and summary["failure_codes"] == []
    assert summary["sizes"] == {"rows_s7": 10, "rows_s8": 10, "parity_ok": True}
    assert summary["by_country"]["GB"] == {"rows_s7": 4, "rows_s8": 4, "parity_ok": True}
    fams = summary["rng"]["families"]
    assert fams["site_tile_assign"]["events_total"] == 10 and fams["site_tile_assign"]["draws_total"] == "10"
    assert fams["in_cell_jitter"]["events_total"] == 13 and fams["in_cell_jitter"]["draws_total"] == "26"
    assert all(f["trace_reconciled"] and f["coverage_ok"] for f in fams.values())
    raw = b"".join((b / p).read_bytes() for p in sorted(s9.REQUIRED_FILES))
    assert b"ts_utc" not in raw and str(ctx.data_root).encode() not in raw  # no clock, no absolute path
    lines = stage_lines(ctx)
    assert len(lines) == 8
    assert [(x["stage"], x["status"]) for x in lines] == [(s, st) for s in s9.STAGES for st in ("begin", "end")]
    for x in lines:
        assert (x["seed"], x["parameter_hash"], x["manifest_fingerprint"], x["run_id"]) == (
            SEED, ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint, ctx.ids.run_id)
        assert x["ts_utc"].endswith("Z") and x["elapsed_ns"] >= 0
    assert lines[5]["extra"] == {"passed": True, "failure_count": 0}
    assert lines[7]["extra"] == {"flag_emitted": True}
    # re-run: identical bytes (write-once no-op), the stage log grows by 8 (append-only, decision 22)
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    s9.run(ctx)
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert len(stage_lines(ctx)) == 16


def test_s9_bundle_bytes_do_not_depend_on_the_data_root(tmp_path, monkeypatch):
    no_gate(monkeypatch)
    out = []
    for name in ("a", "b/deeper"):
        ctx = make_ctx(tmp_path / name)
        build_world(ctx)
        run_s7_s8(ctx)
        s9.run(ctx)
        b = Path(ctx.path("validation_bundle_1B"))
        out.append({p.name: p.read_bytes() for p in sorted(b.iterdir())})
    assert out[0] == out[1]


def _rewrite_egress(ctx, table):
    pq.write_table(table, egress_file(ctx))


def _egress(ctx) -> pa.Table:
    return pq.read_table(egress_file(ctx))


def _fail_codes(ctx) -> list[str]:
    with pytest.raises(ValidationFailure) as e:
        s9.run(ctx)
    b = Path(ctx.path("validation_bundle_1B"))
    assert b.is_dir() and not (b / "_passed.flag").exists(), "FAIL bundle published without flag"
    summary = json.loads((b / "s9_summary.json").read_text())
    assert summary["passed"] is False
    assert e.value.detail["failure_codes"] == summary["failure_codes"]
    return summary["failure_codes"]


@pytest.mark.parametrize("column,typ", [("lon_deg", pa.float32()), ("site_order", pa.int32()),
                                        ("merchant_id", pa.int64())])
def test_s9_wrong_column_type_is_e904(world, column, typ):
    ctx = world
    run_s7_s8(ctx)
    t = _egress(ctx)
    i = t.column_names.index(column)
    _rewrite_egress(ctx, t.set_column(i, column, t[column].cast(typ, safe=False)))
    codes = _fail_codes(ctx)
    assert "E904_EGRESS_SCHEMA_VIOLATION" in codes
    summary = json.loads((Path(ctx.path("validation_bundle_1B")) / "s9_summary.json").read_text())
    f = [x for x in summary["failures"] if x["code"] == "E904_EGRESS_SCHEMA_VIOLATION"][0]
    assert any(column in r for r in f["rows"])


def test_s9_extra_column_is_e904(world):
    ctx = world
    run_s7_s8(ctx)
    t = _egress(ctx)
    _rewrite_egress(ctx, t.append_column("tile_id", pa.array(np.zeros(t.num_rows, np.uint64))))
    assert _fail_codes(ctx) == ["E904_EGRESS_SCHEMA_VIOLATION"]


def _events_path(ctx, family) -> Path:
    return rnglog.event_dir(ctx.data_root, ctx.ids, family, ctx.config) / "part-00000.jsonl"


def _drop_event(ctx, family, pick) -> None:
    p = _events_path(ctx, family)
    lines = p.read_bytes().splitlines(keepends=True)
    rows = [json.loads(x) for x in lines]
    i = next(k for k, r in enumerate(rows) if pick(r))
    p.write_bytes(b"".join(lines[:i] + lines[i + 1:]))


@pytest.mark.parametrize("family,pick", [
    ("in_cell_jitter", lambda r: r["merchant_id"] == BIG and r["rng_counter_before_lo"] == 1),  # a rejected attempt
    ("in_cell_jitter", lambda r: r["merchant_id"] == 7 and r["site_order"] == 3),  # a site's only event
    ("in_cell_jitter", lambda r: r["merchant_id"] == 1 and r["site_order"] == 2
     and r["legal_country_iso"] == "GB" and r["rng_counter_before_lo"] == 1),  # the accepted attempt
    ("site_tile_assign", lambda r: r["merchant_id"] == 1 and r["site_order"] == 1),
], ids=["jitter-rejected-attempt", "jitter-only-event", "jitter-accepted-attempt", "site-tile-assign"])
def test_s9_removed_rng_event_is_e907(world, family, pick):
    ctx = world
    run_s7_s8(ctx)
    _drop_event(ctx, family, pick)
    assert _fail_codes(ctx) == ["E907_RNG_BUDGET_OR_COUNTERS"]


def test_s9_rng_budget_and_run_id(world):
    ctx = world
    run_s7_s8(ctx)
    p = _events_path(ctx, "in_cell_jitter")
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rows[0]["draws"] = "3"  # budget violation
    rows[1]["run_id"] = hx("another run", 32)  # an event of another run
    p.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    codes = _fail_codes(ctx)
    assert codes == ["E907_RNG_BUDGET_OR_COUNTERS"]
    summary = json.loads((Path(ctx.path("validation_bundle_1B")) / "s9_summary.json").read_text())
    rng_codes = {f["detail"].get("rng_code") for f in summary["failures"]}
    assert {"E_RNG_BUDGET_VIOLATION", "E_PATH_EMBED_MISMATCH"} <= rng_codes


def test_s9_events_under_another_run_id_are_e907(world):
    """Spec 1B 11 test: S5 events moved to another run_id's partition are missing for this run."""
    ctx = world
    run_s7_s8(ctx)
    src = _events_path(ctx, "site_tile_assign").parent
    dst = Path(str(src).replace(f"run_id={ctx.ids.run_id}", f"run_id={hx('other run', 32)}"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dst)
    assert _fail_codes(ctx) == ["E907_RNG_BUDGET_OR_COUNTERS"]


def test_s9_missing_trace_is_e907(world):
    ctx = world
    run_s7_s8(ctx)
    rnglog.trace_path(ctx.data_root, ctx.ids, ctx.config).unlink()
    assert _fail_codes(ctx) == ["E907_RNG_BUDGET_OR_COUNTERS"]


@pytest.mark.parametrize("mutate,expected", [
    ("drop_row", ["E901_ROW_MISSING"]),
    ("extra_row", ["E902_ROW_EXTRA", "E906_WRITER_SORT_VIOLATION"]),
    ("dup_row", ["E903_DUP_KEY"]),
    ("swap_rows", ["E906_WRITER_SORT_VIOLATION"]),
    ("moved_point", ["E901_ROW_MISSING"]),
])
def test_s9_parity_and_sort(world, mutate, expected):
    ctx = world
    run_s7_s8(ctx)
    t = _egress(ctx)
    n = t.num_rows
    if mutate == "drop_row":
        t = t.slice(1)
    elif mutate == "extra_row":
        extra = t.slice(0, 1).set_column(2, "site_order", pa.array([99], pa.int64())).cast(t.schema)
        t = pa.concat_tables([t, extra])
    elif mutate == "dup_row":
        t = pa.concat_tables([t.slice(0, 1), t])
    elif mutate == "swap_rows":
        t = t.take(pa.array([1, 0, *range(2, n)]))
    elif mutate == "moved_point":
        lon = t["lon_deg"].to_numpy().copy()
        lon[2] += 1e-7
        t = t.set_column(3, "lon_deg", pa.array(lon))
    _rewrite_egress(ctx, t)
    assert _fail_codes(ctx) == expected


def test_s9_geometry_outside_pixel_and_country(world):
    ctx = world
    s7.run(ctx)
    # move two sites consistently in S7 and S8 (so parity holds): one out of its pixel, one out of its country
    p = Path(ctx.path("s7_site_synthesis")) / "part-00000.parquet"
    t = pq.read_table(p)
    keys = list(zip(t["merchant_id"].to_pylist(), t["legal_country_iso"].to_pylist(), t["site_order"].to_pylist()))
    lat = t["lat_deg"].to_numpy().copy()
    lat[keys.index((1, "FR", 1))] += 0.6  # 43.5 -> 44.1: next cell up, still in FR
    lat[keys.index((1, "GB", 2))] = 52.75  # inside its cell (52..53) but above GB's 52.5 border
    pq.write_table(t.set_column(5, "lat_deg", pa.array(lat)), p)
    s8.run(ctx)
    codes = _fail_codes(ctx)
    assert "E707_POINT_OUTSIDE_PIXEL" in codes and "E608_POINT_OUTSIDE_COUNTRY" in codes
    # the last jitter events no longer reproduce the moved points either
    assert set(codes) == {"E707_POINT_OUTSIDE_PIXEL", "E608_POINT_OUTSIDE_COUNTRY", "E907_RNG_BUDGET_OR_COUNTERS"}


def test_s9_point_on_country_border_passes(tmp_path, monkeypatch):
    no_gate(monkeypatch)
    ctx = make_ctx(tmp_path / "root")
    sites = dict(SITES)
    sites[(1, "GB", 2)] = (2, 52, [(1.0, 0.5)])  # (3.0, 52.5): the polygon's corner (closed shell)
    build_world(ctx, sites=sites)
    run_s7_s8(ctx)
    s9.run(ctx)
    assert (Path(ctx.path("validation_bundle_1B")) / "_passed.flag").is_file()


def test_s9_misplaced_partition_and_stray_file(world):
    ctx = world
    run_s7_s8(ctx)
    (Path(ctx.path("site_locations")) / "parameter_hash=abc").mkdir()
    assert _fail_codes(ctx) == ["E905_PARTITION_OR_IDENTITY"]


def test_s9_run_id_coherence(world):
    ctx = world
    run_s7_s8(ctx)
    bad = RunContext(ctx.data_root, ctx.repo_root, ctx.config,
                     SegmentIds("1B", SEED, ctx.ids.parameter_hash, ctx.ids.manifest_fingerprint, hx("x", 32)),
                     ids_1a=ctx.ids_1a, extra=ctx.extra)
    res = s9.validate(bad)
    assert "E912_IDENTITY_COHERENCE" in res.failure_codes and not res.passed


def test_s9_fail_then_fix_replaces_the_flagless_bundle(world):
    ctx = world
    run_s7_s8(ctx)
    good = egress_file(ctx).read_bytes()
    t = _egress(ctx)
    _rewrite_egress(ctx, t.slice(1))
    _fail_codes(ctx)
    egress_file(ctx).write_bytes(good)
    s9.run(ctx)  # a flag-less FAIL bundle may be replaced (spec 1B 11)
    assert bundle.verify_bundle(ctx.path("validation_bundle_1B"))
    assert len(stage_lines(ctx)) == 16
    assert stage_lines(ctx)[7]["extra"] == {"flag_emitted": False}


def test_revalidate_does_not_publish_and_compares(world):
    ctx = world
    run_s7_s8(ctx)
    r = s9.revalidate(ctx)  # no bundle yet: checks only
    assert r["passed"] and r["failure_codes"] == [] and r["flag_path"] is None and not r["bundle_present"]
    assert not Path(ctx.path("validation_bundle_1B")).exists()
    s9.run(ctx)
    b = Path(ctx.path("validation_bundle_1B"))
    snapshot = {p.name: p.read_bytes() for p in b.iterdir()}
    r = s9.revalidate(ctx)
    assert r["passed"] and r["bundle_identical"] and r["flag_path"] == str(b / "_passed.flag")
    assert r["stage_log_path"] == str(ctx.path("s9_stage_log"))
    assert len(stage_lines(ctx)) == 24
    # tamper with the egress after PASS: revalidation fails and reports the stale bundle; nothing rewritten
    t = _egress(ctx)
    _rewrite_egress(ctx, t.slice(1))
    r = s9.revalidate(ctx)
    assert not r["passed"]
    assert {"E901_ROW_MISSING", "E908_BUNDLE_CONTENTS_MISSING", "E910_FLAG_BAD_OR_MISSING"} <= set(r["failure_codes"])
    assert {p.name: p.read_bytes() for p in b.iterdir()} == snapshot


# ====================================================================== one-pass proofs == the join / sort paths
def _slow_paths(m) -> None:
    """Disable every one-pass shortcut of S7/S8/S9 and the RNG checks (sort, group-by and join paths only)."""
    m.setattr(s7, "key_order", lambda *a, **k: None)
    m.setattr(s8, "key_order", lambda *a, **k: None)
    m.setattr(s9, "_parity_clean", lambda *a, **k: None)
    m.setattr(s9, "_site_tile_clean", lambda *a, **k: False)
    m.setattr(s9, "_jitter_clean", lambda *a, **k: False)
    m.setattr(rnglog, "_chains_clean", lambda *a, **k: False)
    m.setattr(rnglog, "_final_trace_row_of",
              lambda trace, rows, ev: rnglog._final_trace_row(trace.take(pa.array(rows, pa.int64()))))


def _shuffle_jitter_streams(ctx) -> None:
    """in_cell_jitter lines with whole sites reordered: every substream still chains, but the file is no longer in
    key order (the shortcuts must decline, the sort path decides)."""
    p = _events_path(ctx, "in_cell_jitter")
    lines = p.read_bytes().splitlines(keepends=True)
    rows = [json.loads(x) for x in lines]
    key = [(r["merchant_id"], r["legal_country_iso"], r["site_order"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: (-key[i][2], key[i], i))  # sites by site_order descending
    p.write_bytes(b"".join(lines[i] for i in order))


def _edit_jitter_tile(ctx) -> None:
    p = _events_path(ctx, "site_tile_assign")
    rows = [json.loads(x) for x in p.read_text().splitlines()]
    rows[2]["tile_id"] = rows[2]["tile_id"] + 1
    p.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows))


@pytest.mark.parametrize("mutate", ["none", "drop_attempt", "drop_only_event", "drop_site_tile", "tile_differs",
                                    "shuffle_jitter", "dup_row", "swap_rows", "moved_point", "drop_row"])
def test_s9_shortcuts_give_the_bundle_of_the_join_paths(world, monkeypatch, mutate):
    ctx = world
    run_s7_s8(ctx)
    if mutate == "drop_attempt":
        _drop_event(ctx, "in_cell_jitter", lambda r: r["merchant_id"] == BIG and r["rng_counter_before_lo"] == 1)
    elif mutate == "drop_only_event":
        _drop_event(ctx, "in_cell_jitter", lambda r: r["merchant_id"] == 7 and r["site_order"] == 3)
    elif mutate == "drop_site_tile":
        _drop_event(ctx, "site_tile_assign", lambda r: r["merchant_id"] == 1 and r["site_order"] == 1)
    elif mutate == "tile_differs":
        _edit_jitter_tile(ctx)
    elif mutate == "shuffle_jitter":
        _shuffle_jitter_streams(ctx)
    elif mutate in ("dup_row", "swap_rows", "moved_point", "drop_row"):
        t = _egress(ctx)
        if mutate == "dup_row":
            t = pa.concat_tables([t.slice(0, 1), t])
        elif mutate == "swap_rows":
            t = t.take(pa.array([1, 0, *range(2, t.num_rows)]))
        elif mutate == "drop_row":
            t = t.slice(1)
        else:
            lon = t["lon_deg"].to_numpy().copy()
            lon[2] += 1e-7
            t = t.set_column(3, "lon_deg", pa.array(lon))
        _rewrite_egress(ctx, t)
    fast = s9.validate(ctx)
    with monkeypatch.context() as m:
        _slow_paths(m)
        slow = s9.validate(ctx)
    assert fast.bundle_files == slow.bundle_files
    assert fast.passed == (mutate in ("none", "shuffle_jitter"))
    if mutate == "none":  # the shortcuts do apply to what S5..S8 write (else they would only cost time)
        inp = s9.load_inputs(ctx, s9._Failures(ctx.data_root))
        assert s9._site_tile_clean(inp.s7.select([*s7.KEY, "tile_id"]), inp.events["site_tile_assign"])
        assert s9._jitter_clean(inp.s7, inp.events["in_cell_jitter"], inp.bounds)
        assert s9._parity_clean(inp.s7, s9._egress_checks(ctx, inp, s9._Failures(ctx.data_root))) is not None
        for fam, ev in inp.events.items():
            assert rnglog._chains_clean(ev, ["merchant_id", "legal_country_iso", "site_order"][:3 if fam ==
                                                                                             "in_cell_jitter" else 2])


def test_s7_shortcuts_give_the_join_path_result(world, monkeypatch):
    ctx = world
    s5t = publish.read_parquet_dir(ctx.path("s5_site_tile_assignment"))
    s6t = publish.read_parquet_dir(ctx.path("s6_site_jitter"))
    cat = publish.read_parquet_dir(ctx.path("outlet_catalogue", segment="1A"))
    fast = s7.synthesise(s5t, s6t, cat, ctx.path("tile_bounds"), ctx.ids.manifest_fingerprint)
    with monkeypatch.context() as m:
        _slow_paths(m)
        slow = s7.synthesise(s5t, s6t, cat, ctx.path("tile_bounds"), ctx.ids.manifest_fingerprint)
        # shuffled inputs take the sort path either way: same result again
        perm = pa.array(np.random.default_rng(3).permutation(s5t.num_rows))
        again = s7.synthesise(s5t.take(perm), s6t.take(perm), cat, ctx.path("tile_bounds"),
                              ctx.ids.manifest_fingerprint)
    assert fast[0].equals(slow[0]) and fast[1] == slow[1]
    assert again[0].equals(slow[0]) and again[1] == slow[1]
    # a catalogue whose final_country_outlet_count disagrees is E708 on both paths (the shortcut declines)
    bad = cat.set_column(cat.schema.get_field_index("final_country_outlet_count"), "final_country_outlet_count",
                         pa.array([9] * cat.num_rows, pa.int32()))
    for patch in (False, True):
        with monkeypatch.context() as m:
            if patch:
                _slow_paths(m)
            with pytest.raises(EngineError) as e:
                s7.synthesise(s5t, s6t, bad, ctx.path("tile_bounds"), ctx.ids.manifest_fingerprint)
            assert e.value.code == "E708_1A_COVERAGE_FAIL"


def test_key_helpers_agree_with_sort_group_by_and_join():
    g = np.random.default_rng(17)
    n = 400
    base = pa.table({"merchant_id": pa.array(g.integers(0, 2 ** 64 - 1, n, dtype=np.uint64, endpoint=True)),
                     "legal_country_iso": pa.array(g.choice(["GB", "DE", "É", "US", "de"], n)),
                     "site_order": pa.array(g.integers(1, 4, n), pa.int64())})
    srt = base.take(pa.compute.sort_indices(base, sort_keys=[(k, "ascending") for k in s7.KEY]))
    dup = pa.concat_tables([srt, srt.slice(5, 3)])
    dup = dup.take(pa.compute.sort_indices(dup, sort_keys=[(k, "ascending") for k in s7.KEY]))
    nul = srt.set_column(2, "site_order", pa.array([None] + srt["site_order"].to_pylist()[1:], pa.int64()))
    dic = srt.set_column(1, "legal_country_iso", pa.compute.dictionary_encode(srt["legal_country_iso"]))
    for t in (base, srt, dup, nul, srt.slice(0, 1), srt.slice(0, 0)):
        fast = (s7.sort_by_key(t), s7.duplicate_keys(t), s8.is_sorted(t), s7.key_differences(t, srt),
                s7.key_differences(srt, t))
        import unittest.mock as um

        with um.patch.object(s7, "key_order", lambda *a, **k: None), um.patch.object(s8, "key_order",
                                                                                      lambda *a, **k: None):
            slow = (s7.sort_by_key(t), s7.duplicate_keys(t), s8.is_sorted(t), s7.key_differences(t, srt),
                    s7.key_differences(srt, t))
        assert fast[0].equals(slow[0]) and fast[1].equals(slow[1]) and fast[2] == slow[2]
        for a, b in zip(fast[3] + fast[4], slow[3] + slow[4]):
            assert a.equals(b)
    assert s7.key_order(srt) == (True, True) and s7.key_order(dup) == (True, False)
    assert s7.key_order(nul) is None and s7.key_order(dic) == (True, True)
    assert s7.same_keys(srt, dic) and not s7.same_keys(srt, dup)
    assert s7.sort_by_key(dic) is dic  # already sorted: returned as is (the Arrow sort cannot take dictionaries)

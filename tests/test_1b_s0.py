"""1B S0 gate-in: "No PASS -> no read" (spec 1B 2; 00-core 5.3; decisions 25, 27).

Tiny fixtures built in tmp_path: a hand-made 1A bundle (index.json, egress_checksums.json, _passed.flag over
them), a 1A outlet_catalogue and s3_candidate_set, a 36 x 18 ten-degree raster, a GeoJSON with three
countries and an ISO table. ``build_env`` is also used by ``test_1b_s3_s6.py``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from engine.core import bundle, publish
from engine.core.context import RunContext, SegmentIds
from engine.core.errors import GateError, InputError
from engine.core.schema import arrow_schema

REPO = Path(__file__).resolve().parents[1]
SEED = 42
FP_1A = "ab" * 32
PH_1A = "cd" * 32
RUN_1A = "ef" * 16

# countries of the fixture (10-degree cells; lon = -180 + 10 c, lat = 90 - 10 r)
POLYGONS = {
    # 3 x 2 cells (cols 18-20, rows 7-8) lying strictly inside the polygon: "interior" tiles
    "AA": [[(-0.5, -0.5), (30.5, -0.5), (30.5, 20.5), (-0.5, 20.5), (-0.5, -0.5)]],
    # a triangle over cols 21-23, rows 5-7 with a hole: tiles whose centre is inside, partly outside
    "BB": [[(30.0, 10.0), (60.0, 10.0), (30.0, 40.0), (30.0, 10.0)],
           [(33.0, 13.0), (36.0, 13.0), (33.0, 16.0), (33.0, 13.0)]],
    # a sliver inside cell (row 4, col 28): acceptance 1e-12 per attempt
    "SL": [[(100.0, 40.0), (100.00001, 40.0), (100.00001, 40.00001), (100.0, 40.00001), (100.0, 40.0)]],
}
NCOLS, NROWS = 36, 18


def write_geojson(path: Path, polygons=POLYGONS) -> None:
    feats = [{"type": "Feature", "properties": {"ISO_A2": iso},
              "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring] for ring in rings]}}
             for iso, rings in polygons.items()]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def write_raster(path: Path) -> None:
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(path, "w", driver="GTiff", width=NCOLS, height=NROWS, count=1, dtype="float32",
                       crs="EPSG:4326", transform=Affine(10.0, 0.0, -180.0, 0.0, -10.0, 90.0), nodata=-1.0) as ds:
        ds.write(np.arange(NCOLS * NROWS, dtype=np.float32).reshape(1, NROWS, NCOLS))


def catalogue_table(counts: dict[tuple[int, str], int], fp=FP_1A, seed=SEED) -> pa.Table:
    rows = {k: [] for k in ("manifest_fingerprint", "merchant_id", "site_id", "home_country_iso", "legal_country_iso",
                            "single_vs_multi_flag", "raw_nb_outlet_draw", "final_country_outlet_count", "site_order",
                            "global_seed")}
    tot = {}
    for (m, _), n in counts.items():
        tot[m] = tot.get(m, 0) + n
    for (m, iso), n in sorted(counts.items()):
        for s in range(1, n + 1):
            rows["manifest_fingerprint"].append(fp)
            rows["merchant_id"].append(m)
            rows["site_id"].append(f"{s:06d}")
            rows["home_country_iso"].append(iso)
            rows["legal_country_iso"].append(iso)
            rows["single_vs_multi_flag"].append(tot[m] > 1)
            rows["raw_nb_outlet_draw"].append(tot[m])
            rows["final_country_outlet_count"].append(n)
            rows["site_order"].append(s)
            rows["global_seed"].append(seed)
    return pa.table(rows, schema=arrow_schema("schemas/1A/outlet_catalogue.schema.json"))


DEFAULT_COUNTS = {(1, "AA"): 3, (1, "BB"): 2, (2, "AA"): 5, (3, "BB"): 7, (2**63 + 5, "AA"): 1}


def make_ctx(root: Path, config: dict) -> RunContext:
    from engine.core import identities

    ids1a = SegmentIds("1A", SEED, PH_1A, FP_1A, RUN_1A)
    r = identities.resolve_1b(config, REPO, ids1a, None)
    return RunContext(root, REPO, config, r.ids, ids_1a=ids1a,
                      extra={"grid_hash": r.grid_hash, "weights_hash": r.weights_hash,
                             "code_digest": r.code_digest_hex, "git_commit": None})


def build_env(root: Path, counts=None, *, passed=True, catalogue: pa.Table | None = None,
              policy_text: str | None = None) -> RunContext:
    """A data root with a PASSed 1A bundle over a tiny outlet_catalogue, plus configured 1B inputs."""
    root.mkdir(parents=True, exist_ok=True)
    ref = root / "ref"
    ref.mkdir(exist_ok=True)
    write_geojson(ref / "countries.geojson")
    write_raster(ref / "population.tif")
    pq_iso = ref / "iso.parquet"
    publish.write_parquet(pa.table({"country_iso": sorted(POLYGONS) + ["ZZ"]}), pq_iso)
    pol = ref / "policy.s6.jitter.yaml"
    if policy_text is None:
        shutil.copyfile(REPO / "config/policy/1b/policy.s6.jitter.yaml", pol)
    else:
        pol.write_text(policy_text)
    config = {
        "seed": SEED,
        "segment1a": {"inputs": {"iso_table": str(pq_iso)}, "parameters": {}, "options": {}},
        "segment1b": {"inputs": {"world_countries": str(ref / "countries.geojson"),
                                 "population_raster": str(ref / "population.tif")},
                      "parameters": {"policy.s6.jitter.yaml": str(pol)},
                      "options": {"basis": "uniform", "dp": 6}},
    }
    ctx = make_ctx(root, config)
    # 1A outputs
    cat = catalogue if catalogue is not None else catalogue_table(counts or DEFAULT_COUNTS)
    cat_dir = Path(ctx.path("outlet_catalogue", segment="1A"))
    with publish.staged(cat_dir, "X") as tmp:
        publish.write_parquet(cat, Path(tmp) / "part-00000.parquet")
    cand_dir = Path(ctx.path("s3_candidate_set", segment="1A"))
    with publish.staged(cand_dir, "X") as tmp:
        publish.write_parquet(pa.table({"merchant_id": pa.array([1], pa.uint64()), "country_iso": ["AA"],
                                        "candidate_rank": pa.array([0], pa.int32())}), Path(tmp) / "part-00000.parquet")
    part = cat_dir / "part-00000.parquet"
    b = part.read_bytes()
    checks = {"dataset_id": "outlet_catalogue", "seed": SEED, "manifest_fingerprint": FP_1A,
              "files": [{"path": part.relative_to(root).as_posix(), "sha256_hex": hashlib.sha256(b).hexdigest(),
                         "size_bytes": len(b)}],
              "composite_sha256_hex": hashlib.sha256(b).hexdigest()}
    bundle.write_bundle(ctx.path("validation_bundle_1A", segment="1A"),
                        {"MANIFEST.json": {"version": "1A.validation.v1", "manifest_fingerprint": FP_1A},
                         "egress_checksums.json": checks}, passed=passed)
    return ctx


def out_1b(root: Path) -> Path:
    return root / "data" / "layer1" / "1B"


# ======================================================================================== tests
@pytest.fixture(autouse=True, scope="module")
def frozen_code_digest():
    """The code digest read once per module: other work on the engine's files while the tests run must not
    move the 1B fingerprint between the fixture's planning and S0's re-resolution (E_ARTIFACT_RACE)."""
    from engine.core import identities

    digest = identities.code_digest(REPO)
    mp = pytest.MonkeyPatch()
    mp.setattr(identities, "code_digest", lambda root: digest)
    yield digest
    mp.undo()


@pytest.fixture()
def env(tmp_path):
    return build_env(tmp_path / "run")


def _gate_error(ctx) -> GateError:
    from engine.segment1b import s0_gate

    with pytest.raises(GateError) as ei:
        s0_gate.run(ctx)
    msg = str(ei.value)
    assert msg.startswith("No PASS -> no read:"), msg
    assert str(s0_gate.bundle_dir_1a(ctx)) in msg  # names the bundle path (decision 27)
    assert not out_1b(ctx.data_root).exists()  # nothing written
    return ei.value


def test_pass_publishes_receipt_and_sealed_inputs(env):
    from engine.segment1b import s0_gate

    assert not s0_gate.verified_receipt_exists(env)
    s0_gate.run(env)
    rec = json.loads(s0_gate.receipt_path(env).read_bytes())
    flag = (Path(env.path("validation_bundle_1A", segment="1A")) / "_passed.flag").read_text()
    assert flag == f"sha256_hex = {rec['flag_sha256_hex']}\n"
    assert rec["upstream_1A"] == {"seed": SEED, "parameter_hash": PH_1A, "manifest_fingerprint": FP_1A,
                                  "run_id": RUN_1A}
    assert rec["manifest_fingerprint"] == env.ids.manifest_fingerprint != FP_1A
    assert rec["outlet_catalogue"]["rows"] == sum(DEFAULT_COUNTS.values())
    assert "verified_at_utc" not in json.dumps(rec) and "ts_utc" not in json.dumps(rec)
    sealed = json.loads((Path(env.path("sealed_inputs_1B")) / "sealed_inputs_1B.json").read_bytes())
    ids = [r["asset_id"] for r in sealed]
    assert ids == sorted(ids)
    for want in ("outlet_catalogue", "validation_bundle_1A", "s3_candidate_set", "world_countries",
                 "population_raster", "policy.s6.jitter.yaml", "iso_table", "1A.manifest_fingerprint"):
        assert want in ids
    pol = next(r for r in sealed if r["asset_id"] == "policy.s6.jitter.yaml")
    assert pol["sha256_hex"] == hashlib.sha256(Path(env.config["segment1b"]["parameters"]["policy.s6.jitter.yaml"])
                                               .read_bytes()).hexdigest()
    assert s0_gate.verified_receipt_exists(env)
    assert s0_gate.require_receipt(env)["flag_sha256_hex"] == rec["flag_sha256_hex"]


def test_rerun_is_byte_identical_noop(env):
    from engine.segment1b import s0_gate

    s0_gate.run(env)
    p = s0_gate.receipt_path(env)
    before = p.read_bytes(), p.stat().st_mtime_ns
    s0_gate.run(env)
    assert (p.read_bytes(), p.stat().st_mtime_ns) == before


def test_missing_flag_stops_with_named_error(tmp_path):
    ctx = build_env(tmp_path / "run", passed=False)
    assert _gate_error(ctx).code == "E_PASS_MISSING"


def test_wrong_flag_digest_stops(env):
    flag = Path(env.path("validation_bundle_1A", segment="1A")) / "_passed.flag"
    flag.write_text("sha256_hex = " + "0" * 64 + "\n")
    e = _gate_error(env)
    assert e.code == "E_FLAG_HASH_MISMATCH"


def test_flag_with_uppercase_hex_is_format_error(env):
    flag = Path(env.path("validation_bundle_1A", segment="1A")) / "_passed.flag"
    flag.write_text(flag.read_text().upper().replace("SHA256_HEX", "sha256_hex"))
    assert _gate_error(env).code == "E_FLAG_FORMAT_INVALID"


def test_missing_bundle_and_unlisted_file(tmp_path):
    ctx = build_env(tmp_path / "a")
    (Path(ctx.path("validation_bundle_1A", segment="1A")) / "extra.txt").write_text("x")
    assert _gate_error(ctx).code == "E_INDEX_INVALID"
    ctx2 = build_env(tmp_path / "b")
    shutil.rmtree(ctx2.path("validation_bundle_1A", segment="1A"))
    assert _gate_error(ctx2).code == "E_BUNDLE_MISSING"


def test_one_changed_catalogue_byte_stops(env):
    part = Path(env.path("outlet_catalogue", segment="1A")) / "part-00000.parquet"
    b = bytearray(part.read_bytes())
    b[len(b) // 2] ^= 0x01
    part.write_bytes(bytes(b))
    e = _gate_error(env)
    assert e.code == "E_FLAG_HASH_MISMATCH" and e.detail.get("check") == "egress_checksums"
    assert any("bytes changed" in r for r in e.rows)


def test_missing_catalogue_is_misplaced(env):
    shutil.rmtree(env.path("outlet_catalogue", segment="1A"))
    assert _gate_error(env).code == "E_PARTITION_MISPLACED"


def test_wrong_embedded_seed_stops(tmp_path):
    bad = catalogue_table({(1, "AA"): 2}, seed=SEED + 1)  # validated by a (bad) 1A, but seed != path token
    ctx = build_env(tmp_path / "run", catalogue=bad)
    assert _gate_error(ctx).code == "E_PATH_EMBED_MISMATCH"


def test_validation_bundle_override(tmp_path):
    ctx = build_env(tmp_path / "run")
    from engine.segment1b import s0_gate

    moved = tmp_path / "elsewhere"
    shutil.move(str(ctx.path("validation_bundle_1A", segment="1A")), moved)
    assert _gate_error(ctx).code == "E_BUNDLE_MISSING"
    cfg = json.loads(json.dumps(ctx.config))
    cfg["segment1b"]["options"]["validation_bundle"] = str(moved)
    ctx2 = make_ctx(ctx.data_root, cfg)
    s0_gate.run(ctx2)
    assert s0_gate.verified_receipt_exists(ctx2)


def test_downstream_gate_without_receipt(env):
    from engine.segment1b import s0_gate, s3_requirements

    with pytest.raises(GateError) as ei:
        s3_requirements.run(env)
    assert ei.value.code == "E301_NO_PASS_FLAG" and str(ei.value).startswith("No PASS -> no read:")
    with pytest.raises(GateError):
        s0_gate.run_rng_anchor(env)


def test_receipt_schema_and_identity_checks(env):
    from engine.segment1b import s0_gate

    s0_gate.run(env)
    p = s0_gate.receipt_path(env)
    rec = json.loads(p.read_bytes())
    rec["upstream_1A"]["seed"] = SEED + 1
    p.write_text(json.dumps(rec))
    with pytest.raises(GateError) as ei:
        s0_gate.require_receipt(env)
    assert ei.value.code == "E301_NO_PASS_FLAG"
    rec.pop("flag_sha256_hex")
    p.write_text(json.dumps(rec))
    with pytest.raises(GateError) as ei:
        s0_gate.require_receipt(env)
    assert ei.value.code == "E_RECEIPT_SCHEMA_INVALID"
    assert not s0_gate.verified_receipt_exists(env)


def test_catalogue_changed_after_gate_is_refused(env):
    from engine.segment1b import s0_gate

    s0_gate.run(env)
    part = Path(env.path("outlet_catalogue", segment="1A")) / "part-00000.parquet"
    publish_tbl = catalogue_table({(1, "AA"): 4})
    part.unlink()
    publish.write_parquet(publish_tbl, part)
    with pytest.raises(GateError) as ei:
        s0_gate.read_catalogue(env, ["merchant_id"])
    assert ei.value.code == "E301_NO_PASS_FLAG"


def test_missing_reference_file(env):
    from engine.segment1b import s0_gate

    Path(env.config["segment1a"]["inputs"]["iso_table"]).unlink()
    with pytest.raises(InputError) as ei:
        s0_gate.run(env)
    assert ei.value.code == "E_REFERENCE_SURFACE_MISSING"
    assert not out_1b(env.data_root).exists()


def test_rng_anchor_writes_audit_row_once(env):
    from engine.core import rnglog
    from engine.segment1b import s0_gate

    s0_gate.run(env)
    s0_gate.run_rng_anchor(env)
    s0_gate.run_rng_anchor(env)
    rows = rnglog.read_audit(env.data_root, env.ids, env.config)
    assert len(rows) == 1
    row = rows[0]
    assert row["run_id"] == env.ids.run_id and row["manifest_fingerprint"] == env.ids.manifest_fingerprint
    assert row["algorithm"] == "philox2x64-10" and row["build_commit"] == env.extra["code_digest"]
    assert "/rng/audit/" in str(rnglog.audit_path(env.data_root, env.ids, env.config))

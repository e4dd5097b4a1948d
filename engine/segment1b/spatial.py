"""Spatial inputs of segment 1B: the country polygons and the raster grid (1B spec §3, §4).

Two reference surfaces feed 1B S1/S2 (and S6 for the point-in-country test):

* ``world_countries``: ISO alpha-2 keyed (multi)polygons in a geographic CRS. The embedded default is a
  GeoPackage (``reference/spatial/world_countries/world_countries.gpkg``); any file fiona can read
  (GeoPackage, shapefile, GeoJSON, ``zip://...``) or a GeoParquet file (WKB geometry column) can replace it.
  The ISO column is the first present of :data:`ISO_COLUMNS`. A plain GeoPackage is read in bulk (sqlite3 and
  ``shapely.from_wkb``, :func:`_read_gpkg`: the same geometries as through fiona), anything else through fiona.
* ``population_raster``: any GeoTIFF (or other GDAL raster) on a regular, north-up, geographic lat/lon grid.
  Its grid defines the tiles (S1); its values are the ``population`` mass basis (S2).

Inside-country predicate (decision 24, used by S1's rasterizer and offered to S6/S9 through
:meth:`CountryShape.contains_points`): a point is inside a country iff, for some polygon part, it lies in
the *closed* shell (boundary counts inside) and in no *closed* hole (a hole's boundary counts outside).

Antimeridian: a ring with an edge that jumps more than 180 degrees of longitude (other than an edge running
from x = -180 to x = +180, the rim of a polar cap in plate carree) is "wrapped"; such a part is unwrapped
(negative longitudes + 360), cut at 180 and its eastern piece shifted back by -360 (spec §3). Parts already
cut at +-180 (Natural Earth) or spanning the whole width without a jump (Antarctica) are used as they are; a
part with longitudes beyond +-180 is cut and shifted likewise. (The spec's literal "extent > 180 degrees"
test would wrongly unwrap Antarctica, hence the edge-jump test.)

Errors (spec §3): ``E001_GEO_INVALID`` (invalid/empty/non-polygon geometry), ``E005_ISO_FK`` (a country code
that is not an ISO alpha-2 code, or not in the ISO table), ``E007_CRS_MISMATCH`` (not geographic),
``E002_RASTER_MISMATCH`` (not north-up / unreadable grid), ``E004_BOUNDS`` (grid outside lon/lat range),
``E_REFERENCE_SURFACE_MISSING`` (file absent or unreadable).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from engine.core.errors import InputError
from engine.core.progress import Progress

# WGS84 (spec §3 pixel_area_m2)
WGS84_A = 6378137.0
WGS84_F = 1.0 / 298.257223563
WGS84_E2 = WGS84_F * (2.0 - WGS84_F)
WGS84_E = math.sqrt(WGS84_E2)
WGS84_B = WGS84_A * (1.0 - WGS84_F)

ISO_COLUMNS = ("country_iso", "ISO_A2_EH", "ISO_A2", "iso_a2", "iso")
_ISO_RE = re.compile(r"^[A-Z]{2}$")
_GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")
PAIRS_FROM_PARTS = 100  # CountryShape.contains_points(indexed=True): grid index above this many parts


# --------------------------------------------------------------------------------------------------
# Raster grid
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Grid:
    """A regular north-up lat/lon grid (spec §3 grid law).

    ``transform`` is the affine ``(a, b, c, d, e, f)`` in rasterio order: ``lon = c + col*a``,
    ``lat = f + row*e`` (``b = d = 0``, ``a > 0``, ``e < 0``). Rows run top to bottom, columns left to right,
    ``tile_id = row * width + col``.
    """

    width: int
    height: int
    transform: tuple[float, float, float, float, float, float]
    crs_wkt: str = ""
    nodata: float | None = None

    @property
    def a(self) -> float:
        return float(self.transform[0])

    @property
    def e(self) -> float:
        return float(self.transform[4])

    @property
    def c0(self) -> float:
        return float(self.transform[2])

    @property
    def f0(self) -> float:
        return float(self.transform[5])

    # Edges/centres: the spec's formulas, evaluated once per column / row and gathered per tile.
    def lon_left(self) -> np.ndarray:
        return self.c0 + np.arange(self.width, dtype=np.float64) * self.a

    def lon_right(self) -> np.ndarray:
        return self.lon_left() + self.a

    def lat_top(self) -> np.ndarray:
        return self.f0 + np.arange(self.height, dtype=np.float64) * self.e

    def lat_bottom(self) -> np.ndarray:
        return self.lat_top() + self.e

    def lon_centres(self) -> np.ndarray:
        """Cell-centre longitudes (midpoint of the edges, spec §3); also the S1 inclusion test points."""
        return (self.lon_left() + self.lon_right()) * 0.5

    def lat_centres(self) -> np.ndarray:
        return (self.lat_top() + self.lat_bottom()) * 0.5

    def row_areas_m2(self) -> np.ndarray:
        """Ellipsoidal (WGS84) area of one cell of each row, m^2 (spec §3 closed form).

        ``A(r) = b^2 * dlon * [g(phi_top) - g(phi_bot)]``, ``g(phi) = sin(phi)/(2(1-e^2 sin^2 phi)) +
        atanh(e sin(phi))/(2e)``: the exact area of an ellipsoidal zone between two parallels times
        ``dlon / 2pi`` (equivalently ``a^2 dlon/2 [q(phi_top) - q(phi_bot)]`` with the authalic ``q``).
        Latitudes are clamped to +-90 so an edge a hair beyond the pole does not produce NaN.
        """
        top = np.clip(self.lat_top(), -90.0, 90.0)
        bot = np.clip(self.lat_bottom(), -90.0, 90.0)
        return zone_cell_area_m2(top, bot, abs(self.a))

    def validate(self, path: str | Path | None = None) -> None:
        """Grid-law checks (spec §3): north-up, positive sizes, centres within lon/lat range."""
        a, b, c, d, e, f = self.transform
        if b != 0 or d != 0 or not (a > 0) or not (e < 0):
            raise InputError(
                "E002_RASTER_MISMATCH",
                "raster is not a north-up lat/lon grid (need b = d = 0, a > 0, e < 0)",
                path=path,
                detail={"transform": [a, b, c, d, e, f]},
            )
        if self.width <= 0 or self.height <= 0:
            raise InputError("E002_RASTER_MISMATCH", "raster has no cells", path=path)
        lon = self.lon_centres()
        lat = self.lat_centres()
        bad = []
        if lon[0] < -180.0 or lon[-1] > 180.0:
            bad.append(f"cell-centre longitudes span [{lon[0]!r}, {lon[-1]!r}], outside [-180, 180]")
        if lat[-1] < -90.0 or lat[0] > 90.0:
            bad.append(f"cell-centre latitudes span [{lat[-1]!r}, {lat[0]!r}], outside [-90, 90]")
        # edges may overshoot by less than one cell (e.g. WorldPop's -180.00125 origin), never more
        if self.lon_left()[0] < -180.0 - a or self.lon_right()[-1] > 180.0 + a:
            bad.append("cell edges extend more than one cell beyond +-180 degrees longitude")
        if self.lat_top()[0] > 90.0 - e or self.lat_bottom()[-1] < -90.0 + e:
            bad.append("cell edges extend more than one cell beyond +-90 degrees latitude")
        if bad:
            raise InputError(
                "E004_BOUNDS",
                "raster grid lies outside the geographic lon/lat range (a 0..360 grid is not supported: "
                "re-grid it to -180..180)",
                path=path,
                rows=bad,
            )
        areas = self.row_areas_m2()
        if not np.all(areas > 0):
            r = int(np.flatnonzero(~(areas > 0))[0])
            raise InputError("E006_AREA_NONPOS", "non-positive cell area", path=path, rows=[f"row {r}"])

    def definition(self) -> dict:
        """What ``grid_hash`` covers of the raster (decision 13): dimensions, transform, CRS - not values."""
        return {
            "width": int(self.width),
            "height": int(self.height),
            "transform": [float(v) for v in self.transform],
            "crs_wkt": self.crs_wkt,
        }


def zone_cell_area_m2(lat_top_deg, lat_bot_deg, dlon_deg: float) -> np.ndarray:
    """WGS84 area (m^2) of lat/lon cells ``dlon_deg`` wide between the given parallels (vectorised).

    ``b^2 dlon [g(phi2) - g(phi1)]`` evaluated without cancellation (a thin cell next to a pole would lose
    8 digits subtracting two ``g`` values near 1): with ``ds = sin phi2 - sin phi1 = 2 cos(mean) sin(half
    difference)``, ``g2 - g1 = ds (1 + e^2 s1 s2) / (2 (1 - e^2 s1^2)(1 - e^2 s2^2)) + atanh(e ds / (1 - e^2 s1 s2)) / (2e)``.
    """
    e = WGS84_E
    e2 = WGS84_E2
    p2 = np.radians(np.asarray(lat_top_deg, dtype=np.float64))
    p1 = np.radians(np.asarray(lat_bot_deg, dtype=np.float64))
    s1, s2 = np.sin(p1), np.sin(p2)
    ds = 2.0 * np.cos(0.5 * (p1 + p2)) * np.sin(0.5 * (p2 - p1))
    dg = ds * (1.0 + e2 * s1 * s2) / (2.0 * (1.0 - e2 * s1 * s1) * (1.0 - e2 * s2 * s2)) \
        + np.arctanh(e * ds / (1.0 - e2 * s1 * s2)) / (2.0 * e)
    return np.abs(WGS84_B * WGS84_B * math.radians(dlon_deg) * dg)


def _is_geographic(crs_like) -> bool:
    try:
        from pyproj import CRS

        return bool(CRS.from_user_input(crs_like).is_geographic)
    except Exception:  # noqa: BLE001 - an unparsable CRS is treated as "not geographic"
        return False


def read_grid(path: str | Path) -> Grid:
    """Grid definition of a raster (no pixel values read); validated (E002/E004/E006/E007)."""
    import rasterio

    p = Path(path)
    if not p.exists():
        raise InputError("E_REFERENCE_SURFACE_MISSING", "population raster not found", path=p)
    try:
        with rasterio.open(p) as ds:
            t = ds.transform
            crs = ds.crs
            grid = Grid(
                width=int(ds.width),
                height=int(ds.height),
                transform=(float(t.a), float(t.b), float(t.c), float(t.d), float(t.e), float(t.f)),
                crs_wkt=crs.to_wkt() if crs is not None else "",
                nodata=None if ds.nodata is None else float(ds.nodata),
            )
            count = ds.count
    except InputError:
        raise
    except Exception as ex:  # noqa: BLE001 - rasterio raises many types
        raise InputError("E002_RASTER_MISMATCH", f"cannot read raster: {ex}", path=p) from ex
    if count < 1:
        raise InputError("E002_RASTER_MISMATCH", "raster has no band", path=p)
    if not grid.crs_wkt or not _is_geographic(grid.crs_wkt):
        raise InputError(
            "E007_CRS_MISMATCH",
            "raster CRS is missing or not geographic (a lat/lon grid such as EPSG:4326 is required)",
            path=p,
            detail={"crs": grid.crs_wkt[:200]},
        )
    grid.validate(p)
    return grid


class RasterWindows:
    """Window reads of band 1 (``with RasterWindows(path) as rw: rw.read(r0, r1, c0, c1)``).

    Returns the values exactly as stored (the band's own dtype) plus the NODATA value (``rw.nodata``);
    the caller decides what NODATA means (S2: mass 0).
    """

    def __init__(self, path: str | Path):
        import rasterio

        self.path = Path(path)
        if not self.path.exists():
            raise InputError("E_REFERENCE_SURFACE_MISSING", "population raster not found", path=self.path)
        # every block is read once (S2 reads block-aligned row bands): a small GDAL block cache keeps the
        # resident memory of a 30" raster pass at tens of MB instead of GDAL's default 5% of RAM
        self._env = rasterio.Env(GDAL_CACHEMAX=64)
        self._env.__enter__()
        self._ds = rasterio.open(self.path)
        self.nodata = None if self._ds.nodata is None else float(self._ds.nodata)
        self.width = int(self._ds.width)
        self.height = int(self._ds.height)
        self.block_height = int(self._ds.block_shapes[0][0])

    def read(self, row0: int, row1: int, col0: int, col1: int) -> np.ndarray:
        from rasterio.windows import Window

        if not (0 <= row0 <= row1 <= self.height and 0 <= col0 <= col1 <= self.width):
            raise InputError(
                "E002_RASTER_MISMATCH",
                "window outside the raster",
                path=self.path,
                detail={"rows": [row0, row1], "cols": [col0, col1], "shape": [self.height, self.width]},
            )
        return self._ds.read(1, window=Window(col0, row0, col1 - col0, row1 - row0))

    def close(self) -> None:
        self._ds.close()
        if self._env is not None:
            self._env.__exit__(None, None, None)
            self._env = None

    def __enter__(self) -> "RasterWindows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Country polygons
# --------------------------------------------------------------------------------------------------


def _polygon_parts(geom) -> list[Polygon]:
    if isinstance(geom, Polygon):
        return [geom] if not geom.is_empty else []
    if isinstance(geom, MultiPolygon):
        return [g for g in geom.geoms if not g.is_empty]
    if geom.geom_type == "GeometryCollection":
        out: list[Polygon] = []
        for g in geom.geoms:
            out.extend(_polygon_parts(g) if g.geom_type in ("Polygon", "MultiPolygon", "GeometryCollection") else [])
        return out
    return []


def _ring_is_wrapped(coords: np.ndarray) -> bool:
    """An edge jumping more than 180 degrees of longitude, other than one running between the two
    antimeridian lines (x = -180 and x = +180: the edge of a polar cap drawn in plate carree)."""
    if coords.shape[0] < 2:
        return False
    x0, x1 = coords[:-1, 0], coords[1:, 0]
    jump = np.abs(x1 - x0) > 180.0
    on_lines = (np.abs(x0) == 180.0) & (np.abs(x1) == 180.0)
    return bool(np.any(jump & ~on_lines))


def _shift(geom, dx: float):
    return shapely.transform(geom, lambda c: c + np.array([dx, 0.0]))


def normalise_part(part: Polygon) -> list[Polygon]:
    """Antimeridian handling of one polygon part (module docstring): pieces within [-180, 180]."""
    rings = [np.asarray(part.exterior.coords)] + [np.asarray(r.coords) for r in part.interiors]
    geom = part
    if any(_ring_is_wrapped(r) for r in rings):
        # unwrap: negative longitudes + 360 puts the part on a continuous 0..360 longitude axis
        geom = shapely.transform(part, lambda c: np.column_stack([np.where(c[:, 0] < 0, c[:, 0] + 360.0, c[:, 0]), c[:, 1]]))
        geom = shapely.make_valid(geom) if not geom.is_valid else geom
    minx, _, maxx, _ = geom.bounds
    if minx >= -180.0 and maxx <= 180.0:
        return _polygon_parts(geom)
    pieces: list[Polygon] = []
    for lo, hi, dx in ((-540.0, -180.0, 360.0), (-180.0, 180.0, 0.0), (180.0, 540.0, -360.0)):
        if maxx <= lo or minx >= hi:
            continue
        piece = geom.intersection(box(lo, -90.0, hi, 90.0))
        if dx:
            piece = _shift(piece, dx)
        pieces.extend(p for p in _polygon_parts(piece) if p.area > 0)
    return pieces


def normalise_parts(parts: list[Polygon]) -> list[Polygon]:
    """:func:`normalise_part` of every part, concatenated in order. The common case -- no wrapped ring and
    bounds within [-180, 180], where a part is kept as it is -- is decided for all parts at once (one pass over
    their coordinates instead of one per ring); only the other parts go through :func:`normalise_part`."""
    if not parts:
        return []
    arr = np.empty(len(parts), dtype=object)
    arr[:] = parts
    rings, ring_part = shapely.get_rings(arr, return_index=True)
    xy, ring_of = shapely.get_coordinates(rings, return_index=True)
    wrapped = np.zeros(len(parts), dtype=bool)
    if xy.shape[0] > 1:
        x0, x1 = xy[:-1, 0], xy[1:, 0]
        # the edges of _ring_is_wrapped: consecutive vertices of one ring
        jump = (ring_of[1:] == ring_of[:-1]) & (np.abs(x1 - x0) > 180.0) \
            & ~((np.abs(x0) == 180.0) & (np.abs(x1) == 180.0))
        wrapped[ring_part[ring_of[1:][jump]]] = True
    b = shapely.bounds(arr)
    plain = ~wrapped & (b[:, 0] >= -180.0) & (b[:, 2] <= 180.0)
    out: list[Polygon] = []
    for i, p in enumerate(parts):
        if plain[i]:
            out.append(p)  # normalise_part returns _polygon_parts(p) = [p] for a non-empty Polygon
        else:
            out.extend(normalise_part(p))
    return out


class CountryShape:
    """One country's polygon parts (after antimeridian normalisation) and the decision-24 predicate."""

    def __init__(self, iso: str, geometry):
        self.iso = iso
        self.geometry = geometry
        self.parts: list[Polygon] = normalise_parts(_polygon_parts(geometry))
        self._prepared = None
        self._pairs = None

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        b = np.array([p.bounds for p in self.parts], dtype=np.float64)
        return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))

    def _prep(self):
        """Per part ``(bounds, prepared shell polygon, prepared union of the hole polygons or None)``, built
        for all parts at once (shells from the exterior rings, holes from the interior rings: the same
        coordinates as ``Polygon(ring.coords)``)."""
        if self._prepared is None:
            prepared = []
            if self.parts:
                arr = np.empty(len(self.parts), dtype=object)
                arr[:] = self.parts
                shells = shapely.polygons(shapely.get_exterior_ring(arr))
                shapely.prepare(shells)
                nint = shapely.get_num_interior_rings(arr)
                bounds = shapely.bounds(arr)
                for i in range(arr.shape[0]):
                    hole_geom = None
                    if nint[i]:
                        holes = shapely.polygons(shapely.get_interior_ring(arr[i], np.arange(nint[i])))
                        hole_geom = shapely.union_all(holes)
                        shapely.prepare(hole_geom)
                    prepared.append((tuple(float(v) for v in bounds[i]), shells[i], hole_geom))
            self._prepared = prepared
        return self._prepared

    def _pair_index(self):
        """Grid index of the parts' bounding boxes, the arguments of
        :func:`engine.segment1b._spatial_kernels.bbox_pairs` after the points (built once; None when a part's
        bounds are not finite: the loop is used then)."""
        if self._pairs is None:
            from engine.segment1b._spatial_kernels import grid_index

            b = np.array([t[0] for t in self._prep()], dtype=np.float64).reshape(-1, 4)
            if b.shape[0] == 0 or not np.isfinite(b).all():
                self._pairs = False
                return None
            pminx, pminy, pmaxx, pmaxy = (np.ascontiguousarray(b[:, k]) for k in range(4))
            x0, y0, x1, y1 = float(pminx.min()), float(pminy.min()), float(pmaxx.max()), float(pmaxy.max())
            g = int(min(64, 2 * math.ceil(math.sqrt(b.shape[0]))))
            sx = (x1 - x0) / g if x1 > x0 else 1.0
            sy = (y1 - y0) / g if y1 > y0 else 1.0
            start, parts = grid_index(pminx, pminy, pmaxx, pmaxy, x0, y0, sx, sy, g, g)
            self._pairs = (pminx, pminy, pmaxx, pmaxy, start, parts, x0, y0, x1, y1, sx, sy, g, g)
        return self._pairs or None

    def contains_points(self, lon, lat, indexed: bool = False) -> np.ndarray:
        """Decision-24 predicate, vectorised: closed shell minus closed holes, OR over parts.

        Longitudes are compared as given (callers normalise into [-180, 180] first, as S1 does). A point is
        tested against the parts whose closed bounding box holds it (no other part can contain it), part after
        part; a point found inside is not tested again. By default every part filters all points (no numba);
        ``indexed=True`` (for callers that already run numba kernels, e.g. S6) gives countries of more than
        :data:`PAIRS_FROM_PARTS` parts the points of each part's box from a grid index
        (:mod:`engine.segment1b._spatial_kernels`), so the work no longer grows with points x parts. Same result.
        """
        x = np.asarray(lon, dtype=np.float64)
        y = np.asarray(lat, dtype=np.float64)
        out = np.zeros(x.shape, dtype=bool)
        prep = self._prep()
        idx = self._pair_index() if indexed and len(prep) > PAIRS_FROM_PARTS and x.ndim == 1 and x.shape[0] \
            and y.shape == x.shape else None
        if idx is not None:
            from engine.segment1b._spatial_kernels import bbox_pairs

            xc, yc = np.ascontiguousarray(x), np.ascontiguousarray(y)
            pstart, pts = bbox_pairs(xc, yc, *idx)
            for p in np.flatnonzero(pstart[1:] > pstart[:-1]).tolist():
                _, shell, holes = prep[p]
                sel = pts[pstart[p]:pstart[p + 1]]
                sel = sel[~out[sel]]  # points already inside an earlier part are settled
                if sel.size == 0:
                    continue
                xi, yi = xc[sel], yc[sel]
                inside = shapely.intersects_xy(shell, xi, yi)  # closed shell: boundary counts inside
                if holes is not None and inside.any():
                    inside &= ~shapely.intersects_xy(holes, xi, yi)  # closed hole: its boundary is outside
                out[sel[inside]] = True
            return out
        for (minx, miny, maxx, maxy), shell, holes in prep:
            cand = (x >= minx) & (x <= maxx) & (y >= miny) & (y <= maxy) & ~out
            if not cand.any():
                continue
            xi, yi = x[cand], y[cand]
            inside = shapely.intersects_xy(shell, xi, yi)  # closed shell: boundary counts inside
            if holes is not None and inside.any():
                inside &= ~shapely.intersects_xy(holes, xi, yi)  # closed hole: its boundary is outside
            out[cand] = inside
        return out


def _read_geoparquet(p: Path, iso_column: str | None):
    import json

    import pyarrow.parquet as pq

    pf = pq.ParquetFile(p)
    meta = pf.schema_arrow.metadata or {}
    geo = json.loads(meta[b"geo"]) if b"geo" in meta else {}
    geom_col = geo.get("primary_column")
    names = pf.schema_arrow.names
    if geom_col is None:
        geom_col = next((c for c in ("geometry", "geom", "wkb_geometry") if c in names), None)
    crs = None
    if geo:
        crs = (geo.get("columns", {}).get(geom_col, {}) or {}).get("crs")
    iso_col = iso_column or next((c for c in ISO_COLUMNS if c in names), None)
    if geom_col is None or iso_col is None:
        raise InputError(
            "E001_GEO_INVALID",
            f"polygon file needs a geometry column and one of {list(ISO_COLUMNS)}",
            path=p,
            detail={"columns": names},
        )
    t = pf.read(columns=[iso_col, geom_col])
    isos = [None if v is None else str(v) for v in t.column(iso_col).to_pylist()]
    wkb = t.column(geom_col).to_pylist()
    geoms = shapely.from_wkb(np.array(wkb, dtype=object), on_invalid="ignore")
    if crs is not None and not _is_geographic(json.dumps(crs) if isinstance(crs, dict) else crs):
        raise InputError("E007_CRS_MISMATCH", "polygon CRS is not geographic", path=p)
    return isos, list(geoms)


def _read_fiona(p: str, iso_column: str | None):
    import fiona
    from shapely.geometry import shape

    with fiona.open(p) as src:
        names = list(src.schema["properties"].keys())
        iso_col = iso_column or next((c for c in ISO_COLUMNS if c in names), None)
        if iso_col is None:
            raise InputError(
                "E001_GEO_INVALID",
                f"polygon file needs one of the columns {list(ISO_COLUMNS)}",
                path=p,
                detail={"columns": names},
            )
        if src.crs and not _is_geographic(src.crs.to_wkt()):
            raise InputError("E007_CRS_MISMATCH", "polygon CRS is not geographic", path=p)
        isos, geoms = [], []
        for feat in src:
            v = feat["properties"].get(iso_col)
            isos.append(None if v is None else str(v))
            g = feat["geometry"]
            geoms.append(None if g is None else shape(g))
    return isos, geoms


# GeoPackage binary header (GPKG 1.x, 2.1.3): "GP", version, flags, srs_id (int32), envelope; bytes of the
# envelope by the flags' envelope indicator (bits 1-3)
_GPKG_ENVELOPE_BYTES = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}
_WKB_POLYGONAL = (3, 6)  # 2D Polygon / MultiPolygon


def _gpkg_wkb(blob) -> bytes | None:
    """The WKB of one standard GeoPackage geometry blob (header and envelope stripped), or None when the blob is
    not a plain non-empty 2D Polygon/MultiPolygon (extended or empty geometries, other types: left to fiona)."""
    if not isinstance(blob, bytes) or len(blob) < 8 or blob[:2] != b"GP" or blob[2] != 0:
        return None
    flags = blob[3]
    if flags & 0x30:  # extended GeoPackageBinary / empty geometry
        return None
    env = _GPKG_ENVELOPE_BYTES.get((flags >> 1) & 0x07)
    if env is None or len(blob) < 8 + env + 5:
        return None
    wkb = blob[8 + env:]
    if wkb[0] not in (0, 1):
        return None
    gtype = int.from_bytes(wkb[1:5], "little" if wkb[0] == 1 else "big")
    return wkb if gtype in _WKB_POLYGONAL else None


def _read_gpkg(p: Path, iso_column: str | None):
    """Bulk GeoPackage read (sqlite3 + ``shapely.from_wkb``): the same ``(isos, geometries)`` as
    :func:`_read_fiona` -- features in fid order, the geometry decoded from the very WKB OGR decodes (same
    coordinates, same rings, same orientation) -- without building one GeoJSON mapping and one shapely object per
    ring. Only the plain case is handled here: one feature table, an integer fid, a geographic CRS (an EPSG code or
    a WKT definition pyproj reads as geographic), Polygon/MultiPolygon blobs, text ISO codes; anything else returns
    None and the file is read through fiona (which then also raises the errors, e.g. E007 for a projected CRS)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        contents = con.execute("SELECT table_name, data_type FROM gpkg_contents").fetchall()
        if len(contents) != 1 or contents[0][1] != "features":
            return None
        table = contents[0][0]
        gcols = con.execute("SELECT column_name, srs_id FROM gpkg_geometry_columns WHERE table_name = ?",
                            (table,)).fetchall()
        if len(gcols) != 1:
            return None
        geom_col, srs_id = gcols[0]
        srs = con.execute("SELECT organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys "
                          "WHERE srs_id = ?", (srs_id,)).fetchall()
        if not isinstance(srs_id, int) or srs_id <= 0 or len(srs) != 1:
            return None
        org, code, definition = srs[0]
        epsg = f"EPSG:{code}" if str(org).upper() == "EPSG" and isinstance(code, int) and code > 0 else None
        if not (_is_geographic(epsg) if epsg else _is_geographic(definition)):
            return None
        info = con.execute(f'PRAGMA table_info("{table.replace(chr(34), chr(34) * 2)}")').fetchall()
        pk = [r[1] for r in info if r[5] == 1 and str(r[2]).upper() == "INTEGER"]
        if len([r for r in info if r[5]]) != 1 or len(pk) != 1:
            return None
        names = [r[1] for r in info if r[1] not in (pk[0], geom_col)]
        iso_col = iso_column or next((c for c in ISO_COLUMNS if c in names), None)
        if iso_col is None or iso_col not in names:
            return None

        def q(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        rows = con.execute(f"SELECT {q(iso_col)}, {q(geom_col)} FROM {q(table)} ORDER BY {q(pk[0])}").fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()
    isos: list = []
    wkbs: list = []
    for iso, blob in rows:
        if iso is not None and not isinstance(iso, str):
            return None
        isos.append(iso)
        if blob is None:
            wkbs.append(None)
            continue
        wkb = _gpkg_wkb(blob)
        if wkb is None:
            return None
        wkbs.append(wkb)
    try:
        geoms = shapely.from_wkb(np.array(wkbs, dtype=object))
    except (shapely.errors.GEOSException, ValueError, TypeError):
        return None
    return isos, list(geoms)


def read_polygon_features(path: str | Path, iso_column: str | None = None):
    """Raw features: ``(iso_codes, geometries)`` in file order (no validation). A plain GeoPackage is read in bulk
    (:func:`_read_gpkg`), GeoParquet with pyarrow, anything else through fiona."""
    sp = str(path)
    local = Path(sp[len("zip://"):] if sp.startswith("zip://") else sp)
    if not local.exists():
        raise InputError("E_REFERENCE_SURFACE_MISSING", "world_countries polygon file not found", path=path)
    try:
        if local.suffix.lower() in _GEOPARQUET_SUFFIXES:
            return _read_geoparquet(local, iso_column)
        if local.suffix.lower() == ".gpkg" and not sp.startswith("zip://"):
            got = _read_gpkg(local, iso_column)
            if got is not None:
                return got
        return _read_fiona(sp, iso_column)
    except InputError:
        raise
    except Exception as ex:  # noqa: BLE001 - fiona/pyarrow raise many types
        raise InputError("E001_GEO_INVALID", f"cannot read polygon file: {ex}", path=path) from ex


def load_world_countries(
    path: str | Path, iso_set: Iterable[str] | None = None, iso_column: str | None = None
) -> dict[str, CountryShape]:
    """Country polygons keyed by ISO alpha-2 (A-Z), validated (spec §3 eligibility).

    * every code must match ``^[A-Z]{2}$`` (case-folded) and, when ``iso_set`` is given, be in it
      (``E005_ISO_FK``, listing the offending codes);
    * every geometry must be a non-empty, valid Polygon/MultiPolygon (``E001_GEO_INVALID``);
    * several features of one country form a union (spec §3).
    """
    isos, geoms = read_polygon_features(path, iso_column)
    bad_iso = sorted({repr(v) for v in isos if v is None or not _ISO_RE.match(v.strip().upper())})
    if bad_iso:
        raise InputError(
            "E005_ISO_FK",
            "polygon features without a valid ISO alpha-2 code (fix or remove them)",
            path=path,
            rows=bad_iso,
        )
    codes = [v.strip().upper() for v in isos]
    if iso_set is not None:
        allowed = set(iso_set)
        missing = sorted(set(codes) - allowed)
        if missing:
            raise InputError(
                "E005_ISO_FK", "polygon countries not in the ISO table", path=path, rows=missing,
                detail={"count": len(missing)},
            )
    bad_geom = []
    for i, (c, g) in enumerate(zip(codes, geoms)):
        if g is None or g.is_empty or g.geom_type not in ("Polygon", "MultiPolygon"):
            bad_geom.append(f"feature {i} ({c}): {'missing' if g is None else g.geom_type + (' empty' if g.is_empty else '')}")
        elif not g.is_valid:
            bad_geom.append(f"feature {i} ({c}): {shapely.is_valid_reason(g)}")
    if bad_geom:
        raise InputError(
            "E001_GEO_INVALID",
            "invalid or empty country geometries (repair them, e.g. with shapely.make_valid)",
            path=path,
            rows=bad_geom,
            detail={"count": len(bad_geom)},
        )
    by_iso: dict[str, list] = {}
    for c, g in zip(codes, geoms):
        by_iso.setdefault(c, []).append(g)
    out: dict[str, CountryShape] = {}
    for c in sorted(by_iso):
        gs = by_iso[c]
        g = gs[0] if len(gs) == 1 else shapely.union_all(gs)
        out[c] = CountryShape(c, g)
    return out


def polygon_isos(path: str | Path, iso_column: str | None = None) -> list[str]:
    """ISO codes present in a polygon file (A-Z, unique), for ingress checks such as decision 11."""
    isos, _ = read_polygon_features(path, iso_column)
    return sorted({v.strip().upper() for v in isos if v is not None})


# --------------------------------------------------------------------------------------------------
# Reading one country of a per-country partition (tile_index / tile_bounds / tile_weights)
# --------------------------------------------------------------------------------------------------


def country_part_name(iso: str) -> str:
    """File name of one country inside the S1/S2 partitions: ASCII order of names = writer sort."""
    return f"part-{iso}.parquet"


def read_country(partition_dir: str | Path, iso: str, columns: list[str] | None = None):
    """One country's rows of a ``tile_index`` / ``tile_bounds`` / ``tile_weights`` partition (tile_id order).

    Returns ``None`` when the country has no file (no tiles).
    """
    import pyarrow.parquet as pq

    p = Path(partition_dir) / country_part_name(iso)
    if not p.exists():
        return None
    return pq.read_table(p, columns=columns)


def partition_countries(partition_dir: str | Path) -> list[str]:
    """Countries present in a per-country partition, A-Z."""
    d = Path(partition_dir)
    out = []
    for f in sorted(d.glob("part-*.parquet")):
        code = f.name[len("part-"):-len(".parquet")]
        if _ISO_RE.match(code):
            out.append(code)
    return out


# ---------------------------------------------------------------------- per-country work (S1, S2)
_TASK: dict = {}


def _run_task(iso: str) -> dict:
    return _TASK["fn"](iso)


def map_countries(state: str, isos: list[str], fn, workers: int = 1, weight=None) -> list[dict]:
    """``fn(iso) -> report`` for every country, serially or in a fork pool of ``workers`` (one country per
    task, heaviest ``weight(iso)`` first); report rows returned A-Z by ``country_iso`` whatever the order of
    completion, so outputs never depend on ``workers``. ``fn`` may be a closure: the pool is forked after it
    is stored, so workers inherit it instead of unpickling it. Progress lines (countries done) go to stderr."""
    progress = Progress(state, total=len(isos), unit="countries")
    reports: list[dict] = []
    if workers <= 1 or len(isos) <= 1:
        for iso in isos:
            reports.append(fn(iso))
            progress.advance(1)
    else:
        import multiprocessing as mp

        order = sorted(isos, key=lambda i: (-weight(i), i)) if weight is not None else list(isos)
        _TASK["fn"] = fn
        try:
            with mp.get_context("fork").Pool(workers) as pool:
                for rep in pool.imap(_run_task, order, chunksize=1):
                    reports.append(rep)
                    progress.advance(1)
        finally:
            _TASK.clear()
    reports.sort(key=lambda r: r["country_iso"])
    progress.finish()
    return reports

"""Run report: figures and a summary page for ``snakemake --report`` (issue "Operate, audit, report").

Everything here READS the published outputs of one run and writes presentation files under ``reports/`` of the
data root (never under ``data/``: a report is not a dataset, it is not sealed or validated, and changing a plot
must never touch a governed byte). The rules in ``rules/report.smk`` call the command line at the bottom
(``python -m engine.report <figure> ...``); the work is done by pure functions that take tables/arrays and
return numbers, matplotlib ``Figure`` objects, PNG bytes or HTML text, so tests call them without files.

Figures (one PNG each, one Snakemake ``report()`` output each):

* 1A ``outlets_per_merchant``  histogram of outlets (rows of ``outlet_catalogue``) per merchant;
* 1A ``single_vs_multi``       observed single/multi-site shares against the hurdle model's expectation, the mean
                               of ``hurdle_pi_probs.pi`` (with the Poisson-binomial +-2 sd band of that mean);
* 1A ``countries_per_merchant`` distinct legal countries per merchant (home + foreign);
* 1A ``top_legal_countries``   the legal countries holding the most outlets, split home / cross-border;
* 1B ``site_map``              every ``site_locations`` point, equirectangular lon/lat, coloured by legal country,
                               over thin grey country outlines from the run's ``world_countries`` polygons;
* 1B ``tile_weights_map``      the S2 tile weights (``tile_weights`` joined to ``tile_index``), summed into display
                               blocks with numpy binning, log colour scale;
* run  ``run_summary``         a small HTML page: identities of both segments, S9 decision, ``_passed.flag`` digest
                               and the flattened ``s9_summary.json`` of both validation bundles.

Determinism: PNG bytes are a function of the inputs and the pinned matplotlib (Agg canvas, matplotlib's built-in
defaults instead of any user ``matplotlibrc``, no ``Software`` metadata, no timestamps; colours come from the ISO
code, not from discovery order). The HTML carries no time either.

The path templates of these files are written ONLY in :data:`REPORT_PATHS` (they are presentation outputs, not
datasets, so they are not in the dataset dictionaries).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# --------------------------------------------------------------------------------------------------
# Paths (the one place a report path template is written)
# --------------------------------------------------------------------------------------------------

REPORT_PATHS: dict[str, str] = {
    # 1A figures depend on the 1A run only: seed + 1A manifest_fingerprint (which folds in parameter_hash)
    "outlets_per_merchant": "reports/1A/seed={seed}/fingerprint={manifest_fingerprint}/outlets_per_merchant.png",
    "single_vs_multi": "reports/1A/seed={seed}/fingerprint={manifest_fingerprint}/single_vs_multi.png",
    "countries_per_merchant": "reports/1A/seed={seed}/fingerprint={manifest_fingerprint}/countries_per_merchant.png",
    "top_legal_countries": "reports/1A/seed={seed}/fingerprint={manifest_fingerprint}/top_legal_countries.png",
    # site map: one 1B run (the 1B fingerprint folds in the 1A fingerprint)
    "site_map": "reports/1B/seed={seed}/fingerprint={manifest_fingerprint}/site_map.png",
    # tile weights depend on grid + weights only (decision 13): drawn once per (grid, weights)
    "tile_weights_map": "reports/1B/grid={grid_hash}/weights={weights_hash}/tile_weights_map.png",
    # identities + S9 of both segments, keyed by the 1B run
    "run_summary": "reports/run/seed={seed}/fingerprint={manifest_fingerprint}/run_summary.html",
}


def report_path(name: str, **tokens: Any) -> str:
    """Concrete path (relative to the data root) of report output ``name``."""
    return REPORT_PATHS[name].format(**tokens)


# --------------------------------------------------------------------------------------------------
# Reading (only the needed columns; part files in name order = writer order)
# --------------------------------------------------------------------------------------------------


def read_columns(directory: str | Path, columns: Sequence[str]) -> pa.Table:
    """The ``part-*.parquet`` files of a partition (``_``/``.`` names ignored), ``columns`` only, file-name order."""
    d = Path(directory)
    parts = sorted(p for p in d.iterdir() if p.name.startswith("part-") and p.name.endswith(".parquet"))
    if not parts:
        raise FileNotFoundError(f"no part-*.parquet file in {d}")
    tables = [pq.read_table(p, columns=list(columns)) for p in parts]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _np(col) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.to_numpy(zero_copy_only=False)


# --------------------------------------------------------------------------------------------------
# Pure summaries (vectorised)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MerchantSummary:
    """Per merchant (ascending merchant_id): outlets, distinct legal countries, multi-site flag."""

    merchant_id: np.ndarray  # uint64
    outlets: np.ndarray  # int64
    countries: np.ndarray  # int64
    is_multi: np.ndarray  # bool


def merchant_summary(merchant_id: np.ndarray, legal_iso: np.ndarray, multi_flag: np.ndarray) -> MerchantSummary:
    """Group ``outlet_catalogue`` rows by merchant. ``merchant_id`` stays uint64 (never through a signed type)."""
    mid = np.asarray(merchant_id, dtype=np.uint64)
    merchants, inv = np.unique(mid, return_inverse=True)
    outlets = np.bincount(inv, minlength=merchants.size).astype(np.int64)
    _, iso_code = np.unique(np.asarray(legal_iso, dtype=object).astype(str), return_inverse=True)
    pair = inv.astype(np.int64) * (int(iso_code.max(initial=0)) + 1) + iso_code
    upair = np.unique(pair)
    countries = np.bincount(upair // (int(iso_code.max(initial=0)) + 1), minlength=merchants.size).astype(np.int64)
    multi = np.bincount(inv, weights=np.asarray(multi_flag, dtype=bool).astype(np.float64), minlength=merchants.size) > 0
    return MerchantSummary(merchants, outlets, countries, multi)


@dataclass(frozen=True)
class ShareSummary:
    n_merchants: int  # merchants in outlet_catalogue
    observed_multi: float  # share of multi-site merchants observed
    n_pi: int  # rows of hurdle_pi_probs
    expected_multi: float  # mean(pi): the hurdle model's expected multi-site share
    sd: float  # sd of the observed share under the model (Poisson-binomial): sqrt(sum pi(1-pi)) / n
    z: float  # (observed - expected) / sd (nan when sd == 0)


def share_summary(is_multi: np.ndarray, pi: np.ndarray) -> ShareSummary:
    """Observed multi-site share against the model mean (1A S1: one Bernoulli(pi) per merchant)."""
    m = np.asarray(is_multi, dtype=bool)
    p = np.asarray(pi, dtype=np.float64)
    n, n_pi = int(m.size), int(p.size)
    obs = float(m.mean()) if n else math.nan
    exp = float(p.mean()) if n_pi else math.nan
    sd = float(math.sqrt(float(np.sum(p * (1.0 - p)))) / n_pi) if n_pi else math.nan
    z = (obs - exp) / sd if sd and sd > 0 else math.nan
    return ShareSummary(n, obs, n_pi, exp, sd, z)


@dataclass(frozen=True)
class CountryRow:
    iso: str
    outlets: int
    home_outlets: int  # legal country == merchant's home country
    foreign_outlets: int
    merchants: int


def top_countries(merchant_id: np.ndarray, home_iso: np.ndarray, legal_iso: np.ndarray, k: int = 20) -> list[CountryRow]:
    """Legal countries by outlet count (descending, ties by ISO ascending), the first ``k``."""
    legal = np.asarray(legal_iso, dtype=object).astype(str)
    home = np.asarray(home_iso, dtype=object).astype(str)
    if legal.size == 0:
        return []
    isos, code = np.unique(legal, return_inverse=True)
    outlets = np.bincount(code, minlength=isos.size)
    homes = np.bincount(code, weights=(home == legal).astype(np.float64), minlength=isos.size).astype(np.int64)
    _, minv = np.unique(np.asarray(merchant_id, dtype=np.uint64), return_inverse=True)
    pairs = np.unique(minv.astype(np.int64) * isos.size + code)
    merchants = np.bincount(pairs % isos.size, minlength=isos.size)
    order = np.lexsort((isos, -outlets))[:k]  # primary: outlets desc; tie: ISO asc
    return [CountryRow(str(isos[i]), int(outlets[i]), int(homes[i]), int(outlets[i] - homes[i]), int(merchants[i]))
            for i in order]


def iso_colour_index(isos: np.ndarray, n_colours: int = 20) -> np.ndarray:
    """Colour slot of each ISO alpha-2 code: a function of the code alone (stable across runs and subsets).

    The code's position in the AA..ZZ space times 7 (coprime to 20) modulo ``n_colours``: alphabetically
    adjacent codes (often neighbours on the map, e.g. BE/BG) land 7 slots apart in the cycling colormap.
    """
    s = np.asarray(isos, dtype=object).astype("U2")
    b = np.char.upper(s).view(np.uint32).reshape(-1, 2).astype(np.int64) if s.size else np.zeros((0, 2), np.int64)
    pos = (b[:, 0] - 65) * 26 + (b[:, 1] - 65)
    return (pos * 7) % n_colours


@dataclass(frozen=True)
class BinnedWeights:
    """Tile weights summed into display blocks: ``image[r, c]`` (north-up); nan = no tile in the block."""

    image: np.ndarray  # float64 (H, W)
    extent: tuple[float, float, float, float]  # left, right, bottom, top (degrees)
    factor: int  # grid cells per block side
    cell_deg: tuple[float, float]  # grid cell width, height (degrees)
    tiles: int
    countries: int


def _cell_size(idx: np.ndarray, coord: np.ndarray) -> float:
    """Grid step from two tiles of different row/col (centres are affine in the index, spec 1B §3)."""
    if idx.size == 0:
        return 1.0
    i0, i1 = int(np.argmin(idx)), int(np.argmax(idx))
    if idx[i1] == idx[i0]:
        return 1.0  # one row/column only: any positive step draws it
    return abs(float(coord[i1] - coord[i0]) / float(idx[i1] - idx[i0]))


def bin_tile_weights(row: np.ndarray, col: np.ndarray, lon: np.ndarray, lat: np.ndarray, share: np.ndarray,
                     countries: int = 0, max_width: int = 1440) -> BinnedWeights:
    """Sum per-tile weight shares into blocks of ``factor x factor`` grid cells (numpy 2-D binning).

    ``row``/``col`` are the raster indices of ``tile_index`` (north-up: latitude falls as the row grows) and
    ``lon``/``lat`` the tile centroids, from which the cell size and the image extent follow. ``factor`` is the
    smallest integer keeping the image at most ``max_width`` blocks wide (a 5 arc-minute world grid, 4320
    columns, gives 1440 x 720 blocks). Sums run in input order (``np.bincount``), so equal inputs give equal bits.
    """
    row = np.asarray(row, dtype=np.int64)
    col = np.asarray(col, dtype=np.int64)
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    share = np.asarray(share, dtype=np.float64)
    if row.size == 0:
        return BinnedWeights(np.full((1, 1), np.nan), (-180.0, 180.0, -90.0, 90.0), 1, (1.0, 1.0), 0, countries)
    dx, dy = _cell_size(col, lon), _cell_size(row, lat)
    r0, c0 = int(row.min()), int(col.min())
    span_c, span_r = int(col.max()) - c0 + 1, int(row.max()) - r0 + 1
    f = max(1, -(-span_c // max_width))
    w, h = -(-span_c // f), -(-span_r // f)
    br, bc = (row - r0) // f, (col - c0) // f
    flat = br * w + bc
    total = np.bincount(flat, weights=share, minlength=h * w)
    seen = np.bincount(flat, minlength=h * w) > 0
    img = np.where(seen, total, np.nan).reshape(h, w)
    # west edge of column c0 and north edge of row r0, from any tile's centroid
    left = float(lon[0] - (col[0] - c0 + 0.5) * dx)
    top = float(lat[0] + (row[0] - r0 + 0.5) * dy)
    extent = (left, left + w * f * dx, top - h * f * dy, top)
    return BinnedWeights(img, extent, f, (dx, dy), int(row.size), countries)


def join_tile_weights(index: pa.Table, weights: pa.Table) -> pa.Table:
    """``tile_weights`` rows with their ``tile_index`` raster row/col and centroid, sorted by (country, tile).

    Both partitions are written per country in (country_iso, tile_id) order, so the common case is an aligned
    zip; otherwise an inner join on the key (then re-sorted, so the binning sums in a fixed order).
    """
    keys = ["country_iso", "tile_id"]
    if index.num_rows == weights.num_rows and all(
        index.column(k).equals(weights.column(k)) for k in keys
    ):
        out = index
        for name in ("weight_fp", "dp"):
            out = out.append_column(name, weights.column(name))
        return out
    out = index.join(weights.select(keys + ["weight_fp", "dp"]), keys=keys, join_type="inner")
    return out.sort_by([(k, "ascending") for k in keys])


def outline_segments(isos: Sequence[str | None], geometries: Sequence[Any], tolerance: float = 0.02) -> list[np.ndarray]:
    """Country outline rings as (n, 2) lon/lat arrays, ISO order, antimeridian-normalised, simplified for drawing.

    Uses the 1B loaders' part normalisation (:class:`engine.segment1b.spatial.CountryShape`) so outlines match
    what S1/S6 test points against; ``tolerance`` (degrees) only thins vertices for the figure.
    """
    import shapely

    from engine.segment1b.spatial import CountryShape

    items = sorted(((str(i).strip().upper(), g) for i, g in zip(isos, geometries)
                    if i is not None and g is not None and not g.is_empty), key=lambda t: t[0])
    parts = [p for iso, g in items for p in CountryShape(iso, g).parts]
    if not parts:
        return []
    parts = shapely.simplify(np.array(parts, dtype=object), tolerance)
    rings = shapely.get_rings(parts)
    coords, idx = shapely.get_coordinates(rings, return_index=True)
    cuts = np.flatnonzero(np.diff(idx)) + 1
    return [c for c in np.split(coords, cuts) if len(c) >= 2]


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib object API on an Agg canvas: no pyplot global state, safe to call from any thread)
# --------------------------------------------------------------------------------------------------

DPI = 120
FOOTER_IN = 0.16
SITE_CMAP = "tab20"


def _rc() -> dict:
    """matplotlib's built-in defaults (never the user's matplotlibrc) plus the few settings fixed here."""
    import matplotlib as mpl

    rc = dict(mpl.rcParamsDefault)
    rc.pop("backend", None)
    rc.update({"svg.hashsalt": "layer1-engine", "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 9,
               "axes.titlesize": 10, "path.simplify": True, "agg.path.chunksize": 20000})
    return rc


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    # keep a strip of FOOTER_IN inches at the bottom for the identity footer (constrained layout ignores fig.text)
    fig.get_layout_engine().set(rect=(0.0, FOOTER_IN / h, 1.0, 1.0 - FOOTER_IN / h))
    FigureCanvasAgg(fig)
    return fig


def _footer(fig, tag: str | None) -> None:
    if tag:
        fig.text(0.995, 0.003, tag, ha="right", va="bottom", fontsize=6.5, color="0.45", family="monospace")


def png_bytes(fig) -> bytes:
    """PNG of ``fig``: no ``Software`` metadata, fixed dpi -> same bytes for the same figure."""
    import io

    import matplotlib as mpl

    buf = io.BytesIO()
    with mpl.rc_context(_rc()):
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def fig_outlets_per_merchant(ms: MerchantSummary, tag: str | None = None):
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        fig = _figure(7.0, 4.0)
        ax = fig.add_subplot()
        n = ms.outlets
        top = int(n.max(initial=1))
        counts = np.bincount(n, minlength=top + 1)[1:]
        xs = np.arange(1, top + 1)
        colours = np.where(xs == 1, "#8c8c8c", "#1f77b4")
        ax.bar(xs, counts, width=0.85, color=colours)
        ax.set_yscale("log")
        ax.set_xlabel("outlets per merchant (rows of outlet_catalogue)")
        ax.set_ylabel("merchants (log scale)")
        if top <= 40:
            ax.set_xticks(xs)
        multi = n[ms.is_multi]
        ax.set_title(f"Outlets per merchant: {n.size:,} merchants, {int(n.sum()):,} outlets\n"
                     f"mean {n.mean():.3f} outlets; multi-site merchants ({multi.size:,}) mean "
                     f"{multi.mean() if multi.size else float('nan'):.3f}")
        for x, c in zip(xs, counts):
            if c:
                ax.annotate(f"{c:,}", (x, c), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")
        ax.legend(handles=[mpl.patches.Patch(color="#8c8c8c", label="single-site (hurdle: N = 1)"),
                           mpl.patches.Patch(color="#1f77b4", label="multi-site (NB draw N >= 2)")], loc="upper right")
        _footer(fig, tag)
    return fig


def fig_single_vs_multi(ss: ShareSummary, pi: np.ndarray, tag: str | None = None):
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        fig = _figure(9.0, 4.0)
        ax, ax2 = fig.subplots(1, 2, width_ratios=[1.0, 1.4])
        labels = ["single-site", "multi-site"]
        obs = [1.0 - ss.observed_multi, ss.observed_multi]
        exp = [1.0 - ss.expected_multi, ss.expected_multi]
        x = np.arange(2)
        ax.bar(x - 0.2, obs, width=0.4, color="#1f77b4", label=f"observed (outlet_catalogue, n={ss.n_merchants:,})")
        ax.bar(x + 0.2, exp, width=0.4, color="#ff7f0e", label=f"model: mean of hurdle pi (n={ss.n_pi:,})",
               yerr=[2 * ss.sd, 2 * ss.sd], capsize=4, ecolor="0.2")
        for xi, o, e in zip(x, obs, exp):
            ax.annotate(f"{o:.4f}", (xi - 0.2, o), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                        textcoords="offset points")
            ax.annotate(f"{e:.4f}", (xi + 0.2, e), ha="center", va="bottom", fontsize=7, xytext=(0, 8),
                        textcoords="offset points")
        ax.set_xticks(x, labels)
        ax.set_ylim(0, 1.08)
        ax.set_ylabel("share of merchants")
        ax.set_title(f"Multi-site share {ss.observed_multi:.4f} vs model {ss.expected_multi:.4f} (z = {ss.z:+.2f})")
        ax.legend(loc="upper right", fontsize=7)
        p = np.asarray(pi, dtype=np.float64)
        ax2.hist(p, bins=np.linspace(0.0, 1.0, 51), color="#ff7f0e", alpha=0.8)
        ax2.axvline(ss.expected_multi, color="#d62728", lw=1.5, label=f"mean pi = {ss.expected_multi:.4f}")
        ax2.axvline(ss.observed_multi, color="#1f77b4", lw=1.5, ls="--",
                    label=f"observed multi share = {ss.observed_multi:.4f}")
        ax2.set_xlabel("hurdle probability pi (hurdle_pi_probs)")
        ax2.set_ylabel("merchants")
        ax2.set_title("Distribution of the model's multi-site probability")
        ax2.legend(loc="upper right", fontsize=7)
        _footer(fig, tag)
    return fig


def fig_countries_per_merchant(ms: MerchantSummary, tag: str | None = None):
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        fig = _figure(7.0, 4.0)
        ax = fig.add_subplot()
        top = int(ms.countries.max(initial=1))
        xs = np.arange(1, top + 1)
        single = np.bincount(ms.countries[~ms.is_multi], minlength=top + 1)[1:]
        multi = np.bincount(ms.countries[ms.is_multi], minlength=top + 1)[1:]
        ax.bar(xs, single, width=0.85, color="#8c8c8c", label="single-site merchants")
        ax.bar(xs, multi, width=0.85, bottom=single, color="#2ca02c", label="multi-site merchants")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xlabel("distinct legal countries per merchant (home + foreign)")
        ax.set_ylabel("merchants (log scale)")
        cross = int((ms.countries > 1).sum())
        ax.set_title(f"Countries per merchant: {cross:,} of {ms.countries.size:,} merchants are cross-border "
                     f"({cross / max(ms.countries.size, 1):.2%})")
        for x, s, m in zip(xs, single, multi):
            if s + m:
                ax.annotate(f"{s + m:,}", (x, s + m), ha="center", va="bottom", fontsize=7, xytext=(0, 1),
                            textcoords="offset points")
        ax.legend(loc="upper right")
        _footer(fig, tag)
    return fig


def fig_top_countries(rows: Sequence[CountryRow], total_outlets: int, n_countries: int, tag: str | None = None):
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        fig = _figure(7.0, 0.9 + 0.24 * max(len(rows), 1))
        ax = fig.add_subplot()
        y = np.arange(len(rows))[::-1]
        home = np.array([r.home_outlets for r in rows], dtype=np.int64)
        foreign = np.array([r.foreign_outlets for r in rows], dtype=np.int64)
        ax.barh(y, home, color="#1f77b4", label="home outlets (legal = home country)")
        ax.barh(y, foreign, left=home, color="#d62728", label="cross-border outlets (foreign legal country)")
        ax.set_yticks(y, [f"{r.iso}" for r in rows])
        for yi, r in zip(y, rows):
            ax.annotate(f"{r.outlets:,} ({r.outlets / max(total_outlets, 1):.1%}; {r.merchants:,} merchants)",
                        (r.outlets, yi), va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
        ax.set_xlim(0, max([r.outlets for r in rows], default=1) * 1.35)
        ax.set_xlabel("outlets")
        ax.set_title(f"Top {len(rows)} legal countries of {n_countries} ({total_outlets:,} outlets)")
        ax.legend(loc="lower right", fontsize=7)
        _footer(fig, tag)
    return fig


def _draw_outlines(ax, outlines: Sequence[np.ndarray], colour: str = "0.55", lw: float = 0.3, z: float = 1) -> None:
    from matplotlib.collections import LineCollection

    if outlines:
        ax.add_collection(LineCollection(list(outlines), colors=colour, linewidths=lw, zorder=z))


def _world_axes(ax) -> None:
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")  # equirectangular: one degree of lon = one degree of lat
    ax.set_xticks(np.arange(-180, 181, 60))
    ax.set_yticks(np.arange(-90, 91, 30))
    ax.set_xlabel("longitude (deg)")
    ax.set_ylabel("latitude (deg)")
    ax.tick_params(labelsize=7)


def fig_site_map(lon: np.ndarray, lat: np.ndarray, legal_iso: np.ndarray, outlines: Sequence[np.ndarray],
                 legend_top: int = 12, tag: str | None = None):
    import matplotlib as mpl

    with mpl.rc_context(_rc()):
        fig = _figure(12.0, 6.6)
        ax = fig.add_subplot()
        _world_axes(ax)
        _draw_outlines(ax, outlines)
        iso = np.asarray(legal_iso, dtype=object).astype("U2")
        cmap = mpl.colormaps[SITE_CMAP]
        colours = cmap.colors  # a ListedColormap: index the colour list directly (no float rounding)
        rgba = np.asarray(colours)[iso_colour_index(iso, len(colours))] if iso.size else np.zeros((0, 3))
        ax.scatter(np.asarray(lon, np.float64), np.asarray(lat, np.float64), s=2.0, c=rgba, linewidths=0,
                   zorder=2, rasterized=True)
        uniq, counts = np.unique(iso, return_counts=True)
        order = np.lexsort((uniq, -counts))[:legend_top]
        slots = iso_colour_index(uniq, len(colours))
        handles = [mpl.lines.Line2D([], [], ls="", marker="o", ms=4, color=colours[int(slots[i])],
                                    label=f"{uniq[i]} {counts[i]:,}") for i in order]
        if handles:
            ax.legend(handles=handles, loc="lower left", fontsize=6.5, title="most sites", title_fontsize=7,
                      ncols=2, framealpha=0.85)
        ax.set_title(f"site_locations: {iso.size:,} sites in {uniq.size} legal countries "
                     f"(colour = legal country, {len(colours)}-colour cycle)")
        _footer(fig, tag)
    return fig


def fig_tile_weights(bw: BinnedWeights, outlines: Sequence[np.ndarray], basis: str | None = None,
                     tag: str | None = None):
    import matplotlib as mpl
    from matplotlib.colors import LogNorm

    with mpl.rc_context(_rc()):
        fig = _figure(12.0, 6.6)
        ax = fig.add_subplot()
        _world_axes(ax)
        img = bw.image
        pos = img[np.isfinite(img) & (img > 0)]
        vmin = float(max(pos.min(), 1e-9)) if pos.size else 1e-9
        vmax = float(max(pos.max(), vmin * 10)) if pos.size else 1.0
        zero = np.where(np.isfinite(img) & (img <= 0), 1.0, np.nan)
        ax.imshow(zero, extent=bw.extent, origin="upper", cmap=mpl.colors.ListedColormap(["#d9d9d9"]),
                  interpolation="nearest", zorder=0)
        shown = np.where(np.isfinite(img) & (img > 0), img, np.nan)
        im = ax.imshow(shown, extent=bw.extent, origin="upper", cmap="viridis", norm=LogNorm(vmin, vmax),
                       interpolation="nearest", zorder=0.5)
        _draw_outlines(ax, outlines, colour="0.35", lw=0.25, z=1)
        _world_axes(ax)
        cb = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01)
        cb.set_label("summed tile weight share within its country (log)")
        dx, dy = bw.cell_deg
        ax.set_title(f"tile_weights{f' (basis={basis})' if basis else ''}: {bw.tiles:,} tiles in {bw.countries} "
                     f"countries; blocks of {bw.factor}x{bw.factor} cells of {dx * 60:.3g}' x {dy * 60:.3g}'"
                     f" (grey = tiles of weight 0)")
        _footer(fig, tag)
    return fig


# --------------------------------------------------------------------------------------------------
# Run summary (identities + S9 of both segments), deterministic HTML
# --------------------------------------------------------------------------------------------------

# s9_summary keys not flattened into the table (shown elsewhere or too large)
_SKIP_KEYS = {"failures", "by_country", "identity", "run", "upstream_1A"}


def flatten(obj: Any, prefix: str = "", skip: Iterable[str] = (), max_list: int = 12) -> list[tuple[str, str]]:
    """Scalar leaves of a JSON object as (dotted key, text), keys sorted; long lists abbreviated."""
    out: list[tuple[str, str]] = []
    skip = set(skip)
    if isinstance(obj, Mapping):
        for k in sorted(obj):
            if not prefix and k in skip:
                continue
            out.extend(flatten(obj[k], f"{prefix}.{k}" if prefix else str(k), (), max_list))
    elif isinstance(obj, list) and obj and all(isinstance(v, Mapping) for v in obj):
        out.append((prefix, f"{len(obj)} entries"))
    elif isinstance(obj, list):
        text = ", ".join(_text(v) for v in obj[:max_list]) + (f", ... ({len(obj)} in all)" if len(obj) > max_list else "")
        out.append((prefix, text if obj else "(none)"))
    else:
        out.append((prefix, _text(obj)))
    return out


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return "null" if v is None else str(v)


@dataclass(frozen=True)
class S9Result:
    segment: str
    bundle: str  # bundle directory, relative to the data root
    passed: bool  # _passed.flag present
    flag: str | None  # the flag's text (``sha256_hex = ...``)
    summary: dict | None  # s9_summary.json
    bundle_files: list[str]


def read_s9(bundle_dir: str | Path, segment: str, rel_to: str | Path | None = None) -> S9Result:
    d = Path(bundle_dir)
    flag = d / "_passed.flag"
    summ = d / "s9_summary.json"
    files = sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
    shown = os.path.relpath(d, rel_to) if rel_to is not None else str(d)
    return S9Result(segment, shown, flag.is_file(), flag.read_text().strip() if flag.is_file() else None,
                    json.loads(summ.read_text()) if summ.is_file() else None, files)


def _table(rows: Iterable[tuple[str, str]], head: tuple[str, str] = ("item", "value"), cls: str = "") -> str:
    body = "".join(f"<tr><td>{html.escape(k)}</td><td class='v{_cls(v)}'>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table class='{cls}'><thead><tr><th>{head[0]}</th><th>{head[1]}</th></tr></thead><tbody>{body}</tbody></table>"


def _cls(v: str) -> str:
    return " pass" if v in ("PASS", "true") else (" fail" if v in ("FAIL", "false") else "")


def identity_rows(identities: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``IDENTITIES`` of rules/common.smk (seed, 1A{...}, 1B{...}, code_digest) as table rows, fixed order."""
    rows = [("seed", _text(identities.get("seed")))]
    for seg in ("1A", "1B"):
        for k in ("parameter_hash", "manifest_fingerprint", "run_id", "grid_hash", "weights_hash"):
            if k in (identities.get(seg) or {}):
                rows.append((f"{seg}.{k}", _text(identities[seg][k])))
    for k in sorted(set(identities) - {"seed", "1A", "1B"}):
        rows.extend(flatten(identities[k], k))
    return rows


def identities_agree(identities: Mapping[str, Any], segment: str, bundle_identity: Mapping[str, Any]) -> bool | None:
    """Do the identities a bundle's ``s9_summary`` records equal this run's (seed + the segment's hashes)?

    ``None`` when they share no key. A disagreement means the page is showing another run's bundle.
    """
    mine = {"seed": identities.get("seed"), **(identities.get(segment) or {})}
    keys = sorted(k for k in bundle_identity if k in mine and mine[k] is not None)
    if not keys:
        return None
    return all(str(bundle_identity[k]) == str(mine[k]) for k in keys)


def summary_html(identities: Mapping[str, Any], results: Sequence[S9Result]) -> str:
    """One self-contained page (no script, no time): identities, then per segment the S9 decision and summary."""
    css = ("body{font-family:DejaVu Sans,Arial,sans-serif;font-size:13px;margin:12px}"
           "table{border-collapse:collapse;margin:6px 0 14px}td,th{border:1px solid #ccc;padding:2px 8px;"
           "text-align:left;vertical-align:top}th{background:#f0f0f0}td.v{font-family:monospace}"
           "td.pass{color:#1a7f37;font-weight:bold}td.fail{color:#c62828;font-weight:bold}"
           "h2{margin:10px 0 4px;font-size:15px}.dec{font-size:14px;font-weight:bold}"
           ".PASS{color:#1a7f37}.FAIL{color:#c62828}")
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>Layer-1 run summary</title>",
             f"<style>{css}</style></head><body>", "<h2>Identities</h2>", _table(identity_rows(identities))]
    for r in results:
        decision = "PASS" if r.passed else "FAIL"
        parts.append(f"<h2>Segment {html.escape(r.segment)}: S9 validation</h2>")
        parts.append(f"<p class='dec {decision}'>decision: {decision}</p>")
        rows = [("bundle", r.bundle), ("_passed.flag", r.flag or "(absent: no PASS, no read)"),
                ("bundle files", ", ".join(r.bundle_files) or "(none)")]
        s = r.summary or {}
        ident = s.get("run") or s.get("identity")
        if isinstance(ident, Mapping):
            rows.extend(flatten(ident, "bundle identity"))
            agree = identities_agree(identities, r.segment, ident)
            if agree is not None:
                rows.append(("bundle identity == this run", _text(agree)))
        parts.append(_table(rows))
        if isinstance(s.get("checks"), Mapping):
            parts.append(_table([(k, _text(v)) for k, v in sorted(s["checks"].items())], head=("check", "status")))
        if r.summary is None:
            parts.append("<p>s9_summary.json missing</p>")
        else:
            fails = s.get("failures") or []
            rows = flatten(s, skip=_SKIP_KEYS | {"checks"})
            rows.append(("failures", f"{len(fails)}"))
            if isinstance(s.get("by_country"), (Mapping, list)):
                rows.append(("by_country", f"{len(s['by_country'])} countries"))
            parts.append(_table(rows, head=("s9_summary", "value")))
            if fails:
                frows = [(str(f.get("code", "?")), str(f.get("message") or f.get("detail") or "")) for f in fails[:50]]
                parts.append(_table(frows, head=("failure code", "detail")))
    parts.append("</body></html>\n")
    return "".join(parts)


# --------------------------------------------------------------------------------------------------
# Command line (what rules/report.smk runs)
# --------------------------------------------------------------------------------------------------


def _write(path: str | Path, data: bytes) -> None:
    """Atomic replace (a reader never sees half a file); reports are outputs Snakemake rewrites, not datasets."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)


def _outlines(path: str | None) -> list[np.ndarray]:
    if not path:
        return []
    from engine.segment1b.spatial import read_polygon_features

    isos, geoms = read_polygon_features(path)
    return outline_segments(isos, geoms)


def cmd_segment1a(a: argparse.Namespace) -> None:
    cat = read_columns(a.catalogue, ["merchant_id", "home_country_iso", "legal_country_iso", "single_vs_multi_flag"])
    mid, home, legal = _np(cat["merchant_id"]), _np(cat["home_country_iso"]), _np(cat["legal_country_iso"])
    ms = merchant_summary(mid, legal, _np(cat["single_vs_multi_flag"]))
    pi = _np(read_columns(a.pi, ["pi"])["pi"]).astype(np.float64)
    ss = share_summary(ms.is_multi, pi)
    _write(a.outlets, png_bytes(fig_outlets_per_merchant(ms, a.tag)))
    _write(a.share, png_bytes(fig_single_vs_multi(ss, pi, a.tag)))
    _write(a.countries, png_bytes(fig_countries_per_merchant(ms, a.tag)))
    rows = top_countries(mid, home, legal, k=a.top)
    _write(a.top_countries, png_bytes(fig_top_countries(rows, int(cat.num_rows), int(np.unique(legal).size), a.tag)))


def cmd_sites(a: argparse.Namespace) -> None:
    t = read_columns(a.sites, ["legal_country_iso", "lon_deg", "lat_deg"])
    fig = fig_site_map(_np(t["lon_deg"]), _np(t["lat_deg"]), _np(t["legal_country_iso"]), _outlines(a.polygons),
                       tag=a.tag)
    _write(a.out, png_bytes(fig))


def cmd_tile_weights(a: argparse.Namespace) -> None:
    idx = read_columns(a.tile_index, ["country_iso", "tile_id", "raster_row", "raster_col", "centroid_lon",
                                      "centroid_lat"])
    w = read_columns(a.tile_weights, ["country_iso", "tile_id", "weight_fp", "dp", "basis"])
    basis = w["basis"][0].as_py() if w.num_rows else None
    j = join_tile_weights(idx, w.drop_columns(["basis"]))
    dp = _np(j["dp"]).astype(np.float64)
    share = _np(j["weight_fp"]).astype(np.float64) / np.power(10.0, dp)  # S2: weights sum to 10^dp per country
    bw = bin_tile_weights(_np(j["raster_row"]), _np(j["raster_col"]), _np(j["centroid_lon"]), _np(j["centroid_lat"]),
                          share, countries=int(pc.count_distinct(j["country_iso"]).as_py()))
    _write(a.out, png_bytes(fig_tile_weights(bw, _outlines(a.polygons), basis=basis, tag=a.tag)))


def cmd_summary(a: argparse.Namespace) -> None:
    text = a.identities if a.identities.lstrip().startswith("{") else Path(a.identities).read_text()
    ids = json.loads(text)
    results = [read_s9(Path(b), seg, rel_to=Path.cwd()) for seg, b in (x.split("=", 1) for x in a.bundle)]
    _write(a.out, summary_html(ids, results).encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.report", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("segment1a", help="the four 1A figures")
    s.add_argument("--catalogue", required=True)
    s.add_argument("--pi", required=True)
    s.add_argument("--outlets", required=True)
    s.add_argument("--share", required=True)
    s.add_argument("--countries", required=True)
    s.add_argument("--top-countries", required=True)
    s.add_argument("--top", type=int, default=20)
    s.add_argument("--tag")
    s.set_defaults(fn=cmd_segment1a)
    s = sub.add_parser("sites", help="world map of site_locations")
    s.add_argument("--sites", required=True)
    s.add_argument("--polygons")
    s.add_argument("--out", required=True)
    s.add_argument("--tag")
    s.set_defaults(fn=cmd_sites)
    s = sub.add_parser("tile-weights", help="world map of the S2 tile weights")
    s.add_argument("--tile-index", required=True)
    s.add_argument("--tile-weights", required=True)
    s.add_argument("--polygons")
    s.add_argument("--out", required=True)
    s.add_argument("--tag")
    s.set_defaults(fn=cmd_tile_weights)
    s = sub.add_parser("summary", help="identities + S9 of both segments (HTML)")
    s.add_argument("--identities", required=True, help="JSON text or a file holding it")
    s.add_argument("--bundle", action="append", default=[], help="SEGMENT=BUNDLE_DIR (repeatable, in order)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_summary)
    a = p.parse_args(argv)
    a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
